//! Local actions in the agent config, shared by `[[rules]]` and `[[windows]]`: publish to an MQTT
//! topic, POST to a webhook, write a log line; and the per-rule rate limit that bounds them.
//! Owns the action keys (`actions = [{ kind = "mqtt", ... }]`, `max_actions_per_minute`,
//! `max_actions_burst`) and their validation, templates included. It does not connect to
//! anything or read the CA files it names.
//!
//! A rule or window embeds the raw keys as three fields of its own raw table (serde's `flatten`
//! would defeat `deny_unknown_fields`) and calls [`validate_local_actions`]:
//!
//! ```text
//! /// Local actions run when the rule fires. Default: none.
//! actions: Option<Vec<RawAction>>,
//! /// How many times a minute the actions may run (a token bucket). Default: 60.
//! max_actions_per_minute: Option<u64>,
//! /// How many may run at once after a quiet spell. Default: 10 (at most the rate).
//! max_actions_burst: Option<u64>,
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::common::{Checker, Unit, quote};
use crate::error::ConfigError;
use crate::expr::check_template;

/// At most this many actions per rule: each firing runs all of them.
pub const MAX_ACTIONS_PER_RULE: usize = 8;
/// The longest webhook timeout: an action that waits longer holds a slot of the runner.
pub const MAX_WEBHOOK_TIMEOUT_MS: u64 = 60_000;
/// The most webhook retries: with the backoff doubling, 5 retries wait about 31 times the first
/// backoff in total.
pub const MAX_WEBHOOK_RETRIES: u64 = 5;

const DEFAULT_ACTIONS_PER_MINUTE: u64 = 60;
const DEFAULT_ACTIONS_BURST: u64 = 10;
const DEFAULT_WEBHOOK_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_WEBHOOK_RETRIES: u64 = 2;
const DEFAULT_WEBHOOK_BACKOFF_MS: u64 = 500;

/// The local actions of one rule or window, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LocalActions {
    /// Run in order each time the rule fires (and the rate limit allows).
    pub actions: Vec<ActionConfig>,
    pub rate_limit: RateLimit,
}

/// A token bucket: `per_minute` tokens a minute, holding at most `burst`. A firing takes one
/// token and runs all of the rule's actions; without a token it is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_minute: u64,
    pub burst: u64,
}

impl Default for RateLimit {
    fn default() -> RateLimit {
        RateLimit {
            per_minute: DEFAULT_ACTIONS_PER_MINUTE,
            burst: DEFAULT_ACTIONS_BURST,
        }
    }
}

/// One local action.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionConfig {
    Mqtt(MqttActionConfig),
    Webhook(WebhookActionConfig),
    Log(LogActionConfig),
}

impl ActionConfig {
    /// `"mqtt"`, `"webhook"` or `"log"`: the `kind` key, and the metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionConfig::Mqtt(_) => "mqtt",
            ActionConfig::Webhook(_) => "webhook",
            ActionConfig::Log(_) => "log",
        }
    }
}

/// Publish one message to an MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttActionConfig {
    /// The broker URL as written (the agent keeps one client per URL and credentials).
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// CA certificate (PEM) of the broker; required with `mqtts://`.
    pub ca_cert: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Template of the topic.
    pub topic: String,
    /// Template of the payload; `None`: the event as a JSON object.
    pub payload: Option<String>,
    /// 0 or 1.
    pub qos: u8,
    pub retain: bool,
}

/// POST one request to an HTTP(S) URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookActionConfig {
    pub url: String,
    /// CA certificate (PEM) trusted besides the system roots, for `https://`.
    pub ca_cert: Option<PathBuf>,
    /// Template of the body; `None`: the event as a JSON object.
    pub payload: Option<String>,
    /// Extra request headers (values are sent as written).
    pub headers: BTreeMap<String, String>,
    /// Per attempt.
    pub timeout_ms: u64,
    /// Retries after a failed attempt (connection error, timeout, 5xx or 429).
    pub max_retries: u64,
    /// Wait before the first retry; it doubles on each.
    pub retry_backoff_ms: u64,
}

/// Write one log line through the agent's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogActionConfig {
    pub level: LogLevel,
    /// Template of the message.
    pub message: String,
}

