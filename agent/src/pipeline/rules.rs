//! Stateless rules: a CEL condition and actions (drop, set, rename, remove, tag, route, sample,
//! and local actions), applied in config order. Owns the compiled rules and what each action
//! does to an event; it keeps no state between events, so a batch can run on any thread.
//! Local actions are only handed over ([`Fired`]), never run here.
//!
//! A matching rule, in this order: computes every `set` value from the event as it was, then
//! writes them; `rename`; `remove`; `tag`; `route`; then `sample` may discard the event (no
//! actions fire for it); local actions fire with the event as the rule left it; `drop`
//! discards it. A discarded event meets no further rule.
//!
//! Errors never lose an event: a condition that fails is false, a `set` that fails leaves the
//! field as it was, a `sample_by` that fails keeps the event; each is counted in
//! `runnel_agent_expr_errors_total{rule}`. Counted: `runnel_agent_rule_matches_total{rule}`,
//! `runnel_agent_rule_dropped_events_total{rule,reason}` (reason `drop` or `sample`).

use std::sync::Arc;

use anyhow::Context as _;
use runnel_common::{Event, Value};
use runnel_config::{FieldPath, MatchMode, RuleConfig, RuleEntry, RulesConfig};

use super::actions::{Fired, RuleActions};
use super::expr::{EvalError, Expr, Vars};

/// The compiled rules of one pipeline.
#[derive(Default)]
pub struct Rules {
    entries: Vec<Entry>,
}

enum Entry {
    Rule(Box<Rule>),
    Set(Set),
}

struct Set {
    when: Option<Expr>,
    first: bool,
    rules: Vec<Rule>,
}

struct Rule {
    when: Option<Expr>,
    set: Vec<(FieldPath, Expr)>,
    rename: Vec<(FieldPath, FieldPath)>,
    remove: Vec<FieldPath>,
    tag: Vec<String>,
    route: Option<String>,
    sample: Option<Sample>,
    drop: bool,
    actions: Option<Arc<RuleActions>>,
    matches: ::metrics::Counter,
    dropped: ::metrics::Counter,
    sampled_out: ::metrics::Counter,
}

struct Sample {
    rate: f64,
    by: Option<Expr>,
}

/// What a matched rule did to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Kept,
    Dropped,
}

