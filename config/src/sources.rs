//! Source sections of `agent.toml` beyond the HTTP listener itself: the Snowplow and Segment
//! collectors (routes on the HTTP source) and MQTT subscribers (`[[sources.mqtt]]`). Raw shapes,
//! defaults, limits and validation; nothing here connects to anything.

use std::path::PathBuf;

use serde::Deserialize;

use crate::common::{Checker, Unit, quote};
use crate::error::ConfigError;

/// Stream Snowplow and Segment events land in unless configured otherwise.
const DEFAULT_CLICKSTREAM: &str = "clickstream";
/// Stream MQTT messages land in unless configured otherwise.
const DEFAULT_TELEMETRY: &str = "telemetry";
/// Most MQTT subscribers one agent runs: each is a connection and a task.
const MAX_MQTT_SOURCES: usize = 32;
/// Most topic filters per subscriber.
const MAX_MQTT_TOPICS: usize = 64;
/// Longest `time_field`: a JSON key, not a document.
const MAX_TIME_FIELD_BYTES: usize = 128;
/// The spellings of `time_unit`. The agent's MQTT decoder (`agent/src/decode/mqtt.rs`) gives
/// them their meaning; the validated config carries the spelling.
const MQTT_TIME_UNITS: [&str; 6] = ["auto", "s", "ms", "us", "ns", "rfc3339"];

/// `[sources.snowplow]`, validated: the Snowplow tracker protocol on the HTTP source
/// (`POST /com.snowplowanalytics.snowplow/tp2`, `GET /i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnowplowConfig {
    pub enabled: bool,
    /// Stream the events land in.
    pub stream: String,
}

/// `[sources.segment]`, validated: the Segment HTTP tracking API on the HTTP source (`/v1/track`...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentConfig {
    pub enabled: bool,
    pub stream: String,
    /// Accepted write keys; empty accepts any (or none).
    pub write_keys: Vec<String>,
}

/// What an MQTT payload becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttPayload {
    /// A JSON object (one event) or array of objects (several), mapped like the HTTP source's JSON.
    Json,
    /// UTF-8 text in attr `payload`; not UTF-8 -> dead letter.
    Text,
    /// The raw bytes in attr `payload`.
    Bytes,
}

/// One `[[sources.mqtt]]` subscriber, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSourceConfig {
    /// Unique name; part of the default client id and of logs and metrics.
    pub name: String,
    /// Broker host.
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS to the broker.
    pub tls: bool,
    /// CA certificate for the broker (PEM); required with TLS.
    pub ca_cert: Option<PathBuf>,
    /// MQTT client id. `None`: `runnel-<agent id>-<name>`, stable across restarts so the broker
    /// keeps the persistent session.
    pub client_id: Option<String>,
    pub topics: Vec<String>,
    /// 0 or 1.
    pub qos: u8,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `false` (default): a persistent session; QoS 1 messages published while the agent is away
    /// wait at the broker.
    pub clean_session: bool,
    pub keep_alive_s: u64,
    /// Expected in-flight window (see the raw key's docs); the broker decides the real one.
    pub max_inflight: u16,
    pub stream: String,
    pub payload: MqttPayload,
    /// Topic levels named in braces become attrs: `plant/{site}/{device}/telemetry`.
    pub topic_template: Option<String>,
    /// JSON payloads: the one field that holds the event time (`time_field`). `None`: the first
    /// present of the decoder's common names (`timestamp`, `time`, `event_time`, `eventTime`,
    /// `ts`, `datetime`).
    pub time_field: Option<String>,
    /// How the time field is read (`time_unit`): "auto", "s", "ms", "us", "ns" or "rfc3339".
    pub time_unit: &'static str,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

