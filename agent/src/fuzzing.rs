//! Entry points for fuzzing the agent's parsers of untrusted input: the `cargo fuzz` targets in
//! `fuzz/` and the corpus replay test (`agent/tests/corpus.rs`, run by CI without a nightly
//! toolchain) call the same functions. Each takes arbitrary bytes; the first byte, where there
//! is one, picks a variant. Decoding may fail, but must never panic.

use runnel_config::MqttPayload;

use crate::decode::{self, Received};

fn received() -> Received {
    Received {
        receive_time_ms: 1_764_000_000_000,
        stream: "fuzz".into(),
        ip: Some("192.0.2.1".into()),
        user_agent: Some("fuzz".into()),
    }
}

/// Snowplow tracker protocol: first byte even = tp2 POST body, odd = pixel GET query string.
pub fn snowplow(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        let _ = decode::snowplow::decode_post(rest, &received());
    } else if let Ok(query) = std::str::from_utf8(rest) {
        let _ = decode::snowplow::decode_get(query, &received());
    }
}

/// Segment HTTP API: first byte picks the call; a second part after a 0 byte is the
/// `Authorization` header.
pub fn segment(data: &[u8]) {
    use decode::segment::Call;
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let calls = [
        Call::Track,
        Call::Page,
        Call::Screen,
        Call::Identify,
        Call::Group,
        Call::Alias,
        Call::Batch,
    ];
    let call = calls[usize::from(selector) % calls.len()];
    let (body, authorization) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], std::str::from_utf8(&rest[at + 1..]).ok()),
        None => (rest, None),
    };
    let _ = decode::segment::decode(call, body, authorization, &received());
}

/// MQTT messages: first byte picks the payload format; topic and payload are split at the first
/// 0 byte; topic levels go through a template.
pub fn mqtt(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let payload_format = match selector % 3 {
        0 => MqttPayload::Json,
        1 => MqttPayload::Text,
        _ => MqttPayload::Bytes,
    };
    let (topic, payload) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (String::from_utf8_lossy(&rest[..at]), &rest[at + 1..]),
        None => (String::from_utf8_lossy(rest), &[][..]),
    };
    let view = decode::mqtt::PublishFormat {
        payload: payload_format,
        template: Some("plant/{site}/{device}/telemetry"),
    };
    let events = decode::mqtt::decode_publish(&view, &topic, payload, &received());
    for event in events {
        let _ = crate::buffer::EncodedEvent::encode(&event);
    }
}

/// The generic JSON body of `POST /v1/events`.
pub fn json(data: &[u8]) {
    let _ = decode::json::decode(data, 1_764_000_000_000, "fuzz");
}
