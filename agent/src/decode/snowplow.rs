//! Snowplow tracker protocol: `POST /com.snowplowanalytics.snowplow/tp2` (a `payload_data` JSON
//! body holding many events) and `GET /i` (one event in the query string).
//!
//! This module owns the mapping from tracker parameters onto [`Event`]. It is pure: no I/O, no
//! clock; the receive time, client address and user agent come in through [`Received`].
//! Request-level problems (not JSON, a wrong `payload_data` envelope, an unparseable query
//! string) are [`DecodeError`]s; a problem of one event (a missing `e`, `p` or `tv`, bad base64,
//! bad JSON in `ue_pr`/`co`, a timestamp that is not a number) turns only that event into a
//! [`dead_letter`] with a reason naming the parameter.
//!
//! | parameter              | becomes                                                            |
//! |------------------------|--------------------------------------------------------------------|
//! | `e`                    | `name`: `pv` page_view, `pp` page_ping, `se` structured, `ue` the self-describing event's schema name, `tr` transaction, `ti` transaction_item, anything else as given |
//! | `eid`, `uid`, `sid`    | `event_id`, `user_id`, `session_id`                                |
//! | `ttm`, `dtm`, `stm`    | event time (see [`event_time_ms`]); Int attrs `true_tstamp`, `dvce_created_tstamp`, `dvce_sent_tstamp` |
//! | `ue_pr` / `ue_px`      | attrs `event_schema` (String) and `event` (Json)                   |
//! | `co` / `cx`            | attr `contexts` (Json array of `{schema, data}`)                   |
//! | `se_va`                | Float attr `value`                                                 |
//! | `vid`                  | attr `session_index`: Int when it is an integer, else String        |
//! | see [`RENAMED_PARAMETERS`] | String attrs under Snowplow's canonical (readable) names       |
//! | anything else          | String attr under its own name                                     |
//!
//! An empty parameter value counts as absent, as in Snowplow's enrichment. When the item has no
//! `ip` / `ua`, the client address and `User-Agent` of the request fill `user_ipaddress` /
//! `useragent`.

use crate::decode::json::kind;
use std::collections::BTreeMap;

use base64::Engine as _;
use runnel_common::{Event, SourceKind, Value};
use serde_json::{Map, Value as Json};

use super::{Received, dead_letter};

/// Accepted `payload_data` envelopes: any 1-0-x revision, as Snowplow's collector accepts.
const PAYLOAD_DATA_SCHEMA_PREFIX: &str =
    "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-";
const UNSTRUCT_EVENT_SCHEMA_PREFIX: &str =
    "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-";
const CONTEXTS_SCHEMA_PREFIX: &str = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-";

/// Parameters every event must carry: event type, platform, tracker version.
const REQUIRED_PARAMETERS: [&str; 3] = ["e", "p", "tv"];

/// Tracker parameters kept as String attrs under the canonical event model's names (shortened
/// where the brief asked for a plainer one). Earlier entries win when two map to one name:
/// `tnuid` (set by the tracker) wins over `nuid`; the loser stays under its own name.
pub const RENAMED_PARAMETERS: &[(&str, &str)] = &[
    ("aid", "app_id"),
    ("p", "platform"),
    ("tv", "tracker_version"),
    ("tna", "tracker_namespace"),
    ("duid", "domain_user_id"),
    ("tnuid", "network_user_id"),
    ("nuid", "network_user_id"),
    ("url", "page_url"),
    ("refr", "page_referrer"),
    ("page", "page_title"),
    ("ip", "user_ipaddress"),
    ("ua", "useragent"),
    ("fp", "user_fingerprint"),
    ("mac", "mac_address"),
    ("lang", "browser_language"),
    ("res", "screen_resolution"),
    ("vp", "viewport"),
    ("ds", "document_size"),
    ("cs", "document_charset"),
    ("cd", "browser_color_depth"),
    ("cookie", "browser_cookies"),
    ("tz", "timezone"),
    ("f_pdf", "browser_feature_pdf"),
    ("f_qt", "browser_feature_quicktime"),
    ("f_realp", "browser_feature_realplayer"),
    ("f_wma", "browser_feature_windowsmedia"),
    ("f_dir", "browser_feature_director"),
    ("f_fla", "browser_feature_flash"),
    ("f_java", "browser_feature_java"),
    ("f_gears", "browser_feature_gears"),
    ("f_ag", "browser_feature_silverlight"),
    ("pp_mix", "pp_xoffset_min"),
    ("pp_max", "pp_xoffset_max"),
    ("pp_miy", "pp_yoffset_min"),
    ("pp_may", "pp_yoffset_max"),
    ("se_ca", "category"),
    ("se_ac", "action"),
    ("se_la", "label"),
    ("se_pr", "property"),
    ("tr_id", "tr_orderid"),
    ("tr_af", "tr_affiliation"),
    ("tr_tt", "tr_total"),
    ("tr_tx", "tr_tax"),
    ("tr_sh", "tr_shipping"),
    ("tr_ci", "tr_city"),
    ("tr_st", "tr_state"),
    ("tr_co", "tr_country"),
    ("tr_cu", "tr_currency"),
    ("ti_id", "ti_orderid"),
    ("ti_sk", "ti_sku"),
    ("ti_nm", "ti_name"),
    ("ti_ca", "ti_category"),
    ("ti_pr", "ti_price"),
    ("ti_qu", "ti_quantity"),
    ("ti_cu", "ti_currency"),
];

/// Prefix for an unknown parameter whose own name is already taken by a mapped attribute
/// (a tracker sending both `url` and `page_url`), so neither value is lost.
const COLLISION_PREFIX: &str = "param_";

