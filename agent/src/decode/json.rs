//! Generic JSON events: one object, an array of objects, or newline-delimited objects.
//!
//! Well-known keys map onto the core fields; every other key lands in `attrs`:
//!
//! | core field   | accepted keys                          |
//! |--------------|----------------------------------------|
//! | `name`       | `name`, `event`                        |
//! | `stream`     | `stream` (default: the source's)       |
//! | `event_id`   | `event_id`, `id`                       |
//! | `user_id`    | `user_id`, `userId`                    |
//! | `session_id` | `session_id`, `sessionId`              |
//! | event time   | `timestamp`, `time`, `event_time`: RFC 3339 text, or a number of Unix seconds (below 1e11) or milliseconds |
//! | `tags`       | `tags` (array of strings)              |
//! | `score`      | `score` (number)                       |
//!
//! Ids given as numbers are kept as their decimal text.

use std::collections::BTreeMap;

use runnel_common::{Event, SourceKind, Value};
use serde_json::{Map, Value as Json};

/// Numbers below this are Unix seconds, above it Unix milliseconds (1e11 s is year 5138; 1e11 ms
/// is 1973).
const SECONDS_MS_CUTOFF: f64 = 1e11;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty body: send a JSON object, an array of objects, or newline-delimited objects")]
    Empty,
    #[error("invalid JSON: {0}")]
    Syntax(String),
    #[error("event {event_idx}: expected a JSON object, found {found}")]
    NotAnObject {
        event_idx: usize,
        found: &'static str,
    },
    #[error("event {event_idx}: field `{key}` {problem}")]
    Field {
        event_idx: usize,
        key: String,
        problem: String,
    },
}

/// The keys `POST /v1/events` reads the event time from, in this order.
pub const TIME_KEYS: [&str; 3] = ["timestamp", "time", "event_time"];

/// Why an object's event time could not be read: the key and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeProblem {
    pub key: String,
    pub problem: String,
}

/// Finds an object's event time: removes the key it read and returns Unix milliseconds, or
/// `Ok(None)` when the object carries no time (the event gets its receive time).
pub type TimeReader<'a> = &'a dyn Fn(&mut Map<String, Json>) -> Result<Option<i64>, TimeProblem>;

/// Decodes a request body into events stamped with `receive_time_ms`.
pub fn decode(
    body: &[u8],
    receive_time_ms: i64,
    default_stream: &str,
) -> Result<Vec<Event>, DecodeError> {
    decode_with_time(body, receive_time_ms, default_stream, &http_time)
}

/// The HTTP source's rule: the first non-null of [`TIME_KEYS`], read by [`parse_time`].
fn http_time(object: &mut Map<String, Json>) -> Result<Option<i64>, TimeProblem> {
    for key in TIME_KEYS {
        match object.remove(key) {
            None | Some(Json::Null) => {}
            Some(value) => {
                return parse_time(&value).map(Some).ok_or_else(|| TimeProblem {
                    key: key.to_owned(),
                    problem: "must be RFC 3339 text (2026-01-31T12:00:00Z) or a Unix time number"
                        .to_owned(),
                });
            }
        }
    }
    Ok(None)
}

/// As [`decode`], with the event time found by `time` (the MQTT sources' own rule).
pub fn decode_with_time(
    body: &[u8],
    receive_time_ms: i64,
    default_stream: &str,
    time: TimeReader<'_>,
) -> Result<Vec<Event>, DecodeError> {
    let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(DecodeError::Empty);
    };
    let values: Vec<Json> = if *first == b'[' {
        serde_json::from_slice(body).map_err(|error| DecodeError::Syntax(error.to_string()))?
    } else {
        serde_json::Deserializer::from_slice(body)
            .into_iter::<Json>()
            .collect::<Result<_, _>>()
            .map_err(|error| DecodeError::Syntax(error.to_string()))?
    };
    if values.is_empty() {
        return Err(DecodeError::Empty);
    }
    values
        .into_iter()
        .enumerate()
        .map(|(event_idx, value)| match value {
            Json::Object(object) => {
                from_object(object, event_idx, receive_time_ms, default_stream, time)
            }
            other => Err(DecodeError::NotAnObject {
                event_idx,
                found: kind(&other),
            }),
        })
        .collect()
}