/// The level of a log action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// One entry of `actions = [...]` as written. Every key is optional here; which are allowed
/// and required depends on `kind`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAction {
    /// "mqtt", "webhook" or "log". Required.
    kind: Option<String>,
    /// mqtt: the broker, "mqtt://host:port" or "mqtts://host:port". webhook: "http://..." or
    /// "https://...". Required for both.
    url: Option<String>,
    /// mqtt, webhook: CA certificate (PEM) of the server. Default: none (webhook: system roots).
    ca_cert: Option<PathBuf>,
    /// mqtt: user name for the broker. Default: none.
    username: Option<String>,
    /// mqtt: password for the broker (needs `username`). Default: none.
    password: Option<String>,
    /// mqtt: topic template, such as "alerts/{{ attrs.device }}". Required.
    topic: Option<String>,
    /// mqtt, webhook: payload template. Default: the event as a JSON object.
    payload: Option<String>,
    /// mqtt: 0 or 1. Default: 1.
    qos: Option<u8>,
    /// mqtt: ask the broker to retain the message. Default: false.
    retain: Option<bool>,
    /// webhook: extra request headers. Default: none.
    headers: Option<BTreeMap<String, String>>,
    /// webhook: timeout of one attempt in milliseconds, 1 to 60000. Default: 5000.
    timeout_ms: Option<u64>,
    /// webhook: retries after a failed attempt, 0 to 5. Default: 2.
    max_retries: Option<u64>,
    /// webhook: wait before the first retry in milliseconds (doubling). Default: 500.
    retry_backoff_ms: Option<u64>,
    /// log: "error", "warn", "info" or "debug". Default: "info".
    level: Option<String>,
    /// log: message template. Required.
    message: Option<String>,
}

/// Validates the action keys of one rule or window. `prefix` is the dotted key of that rule,
/// such as `rules[2]` or `windows[0]`, so errors read `rules[2].actions[1].topic = ...`.
pub(crate) fn validate_local_actions(
    checker: &mut Checker<'_>,
    prefix: &str,
    actions: Option<Vec<RawAction>>,
    max_actions_per_minute: Option<u64>,
    max_actions_burst: Option<u64>,
) -> Result<LocalActions, ConfigError> {
    let raws = actions.unwrap_or_default();
    if raws.len() > MAX_ACTIONS_PER_RULE {
        return Err(checker.invalid(
            &format!("{prefix}.actions"),
            format!("[{} actions]", raws.len()),
            format!("at most {MAX_ACTIONS_PER_RULE} actions per rule"),
        ));
    }
    let per_minute = checker.int(
        &format!("{prefix}.max_actions_per_minute"),
        max_actions_per_minute,
        DEFAULT_ACTIONS_PER_MINUTE,
        1,
        Some(60_000),
        Unit::Plain,
    )?;
    let burst = checker.int(
        &format!("{prefix}.max_actions_burst"),
        max_actions_burst,
        DEFAULT_ACTIONS_BURST.min(per_minute),
        1,
        Some(10_000),
        Unit::Plain,
    )?;
    let mut out = Vec::with_capacity(raws.len());
    for (idx, raw) in raws.into_iter().enumerate() {
        out.push(raw.validate(checker, &format!("{prefix}.actions[{idx}]"))?);
    }
    Ok(LocalActions {
        actions: out,
        rate_limit: RateLimit { per_minute, burst },
    })
}

