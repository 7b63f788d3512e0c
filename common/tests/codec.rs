//! Codec properties: every wire message round-trips through framing, the batch codec returns
//! what it was given, decoding hostile bytes never panics, and each hostile case the codecs
//! promise to refuse is refused with the right error.
//!
//! These tests only use the public API of runnel-common; they do not touch sockets or the clock.

use std::collections::BTreeMap;
use std::fmt::Debug;

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde::Serialize;
use serde::de::DeserializeOwned;

use runnel_common::batch::{self, BatchError};
use runnel_common::frame::{self, FrameError, LENGTH_PREFIX_BYTES};
use runnel_common::limits::{
    MAX_BATCH_BYTES, MAX_BATCH_EVENTS, MAX_CONTROL_FRAME_BYTES, MAX_FRAME_BYTES,
};
use runnel_common::wire::{
    Ack, AckMessage, AckOutcome, AgentMessage, AggregatorMessage, Batch, BatchMessage,
    ComponentHealth, Compression, ConfigFile, ConfigOutcome, ConfigPush, ConfigResult, Heartbeat,
    Hello, Resume, Status, Welcome,
};
use runnel_common::{Event, SourceKind, Value};

// ---------------------------------------------------------------------------------------------
// Variant names. The matches are exhaustive on purpose: appending a variant to a wire enum stops
// this file from compiling until the strategies below generate the new variant too.

fn source_kind_name(kind: SourceKind) -> &'static str {
    match kind {
        SourceKind::Http => "http",
        SourceKind::Snowplow => "snowplow",
        SourceKind::Segment => "segment",
        SourceKind::Mqtt => "mqtt",
        SourceKind::Internal => "internal",
    }
}

fn value_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::String(_) => "string",
        Value::Bytes(_) => "bytes",
        Value::Json(_) => "json",
    }
}

fn agent_message_name(message: &AgentMessage) -> &'static str {
    match message {
        AgentMessage::Hello(_) => "hello",
        AgentMessage::Heartbeat(_) => "heartbeat",
        AgentMessage::Status(_) => "status",
        AgentMessage::ConfigResult(_) => "config_result",
        AgentMessage::Resume(_) => "resume",
    }
}

fn aggregator_message_name(message: &AggregatorMessage) -> &'static str {
    match message {
        AggregatorMessage::Welcome(_) => "welcome",
        AggregatorMessage::Refused { .. } => "refused",
        AggregatorMessage::ConfigPush(_) => "config_push",
    }
}

fn batch_message_name(message: &BatchMessage) -> &'static str {
    match message {
        BatchMessage::Batch(Batch {
            compression: Compression::None,
            ..
        }) => "batch (none)",
        BatchMessage::Batch(Batch {
            compression: Compression::Zstd,
            ..
        }) => "batch (zstd)",
        BatchMessage::Batch(Batch {
            compression: Compression::ZstdColumns,
            ..
        }) => "batch (zstd columns)",
        BatchMessage::Batch(Batch {
            compression: Compression::ZstdColumns2,
            ..
        }) => "batch (zstd columns 2)",
    }
}

fn ack_message_name(message: &AckMessage) -> &'static str {
    match message {
        AckMessage::Ack(Ack {
            outcome: AckOutcome::Stored { .. },
            ..
        }) => "ack stored",
        AckMessage::Ack(Ack {
            outcome: AckOutcome::Duplicate,
            ..
        }) => "ack duplicate",
        AckMessage::Ack(Ack {
            outcome: AckOutcome::Rejected { .. },
            ..
        }) => "ack rejected",
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// Short strings, including multi-byte UTF-8, so length prefixes count bytes and not chars.
fn small_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_.-]{0,12}",
        1 => "\\PC{0,8}",
    ]
}

/// Finite floats only: NaN != NaN would make equality-based round trips fail spuriously.
fn finite_f64() -> impl Strategy<Value = f64> {
    use proptest::num::f64;
    f64::POSITIVE | f64::NEGATIVE | f64::NORMAL | f64::SUBNORMAL | f64::ZERO
}

fn source_kind() -> impl Strategy<Value = SourceKind> {
    prop_oneof![
        Just(SourceKind::Http),
        Just(SourceKind::Snowplow),
        Just(SourceKind::Segment),
        Just(SourceKind::Mqtt),
        Just(SourceKind::Internal),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        finite_f64().prop_map(Value::Float),
        small_string().prop_map(Value::String),
        vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
        small_string().prop_map(Value::Json),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        (
            any::<u64>(),
            any::<i64>(),
            any::<i64>(),
            source_kind(),
            small_string(),
            small_string(),
        ),
        (
            option::of(small_string()),
            option::of(small_string()),
            option::of(small_string()),
            option::of(finite_f64()),
            vec(small_string(), 0..4),
            btree_map(small_string(), value(), 0..6),
        ),
    )
        .prop_map(
            |(
                (seq, event_time_ms, receive_time_ms, source, stream, name),
                (event_id, user_id, session_id, score, tags, attrs),
            )| Event {
                seq,
                event_time_ms,
                receive_time_ms,
                source,
                stream,
                name,
                event_id,
                user_id,
                session_id,
                score,
                tags,
                attrs,
            },
        )
}