fn from_object(
    mut object: Map<String, Json>,
    event_idx: usize,
    receive_time_ms: i64,
    default_stream: &str,
    time: TimeReader<'_>,
) -> Result<Event, DecodeError> {
    let event_time_ms = time(&mut object)
        .map_err(|TimeProblem { key, problem }| DecodeError::Field {
            event_idx,
            key,
            problem,
        })?
        .unwrap_or(receive_time_ms);
    let field_error = |key: &str, problem: &str| DecodeError::Field {
        event_idx,
        key: key.to_owned(),
        problem: problem.to_owned(),
    };
    let mut take_text = |keys: &[&str]| -> Result<Option<String>, DecodeError> {
        for key in keys {
            match object.remove(*key) {
                None | Some(Json::Null) => continue,
                Some(Json::String(s)) => return Ok(Some(s)),
                Some(Json::Number(n)) => return Ok(Some(n.to_string())),
                Some(other) => {
                    return Err(field_error(
                        key,
                        &format!("must be a string, found {}", kind(&other)),
                    ));
                }
            }
        }
        Ok(None)
    };
    let name = take_text(&["name", "event"])?.unwrap_or_default();
    let stream = take_text(&["stream"])?.unwrap_or_else(|| default_stream.to_owned());
    let event_id = take_text(&["event_id", "id"])?;
    let user_id = take_text(&["user_id", "userId"])?;
    let session_id = take_text(&["session_id", "sessionId"])?;

    let tags = match object.remove("tags") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Json::String(s) => Ok(s),
                other => Err(field_error(
                    "tags",
                    &format!("must hold strings, found {}", kind(&other)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(field_error(
                "tags",
                &format!("must be an array of strings, found {}", kind(&other)),
            ));
        }
    };
    let score = match object.remove("score") {
        None | Some(Json::Null) => None,
        Some(Json::Number(n)) => n.as_f64(),
        Some(other) => {
            return Err(field_error(
                "score",
                &format!("must be a number, found {}", kind(&other)),
            ));
        }
    };
    let attrs: BTreeMap<String, Value> =
        object.into_iter().map(|(k, v)| (k, to_value(v))).collect();
    Ok(Event {
        seq: 0,
        event_time_ms,
        receive_time_ms,
        source: SourceKind::Http,
        stream,
        name,
        event_id,
        user_id,
        session_id,
        score,
        tags,
        attrs,
    })
}

/// Parses RFC 3339 text or a Unix time number into Unix milliseconds.
pub fn parse_time(value: &Json) -> Option<i64> {
    match value {
        Json::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.timestamp_millis()),
        Json::Number(n) => {
            let x = n.as_f64()?;
            if !x.is_finite() {
                return None;
            }
            let ms = if x.abs() < SECONDS_MS_CUTOFF {
                x * 1000.0
            } else {
                x
            };
            // Out of i64 range is not a time.
            (ms.abs() < 9.0e18).then_some(ms as i64)
        }
        _ => None,
    }
}

/// Converts a JSON value to an attribute value; nested structures stay JSON text.
pub fn to_value(value: Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(s),
        nested @ (Json::Array(_) | Json::Object(_)) => Value::Json(nested.to_string()),
    }
}

/// "a number", "an object", ...: for error messages about a JSON value of the wrong type.
pub fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_array_and_ndjson() {
        assert_eq!(decode(br#"{"name":"a"}"#, 5, "s").unwrap().len(), 1);
        assert_eq!(
            decode(br#" [{"name":"a"},{"name":"b"}]"#, 5, "s")
                .unwrap()
                .len(),
            2
        );
        let events = decode(
            b"{\"name\":\"a\"}\n{\"name\":\"b\"}\n\n{\"name\":\"c\"}\n",
            5,
            "s",
        )
        .unwrap();
        assert_eq!(
            events.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn maps_core_fields_and_keeps_the_rest() {
        let body = br#"{"event":"page_view","userId":42,"session_id":"s1","id":"e-1",
            "timestamp":"2026-01-31T12:00:00.5Z","tags":["a"],"score":0.5,"url":"/x",
            "n":3,"f":1.5,"ok":true,"ctx":{"a":[1,2]},"stream":"web"}"#;
        let event = &decode(body, 7, "default").unwrap()[0];
        assert_eq!(event.name, "page_view");
        assert_eq!(event.user_id.as_deref(), Some("42"));
        assert_eq!(event.session_id.as_deref(), Some("s1"));
        assert_eq!(event.event_id.as_deref(), Some("e-1"));
        assert_eq!(event.event_time_ms, 1_769_860_800_500);
        assert_eq!(event.receive_time_ms, 7);
        assert_eq!(event.stream, "web");
        assert_eq!(event.tags, ["a"]);
        assert_eq!(event.score, Some(0.5));
        assert_eq!(event.attrs["url"], Value::String("/x".into()));
        assert_eq!(event.attrs["n"], Value::Int(3));
        assert_eq!(event.attrs["f"], Value::Float(1.5));
        assert_eq!(event.attrs["ok"], Value::Bool(true));
        assert_eq!(event.attrs["ctx"], Value::Json(r#"{"a":[1,2]}"#.into()));
        assert_eq!(event.attrs.len(), 5);
    }

    #[test]
    fn numeric_times_in_seconds_or_millis() {
        assert_eq!(
            decode(br#"{"time":1700000000}"#, 0, "s").unwrap()[0].event_time_ms,
            1_700_000_000_000
        );
        assert_eq!(
            decode(br#"{"time":1700000000123}"#, 0, "s").unwrap()[0].event_time_ms,
            1_700_000_000_123
        );
        assert_eq!(
            decode(br#"{"name":"x"}"#, 99, "s").unwrap()[0].event_time_ms,
            99
        );
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(decode(b"  ", 0, "s"), Err(DecodeError::Empty));
        assert_eq!(decode(b"[]", 0, "s"), Err(DecodeError::Empty));
        assert!(matches!(
            decode(b"{\"a\":", 0, "s"),
            Err(DecodeError::Syntax(_))
        ));
        assert_eq!(
            decode(b"[{}, 3]", 0, "s").unwrap_err().to_string(),
            "event 1: expected a JSON object, found a number"
        );
        assert_eq!(
            decode(br#"{"tags":"x"}"#, 0, "s").unwrap_err().to_string(),
            "event 0: field `tags` must be an array of strings, found a string"
        );
        assert!(
            decode(br#"{"timestamp":"yesterday"}"#, 0, "s")
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
        assert!(decode(br#"{"user_id":{"a":1}}"#, 0, "s").is_err());
    }
}
