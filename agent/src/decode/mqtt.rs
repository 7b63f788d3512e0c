//! What an MQTT message becomes, for both MQTT sources (`[[sources.mqtt]]` and
//! `[sources.mqtt_listener]`): its payload decoded by `payload` (`json`, `text`, `bytes`; what
//! does not decode becomes a dead letter with the topic and the reason), its topic levels turned
//! into fields by `topic_template`, and the digest of topic and payload that delivery marks
//! record.
//!
//! The event time of JSON payloads: devices name their time field in many ways (`ts` more often
//! than anything else) and send it in seconds, milliseconds or finer; this module owns the names
//! read by default, their precedence, and what each `time_unit` means (`time_field`,
//! `time_unit`). The rest of a JSON payload maps like `POST /v1/events` ([`super::json`]).
//!
//! Pure: no I/O and no clock (the receive time comes in [`Received`]). A time that is present but
//! does not read is an error (the message becomes a dead letter with the key and what it must
//! be), never a silent receive time.

use std::collections::BTreeMap;

use runnel_common::{Event, SourceKind, Value};
use runnel_config::MqttPayload;
use serde_json::{Map, Value as Json};

use super::Received;
use super::json::TimeProblem;

/// The fields read for the event time when a source names none, in this order: the first one
/// present and not null wins, the others stay attrs. The first three are what `POST /v1/events`
/// reads, so a payload means the same on both sources.
pub const DEFAULT_TIME_FIELDS: [&str; 6] = [
    "timestamp",
    "time",
    "event_time",
    "eventTime",
    "ts",
    "datetime",
];

/// Under `time_unit = "auto"`, numbers below this magnitude are Unix seconds: 1e11 s is the year
/// 5138, and 1e11 ms is 1973, so no plausible time falls in both readings.
const AUTO_SECONDS_BELOW: f64 = 1e11;
/// ... below this, milliseconds (1e14 ms is 5138; 1e14 µs is 1973) ...
const AUTO_MILLIS_BELOW: f64 = 1e14;
/// ... below this, microseconds; above, nanoseconds (1e17 µs is 5138; 1e17 ns is 1973).
const AUTO_MICROS_BELOW: f64 = 1e17;

/// Largest magnitude of a time in Unix milliseconds: beyond it the value is not a time (and
/// would not fit `i64` arithmetic further on).
const MAX_ABS_MS: f64 = 9.0e18;

/// How a time field's value is read (`time_unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnit {
    /// Numbers by magnitude (seconds, milliseconds, microseconds, nanoseconds); text as RFC 3339,
    /// else as a number.
    Auto,
    Seconds,
    Millis,
    Micros,
    Nanos,
    /// RFC 3339 text only.
    Rfc3339,
}

impl TimeUnit {
    /// The unit of a `time_unit` spelling, as `runnel-config` validated it.
    pub fn from_config(spelling: &str) -> Option<TimeUnit> {
        Some(match spelling {
            "auto" => TimeUnit::Auto,
            "s" => TimeUnit::Seconds,
            "ms" => TimeUnit::Millis,
            "us" => TimeUnit::Micros,
            "ns" => TimeUnit::Nanos,
            "rfc3339" => TimeUnit::Rfc3339,
            _ => return None,
        })
    }

    /// What a value must be under this unit, for a dead letter's reason.
    fn expected(self) -> &'static str {
        match self {
            TimeUnit::Auto => {
                "must be RFC 3339 text (2026-01-31T12:00:00Z) or a Unix time number (seconds, \
                 milliseconds, microseconds or nanoseconds)"
            }
            TimeUnit::Seconds => "must be a number of Unix seconds (time_unit = \"s\")",
            TimeUnit::Millis => "must be a number of Unix milliseconds (time_unit = \"ms\")",
            TimeUnit::Micros => "must be a number of Unix microseconds (time_unit = \"us\")",
            TimeUnit::Nanos => "must be a number of Unix nanoseconds (time_unit = \"ns\")",
            TimeUnit::Rfc3339 => {
                "must be RFC 3339 text such as 2026-01-31T12:00:00Z (time_unit = \"rfc3339\")"
            }
        }
    }
}

/// Where an MQTT source finds the event time and how it reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeRule {
    /// The one field to read; `None`: the first present of [`DEFAULT_TIME_FIELDS`].
    pub field: Option<String>,
    pub unit: TimeUnit,
}

impl Default for TimeRule {
    fn default() -> TimeRule {
        TimeRule {
            field: None,
            unit: TimeUnit::Auto,
        }
    }
}