/// `after_seq` and 1..=16 events whose sequence numbers increase strictly above it, with gaps
/// (the agent drops events, so chains have holes).
fn event_chain() -> impl Strategy<Value = (u64, Vec<Event>)> {
    let after_seq = prop_oneof![Just(0u64), 0u64..1_000, 0u64..=(u64::MAX - 1_000_000)];
    (after_seq, vec((1u64..1_000, event()), 1..=16)).prop_map(|(after_seq, gaps_and_events)| {
        let mut seq = after_seq;
        let events = gaps_and_events
            .into_iter()
            .map(|(gap, mut event)| {
                seq += gap;
                event.seq = seq;
                event
            })
            .collect();
        (after_seq, events)
    })
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u16>(),
        any::<u16>(),
        small_string(),
        small_string(),
        btree_map(small_string(), small_string(), 0..8),
        any::<u64>(),
    )
        .prop_map(
            |(
                min_protocol_version,
                max_protocol_version,
                agent_version,
                config_hash,
                labels,
                last_assigned_seq,
            )| Hello {
                min_protocol_version,
                max_protocol_version,
                agent_version,
                config_hash,
                labels,
                last_assigned_seq,
            },
        )
}

fn heartbeat() -> impl Strategy<Value = Heartbeat> {
    (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
        |(n_buffered_events, buffered_bytes, oldest_unshipped_age_ms, n_dropped_events)| {
            Heartbeat {
                n_buffered_events,
                buffered_bytes,
                oldest_unshipped_age_ms,
                n_dropped_events,
            }
        },
    )
}

fn component_health() -> impl Strategy<Value = ComponentHealth> {
    (small_string(), any::<bool>(), small_string()).prop_map(|(name, healthy, detail)| {
        ComponentHealth {
            name,
            healthy,
            detail,
        }
    })
}

fn status() -> impl Strategy<Value = Status> {
    (
        (small_string(), any::<u64>(), small_string()),
        vec(component_health(), 0..6),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        btree_map(small_string(), any::<u64>(), 0..4),
        btree_map(small_string(), any::<u64>(), 0..4),
    )
        .prop_map(
            |(
                (config_hash, config_version, agent_version),
                components,
                (n_buffered_events, buffered_bytes, oldest_unshipped_age_ms),
                drops,
                counters,
            )| Status {
                config_hash,
                config_version,
                agent_version,
                components,
                n_buffered_events,
                buffered_bytes,
                oldest_unshipped_age_ms,
                drops,
                counters,
            },
        )
}

fn config_outcome() -> impl Strategy<Value = ConfigOutcome> {
    prop_oneof![
        Just(ConfigOutcome::Applied),
        small_string().prop_map(|error| ConfigOutcome::Failed { error }),
    ]
}

fn config_result() -> impl Strategy<Value = ConfigResult> {
    (any::<u64>(), small_string(), config_outcome()).prop_map(|(version, hash, outcome)| {
        ConfigResult {
            version,
            hash,
            outcome,
        }
    })
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        hello().prop_map(AgentMessage::Hello),
        heartbeat().prop_map(AgentMessage::Heartbeat),
        status().prop_map(AgentMessage::Status),
        config_result().prop_map(AgentMessage::ConfigResult),
        any::<u64>().prop_map(|delivered_seq| AgentMessage::Resume(Resume { delivered_seq })),
    ]
}

fn config_file() -> impl Strategy<Value = ConfigFile> {
    (small_string(), small_string(), vec(any::<u8>(), 0..64)).prop_map(|(name, sha256, content)| {
        ConfigFile {
            name,
            sha256,
            content,
        }
    })
}

fn config_push() -> impl Strategy<Value = ConfigPush> {
    (
        any::<u64>(),
        small_string(),
        "\\PC{0,64}",
        vec(config_file(), 0..3),
    )
        .prop_map(|(version, hash, document, files)| ConfigPush {
            version,
            hash,
            document,
            files,
        })
}

fn welcome() -> impl Strategy<Value = Welcome> {
    (
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        small_string(),
        small_string(),
    )
        .prop_map(
            |(
                protocol_version,
                high_water_mark,
                max_in_flight_batches,
                heartbeat_interval_ms,
                agent_id,
                aggregator_version,
            )| Welcome {
                protocol_version,
                high_water_mark,
                max_in_flight_batches,
                heartbeat_interval_ms,
                agent_id,
                aggregator_version,
            },
        )
}

fn aggregator_message() -> impl Strategy<Value = AggregatorMessage> {
    prop_oneof![
        welcome().prop_map(AggregatorMessage::Welcome),
        small_string().prop_map(|reason| AggregatorMessage::Refused { reason }),
        config_push().prop_map(AggregatorMessage::ConfigPush),
    ]
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Zstd)]
}

