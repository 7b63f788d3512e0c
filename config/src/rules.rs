//! `[[rules]]` in the agent config: stateless rules (a CEL condition plus actions) and rule sets.
//! Owns the rule keys and their validation. CEL expressions are compile-checked here (so
//! `runnel-agent check` and the aggregator refuse a bad one), but the agent compiles them again
//! to run them: validated configs stay plain data.
//!
//! The top-level list runs every rule whose `when` holds, in order ("all-match"). An entry with
//! a `rules` list of its own is a rule set: its `match = "first"` stops at the first rule that
//! holds, `match = "all"` runs them all. Sets do not nest.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

use crate::actions::{LocalActions, RawAction, validate_local_actions};
use crate::common::{Checker, quote};
use crate::error::ConfigError;
use crate::expr::check_expr;

/// At most this many rules in all (sets and their rules each count). Every event runs through
/// them; a config with more is a generated mistake.
pub const MAX_RULES: usize = 1000;
/// At most this many `set`, `rename` or `remove` entries in one rule.
pub const MAX_FIELDS_PER_RULE: usize = 64;
/// At most this many tags one rule adds.
pub const MAX_TAGS_PER_RULE: usize = 16;

/// `[[rules]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub(crate) struct RawRules(Vec<RawRule>);

/// One entry of `[[rules]]` (a rule, or a rule set when it has `rules`), as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    /// Unique name, shown in errors, logs and the `rule` label of metrics. 1 to 63 characters of
    /// `a-z A-Z 0-9 _ . -`. Required.
    name: Option<String>,
    /// CEL condition over the event's fields; the rule applies where it is true. A set's `when`
    /// guards all of its rules. Default: "true".
    when: Option<String>,
    /// Rule sets only: "first" (stop at the first rule whose `when` holds) or "all". Default: "all".
    #[serde(rename = "match")]
    match_mode: Option<String>,
    /// Rule sets only: the rules of the set, in order (same keys as a rule; no nested sets).
    rules: Option<Vec<RawRule>>,
    /// Discard the event. Default: false.
    drop: Option<bool>,
    /// Keep this fraction of the matching events, 0 < sample <= 1, chosen by a hash of
    /// `sample_by` (deterministic). Default: keep all.
    sample: Option<f64>,
    /// CEL expression whose value decides which events a `sample` keeps. Default: the event id,
    /// else the event's name, user, session, time and attrs.
    sample_by: Option<String>,
    /// Fields to compute: `{ "attrs.region" = 'attrs.country == "DE" ? "eu" : "world"' }`.
    /// Every expression sees the event as it was before this rule. Default: none.
    set: Option<BTreeMap<String, String>>,
    /// Fields to move: `{ "attrs.uid" = "user_id" }`. Default: none.
    rename: Option<BTreeMap<String, String>>,
    /// Fields to remove: `["attrs.password"]`. Default: none.
    remove: Option<Vec<String>>,
    /// Tags to add. Default: none.
    tag: Option<Vec<String>>,
    /// Stream to move the event to. Default: keep its stream.
    route: Option<String>,
    /// Local actions run when the rule fires: `[{ kind = "mqtt", ... }]`. Default: none.
    actions: Option<Vec<RawAction>>,
    /// How many times a minute the local actions may run (a token bucket). Default: 60.
    max_actions_per_minute: Option<u64>,
    /// How many may run at once after a quiet spell. Default: 10 (at most the rate).
    max_actions_burst: Option<u64>,
}

/// The validated rules: every entry runs on every event, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RulesConfig {
    pub entries: Vec<RuleEntry>,
}

impl RulesConfig {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every rule, those in sets included, in config order.
    pub fn all_rules(&self) -> impl Iterator<Item = &RuleConfig> {
        self.entries.iter().flat_map(|entry| match entry {
            RuleEntry::Rule(rule) => std::slice::from_ref(rule),
            RuleEntry::Set(set) => set.rules.as_slice(),
        })
    }
}

/// One entry of `[[rules]]`.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleEntry {
    Rule(RuleConfig),
    Set(RuleSetConfig),
}

/// How many rules of a set apply to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchMode {
    /// The first rule whose condition holds, and no other.
    First,
    /// Every rule whose condition holds, in order.
    All,
}

/// A rule set: rules under one guard, first-match or all-match.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSetConfig {
    pub name: String,
    /// CEL; `None`: always.
    pub when: Option<String>,
    pub match_mode: MatchMode,
    pub rules: Vec<RuleConfig>,
}

