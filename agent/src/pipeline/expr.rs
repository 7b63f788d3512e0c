//! CEL expressions over events: compiled once, evaluated per event with the event's fields as
//! variables, from any number of threads. Owns the variable model, the conversions between CEL
//! values and [`runnel_common::Value`], and `{{ ... }}` templates. It never panics on an
//! expression or an event and never blocks; an evaluation error is a value of its own, counted
//! in `runnel_agent_expr_errors_total{rule}` and logged once per expression.
//!
//! # Variables
//!
//! | variable | CEL type | from |
//! |---|---|---|
//! | `name`, `stream` | string | the event's name and stream |
//! | `source` | string | `"http"`, `"snowplow"`, `"segment"`, `"mqtt"` or `"internal"` |
//! | `event_id`, `user_id`, `session_id` | string or null | null when absent |
//! | `score` | double or null | null until a model scored the event |
//! | `tags` | list of strings | |
//! | `attrs` | map of string to value | `Json` attrs are parsed into maps and lists |
//! | `event_time_ms`, `receive_time_ms` | int | Unix epoch milliseconds |
//!
//! Attr values map as: null, bool, int, double (`Float`), string, bytes; `Json` text becomes the
//! CEL map or list it encodes (JSON numbers are ints when whole and in range, else doubles; text
//! that does not parse stays a string). `attrs.temp` reads one attr without building the whole
//! map; an absent attr is an error ("no such key"), so guard with `has(attrs.temp)`. Keys that
//! are not identifiers: `attrs["user-agent"]`.
//!
//! Extra variables ([`Vars::with`]) are looked up before the event's, so a caller with no event
//! (a window's `having` over aggregates and its key) passes only those.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use cel::common::types::{
    CelBool, CelBytes, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString,
};
use cel::common::value::{CowVal, Val};
use cel::context::VariableResolver;
use cel::{Context, Env, Program};
use runnel_common::{Event, Value};
pub use runnel_config::CelError;
use runnel_config::TemplatePart;

thread_local! {
    /// The standard CEL environment (functions and macros), one per thread: every evaluation
    /// clones the `Arc` into its context, and one shared `Arc` would make every thread bounce
    /// the same reference count between cores.
    static ENV: Arc<Env> = Arc::new(Env::stdlib());
}

/// Why an evaluation produced no usable value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// CEL's own error: a missing attr, a type mismatch, division by zero, ...
    #[error("{0}")]
    Cel(String),
    /// The result has a type the caller cannot use (a condition that is not a bool, ...).
    #[error("{0}")]
    Type(String),
    /// The interpreter panicked; caught, the event is unharmed.
    #[error("the CEL interpreter failed on this input")]
    Panic,
}

/// One compiled CEL expression. `Send + Sync`: rules compile once and evaluate from every
/// source task.
pub struct Expr {
    source: Arc<str>,
    program: Program,
    /// `runnel_agent_expr_errors_total{rule}` of the rule (or window) that owns it.
    errors: ::metrics::Counter,
    rule: Arc<str>,
    /// Whether an error has been logged yet: once per expression, the counter does the rest.
    logged: AtomicBool,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expr")
            .field("rule", &self.rule)
            .field("source", &self.source)
            .finish()
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Expr>();
};