/// A batch with arbitrary header fields and payload: framing must carry it whether or not the
/// batch codec would accept it.
fn arbitrary_batch() -> impl Strategy<Value = Batch> {
    let uncompressed_bytes = prop_oneof![
        0u32..4_096,
        Just(MAX_BATCH_BYTES as u32),
        Just(MAX_BATCH_BYTES as u32 + 1),
        any::<u32>(),
    ];
    let n_events = prop_oneof![
        0u32..32,
        Just(MAX_BATCH_EVENTS as u32),
        Just(MAX_BATCH_EVENTS as u32 + 1),
        any::<u32>()
    ];
    (
        any::<u64>(),
        any::<u64>(),
        n_events,
        uncompressed_bytes,
        compression(),
        vec(any::<u8>(), 0..512),
    )
        .prop_map(
            |(after_seq, last_seq, n_events, uncompressed_bytes, compression, payload)| Batch {
                after_seq,
                last_seq,
                n_events,
                uncompressed_bytes,
                compression,
                payload,
            },
        )
}

fn batch_message() -> impl Strategy<Value = BatchMessage> {
    arbitrary_batch().prop_map(BatchMessage::Batch)
}

fn ack_outcome() -> impl Strategy<Value = AckOutcome> {
    prop_oneof![
        any::<u32>().prop_map(|n_new| AckOutcome::Stored { n_new }),
        Just(AckOutcome::Duplicate),
        small_string().prop_map(|reason| AckOutcome::Rejected { reason }),
    ]
}

fn ack_message() -> impl Strategy<Value = AckMessage> {
    (any::<u64>(), ack_outcome())
        .prop_map(|(last_seq, outcome)| AckMessage::Ack(Ack { last_seq, outcome }))
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn fail(context: &str, error: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{context}: {error}"))
}

/// Encodes `message` as a frame, checks the prefix, decodes it both ways and compares. Every
/// strict prefix of the frame must be refused: a reader that stopped early must not see a
/// message.
fn assert_frame_round_trip<T>(
    kind: &str,
    message: &T,
    max_bytes: usize,
) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = frame::encode(message, max_bytes).map_err(|error| fail(kind, error))?;
    let (prefix, payload) = bytes
        .split_first_chunk::<LENGTH_PREFIX_BYTES>()
        .ok_or_else(|| fail(kind, "frame shorter than its length prefix"))?;
    prop_assert_eq!(
        frame::payload_len(*prefix, max_bytes),
        Ok(payload.len()),
        "{} prefix",
        kind
    );

    let decoded: T = frame::decode(&bytes, max_bytes).map_err(|error| fail(kind, error))?;
    prop_assert_eq!(&decoded, message, "{} frame round trip", kind);
    let decoded: T = frame::decode_payload(payload).map_err(|error| fail(kind, error))?;
    prop_assert_eq!(&decoded, message, "{} payload round trip", kind);

    for n_bytes in 0..bytes.len() {
        prop_assert!(
            frame::decode::<T>(&bytes[..n_bytes], max_bytes).is_err(),
            "{} truncated to {} of {} bytes decoded",
            kind,
            n_bytes,
            bytes.len()
        );
    }
    Ok(())
}

/// Decodes hostile bytes as `T` in every way a driver can. Nothing here may panic; whatever
/// decodes must re-encode, and re-encoding is stable (compared as bytes, so a NaN float read from
/// the input does not make the comparison fail).
fn assert_hostile_decode<T>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned,
{
    let mut framed = u32::try_from(bytes.len())
        .expect("test input is small")
        .to_le_bytes()
        .to_vec();
    framed.extend_from_slice(bytes);
    let results = [
        frame::decode::<T>(bytes, MAX_FRAME_BYTES),
        frame::decode::<T>(&framed, MAX_FRAME_BYTES),
        frame::decode_payload::<T>(bytes),
    ];
    for message in results.into_iter().flatten() {
        let encoded =
            frame::encode(&message, MAX_FRAME_BYTES).map_err(|error| fail("re-encode", error))?;
        let again: T =
            frame::decode(&encoded, MAX_FRAME_BYTES).map_err(|error| fail("re-decode", error))?;
        let encoded_again =
            frame::encode(&again, MAX_FRAME_BYTES).map_err(|error| fail("re-encode", error))?;
        prop_assert_eq!(
            encoded,
            encoded_again,
            "re-encoding a decoded message is not stable"
        );
    }
    Ok(())
}

