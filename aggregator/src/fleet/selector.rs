//! Label selectors: `site=berlin,role=pos`, `site!=paris`, `role in (pos,kiosk)`,
//! `role notin (test)`, `gpu` (the label is set), `!gpu` (it is not). Terms are joined with
//! commas and all must hold; the empty selector matches every agent.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    text: String,
    terms: Vec<Term>,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn check_name(what: &str, name: &str, text: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "selector {text:?}: {what} {name:?} must be 1 to 63 characters of a-z, A-Z, 0-9, \
             '_', '-', '.', '/'"
        ))
    }
}

/// Splits at commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (idx, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("selector {text:?}: ')' without '('"))?;
            }
            ',' if depth == 0 => {
                terms.push(&text[start..idx]);
                start = idx + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("selector {text:?}: '(' without ')'"));
    }
    terms.push(&text[start..]);
    Ok(terms)
}

fn parse_set(key: &str, rest: &str, text: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("selector {text:?}: {key} in/notin needs a list such as (a,b)"))?;
    inner
        .split(',')
        .map(|value| check_name("value", value.trim(), text))
        .collect()
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, String> {
        let text = text.trim();
        let mut terms = Vec::new();
        if !text.is_empty() {
            for raw in split_terms(text)? {
                let raw = raw.trim();
                let term = if let Some((key, value)) = raw.split_once("!=") {
                    Term::NotEquals(
                        check_name("label", key.trim(), text)?,
                        check_name("value", value.trim(), text)?,
                    )
                } else if let Some((key, value)) = raw.split_once('=') {
                    let value = value.strip_prefix('=').unwrap_or(value);
                    Term::Equals(
                        check_name("label", key.trim(), text)?,
                        check_name("value", value.trim(), text)?,
                    )
                } else if let Some((key, rest)) = raw.split_once(" notin ") {
                    let key = check_name("label", key.trim(), text)?;
                    let values = parse_set(&key, rest, text)?;
                    Term::NotIn(key, values)
                } else if let Some((key, rest)) = raw.split_once(" in ") {
                    let key = check_name("label", key.trim(), text)?;
                    let values = parse_set(&key, rest, text)?;
                    Term::In(key, values)
                } else if let Some(key) = raw.strip_prefix('!') {
                    Term::Absent(check_name("label", key.trim(), text)?)
                } else {
                    Term::Exists(check_name("label", raw, text).map_err(|_| {
                        format!(
                            "selector {text:?}: cannot read {raw:?}; use key=value, key!=value, \
                             key in (a,b), key notin (a,b), key or !key, joined with commas"
                        )
                    })?)
                };
                terms.push(term);
            }
        }
        Ok(Selector {
            text: text.to_owned(),
            terms,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Equals(key, value) => labels.get(key) == Some(value),
            Term::NotEquals(key, value) => labels.get(key) != Some(value),
            Term::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Term::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Term::Exists(key) => labels.contains_key(key),
            Term::Absent(key) => !labels.contains_key(key),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn terms_all_must_hold() {
        let berlin_pos = labels(&[("site", "berlin"), ("role", "pos")]);
        let berlin_kiosk = labels(&[("site", "berlin"), ("role", "kiosk")]);
        let paris_pos = labels(&[("site", "paris"), ("role", "pos")]);
        let s = Selector::parse("site=berlin,role=pos").expect("parse");
        assert!(s.matches(&berlin_pos));
        assert!(!s.matches(&berlin_kiosk));
        assert!(!s.matches(&paris_pos));
        let s = Selector::parse("site != paris").expect("parse");
        assert!(s.matches(&berlin_pos) && !s.matches(&paris_pos));
        let s = Selector::parse("role in (pos, kiosk),site==berlin").expect("parse");
        assert!(s.matches(&berlin_pos) && s.matches(&berlin_kiosk) && !s.matches(&paris_pos));
        let s = Selector::parse("role notin (kiosk)").expect("parse");
        assert!(s.matches(&berlin_pos) && !s.matches(&berlin_kiosk));
        assert!(
            s.matches(&labels(&[])),
            "notin holds when the label is unset"
        );
        let s = Selector::parse("site,!gpu").expect("parse");
        assert!(s.matches(&berlin_pos) && !s.matches(&labels(&[("gpu", "yes")])));
        assert!(Selector::parse("").expect("parse").matches(&berlin_pos));
    }

    #[test]
    fn bad_selectors_say_why() {
        for bad in [
            "site=",
            "=x",
            "role in pos",
            "role in (a",
            "a b",
            "site=ber lin",
        ] {
            let error = Selector::parse(bad).expect_err(bad);
            assert!(error.contains("selector"), "{bad}: {error}");
        }
    }
}
