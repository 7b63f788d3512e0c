//! Decoders: bytes from a source -> [`runnel_common::Event`]s. Pure functions: no I/O, no clock
//! (the receive time is an argument), so they are unit-tested and fuzzed directly.
//!
//! Request-level problems (not JSON at all, over a size limit, a wrong envelope) are errors the
//! source answers with (HTTP 400/413). Problems of one item inside a valid envelope become a
//! dead letter ([`dead_letter`]): an event on stream [`DEAD_LETTERS`] that keeps the reason
//! and the raw bytes, is shipped like any event, and is queryable as `dead_letters` at the
//! aggregator. Nothing is silently lost.

use std::collections::BTreeMap;

use runnel_common::streams::DEAD_LETTERS;
use runnel_common::{Event, SourceKind, Value};

pub mod json;
pub mod mqtt;
pub mod segment;
pub mod snowplow;

/// Raw bytes kept in a dead letter at most. Enough to see what went wrong; a dead letter must not
/// become a way around the event size limit.
pub const MAX_DEAD_LETTER_RAW_BYTES: usize = 16 * 1024;

/// What the source knows about a request, beyond its body.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// When the agent received it, Unix epoch milliseconds.
    pub receive_time_ms: i64,
    /// Stream for events that do not name one.
    pub stream: String,
    /// Client address, if known.
    pub ip: Option<String>,
    /// `User-Agent` header, if any.
    pub user_agent: Option<String>,
}

/// A dead letter: `reason` says what was wrong; `raw` keeps up to
/// [`MAX_DEAD_LETTER_RAW_BYTES`] of the input (text when it is UTF-8, bytes otherwise).
pub fn dead_letter(source: SourceKind, reason: &str, raw: &[u8], received: &Received) -> Event {
    let kept = &raw[..raw.len().min(MAX_DEAD_LETTER_RAW_BYTES)];
    let raw_value = match std::str::from_utf8(kept) {
        Ok(text) => Value::String(text.to_owned()),
        // Cut inside a multi-byte character: keep the valid prefix as text.
        Err(error) if error.error_len().is_none() && raw.len() > kept.len() => {
            Value::String(String::from_utf8_lossy(&kept[..error.valid_up_to()]).into_owned())
        }
        Err(_) => Value::Bytes(kept.to_vec()),
    };
    let mut attrs = BTreeMap::new();
    attrs.insert("reason".to_owned(), Value::String(reason.to_owned()));
    attrs.insert("raw".to_owned(), raw_value);
    attrs.insert("raw_bytes".to_owned(), Value::Int(raw.len() as i64));
    attrs.insert(
        "raw_truncated".to_owned(),
        Value::Bool(raw.len() > kept.len()),
    );
    Event {
        attrs,
        ..Event::new(
            source,
            DEAD_LETTERS,
            "dead_letter",
            received.receive_time_ms,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_keep_reason_and_capped_raw_bytes() {
        let received = Received {
            receive_time_ms: 7,
            ..Received::default()
        };
        let event = dead_letter(SourceKind::Mqtt, "not JSON", b"\xff\x00", &received);
        assert_eq!(event.stream, DEAD_LETTERS);
        assert_eq!(event.attrs["raw"], Value::Bytes(vec![0xff, 0]));
        assert_eq!(event.attrs["reason"], Value::String("not JSON".into()));
        let big = vec![b'a'; MAX_DEAD_LETTER_RAW_BYTES + 10];
        let event = dead_letter(SourceKind::Http, "too big", &big, &received);
        assert_eq!(event.attrs["raw_truncated"], Value::Bool(true));
        assert_eq!(event.attrs["raw_bytes"], Value::Int(big.len() as i64));
        let Value::String(raw) = &event.attrs["raw"] else {
            panic!("text expected")
        };
        assert_eq!(raw.len(), MAX_DEAD_LETTER_RAW_BYTES);
    }
}
