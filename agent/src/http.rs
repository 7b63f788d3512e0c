//! The HTTP source: `POST /v1/events` with one JSON object, an array, or NDJSON; `GET /healthz`.
//!
//! A 2xx answer means every event of the request is committed to the buffer. Any other answer
//! means none of them is: the client must retry. 400 carries the reason for malformed input, 413
//! a body over `sources.http.max_body_bytes`, 503 (with `Retry-After`) a full buffer.

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use runnel_config::HttpSourceConfig;

use crate::buffer::{AppendError, Buffer, EncodedEvent};
use crate::decode;

/// Stream name for events that do not name one.
pub const DEFAULT_STREAM: &str = "default";

/// Seconds a client should wait before retrying when the buffer is full. Short: the buffer drains
/// as fast as the uplink ships, and clients back off on repeated 503s anyway.
const RETRY_AFTER_FULL_S: u64 = 1;

struct SourceState {
    buffer: Buffer,
    max_body_bytes: usize,
    max_event_bytes: usize,
}

pub fn router(config: &HttpSourceConfig, buffer: Buffer) -> axum::Router {
    let state = Arc::new(SourceState {
        buffer,
        max_body_bytes: config.max_body_bytes,
        max_event_bytes: config.max_event_bytes,
    });
    axum::Router::new()
        .route("/v1/events", post(post_events))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn post_events(
    State(state): State<Arc<SourceState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let receive_time_ms = crate::now_unix_ms();
    let body = match read_body(&headers, body, state.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let events = match decode::json::decode(&body, receive_time_ms, DEFAULT_STREAM) {
        Ok(events) => events,
        Err(error) => return error_response(StatusCode::BAD_REQUEST, &error.to_string()),
    };
    let mut encoded = Vec::with_capacity(events.len());
    for (event_idx, event) in events.iter().enumerate() {
        let e = match EncodedEvent::encode(event) {
            Ok(e) => e,
            Err(error) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("event {event_idx}: {error}"),
                );
            }
        };
        if e.0.len() > state.max_event_bytes {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "event {event_idx} is {} bytes encoded, over the limit of {} (sources.http.max_event_bytes)",
                    e.0.len(),
                    state.max_event_bytes
                ),
            );
        }
        encoded.push(e);
    }
    let n_events = encoded.len();
    match state.buffer.append(encoded).await {
        Ok(appended) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "accepted": n_events,
                "first_seq": appended.first_seq,
                "last_seq": appended.last_seq,
            })),
        )
            .into_response(),
        Err(error @ AppendError::Full { .. }) => {
            let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, &error.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_FULL_S));
            response
        }
        Err(error) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

/// Reads the body up to `max_bytes`, refusing larger ones with a JSON 413 that names the key
/// (before reading, when Content-Length already says so).
async fn read_body(
    headers: &HeaderMap,
    body: axum::body::Body,
    max_bytes: usize,
) -> Result<axum::body::Bytes, Response> {
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "request body is over the limit of {max_bytes} bytes (sources.http.max_body_bytes); send fewer events per request"
            ),
        )
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