impl Expr {
    /// Compiles `source` for the rule (or window) named `rule`, which labels its error counter.
    pub fn compile(source: &str, rule: &str) -> Result<Expr, CelError> {
        runnel_config::check_cel(source)?;
        let program = std::panic::catch_unwind(|| Program::compile(source))
            .map_err(|_| CelError {
                line: 1,
                column: 1,
                message: "the CEL parser failed on this input".to_owned(),
            })?
            .map_err(|errors| CelError::from_parse_errors(&errors))?;
        Ok(Expr {
            source: Arc::from(source),
            program,
            errors: ::metrics::counter!("runnel_agent_expr_errors_total", "rule" => rule.to_owned()),
            rule: Arc::from(rule),
            logged: AtomicBool::new(false),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates with `vars`; errors are counted and the first one is logged.
    pub fn eval(&self, vars: &Vars<'_>) -> Result<cel::Value, EvalError> {
        let result = self.eval_uncounted(vars);
        if let Err(error) = &result {
            self.count_error(error);
        }
        result
    }

    /// The condition's verdict: true only for CEL `true`. An error or a non-bool value is
    /// false (and counted).
    pub fn eval_bool(&self, vars: &Vars<'_>) -> bool {
        match self.eval(vars) {
            Ok(cel::Value::Bool(verdict)) => verdict,
            Ok(other) => {
                self.count_error(&EvalError::Type(format!(
                    "a condition must be a bool, not {}",
                    other.type_of()
                )));
                false
            }
            Err(_) => false,
        }
    }

    /// Evaluates and converts the result for an event field.
    pub fn eval_value(&self, vars: &Vars<'_>) -> Result<Value, EvalError> {
        let value = self.eval(vars)?;
        from_cel(&value).inspect_err(|error| self.count_error(error))
    }

    fn eval_uncounted(&self, vars: &Vars<'_>) -> Result<cel::Value, EvalError> {
        let resolver = Resolver { vars };
        let mut context = Context::with_env(ENV.with(Arc::clone));
        context.set_variable_resolver(&resolver);
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.program.execute(&context))) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(EvalError::Cel(error.to_string())),
            Err(_) => Err(EvalError::Panic),
        }
    }

    pub(crate) fn count_error(&self, error: &EvalError) {
        self.errors.increment(1);
        if !self.logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                rule = %self.rule,
                expr = %self.source,
                %error,
                "expression failed (logged once; counted in runnel_agent_expr_errors_total)"
            );
        }
    }
}

/// What an expression sees: an event's fields and extra variables.
///
/// One `Vars` may serve many expressions over the same event: the `attrs` map, once built, is
/// kept for the next one (build a new `Vars` after changing the event).
#[derive(Debug, Default)]
pub struct Vars<'a> {
    event: Option<&'a Event>,
    extra: Vec<(Cow<'a, str>, cel::Value)>,
    attrs: OnceLock<Box<dyn Val + 'a>>,
}

impl<'a> Vars<'a> {
    /// The fields of `event`, as in the module docs.
    pub fn event(event: &'a Event) -> Vars<'a> {
        Vars {
            event: Some(event),
            extra: Vec::new(),
            attrs: OnceLock::new(),
        }
    }

    /// No event: only the variables added with [`Vars::with`].
    pub fn none() -> Vars<'a> {
        Vars::default()
    }

    /// Adds (or shadows) a variable.
    pub fn with(mut self, name: impl Into<Cow<'a, str>>, value: cel::Value) -> Vars<'a> {
        self.extra.push((name.into(), value));
        self
    }
}

/// Serves variables to the interpreter on demand: only what an expression names is converted,
/// and the `attrs` map at most once per [`Vars`].
struct Resolver<'r, 'a> {
    vars: &'r Vars<'a>,
}

impl VariableResolver for Resolver<'_, '_> {
    fn resolve<'b>(&'b self, name: &str) -> Option<CowVal<'b, 'b>> {
        if let Some((_, value)) = self
            .vars
            .extra
            .iter()
            .rev()
            .find(|(n, _)| n.as_ref() == name)
        {
            return cel_to_val(value.clone()).map(CowVal::Owned);
        }
        let event = self.vars.event?;
        let text = |s: &'b str| CowVal::owned(CelString::from(s));
        let optional = |s: &'b Option<String>| match s {
            Some(s) => CowVal::owned(CelString::from(s.as_str())),
            None => CowVal::owned(CelNull),
        };
        Some(match name {
            "name" => text(&event.name),
            "stream" => text(&event.stream),
            "source" => text(event.source.as_str()),
            "event_id" => optional(&event.event_id),
            "user_id" => optional(&event.user_id),
            "session_id" => optional(&event.session_id),
            "score" => match event.score {
                Some(score) => CowVal::owned(CelDouble::from(score)),
                None => CowVal::owned(CelNull),
            },
            "event_time_ms" => CowVal::owned(CelInt::from(event.event_time_ms)),
            "receive_time_ms" => CowVal::owned(CelInt::from(event.receive_time_ms)),
            "tags" => {
                let tags: Vec<Box<dyn Val + 'b>> = event
                    .tags
                    .iter()
                    .map(|tag| Box::new(CelString::from(tag.as_str())) as Box<dyn Val + 'b>)
                    .collect();
                CowVal::owned(CelList::from(tags))
            }
            "attrs" => {
                let map = self.vars.attrs.get_or_init(|| attrs_to_val(&event.attrs));
                CowVal::Borrowed(map.as_ref())
            }
            // `attrs.temp` is offered whole first; answering it skips building the map.
            _ => {
                let key = name.strip_prefix("attrs.")?;
                CowVal::Owned(value_to_val(event.attrs.get(key)?))
            }
        })
    }
}

