//! `[[windows]]` in the agent config: stateful rules (tumbling and sliding windows keyed by
//! fields, aggregates, a `having` condition that emits an alert). Owns the window keys and their
//! validation: names, sizes and their relations, aggregate specs, and the names an alert's
//! attributes and the `having` variables get. CEL expressions are compile-checked here; the
//! agent compiles them again to run them (validated configs stay plain data).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::actions::{LocalActions, RawAction, validate_local_actions};
use crate::common::{Checker, Unit, quote};
use crate::error::ConfigError;
use crate::expr::check_expr;

/// Longest window: a week. Longer windows hold state across too many restarts and config
/// pushes to be meaningful, and event time that far back is history, not a stream.
const MAX_WINDOW_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most sliding windows an event belongs to (`size_ms / slide_ms`): closing one window merges
/// that many panes per key, so this bounds the work of a close.
pub const MAX_PANES_PER_WINDOW: u64 = 100;
/// Default of `max_keys`: enough for a fleet of devices behind one agent.
const DEFAULT_MAX_KEYS: u64 = 10_000;
/// Most keys a window may hold: state is in memory and saved whole every 10 s.
const MAX_MAX_KEYS: u64 = 1_000_000;
/// Default of `allowed_lateness_ms`: events stamped with their receive time reach the window
/// a moment later; a second keeps those at a window's edge from being late.
const DEFAULT_ALLOWED_LATENESS_MS: u64 = 1000;
/// Default of `max_future_ms`: clocks of devices drift, but not by more than minutes.
const DEFAULT_MAX_FUTURE_MS: u64 = 5 * 60 * 1000;
/// Most key expressions per window.
const MAX_KEYS_PER_WINDOW: usize = 8;
/// Most aggregates per window.
const MAX_AGGREGATES: usize = 32;
/// Longest window name: it is an event name, a metric label and a file entry.
const MAX_NAME_CHARS: usize = 63;

/// Names an aggregate or key may not take: the alert's own attributes and `having` variables.
pub const RESERVED_NAMES: [&str; 3] = ["key", "window_start_ms", "window_end_ms"];

/// CEL reserved words: not usable as variable names.
const CEL_RESERVED: [&str; 20] = [
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
];

/// `[[windows]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub(crate) struct RawWindows(Vec<RawWindow>);

/// One `[[windows]]` entry as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    /// Name of the window: the alert's event name and the `window` metric label. 1 to 63
    /// characters of `a-z A-Z 0-9 _ . -`, unique among windows. Required.
    name: Option<String>,
    /// CEL condition over the event's fields; only events where it is true enter the window.
    /// Default: every event.
    when: Option<String>,
    /// What the window groups by: field paths (`"attrs.device"`, `"name"`, `"user_id"`) or CEL
    /// expressions, at most 8. Default: no key (one group for all events).
    key: Option<Vec<String>>,
    /// `"tumbling"` (back-to-back windows) or `"sliding"` (windows of `size_ms` starting every
    /// `slide_ms`). Default: "tumbling".
    kind: Option<String>,
    /// Length of a window in milliseconds of event time. 1 to 604800000 (a week). Required.
    size_ms: Option<u64>,
    /// Sliding windows: a new window starts every `slide_ms`. `size_ms` must be a multiple of
    /// it, at most 100 times it. Required for `"sliding"`, refused for `"tumbling"`.
    slide_ms: Option<u64>,
    /// Aggregates by name: `"count"`, `"sum(x)"`, `"avg(x)"`, `"min(x)"`, `"max(x)"`,
    /// `"distinct(x)"`, where `x` is a field path or CEL expression. At least one, at most 32.
    /// Required.
    aggregates: Option<BTreeMap<String, String>>,
    /// CEL condition over the aggregate names, the key names, `key`, `window_start_ms` and
    /// `window_end_ms`; a closed window where it is true emits an alert. Required (`"true"`
    /// alerts on every window).
    having: Option<String>,
    /// How long after a window's end (in event time) late events are still added. 0 to
    /// 604800000. Default: 1000.
    allowed_lateness_ms: Option<u64>,
    /// Events with an event time more than this ahead of the agent's clock are left out (and
    /// counted): a device with a wrong clock must not close every window. 0 to 604800000.
    /// Default: 300000.
    max_future_ms: Option<u64>,
    /// Most keys held at once; when full, the key updated longest ago is evicted (counted).
    /// 1 to 1000000. Default: 10000.
    max_keys: Option<u64>,
    /// Local actions run for each alert (see `[[rules]]` actions). Default: none.
    actions: Option<Vec<RawAction>>,
    /// How many times a minute the actions may run (a token bucket). Default: 60.
    max_actions_per_minute: Option<u64>,
    /// How many may run at once after a quiet spell. Default: 10 (at most the rate).
    max_actions_burst: Option<u64>,
}

