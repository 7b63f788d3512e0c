//! runnel-aggregator: accepts batches from the fleet over QUIC, commits them to a SQLite WAL
//! before acknowledging, keeps them queryable in memory, flushes them to a Delta Lake table
//! partitioned by event date and hour, and answers SQL over all of it.
//!
//! Codemap: [`ingest`] (QUIC server, mTLS identity, chain order; connections in [`registry`]) ->
//! [`wal`] (durable commit, high-water marks, one writer thread) -> [`store`] (recent Arrow
//! rows and the Delta table, [`faults`] for crash tests) -> [`query`] (DataFusion, with [`catalog`], [`functions`],
//! [`agents_table`] and [`federation`]) -> the doors: [`api`] (HTTP) and [`pgwire`] (PostgreSQL
//! protocol), both behind [`readonly`] and [`auth`]. [`ops`] serves health, readiness and status
//! and talks to systemd; [`metrics`] serves `/metrics`; [`certs`] is the fleet PKI; [`cli`] the
//! commands, with [`render`] for their tables. [`fleet`] stores managed config documents and
//! rolls them out to agents over the control stream (canary, gate, waves).

pub mod agents_table;
pub mod api;
pub mod auth;
pub mod catalog;
pub mod certs;
pub mod cli;
pub mod faults;
pub mod federation;
pub mod fleet;
pub mod functions;
pub mod ingest;
pub mod metrics;
pub mod ops;
pub mod pgwire;
pub mod query;
pub mod readonly;
pub mod registry;
pub mod render;
pub mod schema;
pub mod store;
pub mod wal;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use runnel_config::AggregatorConfig;
use tokio::sync::watch;

/// File in `data_dir` where a running aggregator writes the addresses it bound.
pub const RUNTIME_FILE: &str = "aggregator.runtime.json";

/// Runs the aggregator until `shutdown` becomes true.
pub async fn run(
    config: AggregatorConfig,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Before anything records: the facade drops what arrives with no recorder installed.
    crate::metrics::install();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create aggregator.data_dir {}", config.data_dir.display()))?;
    let files = store::open_files(&config.storage)?;
    let store = Arc::new(store::EventStore::new(config.storage.max_recent_rows));
    let table_version = store.open_table(&files).await?;
    tracing::info!(table = %files.table_url, version = table_version, "events table opened");
    let (wal, wal_thread, recovered) = wal::Wal::open(
        &config.storage.wal_path,
        config.storage.synchronous.as_pragma(),
        Arc::clone(&store) as Arc<dyn wal::CommittedBatches>,
    )?;
    store::convert::previous_layout(&store, &wal, &files, None).await?;
    // Before any query or flush: WAL batches a crash left behind after their commit are dropped.
    let reconciled = store.reconcile(&wal).await?;
    if reconciled.n_batches > 0 {
        tracing::info!(
            n_batches = reconciled.n_batches,
            n_rows = reconciled.n_rows,
            "dropped WAL batches the events table already holds (a crash came after their commit)"
        );
    }
    let engine = Arc::new(query::QueryEngine::new(
        &config.query,
        Arc::clone(&store),
        &files,
    )?);
    engine.create_views().await?;
    engine.register_federation(&config.federation).await;

    let endpoint = ingest::endpoint(&config.ingest)?;
    let ingest_addr = endpoint.local_addr().context("read ingest address")?;
    let query_listener = tokio::net::TcpListener::bind(config.query.listen)
        .await
        .with_context(|| format!("bind query.listen = {}", config.query.listen))?;
    let query_addr = query_listener.local_addr().context("read query address")?;
    let pgwire_listener = match config.pgwire.listen {
        Some(listen) => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("bind pgwire.listen = {listen}"))?,
        ),
        None => None,
    };
    let pgwire_addr = match &pgwire_listener {
        Some(listener) => Some(listener.local_addr().context("read pgwire address")?),
        None => None,
    };
    let runtime_path = config.data_dir.join(RUNTIME_FILE);
    let mut runtime = serde_json::json!({
        "pid": std::process::id(),
        "ingest": ingest_addr.to_string(),
        "query": query_addr.to_string(),
    });
    if let Some(addr) = pgwire_addr {
        runtime["pgwire"] = serde_json::Value::String(addr.to_string());
    }
    std::fs::write(&runtime_path, runtime.to_string())
        .with_context(|| format!("write {}", runtime_path.display()))?;
    tracing::info!(
        ingest = %ingest_addr,
        query = %query_addr,
        pgwire = %pgwire_addr.map_or_else(|| "disabled".to_owned(), |addr| addr.to_string()),
        n_query_users = config.query.users.len(),
        n_replayed_events = recovered.n_events,
        "aggregator started"
    );
    let pgwire = pgwire_listener.map(|listener| {
        tokio::spawn(pgwire::serve(
            listener,
            engine.context().clone(),
            config.query.clone(),
            shutdown.clone(),
        ))
    });

    let agents = Arc::new(registry::ConnectedAgents::default());
    engine.register_agents(Arc::clone(&agents), wal.clone())?;
    let fleet = Arc::new(fleet::Fleet::open(
        &config.data_dir,
        Arc::clone(&agents),
        config.fleet,
    )?);
    engine.register_fleet(Arc::clone(&fleet), Arc::clone(&agents), wal.clone())?;
    let fleet_driver = {
        let (events_tx, events_rx) = tokio::sync::mpsc::channel(fleet::EVENT_QUEUE);
        agents.set_fleet(events_tx);
        tokio::spawn(fleet::drive(
            Arc::clone(&fleet),
            events_rx,
            shutdown.clone(),
        ))
    };
    let ops = Arc::new(ops::Ops::new(
        &config,
        ops::Listen {
            ingest: ingest_addr.to_string(),
            query: query_addr.to_string(),
        },
        wal.clone(),
        Arc::clone(&store),
        Arc::clone(&agents),
    ));
    let ingest = {
        let serve = ingest::serve(
            endpoint,
            config.ingest.clone(),
            wal.clone(),
            agents,
            shutdown.clone(),
        );
        let ops = Arc::clone(&ops);
        tokio::spawn(async move {
            serve.await;
            ops.set_ingest_stopped();
        })
    };
    let flusher = tokio::spawn(flush_loop(
        Arc::clone(&store),
        wal.clone(),
        config.storage.clone(),
        shutdown.clone(),
    ));
    // The WAL is open and replayed, ingest listens: ready (systemd, `/readyz`).
    ops.set_ready();
    let supervisor = tokio::spawn(ops::supervise(Arc::clone(&ops), shutdown.clone()));
    let router = api::router(Arc::clone(&engine), &config.query.users)
        .merge(fleet::api::router(Arc::clone(&fleet), &config.query.users))
        .merge(ops::router(Arc::clone(&ops)))
        .merge(crate::metrics::router(Arc::clone(&ops)));
    axum::serve(query_listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
        .context("query API")?;
    let _ = ingest.await;
    let _ = flusher.await;
    let _ = fleet_driver.await;
    // The last WAL handles besides `wal`: the writer thread ends when all are gone.
    drop(ops);
    let _ = supervisor.await;
    if let Some(pgwire) = pgwire {
        let _ = pgwire.await;
    }
    // A last flush makes the next start faster; skipping it loses nothing (the WAL replays).
    match store.flush(&wal).await {
        Ok(flushed) => tracing::info!(
            n_rows = flushed.n_rows,
            "flushed to the events table at shutdown"
        ),
        Err(error) => tracing::warn!(
            error = format!("{error:#}"),
            "flush at shutdown failed; the WAL will replay"
        ),
    }
    drop(wal);
    // Connection tasks may still hold WAL handles for a moment; the WAL is consistent at every
    // commit, so waiting is a courtesy, not a requirement.
    let joined = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || wal_thread.join()),
    )
    .await;
    if joined.is_err() {
        tracing::warn!("WAL writer still busy at shutdown; exiting anyway (the WAL is consistent)");
    }
    tracing::info!("aggregator stopped");
    Ok(())
}

