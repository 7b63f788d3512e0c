//! The `events` table schema and the conversion from wire events to Arrow record batches.
//!
//! Core fields are typed columns; `attrs` is one JSON object per row (text), so the schema does
//! not change when sources send new fields. This schema, in Delta's types, is also the events
//! table other engines read (docs/STORAGE.md): change it only by appending nullable columns.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{
    ArrayRef, Float64Builder, ListBuilder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
    UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use runnel_common::{Event, Value};

/// Milliseconds in an hour: the table's partition unit.
pub const HOUR_MS: i64 = 3_600_000;

pub static EVENTS_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("agent_id", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new("event_time", ts(), false),
        Field::new("receive_time", ts(), false),
        Field::new("ingest_time", ts(), false),
        Field::new("source", DataType::Utf8, false),
        Field::new("stream", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("event_id", DataType::Utf8, true),
        Field::new("user_id", DataType::Utf8, true),
        Field::new("session_id", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
        Field::new(
            "tags",
            DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
            false,
        ),
        Field::new("attrs", DataType::Utf8, false),
    ]))
});

/// The hour (Unix ms, floored) an event belongs to, by event time.
pub fn hour_of(event_time_ms: i64) -> i64 {
    event_time_ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// Converts events of one agent into record batches, one per event-time hour.
pub fn to_record_batches(
    agent_id: &str,
    ingest_time_ms: i64,
    events: &[Event],
) -> Vec<(i64, RecordBatch)> {
    let mut by_hour: BTreeMap<i64, Vec<&Event>> = BTreeMap::new();
    for event in events {
        by_hour
            .entry(hour_of(event.event_time_ms))
            .or_default()
            .push(event);
    }
    by_hour
        .into_iter()
        .map(|(hour, events)| (hour, to_record_batch(agent_id, ingest_time_ms, &events)))
        .collect()
}

fn to_record_batch(agent_id: &str, ingest_time_ms: i64, events: &[&Event]) -> RecordBatch {
    let n = events.len();
    let mut agent = StringBuilder::with_capacity(n, n * agent_id.len());
    let mut seq = UInt64Builder::with_capacity(n);
    let ts = || TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let (mut event_time, mut receive_time, mut ingest_time) = (ts(), ts(), ts());
    let mut source = StringBuilder::with_capacity(n, n * 8);
    let mut stream = StringBuilder::with_capacity(n, n * 8);
    let mut name = StringBuilder::with_capacity(n, n * 16);
    let mut event_id = StringBuilder::with_capacity(n, n * 16);
    let mut user_id = StringBuilder::with_capacity(n, n * 16);
    let mut session_id = StringBuilder::with_capacity(n, n * 16);
    let mut score = Float64Builder::with_capacity(n);
    let mut tags = ListBuilder::new(StringBuilder::new());
    let mut attrs = StringBuilder::with_capacity(n, n * 128);
    let mut json = String::with_capacity(256);
    for event in events {
        agent.append_value(agent_id);
        seq.append_value(event.seq);
        event_time.append_value(event.event_time_ms);
        receive_time.append_value(event.receive_time_ms);
        ingest_time.append_value(ingest_time_ms);
        source.append_value(event.source.as_str());
        stream.append_value(&event.stream);
        name.append_value(&event.name);
        event_id.append_option(event.event_id.as_deref());
        user_id.append_option(event.user_id.as_deref());
        session_id.append_option(event.session_id.as_deref());
        score.append_option(event.score);
        for tag in &event.tags {
            tags.values().append_value(tag);
        }
        tags.append(true);
        json.clear();
        attrs_json(&event.attrs, &mut json);
        attrs.append_value(&json);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(agent.finish()),
        Arc::new(seq.finish()),
        Arc::new(event_time.finish()),
        Arc::new(receive_time.finish()),
        Arc::new(ingest_time.finish()),
        Arc::new(source.finish()),
        Arc::new(stream.finish()),
        Arc::new(name.finish()),
        Arc::new(event_id.finish()),
        Arc::new(user_id.finish()),
        Arc::new(session_id.finish()),
        Arc::new(score.finish()),
        Arc::new(tags.finish()),
        Arc::new(attrs.finish()),
    ];
    RecordBatch::try_new(EVENTS_SCHEMA.clone(), columns)
        .expect("columns are built to match EVENTS_SCHEMA")
}

/// Writes `attrs` as one JSON object. `Value::Json` text is embedded as JSON when it parses and
/// as a string otherwise, so one bad value cannot make the whole row unreadable.
pub fn attrs_json(attrs: &BTreeMap<String, Value>, out: &mut String) {
    use std::fmt::Write;
    out.push('{');
    for (idx, (key, value)) in attrs.iter().enumerate() {
        if idx > 0 {
            out.push(',');
        }
        push_json_string(key, out);
        out.push(':');
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Float(f) if f.is_finite() => {
                let _ = write!(out, "{f:?}");
            }
            Value::Float(_) => out.push_str("null"),
            Value::String(s) => push_json_string(s, out),
            Value::Bytes(bytes) => {
                out.push('"');
                for b in bytes {
                    let _ = write!(out, "{b:02x}");
                }
                out.push('"');
            }
            Value::Json(text) => {
                if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                    out.push_str(text);
                } else {
                    push_json_string(text, out);
                }
            }
        }
    }
    out.push('}');
}

fn push_json_string(s: &str, out: &mut String) {
    // serde_json's string escaping, without allocating a Value.
    out.push_str(&serde_json::to_string(s).expect("a str always serialises"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_common::SourceKind;

    #[test]
    fn attrs_are_valid_json() {
        let mut attrs = BTreeMap::new();
        attrs.insert("a\"b".to_string(), Value::String("x\ny".into()));
        attrs.insert("f".into(), Value::Float(1.0));
        attrs.insert("nan".into(), Value::Float(f64::NAN));
        attrs.insert("j".into(), Value::Json("[1,{\"k\":2}]".into()));
        attrs.insert("bad".into(), Value::Json("{nope".into()));
        attrs.insert("b".into(), Value::Bytes(vec![0, 255]));
        let mut out = String::new();
        attrs_json(&attrs, &mut out);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["a\"b"], "x\ny");
        assert_eq!(parsed["f"], 1.0);
        assert!(parsed["nan"].is_null());
        assert_eq!(parsed["j"][1]["k"], 2);
        assert_eq!(parsed["bad"], "{nope");
        assert_eq!(parsed["b"], "00ff");
    }

    #[test]
    fn batches_split_by_hour() {
        let event = |seq, t| Event {
            seq,
            event_time_ms: t,
            receive_time_ms: t,
            source: SourceKind::Http,
            stream: "s".into(),
            name: "n".into(),
            event_id: None,
            user_id: Some("u".into()),
            session_id: None,
            score: None,
            tags: vec!["t".into()],
            attrs: BTreeMap::new(),
        };
        let batches =
            to_record_batches("a", 0, &[event(1, 10), event(2, HOUR_MS + 1), event(3, 20)]);
        assert_eq!(batches.len(), 2);
        assert_eq!((batches[0].0, batches[0].1.num_rows()), (0, 2));
        assert_eq!((batches[1].0, batches[1].1.num_rows()), (HOUR_MS, 1));
        assert_eq!(hour_of(-1), -HOUR_MS);
    }
}