/// Tumbling or sliding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Back-to-back windows of `size_ms`, aligned to the Unix epoch.
    Tumbling,
    /// Windows of `size_ms` starting every `slide_ms` (aligned to the Unix epoch), so an event
    /// is in `size_ms / slide_ms` windows ("hopping" windows).
    Sliding,
}

impl WindowKind {
    /// The spelling in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            WindowKind::Tumbling => "tumbling",
            WindowKind::Sliding => "sliding",
        }
    }
}

/// What an aggregate computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregateFunction {
    /// Events in the window (with an argument: events where it is present and not null).
    Count,
    /// Sum of the numeric values.
    Sum,
    /// Mean of the numeric values.
    Avg,
    /// Smallest numeric value.
    Min,
    /// Largest numeric value.
    Max,
    /// Number of distinct values (of any type).
    Distinct,
}

impl AggregateFunction {
    pub const ALL: [AggregateFunction; 6] = [
        AggregateFunction::Count,
        AggregateFunction::Sum,
        AggregateFunction::Avg,
        AggregateFunction::Min,
        AggregateFunction::Max,
        AggregateFunction::Distinct,
    ];

    /// The spelling in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateFunction::Count => "count",
            AggregateFunction::Sum => "sum",
            AggregateFunction::Avg => "avg",
            AggregateFunction::Min => "min",
            AggregateFunction::Max => "max",
            AggregateFunction::Distinct => "distinct",
        }
    }
}

/// One validated aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateConfig {
    /// Its name: a `having` variable and an alert attribute.
    pub name: String,
    pub function: AggregateFunction,
    /// What it aggregates: a field path or CEL expression (`None`: `count` of events).
    pub input: Option<String>,
}

impl fmt::Display for AggregateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.input {
            Some(input) => write!(f, "{}({input})", self.function.as_str()),
            None => f.write_str(self.function.as_str()),
        }
    }
}

/// One validated window rule.
#[derive(Debug, Clone)]
pub struct WindowConfig {
    pub name: String,
    /// CEL filter; `None`: every event.
    pub when: Option<String>,
    /// Key expressions (field paths or CEL), in order.
    pub key: Vec<String>,
    /// The attribute and `having` variable name of each key: the last segment of a field path
    /// (`attrs.device` -> `device`), else `key_<i>`.
    pub key_names: Vec<String>,
    pub kind: WindowKind,
    pub size_ms: u64,
    /// Equal to `size_ms` for tumbling windows.
    pub slide_ms: u64,
    /// Sorted by name.
    pub aggregates: Vec<AggregateConfig>,
    /// CEL condition over the aggregates and keys.
    pub having: String,
    pub allowed_lateness_ms: u64,
    pub max_future_ms: u64,
    pub max_keys: usize,
    /// Local actions run for each alert, and their rate limit.
    pub local: LocalActions,
}

impl WindowConfig {
    /// Everything that decides what a window's state means: saved state is only restored into
    /// a window with the same definition. Not `having`, lateness or limits: they change what
    /// is done with the state, not what it holds.
    pub fn definition(&self) -> String {
        let aggregates: Vec<String> = self
            .aggregates
            .iter()
            .map(|a| format!("{}={a}", a.name))
            .collect();
        format!(
            "kind={} size_ms={} slide_ms={} when={:?} key={:?} aggregates=[{}]",
            self.kind.as_str(),
            self.size_ms,
            self.slide_ms,
            self.when,
            self.key,
            aggregates.join(", ")
        )
    }
}

