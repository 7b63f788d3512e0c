//! The event model every source maps onto and every store reads from.
//!
//! Core fields are typed columns at the aggregator; everything else a source sends lands in
//! `attrs`. `Value` is deliberately flat: nested objects and arrays travel as JSON text
//! (`Value::Json`), so decoding a hostile frame can never recurse deeply, and the aggregator can
//! store `attrs` as one JSON column that SQL functions reach into.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One event as the agent buffers it and ships it.
///
/// The agent id is absent on purpose: it is the identity of the QUIC connection (the agent's
/// certificate), never a field an agent could set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Per-agent sequence number, assigned when the event is committed to the agent's buffer.
    /// Strictly increasing per agent; 0 means "not yet assigned".
    pub seq: u64,
    /// When the event happened, Unix epoch milliseconds (from the source, else `receive_time_ms`).
    pub event_time_ms: i64,
    /// When the agent received it, Unix epoch milliseconds.
    pub receive_time_ms: i64,
    pub source: SourceKind,
    /// Logical stream, e.g. `clickstream`, `telemetry`, `alerts`. Rules may route between them.
    pub stream: String,
    /// Event name (`page_view`, `add_to_cart`, an MQTT topic's last segment, ...).
    pub name: String,
    /// Source-provided unique id (Snowplow `eid`, Segment `messageId`), if any.
    pub event_id: Option<String>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    /// Model score, written by the agent's scoring stage.
    pub score: Option<f64>,
    pub tags: Vec<String>,
    /// Every other field the source sent.
    pub attrs: BTreeMap<String, Value>,
}

/// Where an event came from. Variants are only ever appended (wire compatibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SourceKind {
    Http,
    Snowplow,
    Segment,
    Mqtt,
    /// Made by the agent itself (rule alerts, window aggregates).
    Internal,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Http => "http",
            SourceKind::Snowplow => "snowplow",
            SourceKind::Segment => "segment",
            SourceKind::Mqtt => "mqtt",
            SourceKind::Internal => "internal",
        }
    }
}

/// A typed attribute value. Flat by design: see the module docs. Variants are only ever appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
    /// A nested object or array, as compact JSON text.
    Json(String),
}

impl Event {
    /// An event with the given origin, stream and name at `time_ms` (event and receive time),
    /// and every optional field empty.
    pub fn new(
        source: SourceKind,
        stream: impl Into<String>,
        name: impl Into<String>,
        time_ms: i64,
    ) -> Event {
        Event {
            seq: 0,
            event_time_ms: time_ms,
            receive_time_ms: time_ms,
            source,
            stream: stream.into(),
            name: name.into(),
            event_id: None,
            user_id: None,
            session_id: None,
            score: None,
            tags: Vec::new(),
            attrs: BTreeMap::new(),
        }
    }

    /// Size estimate used for buffer accounting and batch cutting before the event is encoded.
    /// Cheap and an over-estimate for typical events; the encoded size is checked separately.
    pub fn estimated_bytes(&self) -> usize {
        let strings = self.stream.len()
            + self.name.len()
            + self.event_id.as_ref().map_or(0, String::len)
            + self.user_id.as_ref().map_or(0, String::len)
            + self.session_id.as_ref().map_or(0, String::len)
            + self.tags.iter().map(|t| t.len() + 1).sum::<usize>();
        let attrs: usize = self
            .attrs
            .iter()
            .map(|(key, value)| key.len() + 1 + value.estimated_bytes())
            .sum();
        48 + strings + attrs
    }
}

impl Value {
    pub fn estimated_bytes(&self) -> usize {
        match self {
            Value::Null | Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 9,
            Value::String(s) | Value::Json(s) => s.len() + 2,
            Value::Bytes(b) => b.len() + 2,
        }
    }
}
