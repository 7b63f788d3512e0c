//! The physical limit: the same events, decoded and encoded exactly as the agent stores them,
//! inserted straight into SQLite with rusqlite: WAL mode, the same `synchronous` level and the
//! same table as the agent's buffer, in transactions of a fixed number of rows. No HTTP, no
//! JSON parsing, no queue, no network: what is left is SQLite and the disk's fsync.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::{Connection, params};

#[derive(Debug, Clone)]
pub struct RawResult {
    pub rows_per_tx: usize,
    pub n_events: usize,
    pub elapsed: Duration,
    /// False when the deadline cut the run short (then `n_events` is what was inserted).
    pub complete: bool,
}

impl RawResult {
    pub fn events_per_s(&self) -> f64 {
        self.n_events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Inserts `blobs` into a fresh database at `path`, `rows_per_tx` rows per transaction, until
/// done or `time_limit` passed (checked between transactions).
pub fn run(
    path: &Path,
    synchronous: &str,
    blobs: &[Vec<u8>],
    rows_per_tx: usize,
    time_limit: Duration,
) -> anyhow::Result<RawResult> {
    let conn = Connection::open(path).with_context(|| format!("open {}", path.display()))?;
    let journal_mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    anyhow::ensure!(
        journal_mode.eq_ignore_ascii_case("wal"),
        "{}: no WAL mode",
        path.display()
    );
    // The agent's buffer schema (agent/src/buffer.rs), so the comparison is like for like.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {synchronous};
         CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL);"
    ))?;
    let mut conn = conn;
    let started = Instant::now();
    let deadline = started + time_limit;
    let mut n_events = 0usize;
    let mut complete = true;
    for chunk in blobs.chunks(rows_per_tx) {
        if Instant::now() >= deadline {
            complete = false;
            break;
        }
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached("INSERT INTO events (data) VALUES (?1)")?;
            for blob in chunk {
                insert.execute(params![blob])?;
            }
        }
        tx.commit()?;
        n_events += chunk.len();
    }
    Ok(RawResult {
        rows_per_tx,
        n_events,
        elapsed: started.elapsed(),
        complete,
    })
}
