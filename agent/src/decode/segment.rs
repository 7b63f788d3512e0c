//! Segment HTTP Tracking API: request bodies of `POST /v1/{track,page,screen,identify,group,
//! alias,batch}` (and the browsers' short paths `/v1/{t,p,s,i,g,a}`, and the old `/v1/import`)
//! -> [`Event`]s. Pure: no I/O, no clock; the caller routes, reads the body and checks the write
//! key this module finds.
//!
//! Like Segment, a request is all or nothing: any bad message fails the whole request with a
//! [`DecodeError`] the caller answers with HTTP 400. Nothing here becomes a dead letter, because
//! the sender is still there to be told.
//!
//! | Segment field                                   | event                                  |
//! |-------------------------------------------------|----------------------------------------|
//! | path, or `type` in a batch                      | attr `type` (`track`, `page`, ...)     |
//! | `event` (track), else the call type             | `name`                                 |
//! | `messageId`                                     | `event_id`                             |
//! | `userId`, else `anonymousId`                    | `user_id`                              |
//! | `anonymousId`                                   | attr `anonymous_id`                    |
//! | `context.sessionId`, else `properties.session_id` | `session_id` (stays in the JSON too) |
//! | `timestamp`, else skew-corrected `originalTimestamp` | `event_time_ms`                   |
//! | `originalTimestamp`, `sentAt`                   | attrs `original_timestamp`, `sent_at`  |
//! | receive time                                    | attr `received_at` (RFC 3339, UTC)     |
//! | `name`, `category` (page)                       | attrs `page_name`, `page_category`     |
//! | `name` (screen)                                 | attr `screen_name`                     |
//! | `groupId` (group), `previousId` (alias)         | attrs `group_id`, `previous_id`        |
//! | `properties`, `traits`, `context`, `integrations`, any other key | attr of the same name |
//! | `writeKey`                                      | [`Decoded::write_key`], never an attr  |
//!
//! Must not: check the write key (the caller's job), read the clock, or store the write key.

use crate::decode::json::kind;
use std::collections::BTreeMap;

use base64::Engine as _;
use runnel_common::{Event, SourceKind, Value};
use serde_json::{Map, Value as Json};

use super::Received;
use super::json::{parse_time, to_value};

/// One message (a single call's body, or one item of a batch as JSON text) at most: Segment's
/// documented limit, so a client that works against Segment works here.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// One batch request body at most: Segment's documented limit.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
const _: () = assert!(MAX_EVENT_BYTES < MAX_BATCH_BYTES);

/// Which Segment call a request or a batch item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Track,
    Page,
    Screen,
    Identify,
    Group,
    Alias,
    Batch,
}

impl Call {
    /// From the path segment after `/v1/`: the full names, the browsers' one-letter short paths,
    /// and `import` (an old alias of `batch`). `None` for anything else.
    pub fn from_path(segment: &str) -> Option<Call> {
        Some(match segment {
            "track" | "t" => Call::Track,
            "page" | "p" => Call::Page,
            "screen" | "s" => Call::Screen,
            "identify" | "i" => Call::Identify,
            "group" | "g" => Call::Group,
            "alias" | "a" => Call::Alias,
            "batch" | "import" => Call::Batch,
            _ => return None,
        })
    }

    /// From a batch item's `type`: the full names of single calls only.
    fn from_type(text: &str) -> Option<Call> {
        Some(match text {
            "track" => Call::Track,
            "page" => Call::Page,
            "screen" => Call::Screen,
            "identify" => Call::Identify,
            "group" => Call::Group,
            "alias" => Call::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Call::Track => "track",
            Call::Page => "page",
            Call::Screen => "screen",
            Call::Identify => "identify",
            Call::Group => "group",
            Call::Alias => "alias",
            Call::Batch => "batch",
        }
    }
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// One event per message, in request order.
    pub events: Vec<Event>,
    /// The write key found: the Basic auth user name, else the body's top-level `writeKey`.
    /// Checking it is the caller's job.
    pub write_key: Option<String>,
}

/// Why a request was refused (answered with HTTP 400 and this message). `message_idx` is the
/// message's position in the batch, 0 for a single call.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("batch is {n_bytes} bytes, over Segment's 500 KB limit")]
    BatchTooLarge { n_bytes: usize },
    #[error("message {message_idx} is {n_bytes} bytes, over Segment's 32 KB limit")]
    MessageTooLarge { message_idx: usize, n_bytes: usize },
    #[error("invalid JSON: {0}")]
    Syntax(String),
    #[error("expected a JSON object, found {found}")]
    NotAnObject { found: &'static str },
    #[error("field `{key}` {problem}")]
    Envelope { key: &'static str, problem: String },
    #[error("`batch` is empty: send at least one message")]
    EmptyBatch,
    #[error("message {message_idx}: expected a JSON object, found {found}")]
    MessageNotAnObject {
        message_idx: usize,
        found: &'static str,
    },
    #[error(
        "message {message_idx}: `type` is required in a batch: track, page, screen, identify, \
         group or alias"
    )]
    MissingType { message_idx: usize },
    #[error(
        "message {message_idx}: unknown type {found}: expected track, page, screen, identify, \
         group or alias"
    )]
    UnknownType { message_idx: usize, found: String },
    #[error("message {message_idx}: needs a `userId` or an `anonymousId`")]
    MissingUserId { message_idx: usize },
    #[error("message {message_idx}: field `{key}` {problem}")]
    Field {
        message_idx: usize,
        key: &'static str,
        problem: String,
    },
    #[error("Authorization header: {0}; expected `Basic base64(writeKey:)`")]
    Authorization(&'static str),
}