fn attrs_to_val<'v>(attrs: &'v BTreeMap<String, Value>) -> Box<dyn Val + 'v> {
    let map: HashMap<CelMapKey<'v>, Box<dyn Val + 'v>> = attrs
        .iter()
        .map(|(key, value)| (CelMapKey::from(key.as_str()), value_to_val(value)))
        .collect();
    Box::new(CelMap::from(map))
}

/// An attr value as a CEL value borrowing from it.
fn value_to_val(value: &Value) -> Box<dyn Val + '_> {
    match value {
        Value::Null => Box::new(CelNull),
        Value::Bool(b) => Box::new(CelBool::from(*b)),
        Value::Int(i) => Box::new(CelInt::from(*i)),
        Value::Float(f) => Box::new(CelDouble::from(*f)),
        Value::String(s) => Box::new(CelString::from(s.as_str())),
        Value::Bytes(b) => Box::new(CelBytes::from(b.as_slice())),
        Value::Json(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(json) => json_to_val(&json),
            Err(_) => Box::new(CelString::from(text.as_str())),
        },
    }
}

fn json_to_val(json: &serde_json::Value) -> Box<dyn Val + 'static> {
    match json {
        serde_json::Value::Null => Box::new(CelNull),
        serde_json::Value::Bool(b) => Box::new(CelBool::from(*b)),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Box::new(CelInt::from(i)),
            None => Box::new(CelDouble::from(n.as_f64().unwrap_or(f64::NAN))),
        },
        serde_json::Value::String(s) => Box::new(CelString::from(s.clone())),
        serde_json::Value::Array(items) => Box::new(CelList::from(
            items.iter().map(json_to_val).collect::<Vec<_>>(),
        )),
        serde_json::Value::Object(fields) => {
            let map: HashMap<CelMapKey<'static>, Box<dyn Val>> = fields
                .iter()
                .map(|(key, value)| (CelMapKey::from(key.clone()), json_to_val(value)))
                .collect();
            Box::new(CelMap::from(map))
        }
    }
}

fn cel_to_val(value: cel::Value) -> Option<Box<dyn Val>> {
    value.try_into().ok()
}

/// An attr value as an owned CEL value (for [`Vars::with`]).
pub fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Int(i) => cel::Value::Int(*i),
        Value::Float(f) => cel::Value::Float(*f),
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Bytes(b) => cel::Value::Bytes(Arc::new(b.clone())),
        Value::Json(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(json) => json_to_cel(&json),
            Err(_) => cel::Value::String(Arc::new(text.clone())),
        },
    }
}