/// `[sources.mqtt_listener]`, validated: an MQTT server on the agent that devices publish to
/// directly, so an edge host needs no separate broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttListenerConfig {
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
    /// Required from clients when set (with `password`).
    pub username: Option<String>,
    pub password: Option<String>,
    pub stream: String,
    pub payload: MqttPayload,
    pub topic_template: Option<String>,
    /// As [`MqttSourceConfig::time_field`].
    pub time_field: Option<String>,
    /// As [`MqttSourceConfig::time_unit`].
    pub time_unit: &'static str,
    /// Most client connections at once; more are refused.
    pub max_connections: usize,
}

/// `[sources.mqtt_listener]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMqttListener {
    /// Accept MQTT 3.1.1 publishes (QoS 0 and 1) from devices on this agent. QoS 1 publishes get
    /// their PUBACK only after the event is committed to the buffer. Default: false.
    enabled: Option<bool>,
    /// Address and port to listen on. Default: "127.0.0.1:1883" (use "0.0.0.0:1883" for devices
    /// on the network; pick another port if a broker already runs here).
    listen: Option<String>,
    /// User name clients must send (with `password`). Default: none (anonymous clients allowed).
    username: Option<String>,
    /// Password clients must send. Default: none.
    password: Option<String>,
    /// Stream the events land in. Default: "telemetry".
    stream: Option<String>,
    /// Payload format: "json", "text" or "bytes", as for [[sources.mqtt]]. Default: "json".
    payload: Option<String>,
    /// Topic levels to attrs, as for [[sources.mqtt]]. Default: none.
    topic_template: Option<String>,
    /// JSON payloads: the field that holds the event time, as for [[sources.mqtt]]. Default: none
    /// (the first present of "timestamp", "time", "event_time", "eventTime", "ts", "datetime").
    time_field: Option<String>,
    /// How the time field is read, as for [[sources.mqtt]]: "auto", "s", "ms", "us", "ns" or
    /// "rfc3339". Default: "auto".
    time_unit: Option<String>,
    /// Most client connections at once; more are refused. Allowed: 1 to 100000. Default: 1000.
    max_connections: Option<u64>,
}

impl RawMqttListener {
    pub(crate) fn validate(self, checker: &Checker<'_>) -> Result<MqttListenerConfig, ConfigError> {
        let listen = checker.socket_addr(
            "sources.mqtt_listener.listen",
            self.listen.as_deref(),
            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 1883)),
        )?;
        if self.username.is_some() != self.password.is_some() {
            let missing = if self.username.is_some() {
                "password"
            } else {
                "username"
            };
            return Err(checker.missing(
                &format!("sources.mqtt_listener.{missing}"),
                "username and password go together",
            ));
        }
        let payload = payload_format(
            checker,
            "sources.mqtt_listener.payload",
            self.payload.as_deref(),
        )?;
        if let Some(template) = &self.topic_template
            && let Err(problem) = check_topic_template(template)
        {
            return Err(checker.invalid(
                "sources.mqtt_listener.topic_template",
                quote(template),
                problem,
            ));
        }
        let (time_field, time_unit) = time_rule(
            checker,
            "sources.mqtt_listener.",
            payload,
            self.time_field,
            self.time_unit.as_deref(),
        )?;
        let max_connections = checker.int_usize(
            "sources.mqtt_listener.max_connections",
            self.max_connections,
            1000,
            1,
            Some(100_000),
            Unit::Plain,
        )?;
        Ok(MqttListenerConfig {
            enabled: self.enabled.unwrap_or(false),
            listen,
            username: self.username,
            password: self.password,
            stream: stream_name(
                checker,
                "sources.mqtt_listener.stream",
                self.stream,
                DEFAULT_TELEMETRY,
            )?,
            payload,
            topic_template: self.topic_template,
            time_field,
            time_unit,
            max_connections,
        })
    }
}

fn payload_format(
    checker: &Checker<'_>,
    key: &str,
    raw: Option<&str>,
) -> Result<MqttPayload, ConfigError> {
    match raw.unwrap_or("json") {
        "json" => Ok(MqttPayload::Json),
        "text" => Ok(MqttPayload::Text),
        "bytes" => Ok(MqttPayload::Bytes),
        other => Err(checker.invalid(key, quote(other), "must be \"json\", \"text\" or \"bytes\"")),
    }
}