impl RawAction {
    fn validate(
        self,
        checker: &mut Checker<'_>,
        prefix: &str,
    ) -> Result<ActionConfig, ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        let kind = self
            .kind
            .as_deref()
            .ok_or_else(|| checker.missing(&key("kind"), "\"mqtt\", \"webhook\" or \"log\""))?;
        // Keys of the other kinds are mistakes, not options to ignore.
        let allowed: &[&str] = match kind {
            "mqtt" => &[
                "url", "ca_cert", "username", "password", "topic", "payload", "qos", "retain",
            ],
            "webhook" => &[
                "url",
                "ca_cert",
                "payload",
                "headers",
                "timeout_ms",
                "max_retries",
                "retry_backoff_ms",
            ],
            "log" => &["level", "message"],
            other => {
                return Err(checker.invalid(
                    &key("kind"),
                    quote(other),
                    "must be \"mqtt\", \"webhook\" or \"log\"",
                ));
            }
        };
        for (name, present) in [
            ("url", self.url.is_some()),
            ("ca_cert", self.ca_cert.is_some()),
            ("username", self.username.is_some()),
            ("password", self.password.is_some()),
            ("topic", self.topic.is_some()),
            ("payload", self.payload.is_some()),
            ("qos", self.qos.is_some()),
            ("retain", self.retain.is_some()),
            ("headers", self.headers.is_some()),
            ("timeout_ms", self.timeout_ms.is_some()),
            ("max_retries", self.max_retries.is_some()),
            ("retry_backoff_ms", self.retry_backoff_ms.is_some()),
            ("level", self.level.is_some()),
            ("message", self.message.is_some()),
        ] {
            if present && !allowed.contains(&name) {
                return Err(checker.invalid(
                    &key(name),
                    "...",
                    format!(
                        "is not a key of kind = \"{kind}\" (allowed: {})",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        if let Some(payload) = &self.payload {
            check_template(checker, &key("payload"), payload)?;
        }
        let ca_cert = match &self.ca_cert {
            Some(path) => Some(checker.path(&key("ca_cert"), Some(path), PathBuf::new)?),
            None => None,
        };
        match kind {
            "mqtt" => {
                let url = self.url.ok_or_else(|| {
                    checker.missing(&key("url"), "the broker, such as \"mqtt://127.0.0.1:1883\"")
                })?;
                let (tls, host, port) = parse_broker_url(&url)
                    .map_err(|problem| checker.invalid(&key("url"), quote(&url), problem))?;
                if tls && ca_cert.is_none() {
                    return Err(checker.missing(
                        &key("ca_cert"),
                        "the PEM certificate of the CA that signed the broker's certificate",
                    ));
                }
                if self.password.is_some() && self.username.is_none() {
                    return Err(checker.missing(&key("username"), "a password needs a user name"));
                }
                let topic = self.topic.ok_or_else(|| {
                    checker.missing(
                        &key("topic"),
                        "a topic template such as \"alerts/{{ name }}\"",
                    )
                })?;
                check_template(checker, &key("topic"), &topic)?;
                if topic.contains(['+', '#']) {
                    return Err(checker.invalid(
                        &key("topic"),
                        quote(&topic),
                        "a topic to publish to has no + or # wildcards",
                    ));
                }
                let qos = self.qos.unwrap_or(1);
                if qos > 1 {
                    return Err(checker.invalid(&key("qos"), qos.to_string(), "must be 0 or 1"));
                }
                Ok(ActionConfig::Mqtt(MqttActionConfig {
                    url,
                    host,
                    port,
                    tls,
                    ca_cert,
                    username: self.username,
                    password: self.password,
                    topic,
                    payload: self.payload,
                    qos,
                    retain: self.retain.unwrap_or(false),
                }))
            }
            "webhook" => {
                let url = self.url.ok_or_else(|| {
                    checker.missing(&key("url"), "such as \"https://hooks.example.com/runnel\"")
                })?;
                let rest = url
                    .strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"));
                if rest.is_none_or(|rest| {
                    rest.is_empty() || rest.starts_with('/') || rest.contains(' ')
                }) {
                    return Err(checker.invalid(
                        &key("url"),
                        quote(&url),
                        "must be an http:// or https:// URL with a host",
                    ));
                }
                let headers = self.headers.unwrap_or_default();
                for (name, value) in &headers {
                    let name_ok = !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                    if !name_ok || value.contains(['\r', '\n']) {
                        return Err(checker.invalid(
                            &format!("{}.{name}", key("headers")),
                            quote(value),
                            "must be an HTTP header name and a value without line breaks",
                        ));
                    }
                }
                let timeout_ms = checker.int(
                    &key("timeout_ms"),
                    self.timeout_ms,
                    DEFAULT_WEBHOOK_TIMEOUT_MS,
                    1,
                    Some(MAX_WEBHOOK_TIMEOUT_MS),
                    Unit::Plain,
                )?;
                let max_retries = checker.int(
                    &key("max_retries"),
                    self.max_retries,
                    DEFAULT_WEBHOOK_RETRIES,
                    0,
                    Some(MAX_WEBHOOK_RETRIES),
                    Unit::Plain,
                )?;
                let retry_backoff_ms = checker.int(
                    &key("retry_backoff_ms"),
                    self.retry_backoff_ms,
                    DEFAULT_WEBHOOK_BACKOFF_MS,
                    1,
                    Some(60_000),
                    Unit::Plain,
                )?;
                Ok(ActionConfig::Webhook(WebhookActionConfig {
                    url,
                    ca_cert,
                    payload: self.payload,
                    headers,
                    timeout_ms,
                    max_retries,
                    retry_backoff_ms,
                }))
            }
            _ => {
                let level = match self.level.as_deref().unwrap_or("info") {
                    "error" => LogLevel::Error,
                    "warn" => LogLevel::Warn,
                    "info" => LogLevel::Info,
                    "debug" => LogLevel::Debug,
                    other => {
                        return Err(checker.invalid(
                            &key("level"),
                            quote(other),
                            "must be \"error\", \"warn\", \"info\" or \"debug\"",
                        ));
                    }
                };
                let message = self.message.ok_or_else(|| {
                    checker.missing(
                        &key("message"),
                        "a message template such as \"hot: {{ attrs.temp }}\"",
                    )
                })?;
                check_template(checker, &key("message"), &message)?;
                Ok(ActionConfig::Log(LogActionConfig { level, message }))
            }
        }
    }
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` -> (tls, host, port).
fn parse_broker_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        return Err("must start with mqtt:// or mqtts://".to_owned());
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => match port.parse() {
            Ok(port) if port > 0 => (host, port),
            _ => return Err("has a port that is not 1 to 65535".to_owned()),
        },
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return Err(
            "must be mqtt://host:port or mqtts://host:port (credentials go in username and password)"
                .to_owned(),
        );
    }
    Ok((tls, host.to_owned(), port))
}