/// One stateless rule. When `when` holds, in this order: `set` (all computed from the event as
/// it was), `rename`, `remove`, `tag`, `route`, then `sample` and `drop` decide whether the
/// event is kept; local actions fire with the event as this rule left it (even if dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct RuleConfig {
    pub name: String,
    /// CEL; `None`: always.
    pub when: Option<String>,
    pub drop: bool,
    /// Fraction kept, in (0, 1].
    pub sample: Option<f64>,
    /// CEL whose value is hashed to decide the sample; `None`: the event's identity.
    pub sample_by: Option<String>,
    /// (field, CEL) in key order.
    pub set: Vec<(FieldPath, String)>,
    /// (from, to) in key order of `from`.
    pub rename: Vec<(FieldPath, FieldPath)>,
    pub remove: Vec<FieldPath>,
    pub tag: Vec<String>,
    pub route: Option<String>,
    pub local: LocalActions,
}

/// A field of an event that rules write: a core field or `attrs.<key>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldPath {
    Name,
    Stream,
    EventId,
    UserId,
    SessionId,
    Score,
    EventTimeMs,
    Attr(String),
}

impl FieldPath {
    /// Parses `name`, `stream`, `event_id`, `user_id`, `session_id`, `score`, `event_time_ms` or
    /// `attrs.<key>`.
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        Ok(match text {
            "name" => FieldPath::Name,
            "stream" => FieldPath::Stream,
            "event_id" => FieldPath::EventId,
            "user_id" => FieldPath::UserId,
            "session_id" => FieldPath::SessionId,
            "score" => FieldPath::Score,
            "event_time_ms" => FieldPath::EventTimeMs,
            _ => match text.strip_prefix("attrs.") {
                Some(key) if !key.is_empty() && key.len() <= 255 => FieldPath::Attr(key.to_owned()),
                _ => {
                    return Err(
                        "must be name, stream, event_id, user_id, session_id, score, \
                                event_time_ms or attrs.<key>"
                            .to_owned(),
                    );
                }
            },
        })
    }

    /// Whether the field may be absent (so `remove` and a `rename` source make sense).
    pub fn is_optional(&self) -> bool {
        !matches!(
            self,
            FieldPath::Name | FieldPath::Stream | FieldPath::EventTimeMs
        )
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldPath::Name => f.write_str("name"),
            FieldPath::Stream => f.write_str("stream"),
            FieldPath::EventId => f.write_str("event_id"),
            FieldPath::UserId => f.write_str("user_id"),
            FieldPath::SessionId => f.write_str("session_id"),
            FieldPath::Score => f.write_str("score"),
            FieldPath::EventTimeMs => f.write_str("event_time_ms"),
            FieldPath::Attr(key) => write!(f, "attrs.{key}"),
        }
    }
}

impl RawRules {
    pub(crate) fn validate(self, checker: &mut Checker<'_>) -> Result<RulesConfig, ConfigError> {
        let n_rules: usize = self
            .0
            .iter()
            .map(|rule| 1 + rule.rules.as_ref().map_or(0, Vec::len))
            .sum();
        if n_rules > MAX_RULES {
            return Err(checker.invalid(
                "rules",
                format!("[{n_rules} rules]"),
                format!("at most {MAX_RULES} rules, those in sets included"),
            ));
        }
        let mut names = BTreeSet::new();
        let mut entries = Vec::with_capacity(self.0.len());
        for (idx, raw) in self.0.into_iter().enumerate() {
            let prefix = format!("rules[{idx}]");
            let entry = if raw.rules.is_some() {
                RuleEntry::Set(raw.validate_set(checker, &prefix, &mut names)?)
            } else {
                RuleEntry::Rule(raw.validate_rule(checker, &prefix, &mut names)?)
            };
            entries.push(entry);
        }
        Ok(RulesConfig { entries })
    }
}

/// Names the rule in an error about one of its keys (the key itself has only its index).
fn in_rule(error: ConfigError, name: &str) -> ConfigError {
    match error {
        // A rule of a set is named already; the set's name would only add noise.
        ConfigError::Invalid { ref problem, .. } if problem.starts_with("in rule ") => error,
        ConfigError::Missing { ref hint, .. }
            if hint.ends_with("\")") && hint.contains("(rule \"") =>
        {
            error
        }
        ConfigError::Invalid {
            file,
            key,
            value,
            problem,
        } => ConfigError::Invalid {
            file,
            key,
            value,
            problem: format!("in rule \"{name}\": {problem}"),
        },
        ConfigError::Missing { file, key, hint } => ConfigError::Missing {
            file,
            key,
            hint: format!("{hint} (rule \"{name}\")"),
        },
        other => other,
    }
}