/// Whether `text` is a field path: identifiers joined by dots (`name`, `attrs.device`).
pub fn is_field_path(text: &str) -> bool {
    !text.is_empty() && text.split('.').all(is_identifier)
}

/// Whether `text` is a CEL identifier (`[A-Za-z_][A-Za-z0-9_]*`), not a reserved word.
pub fn is_identifier(text: &str) -> bool {
    let mut bytes = text.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !CEL_RESERVED.contains(&text)
}

/// Splits `"sum(attrs.amount)"` into the function and its argument.
fn parse_aggregate(text: &str) -> Option<(AggregateFunction, Option<String>)> {
    let text = text.trim();
    let (name, argument) = match text.split_once('(') {
        Some((name, rest)) => {
            let argument = rest.strip_suffix(')')?.trim();
            (
                name.trim(),
                (!argument.is_empty()).then(|| argument.to_owned()),
            )
        }
        None => (text, None),
    };
    let function = AggregateFunction::ALL
        .into_iter()
        .find(|function| function.as_str() == name)?;
    Some((function, argument))
}

impl RawWindows {
    pub(crate) fn validate(
        self,
        checker: &mut Checker<'_>,
    ) -> Result<Vec<WindowConfig>, ConfigError> {
        let mut windows: Vec<WindowConfig> = Vec::with_capacity(self.0.len());
        for (idx, raw) in self.0.into_iter().enumerate() {
            let window = raw.validate(checker, idx)?;
            if windows.iter().any(|other| other.name == window.name) {
                return Err(checker.invalid(
                    &format!("windows[{idx}].name"),
                    quote(&window.name),
                    "must be unique among windows",
                ));
            }
            windows.push(window);
        }
        Ok(windows)
    }
}

