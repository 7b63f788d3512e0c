//! The HTTP SQL API: `POST /api/v1/query` with `{"sql": "..."}`. (`/healthz`, `/readyz` and
//! `/api/v1/status` are merged in from [`crate::ops`].)
//!
//! The `Accept` header picks the format: `application/json` (the default):
//! `{"columns":[{"name","type"}],"rows":[[...]],"n_rows","truncated","elapsed_ms"}`, cut at
//! `query.max_result_rows` and flagged `truncated`; `text/csv` (with a header line) or
//! `application/vnd.apache.arrow.stream` (Arrow IPC stream): streamed batch by batch as the
//! query produces them, and a result over `query.max_result_rows` or past `query.timeout_ms`
//! aborts the transfer (never a silently short file).
//!
//! 400: invalid SQL, SQL that is not a read (refused before planning by [`crate::readonly`],
//! with the message every door gives: `Runnel's SQL is read-only: INSERT is refused ...`), or a
//! streamed result known to be over `query.max_result_rows` before its first byte; 401:
//! credentials missing or wrong when `[[query.users]]` exist (HTTP basic auth, checked by
//! [`crate::auth`]); 406: an `Accept`
//! we do not serve; 504: over `query.timeout_ms`; 500: execution failed (for example over
//! `query.memory_limit_bytes`). Errors are `{"error": "..."}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use datafusion::arrow::datatypes::SchemaRef;
use futures::StreamExt;
use runnel_config::QueryUser;

use crate::auth::Credentials;
use crate::query::{QueryEngine, QueryError, QueryStream, to_json};

const CSV: &str = "text/csv";
const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// Largest accepted request body: SQL text, not data.
const MAX_QUERY_BODY_BYTES: usize = 1024 * 1024;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    sql: String,
}

struct Api {
    engine: Arc<QueryEngine>,
    /// No users: no credentials asked (loopback only).
    credentials: Credentials,
}

pub fn router(engine: Arc<QueryEngine>, users: &[QueryUser]) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/query", post(query))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_QUERY_BODY_BYTES))
        .with_state(Arc::new(Api {
            engine,
            credentials: Credentials::new(users),
        }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Csv,
    Arrow,
}

/// The first media type in `Accept` that we serve; JSON without the header.
fn negotiate(headers: &HeaderMap) -> Result<Format, String> {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return Ok(Format::Json);
    };
    let accept = accept.to_str().unwrap_or_default();
    for media in accept.split(',') {
        let media = media.split(';').next().unwrap_or_default().trim();
        match media.to_ascii_lowercase().as_str() {
            "application/json" | "application/*" | "*/*" | "" => return Ok(Format::Json),
            CSV | "text/*" => return Ok(Format::Csv),
            ARROW_STREAM => return Ok(Format::Arrow),
            _ => {}
        }
    }
    Err(format!(
        "Accept: {accept:?} names no format served here; use application/json, {CSV} or \
         {ARROW_STREAM}"
    ))
}

async fn query(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !api.credentials.authorized(&headers) {
        let mut response = error_response(
            StatusCode::UNAUTHORIZED,
            "credentials required: HTTP basic auth with a [[query.users]] name and password",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"runnel\""),
        );
        return response;
    }
    let format = match negotiate(&headers) {
        Ok(format) => format,
        Err(message) => return error_response(StatusCode::NOT_ACCEPTABLE, &message),
    };
    let request: QueryRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("body must be {{\"sql\": \"...\"}}: {error}"),
            );
        }
    };
    let _timer = crate::metrics::QueryTimer::new("http");
    if format == Format::Json {
        return match api.engine.run(&request.sql).await {
            Ok(result) => (StatusCode::OK, Json(to_json(&result))).into_response(),
            Err(error) => query_error(&error),
        };
    }
    match api.engine.stream(&request.sql).await {
        Ok(stream) => streamed(format, stream).await,
        Err(error) => query_error(&error),
    }
}

fn query_error(error: &QueryError) -> Response {
    let status = match error {
        QueryError::Invalid(_) | QueryError::Refused(_) | QueryError::TooManyRows { .. } => {
            StatusCode::BAD_REQUEST
        }
        QueryError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        QueryError::Execution(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, &error.to_string())
}

/// CSV or Arrow IPC, one chunk per record batch. An error before the first batch is still an
/// error status; after it, the body is aborted (the client sees an incomplete transfer).
async fn streamed(format: Format, stream: QueryStream) -> Response {
    let QueryStream {
        schema,
        mut batches,
    } = stream;
    let first = batches.next().await;
    if let Some(Err(error)) = &first {
        return query_error(error);
    }
    let mut encoder = match Encoder::new(format, &schema) {
        Ok(encoder) => encoder,
        Err(error) => {
            return error_response(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error:#}"));
        }
    };
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        _ => ARROW_STREAM,
    };
    let body = futures::stream::iter(first)
        .chain(batches)
        .map(Some)
        .chain(futures::stream::iter([None]))
        .map(move |item| -> Result<axum::body::Bytes, std::io::Error> {
            let bytes = match item {
                Some(Ok(batch)) => encoder.batch(&batch),
                Some(Err(error)) => {
                    tracing::info!(%error, "streamed query aborted");
                    return Err(std::io::Error::other(error.to_string()));
                }
                None => encoder.finish(),
            };
            bytes
                .map(axum::body::Bytes::from)
                .map_err(std::io::Error::other)
        });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Turns record batches into the bytes of one format, chunk by chunk.
enum Encoder {
    Csv { schema: SchemaRef, header: bool },
    Arrow(Box<datafusion::arrow::ipc::writer::StreamWriter<Vec<u8>>>),
}

impl Encoder {
    fn new(format: Format, schema: &SchemaRef) -> anyhow::Result<Encoder> {
        Ok(match format {
            Format::Csv | Format::Json => Encoder::Csv {
                schema: Arc::clone(schema),
                header: true,
            },
            Format::Arrow => Encoder::Arrow(Box::new(
                datafusion::arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)?,
            )),
        })
    }

    fn batch(&mut self, batch: &datafusion::arrow::array::RecordBatch) -> anyhow::Result<Vec<u8>> {
        match self {
            Encoder::Csv { header, .. } => {
                let mut out = Vec::new();
                {
                    let mut writer = datafusion::arrow::csv::WriterBuilder::new()
                        .with_header(*header)
                        .build(&mut out);
                    writer.write(batch)?;
                }
                *header = false;
                Ok(out)
            }
            Encoder::Arrow(writer) => {
                writer.write(batch)?;
                Ok(std::mem::take(writer.get_mut()))
            }
        }
    }

    /// The end of the stream: a CSV of no rows still has its header; Arrow writes its end mark.
    fn finish(&mut self) -> anyhow::Result<Vec<u8>> {
        match self {
            Encoder::Csv {
                schema,
                header: true,
            } => {
                let empty = datafusion::arrow::array::RecordBatch::new_empty(Arc::clone(schema));
                self.batch(&empty)
            }
            Encoder::Csv { header: false, .. } => Ok(Vec::new()),
            Encoder::Arrow(writer) => {
                writer.finish()?;
                Ok(std::mem::take(writer.get_mut()))
            }
        }
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}