fn json_to_cel(json: &serde_json::Value) -> cel::Value {
    match json {
        serde_json::Value::Null => cel::Value::Null,
        serde_json::Value::Bool(b) => cel::Value::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => {
            cel::Value::List(Arc::new(items.iter().map(json_to_cel).collect()))
        }
        serde_json::Value::Object(fields) => {
            let map: HashMap<cel::objects::Key, cel::Value> = fields
                .iter()
                .map(|(key, value)| {
                    (
                        cel::objects::Key::String(Arc::new(key.clone())),
                        json_to_cel(value),
                    )
                })
                .collect();
            cel::Value::Map(cel::objects::Map { map: Arc::new(map) })
        }
    }
}

/// A CEL value as an attr value: scalars as themselves (uint as int when it fits, else
/// double), lists and maps as `Json` text. Durations, timestamps, types and functions have no
/// attr form.
pub fn from_cel(value: &cel::Value) -> Result<Value, EvalError> {
    Ok(match value {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(*b),
        cel::Value::Int(i) => Value::Int(*i),
        cel::Value::UInt(u) => match i64::try_from(*u) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::Float(*u as f64),
        },
        cel::Value::Float(f) => Value::Float(*f),
        cel::Value::String(s) => Value::String(s.as_ref().clone()),
        cel::Value::Bytes(b) => Value::Bytes(b.as_ref().clone()),
        cel::Value::List(_) | cel::Value::Map(_) => Value::Json(to_json(value)?.to_string()),
        other => {
            return Err(EvalError::Type(format!(
                "a {} value cannot be stored in an event",
                other.type_of()
            )));
        }
    })
}

/// A CEL value as JSON (for payloads and `Json` attrs). Bytes become arrays of numbers; map
/// keys become strings.
pub fn to_json(value: &cel::Value) -> Result<serde_json::Value, EvalError> {
    Ok(match value {
        cel::Value::Null => serde_json::Value::Null,
        cel::Value::Bool(b) => serde_json::Value::Bool(*b),
        cel::Value::Int(i) => serde_json::Value::from(*i),
        cel::Value::UInt(u) => serde_json::Value::from(*u),
        cel::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        cel::Value::String(s) => serde_json::Value::String(s.as_ref().clone()),
        cel::Value::Bytes(b) => serde_json::Value::from(b.as_ref().clone()),
        cel::Value::List(items) => {
            serde_json::Value::Array(items.iter().map(to_json).collect::<Result<Vec<_>, _>>()?)
        }
        cel::Value::Map(map) => {
            let mut fields = serde_json::Map::new();
            for (key, value) in map.map.iter() {
                let key = match key {
                    cel::objects::Key::String(s) => s.as_ref().clone(),
                    cel::objects::Key::Int(i) => i.to_string(),
                    cel::objects::Key::Uint(u) => u.to_string(),
                    cel::objects::Key::Bool(b) => b.to_string(),
                };
                fields.insert(key, to_json(value)?);
            }
            serde_json::Value::Object(fields)
        }
        other => {
            return Err(EvalError::Type(format!(
                "a {} value has no JSON form",
                other.type_of()
            )));
        }
    })
}

/// An attr value as JSON.
pub fn value_to_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Bytes(b) => serde_json::Value::from(b.clone()),
        Value::Json(text) => {
            serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.clone()))
        }
    }
}

/// An event as a JSON object with the variable names of the module docs (the default payload
/// of MQTT and webhook actions).
pub fn event_to_json(event: &Event) -> serde_json::Value {
    let optional = |s: &Option<String>| {
        s.as_ref().map_or(serde_json::Value::Null, |s| {
            serde_json::Value::String(s.clone())
        })
    };
    serde_json::json!({
        "name": event.name,
        "stream": event.stream,
        "source": event.source.as_str(),
        "event_id": optional(&event.event_id),
        "user_id": optional(&event.user_id),
        "session_id": optional(&event.session_id),
        "score": event.score,
        "tags": event.tags,
        "event_time_ms": event.event_time_ms,
        "receive_time_ms": event.receive_time_ms,
        "attrs": event
            .attrs
            .iter()
            .map(|(key, value)| (key.clone(), value_to_json(value)))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
    })
}

