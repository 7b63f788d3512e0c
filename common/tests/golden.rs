//! Golden byte fixtures for the wire format.
//!
//! Postcard is not self-describing: a reordered enum variant or a changed field type still
//! decodes, into the wrong value. Each test here builds one fixed message, encodes it and
//! compares the bytes with a committed file under `tests/golden/`, then decodes the committed
//! file and compares it with the message. A failure means the bytes on the wire changed.
//!
//! To regenerate after an intended, compatible change (a variant appended at the end of an
//! enum): `RUNNEL_UPDATE_GOLDEN=1 cargo test -p runnel-common --test golden`, then review and
//! commit the files. Fixtures are deterministic: the batch fixture uses `Compression::None`,
//! because zstd output may change between library versions.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;

use runnel_common::batch;
use runnel_common::columnar::{self, Layout};
use runnel_common::frame;
use runnel_common::limits::MAX_FRAME_BYTES;
use runnel_common::wire::{
    Ack, AckMessage, AckOutcome, AgentMessage, AggregatorMessage, Batch, BatchMessage,
    ComponentHealth, Compression, ConfigFile, ConfigOutcome, ConfigPush, ConfigResult, Heartbeat,
    Hello, Resume, Status, Welcome,
};
use runnel_common::{Event, SourceKind, Value};

const UPDATE_ENV: &str = "RUNNEL_UPDATE_GOLDEN";

const FORMAT_RULES: &str = "The wire format changed. Postcard is not self-describing, so \
     deployed agents and aggregators would misread these bytes. Never reorder or remove enum \
     variants or struct fields; append new variants at the end only, and bump PROTOCOL_VERSION \
     when a peer must know (see the docs of common/src/wire.rs). If the change is intended and \
     compatible, regenerate with `RUNNEL_UPDATE_GOLDEN=1 cargo test -p runnel-common --test \
     golden` and commit the fixture together with the change.";

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.bin"))
}

fn updating() -> bool {
    std::env::var_os(UPDATE_ENV).is_some_and(|value| value == "1")
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compares `encoded` with the committed fixture `name` (or rewrites it when updating), then
/// decodes the committed bytes with `decode` and compares the result with `message`.
fn check_fixture<T, E>(
    name: &str,
    message: &T,
    encoded: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
) where
    T: PartialEq + Debug,
    E: Debug,
{
    let path = fixture_path(name);
    if updating() {
        std::fs::create_dir_all(path.parent().expect("fixture has a directory"))
            .unwrap_or_else(|error| panic!("create {}: {error}", path.display()));
        std::fs::write(&path, encoded)
            .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
    }
    let committed = std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "golden fixture {name} ({}) cannot be read: {error}. Generate it with \
             `{UPDATE_ENV}=1 cargo test -p runnel-common --test golden` and commit it.",
            path.display()
        )
    });
    if committed != encoded {
        let first_difference = committed
            .iter()
            .zip(encoded)
            .position(|(committed, encoded)| committed != encoded)
            .unwrap_or(committed.len().min(encoded.len()));
        panic!(
            "golden fixture {name} changed ({}): the encoding differs from the committed bytes \
             at byte {first_difference}.\n committed ({} bytes): {}\n   encoded ({} bytes): {}\n{FORMAT_RULES}",
            path.display(),
            committed.len(),
            hex(&committed),
            encoded.len(),
            hex(encoded),
        );
    }
    match decode(&committed) {
        Ok(decoded) => assert!(
            decoded == *message,
            "golden fixture {name} ({}) decodes to a different message.\n  decoded: {decoded:?}\n expected: \
             {message:?}\n{FORMAT_RULES}",
            path.display()
        ),
        Err(error) => panic!(
            "golden fixture {name} ({}) no longer decodes: {error:?}\n{FORMAT_RULES}",
            path.display()
        ),
    }
}

/// A framed wire message: encoded with `frame::encode`, decoded with `frame::decode`.
fn check_frame_fixture<T>(name: &str, message: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let encoded = frame::encode(message, MAX_FRAME_BYTES)
        .unwrap_or_else(|error| panic!("golden fixture {name}: message does not encode: {error}"));
    check_fixture(name, message, &encoded, |bytes| {
        frame::decode::<T>(bytes, MAX_FRAME_BYTES)
    });
}

// ---------------------------------------------------------------------------------------------
// The fixed messages. Change them only together with their fixtures.

