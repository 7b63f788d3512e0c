//! The table benchmark (docs/BENCHMARKS.md, "Storage: the Delta table"): how fast the
//! aggregator's flush commits rows into the Delta table, and how long opening the table takes
//! after many flushes (which checkpoints keep short).
//!
//! 1. Flush throughput: for each flush size, events are committed to the WAL (not timed), then
//!    one flush moves them into the table (timed: Arrow conversion, Parquet encoding, the Delta
//!    commit with the agents' marks, the WAL delete). Printed as events/s and MiB/s of Parquet.
//! 2. Table open: `--flushes` small flushes (one commit each, each followed by compaction as in
//!    the aggregator's flush loop, so an optimize commit every 8 flushes), then the table is opened from
//!    scratch `--runs` times (a new log store each time, as a restarted aggregator or another
//!    engine does); the median is printed with what the log holds (checkpoint version, JSON
//!    commits after it).

#[path = "../bench/events.rs"]
#[allow(dead_code)]
mod events;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use runnel_aggregator::{store, wal};

#[derive(Parser, Debug)]
#[command(about = "Flush throughput into the Delta table, and table-open time after many flushes")]
struct Args {
    /// Flush sizes to measure, in events.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000u64, 100_000, 1_000_000])]
    flush_events: Vec<u64>,
    /// Small flushes (one commit each) before the table is opened.
    #[arg(long, default_value_t = 10_000)]
    flushes: u64,
    /// Events in each small flush.
    #[arg(long, default_value_t = 10)]
    events_per_small_flush: u64,
    /// Agents the events come from (each flush records each agent's mark).
    #[arg(long, default_value_t = 8)]
    agents: u64,
    /// Timed opens of the table; the median is printed.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Working directory (emptied first).
    #[arg(long, default_value = "target/bench-table")]
    dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("runnel-bench-table: error: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("runnel-bench-table: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A store, its table and its WAL in `dir`.
struct Node {
    store: Arc<store::EventStore>,
    wal: wal::Wal,
    thread: wal::WalThread,
    seqs: Vec<u64>,
    agent_ids: Vec<Arc<str>>,
}

impl Node {
    async fn open(dir: &std::path::Path, agents: u64) -> anyhow::Result<Node> {
        let quoted = |path: PathBuf| format!("{:?}", path.display().to_string());
        let text = format!(
            "[aggregator]\ndata_dir = {}\n[ingest]\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"\n\
             [storage]\nsynchronous = \"normal\"\n",
            quoted(dir.to_path_buf())
        );
        let config = runnel_config::parse_aggregator(&text, &dir.join("aggregator.toml"))?;
        let files = store::open_files(&config.storage)?;
        let store = Arc::new(store::EventStore::new(usize::MAX));
        store.open_table(&files).await?;
        let (wal, thread, _) = wal::Wal::open(
            &config.storage.wal_path,
            config.storage.synchronous.as_pragma(),
            Arc::clone(&store) as Arc<dyn wal::CommittedBatches>,
        )?;
        store.reconcile(&wal).await?;
        Ok(Node {
            store,
            wal,
            thread,
            seqs: vec![0; agents as usize],
            agent_ids: (0..agents)
                .map(|idx| Arc::from(format!("edge-{idx:03}")))
                .collect(),
        })
    }

    /// Commits `n` generated events to the WAL, in batches of up to 1,000, agents in turn.
    async fn commit(&mut self, n: u64, anchor_ms: i64) -> anyhow::Result<()> {
        let mut left = n;
        let mut batch_idx = 0u64;
        while left > 0 {
            let size = left.min(1000);
            let body = format!(
                "[{}]",
                events::generate(size as usize, batch_idx, anchor_ms).join(",")
            );
            let mut decoded = runnel_agent::decode::json::decode(body.as_bytes(), anchor_ms, "web")
                .map_err(|error| anyhow::anyhow!("decode generated events: {error}"))?;
            let agent = (batch_idx % self.agent_ids.len() as u64) as usize;
            let after_seq = self.seqs[agent];
            for event in &mut decoded {
                self.seqs[agent] += 1;
                event.seq = self.seqs[agent];
            }
            let batch = runnel_common::batch::encode(after_seq, &decoded)?;
            self.wal
                .commit(wal::CommitRequest {
                    agent_id: Arc::clone(&self.agent_ids[agent]),
                    after_seq,
                    last_seq: self.seqs[agent],
                    events: decoded,
                    batch,
                })
                .await
                .map_err(|error| anyhow::anyhow!("commit: {error}"))?;
            left -= size;
            batch_idx += 1;
        }
        Ok(())
    }

    async fn close(self) -> anyhow::Result<()> {
        drop(self.store);
        drop(self.wal);
        tokio::task::spawn_blocking(move || self.thread.join()).await?;
        Ok(())
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let now_ms = runnel_agent::now_unix_ms();

    println!("| flush size | flush time | events/s | Parquet MiB/s | files |");
    println!("|---|---|---|---|---|");
    let mut node = Node::open(&dir.join("throughput"), args.agents).await?;
    for &n in &args.flush_events {
        node.commit(n, now_ms).await?;
        let before = node.store.summary();
        let started = Instant::now();
        let flushed = node.store.flush(&node.wal).await?;
        let elapsed = started.elapsed();
        let after = node.store.summary();
        anyhow::ensure!(flushed.n_rows == n, "flushed {} of {n}", flushed.n_rows);
        let bytes = after.n_file_bytes.saturating_sub(before.n_file_bytes);
        println!(
            "| {n} events | {:.0} ms | {:.0} | {:.1} | {} |",
            elapsed.as_secs_f64() * 1000.0,
            n as f64 / elapsed.as_secs_f64(),
            bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
            after.n_files - before.n_files
        );
    }
    node.close().await?;

    let mut node = Node::open(&dir.join("open"), args.agents).await?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    for idx in 0..args.flushes {
        node.commit(args.events_per_small_flush, now_ms).await?;
        node.store.flush(&node.wal).await?;
        // As the aggregator's flush loop does after every flush (default compact_min_files).
        node.store.compact(8).await?;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "  {} of {} flushes ({:.1}/s)",
                idx + 1,
                args.flushes,
                (idx + 1) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let writing = started.elapsed();
    let version = node.store.summary().table_version;
    let files = store::open_files(&{
        let text = format!(
            "[ingest]\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"\n[storage]\nevents_dir = {:?}\n",
            dir.join("open/events").display().to_string()
        );
        runnel_config::parse_aggregator(&text, &dir.join("aggregator.toml"))?.storage
    })?;
    node.close().await?;
    println!();
    println!(
        "{} small flushes of {} events: {:.1} s ({:.1} commits/s), table version {version}",
        args.flushes,
        args.events_per_small_flush,
        writing.as_secs_f64(),
        args.flushes as f64 / writing.as_secs_f64()
    );
    let mut opens = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let started = Instant::now();
        let table = store::table::open(Arc::clone(&files.root_store), &files.table_url).await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(
            table.version().and_then(|v| i64::try_from(v).ok()) == Some(version),
            "opened version {:?}, expected {version}",
            table.version()
        );
        opens.push(elapsed);
    }
    opens.sort();
    let log_dir = dir.join("open/events/_delta_log");
    let checkpoint: serde_json::Value = serde_json::from_slice(
        &std::fs::read(log_dir.join("_last_checkpoint")).context("read _last_checkpoint")?,
    )?;
    let checkpoint_version = checkpoint["version"].as_i64().unwrap_or(-1);
    println!(
        "open after {} commits: median {:.1} ms (min {:.1}, max {:.1}); it reads the checkpoint \
         of version {checkpoint_version} and {} JSON commits after it",
        version,
        opens[opens.len() / 2].as_secs_f64() * 1000.0,
        opens[0].as_secs_f64() * 1000.0,
        opens[opens.len() - 1].as_secs_f64() * 1000.0,
        version - checkpoint_version
    );
    Ok(())
}
