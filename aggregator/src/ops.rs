//! Operations: what an operator and a service manager use to see whether the aggregator is
//! alive, ready and keeping up. `GET /healthz` (liveness), `GET /readyz` (readiness) and
//! `GET /api/v1/status` (a JSON summary) on the query API's listener; the systemd notifications
//! (`READY=1` once the WAL is open and ingest listens, `WATCHDOG=1` while the WAL writer lives,
//! `STOPPING=1` on shutdown); and the client behind `runnel-aggregator status`.
//!
//! It only reads state the components already keep (connected agents, store and WAL counts);
//! it must not change anything, and nothing here is on a batch's path.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use runnel_common::human;
use runnel_config::AggregatorConfig;
use runnel_service::probes::{Lifecycle, Probes};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::registry::{ConnectedAgents, IngestSnapshot};
use crate::store::EventStore;
use crate::wal::Wal;

pub const STATUS_PATH: &str = "/api/v1/status";

/// How long `runnel-aggregator status` waits for the answer.
const STATUS_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The addresses the aggregator bound.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Listen {
    pub ingest: String,
    pub query: String,
}

/// Shared by the HTTP handlers, the watchdog and `run`.
pub struct Ops {
    started: Instant,
    started_unix_ms: i64,
    /// Ready once the WAL is open and ingest listens; stopping when shutdown begins.
    lifecycle: Lifecycle,
    /// Cleared when the ingest accept loop ends.
    ingest_running: AtomicBool,
    listen: Listen,
    config: AggregatorConfig,
    wal: Wal,
    store: Arc<EventStore>,
    agents: Arc<ConnectedAgents>,
}

impl Ops {
    pub fn new(
        config: &AggregatorConfig,
        listen: Listen,
        wal: Wal,
        store: Arc<EventStore>,
        agents: Arc<ConnectedAgents>,
    ) -> Ops {
        Ops {
            started: Instant::now(),
            started_unix_ms: crate::wal::now_unix_ms(),
            lifecycle: Lifecycle::default(),
            ingest_running: AtomicBool::new(true),
            listen,
            config: config.clone(),
            wal,
            store,
            agents,
        }
    }

    /// The WAL is open (and replayed) and ingest listens.
    pub fn set_ready(&self) {
        self.lifecycle.set_ready();
    }

    pub fn set_ingest_stopped(&self) {
        self.ingest_running.store(false, Ordering::Relaxed);
    }

    pub fn status(&self) -> AggregatorStatus {
        let summary = self.store.summary();
        let storage = &self.config.storage;
        // The WAL is the SQLite file plus its `-wal` journal (which a checkpoint empties).
        let file_bytes = |path: &Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let mut journal = storage.wal_path.clone().into_os_string();
        journal.push("-wal");
        let wal_file_bytes = file_bytes(&storage.wal_path) + file_bytes(Path::new(&journal));
        AggregatorStatus {
            service: "runnel-aggregator".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_unix_ms: self.started_unix_ms,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ready: self.readiness().is_ok(),
            not_ready_reason: self.readiness().err().map(str::to_owned),
            listen: self.listen.clone(),
            ingest: self.agents.snapshot(),
            wal: WalStatus {
                path: storage.wal_path.display().to_string(),
                synchronous: storage.synchronous.as_str().into(),
                file_bytes: wal_file_bytes,
                n_batches: summary.n_recent_batches,
                n_rows: summary.n_recent_rows,
            },
            storage: StorageStatus {
                events_dir: match &storage.s3 {
                    Some(s3) => s3.url(),
                    None => storage.events_dir.display().to_string(),
                },
                table_version: summary.table_version,
                n_files: summary.n_files,
                n_rows: summary.n_file_rows,
                n_bytes: summary.n_file_bytes,
                flush_interval_ms: storage.flush_interval_ms,
                max_recent_rows: storage.max_recent_rows as u64,
            },
        }
    }
}