impl RawWindow {
    fn validate(self, checker: &mut Checker<'_>, idx: usize) -> Result<WindowConfig, ConfigError> {
        let key_of = |field: &str| format!("windows[{idx}].{field}");
        let name = self.name.ok_or_else(|| {
            checker.missing(
                &key_of("name"),
                "name the window, such as name = \"door_bursts\"; it is the alert's name",
            )
        })?;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_CHARS
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !name_ok {
            return Err(checker.invalid(
                &key_of("name"),
                quote(&name),
                "must be 1 to 63 characters of a-z, A-Z, 0-9, '_', '.' and '-'",
            ));
        }
        if let Some(when) = &self.when {
            check_cel(checker, &key_of("when"), when)?;
        }

        let kind = match self.kind.as_deref() {
            None | Some("tumbling") => WindowKind::Tumbling,
            Some("sliding") => WindowKind::Sliding,
            Some(other) => {
                return Err(checker.invalid(
                    &key_of("kind"),
                    quote(other),
                    "must be \"tumbling\" or \"sliding\"",
                ));
            }
        };
        let size_ms = match self.size_ms {
            Some(size_ms) => checker.int(
                &key_of("size_ms"),
                Some(size_ms),
                size_ms,
                1,
                Some(MAX_WINDOW_MS),
                Unit::Plain,
            )?,
            None => {
                return Err(checker.missing(
                    &key_of("size_ms"),
                    "give the window length in milliseconds, such as size_ms = 60000",
                ));
            }
        };
        let slide_ms = match (kind, self.slide_ms) {
            (WindowKind::Tumbling, None) => size_ms,
            (WindowKind::Tumbling, Some(slide_ms)) => {
                return Err(checker.invalid(
                    &key_of("slide_ms"),
                    slide_ms.to_string(),
                    "is only for kind = \"sliding\" (tumbling windows slide by size_ms)",
                ));
            }
            (WindowKind::Sliding, None) => {
                return Err(checker.missing(
                    &key_of("slide_ms"),
                    "sliding windows need slide_ms: how often a new window starts, such as \
                     slide_ms = 10000 with size_ms = 60000",
                ));
            }
            (WindowKind::Sliding, Some(slide_ms)) => {
                let slide_ms = checker.int(
                    &key_of("slide_ms"),
                    Some(slide_ms),
                    slide_ms,
                    1,
                    Some(size_ms),
                    Unit::Plain,
                )?;
                if !size_ms.is_multiple_of(slide_ms) || size_ms / slide_ms > MAX_PANES_PER_WINDOW {
                    return Err(checker.invalid(
                        &key_of("slide_ms"),
                        slide_ms.to_string(),
                        format!(
                            "must divide size_ms ({size_ms}) into at most \
                             {MAX_PANES_PER_WINDOW} equal steps"
                        ),
                    ));
                }
                slide_ms
            }
        };

        let key = self.key.unwrap_or_default();
        if key.len() > MAX_KEYS_PER_WINDOW {
            return Err(checker.invalid(
                &key_of("key"),
                format!("[... {} entries]", key.len()),
                format!("must have at most {MAX_KEYS_PER_WINDOW} entries"),
            ));
        }
        let mut key_names = Vec::with_capacity(key.len());
        for (key_idx, expression) in key.iter().enumerate() {
            check_cel(
                checker,
                &format!("windows[{idx}].key[{key_idx}]"),
                expression,
            )?;
            let key_name = if is_field_path(expression) {
                expression
                    .rsplit('.')
                    .next()
                    .expect("split yields at least one piece")
                    .to_owned()
            } else {
                format!("key_{key_idx}")
            };
            if key_names.contains(&key_name) || RESERVED_NAMES.contains(&key_name.as_str()) {
                return Err(checker.invalid(
                    &format!("windows[{idx}].key[{key_idx}]"),
                    quote(expression),
                    format!(
                        "its alert attribute would be `{key_name}`, which another key or the \
                         alert already uses; reserved: {}",
                        RESERVED_NAMES.join(", ")
                    ),
                ));
            }
            key_names.push(key_name);
        }

        let aggregates_written = self.aggregates.is_some();
        let raw_aggregates = self.aggregates.unwrap_or_default();
        if raw_aggregates.is_empty() || raw_aggregates.len() > MAX_AGGREGATES {
            let problem = format!(
                "give 1 to {MAX_AGGREGATES} aggregates by name, such as aggregates = \
                 {{ n = \"count\", total = \"sum(attrs.amount)\" }}"
            );
            return match aggregates_written {
                true => Err(checker.invalid(
                    &key_of("aggregates"),
                    format!("{{ {} entries }}", raw_aggregates.len()),
                    problem,
                )),
                false => Err(checker.missing(&key_of("aggregates"), &problem)),
            };
        }
        let mut aggregates = Vec::with_capacity(raw_aggregates.len());
        for (aggregate_name, text) in raw_aggregates {
            let dotted = format!("windows[{idx}].aggregates.{aggregate_name}");
            if !is_identifier(&aggregate_name)
                || RESERVED_NAMES.contains(&aggregate_name.as_str())
                || key_names.contains(&aggregate_name)
            {
                return Err(checker.invalid(
                    &dotted,
                    quote(&text),
                    format!(
                        "aggregate names must be identifiers (a-z, A-Z, 0-9, '_', not starting \
                         with a digit), not a CEL reserved word, not a key name ({}) and not \
                         one of {}",
                        key_names.join(", "),
                        RESERVED_NAMES.join(", ")
                    ),
                ));
            }
            let Some((function, input)) = parse_aggregate(&text) else {
                return Err(checker.invalid(
                    &dotted,
                    quote(&text),
                    "must be \"count\", \"count(x)\", \"sum(x)\", \"avg(x)\", \"min(x)\", \
                     \"max(x)\" or \"distinct(x)\", where x is a field path or CEL expression",
                ));
            };
            match (&input, function) {
                (None, AggregateFunction::Count) => {}
                (None, _) => {
                    return Err(checker.invalid(
                        &dotted,
                        quote(&text),
                        format!(
                            "{}(x) needs an argument: a field path or CEL expression, such \
                             as \"{}(attrs.value)\"",
                            function.as_str(),
                            function.as_str()
                        ),
                    ));
                }
                (Some(input), _) => check_cel(checker, &dotted, input)?,
            }
            aggregates.push(AggregateConfig {
                name: aggregate_name,
                function,
                input,
            });
        }

        let having = self.having.ok_or_else(|| {
            checker.missing(
                &key_of("having"),
                "give the alert condition over the aggregates, such as having = \"n >= 5\" \
                 (\"true\" alerts on every window)",
            )
        })?;
        check_cel(checker, &key_of("having"), &having)?;
        let allowed_lateness_ms = checker.int(
            &key_of("allowed_lateness_ms"),
            self.allowed_lateness_ms,
            DEFAULT_ALLOWED_LATENESS_MS,
            0,
            Some(MAX_WINDOW_MS),
            Unit::Plain,
        )?;
        let max_future_ms = checker.int(
            &key_of("max_future_ms"),
            self.max_future_ms,
            DEFAULT_MAX_FUTURE_MS,
            0,
            Some(MAX_WINDOW_MS),
            Unit::Plain,
        )?;
        let max_keys = checker.int_usize(
            &key_of("max_keys"),
            self.max_keys,
            DEFAULT_MAX_KEYS,
            1,
            Some(MAX_MAX_KEYS),
            Unit::Plain,
        )?;
        let local = validate_local_actions(
            checker,
            &format!("windows[{idx}]"),
            self.actions,
            self.max_actions_per_minute,
            self.max_actions_burst,
        )?;
        Ok(WindowConfig {
            name,
            when: self.when,
            key,
            key_names,
            kind,
            size_ms,
            slide_ms,
            aggregates,
            having,
            allowed_lateness_ms,
            max_future_ms,
            max_keys,
            local,
        })
    }
}

