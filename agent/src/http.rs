//! The HTTP source: `POST /v1/events` with one JSON object, an array, or NDJSON; `GET /healthz`.
//!
//! A 2xx answer means every event of the request is committed to the buffer. Any other answer
//! means none of them is: the client must retry. 400 carries the reason for malformed input, 413
//! a body over `sources.http.max_body_bytes`, 503 (with `Retry-After`) a full buffer.

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
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
    max_event_bytes: usize,
}

pub fn router(config: &HttpSourceConfig, buffer: Buffer) -> axum::Router {
    let state = Arc::new(SourceState {
        buffer,
        max_event_bytes: config.max_event_bytes,
    });
    axum::Router::new()
        .route("/v1/events", post(post_events))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state)
}

async fn post_events(State(state): State<Arc<SourceState>>, body: axum::body::Bytes) -> Response {
    let receive_time_ms = crate::now_unix_ms();
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

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