/// Standard alphabet; URL-safe input is translated to it first. Trackers pad or not.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Request-level problems, answered with HTTP 400 and this message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error(
        "empty body: send Snowplow payload_data JSON ({{\"schema\":\"{prefix}4\",\"data\":[...]}})",
        prefix = PAYLOAD_DATA_SCHEMA_PREFIX
    )]
    Empty,
    #[error("invalid JSON: {0}")]
    Syntax(String),
    #[error("expected a JSON object (Snowplow payload_data), found {found}")]
    NotAnObject { found: &'static str },
    #[error("`schema` must be {prefix}<n>, found {found}", prefix = PAYLOAD_DATA_SCHEMA_PREFIX)]
    Schema { found: String },
    #[error("`data` must be an array of events, found {found}")]
    Data { found: &'static str },
    #[error("`data` holds no events")]
    NoEvents,
    #[error("query string: {0}")]
    Query(String),
}

/// `POST /com.snowplowanalytics.snowplow/tp2`: one event (or dead letter) per `data` item.
pub fn decode_post(body: &[u8], received: &Received) -> Result<Vec<Event>, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(DecodeError::Empty);
    }
    let envelope: Json =
        serde_json::from_slice(body).map_err(|error| DecodeError::Syntax(error.to_string()))?;
    let Json::Object(mut envelope) = envelope else {
        return Err(DecodeError::NotAnObject {
            found: kind(&envelope),
        });
    };
    match envelope.get("schema") {
        Some(Json::String(schema)) if is_schema_revision(schema, PAYLOAD_DATA_SCHEMA_PREFIX) => {}
        Some(Json::String(schema)) => {
            return Err(DecodeError::Schema {
                found: schema.clone(),
            });
        }
        Some(other) => {
            return Err(DecodeError::Schema {
                found: kind(other).to_owned(),
            });
        }
        None => {
            return Err(DecodeError::Schema {
                found: "nothing".to_owned(),
            });
        }
    }
    let items = match envelope.remove("data") {
        Some(Json::Array(items)) => items,
        Some(other) => {
            return Err(DecodeError::Data {
                found: kind(&other),
            });
        }
        None => return Err(DecodeError::Data { found: "nothing" }),
    };
    if items.is_empty() {
        return Err(DecodeError::NoEvents);
    }
    Ok(items
        .into_iter()
        .map(|item| decode_item(item, received))
        .collect())
}

/// `GET /i` (the pixel) and `GET /com.snowplowanalytics.snowplow/tp2`: `query` is the raw query
/// string without `?`. Only an unparseable query string is an error; a bad event is a dead letter.
pub fn decode_get(query: &str, received: &Received) -> Result<Event, DecodeError> {
    let pairs = parse_query(query)?;
    let mut parameters = BTreeMap::new();
    for (key, value) in pairs {
        if parameters.contains_key(&key) {
            let reason = format!("parameter `{key}` given more than once");
            return Ok(dead_letter(
                SourceKind::Snowplow,
                &reason,
                query.as_bytes(),
                received,
            ));
        }
        parameters.insert(key, value);
    }
    Ok(
        from_parameters(parameters, received).unwrap_or_else(|reason| {
            dead_letter(SourceKind::Snowplow, &reason, query.as_bytes(), received)
        }),
    )
}

fn decode_item(item: Json, received: &Received) -> Event {
    let parameters = match &item {
        Json::Object(object) => string_parameters(object),
        other => Err(format!(
            "event is not a JSON object of parameters, found {}",
            kind(other)
        )),
    };
    parameters
        .and_then(|parameters| from_parameters(parameters, received))
        .unwrap_or_else(|reason| {
            let raw = item.to_string();
            dead_letter(SourceKind::Snowplow, &reason, raw.as_bytes(), received)
        })
}

/// Every value in a tracker payload is a string; anything else is a tracker bug we do not guess
/// around.
fn string_parameters(object: &Map<String, Json>) -> Result<BTreeMap<String, String>, String> {
    object
        .iter()
        .map(|(key, value)| match value {
            Json::String(text) => Ok((key.clone(), text.clone())),
            other => Err(format!(
                "parameter `{key}` must be a string, found {}",
                kind(other)
            )),
        })
        .collect()
}