/// Every field set, every `Value` variant present, multi-byte UTF-8, and floats that are exact in
/// binary so the fixture does not depend on float formatting.
fn full_event() -> Event {
    Event {
        seq: 300,
        event_time_ms: 1_700_000_000_123,
        receive_time_ms: -5,
        source: SourceKind::Segment,
        stream: "clickstream".into(),
        name: "add_to_cart".into(),
        event_id: Some("eid-1".into()),
        user_id: Some("user-é".into()),
        session_id: Some("s1".into()),
        score: Some(0.75),
        tags: vec!["a".into(), "bb".into()],
        attrs: BTreeMap::from([
            ("bool".to_string(), Value::Bool(true)),
            ("bytes".to_string(), Value::Bytes(vec![0, 1, 255])),
            ("float".to_string(), Value::Float(-2.5)),
            ("int".to_string(), Value::Int(-129)),
            ("json".to_string(), Value::Json(r#"{"k":[1,2]}"#.into())),
            ("null".to_string(), Value::Null),
            ("string".to_string(), Value::String("v".into())),
        ]),
    }
}

/// Optional fields empty, a different source kind: the other encoding of each `Option`.
fn sparse_event() -> Event {
    Event {
        seq: 301,
        event_time_ms: 0,
        receive_time_ms: 1,
        source: SourceKind::Internal,
        stream: "alerts".into(),
        name: "rule".into(),
        event_id: None,
        user_id: None,
        session_id: None,
        score: None,
        tags: Vec::new(),
        attrs: BTreeMap::new(),
    }
}

fn hello() -> AgentMessage {
    AgentMessage::Hello(Hello {
        // Literal versions: the fixture pins bytes, and a version bump must not move them.
        min_protocol_version: 1,
        max_protocol_version: 1,
        agent_version: "0.1.0".into(),
        config_hash: "abc123".into(),
        labels: BTreeMap::from([
            ("region".to_string(), "eu-west".to_string()),
            ("site".to_string(), "store-7".to_string()),
        ]),
        last_assigned_seq: 1_000_000,
    })
}

fn resume() -> AgentMessage {
    // Above one byte of varint, so the fixture pins the integer's encoding too.
    AgentMessage::Resume(Resume {
        delivered_seq: 1_000_000,
    })
}

fn heartbeat() -> AgentMessage {
    AgentMessage::Heartbeat(Heartbeat {
        n_buffered_events: 12,
        buffered_bytes: 4096,
        oldest_unshipped_age_ms: 250,
        n_dropped_events: 3,
    })
}

fn status() -> AgentMessage {
    AgentMessage::Status(Status {
        config_hash: "e3b0c442".into(),
        config_version: 7,
        agent_version: "0.1.0".into(),
        components: vec![
            ComponentHealth {
                name: "buffer".into(),
                healthy: true,
                detail: String::new(),
            },
            ComponentHealth {
                name: "uplink".into(),
                healthy: false,
                detail: "reconnecting".into(),
            },
        ],
        n_buffered_events: 12,
        buffered_bytes: 4096,
        oldest_unshipped_age_ms: 250,
        drops: BTreeMap::from([("buffer_full_drop_newest".to_string(), 3)]),
        counters: BTreeMap::from([("events_received".to_string(), 1_000)]),
    })
}

fn config_result(outcome: ConfigOutcome) -> AgentMessage {
    AgentMessage::ConfigResult(ConfigResult {
        version: 7,
        hash: "9f86d081".into(),
        outcome,
    })
}

fn config_push() -> AggregatorMessage {
    AggregatorMessage::ConfigPush(ConfigPush {
        version: 7,
        hash: "9f86d081".into(),
        document: "[[rules]]\nname = \"x\"\n".into(),
        files: vec![ConfigFile {
            name: "fraud.onnx".into(),
            sha256: "ab12".into(),
            content: vec![0, 1, 2, 255],
        }],
    })
}

fn welcome() -> AggregatorMessage {
    AggregatorMessage::Welcome(Welcome {
        protocol_version: 1,
        high_water_mark: 299,
        max_in_flight_batches: 4,
        heartbeat_interval_ms: 10_000,
        agent_id: "agent-42".into(),
        aggregator_version: "0.1.0".into(),
    })
}

fn refused() -> AggregatorMessage {
    AggregatorMessage::Refused {
        reason: "certificate revoked".into(),
    }
}

fn batch_events() -> Vec<Event> {
    vec![full_event(), sparse_event()]
}

fn batch() -> BatchMessage {
    // Built by hand rather than with `batch::encode`, which always compresses with zstd.
    let payload = postcard::to_stdvec(&batch_events()).expect("events encode");
    BatchMessage::Batch(Batch {
        after_seq: 299,
        last_seq: 301,
        n_events: 2,
        uncompressed_bytes: u32::try_from(payload.len()).expect("small payload"),
        compression: Compression::None,
        payload,
    })
}

fn ack(outcome: AckOutcome) -> AckMessage {
    AckMessage::Ack(Ack {
        last_seq: 301,
        outcome,
    })
}

// ---------------------------------------------------------------------------------------------
// One test per fixture, so a failure names the message kind that moved.

#[test]
fn golden_event() {
    let event = full_event();
    let encoded = postcard::to_stdvec(&event).expect("event encodes");
    check_fixture("event", &event, &encoded, frame::decode_payload::<Event>);
}

#[test]
fn golden_hello() {
    check_frame_fixture("hello", &hello());
}

#[test]
fn golden_resume() {
    check_frame_fixture("resume", &resume());
}

#[test]
fn golden_heartbeat() {
    check_frame_fixture("heartbeat", &heartbeat());
}

#[test]
fn golden_status() {
    check_frame_fixture("status", &status());
}

#[test]
fn golden_config_result_applied() {
    check_frame_fixture(
        "config_result_applied",
        &config_result(ConfigOutcome::Applied),
    );
}

#[test]
fn golden_config_result_failed() {
    check_frame_fixture(
        "config_result_failed",
        &config_result(ConfigOutcome::Failed {
            error: "model fraud.onnx: sha256 mismatch".into(),
        }),
    );
}

#[test]
fn golden_config_push() {
    check_frame_fixture("config_push", &config_push());
}

#[test]
fn golden_welcome() {
    check_frame_fixture("welcome", &welcome());
}

#[test]
fn golden_refused() {
    check_frame_fixture("refused", &refused());
}

#[test]
fn golden_batch() {
    let message = batch();
    check_frame_fixture("batch", &message);
    // The committed batch is also a valid batch: its payload decodes to the two events.
    let committed = std::fs::read(fixture_path("batch")).expect("checked above");
    let BatchMessage::Batch(received) =
        frame::decode::<BatchMessage>(&committed, MAX_FRAME_BYTES).expect("checked above");
    assert_eq!(
        batch::decode(&received),
        Ok(batch_events()),
        "golden fixture batch: payload no longer decodes to its events.\n{FORMAT_RULES}"
    );
}

/// The column-wise layout before zstd (zstd's own bytes may change between library versions):
/// the postcard bytes of the transposed batch.
#[test]
fn golden_batch_columns() {
    let events = batch_events();
    let encoded = columnar::encode(Layout::V1, 299, &events).expect("events encode");
    check_fixture("batch_columns", &events, &encoded.bytes, |bytes| {
        columnar::decode(Layout::V1, bytes, 299, 2)
    });
}

/// The second column-wise layout (protocol 3) before zstd, with events that take each of its
/// compact forms: version-4 UUIDs and hex ids in the side section, numbered text; every
/// `Value` variant rides along as attributes.
#[test]
fn golden_batch_columns2() {
    let mut events = vec![sparse_event()];
    for (seq, uuid, session, user, url) in [
        (
            302,
            "0f8e6a7c-1d2b-4c3d-9e8f-a1b2c3d4e5f6",
            "00112233aabbccdd",
            "u-000001",
            "https://shop.example.com/shoes/p-00042",
        ),
        (
            303,
            "6ba7b810-9dad-41d1-80b4-00c04fd430c8",
            "ffeeddcc44332211",
            "u-000002",
            "https://shop.example.com/shoes/p-00043",
        ),
    ] {
        let mut event = Event::new(
            SourceKind::Http,
            "clickstream",
            "page_view",
            1_700_000_000_000,
        );
        event.seq = seq;
        event.receive_time_ms += 7;
        event.event_id = Some(uuid.into());
        event.session_id = Some(session.into());
        event.user_id = Some(user.into());
        event.attrs = full_event().attrs;
        event.attrs.insert("url".into(), Value::String(url.into()));
        events.push(event);
    }
    let encoded = columnar::encode(Layout::V2, 299, &events).expect("events encode");
    assert!(
        encoded.side_at < encoded.bytes.len(),
        "ids in the side section"
    );
    check_fixture("batch_columns2", &events, &encoded.bytes, |bytes| {
        columnar::decode(Layout::V2, bytes, 299, 3)
    });
}

#[test]
fn golden_ack_stored() {
    check_frame_fixture("ack_stored", &ack(AckOutcome::Stored { n_new: 2 }));
}

#[test]
fn golden_ack_duplicate() {
    check_frame_fixture("ack_duplicate", &ack(AckOutcome::Duplicate));
}

#[test]
fn golden_ack_rejected() {
    check_frame_fixture(
        "ack_rejected",
        &ack(AckOutcome::Rejected {
            reason: "disk full".into(),
        }),
    );
}

/// Every committed fixture is checked by a test above: a fixture left behind after its test was
/// removed would look like coverage it no longer gives.
#[test]
fn every_fixture_has_a_test() {
    const CHECKED: &[&str] = &[
        "ack_duplicate",
        "ack_rejected",
        "ack_stored",
        "batch",
        "batch_columns",
        "batch_columns2",
        "config_push",
        "config_result_applied",
        "config_result_failed",
        "event",
        "heartbeat",
        "hello",
        "refused",
        "resume",
        "status",
        "welcome",
    ];
    let dir = fixture_path("x")
        .parent()
        .expect("fixture has a directory")
        .to_path_buf();
    if updating() {
        // The other tests may not have created the directory or written their files yet.
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|error| panic!("create {}: {error}", dir.display()));
    }
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("read {}: {error}", dir.display()))
        .map(|entry| {
            entry
                .expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".bin"))
        .collect();
    found.sort();
    let expected: Vec<String> = CHECKED.iter().map(|name| format!("{name}.bin")).collect();
    let unexpected: Vec<&String> = found
        .iter()
        .filter(|name| !expected.contains(name))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{} holds fixtures no test checks: {unexpected:?}; delete them or add their tests",
        dir.display()
    );
    if !updating() {
        assert_eq!(
            found,
            expected,
            "fixtures in {} and the tests in golden.rs disagree",
            dir.display()
        );
    }
}