/// The answer of `GET /api/v1/status`. Every field has a default so that
/// `runnel-aggregator status` of one version reads the answer of another.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AggregatorStatus {
    pub service: String,
    pub version: String,
    pub pid: u32,
    pub started_unix_ms: i64,
    pub uptime_ms: u64,
    pub ready: bool,
    pub not_ready_reason: Option<String>,
    pub listen: Listen,
    pub ingest: IngestSnapshot,
    pub wal: WalStatus,
    pub storage: StorageStatus,
}

/// Batches committed and not yet in the events table (their rows are queryable from memory).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct WalStatus {
    pub path: String,
    pub synchronous: String,
    /// Size of the SQLite file and its journal.
    pub file_bytes: u64,
    pub n_batches: u64,
    pub n_rows: u64,
}

/// The events table (Delta Lake): the version queries read and its data files.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageStatus {
    pub events_dir: String,
    /// The Delta table version queries read (-1 before it is open).
    pub table_version: i64,
    /// Files, rows and bytes of that version.
    pub n_files: u64,
    pub n_rows: u64,
    pub n_bytes: u64,
    pub flush_interval_ms: u64,
    pub max_recent_rows: u64,
}

/// `/healthz`, `/readyz` and `/api/v1/status`, merged into the query API's router.
pub fn router(ops: Arc<Ops>) -> axum::Router {
    runnel_service::probes::router(Arc::clone(&ops)).merge(
        axum::Router::new()
            .route(STATUS_PATH, get(status))
            .with_state(ops),
    )
}

impl Probes for Ops {
    /// Liveness: the WAL writer thread takes requests. Without it nothing can be acknowledged.
    fn health(&self) -> Result<(), &'static str> {
        if !self.wal.is_open() {
            return Err("the WAL writer thread has stopped");
        }
        Ok(())
    }

    /// Readiness: alive, started, ingest accepting, not shutting down.
    fn readiness(&self) -> Result<(), &'static str> {
        self.health()?;
        self.lifecycle.check()?;
        if !self.ingest_running.load(Ordering::Relaxed) {
            return Err("ingest has stopped accepting connections");
        }
        Ok(())
    }

    fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }
}

async fn status(State(ops): State<Arc<Ops>>) -> Response {
    Json(ops.status()).into_response()
}

// ---------------------------------------------------------------------------------------------
// systemd

/// Tells systemd the aggregator is ready, pings its watchdog while the aggregator is healthy,
/// and marks it stopping at shutdown ([`runnel_service::probes::supervise`]).
///
/// It holds a WAL handle: await it before waiting for that writer thread to end.
pub async fn supervise(ops: Arc<Ops>, shutdown: watch::Receiver<bool>) {
    let status = format!(
        "ingest on {} (QUIC), SQL on {}",
        ops.listen.ingest, ops.listen.query
    );
    runnel_service::probes::supervise(ops, "aggregator", &status, shutdown).await;
}

// ---------------------------------------------------------------------------------------------
// `runnel-aggregator status`

/// The base URL of the running aggregator that uses the config at `config_path`: the query
/// address in its runtime file (`<data_dir>/aggregator.runtime.json`), else `query.listen`.
pub fn local_url(config_path: &Path) -> anyhow::Result<String> {
    let config = runnel_config::load_aggregator(config_path)
        .context("find the aggregator's address (or give it with --url)")?;
    let runtime_path = config.data_dir.join(crate::RUNTIME_FILE);
    let from_runtime = std::fs::read_to_string(&runtime_path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|value| value["query"].as_str().map(str::to_owned));
    Ok(format!(
        "http://{}",
        from_runtime.unwrap_or_else(|| config.query.listen.to_string())
    ))
}