/// The post-conditions `batch::decode` promises whenever it returns events.
fn assert_decoded_batch_is_consistent(
    batch: &Batch,
    events: &[Event],
) -> Result<(), TestCaseError> {
    prop_assert!(!events.is_empty());
    prop_assert!(events.len() <= MAX_BATCH_EVENTS);
    prop_assert_eq!(events.len(), batch.n_events as usize);
    let mut previous = batch.after_seq;
    for event in events {
        prop_assert!(event.seq > previous, "seq {} after {}", event.seq, previous);
        previous = event.seq;
    }
    prop_assert_eq!(previous, batch.last_seq);
    Ok(())
}

fn test_event(seq: u64) -> Event {
    Event {
        seq,
        event_time_ms: 1_700_000_000_000,
        receive_time_ms: 1_700_000_000_005,
        source: SourceKind::Http,
        stream: "clickstream".into(),
        name: "page_view".into(),
        event_id: None,
        user_id: Some("u1".into()),
        session_id: None,
        score: Some(0.25),
        tags: vec!["t".into()],
        attrs: BTreeMap::from([("path".to_string(), Value::String("/".into()))]),
    }
}

fn test_events(seqs: &[u64]) -> Vec<Event> {
    seqs.iter().copied().map(test_event).collect()
}

/// A batch built by hand, bypassing `batch::encode`'s checks, as a hostile or buggy agent would.
fn uncompressed_batch(after_seq: u64, last_seq: u64, n_events: u32, events: &[Event]) -> Batch {
    let payload = postcard::to_stdvec(events).expect("events encode");
    Batch {
        after_seq,
        last_seq,
        n_events,
        uncompressed_bytes: u32::try_from(payload.len()).expect("small payload"),
        compression: Compression::None,
        payload,
    }
}

/// Like [`uncompressed_batch`], zstd-compressed as `batch::encode` would.
fn zstd_batch(after_seq: u64, last_seq: u64, n_events: u32, events: &[Event]) -> Batch {
    let mut batch = uncompressed_batch(after_seq, last_seq, n_events, events);
    batch.payload =
        zstd::bulk::compress(&batch.payload, batch::ZSTD_LEVEL).expect("zstd compresses");
    batch.compression = Compression::Zstd;
    batch
}