impl TimeRule {
    /// The rule of a validated source config (`time_field`, `time_unit`).
    pub fn from_config(field: Option<&str>, unit: &str) -> TimeRule {
        TimeRule {
            field: field.map(str::to_owned),
            unit: TimeUnit::from_config(unit)
                .expect("runnel-config accepts only the time_unit spellings from_config knows"),
        }
    }

    /// Removes the time field from `object` and returns its time in Unix milliseconds;
    /// `Ok(None)` when the object has none (or only nulls).
    pub fn read(&self, object: &mut Map<String, Json>) -> Result<Option<i64>, TimeProblem> {
        let one;
        let fields: &[&str] = match &self.field {
            Some(field) => {
                one = [field.as_str()];
                &one
            }
            None => &DEFAULT_TIME_FIELDS,
        };
        for key in fields {
            match object.remove(*key) {
                None | Some(Json::Null) => {}
                Some(value) => {
                    return parse(&value, self.unit)
                        .map(Some)
                        .ok_or_else(|| TimeProblem {
                            key: (*key).to_owned(),
                            problem: self.unit.expected().to_owned(),
                        });
                }
            }
        }
        Ok(None)
    }
}

/// A time value in Unix milliseconds under `unit`; `None` when it does not read as one.
pub fn parse(value: &Json, unit: TimeUnit) -> Option<i64> {
    match (value, unit) {
        (Json::String(text), TimeUnit::Rfc3339) => rfc3339(text),
        (Json::String(text), TimeUnit::Auto) => rfc3339(text).or_else(|| number_text(text, unit)),
        (Json::String(text), _) => number_text(text, unit),
        (Json::Number(_), TimeUnit::Rfc3339) => None,
        (Json::Number(n), _) => match n.as_i64() {
            Some(i) => from_int(i, unit),
            None => from_float(n.as_f64()?, unit),
        },
        _ => None,
    }
}

fn rfc3339(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.timestamp_millis())
}

/// A number sent as text, as devices that format everything as strings do.
fn number_text(text: &str, unit: TimeUnit) -> Option<i64> {
    let text = text.trim();
    match text.parse::<i64>() {
        Ok(i) => from_int(i, unit),
        Err(_) => from_float(text.parse::<f64>().ok()?, unit),
    }
}

/// The unit `Auto` reads a number of this magnitude in.
fn auto_unit(magnitude: f64) -> TimeUnit {
    if magnitude < AUTO_SECONDS_BELOW {
        TimeUnit::Seconds
    } else if magnitude < AUTO_MILLIS_BELOW {
        TimeUnit::Millis
    } else if magnitude < AUTO_MICROS_BELOW {
        TimeUnit::Micros
    } else {
        TimeUnit::Nanos
    }
}

/// Integers convert exactly (floor division for the finer units).
fn from_int(value: i64, unit: TimeUnit) -> Option<i64> {
    let unit = match unit {
        TimeUnit::Auto => auto_unit(value.unsigned_abs() as f64),
        other => other,
    };
    let ms = match unit {
        TimeUnit::Seconds => value.checked_mul(1000)?,
        TimeUnit::Millis => value,
        TimeUnit::Micros => value.div_euclid(1000),
        TimeUnit::Nanos => value.div_euclid(1_000_000),
        TimeUnit::Auto | TimeUnit::Rfc3339 => return None,
    };
    (ms.unsigned_abs() as f64 <= MAX_ABS_MS).then_some(ms)
}

/// Fractions (`1700000000.25` seconds) keep their milliseconds.
fn from_float(value: f64, unit: TimeUnit) -> Option<i64> {
    if !value.is_finite() {
        return None;
    }
    let unit = match unit {
        TimeUnit::Auto => auto_unit(value.abs()),
        other => other,
    };
    let ms = match unit {
        TimeUnit::Seconds => value * 1e3,
        TimeUnit::Millis => value,
        TimeUnit::Micros => value / 1e3,
        TimeUnit::Nanos => value / 1e6,
        TimeUnit::Auto | TimeUnit::Rfc3339 => return None,
    }
    .floor();
    (ms.abs() <= MAX_ABS_MS).then_some(ms as i64)
}

/// 16 bytes of SHA-256 over topic and payload: what a delivery mark records of a message, so a
/// redelivery of it is recognised.
pub fn digest(topic: &str, payload: &[u8]) -> [u8; 16] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(&(topic.len() as u64).to_le_bytes());
    context.update(topic.as_bytes());
    context.update(payload);
    let full = context.finish();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full.as_ref()[..16]);
    out
}