pub async fn fetch_status(base_url: &str) -> anyhow::Result<AggregatorStatus> {
    let url = format!("{}{STATUS_PATH}", base_url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(STATUS_CLIENT_TIMEOUT)
        .build()
        .context("HTTP client")?;
    let response = client.get(&url).send().await.with_context(|| {
        format!("GET {url} (is the aggregator running? `systemctl status runnel-aggregator`)")
    })?;
    let code = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("read the answer of GET {url}"))?;
    anyhow::ensure!(
        code.is_success(),
        "GET {url} answered {code}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    serde_json::from_slice(&body)
        .with_context(|| format!("GET {url}: the answer is not aggregator status JSON"))
}

/// The readable summary `runnel-aggregator status` prints.
pub fn render_status(status: &AggregatorStatus, now_unix_ms: i64) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, text: &str| {
        out.push_str(&format!("{label:<12}{text}\n"));
    };
    let ago = |at_ms: i64| human::duration_ms(u64::try_from(now_unix_ms - at_ms).unwrap_or(0));
    out.push_str(&format!(
        "{} {}, pid {}, up {}: {}\n",
        status.service,
        status.version,
        status.pid,
        human::duration_ms(status.uptime_ms),
        match (&status.ready, &status.not_ready_reason) {
            (true, _) => "ready".to_owned(),
            (false, Some(reason)) => format!("NOT READY ({reason})"),
            (false, None) => "NOT READY".to_owned(),
        }
    ));
    line(
        &mut out,
        "listen",
        &format!(
            "ingest {} (QUIC), SQL {}",
            status.listen.ingest, status.listen.query
        ),
    );
    let ingest = &status.ingest;
    line(
        &mut out,
        "agents",
        &format!(
            "{} connected; since start: {} connections, {} events in {} batches stored",
            ingest.agents.len(),
            human::count(ingest.n_connections_total),
            human::count(ingest.n_events_stored),
            human::count(ingest.n_batches_stored)
        ),
    );
    for agent in &ingest.agents {
        let buffered = match (agent.n_buffered_events, agent.buffered_bytes) {
            (Some(n), Some(bytes)) => format!(
                ", buffered {} events ({}) at last heartbeat",
                human::count(n),
                human::bytes(bytes)
            ),
            _ => String::new(),
        };
        line(
            &mut out,
            "",
            &format!(
                "{} from {} (agent {}), connected {} ago, stored {} events{buffered}",
                agent.agent_id,
                agent.remote,
                agent.agent_version,
                ago(agent.connected_since_unix_ms),
                human::count(agent.n_events_stored),
            ),
        );
    }
    let wal = &status.wal;
    line(
        &mut out,
        "wal",
        &format!(
            "{} rows in {} batches not yet in the table, {} on disk, synchronous = {} ({})",
            human::count(wal.n_rows),
            human::count(wal.n_batches),
            human::bytes(wal.file_bytes),
            wal.synchronous,
            wal.path
        ),
    );
    let storage = &status.storage;
    line(
        &mut out,
        "parquet",
        &format!(
            "{} rows in {} files, {} ({}); flush every {}",
            human::count(storage.n_rows),
            human::count(storage.n_files),
            human::bytes(storage.n_bytes),
            storage.events_dir,
            human::duration_ms(storage.flush_interval_ms)
        ),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_of_another_version_still_reads() {
        let status: AggregatorStatus = serde_json::from_str(
            r#"{"service":"runnel-aggregator","version":"9.9.9","ready":false,
                "not_ready_reason":"starting","future_field":[],
                "ingest":{"agents":[{"agent_id":"edge-1","connected_since_unix_ms":1000}]},
                "wal":{"n_rows":1234}}"#,
        )
        .unwrap();
        let text = render_status(&status, 61_000);
        assert!(text.contains("NOT READY (starting)"), "{text}");
        assert!(text.contains("1 connected"), "{text}");
        assert!(text.contains("edge-1 from"), "{text}");
        assert!(text.contains("connected 1m 0s ago"), "{text}");
        assert!(text.contains("1,234 rows"), "{text}");
    }
}
