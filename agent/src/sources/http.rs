//! The HTTP source: generic JSON (`POST /v1/events`), the Snowplow tracker protocol
//! (`POST /com.snowplowanalytics.snowplow/tp2`, pixel `GET /i`), the Segment HTTP tracking API
//! (`POST /v1/track|page|screen|identify|group|alias|batch` and analytics.js's `/v1/t|p|s|i|g|a`),
//! CORS for browser trackers. (`/healthz`, `/readyz` and `/v1/status` are merged in from
//! [`crate::ops`].)
//!
//! A 2xx answer means every event of the request is committed to the buffer. Any other answer
//! means none of them is: the client must retry. 400 carries the reason for malformed input, 401
//! a missing or wrong token / write key, 413 a body over `sources.http.max_body_bytes`, 503 (with
//! `Retry-After`) a full buffer. Items a tracker protocol accepts but that do not decode become
//! dead letters (stored, with the reason), as Snowplow's collector does with bad rows.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use runnel_common::{Event, SourceKind};
use runnel_config::{HttpSourceConfig, SegmentConfig, SnowplowConfig};

use crate::buffer::{AppendError, Appended, Buffer, EncodedEvent};
use crate::decode::{self, Received};
use crate::pipeline::PipelineHandle;

/// Seconds a client should wait before retrying when the buffer is full. Short: the buffer drains
/// as fast as the uplink ships, and clients back off on repeated 503s anyway.
const RETRY_AFTER_FULL_S: u64 = 1;

/// How often a request blocked on a full buffer tries again.
const BLOCK_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(25);

/// A transparent 1x1 GIF: the answer to Snowplow's pixel GET.
const PIXEL_GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x01, 0x44, 0x00, 0x3b,
];

/// The default of `sources.http.stream`: where generic JSON events without a stream land.
pub const DEFAULT_STREAM: &str = "default";

const SNOWPLOW_TP2: &str = "/com.snowplowanalytics.snowplow/tp2";

struct SourceState {
    buffer: Buffer,
    pipeline: PipelineHandle,
    /// `buffer.block_timeout_ms`; a managed config may change it while the agent runs.
    block_timeout_ms: Arc<std::sync::atomic::AtomicU64>,
    http: HttpSourceConfig,
    snowplow: SnowplowConfig,
    segment: SegmentConfig,
}

pub fn router(
    http: &HttpSourceConfig,
    snowplow: &SnowplowConfig,
    segment: &SegmentConfig,
    block_timeout_ms: Arc<std::sync::atomic::AtomicU64>,
    buffer: Buffer,
    pipeline: PipelineHandle,
) -> axum::Router {
    let state = Arc::new(SourceState {
        buffer,
        pipeline,
        block_timeout_ms,
        http: http.clone(),
        snowplow: snowplow.clone(),
        segment: segment.clone(),
    });
    let mut router = axum::Router::new().route("/v1/events", post(post_events));
    if snowplow.enabled {
        router = router
            .route(SNOWPLOW_TP2, post(snowplow_post).get(snowplow_get))
            .route("/i", get(snowplow_get));
    }
    if segment.enabled {
        router = router.route("/v1/{call}", post(segment_post));
    }
    router
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            cors,
        ))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Generic JSON: one object, an array, or NDJSON.
async fn post_events(
    State(state): State<Arc<SourceState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    if !state.http.auth_tokens.is_empty() {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !token.is_some_and(|t| state.http.auth_tokens.iter().any(|known| known == t)) {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "send `Authorization: Bearer <token>` with a token from sources.http.auth_tokens",
            );
        }
    }
    let body = match read_body(&headers, body, state.http.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let received = received(&state.http.stream, peer, &headers);
    let events = match decode::json::decode(&body, received.receive_time_ms, &received.stream) {
        Ok(events) => events,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    match commit(&state, events, Oversized::Refuse, &received).await {
        Ok((n_events, appended)) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "accepted": n_events,
                "dropped": appended.n_dropped,
                "first_seq": appended.first_seq,
                "last_seq": appended.last_seq,
            })),
        )
            .into_response(),
        Err(response) => response,
    }
}

async fn snowplow_post(
    State(state): State<Arc<SourceState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let body = match read_body(&headers, body, state.http.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let received = received(&state.snowplow.stream, peer, &headers);
    let events = match decode::snowplow::decode_post(&body, &received) {
        Ok(events) => events,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    match commit(
        &state,
        events,
        Oversized::DeadLetter(SourceKind::Snowplow),
        &received,
    )
    .await
    {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(response) => response,
    }
}

async fn snowplow_get(
    State(state): State<Arc<SourceState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let received = received(&state.snowplow.stream, peer, &headers);
    let event = match decode::snowplow::decode_get(query.as_deref().unwrap_or(""), &received) {
        Ok(event) => event,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    match commit(
        &state,
        vec![event],
        Oversized::DeadLetter(SourceKind::Snowplow),
        &received,
    )
    .await
    {
        Ok(_) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "image/gif"),
                (header::CACHE_CONTROL, "no-cache, no-store, must-revalidate"),
                (header::PRAGMA, "no-cache"),
                (header::EXPIRES, "0"),
            ],
            PIXEL_GIF,
        )
            .into_response(),
        Err(response) => response,
    }
}