/// Decodes one request. `authorization` is the raw `Authorization` header value, if any.
pub fn decode(
    call: Call,
    body: &[u8],
    authorization: Option<&str>,
    received: &Received,
) -> Result<Decoded, DecodeError> {
    let header_write_key = authorization
        .map(write_key_from_basic)
        .transpose()?
        .flatten();
    // Size before parsing: parsing is the expensive part a hostile body would aim at.
    if call == Call::Batch {
        if body.len() > MAX_BATCH_BYTES {
            return Err(DecodeError::BatchTooLarge {
                n_bytes: body.len(),
            });
        }
    } else if body.len() > MAX_EVENT_BYTES {
        return Err(DecodeError::MessageTooLarge {
            message_idx: 0,
            n_bytes: body.len(),
        });
    }
    let mut top = match serde_json::from_slice::<Json>(body) {
        Ok(Json::Object(object)) => object,
        Ok(other) => {
            return Err(DecodeError::NotAnObject {
                found: kind(&other),
            });
        }
        Err(error) => return Err(DecodeError::Syntax(error.to_string())),
    };
    let body_write_key = match top.remove("writeKey") {
        None | Some(Json::Null) => None,
        Some(Json::String(key)) => Some(key).filter(|key| !key.is_empty()),
        Some(other) => {
            return Err(DecodeError::Envelope {
                key: "writeKey",
                problem: format!("must be a string, found {}", kind(&other)),
            });
        }
    };
    let write_key = header_write_key.or(body_write_key);

    let events = if call == Call::Batch {
        decode_batch(top, received)?
    } else {
        vec![message_to_event(
            Some(call),
            top,
            0,
            &BatchDefaults::default(),
            received,
        )?]
    };
    Ok(Decoded { events, write_key })
}

/// What a batch's top level gives every item.
#[derive(Default)]
struct BatchDefaults {
    context: Option<Map<String, Json>>,
    integrations: Option<Map<String, Json>>,
    sent_at: Option<Json>,
}

fn decode_batch(
    mut top: Map<String, Json>,
    received: &Received,
) -> Result<Vec<Event>, DecodeError> {
    let items = match top.remove("batch") {
        Some(Json::Array(items)) => items,
        None => {
            return Err(DecodeError::Envelope {
                key: "batch",
                problem: "is missing: send {\"batch\": [messages]}".to_owned(),
            });
        }
        Some(other) => {
            return Err(DecodeError::Envelope {
                key: "batch",
                problem: format!("must be an array of messages, found {}", kind(&other)),
            });
        }
    };
    if items.is_empty() {
        return Err(DecodeError::EmptyBatch);
    }
    let defaults = BatchDefaults {
        context: take_envelope_object(&mut top, "context")?,
        integrations: take_envelope_object(&mut top, "integrations")?,
        sent_at: top.remove("sentAt").filter(|v| !v.is_null()),
    };
    // Other top-level keys (Segment's libraries send none that matter) are not kept.
    items
        .into_iter()
        .enumerate()
        .map(|(message_idx, item)| {
            let n_bytes = json_text_len(&item);
            if n_bytes > MAX_EVENT_BYTES {
                return Err(DecodeError::MessageTooLarge {
                    message_idx,
                    n_bytes,
                });
            }
            match item {
                Json::Object(object) => {
                    message_to_event(None, object, message_idx, &defaults, received)
                }
                other => Err(DecodeError::MessageNotAnObject {
                    message_idx,
                    found: kind(&other),
                }),
            }
        })
        .collect()
}

fn take_envelope_object(
    top: &mut Map<String, Json>,
    key: &'static str,
) -> Result<Option<Map<String, Json>>, DecodeError> {
    match top.remove(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Object(object)) => Ok(Some(object)),
        Some(other) => Err(DecodeError::Envelope {
            key,
            problem: format!("must be an object, found {}", kind(&other)),
        }),
    }
}