/// `time_field` and `time_unit` of an MQTT source (`prefix` is its key path with the dot).
fn time_rule(
    checker: &Checker<'_>,
    prefix: &str,
    payload: MqttPayload,
    time_field: Option<String>,
    time_unit: Option<&str>,
) -> Result<(Option<String>, &'static str), ConfigError> {
    if payload != MqttPayload::Json {
        let set = match (&time_field, time_unit) {
            (Some(field), _) => Some(("time_field", quote(field))),
            (None, Some(unit)) => Some(("time_unit", quote(unit))),
            (None, None) => None,
        };
        if let Some((key, value)) = set {
            return Err(checker.invalid(
                &format!("{prefix}{key}"),
                value,
                "only JSON payloads carry a time field: set payload = \"json\" or remove the key \
                 (text and bytes payloads get the receive time)",
            ));
        }
    }
    if let Some(field) = &time_field
        && (field.is_empty()
            || field.len() > MAX_TIME_FIELD_BYTES
            || field.chars().any(char::is_control))
    {
        return Err(checker.invalid(
            &format!("{prefix}time_field"),
            quote(field),
            format!(
                "must be a top-level JSON key of 1 to {MAX_TIME_FIELD_BYTES} bytes without \
                 control characters, such as \"ts\""
            ),
        ));
    }
    let unit = match time_unit {
        None => MQTT_TIME_UNITS[0],
        Some(unit) => MQTT_TIME_UNITS
            .iter()
            .copied()
            .find(|known| *known == unit)
            .ok_or_else(|| {
                checker.invalid(
                    &format!("{prefix}time_unit"),
                    quote(unit),
                    "must be \"auto\", \"s\", \"ms\", \"us\", \"ns\" or \"rfc3339\"",
                )
            })?,
    };
    Ok((time_field, unit))
}

/// `[sources.snowplow]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSnowplow {
    /// Serve the Snowplow tracker protocol on the HTTP source: `POST /com.snowplowanalytics.snowplow/tp2`,
    /// `GET /i` and `GET /com.snowplowanalytics.snowplow/tp2` (pixel). Default: true.
    enabled: Option<bool>,
    /// Stream the events land in. Default: "clickstream".
    stream: Option<String>,
}

/// `[sources.segment]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSegment {
    /// Serve the Segment HTTP tracking API on the HTTP source: `POST /v1/track`, `/v1/page`,
    /// `/v1/screen`, `/v1/identify`, `/v1/group`, `/v1/alias`, `/v1/batch` and the browser short
    /// paths `/v1/t`, `/v1/p`, ... Default: true.
    enabled: Option<bool>,
    /// Stream the events land in. Default: "clickstream".
    stream: Option<String>,
    /// Write keys to accept (Basic auth user name or body `writeKey`); requests with another or
    /// none get HTTP 401. Default: empty, which accepts any.
    write_keys: Option<Vec<String>>,
}