/// A compiled `{{ ... }}` template.
#[derive(Debug)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug)]
enum Part {
    Text(String),
    Expr(Expr),
}

impl Template {
    /// Compiles a template; `rule` labels the error counter of its expressions.
    pub fn compile(template: &str, rule: &str) -> Result<Template, CelError> {
        let parts = runnel_config::parse_template(template).map_err(|message| CelError {
            line: 1,
            column: 1,
            message,
        })?;
        let parts = parts
            .into_iter()
            .map(|part| match part {
                TemplatePart::Text(text) => Ok(Part::Text(text)),
                TemplatePart::Expr(source) => Expr::compile(&source, rule).map(Part::Expr),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Template { parts })
    }

    /// Writes the text with every placeholder replaced by its value: strings as they are,
    /// numbers and bools as text, null as `null`, lists and maps as JSON.
    pub fn render(&self, vars: &Vars<'_>) -> Result<String, EvalError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Expr(expr) => match expr.eval(vars)? {
                    cel::Value::String(s) => out.push_str(&s),
                    other => {
                        let json = to_json(&other).inspect_err(|error| expr.count_error(error))?;
                        out.push_str(&json.to_string());
                    }
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_common::SourceKind;

    fn event() -> Event {
        let mut event = Event::new(SourceKind::Mqtt, "telemetry", "reading", 1_700_000_000_000);
        event.user_id = Some("u1".into());
        event.tags = vec!["a".into(), "b".into()];
        event.attrs.insert("temp".into(), Value::Float(91.5));
        event.attrs.insert("count".into(), Value::Int(3));
        event
            .attrs
            .insert("device".into(), Value::String("press-4".into()));
        event
            .attrs
            .insert("ua-string".into(), Value::String("bot/1".into()));
        event.attrs.insert(
            "cart".into(),
            Value::Json(r#"{"items":[{"sku":"x","qty":2}],"total":9.5}"#.into()),
        );
        event
    }

    fn eval(source: &str, event: &Event) -> Result<cel::Value, EvalError> {
        Expr::compile(source, "test")
            .expect("compiles")
            .eval(&Vars::event(event))
    }

    #[test]
    fn the_variable_model() {
        let event = event();
        let cases: &[(&str, cel::Value)] = &[
            ("name", "reading".into()),
            ("stream", "telemetry".into()),
            ("source", "mqtt".into()),
            ("user_id", "u1".into()),
            ("session_id == null", true.into()),
            ("event_id == null", true.into()),
            ("score == null", true.into()),
            (
                "tags",
                cel::Value::List(Arc::new(vec!["a".into(), "b".into()])),
            ),
            ("\"b\" in tags", true.into()),
            ("event_time_ms", cel::Value::Int(1_700_000_000_000)),
            ("receive_time_ms == event_time_ms", true.into()),
            ("attrs.temp", cel::Value::Float(91.5)),
            ("attrs.temp > 90.0 && attrs.count == 3", true.into()),
            ("attrs[\"ua-string\"].startsWith(\"bot\")", true.into()),
            ("has(attrs.temp) && !has(attrs.nope)", true.into()),
            ("attrs.cart.items[0].qty * 2", cel::Value::Int(4)),
            ("attrs.cart.total", cel::Value::Float(9.5)),
            ("size(attrs)", cel::Value::Int(5)),
            ("attrs.device.matches(\"^press-[0-9]+$\")", true.into()),
            ("tags.exists(t, t == \"a\")", true.into()),
            ("double(attrs.count) * 2.0", cel::Value::Float(6.0)),
            ("attrs.count > 2.5", true.into()),
        ];
        for (source, expected) in cases {
            assert_eq!(eval(source, &event).as_ref(), Ok(expected), "{source}");
        }
    }

    #[test]
    fn errors_are_values_not_panics() {
        let event = event();
        for source in [
            "attrs.missing > 1",
            "score > 0.5",
            "1 / 0",
            "nope",
            "attrs.device + 1",
            // CEL keeps int and double apart in arithmetic (RULES.md says so).
            "attrs.count * 2.0",
        ] {
            assert!(eval(source, &event).is_err(), "{source}");
        }
        let expr = Expr::compile("attrs.missing", "test").expect("compiles");
        assert!(!expr.eval_bool(&Vars::event(&event)));
        let expr = Expr::compile("42", "test").expect("compiles");
        assert!(!expr.eval_bool(&Vars::event(&event)), "a non-bool is false");
    }

    #[test]
    fn extra_variables_with_or_without_an_event() {
        let expr = Expr::compile("count >= 3 && key == \"press-4\"", "w").expect("compiles");
        let vars = Vars::none()
            .with("count", cel::Value::Int(3))
            .with("key", to_cel(&Value::String("press-4".into())));
        assert!(expr.eval_bool(&vars));
        let event = event();
        let expr = Expr::compile("name == \"shadowed\" && attrs.count == 3", "w").expect("ok");
        let vars = Vars::event(&event).with("name", "shadowed".into());
        assert!(expr.eval_bool(&vars));
        assert!(
            Expr::compile("name", "w")
                .expect("ok")
                .eval(&Vars::none())
                .is_err()
        );
    }

    #[test]
    fn conversions_to_attr_values() {
        let event = event();
        let cases: &[(&str, Value)] = &[
            ("1 + 2", Value::Int(3)),
            ("2.5", Value::Float(2.5)),
            ("\"x\"", Value::String("x".into())),
            ("true", Value::Bool(true)),
            ("null", Value::Null),
            ("b\"ab\"", Value::Bytes(b"ab".to_vec())),
            ("uint(7)", Value::Int(7)),
            ("[1, \"a\"]", Value::Json(r#"[1,"a"]"#.into())),
            ("{\"k\": attrs.count}", Value::Json(r#"{"k":3}"#.into())),
            (
                "attrs.cart.items",
                Value::Json(r#"[{"qty":2,"sku":"x"}]"#.into()),
            ),
        ];
        for (source, expected) in cases {
            let expr = Expr::compile(source, "t").expect("compiles");
            assert_eq!(
                expr.eval_value(&Vars::event(&event)).as_ref(),
                Ok(expected),
                "{source}"
            );
        }
        assert_eq!(to_cel(&Value::Json("not json".into())), "not json".into());
    }

    #[test]
    fn templates_render_values() {
        let event = event();
        let template = Template::compile(
            "{{ attrs.device }} at {{ attrs.temp }}: {{ tags }} {{ user_id }} {{ session_id }}",
            "t",
        )
        .expect("compiles");
        assert_eq!(
            template.render(&Vars::event(&event)).expect("renders"),
            "press-4 at 91.5: [\"a\",\"b\"] u1 null"
        );
        let broken = Template::compile("{{ attrs.nope }}", "t").expect("compiles");
        assert!(broken.render(&Vars::event(&event)).is_err());
        assert!(Template::compile("{{ 1 + }}", "t").is_err());
    }

    #[test]
    fn compile_errors_have_positions() {
        let error = Expr::compile("name == \"a\" &&& x", "r").expect_err("bad");
        assert_eq!((error.line, error.column), (1, 15));
    }

    #[test]
    fn usable_from_many_threads() {
        let expr = Arc::new(Expr::compile("attrs.count * 2", "t").expect("compiles"));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let expr = Arc::clone(&expr);
                std::thread::spawn(move || {
                    let event = event();
                    (0..100).all(|_| expr.eval(&Vars::event(&event)) == Ok(cel::Value::Int(6)))
                })
            })
            .collect();
        for handle in handles {
            assert!(handle.join().expect("thread"));
        }
    }
}