/// `call` is `None` for a batch item: its `type` decides.
fn message_to_event(
    call: Option<Call>,
    mut message: Map<String, Json>,
    message_idx: usize,
    defaults: &BatchDefaults,
    received: &Received,
) -> Result<Event, DecodeError> {
    let field_error = |key: &'static str, problem: String| DecodeError::Field {
        message_idx,
        key,
        problem,
    };
    // The path decides a single call; a `type` in its body is not asked for and not kept.
    let type_field = message.remove("type");
    let call = match call {
        Some(call) => call,
        None => match type_field {
            None | Some(Json::Null) => return Err(DecodeError::MissingType { message_idx }),
            Some(other) => match other.as_str().and_then(Call::from_type) {
                Some(call) => call,
                None => {
                    return Err(DecodeError::UnknownType {
                        message_idx,
                        found: other.to_string(),
                    });
                }
            },
        },
    };
    // A batch item's own write key is not how Segment authenticates; never store it.
    message.remove("writeKey");

    merge_defaults(&mut message, "context", defaults.context.as_ref());
    merge_defaults(&mut message, "integrations", defaults.integrations.as_ref());

    let mut take_text = |key: &'static str| -> Result<Option<String>, DecodeError> {
        match message.remove(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(text)) => Ok(Some(text).filter(|text| !text.is_empty())),
            Some(Json::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(field_error(
                key,
                format!("must be a string or a number, found {}", kind(&other)),
            )),
        }
    };
    let user_id = take_text("userId")?;
    let anonymous_id = take_text("anonymousId")?;
    let event_id = take_text("messageId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(DecodeError::MissingUserId { message_idx });
    }

    let mut attrs: BTreeMap<String, Value> = BTreeMap::new();
    let name = match call {
        Call::Track => take_text("event")?
            .ok_or_else(|| field_error("event", "is required for track calls".to_owned()))?,
        Call::Page => {
            insert_text(&mut attrs, "page_name", take_text("name")?);
            insert_text(&mut attrs, "page_category", take_text("category")?);
            "page".to_owned()
        }
        Call::Screen => {
            insert_text(&mut attrs, "screen_name", take_text("name")?);
            "screen".to_owned()
        }
        Call::Identify => "identify".to_owned(),
        Call::Group => {
            let group_id = take_text("groupId")?
                .ok_or_else(|| field_error("groupId", "is required for group calls".to_owned()))?;
            attrs.insert("group_id".to_owned(), Value::String(group_id));
            "group".to_owned()
        }
        Call::Alias => {
            let previous_id = take_text("previousId")?.ok_or_else(|| {
                field_error("previousId", "is required for alias calls".to_owned())
            })?;
            attrs.insert("previous_id".to_owned(), Value::String(previous_id));
            "alias".to_owned()
        }
        Call::Batch => {
            unreachable!("from_type never yields Batch and the caller passes Batch to decode_batch")
        }
    };

    let session_id = session_id(&message);
    let event_time_ms = event_time_ms(&mut message, defaults, received, &mut attrs)
        .map_err(|problem| field_error("timestamp", problem.to_owned()))?;

    // Everything left keeps its own name; the mapped names above win over a client's key of the
    // same name (`received_at` especially is ours).
    for (key, value) in message {
        attrs.entry(key).or_insert_with_key(|_| to_value(value));
    }
    attrs.insert("type".to_owned(), Value::String(call.as_str().to_owned()));
    // `user_id` falls back to the anonymous id, which is kept as attr `anonymous_id` either way.
    let user_id = user_id.or_else(|| anonymous_id.clone());
    insert_text(&mut attrs, "anonymous_id", anonymous_id);
    if let Some(received_at) = chrono::DateTime::from_timestamp_millis(received.receive_time_ms) {
        let text = received_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        attrs.insert("received_at".to_owned(), Value::String(text));
    }

    Ok(Event {
        seq: 0,
        event_time_ms,
        receive_time_ms: received.receive_time_ms,
        source: SourceKind::Segment,
        stream: received.stream.clone(),
        name,
        event_id,
        user_id,
        session_id,
        score: None,
        tags: Vec::new(),
        attrs,
    })
}

fn insert_text(attrs: &mut BTreeMap<String, Value>, key: &str, text: Option<String>) {
    if let Some(text) = text {
        attrs.insert(key.to_owned(), Value::String(text));
    }
}

/// A batch's top-level `context` / `integrations` under an item's own, one level deep: each
/// top-level key the item lacks is copied from the batch; a key the item has wins whole (an
/// item's `context.page` replaces the batch's, it is not merged into it). An item whose value is
/// not an object (and not null) keeps it as it is.
fn merge_defaults(
    message: &mut Map<String, Json>,
    key: &str,
    defaults: Option<&Map<String, Json>>,
) {
    let Some(defaults) = defaults else { return };
    match message.get_mut(key) {
        None | Some(Json::Null) => {
            message.insert(key.to_owned(), Json::Object(defaults.clone()));
        }
        Some(Json::Object(own)) => {
            for (default_key, default_value) in defaults {
                if !own.contains_key(default_key) {
                    own.insert(default_key.clone(), default_value.clone());
                }
            }
        }
        Some(_) => {}
    }
}