// ---------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn event_round_trips_through_postcard(event in event()) {
        let kinds: Vec<&str> = event.attrs.values().map(value_name).collect();
        let bytes = postcard::to_stdvec(&event).map_err(|error| fail("encode event", error))?;
        let decoded: Event = frame::decode_payload(&bytes).map_err(|error| fail("decode event", error))?;
        prop_assert_eq!(
            &decoded, &event,
            "source {}, attrs {:?}", source_kind_name(event.source), kinds
        );
    }

    #[test]
    fn agent_messages_round_trip(message in agent_message()) {
        assert_frame_round_trip(agent_message_name(&message), &message, MAX_CONTROL_FRAME_BYTES)?;
    }

    #[test]
    fn aggregator_messages_round_trip(message in aggregator_message()) {
        assert_frame_round_trip(aggregator_message_name(&message), &message, MAX_CONTROL_FRAME_BYTES)?;
    }

    #[test]
    fn batch_messages_round_trip(message in batch_message()) {
        assert_frame_round_trip(batch_message_name(&message), &message, MAX_FRAME_BYTES)?;
    }

    #[test]
    fn ack_messages_round_trip(message in ack_message()) {
        assert_frame_round_trip(ack_message_name(&message), &message, MAX_CONTROL_FRAME_BYTES)?;
    }

    #[test]
    fn batch_codec_round_trips((after_seq, events) in event_chain()) {
        let encoded = batch::encode(after_seq, &events).map_err(|error| fail("batch::encode", error))?;
        prop_assert_eq!(encoded.after_seq, after_seq);
        prop_assert_eq!(encoded.last_seq, events.last().map(|event| event.seq).unwrap_or_default());
        prop_assert_eq!(encoded.n_events as usize, events.len());
        prop_assert_eq!(encoded.compression, Compression::Zstd);

        let decoded = batch::decode(&encoded).map_err(|error| fail("batch::decode", error))?;
        prop_assert_eq!(&decoded, &events);

        let message = BatchMessage::Batch(encoded);
        assert_frame_round_trip("batch", &message, MAX_FRAME_BYTES)?;
        let bytes = frame::encode(&message, MAX_FRAME_BYTES).map_err(|error| fail("frame", error))?;
        let BatchMessage::Batch(received) =
            frame::decode(&bytes, MAX_FRAME_BYTES).map_err(|error| fail("frame", error))?;
        let decoded = batch::decode(&received).map_err(|error| fail("batch::decode after frame", error))?;
        prop_assert_eq!(&decoded, &events);
    }

    #[test]
    fn uncompressed_batches_decode((after_seq, events) in event_chain()) {
        let last_seq = events.last().map(|event| event.seq).unwrap_or_default();
        let n_events = u32::try_from(events.len()).expect("small chain");
        let batch = uncompressed_batch(after_seq, last_seq, n_events, &events);
        prop_assert_eq!(batch::decode(&batch), Ok(events));
    }

    /// The decoder accepts a header exactly when it describes the payload: `after_seq` below the
    /// first event, the right count, last sequence number and uncompressed size.
    #[test]
    fn batch_header_is_checked_against_payload(
        (after_seq, events) in event_chain(),
        compression in compression(),
        header_after_seq in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        header_last_seq in prop_oneof![Just(None), any::<u64>().prop_map(Some)],
        header_n_events in prop_oneof![Just(None), (0u32..20).prop_map(Some), any::<u32>().prop_map(Some)],
        header_bytes_delta in prop_oneof![3 => Just(0i64), 1 => -64i64..64],
    ) {
        let last_seq = events.last().map(|event| event.seq).unwrap_or_default();
        let n_events = u32::try_from(events.len()).expect("small chain");
        let mut batch = match compression {
            Compression::None => uncompressed_batch(after_seq, last_seq, n_events, &events),
            Compression::Zstd => zstd_batch(after_seq, last_seq, n_events, &events),
            // The column layout has its own tests (tests/columnar.rs).
            Compression::ZstdColumns | Compression::ZstdColumns2 => {
                unreachable!("compression() yields row layouts")
            }
        };
        let raw_bytes = batch.uncompressed_bytes;
        batch.after_seq = header_after_seq.unwrap_or(after_seq);
        batch.last_seq = header_last_seq.unwrap_or(last_seq);
        batch.n_events = header_n_events.unwrap_or(n_events);
        batch.uncompressed_bytes = u32::try_from((i64::from(raw_bytes) + header_bytes_delta).max(0))
            .expect("in range");

        let expect_ok = batch.after_seq < events[0].seq
            && batch.last_seq == last_seq
            && batch.n_events == n_events
            && batch.uncompressed_bytes == raw_bytes;
        match batch::decode(&batch) {
            Ok(decoded) => {
                prop_assert!(expect_ok, "accepted a header that does not match: {:?}", batch);
                prop_assert_eq!(decoded, events);
            }
            Err(error) => prop_assert!(!expect_ok, "refused a matching header: {}", error),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..2048)) {
        assert_hostile_decode::<AgentMessage>(&bytes)?;
        assert_hostile_decode::<AggregatorMessage>(&bytes)?;
        assert_hostile_decode::<BatchMessage>(&bytes)?;
        assert_hostile_decode::<AckMessage>(&bytes)?;
        assert_hostile_decode::<Event>(&bytes)?;
    }

    /// Arbitrary bytes mostly fail at the first tag; flipping bytes of valid frames reaches the
    /// decoder's deeper paths (lengths, options, nested enums, UTF-8).
    #[test]
    fn decoding_corrupted_frames_never_panics(
        agent in agent_message(),
        aggregator in aggregator_message(),
        batch in batch_message(),
        ack in ack_message(),
        corruptions in vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let frames = [
            frame::encode(&agent, MAX_FRAME_BYTES),
            frame::encode(&aggregator, MAX_FRAME_BYTES),
            frame::encode(&batch, MAX_FRAME_BYTES),
            frame::encode(&ack, MAX_FRAME_BYTES),
        ];
        for bytes in frames {
            let mut bytes = bytes.map_err(|error| fail("encode", error))?;
            // Leave the prefix alone so the payload is what gets decoded.
            let payload = &mut bytes[LENGTH_PREFIX_BYTES..];
            if payload.is_empty() {
                continue;
            }
            for (idx, xor) in &corruptions {
                payload[idx.index(payload.len())] ^= xor;
            }
            assert_hostile_decode::<AgentMessage>(payload)?;
            assert_hostile_decode::<AggregatorMessage>(payload)?;
            assert_hostile_decode::<BatchMessage>(payload)?;
            assert_hostile_decode::<AckMessage>(payload)?;
        }
    }

    #[test]
    fn decoding_arbitrary_batches_never_panics(batch in arbitrary_batch()) {
        if let Ok(events) = batch::decode(&batch) {
            assert_decoded_batch_is_consistent(&batch, &events)?;
        }
    }

    /// Valid zstd around arbitrary bytes gets past decompression into postcard and the checks.
    #[test]
    fn decoding_batches_of_arbitrary_raw_bytes_never_panics(
        raw in vec(any::<u8>(), 0..2048),
        compression in compression(),
        after_seq in prop_oneof![Just(0u64), any::<u64>()],
        last_seq in any::<u64>(),
        n_events in prop_oneof![1u32..4, any::<u32>()],
    ) {
        let payload = match compression {
            Compression::None => raw.clone(),
            Compression::Zstd | Compression::ZstdColumns | Compression::ZstdColumns2 => {
                zstd::bulk::compress(&raw, 1).map_err(|error| fail("zstd", error))?
            }
        };
        let batch = Batch {
            after_seq,
            last_seq,
            n_events,
            uncompressed_bytes: u32::try_from(raw.len()).expect("small"),
            compression,
            payload,
        };
        if let Ok(events) = batch::decode(&batch) {
            assert_decoded_batch_is_consistent(&batch, &events)?;
        }
    }

    /// Corrupted event payloads, behind a header that matches their size.
    #[test]
    fn decoding_corrupted_batch_payloads_never_panics(
        (after_seq, events) in event_chain(),
        corruptions in vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let last_seq = events.last().map(|event| event.seq).unwrap_or_default();
        let n_events = u32::try_from(events.len()).expect("small chain");
        let mut batch = uncompressed_batch(after_seq, last_seq, n_events, &events);
        for (idx, xor) in &corruptions {
            let n_bytes = batch.payload.len();
            batch.payload[idx.index(n_bytes)] ^= xor;
        }
        if let Ok(events) = batch::decode(&batch) {
            assert_decoded_batch_is_consistent(&batch, &events)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile cases.

#[test]
fn oversized_length_prefix_is_refused_before_the_payload_arrives() {
    let max_bytes = MAX_CONTROL_FRAME_BYTES;
    let announced = u32::try_from(max_bytes + 1).expect("fits");
    // Only the prefix: a reader must be able to refuse before reading or allocating the payload.
    let prefix = announced.to_le_bytes();
    assert_eq!(
        frame::payload_len(prefix, max_bytes),
        Err(FrameError::TooLarge {
            n_bytes: max_bytes + 1,
            max_bytes
        })
    );
    assert_eq!(
        frame::decode::<AgentMessage>(&prefix, max_bytes),
        Err(FrameError::TooLarge {
            n_bytes: max_bytes + 1,
            max_bytes
        })
    );
    assert_eq!(
        frame::decode::<BatchMessage>(&u32::MAX.to_le_bytes(), MAX_FRAME_BYTES),
        Err(FrameError::TooLarge {
            n_bytes: u32::MAX as usize,
            max_bytes: MAX_FRAME_BYTES
        })
    );
    // Exactly at the limit is allowed.
    assert_eq!(
        frame::payload_len(
            u32::try_from(max_bytes).expect("fits").to_le_bytes(),
            max_bytes
        ),
        Ok(max_bytes)
    );
}

#[test]
fn encoding_a_message_over_the_limit_fails() {
    let message = AggregatorMessage::Refused {
        reason: "x".repeat(100),
    };
    let encoded_len = frame::encode(&message, MAX_CONTROL_FRAME_BYTES)
        .expect("fits")
        .len();
    let n_payload = encoded_len - LENGTH_PREFIX_BYTES;
    assert_eq!(
        frame::encode(&message, n_payload - 1),
        Err(FrameError::TooLarge {
            n_bytes: n_payload,
            max_bytes: n_payload - 1
        })
    );
    assert!(
        frame::encode(&message, n_payload).is_ok(),
        "exactly at the limit is allowed"
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let message = AckMessage::Ack(Ack {
        last_seq: 42,
        outcome: AckOutcome::Duplicate,
    });
    let bytes = frame::encode(&message, MAX_CONTROL_FRAME_BYTES).expect("encodes");

    // Bytes after a complete frame.
    let mut after_frame = bytes.clone();
    after_frame.extend_from_slice(&[0, 0]);
    assert_eq!(
        frame::decode::<AckMessage>(&after_frame, MAX_CONTROL_FRAME_BYTES),
        Err(FrameError::Trailing { n_trailing: 2 })
    );

    // A prefix that covers a byte the message does not use.
    let mut padded_payload = bytes[LENGTH_PREFIX_BYTES..].to_vec();
    padded_payload.push(0);
    assert_eq!(
        frame::decode_payload::<AckMessage>(&padded_payload),
        Err(FrameError::Trailing { n_trailing: 1 })
    );
    let mut padded_frame = u32::try_from(padded_payload.len())
        .expect("small")
        .to_le_bytes()
        .to_vec();
    padded_frame.extend_from_slice(&padded_payload);
    assert_eq!(
        frame::decode::<AckMessage>(&padded_frame, MAX_CONTROL_FRAME_BYTES),
        Err(FrameError::Trailing { n_trailing: 1 })
    );
}

#[test]
fn short_frames_are_refused() {
    for bytes in [&[][..], &[1], &[1, 0, 0]] {
        assert!(
            matches!(
                frame::decode::<AckMessage>(bytes, MAX_CONTROL_FRAME_BYTES),
                Err(FrameError::Decode(_))
            ),
            "{bytes:?}"
        );
    }
    // Prefix announces 10 bytes, 3 present.
    assert!(matches!(
        frame::decode::<AckMessage>(&[10, 0, 0, 0, 0, 1, 2], MAX_CONTROL_FRAME_BYTES),
        Err(FrameError::Decode(_))
    ));
    // Announces 0 bytes: an empty payload is not a message.
    assert!(matches!(
        frame::decode::<AckMessage>(&[0, 0, 0, 0], MAX_CONTROL_FRAME_BYTES),
        Err(FrameError::Decode(_))
    ));
}

#[test]
fn unknown_enum_variants_are_refused() {
    // Variant index 5 does not exist in AgentMessage (Hello = 0, Heartbeat = 1, Status = 2,
    // ConfigResult = 3, Resume = 4): a newer peer's message must fail to decode, not be misread
    // as another variant. The same for AggregatorMessage (Welcome, Refused, ConfigPush).
    assert!(matches!(
        frame::decode_payload::<AgentMessage>(&[5, 0]),
        Err(FrameError::Decode(_))
    ));
    assert!(matches!(
        frame::decode_payload::<AggregatorMessage>(&[3]),
        Err(FrameError::Decode(_))
    ));
    assert!(matches!(
        frame::decode_payload::<BatchMessage>(&[1]),
        Err(FrameError::Decode(_))
    ));
    // Ack { last_seq: 1, outcome: variant 3 }.
    assert!(matches!(
        frame::decode_payload::<AckMessage>(&[0, 1, 3]),
        Err(FrameError::Decode(_))
    ));
}

#[test]
fn zstd_bomb_is_refused() {
    // One byte more than the largest batch, declared as exactly the largest batch.
    let zeros = vec![0u8; MAX_BATCH_BYTES + 1];
    let payload = zstd::bulk::compress(&zeros, 1).expect("zstd compresses");
    drop(zeros);
    assert!(
        payload.len() < 64 * 1024,
        "zeros compress to {} bytes",
        payload.len()
    );
    let bomb = Batch {
        after_seq: 0,
        last_seq: 1,
        n_events: 1,
        uncompressed_bytes: u32::try_from(MAX_BATCH_BYTES).expect("fits"),
        compression: Compression::Zstd,
        payload,
    };
    let result = batch::decode(&bomb);
    assert!(
        matches!(result, Err(BatchError::Decompress(_))),
        "{result:?}"
    );
}

#[test]
fn payload_larger_than_declared_is_refused() {
    let events = test_events(&[1, 2, 3]);
    let mut batch = batch::encode(0, &events).expect("valid batch");
    batch.uncompressed_bytes -= 1;
    let result = batch::decode(&batch);
    assert!(
        matches!(result, Err(BatchError::Decompress(_))),
        "{result:?}"
    );

    let mut batch = uncompressed_batch(0, 3, 3, &events);
    batch.uncompressed_bytes -= 1;
    let result = batch::decode(&batch);
    assert!(
        matches!(result, Err(BatchError::HeaderMismatch { .. })),
        "{result:?}"
    );
}

#[test]
fn payload_smaller_than_declared_is_refused() {
    let events = test_events(&[1, 2, 3]);
    for mut batch in [
        batch::encode(0, &events).expect("valid batch"),
        uncompressed_batch(0, 3, 3, &events),
    ] {
        batch.uncompressed_bytes += 1;
        let result = batch::decode(&batch);
        assert!(
            matches!(result, Err(BatchError::HeaderMismatch { .. })),
            "{result:?}"
        );
    }
}

#[test]
fn declared_size_over_the_limit_is_refused_before_decompressing() {
    // The payload is not zstd at all: if the decoder tried to decompress it, the error would be
    // `Decompress`, so `TooLarge` shows the check came first.
    for uncompressed_bytes in [MAX_BATCH_BYTES as u32 + 1, u32::MAX] {
        let batch = Batch {
            after_seq: 0,
            last_seq: 1,
            n_events: 1,
            uncompressed_bytes,
            compression: Compression::Zstd,
            payload: b"not zstd".to_vec(),
        };
        assert_eq!(
            batch::decode(&batch),
            Err(BatchError::TooLarge {
                n_bytes: uncompressed_bytes as usize,
                max_bytes: MAX_BATCH_BYTES
            })
        );
    }
}

#[test]
fn too_many_events_are_refused() {
    let batch = Batch {
        after_seq: 0,
        last_seq: MAX_BATCH_EVENTS as u64 + 1,
        n_events: MAX_BATCH_EVENTS as u32 + 1,
        uncompressed_bytes: 8,
        compression: Compression::Zstd,
        payload: b"not zstd".to_vec(),
    };
    assert_eq!(
        batch::decode(&batch),
        Err(BatchError::TooManyEvents {
            n_events: MAX_BATCH_EVENTS + 1,
            max_events: MAX_BATCH_EVENTS
        })
    );

    let seqs: Vec<u64> = (1..=MAX_BATCH_EVENTS as u64 + 1).collect();
    assert_eq!(
        batch::encode(0, &test_events(&seqs)),
        Err(BatchError::TooManyEvents {
            n_events: MAX_BATCH_EVENTS + 1,
            max_events: MAX_BATCH_EVENTS
        })
    );
}

#[test]
fn events_out_of_order_are_refused() {
    // (after_seq, seqs, index of the first bad event, the seq it must exceed)
    let cases: &[(u64, &[u64], usize, u64)] = &[
        (0, &[2, 1], 1, 2),
        (0, &[1, 3, 3], 2, 3),
        (10, &[10, 11], 0, 10),
        (10, &[5, 11], 0, 10),
        (10, &[11, 12, 9], 2, 12),
    ];
    for &(after_seq, seqs, event_idx, previous) in cases {
        let events = test_events(seqs);
        let expected = || BatchError::OutOfOrder {
            after_seq: previous,
            event_idx,
            seq: seqs[event_idx],
        };
        assert_eq!(
            batch::encode(after_seq, &events),
            Err(expected()),
            "encode {after_seq} {seqs:?}"
        );

        let last_seq = *seqs.last().expect("non-empty");
        let n_events = u32::try_from(seqs.len()).expect("small");
        assert_eq!(
            batch::decode(&uncompressed_batch(after_seq, last_seq, n_events, &events)),
            Err(expected()),
            "decode uncompressed {after_seq} {seqs:?}"
        );
        assert_eq!(
            batch::decode(&zstd_batch(after_seq, last_seq, n_events, &events)),
            Err(expected()),
            "decode zstd {after_seq} {seqs:?}"
        );
    }
}

#[test]
fn header_mismatches_are_refused() {
    let events = test_events(&[5, 6, 9]);
    let good = zstd_batch(4, 9, 3, &events);
    assert_eq!(batch::decode(&good), Ok(events.clone()));

    for (what, batch) in [
        (
            "n_events too low",
            Batch {
                n_events: 2,
                ..good.clone()
            },
        ),
        (
            "n_events too high",
            Batch {
                n_events: 4,
                ..good.clone()
            },
        ),
        (
            "last_seq too low",
            Batch {
                last_seq: 8,
                ..good.clone()
            },
        ),
        (
            "last_seq too high",
            Batch {
                last_seq: 10,
                ..good.clone()
            },
        ),
        (
            "last_seq of the first event",
            Batch {
                last_seq: 5,
                ..good.clone()
            },
        ),
    ] {
        let result = batch::decode(&batch);
        assert!(
            matches!(result, Err(BatchError::HeaderMismatch { .. })),
            "{what}: {result:?}"
        );
    }
}

#[test]
fn empty_batches_are_refused() {
    assert_eq!(batch::encode(0, &[]), Err(BatchError::Empty));

    let good = zstd_batch(0, 1, 1, &test_events(&[1]));
    assert_eq!(
        batch::decode(&Batch {
            n_events: 0,
            ..good
        }),
        Err(BatchError::Empty)
    );

    // A header that claims an event over a payload holding none.
    for batch in [uncompressed_batch(0, 0, 1, &[]), zstd_batch(0, 0, 1, &[])] {
        let result = batch::decode(&batch);
        assert!(
            matches!(result, Err(BatchError::HeaderMismatch { .. })),
            "{result:?}"
        );
    }
}

#[test]
fn garbage_payloads_are_refused() {
    let not_zstd = Batch {
        after_seq: 0,
        last_seq: 1,
        n_events: 1,
        uncompressed_bytes: 8,
        compression: Compression::Zstd,
        payload: b"not zstd".to_vec(),
    };
    let result = batch::decode(&not_zstd);
    assert!(
        matches!(result, Err(BatchError::Decompress(_))),
        "{result:?}"
    );

    // One event announced, then the payload stops.
    let truncated = Batch {
        compression: Compression::None,
        payload: vec![1, 1],
        uncompressed_bytes: 2,
        ..not_zstd
    };
    let result = batch::decode(&truncated);
    assert!(matches!(result, Err(BatchError::Decode(_))), "{result:?}");
}

/// Regression: a payload announcing more events than the header must be refused before the
/// events are decoded (decoded events are ~20x their encoding: memory amplification).
#[test]
fn announced_count_is_checked_before_decoding() {
    let mut raw = Vec::new();
    raw.extend_from_slice(&postcard::to_stdvec(&1_398_100u64).unwrap());
    for _ in 0..1_398_100 {
        raw.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
    let payload = zstd::bulk::compress(&raw, 3).unwrap();
    let batch = Batch {
        after_seq: 0,
        last_seq: 1,
        n_events: 1,
        uncompressed_bytes: raw.len() as u32,
        compression: Compression::Zstd,
        payload,
    };
    assert!(matches!(
        batch::decode(&batch),
        Err(BatchError::HeaderMismatch { .. })
    ));
}

/// Regression: bytes after the events are refused, as they are after a frame.
#[test]
fn trailing_bytes_in_batch_payload_are_refused() {
    let mut payload = vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    payload.extend_from_slice(b"smuggled");
    let batch = Batch {
        after_seq: 0,
        last_seq: 1,
        n_events: 1,
        uncompressed_bytes: payload.len() as u32,
        compression: Compression::None,
        payload,
    };
    assert!(matches!(batch::decode(&batch), Err(BatchError::Decode(_))));
}