/// Maps one event's parameters; `Err` is the dead-letter reason.
fn from_parameters(
    mut parameters: BTreeMap<String, String>,
    received: &Received,
) -> Result<Event, String> {
    parameters.retain(|_, value| !value.is_empty());
    for key in REQUIRED_PARAMETERS {
        if !parameters.contains_key(key) {
            return Err(format!(
                "missing required parameter `{key}` (every event needs `e`, `p` and `tv`)"
            ));
        }
    }
    let event_type = parameters.remove("e").expect("checked as required above");
    let mut attrs = BTreeMap::new();

    let true_ms = take_ms(&mut parameters, "ttm")?;
    let created_ms = take_ms(&mut parameters, "dtm")?;
    let sent_ms = take_ms(&mut parameters, "stm")?;
    let event_time_ms = event_time_ms(received.receive_time_ms, true_ms, created_ms, sent_ms);
    for (name, ms) in [
        ("true_tstamp", true_ms),
        ("dvce_created_tstamp", created_ms),
        ("dvce_sent_tstamp", sent_ms),
    ] {
        if let Some(ms) = ms {
            attrs.insert(name.to_owned(), Value::Int(ms));
        }
    }

    let unstruct_event = match take_json(&mut parameters, "ue_pr", "ue_px")? {
        Some((envelope, key)) => Some(self_describing_event(envelope, key)?),
        None => None,
    };
    if let Some((envelope, key)) = take_json(&mut parameters, "co", "cx")? {
        attrs.insert("contexts".to_owned(), contexts(envelope, key)?);
    }
    let name = match event_type.as_str() {
        "pv" => "page_view".to_owned(),
        "pp" => "page_ping".to_owned(),
        "se" => "structured".to_owned(),
        "tr" => "transaction".to_owned(),
        "ti" => "transaction_item".to_owned(),
        "ue" => match &unstruct_event {
            Some(unstruct_event) => unstruct_event.name.clone(),
            None => return Err("`e` is `ue` but neither `ue_pr` nor `ue_px` is given".to_owned()),
        },
        other => other.to_owned(),
    };
    if let Some(unstruct_event) = unstruct_event {
        attrs.insert(
            "event_schema".to_owned(),
            Value::String(unstruct_event.schema),
        );
        attrs.insert(
            "event".to_owned(),
            Value::Json(unstruct_event.data.to_string()),
        );
    }

    if let Some(text) = parameters.remove("se_va") {
        let value = text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|value| value.is_finite())
            .ok_or_else(|| format!("parameter `se_va` must be a number, found {text:?}"))?;
        attrs.insert("value".to_owned(), Value::Float(value));
    }
    if let Some(text) = parameters.remove("vid") {
        let value = text.parse::<i64>().map_or(Value::String(text), Value::Int);
        attrs.insert("session_index".to_owned(), value);
    }

    let event_id = parameters.remove("eid");
    let user_id = parameters.remove("uid");
    let session_id = parameters.remove("sid");

    for (key, name) in RENAMED_PARAMETERS {
        if attrs.contains_key(*name) {
            continue;
        }
        if let Some(value) = parameters.remove(*key) {
            attrs.insert((*name).to_owned(), Value::String(value));
        }
    }
    for (key, value) in parameters {
        let key = if attrs.contains_key(&key) {
            format!("{COLLISION_PREFIX}{key}")
        } else {
            key
        };
        attrs.insert(key, Value::String(value));
    }
    for (name, from_request) in [
        ("user_ipaddress", &received.ip),
        ("useragent", &received.user_agent),
    ] {
        if let Some(value) = from_request {
            attrs
                .entry(name.to_owned())
                .or_insert_with(|| Value::String(value.clone()));
        }
    }

    Ok(Event {
        seq: 0,
        event_time_ms,
        receive_time_ms: received.receive_time_ms,
        source: SourceKind::Snowplow,
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

/// Snowplow's derived timestamp: the true timestamp when the tracker knows it; else the receive
/// time moved back by how long the event waited on the device (`stm - dtm`), which cancels a
/// wrong device clock; else the device's creation time; else the receive time.
pub fn event_time_ms(
    receive_time_ms: i64,
    true_ms: Option<i64>,
    created_ms: Option<i64>,
    sent_ms: Option<i64>,
) -> i64 {
    match (true_ms, created_ms, sent_ms) {
        (Some(true_ms), _, _) => true_ms,
        (None, Some(created_ms), Some(sent_ms)) => sent_ms
            .checked_sub(created_ms)
            .and_then(|waited_ms| receive_time_ms.checked_sub(waited_ms))
            .unwrap_or(created_ms),
        (None, Some(created_ms), None) => created_ms,
        (None, None, _) => receive_time_ms,
    }
}

fn take_ms(parameters: &mut BTreeMap<String, String>, key: &str) -> Result<Option<i64>, String> {
    let Some(text) = parameters.remove(key) else {
        return Ok(None);
    };
    text.trim()
        .parse::<i64>()
        .map(Some)
        .map_err(|_| format!("parameter `{key}` must be Unix milliseconds, found {text:?}"))
}

/// Takes `plain_key` (JSON text), else `base64_key` (base64 of JSON text). When both are given
/// the plain one is used and the other stays an ordinary attribute, so nothing is lost.
fn take_json(
    parameters: &mut BTreeMap<String, String>,
    plain_key: &'static str,
    base64_key: &'static str,
) -> Result<Option<(Json, &'static str)>, String> {
    if let Some(text) = parameters.remove(plain_key) {
        let json = serde_json::from_str(&text)
            .map_err(|error| format!("parameter `{plain_key}` is not JSON: {error}"))?;
        return Ok(Some((json, plain_key)));
    }
    let Some(text) = parameters.remove(base64_key) else {
        return Ok(None);
    };
    let bytes = decode_base64(&text)
        .map_err(|error| format!("parameter `{base64_key}` is not base64: {error}"))?;
    let json = serde_json::from_slice(&bytes)
        .map_err(|error| format!("parameter `{base64_key}` does not decode to JSON: {error}"))?;
    Ok(Some((json, base64_key)))
}

/// Standard or URL-safe alphabet, padded or not, whitespace ignored (trackers and proxies wrap
/// long values; a `+` turned into a space by form decoding is restored).
fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let standard: Vec<u8> = text
        .trim()
        .bytes()
        .filter(|byte| !matches!(byte, b'\n' | b'\r' | b'\t'))
        .map(|byte| match byte {
            b'-' => b'+',
            b'_' => b'/',
            b' ' => b'+',
            other => other,
        })
        .collect();
    BASE64.decode(standard)
}

struct UnstructEvent {
    name: String,
    schema: String,
    data: Json,
}

/// `{"schema":"iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
///   "data":{"schema":"iglu:vendor/name/jsonschema/1-0-0","data":{...}}}`
fn self_describing_event(envelope: Json, key: &str) -> Result<UnstructEvent, String> {
    let mut inner = envelope_data(envelope, key, UNSTRUCT_EVENT_SCHEMA_PREFIX)?;
    let Json::Object(inner) = &mut inner else {
        return Err(format!(
            "parameter `{key}`: `data` must be an object with `schema` and `data`, found {}",
            kind(&inner)
        ));
    };
    let (schema, data) = schema_and_data(inner)
        .ok_or_else(|| format!("parameter `{key}`: `data` must hold `schema` and `data`"))?;
    let name = iglu_name(&schema)
        .ok_or_else(|| {
            format!(
                "parameter `{key}`: `data.schema` is not an Iglu URI \
                 (iglu:vendor/name/format/version), found {schema:?}"
            )
        })?
        .to_owned();
    Ok(UnstructEvent { name, schema, data })
}

/// `{"schema":"iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-x",
///   "data":[{"schema":"iglu:...","data":{...}},...]}` -> the `data` array as JSON text.
fn contexts(envelope: Json, key: &str) -> Result<Value, String> {
    let entities = envelope_data(envelope, key, CONTEXTS_SCHEMA_PREFIX)?;
    let Json::Array(items) = &entities else {
        return Err(format!(
            "parameter `{key}`: `data` must be an array of entities, found {}",
            kind(&entities)
        ));
    };
    for (entity_idx, entity) in items.iter().enumerate() {
        let valid = match entity {
            Json::Object(entity) => {
                matches!(entity.get("schema"), Some(Json::String(schema)) if iglu_name(schema).is_some())
                    && entity.contains_key("data")
            }
            _ => false,
        };
        if !valid {
            return Err(format!(
                "parameter `{key}`: entity {entity_idx} must be an object with an Iglu `schema` \
                 and `data`"
            ));
        }
    }
    Ok(Value::Json(entities.to_string()))
}

/// Checks a self-describing envelope's schema and returns its `data`.
fn envelope_data(envelope: Json, key: &str, schema_prefix: &str) -> Result<Json, String> {
    let Json::Object(mut envelope) = envelope else {
        return Err(format!(
            "parameter `{key}` must be a JSON object, found {}",
            kind(&envelope)
        ));
    };
    let Some((schema, data)) = schema_and_data(&mut envelope) else {
        return Err(format!("parameter `{key}` must hold `schema` and `data`"));
    };
    if !is_schema_revision(&schema, schema_prefix) {
        return Err(format!(
            "parameter `{key}`: `schema` must be {schema_prefix}<n>, found {schema:?}"
        ));
    }
    Ok(data)
}

fn schema_and_data(object: &mut Map<String, Json>) -> Option<(String, Json)> {
    let Some(Json::String(schema)) = object.remove("schema") else {
        return None;
    };
    let data = object.remove("data")?;
    Some((schema, data))
}

/// `prefix` followed by a revision number (`1-0-` + `4`).
fn is_schema_revision(schema: &str, prefix: &str) -> bool {
    schema.strip_prefix(prefix).is_some_and(|revision| {
        !revision.is_empty() && revision.bytes().all(|byte| byte.is_ascii_digit())
    })
}

/// The name part of `iglu:vendor/name/format/version`.
fn iglu_name(uri: &str) -> Option<&str> {
    let path = uri.strip_prefix("iglu:")?;
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        [vendor, name, format, version]
            if [vendor, name, format, version]
                .iter()
                .all(|part| !part.is_empty()) =>
        {
            Some(name)
        }
        _ => None,
    }
}