/// `context.sessionId`, else `properties.session_id`, as text; other shapes are left in the JSON.
fn session_id(message: &Map<String, Json>) -> Option<String> {
    let lookup = |outer: &str, inner: &str| match message.get(outer)?.get(inner)? {
        Json::String(text) if !text.is_empty() => Some(text.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    };
    lookup("context", "sessionId").or_else(|| lookup("properties", "session_id"))
}

/// Segment's rule: an explicit `timestamp` is the event time. Without one, `originalTimestamp`
/// (the device clock when the event happened) is corrected for the device clock's skew with
/// `sentAt` (the device clock when the request left): the event happened `sentAt -
/// originalTimestamp` before the agent received it. Without `sentAt`, `originalTimestamp` as is;
/// without either, the receive time. `originalTimestamp` and `sentAt` are kept as given.
fn event_time_ms(
    message: &mut Map<String, Json>,
    defaults: &BatchDefaults,
    received: &Received,
    attrs: &mut BTreeMap<String, Value>,
) -> Result<i64, &'static str> {
    let explicit = match message.remove("timestamp") {
        None | Some(Json::Null) => None,
        Some(value) => Some(
            parse_time(&value)
                .ok_or("must be an ISO 8601 time such as 2026-01-31T12:00:00.000Z")?,
        ),
    };
    let original = message.remove("originalTimestamp").filter(|v| !v.is_null());
    let sent_at = message
        .remove("sentAt")
        .filter(|v| !v.is_null())
        .or_else(|| defaults.sent_at.clone());
    let original_ms = original.as_ref().and_then(parse_time);
    let sent_at_ms = sent_at.as_ref().and_then(parse_time);
    if let Some(original) = original {
        attrs.insert("original_timestamp".to_owned(), to_value(original));
    }
    if let Some(sent_at) = sent_at {
        attrs.insert("sent_at".to_owned(), to_value(sent_at));
    }
    Ok(match (explicit, original_ms, sent_at_ms) {
        (Some(explicit), _, _) => explicit,
        (None, Some(original), Some(sent_at)) => received
            .receive_time_ms
            .saturating_sub(sent_at.saturating_sub(original)),
        (None, Some(original), None) => original,
        (None, None, _) => received.receive_time_ms,
    })
}