/// Flushes recent rows to the table every `interval`, or sooner when memory holds too many; then
/// compacts small files, applies retention and vacuums (`storage.*`).
async fn flush_loop(
    store: Arc<store::EventStore>,
    wal: wal::Wal,
    storage: runnel_config::StorageConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = Duration::from_millis(storage.flush_interval_ms);
    let grace = Duration::from_secs(storage.vacuum_grace_minutes.saturating_mul(60));
    // Often enough that a file outlives its grace by at most about as long again.
    let vacuum_every = grace.min(Duration::from_secs(600));
    let mut last_vacuum = std::time::Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = store.flush_wanted() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let flush_started = std::time::Instant::now();
        let flushed = store.flush(&wal).await;
        ::metrics::histogram!("runnel_aggregator_flush_duration_seconds")
            .record(flush_started.elapsed().as_secs_f64());
        match flushed {
            Ok(flushed) if flushed.n_rows > 0 => {
                tracing::info!(
                    n_rows = flushed.n_rows,
                    n_batches = flushed.n_batches,
                    version = flushed.version,
                    "flushed to the events table"
                );
            }
            Ok(_) => {}
            // Rows stay in memory and in the WAL; the next tick retries.
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "flush to the events table failed"
            ),
        }
        match store.compact(storage.compact_min_files).await {
            Ok(done) if done.n_files_removed > 0 => tracing::info!(
                n_files_merged = done.n_files_removed,
                n_files_written = done.n_files_added,
                n_rows = done.n_rows,
                "compacted Parquet files"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(error = format!("{error:#}"), "compaction failed"),
        }
        if storage.retention_hours > 0 {
            let retention_ms = i64::try_from(storage.retention_hours)
                .unwrap_or(i64::MAX / 3_600_000)
                .saturating_mul(3_600_000);
            let cutoff_ms = wal::now_unix_ms().saturating_sub(retention_ms);
            match store.expire(cutoff_ms).await {
                Ok(done) if done.n_files_removed > 0 => tracing::info!(
                    n_files = done.n_files_removed,
                    n_rows = done.n_rows,
                    retention_hours = storage.retention_hours,
                    "deleted expired partitions"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(error = format!("{error:#}"), "retention failed"),
            }
        }
        if last_vacuum.elapsed() >= vacuum_every {
            last_vacuum = std::time::Instant::now();
            match store.vacuum(grace).await {
                Ok(n) if n > 0 => tracing::info!(
                    n_files = n,
                    vacuum_grace_minutes = storage.vacuum_grace_minutes,
                    "deleted files no table version references"
                ),
                Ok(_) => {}
                Err(error) => tracing::warn!(error = format!("{error:#}"), "vacuum failed"),
            }
        }
    }
}