/// `application/x-www-form-urlencoded` pairs: `+` is a space, `%XX` a byte, the result UTF-8.
fn parse_query(query: &str) -> Result<Vec<(String, String)>, DecodeError> {
    let pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key)?;
            if key.is_empty() {
                return Err(DecodeError::Query(format!(
                    "parameter without a name in {pair:?}"
                )));
            }
            Ok((key, percent_decode(value)?))
        })
        .collect::<Result<_, _>>()?;
    if pairs.is_empty() {
        return Err(DecodeError::Query(
            "no parameters (expected e=...&p=...&tv=...)".to_owned(),
        ));
    }
    Ok(pairs)
}

fn percent_decode(text: &str) -> Result<String, DecodeError> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut byte_idx = 0;
    while byte_idx < bytes.len() {
        match bytes[byte_idx] {
            b'+' => decoded.push(b' '),
            b'%' => {
                let high = bytes.get(byte_idx + 1).and_then(|b| hex_digit(*b));
                let low = bytes.get(byte_idx + 2).and_then(|b| hex_digit(*b));
                let (Some(high), Some(low)) = (high, low) else {
                    let end = text.len().min(byte_idx + 3);
                    let escape = String::from_utf8_lossy(&bytes[byte_idx..end]);
                    return Err(DecodeError::Query(format!(
                        "invalid percent-escape {escape:?}: `%` must be followed by two hex digits"
                    )));
                };
                decoded.push((high << 4) | low);
                byte_idx += 2;
            }
            other => decoded.push(other),
        }
        byte_idx += 1;
    }
    String::from_utf8(decoded)
        .map_err(|_| DecodeError::Query(format!("{text:?} is not UTF-8 after percent-decoding")))
}

