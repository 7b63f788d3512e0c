//! Fleet HTTP API, on the query listener and behind the same basic auth as `/api/v1/query`:
//!
//! - `POST /api/v1/config`: `{"document": "<TOML>", "files": [{"name", "content_base64"}],
//!   "selector": "site=berlin", "canary": "10%", "wave": "25%", "bake": "2m",
//!   "apply_timeout": "1m", "note": "..."}`: validates, stores the document, starts a rollout;
//!   201 with the rollout, 400 naming the key when the document is invalid, 409 while another
//!   rollout runs.
//! - `GET /api/v1/rollouts`, `GET /api/v1/rollouts/{id}`, `POST /api/v1/rollouts/{id}/abort`.
//! - `GET /api/v1/agents?selector=...`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use runnel_config::QueryUser;
use serde::{Deserialize, Serialize};

use crate::auth::Credentials;

use super::rollout::{Rollout, Step};
use super::selector::Selector;
use super::{Fleet, FleetError, PushRequest};

/// Largest push request: a full push in base64 and its JSON around it.
const MAX_PUSH_BODY_BYTES: usize =
    runnel_common::limits::MAX_CONFIG_PUSH_BYTES / 3 * 4 + 1024 * 1024;

struct FleetApi {
    fleet: Arc<Fleet>,
    credentials: Credentials,
}

pub fn router(fleet: Arc<Fleet>, users: &[QueryUser]) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/config", post(push))
        .route("/api/v1/rollouts", get(rollouts))
        .route("/api/v1/rollouts/{id}", get(rollout))
        .route("/api/v1/rollouts/{id}/abort", post(abort))
        .route("/api/v1/agents", get(agents))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_PUSH_BODY_BYTES))
        .with_state(Arc::new(FleetApi {
            fleet,
            credentials: Credentials::new(users),
        }))
}

/// A duration as `500ms`, `30s`, `2m`, `1h`, or a number of milliseconds.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum DurationArg {
    Ms(u64),
    Text(String),
}

/// `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds, in milliseconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 30s, 2m or 1h"))?;
    let factor = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "{text:?} is not a duration such as 500ms, 30s, 2m or 1h"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too long"))
}

impl DurationArg {
    fn millis(&self, key: &str) -> Result<u64, String> {
        match self {
            DurationArg::Ms(ms) => Ok(*ms),
            DurationArg::Text(text) => parse_duration(text).map_err(|e| format!("{key}: {e}")),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushFile {
    pub name: String,
    pub content_base64: String,
}

/// The body of `POST /api/v1/config`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushBody {
    pub document: String,
    #[serde(default)]
    pub files: Vec<PushFile>,
    #[serde(default)]
    pub selector: String,
    #[serde(default)]
    pub canary: Option<String>,
    #[serde(default)]
    pub wave: Option<String>,
    #[serde(default)]
    pub bake: Option<DurationArg>,
    #[serde(default)]
    pub apply_timeout: Option<DurationArg>,
    #[serde(default)]
    pub note: String,
}

impl PushBody {
    fn into_request(self) -> Result<PushRequest, String> {
        let mut files = BTreeMap::new();
        for file in self.files {
            let content = base64::engine::general_purpose::STANDARD
                .decode(file.content_base64.trim())
                .map_err(|e| format!("files[{:?}].content_base64: {e}", file.name))?;
            if files.insert(file.name.clone(), content).is_some() {
                return Err(format!("file {:?} is sent twice", file.name));
            }
        }
        let step = |key: &str, text: &Option<String>| -> Result<Option<Step>, String> {
            text.as_deref()
                .map(|t| Step::parse(t).map_err(|e| format!("{key}: {e}")))
                .transpose()
        };
        Ok(PushRequest {
            document: self.document,
            files,
            selector: self.selector,
            canary: step("canary", &self.canary)?,
            wave: step("wave", &self.wave)?,
            bake_ms: self.bake.map(|d| d.millis("bake")).transpose()?,
            apply_timeout_ms: self
                .apply_timeout
                .map(|d| d.millis("apply_timeout"))
                .transpose()?,
            note: self.note,
        })
    }
}

/// A rollout with its counts per target state.
#[derive(Debug, Serialize)]
pub struct RolloutView<'a> {
    #[serde(flatten)]
    pub rollout: &'a Rollout,
    pub counts: BTreeMap<&'static str, usize>,
}

fn view(rollout: &Rollout) -> serde_json::Value {
    serde_json::to_value(RolloutView {
        rollout,
        counts: rollout.counts(),
    })
    .unwrap_or_default()
}

fn unauthorized() -> Response {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "credentials required: HTTP basic auth with a [[query.users]] name and password",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"runnel\""),
    );
    response
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn fleet_error(e: &FleetError) -> Response {
    let status = match e {
        FleetError::Invalid(_) => StatusCode::BAD_REQUEST,
        FleetError::Conflict(_) => StatusCode::CONFLICT,
        FleetError::NotFound(_) => StatusCode::NOT_FOUND,
        FleetError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &format!("{e:#}"))
}