impl Rules {
    /// Compiles every rule's expressions and templates; fails with the rule name and position.
    pub fn build(config: &RulesConfig) -> anyhow::Result<Rules> {
        let mut entries = Vec::with_capacity(config.entries.len());
        for entry in &config.entries {
            entries.push(match entry {
                RuleEntry::Rule(rule) => Entry::Rule(Box::new(Rule::build(rule)?)),
                RuleEntry::Set(set) => Entry::Set(Set {
                    when: compile(set.when.as_deref(), &set.name, "when")?,
                    first: set.match_mode == MatchMode::First,
                    rules: set
                        .rules
                        .iter()
                        .map(Rule::build)
                        .collect::<Result<_, _>>()?,
                }),
            });
        }
        Ok(Rules { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies the rules to a batch; local actions that fire are pushed to `fired`.
    pub fn apply(&self, events: Vec<Event>, _now_ms: i64, fired: &mut Vec<Fired>) -> Vec<Event> {
        if self.entries.is_empty() {
            return events;
        }
        let mut kept = Vec::with_capacity(events.len());
        for mut event in events {
            if self.apply_one(&mut event, fired) {
                kept.push(event);
            }
        }
        kept
    }

    /// Runs every entry on one event; false when a rule discarded it. The variables (and the
    /// `attrs` map they may have built) serve every condition until a rule changes the event.
    fn apply_one(&self, event: &mut Event, fired: &mut Vec<Fired>) -> bool {
        let mut vars = Vars::event(event);
        for entry in &self.entries {
            let (guard, first, rules) = match entry {
                Entry::Rule(rule) => (None, false, std::slice::from_ref(rule.as_ref())),
                Entry::Set(set) => (set.when.as_ref(), set.first, set.rules.as_slice()),
            };
            if let Some(guard) = guard
                && !guard.eval_bool(&vars)
            {
                continue;
            }
            for rule in rules {
                if let Some(when) = &rule.when
                    && !when.eval_bool(&vars)
                {
                    continue;
                }
                let values = rule.computed(&vars);
                drop(vars);
                if rule.act(event, values, fired) == Outcome::Dropped {
                    return false;
                }
                vars = Vars::event(event);
                if first {
                    break;
                }
            }
        }
        true
    }
}

fn compile(source: Option<&str>, rule: &str, key: &str) -> anyhow::Result<Option<Expr>> {
    source
        .map(|source| {
            Expr::compile(source, rule).with_context(|| format!("rule {rule}: {key} = {source:?}"))
        })
        .transpose()
}

impl Rule {
    fn build(config: &RuleConfig) -> anyhow::Result<Rule> {
        let name = config.name.as_str();
        let mut set = Vec::with_capacity(config.set.len());
        for (field, source) in &config.set {
            let expr = compile(Some(source), name, &format!("set.{field}"))?
                .expect("compile of Some is Some");
            set.push((field.clone(), expr));
        }
        let sample = match config.sample {
            Some(rate) => Some(Sample {
                rate,
                by: compile(config.sample_by.as_deref(), name, "sample_by")?,
            }),
            None => None,
        };
        let dropped = |reason: &'static str| {
            ::metrics::counter!(
                "runnel_agent_rule_dropped_events_total",
                "rule" => name.to_owned(),
                "reason" => reason
            )
        };
        Ok(Rule {
            when: compile(config.when.as_deref(), name, "when")?,
            set,
            rename: config.rename.clone(),
            remove: config.remove.clone(),
            tag: config.tag.clone(),
            route: config.route.clone(),
            sample,
            drop: config.drop,
            actions: RuleActions::build(name, &config.local)?,
            matches: ::metrics::counter!("runnel_agent_rule_matches_total", "rule" => name.to_owned()),
            dropped: dropped("drop"),
            sampled_out: dropped("sample"),
        })
    }

    /// The `set` values, computed from the event before this rule changes it (`None` where an
    /// expression failed: that field stays as it was).
    fn computed(&self, vars: &Vars<'_>) -> Vec<Option<Value>> {
        self.matches.increment(1);
        self.set
            .iter()
            .map(|(_, expr)| expr.eval_value(vars).ok())
            .collect()
    }

    /// Applies a matched rule's actions to the event.
    fn act(
        &self,
        event: &mut Event,
        values: Vec<Option<Value>>,
        fired: &mut Vec<Fired>,
    ) -> Outcome {
        for ((field, expr), value) in self.set.iter().zip(values) {
            if let Some(value) = value
                && let Err(error) = write_field(event, field, value)
            {
                expr.count_error(&error);
            }
        }
        for (from, to) in &self.rename {
            if let Some(value) = take_field(event, from) {
                // A value that does not fit the target stays where it was.
                let backup = value.clone();
                if write_field(event, to, value).is_err() {
                    let _ = write_field(event, from, backup);
                }
            }
        }
        for field in &self.remove {
            take_field(event, field);
        }
        for tag in &self.tag {
            if !event.tags.contains(tag) {
                event.tags.push(tag.clone());
            }
        }
        if let Some(stream) = &self.route {
            event.stream.clone_from(stream);
        }
        if let Some(sample) = &self.sample
            && !sample.keeps(event)
        {
            self.sampled_out.increment(1);
            return Outcome::Dropped;
        }
        if let Some(actions) = &self.actions {
            fired.push(Fired {
                actions: Arc::clone(actions),
                event: event.clone(),
            });
        }
        if self.drop {
            self.dropped.increment(1);
            return Outcome::Dropped;
        }
        Outcome::Kept
    }
}

impl Sample {
    /// Whether the event is in the kept fraction: a stable hash of the sample key, scaled to
    /// [0, 1), is below the rate. The same key always gets the same verdict.
    fn keeps(&self, event: &Event) -> bool {
        let mut hash = Fnv::new();
        match &self.by {
            Some(by) => match by.eval(&Vars::event(event)) {
                Ok(value) => hash.write_str(&format!("{value:?}")),
                // No key, no verdict: keep rather than lose the event (counted by eval).
                Err(_) => return true,
            },
            None => match &event.event_id {
                Some(id) => hash.write_str(id),
                None => {
                    hash.write_str(&event.name);
                    hash.write_str(event.user_id.as_deref().unwrap_or(""));
                    hash.write_str(event.session_id.as_deref().unwrap_or(""));
                    hash.write(&event.event_time_ms.to_le_bytes());
                    for (key, value) in &event.attrs {
                        hash.write_str(key);
                        hash.write_str(&format!("{value:?}"));
                    }
                }
            },
        }
        // The top 53 bits as a fraction in [0, 1).
        let fraction = (hash.finish() >> 11) as f64 / (1u64 << 53) as f64;
        fraction < self.rate
    }
}

/// FNV-1a, 64 bits: stable across Rust versions and platforms (std's hasher is not promised
/// to be), so a sample verdict does not change with an upgrade. A final mix spreads short keys.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_str(&mut self, text: &str) {
        self.write(text.as_bytes());
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        self.write(&[0xff]);
    }