impl RawRule {
    fn name(
        &self,
        checker: &Checker<'_>,
        prefix: &str,
        names: &mut BTreeSet<String>,
    ) -> Result<String, ConfigError> {
        let key = format!("{prefix}.name");
        let name = self
            .name
            .clone()
            .ok_or_else(|| checker.missing(&key, "a unique name such as \"drop-bots\""))?;
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            return Err(checker.invalid(
                &key,
                quote(&name),
                "must be 1 to 63 characters of a-z A-Z 0-9 _ . -",
            ));
        }
        if !names.insert(name.clone()) {
            return Err(checker.invalid(&key, quote(&name), "must be unique among the rules"));
        }
        Ok(name)
    }

    fn when(&self, checker: &Checker<'_>, prefix: &str) -> Result<Option<String>, ConfigError> {
        match &self.when {
            Some(source) => {
                check_expr(checker, &format!("{prefix}.when"), source)?;
                Ok(Some(source.clone()))
            }
            None => Ok(None),
        }
    }

    fn validate_set(
        self,
        checker: &mut Checker<'_>,
        prefix: &str,
        names: &mut BTreeSet<String>,
    ) -> Result<RuleSetConfig, ConfigError> {
        let name = self.name(checker, prefix, names)?;
        self.validate_set_body(checker, prefix, names, name.clone())
            .map_err(|error| in_rule(error, &name))
    }

    fn validate_set_body(
        mut self,
        checker: &mut Checker<'_>,
        prefix: &str,
        names: &mut BTreeSet<String>,
        name: String,
    ) -> Result<RuleSetConfig, ConfigError> {
        let when = self.when(checker, prefix)?;
        let match_mode = match self.match_mode.as_deref().unwrap_or("all") {
            "first" => MatchMode::First,
            "all" => MatchMode::All,
            other => {
                return Err(checker.invalid(
                    &format!("{prefix}.match"),
                    quote(other),
                    "must be \"first\" or \"all\"",
                ));
            }
        };
        // A set holds rules; the keys that act belong on those rules.
        for (key, present) in [
            ("drop", self.drop.is_some()),
            ("sample", self.sample.is_some()),
            ("sample_by", self.sample_by.is_some()),
            ("set", self.set.is_some()),
            ("rename", self.rename.is_some()),
            ("remove", self.remove.is_some()),
            ("tag", self.tag.is_some()),
            ("route", self.route.is_some()),
            ("actions", self.actions.is_some()),
            (
                "max_actions_per_minute",
                self.max_actions_per_minute.is_some(),
            ),
            ("max_actions_burst", self.max_actions_burst.is_some()),
        ] {
            if present {
                return Err(checker.invalid(
                    &format!("{prefix}.{key}"),
                    "...",
                    "a rule set (an entry with `rules`) only has name, when, match and rules; \
                     put actions on its rules",
                ));
            }
        }
        let raws = self.rules.take().unwrap_or_default();
        if raws.is_empty() {
            return Err(checker.invalid(
                &format!("{prefix}.rules"),
                "[]",
                "a rule set needs at least one rule",
            ));
        }
        let mut rules = Vec::with_capacity(raws.len());
        for (idx, raw) in raws.into_iter().enumerate() {
            let inner = format!("{prefix}.rules[{idx}]");
            if raw.rules.is_some() {
                return Err(checker.invalid(
                    &format!("{inner}.rules"),
                    "[...]",
                    "rule sets do not nest",
                ));
            }
            if raw.match_mode.is_some() {
                return Err(checker.invalid(
                    &format!("{inner}.match"),
                    "...",
                    "only a rule set (an entry with `rules`) has match",
                ));
            }
            rules.push(raw.validate_rule(checker, &inner, names)?);
        }
        Ok(RuleSetConfig {
            name,
            when,
            match_mode,
            rules,
        })
    }

    fn validate_rule(
        self,
        checker: &mut Checker<'_>,
        prefix: &str,
        names: &mut BTreeSet<String>,
    ) -> Result<RuleConfig, ConfigError> {
        let name = self.name(checker, prefix, names)?;
        self.validate_rule_body(checker, prefix, name.clone())
            .map_err(|error| in_rule(error, &name))
    }

    fn validate_rule_body(
        self,
        checker: &mut Checker<'_>,
        prefix: &str,
        name: String,
    ) -> Result<RuleConfig, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        let when = self.when(checker, prefix)?;
        if let Some(mode) = &self.match_mode {
            return Err(checker.invalid(
                &key("match"),
                quote(mode),
                "only a rule set (an entry with `rules`) has match",
            ));
        }
        let sample = match self.sample {
            Some(rate) if rate > 0.0 && rate <= 1.0 => Some(rate),
            Some(rate) => {
                return Err(checker.invalid(
                    &key("sample"),
                    rate.to_string(),
                    "must be more than 0 and at most 1 (the fraction of events kept)",
                ));
            }
            None => None,
        };
        if let Some(source) = &self.sample_by {
            if sample.is_none() {
                return Err(checker.missing(&key("sample"), "sample_by needs a sample rate"));
            }
            check_expr(checker, &key("sample_by"), source)?;
        }
        let field = |field_key: &str, text: &str| {
            FieldPath::parse(text)
                .map_err(|problem| checker.invalid(field_key, quote(text), problem))
        };
        let raw_set = self.set.unwrap_or_default();
        let raw_rename = self.rename.unwrap_or_default();
        let raw_remove = self.remove.unwrap_or_default();
        for (what, n) in [
            ("set", raw_set.len()),
            ("rename", raw_rename.len()),
            ("remove", raw_remove.len()),
        ] {
            if n > MAX_FIELDS_PER_RULE {
                return Err(checker.invalid(
                    &key(what),
                    format!("[{n} fields]"),
                    format!("at most {MAX_FIELDS_PER_RULE} fields"),
                ));
            }
        }
        let mut set = Vec::with_capacity(raw_set.len());
        for (target, source) in raw_set {
            let entry_key = format!("{}.{}", key("set"), quote(&target));
            let path = field(&entry_key, &target)?;
            check_expr(checker, &entry_key, &source)?;
            set.push((path, source));
        }
        let mut rename = Vec::with_capacity(raw_rename.len());
        for (from, to) in raw_rename {
            let entry_key = format!("{}.{}", key("rename"), quote(&from));
            let from_path = field(&entry_key, &from)?;
            let to_path = field(&entry_key, &to)?;
            if !from_path.is_optional() {
                return Err(checker.invalid(
                    &entry_key,
                    quote(&to),
                    format!("{from} cannot be moved away (every event has one); use set"),
                ));
            }
            if from_path == to_path {
                return Err(checker.invalid(&entry_key, quote(&to), "renames a field to itself"));
            }
            rename.push((from_path, to_path));
        }
        let mut remove = Vec::with_capacity(raw_remove.len());
        for (idx, text) in raw_remove.iter().enumerate() {
            let entry_key = format!("{}[{idx}]", key("remove"));
            let path = field(&entry_key, text)?;
            if !path.is_optional() {
                return Err(checker.invalid(
                    &entry_key,
                    quote(text),
                    "cannot be removed (every event has one)",
                ));
            }
            remove.push(path);
        }
        let tag = self.tag.unwrap_or_default();
        if tag.len() > MAX_TAGS_PER_RULE {
            return Err(checker.invalid(
                &key("tag"),
                format!("[{} tags]", tag.len()),
                format!("at most {MAX_TAGS_PER_RULE} tags"),
            ));
        }
        for (idx, text) in tag.iter().enumerate() {
            if text.is_empty() || text.len() > 255 {
                return Err(checker.invalid(
                    &format!("{}[{idx}]", key("tag")),
                    quote(text),
                    "must be 1 to 255 bytes",
                ));
            }
        }
        let route = match self.route {
            Some(stream) => Some(crate::sources::stream_name(
                checker,
                &key("route"),
                Some(stream),
                "",
            )?),
            None => None,
        };
        let local = validate_local_actions(
            checker,
            prefix,
            self.actions,
            self.max_actions_per_minute,
            self.max_actions_burst,
        )?;
        let drop = self.drop.unwrap_or(false);
        let does_something = drop
            || sample.is_some()
            || !set.is_empty()
            || !rename.is_empty()
            || !remove.is_empty()
            || !tag.is_empty()
            || route.is_some()
            || !local.actions.is_empty();
        if !does_something {
            return Err(checker.invalid(
                prefix,
                format!("{{ name = {} }}", quote(&name)),
                "does nothing: a rule needs at least one of drop, sample, set, rename, remove, \
                 tag, route, actions",
            ));
        }
        Ok(RuleConfig {
            name,
            when,
            drop,
            sample,
            sample_by: self.sample_by,
            set,
            rename,
            remove,
            tag,
            route,
            local,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ActionConfig;

    const BASE: &str = r#"
        [uplink]
        aggregator = "127.0.0.1:9480"
        ca_cert = "/c/ca.pem"
        cert = "/c/a.pem"
        key = "/c/a.key"
    "#;

    fn parse(rules: &str) -> Result<RulesConfig, String> {
        crate::parse_agent(&format!("{BASE}\n{rules}"), Path::new("agent.toml"))
            .map(|config| config.rules)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn a_full_rule_and_a_set() {
        let rules = parse(
            r#"
            [[rules]]
            name = "enrich"
            when = 'name == "page_view"'
            set = { "attrs.region" = '"eu"', score = "0.5" }
            rename = { "attrs.uid" = "user_id" }
            remove = ["attrs.password"]
            tag = ["web"]
            route = "clicks"
            sample = 0.25
            sample_by = "user_id"
            max_actions_per_minute = 6
            actions = [
              { kind = "mqtt", url = "mqtt://127.0.0.1", topic = "alerts/{{ name }}", qos = 0 },
              { kind = "webhook", url = "https://hooks.example.com/x", headers = { "X-Key" = "k" } },
              { kind = "log", level = "warn", message = "saw {{ name }}" },
            ]

            [[rules]]
            name = "severity"
            match = "first"
            [[rules.rules]]
            name = "critical"
            when = "attrs.temp > 90.0"
            tag = ["critical"]
            "#,
        )
        .expect("valid");
        assert_eq!(rules.entries.len(), 2);
        let RuleEntry::Rule(rule) = &rules.entries[0] else {
            panic!("a rule")
        };
        assert_eq!(rule.set[0].0, FieldPath::Attr("region".into()), "key order");
        assert_eq!(rule.set[1].0, FieldPath::Score);
        assert_eq!(
            rule.rename,
            vec![(FieldPath::Attr("uid".into()), FieldPath::UserId)]
        );
        assert_eq!(rule.route.as_deref(), Some("clicks"));
        assert_eq!(
            rule.local.rate_limit,
            RateLimitView {
                per_minute: 6,
                burst: 6
            }
            .into()
        );
        let ActionConfig::Mqtt(mqtt) = &rule.local.actions[0] else {
            panic!("mqtt")
        };
        assert_eq!(
            (mqtt.host.as_str(), mqtt.port, mqtt.qos),
            ("127.0.0.1", 1883, 0)
        );
        let ActionConfig::Webhook(webhook) = &rule.local.actions[1] else {
            panic!("webhook")
        };
        assert_eq!((webhook.timeout_ms, webhook.max_retries), (5000, 2));
        let RuleEntry::Set(set) = &rules.entries[1] else {
            panic!("a set")
        };
        assert_eq!(set.match_mode, MatchMode::First);
        assert_eq!(rules.all_rules().count(), 2);
    }

    struct RateLimitView {
        per_minute: u64,
        burst: u64,
    }

    impl From<RateLimitView> for crate::RateLimit {
        fn from(view: RateLimitView) -> crate::RateLimit {
            crate::RateLimit {
                per_minute: view.per_minute,
                burst: view.burst,
            }
        }
    }

    /// Each bad config and a piece its error must contain.
    #[test]
    fn errors_name_the_key_the_rule_and_the_position() {
        let cases: &[(&str, &str)] = &[
            (
                r#"[[rules]]
                   name = "ok"
                   drop = true
                   [[rules]]
                   name = "bots"
                   when = 'name == "a" &&& x'
                   drop = true"#,
                r#"agent.toml: rules[1].when = "name == \"a\" &&& x": in rule "bots": CEL syntax error at 1:15: "#,
            ),
            (
                r#"[[rules]]
                   name = "multi"
                   when = """
            name == "a" &&
              (attrs.x > """
                   drop = true"#,
                "in rule \"multi\": CEL syntax error at 2:26: ",
            ),
            (
                r#"[[rules]]
                   name = "s"
                   set = { "attrs.x" = "1 +" }"#,
                r#"rules[0].set."attrs.x" = "1 +": in rule "s": CEL syntax error at 1:"#,
            ),
            (
                r#"[[rules]]
                   name = "s"
                   set = { "nope" = "1" }"#,
                "must be name, stream, event_id, user_id, session_id, score, event_time_ms or attrs.<key>",
            ),
            (
                r#"[[rules]]
                   name = "t"
                   actions = [{ kind = "log", message = "x {{ 1 + }}" }]"#,
                "rules[0].actions[0].message = \"x {{ 1 + }}\": in rule \"t\": placeholder 1",
            ),
            (
                r#"[[rules]]
                   name = "t"
                   actions = [{ kind = "log", message = "x {{ name" }]"#,
                "never closed",
            ),
            (
                r#"[[rules]]
                   name = "t"
                   actions = [{ kind = "mqtt", url = "mqtt://h", topic = "a/#" }]"#,
                "no + or # wildcards",
            ),
            (
                r#"[[rules]]
                   name = "t"
                   actions = [{ kind = "log", message = "m", url = "http://x" }]"#,
                "rules[0].actions[0].url = ...: in rule \"t\": is not a key of kind = \"log\"",
            ),
            (
                r#"[[rules]]
                   name = "t"
                   actions = [{ kind = "sms" }]"#,
                "must be \"mqtt\", \"webhook\" or \"log\"",
            ),
            (
                r#"[[rules]]
                   name = "t"
                   actions = [{ kind = "webhook", url = "ftp://x" }]"#,
                "must be an http:// or https:// URL",
            ),
            (
                r#"[[rules]]
                   name = "t"
                   actions = [{ kind = "mqtt", url = "mqtts://h", topic = "a" }]"#,
                "rules[0].actions[0].ca_cert is required",
            ),
            (
                r#"[[rules]]
                   name = "nothing"
                   when = "true""#,
                "does nothing",
            ),
            (
                r#"[[rules]]
                   name = "d"
                   drop = true
                   [[rules]]
                   name = "d"
                   drop = true"#,
                "rules[1].name = \"d\": must be unique",
            ),
            (
                r#"[[rules]]
                   drop = true"#,
                "rules[0].name is required",
            ),
            (
                r#"[[rules]]
                   name = "s"
                   sample = 1.5"#,
                "rules[0].sample = 1.5: in rule \"s\": must be more than 0 and at most 1",
            ),
            (
                r#"[[rules]]
                   name = "s"
                   sample_by = "user_id"
                   drop = true"#,
                "rules[0].sample is required",
            ),
            (
                r#"[[rules]]
                   name = "r"
                   route = "no spaces""#,
                "rules[0].route = \"no spaces\"",
            ),
            (
                r#"[[rules]]
                   name = "r"
                   remove = ["name"]"#,
                "rules[0].remove[0] = \"name\": in rule \"r\": cannot be removed",
            ),
            (
                r#"[[rules]]
                   name = "r"
                   match = "first"
                   drop = true"#,
                "only a rule set",
            ),
            (
                r#"[[rules]]
                   name = "set"
                   match = "some"
                   [[rules.rules]]
                   name = "a"
                   drop = true"#,
                "rules[0].match = \"some\": in rule \"set\": must be \"first\" or \"all\"",
            ),
            (
                r#"[[rules]]
                   name = "set"
                   drop = true
                   [[rules.rules]]
                   name = "a"
                   drop = true"#,
                "rules[0].drop = ...",
            ),
            (
                r#"[[rules]]
                   name = "set"
                   [[rules.rules]]
                   name = "inner"
                   when = "x )"
                   drop = true"#,
                "rules[0].rules[0].when = \"x )\": in rule \"inner\": CEL syntax error at 1:3",
            ),
            (
                r#"[[rules]]
                   name = "set"
                   rules = []"#,
                "a rule set needs at least one rule",
            ),
            (
                r#"[[rules]]
                   name = "r"
                   drop = true
                   max_actions_per_minute = 0"#,
                "rules[0].max_actions_per_minute = 0",
            ),
        ];
        for (toml, expected) in cases {
            let error = parse(toml).expect_err(toml);
            assert!(
                error.contains(expected),
                "{error}\n  should contain\n{expected}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = parse(
            r#"[[rules]]
               name = "r"
               drop = true
               dorp = true"#,
        )
        .expect_err("unknown key");
        assert!(error.contains("unknown field `dorp`"), "{error}");
    }
}
