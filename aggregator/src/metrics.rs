//! Prometheus `GET /metrics` on the query API's listener (no credentials, like `/healthz`).
//!
//! Two kinds of series. Events as they happen go through the `metrics` facade where they occur
//! (`runnel_aggregator_stored_events_total` per agent, the flush latency histogram; the query
//! latency histogram through [`QueryTimer`], which each SQL door holds while it answers).
//! State the aggregator already keeps (WAL and table sizes, connected agents and their last
//! heartbeat) is read from [`Ops::status`] at scrape time.
//!
//! Names follow Prometheus conventions: `_total` counters, `_seconds`, `_bytes`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use runnel_common::exposition::Exposition;

use crate::ops::Ops;

/// The process's recorder; see [`runnel_service::metrics::install`].
pub use runnel_service::metrics::install;

/// Records `runnel_aggregator_query_duration_seconds` for one query at one door (`interface`:
/// `http`, `pgwire`) when dropped; for streamed answers that is when the first batch is ready.
pub struct QueryTimer {
    interface: &'static str,
    started: std::time::Instant,
}

impl QueryTimer {
    pub fn new(interface: &'static str) -> QueryTimer {
        QueryTimer {
            interface,
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for QueryTimer {
    fn drop(&mut self) {
        ::metrics::histogram!("runnel_aggregator_query_duration_seconds", "interface" => self.interface)
            .record(self.started.elapsed().as_secs_f64());
    }
}

pub fn router(ops: Arc<Ops>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(ops)
}

async fn scrape(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    let status = ops.status();
    let mut text = String::new();
    if let Some(handle) = install() {
        text.push_str(&handle.render());
    }
    let mut out = Exposition(&mut text);
    out.gauge("runnel_aggregator_up", "1 while the aggregator runs.", 1.0);
    out.gauge(
        "runnel_aggregator_ready",
        "1 when the WAL is open and replayed and ingest listens.",
        f64::from(u8::from(status.ready)),
    );
    out.gauge(
        "runnel_aggregator_connected_agents",
        "Agent connections open now.",
        status.ingest.agents.len() as f64,
    );
    out.counter(
        "runnel_aggregator_agent_connections_total",
        "Agent connections accepted since start.",
        status.ingest.n_connections_total,
    );
    out.gauge(
        "runnel_aggregator_wal_bytes",
        "Size of the WAL: the SQLite file and its journal.",
        status.wal.file_bytes as f64,
    );
    out.gauge(
        "runnel_aggregator_wal_batches",
        "Batches in the WAL, not yet committed to the events table.",
        status.wal.n_batches as f64,
    );
    out.gauge(
        "runnel_aggregator_recent_rows",
        "Rows in memory, not yet committed to the events table (each also in the WAL).",
        status.wal.n_rows as f64,
    );
    out.gauge(
        "runnel_aggregator_parquet_files",
        "Data files (Parquet) of the events table's current version.",
        status.storage.n_files as f64,
    );
    out.gauge(
        "runnel_aggregator_parquet_rows",
        "Rows in the events table's current version.",
        status.storage.n_rows as f64,
    );
    out.gauge(
        "runnel_aggregator_parquet_bytes",
        "Bytes of the data files of the events table's current version.",
        status.storage.n_bytes as f64,
    );
    out.labelled_gauges(
        "runnel_aggregator_agent_buffered_events",
        "Events held in each connected agent's buffer, as of its last heartbeat.",
        "agent_id",
        status
            .ingest
            .agents
            .iter()
            .filter_map(|a| Some((a.agent_id.as_str(), a.n_buffered_events? as f64))),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