fn hex_digit(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|digit| digit as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_common::streams::DEAD_LETTERS;

    const RECEIVE_TIME_MS: i64 = 1_769_860_900_000;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../tests/fixtures/snowplow/", $name))
        };
    }

    fn received() -> Received {
        Received {
            receive_time_ms: RECEIVE_TIME_MS,
            stream: "clickstream".to_owned(),
            ip: Some("198.51.100.7".to_owned()),
            user_agent: Some("Mozilla/5.0 (iPhone)".to_owned()),
        }
    }

    fn text(value: &str) -> Value {
        Value::String(value.to_owned())
    }

    fn json_attr(event: &Event, key: &str) -> Json {
        let Value::Json(text) = &event.attrs[key] else {
            panic!("attr {key} is not Json: {:?}", event.attrs[key]);
        };
        serde_json::from_str(text).expect("Json attrs hold valid JSON")
    }

    fn only(events: Vec<Event>) -> Event {
        assert_eq!(events.len(), 1, "{events:#?}");
        events.into_iter().next().expect("one event")
    }

    fn reason(event: &Event) -> &str {
        assert_eq!(event.stream, DEAD_LETTERS, "{event:#?}");
        assert_eq!(event.name, "dead_letter");
        assert_eq!(event.source, SourceKind::Snowplow);
        let Value::String(reason) = &event.attrs["reason"] else {
            panic!("reason is text")
        };
        reason
    }

    #[test]
    fn page_view_maps_every_field() {
        let event =
            only(decode_post(fixture!("post_page_view.json").as_bytes(), &received()).unwrap());
        assert_eq!(event.seq, 0);
        assert_eq!(event.source, SourceKind::Snowplow);
        assert_eq!(event.stream, "clickstream");
        assert_eq!(event.name, "page_view");
        assert_eq!(event.receive_time_ms, RECEIVE_TIME_MS);
        // stm - dtm = 5 s on the device, so the event happened 5 s before it was received.
        assert_eq!(event.event_time_ms, RECEIVE_TIME_MS - 5_000);
        assert_eq!(
            event.event_id.as_deref(),
            Some("9d1a4a8e-6a0b-4c3e-9a52-2f2b8d6f0c11")
        );
        assert_eq!(event.user_id.as_deref(), Some("user-42"));
        assert_eq!(
            event.session_id.as_deref(),
            Some("0f6c3a2b-7d8e-4f90-a1b2-c3d4e5f60718")
        );
        assert_eq!(event.score, None);
        assert!(event.tags.is_empty());
        let expected = BTreeMap::from([
            ("app_id", text("shop-web")),
            ("platform", text("web")),
            ("tracker_version", text("js-3.24.0")),
            ("tracker_namespace", text("sp1")),
            (
                "domain_user_id",
                text("5b7e1c2a-3f4d-4e5f-8a9b-0c1d2e3f4a5b"),
            ),
            (
                "network_user_id",
                text("ec3d4b1e-1111-4222-8333-944445555666"),
            ),
            ("session_index", Value::Int(7)),
            (
                "page_url",
                text("https://shop.example.com/products/42?ref=home"),
            ),
            ("page_referrer", text("https://www.example.org/")),
            ("page_title", text("Blue Kettle | Shop")),
            ("browser_language", text("en-GB")),
            ("screen_resolution", text("1920x1080")),
            ("viewport", text("1280x720")),
            ("document_size", text("1265x3400")),
            ("document_charset", text("UTF-8")),
            ("browser_color_depth", text("24")),
            ("browser_cookies", text("1")),
            ("timezone", text("Europe/London")),
            ("dvce_created_tstamp", Value::Int(1_769_860_790_000)),
            ("dvce_sent_tstamp", Value::Int(1_769_860_795_000)),
            ("user_ipaddress", text("198.51.100.7")),
            ("useragent", text("Mozilla/5.0 (iPhone)")),
        ]);
        let expected: BTreeMap<String, Value> = expected
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect();
        // The empty `cx` counts as absent: no `contexts`, no `cx`.
        assert_eq!(event.attrs, expected);
    }

    #[test]
    fn structured_event_keeps_category_action_label_property_value() {
        let event =
            only(decode_post(fixture!("post_structured.json").as_bytes(), &received()).unwrap());
        assert_eq!(event.name, "structured");
        assert_eq!(
            event.event_id.as_deref(),
            Some("2c0c8a55-0e1f-4a39-b3f4-6a7b8c9d0e1f")
        );
        assert_eq!(event.user_id, None, "duid is not the user id");
        // `ttm` wins over the skew-corrected time.
        assert_eq!(event.event_time_ms, 1_769_860_799_000);
        assert_eq!(event.attrs["true_tstamp"], Value::Int(1_769_860_799_000));
        assert_eq!(event.attrs["category"], text("checkout"));
        assert_eq!(event.attrs["action"], text("add_to_cart"));
        assert_eq!(event.attrs["label"], text("kettle-blue"));
        assert_eq!(event.attrs["property"], text("sku-1042"));
        assert_eq!(event.attrs["value"], Value::Float(39.99));
        assert_eq!(event.attrs["pp_xoffset_min"], text("0"));
        // The item's own `ip` / `ua` win over the request's.
        assert_eq!(event.attrs["user_ipaddress"], text("203.0.113.9"));
        assert_eq!(
            event.attrs["useragent"],
            text("Mozilla/5.0 (X11; Linux x86_64)")
        );
        for raw_key in ["se_ca", "se_ac", "se_la", "se_pr", "se_va", "ip", "ua", "e"] {
            assert!(!event.attrs.contains_key(raw_key), "{raw_key} left over");
        }
    }

    #[test]
    fn self_describing_event_from_ue_px() {
        let event = only(decode_post(fixture!("post_ue_px.json").as_bytes(), &received()).unwrap());
        assert_eq!(event.name, "link_click");
        assert_eq!(
            event.attrs["event_schema"],
            text("iglu:com.acme/link_click/jsonschema/1-0-0")
        );
        assert_eq!(
            json_attr(&event, "event"),
            serde_json::json!({"targetUrl": "https://shop.example.com/sale", "elementId": "banner-1"})
        );
        assert_eq!(event.user_id.as_deref(), Some("user-42"));
        // Only `dtm`: the device's clock is all we have.
        assert_eq!(event.event_time_ms, 1_769_860_810_000);
        assert!(!event.attrs.contains_key("ue_px"));
        assert!(!event.attrs.contains_key("dvce_sent_tstamp"));
    }

    #[test]
    fn contexts_from_standard_and_url_safe_unpadded_base64() {
        for (body, expected) in [
            (
                fixture!("post_cx_standard.json"),
                fixture!("cx_standard.expected.json"),
            ),
            (
                fixture!("post_cx_urlsafe.json"),
                fixture!("cx_urlsafe.expected.json"),
            ),
        ] {
            let event = only(decode_post(body.as_bytes(), &received()).unwrap());
            assert_eq!(event.name, "page_view", "{event:#?}");
            let expected: Json = serde_json::from_str(expected).unwrap();
            assert!(
                expected
                    .as_array()
                    .is_some_and(|entities| entities.len() == 2)
            );
            assert_eq!(json_attr(&event, "contexts"), expected);
            assert!(!event.attrs.contains_key("cx"));
        }
    }

    #[test]
    fn base64_variants_and_whitespace() {
        let plain = br#"{"a":"??>>~~"}"#;
        for encoded in [
            "eyJhIjoiPz8+Pn5+In0=",
            "eyJhIjoiPz8-Pn5-In0",
            "eyJhIjoiPz8+Pn5+In0",
            " eyJhIjoiPz8+Pn5+\nIn0=\n",
            "eyJhIjoiPz8 Pn5 In0=",
        ] {
            assert_eq!(
                decode_base64(encoded).as_deref(),
                Ok(&plain[..]),
                "{encoded:?}"
            );
        }
        assert!(decode_base64("eyJh*IjoiPz8").is_err());
    }

    #[test]
    fn pixel_get_with_ue_pr_and_co() {
        let query = fixture!("get_pixel_ue_pr.txt").trim_end();
        let event = decode_get(query, &received()).unwrap();
        assert_eq!(event.name, "newsletter_signup");
        assert_eq!(event.stream, "clickstream");
        assert_eq!(event.source, SourceKind::Snowplow);
        assert_eq!(
            event.event_id.as_deref(),
            Some("7b8c9d0e-1f2a-4b3c-8d4e-5f6a7b8c9d0e")
        );
        assert_eq!(event.user_id.as_deref(), Some("jane@example.com"));
        assert_eq!(
            event.session_id.as_deref(),
            Some("0f6c3a2b-7d8e-4f90-a1b2-c3d4e5f60718")
        );
        assert_eq!(event.event_time_ms, RECEIVE_TIME_MS - 5_000);
        assert_eq!(
            event.attrs["event_schema"],
            text("iglu:com.acme/newsletter_signup/jsonschema/1-0-2")
        );
        assert_eq!(
            json_attr(&event, "event"),
            serde_json::json!({"list": "weekly deals", "source": "footer"})
        );
        assert_eq!(
            json_attr(&event, "contexts"),
            serde_json::json!([{"schema": "iglu:com.acme/experiment/jsonschema/1-0-0", "data": {"variant": "b"}}])
        );
        assert_eq!(
            event.attrs["page_url"],
            text("https://shop.example.com/news?a=1&b=2")
        );
        assert_eq!(event.attrs["page_title"], text("News & Offers"));
        assert_eq!(
            event.attrs["session_index"],
            text("x7"),
            "not numeric: kept as text"
        );
        assert_eq!(event.attrs["browser_language"], text("de-DE"));
        assert_eq!(
            event.attrs["cv"],
            text("clj-1.1.0-tom-0.2.0"),
            "unknown keys kept"
        );
        assert_eq!(event.attrs["user_ipaddress"], text("198.51.100.7"));
        assert_eq!(event.attrs["useragent"], text("Mozilla/5.0 (iPhone)"));
        assert_eq!(
            event.attrs["dvce_created_tstamp"],
            Value::Int(1_769_860_840_000)
        );
        assert_eq!(
            event.attrs["dvce_sent_tstamp"],
            Value::Int(1_769_860_845_000)
        );
    }

    #[test]
    fn bad_items_become_dead_letters_and_the_rest_decodes() {
        let body = fixture!("post_bad_items.json");
        let events = decode_post(body.as_bytes(), &received()).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(
            reason(&events[0]),
            "missing required parameter `e` (every event needs `e`, `p` and `tv`)"
        );
        assert_eq!(events[1].name, "page_view");
        assert_eq!(events[1].event_id.as_deref(), Some("good-1"));
        assert!(
            reason(&events[2]).starts_with("parameter `cx` is not base64: "),
            "{}",
            reason(&events[2])
        );
        assert!(
            reason(&events[3]).starts_with("parameter `ue_pr` is not JSON: "),
            "{}",
            reason(&events[3])
        );
        // The raw item is kept, as JSON text, and the dead letter has the receive time.
        let items: Vec<Json> = serde_json::from_str::<Json>(body).unwrap()["data"]
            .as_array()
            .unwrap()
            .clone();
        for event_idx in [0, 2, 3] {
            let Value::String(raw) = &events[event_idx].attrs["raw"] else {
                panic!("raw is text")
            };
            assert_eq!(serde_json::from_str::<Json>(raw).unwrap(), items[event_idx]);
            assert_eq!(events[event_idx].event_time_ms, RECEIVE_TIME_MS);
        }
    }

    fn post_one(item: Json) -> Event {
        let body = serde_json::json!({
            "schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
            "data": [item],
        });
        only(decode_post(body.to_string().as_bytes(), &received()).unwrap())
    }

    #[test]
    fn dead_letter_reasons_name_the_parameter() {
        use serde_json::json;
        let cases = [
            (
                json!({"e": "pv", "p": "web"}),
                "missing required parameter `tv`",
            ),
            (
                json!({"e": "pv", "p": "web", "tv": ""}),
                "missing required parameter `tv`",
            ),
            (
                json!({"e": "pv", "p": "web", "tv": "t", "dtm": 17}),
                "parameter `dtm` must be a string, found a number",
            ),
            (
                json!(["e", "pv"]),
                "event is not a JSON object of parameters, found an array",
            ),
            (
                json!({"e": "pv", "p": "web", "tv": "t", "dtm": "yesterday"}),
                "parameter `dtm` must be Unix milliseconds, found \"yesterday\"",
            ),
            (
                json!({"e": "pv", "p": "web", "tv": "t", "ttm": "1.5e12"}),
                "parameter `ttm` must be Unix milliseconds",
            ),
            (
                json!({"e": "se", "p": "web", "tv": "t", "se_va": "lots"}),
                "parameter `se_va` must be a number, found \"lots\"",
            ),
            (
                json!({"e": "se", "p": "web", "tv": "t", "se_va": "NaN"}),
                "parameter `se_va` must be a number",
            ),
            (
                json!({"e": "ue", "p": "web", "tv": "t"}),
                "`e` is `ue` but neither `ue_pr` nor `ue_px` is given",
            ),
            (
                json!({"e": "ue", "p": "web", "tv": "t", "ue_px": "bm90IGpzb24"}),
                "parameter `ue_px` does not decode to JSON: ",
            ),
            (
                json!({"e": "ue", "p": "web", "tv": "t", "ue_pr": "[]"}),
                "parameter `ue_pr` must be a JSON object, found an array",
            ),
            (
                json!({"e": "ue", "p": "web", "tv": "t", "ue_pr": r#"{"schema":"iglu:com.acme/x/jsonschema/1-0-0","data":{}}"#}),
                "parameter `ue_pr`: `schema` must be iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-<n>",
            ),
            (
                json!({"e": "ue", "p": "web", "tv": "t", "ue_pr": r#"{"schema":"iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0","data":{"schema":"link_click","data":{}}}"#}),
                "parameter `ue_pr`: `data.schema` is not an Iglu URI",
            ),
            (
                json!({"e": "ue", "p": "web", "tv": "t", "ue_pr": r#"{"schema":"iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0","data":{"schema":"iglu:a/b/jsonschema/1-0-0"}}"#}),
                "parameter `ue_pr`: `data` must hold `schema` and `data`",
            ),
            (
                json!({"e": "pv", "p": "web", "tv": "t", "co": r#"{"schema":"iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1","data":{}}"#}),
                "parameter `co`: `data` must be an array of entities, found an object",
            ),
            (
                json!({"e": "pv", "p": "web", "tv": "t", "co": r#"{"schema":"iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1","data":[{"data":{}}]}"#}),
                "parameter `co`: entity 0 must be an object with an Iglu `schema` and `data`",
            ),
            (
                json!({"e": "pv", "p": "web", "tv": "t", "co": "{}"}),
                "parameter `co` must hold `schema` and `data`",
            ),
        ];
        for (item, expected) in cases {
            let event = post_one(item.clone());
            assert!(
                reason(&event).starts_with(expected),
                "{item}: {:?} does not start with {expected:?}",
                reason(&event)
            );
        }
    }

    #[test]
    fn event_types_and_identifiers() {
        use serde_json::json;
        for (e, name) in [
            ("pv", "page_view"),
            ("pp", "page_ping"),
            ("se", "structured"),
            ("tr", "transaction"),
            ("ti", "transaction_item"),
            ("ad_impression", "ad_impression"),
        ] {
            assert_eq!(post_one(json!({"e": e, "p": "mob", "tv": "t"})).name, name);
        }
        // `tnuid` wins `network_user_id`; `nuid` stays under its own name. An unknown key that
        // collides with a mapped name is kept with a prefix. Without `uid`, no user id.
        let event = post_one(
            json!({"e": "pv", "p": "web", "tv": "t", "tnuid": "t-1", "nuid": "n-1",
            "duid": "d-1", "page_url": "/mine", "url": "/x"}),
        );
        assert_eq!(event.user_id, None);
        assert_eq!(event.attrs["network_user_id"], text("t-1"));
        assert_eq!(event.attrs["nuid"], text("n-1"));
        assert_eq!(event.attrs["domain_user_id"], text("d-1"));
        assert_eq!(event.attrs["page_url"], text("/x"));
        assert_eq!(event.attrs["param_page_url"], text("/mine"));
        // ue_pr wins over ue_px; the unused ue_px is kept as text.
        let event = post_one(json!({"e": "ue", "p": "web", "tv": "t",
            "ue_pr": r#"{"schema":"iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0","data":{"schema":"iglu:com.acme/a/jsonschema/1-0-0","data":{"k":1}}}"#,
            "ue_px": "e30"}));
        assert_eq!(event.name, "a");
        assert_eq!(event.attrs["ue_px"], text("e30"));
        // No ip / ua anywhere: no attrs invented.
        let bare = Received {
            receive_time_ms: 5,
            stream: "s".into(),
            ip: None,
            user_agent: None,
        };
        let event = decode_get("e=pv&p=web&tv=t", &bare).unwrap();
        assert_eq!(event.event_time_ms, 5);
        assert_eq!(
            event.attrs.keys().collect::<Vec<_>>(),
            ["platform", "tracker_version"]
        );
    }

    #[test]
    fn derived_timestamp() {
        const RECEIVED: i64 = 1_000_000;
        // Device clock an hour behind, 2 s between creation and sending.
        let hour_ms = 3_600_000;
        assert_eq!(
            event_time_ms(
                RECEIVED,
                None,
                Some(RECEIVED - hour_ms - 2_000),
                Some(RECEIVED - hour_ms)
            ),
            RECEIVED - 2_000
        );
        assert_eq!(event_time_ms(RECEIVED, Some(7), Some(1), Some(2)), 7);
        assert_eq!(event_time_ms(RECEIVED, None, Some(9), None), 9);
        assert_eq!(event_time_ms(RECEIVED, None, None, Some(9)), RECEIVED);
        assert_eq!(event_time_ms(RECEIVED, None, None, None), RECEIVED);
        // Overflow falls back to the device time instead of wrapping.
        assert_eq!(
            event_time_ms(RECEIVED, None, Some(i64::MIN), Some(i64::MAX)),
            i64::MIN
        );
    }

    #[test]
    fn get_query_errors_and_dead_letters() {
        let received = received();
        for (query, expected) in [
            (
                "",
                "query string: no parameters (expected e=...&p=...&tv=...)",
            ),
            (
                "&&",
                "query string: no parameters (expected e=...&p=...&tv=...)",
            ),
            (
                "e=pv&p=web&tv=t&url=100%",
                "query string: invalid percent-escape \"%\": `%` must be followed by two hex digits",
            ),
            (
                "e=pv&p=%zzweb&tv=t",
                "query string: invalid percent-escape \"%zz\": `%` must be followed by two hex digits",
            ),
            (
                "e=pv&p=%ff&tv=t",
                "query string: \"%ff\" is not UTF-8 after percent-decoding",
            ),
            (
                "e=pv&=web",
                "query string: parameter without a name in \"=web\"",
            ),
        ] {
            assert_eq!(
                decode_get(query, &received).unwrap_err().to_string(),
                expected,
                "{query:?}"
            );
        }
        let query = "e=pv&p=web&tv=t&e=pp";
        let event = decode_get(query, &received).unwrap();
        assert_eq!(reason(&event), "parameter `e` given more than once");
        assert_eq!(event.attrs["raw"], text(query));
        let event = decode_get("p=web&tv=t&ue_pr=%7Bnot", &received).unwrap();
        assert!(reason(&event).starts_with("missing required parameter `e`"));
        let event = decode_get("e=ue&p=web&tv=t&ue_pr=%7Bnot", &received).unwrap();
        assert!(reason(&event).starts_with("parameter `ue_pr` is not JSON"));
        // A key without `=` is an empty (absent) value.
        let event = decode_get("e=pv&p=web&tv=t&uid", &received).unwrap();
        assert_eq!(event.user_id, None);
    }

    #[test]
    fn request_level_errors() {
        let received = received();
        let cases = [
            (&b" \n"[..], DecodeError::Empty),
            (fixture!("bad_body_array.json").as_bytes(), DecodeError::NotAnObject { found: "an array" }),
            (fixture!("bad_body_wrong_schema.json").as_bytes(), DecodeError::Schema {
                found: "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/2-0-0".to_owned(),
            }),
            (fixture!("bad_body_no_data.json").as_bytes(), DecodeError::Data { found: "nothing" }),
            (fixture!("bad_body_empty_data.json").as_bytes(), DecodeError::NoEvents),
            (br#"{"data":[]}"#, DecodeError::Schema { found: "nothing".to_owned() }),
            (br#"{"schema":1,"data":[]}"#, DecodeError::Schema { found: "a number".to_owned() }),
            (br#"{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-","data":[]}"#,
                DecodeError::Schema { found: "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-".to_owned() }),
            (br#"{"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4","data":{}}"#,
                DecodeError::Data { found: "an object" }),
        ];
        for (body, expected) in cases {
            assert_eq!(
                decode_post(body, &received),
                Err(expected),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let error =
            decode_post(fixture!("bad_body_not_json.txt").as_bytes(), &received).unwrap_err();
        assert!(matches!(error, DecodeError::Syntax(_)), "{error:?}");
        assert_eq!(
            DecodeError::Schema { found: "x".into() }.to_string(),
            "`schema` must be iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-<n>, found x"
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_post(&bytes, &received());
            let _ = decode_get(&String::from_utf8_lossy(&bytes), &received());
        }

        #[test]
        fn every_item_becomes_exactly_one_event(
            values in proptest::collection::vec("[a-zA-Z0-9%+=/_{}\":-]{0,24}", 0..8)
        ) {
            let keys = ["e", "p", "tv", "dtm", "stm", "ue_pr", "ue_px", "cx", "co", "se_va"];
            let item: Map<String, Json> = keys
                .iter()
                .zip(&values)
                .map(|(key, value)| ((*key).to_owned(), Json::String(value.clone())))
                .collect();
            let body = serde_json::json!({
                "schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-0",
                "data": [item.clone(), item],
            });
            let events = decode_post(body.to_string().as_bytes(), &received()).unwrap();
            proptest::prop_assert_eq!(events.len(), 2);
            let query: Vec<String> = keys.iter().zip(&values).map(|(k, v)| format!("{k}={v}")).collect();
            let _ = decode_get(&query.join("&"), &received());
        }
    }
}