/// Turns one MQTT message into events (or a dead letter), with the event time read by the
/// default [`TimeRule`].
pub fn decode_publish(
    format: &PublishFormat<'_>,
    topic: &str,
    payload: &[u8],
    received: &Received,
) -> Vec<Event> {
    decode_publish_with_time(format, &TimeRule::default(), topic, payload, received)
}

/// Turns one MQTT message into events (or a dead letter); JSON payloads get their event time by
/// `time`.
pub fn decode_publish_with_time(
    format: &PublishFormat<'_>,
    time: &TimeRule,
    topic: &str,
    payload: &[u8],
    received: &Received,
) -> Vec<Event> {
    let topic_attrs = topic_fields(format.template, topic);
    let last_level = topic.rsplit('/').next().unwrap_or(topic);
    let mut events = match format.payload {
        MqttPayload::Json => {
            let read_time =
                |object: &mut serde_json::Map<String, serde_json::Value>| time.read(object);
            match super::json::decode_with_time(
                payload,
                received.receive_time_ms,
                &received.stream,
                &read_time,
            ) {
                Ok(events) => events,
                Err(error) => {
                    let reason = format!("payload on {topic}: {error}");
                    let mut dead = super::dead_letter(SourceKind::Mqtt, &reason, payload, received);
                    dead.attrs
                        .insert("topic".into(), Value::String(topic.to_owned()));
                    return vec![dead];
                }
            }
        }
        MqttPayload::Text => match std::str::from_utf8(payload) {
            Ok(text) => vec![raw_event(received, Value::String(text.to_owned()))],
            Err(error) => {
                let reason = format!("payload on {topic} is not UTF-8: {error}");
                let mut dead = super::dead_letter(SourceKind::Mqtt, &reason, payload, received);
                dead.attrs
                    .insert("topic".into(), Value::String(topic.to_owned()));
                return vec![dead];
            }
        },
        MqttPayload::Bytes => vec![raw_event(received, Value::Bytes(payload.to_vec()))],
    };
    for event in &mut events {
        event.source = SourceKind::Mqtt;
        if event.name.is_empty() {
            event.name = last_level.to_owned();
        }
        event
            .attrs
            .insert("topic".into(), Value::String(topic.to_owned()));
        for (key, value) in &topic_attrs {
            event
                .attrs
                .entry(key.clone())
                .or_insert_with(|| Value::String(value.clone()));
        }
    }
    events
}

/// How a source reads its messages: the parts of its config that decoding needs.
pub struct PublishFormat<'a> {
    pub payload: MqttPayload,
    pub template: Option<&'a str>,
}

fn raw_event(received: &Received, payload: Value) -> Event {
    let mut attrs = BTreeMap::new();
    attrs.insert("payload".to_owned(), payload);
    Event {
        attrs,
        ..Event::new(
            SourceKind::Mqtt,
            received.stream.clone(),
            "",
            received.receive_time_ms,
        )
    }
}