/// `[[sources.mqtt]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMqtt {
    /// Unique name of this subscriber, such as "plant-broker". Required.
    name: Option<String>,
    /// Broker URL: "mqtt://host:port" (default port 1883) or "mqtts://host:port" (TLS, default
    /// port 8883). Required.
    url: Option<String>,
    /// CA certificate (PEM) that signed the broker's certificate; required with mqtts://.
    ca_cert: Option<PathBuf>,
    /// MQTT client id. Keep it stable: the broker keys the persistent session by it.
    /// Default: "runnel-<agent id>-<name>".
    client_id: Option<String>,
    /// Topic filters to subscribe to, with `+` and `#` wildcards. Required, 1 to 64.
    topics: Option<Vec<String>>,
    /// Subscription QoS: 0 (at most once) or 1 (at least once: the agent sends PUBACK only after
    /// the event is committed to its buffer). Default: 1.
    qos: Option<u8>,
    /// User name for the broker. Default: none.
    username: Option<String>,
    /// Password for the broker. Default: none.
    password: Option<String>,
    /// Start a fresh session on every connect. Default: false (persistent session: messages
    /// published while the agent is down wait at the broker).
    clean_session: Option<bool>,
    /// MQTT keep-alive in seconds. Allowed: 5 to 3600. Default: 30.
    keep_alive_s: Option<u64>,
    /// Expected in-flight window: sizes the acknowledgement queue and, times 4 (at least 1024),
    /// how many received messages the agent holds before it stops reading. MQTT 3.1.1 lets the
    /// broker alone decide how many unacknowledged QoS 1 messages it sends. Allowed: 1 to 65535.
    /// Default: 256.
    max_inflight: Option<u64>,
    /// Stream the events land in. Default: "telemetry".
    stream: Option<String>,
    /// Payload format: "json" (object or array of objects), "text" (UTF-8 in attr `payload`) or
    /// "bytes" (raw, in attr `payload`). Undecodable payloads become dead letters. Default: "json".
    payload: Option<String>,
    /// Turns topic levels into attrs: with "plant/{site}/{device}/telemetry", a message on
    /// plant/berlin/press-4/telemetry gets site = "berlin" and device = "press-4". Default: none.
    topic_template: Option<String>,
    /// JSON payloads: the top-level field that holds the event time, such as "t"; only this field
    /// is read then. Default: none, which reads the first present of "timestamp", "time",
    /// "event_time", "eventTime", "ts", "datetime". Without a time the event gets its receive
    /// time.
    time_field: Option<String>,
    /// How the time field is read. "auto": a number is Unix seconds, milliseconds, microseconds or
    /// nanoseconds by its magnitude, text is RFC 3339. "s", "ms", "us", "ns": a number (or a
    /// number as text) in that unit. "rfc3339": RFC 3339 text only. A time that does not read
    /// makes the message a dead letter. Default: "auto".
    time_unit: Option<String>,
    /// First reconnect delay in milliseconds. Allowed: at least 10. Default: 100.
    reconnect_min_ms: Option<u64>,
    /// Largest reconnect delay in milliseconds (doubling with jitter). Default: 10000.
    reconnect_max_ms: Option<u64>,
}

/// A stream name: it becomes a SQL value and a metric label.
pub(crate) fn stream_name(
    checker: &Checker<'_>,
    key: &str,
    raw: Option<String>,
    default: &str,
) -> Result<String, ConfigError> {
    let value = raw.unwrap_or_else(|| default.to_owned());
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(value)
    } else {
        Err(checker.invalid(
            key,
            quote(&value),
            "must be 1 to 63 characters of a-z A-Z 0-9 _ . -",
        ))
    }
}

impl RawSnowplow {
    pub(crate) fn validate(self, checker: &Checker<'_>) -> Result<SnowplowConfig, ConfigError> {
        Ok(SnowplowConfig {
            enabled: self.enabled.unwrap_or(true),
            stream: stream_name(
                checker,
                "sources.snowplow.stream",
                self.stream,
                DEFAULT_CLICKSTREAM,
            )?,
        })
    }
}

impl RawSegment {
    pub(crate) fn validate(self, checker: &Checker<'_>) -> Result<SegmentConfig, ConfigError> {
        let write_keys = self.write_keys.unwrap_or_default();
        if let Some(empty) = write_keys.iter().position(String::is_empty) {
            return Err(checker.invalid(
                &format!("sources.segment.write_keys[{empty}]"),
                "\"\"",
                "must not be empty (leave write_keys empty to accept any key)",
            ));
        }
        Ok(SegmentConfig {
            enabled: self.enabled.unwrap_or(true),
            stream: stream_name(
                checker,
                "sources.segment.stream",
                self.stream,
                DEFAULT_CLICKSTREAM,
            )?,
            write_keys,
        })
    }
}