async fn push(
    State(api): State<Arc<FleetApi>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !api.credentials.authorized(&headers) {
        return unauthorized();
    }
    let body: PushBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let request = match body.into_request() {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let fleet = Arc::clone(&api.fleet);
    // Validation parses TOML and SQLite commits: off the async threads.
    let pushed =
        tokio::task::spawn_blocking(move || fleet.push(request, crate::wal::now_unix_ms())).await;
    match pushed {
        Ok(Ok(rollout)) => (StatusCode::CREATED, Json(view(&rollout))).into_response(),
        Ok(Err(e)) => fleet_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn rollouts(State(api): State<Arc<FleetApi>>, headers: HeaderMap) -> Response {
    if !api.credentials.authorized(&headers) {
        return unauthorized();
    }
    let rollouts = api.fleet.rollouts();
    let list: Vec<serde_json::Value> = rollouts.iter().rev().map(view).collect();
    Json(serde_json::json!({ "rollouts": list })).into_response()
}

async fn rollout(
    State(api): State<Arc<FleetApi>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    if !api.credentials.authorized(&headers) {
        return unauthorized();
    }
    match api.fleet.rollout(id) {
        Some(rollout) => Json(view(&rollout)).into_response(),
        None => error(StatusCode::NOT_FOUND, &format!("no rollout {id}")),
    }
}

async fn abort(
    State(api): State<Arc<FleetApi>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    if !api.credentials.authorized(&headers) {
        return unauthorized();
    }
    let fleet = Arc::clone(&api.fleet);
    let aborted =
        tokio::task::spawn_blocking(move || fleet.abort(id, crate::wal::now_unix_ms())).await;
    match aborted {
        Ok(Ok(rollout)) => Json(view(&rollout)).into_response(),
        Ok(Err(e)) => fleet_error(&e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct AgentsQuery {
    #[serde(default)]
    selector: Option<String>,
}

async fn agents(
    State(api): State<Arc<FleetApi>>,
    headers: HeaderMap,
    Query(query): Query<AgentsQuery>,
) -> Response {
    if !api.credentials.authorized(&headers) {
        return unauthorized();
    }
    let selector = match query.selector.as_deref().map(Selector::parse).transpose() {
        Ok(selector) => selector,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let agents = api.fleet.agents(selector.as_ref());
    Json(serde_json::json!({ "agents": agents })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(500));
        assert_eq!(parse_duration("30s"), Ok(30_000));
        assert_eq!(parse_duration("2m"), Ok(120_000));
        assert_eq!(parse_duration("1h"), Ok(3_600_000));
        assert_eq!(parse_duration("5"), Ok(5_000));
        assert!(parse_duration("2 weeks").is_err() && parse_duration("m").is_err());
    }
}