/// Compile-checks a CEL expression; the error names `key` and the position.
fn check_cel(checker: &Checker<'_>, key: &str, expression: &str) -> Result<(), ConfigError> {
    check_expr(checker, key, expression)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_specs_parse() {
        assert_eq!(
            parse_aggregate("count"),
            Some((AggregateFunction::Count, None))
        );
        assert_eq!(
            parse_aggregate("count()"),
            Some((AggregateFunction::Count, None))
        );
        assert_eq!(
            parse_aggregate(" sum( attrs.amount ) "),
            Some((AggregateFunction::Sum, Some("attrs.amount".to_owned())))
        );
        assert_eq!(
            parse_aggregate("distinct(user_id + name)"),
            Some((
                AggregateFunction::Distinct,
                Some("user_id + name".to_owned())
            ))
        );
        assert_eq!(parse_aggregate("median(x)"), None);
        assert_eq!(parse_aggregate("sum(x"), None);
    }

    fn parse(windows: &str) -> Result<Vec<WindowConfig>, String> {
        let text = format!(
            "[uplink]\naggregator = \"a.example:9480\"\nca_cert = \"/c/ca.pem\"\n\
             cert = \"/c/a.pem\"\nkey = \"/c/a.key\"\n\n{windows}"
        );
        crate::parse_agent(&text, std::path::Path::new("agent.toml"))
            .map(|config| config.windows)
            .map_err(|error| error.to_string())
    }

    const GOOD: &str = "[[windows]]\nname = \"w\"\nsize_ms = 60000\n\
                        aggregates = { n = \"count\" }\nhaving = \"n > 2\"\n";

    #[test]
    fn a_minimal_window_gets_the_defaults() {
        let windows = parse(GOOD).expect("valid");
        let window = &windows[0];
        assert_eq!(window.kind, WindowKind::Tumbling);
        assert_eq!(window.slide_ms, 60_000);
        assert_eq!(window.allowed_lateness_ms, DEFAULT_ALLOWED_LATENESS_MS);
        assert_eq!(window.max_future_ms, DEFAULT_MAX_FUTURE_MS);
        assert_eq!(window.max_keys, 10_000);
        assert!(window.key.is_empty() && window.when.is_none());
        assert!(window.local.actions.is_empty());
    }

    #[test]
    fn keys_and_aggregates_get_names() {
        let windows = parse(
            "[[windows]]\nname = \"w\"\nkind = \"sliding\"\nsize_ms = 60000\nslide_ms = 10000\n\
             key = [\"attrs.device\", \"user_id\", \"size(name)\"]\n\
             aggregates = { total = \"sum(attrs.amount)\", users = \"distinct(user_id)\" }\n\
             having = \"total > 2\"\n",
        )
        .expect("valid");
        let window = &windows[0];
        assert_eq!(window.key_names, ["device", "user_id", "key_2"]);
        let aggregates: Vec<String> = window
            .aggregates
            .iter()
            .map(|a| format!("{}={a}", a.name))
            .collect();
        assert_eq!(
            aggregates,
            ["total=sum(attrs.amount)", "users=distinct(user_id)"]
        );
        assert_eq!(window.kind, WindowKind::Sliding);
    }

    #[test]
    fn errors_name_the_key_and_what_is_allowed() {
        let second = |extra: &str, having: &str| {
            format!(
                "{GOOD}\n[[windows]]\nname = \"v\"\nsize_ms = 60000\n\
                 aggregates = {{ n = \"count\" }}\nhaving = {having:?}\n{extra}"
            )
        };
        for (text, expected) in [
            (
                second("", "n >"),
                "agent.toml: windows[1].having = \"n >\": CEL syntax error at 1:",
            ),
            (
                second("slide_ms = 1000\n", "true"),
                "windows[1].slide_ms = 1000: is only for kind = \"sliding\"",
            ),
            (
                second("kind = \"sliding\"\n", "true"),
                "windows[1].slide_ms is required",
            ),
            (
                second("kind = \"sliding\"\nslide_ms = 7000\n", "true"),
                "windows[1].slide_ms = 7000: must divide size_ms (60000) into at most 100",
            ),
            (
                second("kind = \"hopping\"\n", "true"),
                "windows[1].kind = \"hopping\": must be \"tumbling\" or \"sliding\"",
            ),
            (
                second("max_keys = 0\n", "true"),
                "windows[1].max_keys = 0: must be between 1 and 1000000",
            ),
            (
                GOOD.replace("having = \"n > 2\"\n", ""),
                "windows[0].having is required",
            ),
            (
                GOOD.replace("\"count\"", "\"median(x)\""),
                "windows[0].aggregates.n = \"median(x)\": must be \"count\"",
            ),
            (
                GOOD.replace("\"count\"", "\"sum\""),
                "windows[0].aggregates.n = \"sum\": sum(x) needs an argument",
            ),
            (
                GOOD.replace("{ n = ", "{ key = "),
                "windows[0].aggregates.key = \"count\": aggregate names must be identifiers",
            ),
            (
                format!("{GOOD}{GOOD}"),
                "windows[1].name = \"w\": must be unique among windows",
            ),
            (
                GOOD.replace("size_ms = 60000", "size_ms = 0"),
                "windows[0].size_ms = 0: must be between 1 and 604800000",
            ),
            (
                GOOD.replace("name = \"w\"", "name = \"w\"\nkey = [\"attrs.n\"]"),
                "windows[0].aggregates.n = \"count\": aggregate names must be identifiers",
            ),
        ] {
            let error = parse(&text).expect_err(&text);
            assert!(error.contains(expected), "{error}\n  expected: {expected}");
        }
    }

    #[test]
    fn the_definition_changes_with_what_state_means_only() {
        let base = &parse(GOOD).expect("valid")[0];
        let relaxed = &parse(&GOOD.replace("n > 2", "n > 5")).expect("valid")[0];
        assert_eq!(base.definition(), relaxed.definition());
        let resized = &parse(&GOOD.replace("60000", "30000")).expect("valid")[0];
        assert_ne!(base.definition(), resized.definition());
    }

    #[test]
    fn field_paths() {
        assert!(is_field_path("attrs.device"));
        assert!(is_field_path("name"));
        assert!(!is_field_path("attrs[\"a-b\"]"));
        assert!(!is_field_path("a..b"));
        assert!(!is_field_path("size(name)"));
        assert!(!is_identifier("in"));
        assert!(!is_identifier("1x"));
    }
}