/// The write key from `Basic base64(writeKey:)`. The password is ignored and the colon may be
/// missing (some clients send `base64(writeKey)`). An empty user name is no key (the body's
/// `writeKey` may still give one).
fn write_key_from_basic(header: &str) -> Result<Option<String>, DecodeError> {
    let header = header.trim();
    let (scheme, credentials) = header
        .split_once(' ')
        .ok_or(DecodeError::Authorization("not Basic credentials"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(DecodeError::Authorization("not Basic credentials"));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim())
        .map_err(|_| DecodeError::Authorization("credentials are not valid base64"))?;
    let text = String::from_utf8(decoded)
        .map_err(|_| DecodeError::Authorization("credentials are not UTF-8"))?;
    let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    Ok(Some(user.to_owned()).filter(|user| !user.is_empty()))
}

/// Length of `value` as compact JSON text, without building the text.
fn json_text_len(value: &Json) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `serde_json::Value` to an infallible writer cannot fail (its keys are strings).
    serde_json::to_writer(&mut counter, value).expect("a JSON value serialises");
    counter.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-01-31T12:00:00.000Z
    const RECEIVE_MS: i64 = 1_769_860_800_000;

    fn received() -> Received {
        Received {
            receive_time_ms: RECEIVE_MS,
            stream: "clickstream".to_owned(),
            ip: Some("192.0.2.1".to_owned()),
            user_agent: None,
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/segment/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|error| panic!("read {path}: {error}"))
    }

    fn one(call: Call, body: &[u8]) -> Event {
        let decoded = decode(call, body, None, &received()).expect("decodes");
        assert_eq!(decoded.events.len(), 1);
        decoded.events.into_iter().next().expect("one event")
    }

    fn error(call: Call, body: &[u8]) -> String {
        decode(call, body, None, &received())
            .expect_err("must be refused")
            .to_string()
    }

    fn text(value: &str) -> Value {
        Value::String(value.to_owned())
    }

    fn json(value: &str) -> Value {
        // Compare JSON attrs by meaning, not by key order.
        let parsed: Json = serde_json::from_str(value).expect("test JSON");
        Value::Json(parsed.to_string())
    }

    fn basic(credentials: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    }

    #[test]
    fn paths() {
        for (segment, call) in [
            ("track", Call::Track),
            ("t", Call::Track),
            ("page", Call::Page),
            ("p", Call::Page),
            ("screen", Call::Screen),
            ("s", Call::Screen),
            ("identify", Call::Identify),
            ("i", Call::Identify),
            ("group", Call::Group),
            ("g", Call::Group),
            ("alias", Call::Alias),
            ("a", Call::Alias),
            ("batch", Call::Batch),
            ("import", Call::Batch),
        ] {
            assert_eq!(Call::from_path(segment), Some(call), "{segment}");
        }
        for segment in ["", "b", "Track", "events", "track/"] {
            assert_eq!(Call::from_path(segment), None, "{segment}");
        }
    }

    #[test]
    fn track_maps_every_field() {
        let event = one(Call::Track, &fixture("track.json"));
        assert_eq!(event.seq, 0);
        assert_eq!(event.source, SourceKind::Segment);
        assert_eq!(event.stream, "clickstream");
        assert_eq!(event.receive_time_ms, RECEIVE_MS);
        assert_eq!(event.event_time_ms, 1_769_860_798_250);
        assert_eq!(event.name, "Order Completed");
        assert_eq!(event.event_id.as_deref(), Some("msg-track-1"));
        assert_eq!(event.user_id.as_deref(), Some("u-42"));
        // context.sessionId wins over properties.session_id.
        assert_eq!(event.session_id.as_deref(), Some("sess-7"));
        assert_eq!(event.score, None);
        assert!(event.tags.is_empty());
        let expected: BTreeMap<String, Value> = [
            ("type", text("track")),
            ("anonymous_id", text("anon-1")),
            ("received_at", text("2026-01-31T12:00:00.000Z")),
            (
                "properties",
                json(r#"{"revenue":39.95,"currency":"EUR","session_id":"not-used-context-wins"}"#),
            ),
            (
                "context",
                json(
                    r#"{"sessionId":"sess-7","ip":"203.0.113.9",
                        "library":{"name":"analytics-python","version":"2.3.2"}}"#,
                ),
            ),
            ("integrations", json(r#"{"All":true,"Mixpanel":false}"#)),
            ("version", Value::Int(2)),
            ("channel", text("server")),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        assert_eq!(event.attrs, expected);
    }

    #[test]
    fn identify_with_traits_corrects_clock_skew() {
        let event = one(Call::Identify, &fixture("identify.json"));
        assert_eq!(event.name, "identify");
        assert_eq!(event.user_id.as_deref(), Some("1234"));
        assert_eq!(event.event_id.as_deref(), Some("msg-identify-1"));
        assert_eq!(event.session_id, None);
        // sentAt - originalTimestamp = 5.5 s before the receive time.
        assert_eq!(event.event_time_ms, RECEIVE_MS - 5_500);
        let expected: BTreeMap<String, Value> = [
            ("type", text("identify")),
            ("received_at", text("2026-01-31T12:00:00.000Z")),
            ("original_timestamp", text("2026-01-31T11:00:00.000Z")),
            ("sent_at", text("2026-01-31T11:00:05.500Z")),
            (
                "traits",
                json(r#"{"email":"ada@example.com","plan":"pro","address":{"city":"London"}}"#),
            ),
            ("context", json(r#"{"locale":"en-GB"}"#)),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        assert_eq!(event.attrs, expected);
    }

    #[test]
    fn page_with_anonymous_id_only() {
        let event = one(Call::Page, &fixture("page.json"));
        assert_eq!(event.name, "page");
        assert_eq!(event.user_id.as_deref(), Some("anon-9"));
        assert_eq!(event.event_id, None);
        assert_eq!(event.session_id.as_deref(), Some("4711"));
        // originalTimestamp without sentAt is taken as is.
        assert_eq!(event.event_time_ms, 1_769_859_000_000);
        let expected: BTreeMap<String, Value> = [
            ("type", text("page")),
            ("anonymous_id", text("anon-9")),
            ("page_name", text("Pricing")),
            ("page_category", text("Docs")),
            ("received_at", text("2026-01-31T12:00:00.000Z")),
            ("original_timestamp", text("2026-01-31T11:30:00Z")),
            (
                "properties",
                json(r#"{"path":"/pricing","session_id":4711}"#),
            ),
            (
                "context",
                json(r#"{"page":{"url":"https://example.com/pricing"}}"#),
            ),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        assert_eq!(event.attrs, expected);
    }

    #[test]
    fn screen_group_alias() {
        let event = one(
            Call::Screen,
            br#"{"userId":"u","name":"Home","category":"Main"}"#,
        );
        assert_eq!(event.name, "screen");
        assert_eq!(event.attrs["screen_name"], text("Home"));
        // Only pages map `category`; a screen keeps it under its own name.
        assert_eq!(event.attrs["category"], text("Main"));
        assert_eq!(event.event_time_ms, RECEIVE_MS);

        let event = one(
            Call::Group,
            br#"{"userId":"u","groupId":77,"traits":{"name":"Initech"}}"#,
        );
        assert_eq!(event.name, "group");
        assert_eq!(event.attrs["group_id"], text("77"));
        assert_eq!(event.attrs["traits"], json(r#"{"name":"Initech"}"#));
        assert!(!event.attrs.contains_key("groupId"));

        let event = one(
            Call::Alias,
            br#"{"userId":"u-new","previousId":"anon-old"}"#,
        );
        assert_eq!(event.name, "alias");
        assert_eq!(event.user_id.as_deref(), Some("u-new"));
        assert_eq!(event.attrs["previous_id"], text("anon-old"));
        assert!(!event.attrs.contains_key("previousId"));

        assert_eq!(
            error(Call::Group, br#"{"userId":"u"}"#),
            "message 0: field `groupId` is required for group calls"
        );
        assert_eq!(
            error(Call::Alias, br#"{"userId":"u","previousId":""}"#),
            "message 0: field `previousId` is required for alias calls"
        );
    }

    #[test]
    fn batch_merges_top_level_context_and_integrations() {
        let decoded = decode(Call::Batch, &fixture("batch.json"), None, &received()).expect("ok");
        assert_eq!(decoded.write_key.as_deref(), Some("wk-batch"));
        let [track, identify, screen] = &decoded.events[..] else {
            panic!("three events expected, got {}", decoded.events.len())
        };

        assert_eq!(track.name, "Signed Up");
        assert_eq!(track.attrs["type"], text("track"));
        assert_eq!(track.user_id.as_deref(), Some("u-1"));
        assert_eq!(track.event_id.as_deref(), Some("b-1"));
        assert_eq!(track.session_id.as_deref(), Some("sess-batch"));
        // The batch's sentAt corrects the skew: sent 3 s after it happened.
        assert_eq!(track.event_time_ms, RECEIVE_MS - 3_000);
        assert_eq!(track.attrs["sent_at"], text("2026-01-31T12:00:10.000Z"));
        assert_eq!(
            track.attrs["original_timestamp"],
            text("2026-01-31T12:00:07.000Z")
        );
        assert_eq!(
            track.attrs["context"],
            json(
                r#"{"library":{"name":"analytics-node","version":"6.0.0"},"ip":"198.51.100.1",
                    "sessionId":"sess-batch"}"#
            )
        );
        assert_eq!(
            track.attrs["integrations"],
            json(r#"{"All":false,"Amplitude":true}"#)
        );
        assert_eq!(track.attrs["properties"], json(r#"{"plan":"pro"}"#));

        assert_eq!(identify.name, "identify");
        assert_eq!(identify.user_id.as_deref(), Some("anon-2"));
        assert_eq!(identify.attrs["anonymous_id"], text("anon-2"));
        // The item's own keys win; the batch's fill in the rest.
        assert_eq!(
            identify.attrs["context"],
            json(
                r#"{"library":{"name":"analytics-node","version":"6.0.0"},"ip":"192.0.2.44",
                    "locale":"fr-FR","sessionId":"sess-batch"}"#
            )
        );
        assert_eq!(identify.session_id.as_deref(), Some("sess-batch"));
        // An explicit timestamp is the event time, whatever sentAt says.
        assert_eq!(identify.event_time_ms, 1_769_846_400_000);
        assert_eq!(identify.attrs["sent_at"], text("2026-01-31T12:00:10.000Z"));
        assert!(!identify.attrs.contains_key("original_timestamp"));

        assert_eq!(screen.name, "screen");
        assert_eq!(screen.attrs["screen_name"], text("Home"));
        assert_eq!(
            screen.attrs["integrations"],
            json(r#"{"All":false,"Amplitude":false}"#)
        );
        // The item's own sentAt wins over the batch's.
        assert_eq!(screen.event_time_ms, RECEIVE_MS - 2_500);
        assert_eq!(screen.attrs["sent_at"], text("2026-01-31T12:00:04.000Z"));

        for event in &decoded.events {
            assert_eq!(event.source, SourceKind::Segment);
            assert_eq!(event.stream, "clickstream");
            assert_eq!(event.receive_time_ms, RECEIVE_MS);
            assert!(!event.attrs.contains_key("writeKey"));
            assert!(!event.attrs.contains_key("batch"));
        }
    }

    #[test]
    fn browser_short_path_with_write_key_in_body() {
        let decoded = decode(
            Call::from_path("t").expect("short path"),
            &fixture("browser_t.json"),
            None,
            &received(),
        )
        .expect("ok");
        assert_eq!(decoded.write_key.as_deref(), Some("wk-browser"));
        let event = &decoded.events[0];
        assert_eq!(event.name, "Button Clicked");
        assert_eq!(event.user_id.as_deref(), Some("a7f3"));
        assert_eq!(event.event_id.as_deref(), Some("ajs-next-1"));
        assert_eq!(event.event_time_ms, RECEIVE_MS - 400);
        assert_eq!(event.attrs["type"], text("track"));
        assert_eq!(
            event.attrs["_metadata"],
            json(r#"{"bundled":["Segment.io"]}"#)
        );
        assert!(!event.attrs.contains_key("writeKey"));
        assert_eq!(
            event.attrs.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "_metadata",
                "anonymous_id",
                "context",
                "original_timestamp",
                "properties",
                "received_at",
                "sent_at",
                "type"
            ]
        );
    }

    #[test]
    fn write_key_from_basic_auth_wins_over_the_body() {
        let body = fixture("browser_t.json");
        let decode_with = |header: &str| {
            decode(Call::Track, &body, Some(header), &received()).map(|decoded| decoded.write_key)
        };
        assert_eq!(
            decode_with(&basic("wk-header:")),
            Ok(Some("wk-header".to_owned()))
        );
        // A missing colon and a password are tolerated; the scheme is case-insensitive.
        assert_eq!(
            decode_with(&basic("wk-header")),
            Ok(Some("wk-header".to_owned()))
        );
        assert_eq!(
            decode_with(&basic("wk-header:secret").replace("Basic", "basic")),
            Ok(Some("wk-header".to_owned()))
        );
        // An empty user name is no key: the body's is used.
        assert_eq!(decode_with(&basic(":")), Ok(Some("wk-browser".to_owned())));
        assert_eq!(
            decode(
                Call::Track,
                br#"{"userId":"u","event":"e"}"#,
                None,
                &received()
            )
            .expect("ok")
            .write_key,
            None
        );
    }

    #[test]
    fn invalid_authorization_is_refused() {
        let body = br#"{"userId":"u","event":"e"}"#;
        let refuse = |header: &str| {
            decode(Call::Track, body, Some(header), &received())
                .expect_err("refused")
                .to_string()
        };
        assert_eq!(
            refuse("Basic !!!"),
            "Authorization header: credentials are not valid base64; expected `Basic \
             base64(writeKey:)`"
        );
        assert_eq!(
            refuse("Bearer abc"),
            "Authorization header: not Basic credentials; expected `Basic base64(writeKey:)`"
        );
        assert_eq!(
            refuse("Basic"),
            "Authorization header: not Basic credentials; expected `Basic base64(writeKey:)`"
        );
        assert_eq!(
            refuse("Basic /w=="),
            "Authorization header: credentials are not UTF-8; expected `Basic \
             base64(writeKey:)`"
        );
    }

    #[test]
    fn bad_fixtures_have_exact_errors() {
        assert_eq!(
            error(Call::Track, &fixture("bad_no_user_ids.json")),
            "message 0: needs a `userId` or an `anonymousId`"
        );
        assert_eq!(
            error(Call::Track, &fixture("bad_track_without_event.json")),
            "message 0: field `event` is required for track calls"
        );
        assert_eq!(
            error(Call::Batch, &fixture("bad_unknown_type.json")),
            "message 1: unknown type \"purchase\": expected track, page, screen, identify, group \
             or alias"
        );
        assert_eq!(
            error(Call::Track, &fixture("bad_not_json.txt")),
            "invalid JSON: expected value at line 1 column 1"
        );
        assert_eq!(
            error(Call::Batch, &fixture("bad_batch_item_over_32kb.json")),
            "message 1 is 33068 bytes, over Segment's 32 KB limit"
        );
    }

    #[test]
    fn size_limits() {
        let filler = "x".repeat(MAX_BATCH_BYTES);
        let body =
            format!(r#"{{"batch":[{{"type":"track","event":"e","userId":"u","f":"{filler}"}}]}}"#);
        assert_eq!(
            error(Call::Batch, body.as_bytes()),
            format!("batch is {} bytes, over Segment's 500 KB limit", body.len())
        );
        let filler = "x".repeat(MAX_EVENT_BYTES);
        let body = format!(r#"{{"event":"e","userId":"u","f":"{filler}"}}"#);
        assert_eq!(
            error(Call::Track, body.as_bytes()),
            format!(
                "message 0 is {} bytes, over Segment's 32 KB limit",
                body.len()
            )
        );
        // Exactly at the limits is fine.
        let body = format!(
            r#"{{"event":"e","userId":"u","f":"{}"}}"#,
            "x".repeat(MAX_EVENT_BYTES - 33)
        );
        assert_eq!(body.len(), MAX_EVENT_BYTES);
        assert_eq!(one(Call::Track, body.as_bytes()).name, "e");
    }

    #[test]
    fn envelope_errors() {
        assert_eq!(
            error(Call::Track, b""),
            "invalid JSON: EOF while parsing a value at line 1 column 0"
        );
        assert_eq!(
            error(Call::Track, b"[{}]"),
            "expected a JSON object, found an array"
        );
        assert_eq!(
            error(Call::Batch, b"{}"),
            "field `batch` is missing: send {\"batch\": [messages]}"
        );
        assert_eq!(
            error(Call::Batch, br#"{"batch":{}}"#),
            "field `batch` must be an array of messages, found an object"
        );
        assert_eq!(
            error(Call::Batch, br#"{"batch":[]}"#),
            "`batch` is empty: send at least one message"
        );
        assert_eq!(
            error(
                Call::Batch,
                br#"{"batch":[{"type":"track","event":"e","userId":"u"}],"context":[]}"#
            ),
            "field `context` must be an object, found an array"
        );
        assert_eq!(
            error(Call::Track, br#"{"writeKey":1,"userId":"u","event":"e"}"#),
            "field `writeKey` must be a string, found a number"
        );
    }

    #[test]
    fn message_errors_name_the_index() {
        let batch =
            |items: &str| error(Call::Batch, format!(r#"{{"batch":[{items}]}}"#).as_bytes());
        let ok = r#"{"type":"identify","userId":"u"}"#;
        assert_eq!(
            batch(&format!(r#"{ok},{ok},{{"type":"identify","userId":""}}"#)),
            "message 2: needs a `userId` or an `anonymousId`"
        );
        assert_eq!(
            batch(&format!(r#"{ok},{{"userId":"u"}}"#)),
            "message 1: `type` is required in a batch: track, page, screen, identify, group or alias"
        );
        assert_eq!(
            batch(r#"{"type":"batch","userId":"u"}"#),
            "message 0: unknown type \"batch\": expected track, page, screen, identify, group or alias"
        );
        assert_eq!(
            batch(&format!(r#"{ok},3"#)),
            "message 1: expected a JSON object, found a number"
        );
        assert_eq!(
            batch(r#"{"type":"track","event":"e","userId":{"id":1}}"#),
            "message 0: field `userId` must be a string or a number, found an object"
        );
        assert_eq!(
            batch(r#"{"type":"track","event":"e","userId":"u","timestamp":"yesterday"}"#),
            "message 0: field `timestamp` must be an ISO 8601 time such as 2026-01-31T12:00:00.000Z"
        );
    }

    #[test]
    fn single_call_path_decides_and_unparseable_skew_inputs_fall_back() {
        // A `type` in a single call's body is ignored: the path decides.
        let event = one(Call::Page, br#"{"type":"track","userId":"u","event":"e"}"#);
        assert_eq!(event.name, "page");
        assert_eq!(event.attrs["type"], text("page"));
        assert_eq!(event.attrs["event"], text("e"));
        // An unparseable sentAt leaves originalTimestamp as is; both are kept as given.
        let event = one(
            Call::Identify,
            br#"{"userId":"u","originalTimestamp":"2026-01-31T11:00:00Z","sentAt":"soon"}"#,
        );
        assert_eq!(event.event_time_ms, RECEIVE_MS - 3_600_000);
        assert_eq!(event.attrs["sent_at"], text("soon"));
        // An unparseable originalTimestamp leaves the receive time.
        let event = one(
            Call::Identify,
            br#"{"userId":"u","originalTimestamp":"then"}"#,
        );
        assert_eq!(event.event_time_ms, RECEIVE_MS);
        assert_eq!(event.attrs["original_timestamp"], text("then"));
        // A client's `received_at` does not override ours.
        let event = one(Call::Identify, br#"{"userId":"u","received_at":"1999"}"#);
        assert_eq!(event.attrs["received_at"], text("2026-01-31T12:00:00.000Z"));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let seeds: [&[u8]; 6] = [
            &fixture("batch.json"),
            &fixture("track.json"),
            b"{\"batch\":[{\"type\":\"track\"}]}",
            b"\xff\xfe{",
            b"{\"batch\":[null,true,\"x\",[]]}",
            b"{\"userId\":1e400}",
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for seed in seeds {
            for call in [Call::Batch, Call::Track, Call::Alias] {
                let _ = decode(call, seed, Some("Basic"), &received());
                for _ in 0..200 {
                    let mut bytes = seed.to_vec();
                    for _ in 0..rng.usize(1..4) {
                        if bytes.is_empty() {
                            break;
                        }
                        let at = rng.usize(..bytes.len());
                        bytes[at] = rng.u8(..);
                    }
                    let _ = decode(call, &bytes, None, &received());
                }
            }
        }
    }
}