async fn segment_post(
    State(state): State<Arc<SourceState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(call): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(call) = decode::segment::Call::from_path(&call) else {
        return error_response(
            StatusCode::NOT_FOUND,
            &format!(
                "no such endpoint /v1/{call}: Segment calls are track, page, screen, identify, group, alias and batch"
            ),
        );
    };
    let limit = state
        .http
        .max_body_bytes
        .min(decode::segment::MAX_BATCH_BYTES + 1);
    let body = match read_body(&headers, body, limit).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let received = received(&state.segment.stream, peer, &headers);
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let decoded = match decode::segment::decode(call, &body, authorization, &received) {
        Ok(decoded) => decoded,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    if !state.segment.write_keys.is_empty()
        && !decoded
            .write_key
            .as_ref()
            .is_some_and(|key| state.segment.write_keys.contains(key))
    {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "unknown or missing write key: send one of sources.segment.write_keys as the Basic auth user name or as writeKey",
        );
    }
    match commit(&state, decoded.events, Oversized::Refuse, &received).await {
        Ok(_) => (StatusCode::OK, Json(serde_json::json!({ "success": true }))).into_response(),
        Err(response) => response,
    }
}

/// What to do with an event over `sources.http.max_event_bytes`.
enum Oversized {
    /// Refuse the whole request with 413 (the sender can split it).
    Refuse,
    /// Keep a dead letter in its place (trackers cannot act on a 413).
    DeadLetter(SourceKind),
}

/// Encodes and commits events; the error is the response to send.
async fn commit(
    state: &SourceState,
    events: Vec<Event>,
    oversized: Oversized,
    received: &Received,
) -> Result<(usize, Appended), Response> {
    let max_event_bytes = state.http.max_event_bytes;
    // Counted once committed: events by source (a request's events share one, dead letters
    // aside).
    let mut by_source: Vec<(&'static str, u64)> = Vec::new();
    for event in &events {
        let source = event.source.as_str();
        match by_source.iter_mut().find(|(s, _)| *s == source) {
            Some((_, n)) => *n += 1,
            None => by_source.push((source, 1)),
        }
    }
    // Rules may drop, route or add events (alerts); the source's counts above are what arrived.
    let events = state.pipeline.process(events).await;
    let mut encoded = Vec::with_capacity(events.len());
    for (event_idx, event) in events.iter().enumerate() {
        let e = EncodedEvent::encode(event).map_err(|error| {
            error_response(
                StatusCode::BAD_REQUEST,
                &format!("event {event_idx}: {error}"),
            )
        })?;
        if e.bytes.len() <= max_event_bytes {
            encoded.push(e);
            continue;
        }
        let reason = format!(
            "event {event_idx} is {} bytes encoded, over the limit of {max_event_bytes} (sources.http.max_event_bytes)",
            e.bytes.len()
        );
        match oversized {
            Oversized::Refuse => {
                return Err(error_response(StatusCode::PAYLOAD_TOO_LARGE, &reason));
            }
            Oversized::DeadLetter(source) => {
                let raw =
                    serde_json::to_vec(&event.attrs.keys().collect::<Vec<_>>()).unwrap_or_default();
                let dead = decode::dead_letter(source, &reason, &raw, received);
                encoded.push(
                    EncodedEvent::encode(&dead).expect("a dead letter is small and always encodes"),
                );
            }
        }
    }
    let n_events = encoded.len();
    // With `block`, wait up to buffer.block_timeout_ms for the uplink to make room.
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_millis(
            state
                .block_timeout_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    let mut pending = encoded;
    let outcome = loop {
        match state.buffer.append(pending).await {
            Err(AppendError::Full { events, .. }) if tokio::time::Instant::now() < deadline => {
                pending = events;
                tokio::time::sleep(BLOCK_RETRY_INTERVAL).await;
            }
            outcome => break outcome,
        }
    };
    match outcome {
        Ok(appended) => {
            for (source, n) in by_source {
                metrics::counter!("runnel_agent_events_received_total", "source" => source)
                    .increment(n);
            }
            Ok((n_events, appended))
        }
        Err(error @ AppendError::Full { .. }) => {
            let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, &error.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_FULL_S));
            Err(response)
        }
        Err(error) => Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &error.to_string(),
        )),
    }
}

fn received(stream: &str, peer: SocketAddr, headers: &HeaderMap) -> Received {
    Received {
        receive_time_ms: crate::now_unix_ms(),
        stream: stream.to_owned(),
        ip: Some(peer.ip().to_string()),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// CORS for browser trackers: allowed origins get `Access-Control-Allow-Origin` (with
/// credentials, since trackers send cookies), preflights get 204. Requests from other origins
/// are served without CORS headers, so browsers refuse them.
async fn cors(State(state): State<Arc<SourceState>>, request: Request, next: Next) -> Response {
    let allowed = &state.http.cors_allowed_origins;
    let origin = request.headers().get(header::ORIGIN).cloned();
    let allowed_origin = origin.filter(|origin| {
        origin
            .to_str()
            .is_ok_and(|o| allowed.iter().any(|a| a == "*" || a == o))
    });
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    if let Some(origin) = allowed_origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
        if preflight {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("POST, GET, OPTIONS"),
            );
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("Content-Type, Authorization"),
            );
            headers.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("86400"),
            );
        }
    }
    response
}

/// Reads the body up to `max_bytes`, refusing larger ones with a JSON 413 that names the key
/// (before reading, when Content-Length already says so).
///
/// The 413 says `Connection: close`: the rest of the body is never read, so the server closes
/// the connection after answering, and a keep-alive client must not send its next request on
/// it (it would fail with "connection closed before message completed").
async fn read_body(
    headers: &HeaderMap,
    body: axum::body::Body,
    max_bytes: usize,
) -> Result<axum::body::Bytes, Response> {
    let too_large = || {
        let mut response = error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "request body is over the limit of {max_bytes} bytes (sources.http.max_body_bytes); send fewer events per request"
            ),
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, max_bytes)
        .await
        .map_err(|error| {
            let length_limit = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if length_limit {
                too_large()
            } else {
                error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the request body failed: {error}"),
                )
            }
        })
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