/// Validates every `[[sources.mqtt]]`.
pub(crate) fn validate_mqtt(
    checker: &mut Checker<'_>,
    raws: Vec<RawMqtt>,
) -> Result<Vec<MqttSourceConfig>, ConfigError> {
    if raws.len() > MAX_MQTT_SOURCES {
        return Err(checker.invalid(
            "sources.mqtt",
            format!("[{} entries]", raws.len()),
            format!("at most {MAX_MQTT_SOURCES} subscribers"),
        ));
    }
    let mut out: Vec<MqttSourceConfig> = Vec::with_capacity(raws.len());
    for (idx, raw) in raws.into_iter().enumerate() {
        let config = raw.validate(checker, idx)?;
        if out.iter().any(|other| other.name == config.name) {
            return Err(checker.invalid(
                &format!("sources.mqtt[{idx}].name"),
                quote(&config.name),
                "must be unique",
            ));
        }
        out.push(config);
    }
    Ok(out)
}

impl RawMqtt {
    fn validate(
        self,
        checker: &mut Checker<'_>,
        idx: usize,
    ) -> Result<MqttSourceConfig, ConfigError> {
        let key = |field: &str| format!("sources.mqtt[{idx}].{field}");
        let name = self.name.ok_or_else(|| {
            checker.missing(&key("name"), "a unique name such as \"plant-broker\"")
        })?;
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !name_ok {
            return Err(checker.invalid(
                &key("name"),
                quote(&name),
                "must be 1 to 63 characters of a-z A-Z 0-9 _ . -",
            ));
        }
        let url = self.url.ok_or_else(|| {
            checker.missing(&key("url"), "the broker, such as \"mqtt://127.0.0.1:1883\"")
        })?;
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(checker.invalid(
                &key("url"),
                quote(&url),
                "must start with mqtt:// or mqtts://",
            ));
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                match port.parse::<u16>() {
                    Ok(port) if port > 0 => (host.to_owned(), port),
                    _ => {
                        return Err(checker.invalid(
                            &key("url"),
                            quote(&url),
                            "has a port that is not 1 to 65535",
                        ));
                    }
                }
            }
            _ => (rest.to_owned(), default_port),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() || host.contains(['/', ' ', '@']) {
            return Err(checker.invalid(
                &key("url"),
                quote(&url),
                "must be mqtt://host:port or mqtts://host:port (credentials go in username and password)",
            ));
        }
        let ca_cert = match self.ca_cert {
            Some(path) => Some(checker.path(&key("ca_cert"), Some(&path), PathBuf::new)?),
            None if tls => {
                return Err(checker.missing(
                    &key("ca_cert"),
                    "the PEM certificate of the CA that signed the broker's certificate",
                ));
            }
            None => None,
        };
        let topics = self.topics.unwrap_or_default();
        if topics.is_empty() || topics.len() > MAX_MQTT_TOPICS {
            return Err(checker.invalid(
                &key("topics"),
                format!("[{} filters]", topics.len()),
                format!("must list 1 to {MAX_MQTT_TOPICS} topic filters, such as [\"plant/+/+/telemetry\"]"),
            ));
        }
        for (t, topic) in topics.iter().enumerate() {
            if let Err(problem) = check_topic_filter(topic) {
                return Err(checker.invalid(
                    &format!("sources.mqtt[{idx}].topics[{t}]"),
                    quote(topic),
                    problem,
                ));
            }
        }
        let qos = self.qos.unwrap_or(1);
        if qos > 1 {
            return Err(checker.invalid(
                &key("qos"),
                qos.to_string(),
                "must be 0 or 1 (QoS 2 adds a round trip and no guarantee beyond what QoS 1 plus the aggregator's deduplication give)",
            ));
        }
        if let Some(client_id) = &self.client_id
            && (client_id.is_empty() || client_id.len() > 128)
        {
            return Err(checker.invalid(
                &key("client_id"),
                quote(client_id),
                "must be 1 to 128 characters",
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(checker.missing(
                &key("username"),
                "a password is set; MQTT sends it only with a user name",
            ));
        }
        let keep_alive_s = checker.int(
            &key("keep_alive_s"),
            self.keep_alive_s,
            30,
            5,
            Some(3600),
            Unit::Plain,
        )?;
        let max_inflight = u16::try_from(checker.int(
            &key("max_inflight"),
            self.max_inflight,
            256,
            1,
            Some(65535),
            Unit::Plain,
        )?)
        .expect("bounded to u16 above");
        let payload = payload_format(checker, &key("payload"), self.payload.as_deref())?;
        if let Some(template) = &self.topic_template
            && let Err(problem) = check_topic_template(template)
        {
            return Err(checker.invalid(&key("topic_template"), quote(template), problem));
        }
        let (time_field, time_unit) = time_rule(
            checker,
            &key(""),
            payload,
            self.time_field,
            self.time_unit.as_deref(),
        )?;
        let reconnect_min_ms = checker.int(
            &key("reconnect_min_ms"),
            self.reconnect_min_ms,
            100,
            10,
            Some(600_000),
            Unit::Plain,
        )?;
        let reconnect_max_ms = checker.int(
            &key("reconnect_max_ms"),
            self.reconnect_max_ms,
            10_000,
            10,
            Some(600_000),
            Unit::Plain,
        )?;
        checker.ordered(
            (
                &key("reconnect_min_ms"),
                reconnect_min_ms,
                self.reconnect_min_ms.is_some(),
            ),
            (
                &key("reconnect_max_ms"),
                reconnect_max_ms,
                self.reconnect_max_ms.is_some(),
            ),
            false,
        )?;
        Ok(MqttSourceConfig {
            stream: stream_name(checker, &key("stream"), self.stream, DEFAULT_TELEMETRY)?,
            name,
            host,
            port,
            tls,
            ca_cert,
            client_id: self.client_id,
            topics,
            qos,
            username: self.username,
            password: self.password,
            clean_session: self.clean_session.unwrap_or(false),
            keep_alive_s,
            max_inflight,
            payload,
            topic_template: self.topic_template,
            time_field,
            time_unit,
            reconnect_min_ms,
            reconnect_max_ms,
        })
    }
}

/// MQTT topic filter rules: non-empty, `#` only as the whole last level, `+` only as a whole level.
fn check_topic_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() || filter.len() > 65535 {
        return Err("must be 1 to 65535 bytes".into());
    }
    if filter.contains('\0') {
        return Err("must not contain NUL".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err("`#` must be a whole level and the last one, as in \"plant/#\"".into());
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level, as in \"plant/+/telemetry\"".into());
        }
    }
    Ok(())
}

/// Topic templates: levels are literal or `{name}`; no wildcards; names are attr names.
fn check_topic_template(template: &str) -> Result<(), String> {
    let mut n_names = 0;
    for level in template.split('/') {
        if let Some(name) = level.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("`{{{name}}}`: names are letters, digits and _"));
            }
            n_names += 1;
        } else if level.contains(['{', '}', '+', '#']) {
            return Err(format!(
                "level {level:?}: a level is literal text or a whole {{name}}"
            ));
        }
    }
    if n_names == 0 {
        return Err("names no level: use {name} for the levels to keep, as in \"plant/{site}/{device}/telemetry\"".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters() {
        for ok in ["a", "a/b", "a/+/c", "#", "a/#", "+", "+/+"] {
            assert!(check_topic_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "a+/b"] {
            assert!(check_topic_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_templates() {
        assert!(check_topic_template("plant/{site}/{device}/telemetry").is_ok());
        assert!(check_topic_template("plant/site").is_err());
        assert!(check_topic_template("plant/{}/x").is_err());
        assert!(check_topic_template("plant/+/{x}").is_err());
    }
}
