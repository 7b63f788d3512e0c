//! The HTTP SQL API: `POST /api/v1/query` with `{"sql": "..."}`. (`/healthz`, `/readyz` and
//! `/api/v1/status` are merged in from [`crate::ops`].)
//!
//! 200: `{"columns":[{"name","type"}],"rows":[[...]],"n_rows","truncated","elapsed_ms"}`;
//! 400: invalid or non-read SQL; 504: over `query.timeout_ms`; 500: execution failed
//! (for example over `query.memory_limit_bytes`). Errors are `{"error": "..."}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::query::{QueryEngine, QueryError, to_json};

/// Largest accepted request body: SQL text, not data.
const MAX_QUERY_BODY_BYTES: usize = 1024 * 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    sql: String,
}

pub fn router(engine: Arc<QueryEngine>) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/query", post(query))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_QUERY_BODY_BYTES))
        .with_state(engine)
}

async fn query(State(engine): State<Arc<QueryEngine>>, body: axum::body::Bytes) -> Response {
    let request: QueryRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("body must be {{\"sql\": \"...\"}}: {error}"),
            );
        }
    };
    match engine.run(&request.sql).await {
        Ok(result) => (StatusCode::OK, Json(to_json(&result))).into_response(),
        Err(error @ QueryError::Invalid(_)) => {
            error_response(StatusCode::BAD_REQUEST, &error.to_string())
        }
        Err(error @ QueryError::Timeout { .. }) => {
            error_response(StatusCode::GATEWAY_TIMEOUT, &error.to_string())
        }
        Err(error @ QueryError::Execution(_)) => {
            error_response(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string())
        }
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