    fn finish(&self) -> u64 {
        // splitmix64's finaliser.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Reads and clears a field that may be absent; `None` when it was absent.
fn take_field(event: &mut Event, field: &FieldPath) -> Option<Value> {
    match field {
        FieldPath::EventId => event.event_id.take().map(Value::String),
        FieldPath::UserId => event.user_id.take().map(Value::String),
        FieldPath::SessionId => event.session_id.take().map(Value::String),
        FieldPath::Score => event.score.take().map(Value::Float),
        FieldPath::Attr(key) => event.attrs.remove(key),
        // Not optional: config validation keeps them out of rename sources and remove.
        FieldPath::Name => Some(Value::String(event.name.clone())),
        FieldPath::Stream => Some(Value::String(event.stream.clone())),
        FieldPath::EventTimeMs => Some(Value::Int(event.event_time_ms)),
    }
}

/// Writes `value` to `field`, converting it where the field has a fixed type: text fields take
/// strings, numbers and bools (as text); `score` a number; `event_time_ms` a whole number; null
/// clears an optional field. Anything else is an error and changes nothing.
fn write_field(event: &mut Event, field: &FieldPath, value: Value) -> Result<(), EvalError> {
    let as_text = |value: Value| -> Result<Option<String>, EvalError> {
        Ok(Some(match value {
            Value::Null => return Ok(None),
            Value::String(s) => s,
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(EvalError::Type(format!(
                    "{field} takes a string, not {other:?}"
                )));
            }
        }))
    };
    let required = |text: Option<String>| {
        text.ok_or_else(|| EvalError::Type(format!("{field} cannot be null")))
    };
    match field {
        FieldPath::Name => {
            let name = required(as_text(value)?)?;
            if name.is_empty() {
                return Err(EvalError::Type("name cannot be empty".to_owned()));
            }
            event.name = name;
        }
        FieldPath::Stream => {
            let stream = required(as_text(value)?)?;
            let ok = !stream.is_empty()
                && stream.len() <= 63
                && stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                return Err(EvalError::Type(format!(
                    "stream {stream:?} is not 1 to 63 characters of a-z A-Z 0-9 _ . -"
                )));
            }
            event.stream = stream;
        }
        FieldPath::EventId => event.event_id = as_text(value)?,
        FieldPath::UserId => event.user_id = as_text(value)?,
        FieldPath::SessionId => event.session_id = as_text(value)?,
        FieldPath::Score => {
            event.score = match value {
                Value::Null => None,
                Value::Float(f) => Some(f),
                Value::Int(i) => Some(i as f64),
                other => {
                    return Err(EvalError::Type(format!(
                        "score takes a number, not {other:?}"
                    )));
                }
            }
        }
        FieldPath::EventTimeMs => {
            event.event_time_ms = match value {
                Value::Int(i) => i,
                Value::Float(f) if f.is_finite() && f.fract() == 0.0 => f as i64,
                other => {
                    return Err(EvalError::Type(format!(
                        "event_time_ms takes a whole number, not {other:?}"
                    )));
                }
            }
        }
        FieldPath::Attr(key) => {
            event.attrs.insert(key.clone(), value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use runnel_common::SourceKind;

    use super::*;

    const BASE: &str = r#"
        [uplink]
        aggregator = "127.0.0.1:9480"
        ca_cert = "/c/ca.pem"
        cert = "/c/a.pem"
        key = "/c/a.key"
    "#;

    fn rules(toml: &str) -> Rules {
        let config =
            runnel_config::parse_agent(&format!("{BASE}\n{toml}"), Path::new("agent.toml"))
                .unwrap_or_else(|error| panic!("{error}"));
        Rules::build(&config.rules).expect("builds")
    }

    fn event(name: &str) -> Event {
        let mut event = Event::new(SourceKind::Http, "web", name, 1_700_000_000_000);
        event.user_id = Some("u1".into());
        event.attrs.insert("price".into(), Value::Float(120.0));
        event
            .attrs
            .insert("country".into(), Value::String("DE".into()));
        event.attrs.insert("uid".into(), Value::Int(42));
        event
            .attrs
            .insert("password".into(), Value::String("hunter2".into()));
        event
    }

    fn run(rules: &Rules, events: Vec<Event>) -> (Vec<Event>, Vec<Fired>) {
        let mut fired = Vec::new();
        let out = rules.apply(events, 0, &mut fired);
        (out, fired)
    }

    /// One row per action: the rules, the input event's name, and what must hold of the output.
    #[test]
    fn every_stateless_action() {
        type Check = fn(&[Event]);
        let cases: &[(&str, &str, Check)] = &[
            (
                "drop",
                r#"[[rules]]
                   name = "drop-health"
                   when = 'name == "health"'
                   drop = true"#,
                |out| assert!(out.is_empty()),
            ),
            (
                "drop when false",
                r#"[[rules]]
                   name = "drop-other"
                   when = 'name == "other"'
                   drop = true"#,
                |out| assert_eq!(out.len(), 1),
            ),
            (
                "set computed",
                r#"[[rules]]
                   name = "region"
                   set = { "attrs.region" = 'attrs.country == "DE" ? "eu" : "world"', "attrs.total" = "attrs.price * 2.0", user_id = '"user-" + string(attrs.uid)', score = "0.5", "attrs.uid" = "attrs.uid + 1" }"#,
                |out| {
                    let e = &out[0];
                    assert_eq!(e.attrs["region"], Value::String("eu".into()));
                    assert_eq!(e.attrs["total"], Value::Float(240.0));
                    assert_eq!(
                        e.user_id.as_deref(),
                        Some("user-42"),
                        "set sees the event as it was"
                    );
                    assert_eq!(e.attrs["uid"], Value::Int(43));
                    assert_eq!(e.score, Some(0.5));
                },
            ),
            (
                "set that fails leaves the field",
                r#"[[rules]]
                   name = "bad-set"
                   set = { "attrs.price" = "attrs.nope * 2.0", stream = '"not a stream!"' }"#,
                |out| {
                    assert_eq!(out[0].attrs["price"], Value::Float(120.0));
                    assert_eq!(out[0].stream, "web");
                },
            ),
            (
                "rename",
                r#"[[rules]]
                   name = "rename"
                   rename = { "attrs.uid" = "user_id", "attrs.country" = "attrs.cc" }"#,
                |out| {
                    let e = &out[0];
                    assert_eq!(e.user_id.as_deref(), Some("42"));
                    assert!(!e.attrs.contains_key("uid"));
                    assert_eq!(e.attrs["cc"], Value::String("DE".into()));
                    assert!(!e.attrs.contains_key("country"));
                },
            ),
            (
                "rename of an absent field does nothing",
                r#"[[rules]]
                   name = "rename-absent"
                   rename = { "attrs.nope" = "attrs.other" }"#,
                |out| assert!(!out[0].attrs.contains_key("other")),
            ),
            (
                "remove",
                r#"[[rules]]
                   name = "scrub"
                   remove = ["attrs.password", "user_id"]"#,
                |out| {
                    assert!(!out[0].attrs.contains_key("password"));
                    assert_eq!(out[0].user_id, None);
                },
            ),
            (
                "tag",
                r#"[[rules]]
                   name = "vip"
                   when = "attrs.price > 100.0"
                   tag = ["vip", "big"]
                   [[rules]]
                   name = "vip-again"
                   tag = ["vip"]"#,
                |out| assert_eq!(out[0].tags, vec!["vip".to_owned(), "big".to_owned()]),
            ),
            (
                "route",
                r#"[[rules]]
                   name = "route"
                   when = 'attrs.country == "DE"'
                   route = "eu-web""#,
                |out| assert_eq!(out[0].stream, "eu-web"),
            ),
            (
                "sample everything",
                r#"[[rules]]
                   name = "all"
                   sample = 1.0"#,
                |out| assert_eq!(out.len(), 1),
            ),
            (
                "a failing condition is false",
                r#"[[rules]]
                   name = "broken"
                   when = "attrs.missing > 1"
                   drop = true"#,
                |out| assert_eq!(out.len(), 1),
            ),
            (
                "later rules see earlier changes",
                r#"[[rules]]
                   name = "route"
                   route = "eu"
                   [[rules]]
                   name = "tag-eu"
                   when = 'stream == "eu"'
                   tag = ["eu"]"#,
                |out| assert_eq!(out[0].tags, vec!["eu".to_owned()]),
            ),
            (
                "nothing after a drop",
                r#"[[rules]]
                   name = "d"
                   drop = true
                   [[rules]]
                   name = "t"
                   tag = ["x"]"#,
                |out| assert!(out.is_empty()),
            ),
        ];
        for (what, toml, check) in cases {
            let rules = rules(toml);
            let name = if *what == "drop" {
                "health"
            } else {
                "page_view"
            };
            let (out, _) = run(&rules, vec![event(name)]);
            println!("case: {what}");
            check(&out);
        }
    }

    #[test]
    fn first_match_and_all_match() {
        let toml = |mode: &str| {
            format!(
                r#"[[rules]]
                   name = "severity"
                   match = "{mode}"
                   when = "has(attrs.temp)"
                   [[rules.rules]]
                   name = "critical"
                   when = "attrs.temp > 90.0"
                   tag = ["critical"]
                   [[rules.rules]]
                   name = "warning"
                   when = "attrs.temp > 70.0"
                   tag = ["warning"]
                   [[rules.rules]]
                   name = "all-readings"
                   tag = ["reading"]
                   [[rules]]
                   name = "after-the-set"
                   tag = ["after"]"#
            )
        };
        let reading = |temp: f64| {
            let mut event = event("reading");
            event.attrs.insert("temp".into(), Value::Float(temp));
            event
        };
        let table: &[(&str, f64, &[&str])] = &[
            ("first", 95.0, &["critical", "after"]),
            ("first", 75.0, &["warning", "after"]),
            ("first", 20.0, &["reading", "after"]),
            ("all", 95.0, &["critical", "warning", "reading", "after"]),
            ("all", 75.0, &["warning", "reading", "after"]),
            ("all", 20.0, &["reading", "after"]),
        ];
        for (mode, temp, tags) in table {
            let (out, _) = run(&rules(&toml(mode)), vec![reading(*temp)]);
            assert_eq!(out[0].tags, *tags, "match = {mode}, temp = {temp}");
        }
        // The set's guard: no temp, no rule of the set.
        let (out, _) = run(&rules(&toml("all")), vec![event("click")]);
        assert_eq!(out[0].tags, vec!["after".to_owned()]);
    }

    #[test]
    fn sample_is_deterministic_and_near_the_rate() {
        let rules = rules(
            r#"[[rules]]
               name = "tenth"
               sample = 0.1"#,
        );
        let events: Vec<Event> = (0..10_000)
            .map(|i| {
                let mut event = event("view");
                event.event_id = Some(format!("e-{i}"));
                event
            })
            .collect();
        let (first, _) = run(&rules, events.clone());
        let (second, _) = run(&rules, events);
        assert!((800..1200).contains(&first.len()), "kept {}", first.len());
        let ids = |out: &[Event]| out.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&first), ids(&second), "the same events every time");

        // sample_by: every event of a user gets the same verdict.
        let rules = rules_by_user();
        let events: Vec<Event> = (0..2_000)
            .map(|i| {
                let mut event = event("view");
                event.user_id = Some(format!("u{}", i % 100));
                event.event_id = Some(format!("e-{i}"));
                event
            })
            .collect();
        let (out, _) = run(&rules, events);
        let users: std::collections::BTreeSet<_> = out.iter().map(|e| e.user_id.clone()).collect();
        assert_eq!(
            out.len(),
            users.len() * 20,
            "whole users kept: {} users",
            users.len()
        );
        assert!((20..80).contains(&users.len()), "{} users", users.len());
    }

    fn rules_by_user() -> Rules {
        rules(
            r#"[[rules]]
               name = "half-the-users"
               sample = 0.5
               sample_by = "user_id""#,
        )
    }

    #[test]
    fn local_actions_fire_with_the_changed_event() {
        let rules = rules(
            r#"[[rules]]
               name = "hot"
               when = "attrs.price > 100.0"
               tag = ["hot"]
               drop = true
               actions = [{ kind = "log", message = "hot {{ attrs.price }}" }]
               [[rules]]
               name = "cold"
               when = "attrs.price < 100.0"
               actions = [{ kind = "log", message = "cold" }]"#,
        );
        let mut cheap = event("view");
        cheap.attrs.insert("price".into(), Value::Float(1.0));
        let (out, fired) = run(&rules, vec![event("view"), cheap]);
        assert_eq!(out.len(), 1, "the hot one was dropped");
        assert_eq!(fired.len(), 2);
        assert_eq!(fired[0].actions.rule(), "hot");
        assert_eq!(fired[0].event.tags, vec!["hot".to_owned()]);
        assert_eq!(fired[1].actions.rule(), "cold");
    }

    #[test]
    fn no_rules_pass_everything() {
        let rules = Rules::default();
        assert!(rules.is_empty());
        let (out, fired) = run(&rules, vec![event("a"), event("b")]);
        assert_eq!(out.len(), 2);
        assert!(fired.is_empty());
    }

    /// The documented example builds, and does what its comments say.
    #[test]
    fn the_example_config_works() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/agent-rules.toml");
        let config = runnel_config::load_agent(&path).unwrap_or_else(|error| panic!("{error}"));
        let rules = Rules::build(&config.rules).expect("builds");
        let mut purchase = Event::new(SourceKind::Http, "web", "purchase", 0);
        for (key, value) in [
            ("price", Value::Float(600.0)),
            ("quantity", Value::Int(2)),
            ("country", Value::String("FR".into())),
            ("uid", Value::String("u-7".into())),
            ("card_number", Value::String("4111".into())),
            (
                "user_agent",
                Value::String("Mozilla/5.0 (iPad; CPU OS 18_1)".into()),
            ),
        ] {
            purchase.attrs.insert(key.into(), value);
        }
        let health = Event::new(SourceKind::Http, "web", "health_check", 0);
        let (out, fired) = run(&rules, vec![purchase, health]);
        assert_eq!(out.len(), 1);
        let order = &out[0];
        assert_eq!(order.stream, "orders");
        assert_eq!(order.attrs["total_cents"], Value::Int(120_000));
        assert_eq!(order.attrs["region"], Value::String("eu".into()));
        assert_eq!(order.user_id.as_deref(), Some("u-7"));
        assert!(!order.attrs.contains_key("card_number"));
        assert_eq!(order.attrs["device_class"], Value::String("tablet".into()));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].actions.rule(), "large-order");
    }
}
