//! CEL expressions and `{{ ... }}` templates in config files. This module compile-checks them so
//! `runnel-agent check` (and the aggregator, before a rollout) refuses a bad one with its
//! position; it owns the wording of those errors and the template syntax. It does not evaluate
//! anything and keeps no compiled program: validated configs stay plain data, and the agent
//! compiles the same text again (`runnel_agent::pipeline::expr`) to run it.

use std::fmt;

use crate::common::{Checker, quote};
use crate::error::ConfigError;

/// The longest expression (or template) accepted, in bytes. Rules run on every event; a long
/// expression is a mistake or an attack, and the parser recurses on nesting.
pub const MAX_EXPR_BYTES: usize = 4096;

/// Why a CEL expression does not compile, and where (1-based line and column, in characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CelError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for CelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CEL syntax error at {}:{}: {}",
            self.line, self.column, self.message
        )
    }
}

impl std::error::Error for CelError {}

impl CelError {
    /// The first of the parser's errors (the rest usually follow from it).
    pub fn from_parse_errors(errors: &cel::ParseErrors) -> CelError {
        match errors.errors.first() {
            Some(error) => CelError {
                line: usize::try_from(error.pos.0).unwrap_or(1).max(1),
                column: usize::try_from(error.pos.1).unwrap_or(1).max(1),
                message: error
                    .msg
                    .strip_prefix("Syntax error: ")
                    .unwrap_or(&error.msg)
                    .to_owned(),
            },
            None => CelError {
                line: 1,
                column: 1,
                message: "does not parse".to_owned(),
            },
        }
    }
}

/// Parses `source` as CEL (the standard environment, with its macros `has`, `all`, `exists`,
/// `exists_one`, `map`, `filter`). Only syntax is checked: CEL is dynamically typed, so a
/// misspelled variable shows up when the expression runs (as an evaluation error, counted).
pub fn check_cel(source: &str) -> Result<(), CelError> {
    if source.len() > MAX_EXPR_BYTES {
        return Err(CelError {
            line: 1,
            column: 1,
            message: format!("longer than {MAX_EXPR_BYTES} bytes"),
        });
    }
    if source.trim().is_empty() {
        return Err(CelError {
            line: 1,
            column: 1,
            message: "empty expression".to_owned(),
        });
    }
    // The parser is built on ANTLR and could panic on input it does not expect; a config
    // check must not take the process down with it.
    match std::panic::catch_unwind(|| cel::Program::compile(source).map(drop)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(errors)) => Err(CelError::from_parse_errors(&errors)),
        Err(_) => Err(CelError {
            line: 1,
            column: 1,
            message: "the CEL parser failed on this input".to_owned(),
        }),
    }
}

/// A config error for `key = "source"` when `source` is not valid CEL:
/// `agent.toml: rules[2].when = "...": CEL syntax error at 1:14: ...`.
pub(crate) fn check_expr(
    checker: &Checker<'_>,
    key: &str,
    source: &str,
) -> Result<(), ConfigError> {
    check_cel(source).map_err(|error| checker.invalid(key, quote(source), error.to_string()))
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// Text copied as it is.
    Text(String),
    /// A CEL expression between `{{` and `}}`, trimmed; its value is written in its place.
    Expr(String),
}

/// Splits a template such as `temperature {{ attrs.temp }} on {{ attrs.device }}` into text and
/// expressions. `{{` opens an expression and the next `}}` closes it; a template with an
/// unclosed `{{` or a stray `}}` is an error. Text that must contain `{{` writes it as a CEL
/// string: `{{ "{{" }}`.
pub fn parse_template(template: &str) -> Result<Vec<TemplatePart>, String> {
    if template.len() > MAX_EXPR_BYTES {
        return Err(format!("longer than {MAX_EXPR_BYTES} bytes"));
    }
    let mut parts = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        let Some(open) = rest.find("{{") else {
            if rest.contains("}}") {
                return Err("`}}` without an opening `{{`".to_owned());
            }
            parts.push(TemplatePart::Text(rest.to_owned()));
            break;
        };
        let text = &rest[..open];
        if text.contains("}}") {
            return Err("`}}` without an opening `{{`".to_owned());
        }
        if !text.is_empty() {
            parts.push(TemplatePart::Text(text.to_owned()));
        }
        let after = &rest[open + 2..];
        // The expression ends at the first `}}` outside a string literal.
        let close = find_close(after).ok_or_else(|| "`{{` is never closed by `}}`".to_owned())?;
        parts.push(TemplatePart::Expr(after[..close].trim().to_owned()));
        rest = &after[close + 2..];
    }
    Ok(parts)
}

/// The byte offset of the first `}}` in `text` that is not inside a quoted CEL string.
fn find_close(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut quote_char = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote_char {
            Some(q) => {
                if b == b'\\' {
                    i += 1;
                } else if b == q {
                    quote_char = None;
                }
            }
            None => {
                if b == b'"' || b == b'\'' {
                    quote_char = Some(b);
                } else if b == b'}' && bytes.get(i + 1) == Some(&b'}') {
                    return Some(i);
                }
            }
        }
        i += 1;
    }
    None
}

/// A config error for a template whose syntax or whose expressions do not compile.
pub(crate) fn check_template(
    checker: &Checker<'_>,
    key: &str,
    template: &str,
) -> Result<(), ConfigError> {
    let parts = parse_template(template)
        .map_err(|problem| checker.invalid(key, quote(template), problem))?;
    let mut n_expr = 0;
    for part in parts {
        if let TemplatePart::Expr(source) = part {
            n_expr += 1;
            check_cel(&source).map_err(|error| {
                checker.invalid(
                    key,
                    quote(template),
                    format!("placeholder {n_expr} `{{{{ {source} }}}}`: {error}"),
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_expressions_pass() {
        for source in [
            "true",
            "name == \"page_view\" && attrs.price > 100.0",
            "has(attrs.device) ? attrs.device : \"unknown\"",
            "tags.exists(t, t == \"vip\")",
            "name.matches(\"^page_\")",
            "score != null && score > 0.8",
        ] {
            assert_eq!(check_cel(source), Ok(()), "{source}");
        }
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let error = check_cel("name == \"a\" &&& x").expect_err("bad");
        assert_eq!((error.line, error.column), (1, 15), "{error}");
        assert!(error.to_string().starts_with("CEL syntax error at 1:15: "));
        let error = check_cel("true &&\n  (x").expect_err("bad");
        assert_eq!(error.line, 2, "{error}");
        assert!(check_cel("").is_err());
        assert!(check_cel(&"a+".repeat(3000)).is_err());
    }

    #[test]
    fn templates_split_into_text_and_expressions() {
        assert_eq!(
            parse_template("t={{ attrs.temp }} on {{attrs.device}}!").expect("ok"),
            vec![
                TemplatePart::Text("t=".into()),
                TemplatePart::Expr("attrs.temp".into()),
                TemplatePart::Text(" on ".into()),
                TemplatePart::Expr("attrs.device".into()),
                TemplatePart::Text("!".into()),
            ]
        );
        assert_eq!(
            parse_template("{{ \"}}\" }}").expect("ok"),
            vec![TemplatePart::Expr("\"}}\"".into())]
        );
        assert_eq!(parse_template("").expect("ok"), vec![]);
        assert!(parse_template("a {{ b").is_err());
        assert!(parse_template("a }} b").is_err());
    }
}