/// `plant/{site}/{device}/telemetry` + `plant/berlin/press-4/telemetry` -> site, device.
/// A topic that does not fit the template yields nothing.
pub fn topic_fields(template: Option<&str>, topic: &str) -> Vec<(String, String)> {
    let Some(template) = template else {
        return Vec::new();
    };
    let pattern: Vec<&str> = template.split('/').collect();
    let levels: Vec<&str> = topic.split('/').collect();
    if pattern.len() != levels.len() {
        return Vec::new();
    }
    let mut fields = Vec::new();
    for (p, level) in pattern.iter().zip(&levels) {
        match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(name) => fields.push((name.to_owned(), (*level).to_owned())),
            None if p == level => {}
            None => return Vec::new(),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 2023-11-14T22:13:20Z.
    const T_MS: i64 = 1_700_000_000_000;

    fn read(rule: &TimeRule, object: Json) -> (Result<Option<i64>, TimeProblem>, Json) {
        let Json::Object(mut object) = object else {
            panic!("an object")
        };
        let time = rule.read(&mut object);
        (time, Json::Object(object))
    }

    #[test]
    fn ts_in_seconds_milliseconds_and_finer_is_told_by_magnitude() {
        let rule = TimeRule::default();
        for value in [
            json!(1_700_000_000),
            json!(1_700_000_000_000i64),
            json!(1_700_000_000_000_000i64),
            json!(1_700_000_000_000_000_000i64),
            json!(1_700_000_000.0),
            json!("1700000000000"),
            json!("2023-11-14T22:13:20Z"),
            json!("2023-11-15T00:13:20+02:00"),
        ] {
            let (time, rest) = read(&rule, json!({"ts": value, "temp": 21.5}));
            assert_eq!(time, Ok(Some(T_MS)), "ts = {value}");
            assert_eq!(rest, json!({"temp": 21.5}), "the time field is consumed");
        }
        let (time, _) = read(&rule, json!({"ts": 1_700_000_000.25}));
        assert_eq!(
            time,
            Ok(Some(T_MS + 250)),
            "fractional seconds keep their ms"
        );
    }

    #[test]
    fn default_fields_follow_their_precedence() {
        let rule = TimeRule::default();
        for (idx, field) in DEFAULT_TIME_FIELDS.iter().enumerate() {
            let mut object = Map::new();
            // This field and every later one: the earliest present wins.
            for (later_idx, later) in DEFAULT_TIME_FIELDS.iter().enumerate().skip(idx) {
                object.insert((*later).to_owned(), json!(1_000 + later_idx as i64));
            }
            let time = rule.read(&mut object);
            assert_eq!(time, Ok(Some((1_000 + idx as i64) * 1000)), "{field}");
            assert!(!object.contains_key(*field));
            assert_eq!(
                object.len(),
                DEFAULT_TIME_FIELDS.len() - idx - 1,
                "the others stay"
            );
        }
        // A null does not count as present.
        let (time, _) = read(&rule, json!({"timestamp": null, "ts": 1_700_000_000}));
        assert_eq!(time, Ok(Some(T_MS)));
        let (time, rest) = read(&rule, json!({"t": 1_700_000_000}));
        assert_eq!(time, Ok(None), "t is not a default name");
        assert_eq!(rest, json!({"t": 1_700_000_000}));
    }

    #[test]
    fn a_named_field_is_the_only_one_read() {
        let rule = TimeRule::from_config(Some("t"), "auto");
        let (time, rest) = read(&rule, json!({"t": 1_700_000_000, "timestamp": 5}));
        assert_eq!(time, Ok(Some(T_MS)));
        assert_eq!(
            rest,
            json!({"timestamp": 5}),
            "the default names stay attrs"
        );
        let (time, _) = read(&rule, json!({"timestamp": 5}));
        assert_eq!(time, Ok(None), "absent: the receive time");
    }

    #[test]
    fn a_named_unit_is_not_guessed() {
        let at = |unit: &str, value: Json| {
            let rule = TimeRule::from_config(Some("t"), unit);
            read(&rule, json!({ "t": value })).0
        };
        // 1.7e9 read as milliseconds is 1970-01-20: the configured unit wins over the magnitude.
        assert_eq!(at("ms", json!(1_700_000_000)), Ok(Some(1_700_000_000)));
        assert_eq!(at("s", json!(1_700_000_000)), Ok(Some(T_MS)));
        assert_eq!(at("s", json!("1700000000")), Ok(Some(T_MS)));
        assert_eq!(at("s", json!(1_700_000_000.5)), Ok(Some(T_MS + 500)));
        assert_eq!(
            at("us", json!(1_700_000_000_123_456i64)),
            Ok(Some(T_MS + 123))
        );
        assert_eq!(
            at("ns", json!(1_700_000_000_123_456_789i64)),
            Ok(Some(T_MS + 123))
        );
        assert_eq!(at("ns", json!(-1)), Ok(Some(-1)), "floor, not towards zero");
        assert_eq!(at("rfc3339", json!("2023-11-14T22:13:20Z")), Ok(Some(T_MS)));
    }

    #[test]
    fn values_that_do_not_read_name_the_key_and_the_unit() {
        let problem = |unit: &str, value: Json| {
            let rule = TimeRule::from_config(Some("t"), unit);
            read(&rule, json!({ "t": value })).0.unwrap_err()
        };
        let p = problem("rfc3339", json!(1_700_000_000));
        assert_eq!(p.key, "t");
        assert!(
            p.problem.contains("time_unit = \"rfc3339\""),
            "{}",
            p.problem
        );
        assert!(
            problem("s", json!("2023-11-14T22:13:20Z"))
                .problem
                .contains("seconds")
        );
        assert!(
            problem("auto", json!("yesterday"))
                .problem
                .contains("RFC 3339")
        );
        problem("auto", json!(true));
        problem("ms", json!({"v": 1}));
        // Out of range: i64 overflow and beyond any time.
        problem("s", json!(i64::MAX));
        problem("auto", json!(1e300));
    }

    #[test]
    fn the_http_time_keys_come_first() {
        assert_eq!(DEFAULT_TIME_FIELDS[..3], super::super::json::TIME_KEYS);
    }

    #[test]
    fn every_config_spelling_is_known() {
        for spelling in ["auto", "s", "ms", "us", "ns", "rfc3339"] {
            assert!(TimeUnit::from_config(spelling).is_some(), "{spelling}");
        }
        assert_eq!(TimeUnit::from_config("sec"), None);
    }

    fn received() -> Received {
        Received {
            receive_time_ms: 5,
            stream: "telemetry".into(),
            ..Received::default()
        }
    }

    #[test]
    fn templates_turn_levels_into_fields() {
        let t = Some("plant/{site}/{device}/telemetry");
        assert_eq!(
            topic_fields(t, "plant/berlin/press-4/telemetry"),
            vec![
                ("site".into(), "berlin".into()),
                ("device".into(), "press-4".into())
            ]
        );
        assert!(topic_fields(t, "plant/berlin/press-4/alarms").is_empty());
        assert!(topic_fields(t, "plant/berlin").is_empty());
    }

    #[test]
    fn json_text_bytes_and_dead_letters() {
        let view = |payload| PublishFormat {
            payload,
            template: Some("plant/{site}/{device}"),
        };
        let events = decode_publish(
            &view(MqttPayload::Json),
            "plant/b/p4",
            br#"[{"temp":21.5},{"temp":22}]"#,
            &received(),
        );
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].name, "p4");
        assert_eq!(events[0].source, SourceKind::Mqtt);
        assert_eq!(events[0].attrs["site"], Value::String("b".into()));
        assert_eq!(events[0].attrs["topic"], Value::String("plant/b/p4".into()));
        assert_eq!(events[1].attrs["temp"], Value::Int(22));

        let dead = decode_publish(
            &view(MqttPayload::Json),
            "plant/b/p4",
            b"\x00\x01",
            &received(),
        );
        assert_eq!(dead[0].stream, runnel_common::streams::DEAD_LETTERS);
        let Value::String(reason) = &dead[0].attrs["reason"] else {
            panic!("reason")
        };
        assert!(
            reason.starts_with("payload on plant/b/p4: invalid JSON"),
            "{reason}"
        );

        let text = decode_publish(&view(MqttPayload::Text), "a", b"ON", &received());
        assert_eq!(text[0].attrs["payload"], Value::String("ON".into()));
        let not_text = decode_publish(&view(MqttPayload::Text), "a", b"\xff", &received());
        assert_eq!(not_text[0].stream, runnel_common::streams::DEAD_LETTERS);
        let bytes = decode_publish(&view(MqttPayload::Bytes), "a", b"\xff", &received());
        assert_eq!(bytes[0].attrs["payload"], Value::Bytes(vec![0xff]));
    }

    #[test]
    fn digests_depend_on_topic_and_payload() {
        assert_eq!(digest("a", b"x"), digest("a", b"x"));
        assert_ne!(digest("a", b"x"), digest("b", b"x"));
        assert_ne!(digest("ab", b""), digest("a", b"b"));
    }

    #[test]
    fn named_time_fields_reach_the_event() {
        let view = PublishFormat {
            payload: MqttPayload::Json,
            template: None,
        };
        let default_rule = TimeRule::default();
        let events = decode_publish_with_time(
            &view,
            &default_rule,
            "meters/m1",
            br#"{"ts":1700000000123,"kwh":3}"#,
            &received(),
        );
        assert_eq!(events[0].event_time_ms, 1_700_000_000_123);
        assert_eq!(events[0].name, "m1");
        assert!(!events[0].attrs.contains_key("ts"));
        let in_seconds = TimeRule::from_config(Some("t"), "s");
        let events = decode_publish_with_time(
            &view,
            &in_seconds,
            "meters/m1",
            br#"{"t":1700000000,"kwh":3}"#,
            &received(),
        );
        assert_eq!(events[0].event_time_ms, 1_700_000_000_000);
        let dead = decode_publish_with_time(
            &view,
            &in_seconds,
            "meters/m1",
            br#"{"t":"2023-11-14T22:13:20Z"}"#,
            &received(),
        );
        assert_eq!(dead[0].stream, runnel_common::streams::DEAD_LETTERS);
        let Value::String(reason) = &dead[0].attrs["reason"] else {
            panic!("reason")
        };
        assert!(
            reason.contains("field `t` must be a number of Unix seconds"),
            "{reason}"
        );
    }
}
