//! The Parquet file catalog: which files hold flushed events. A table in the WAL's SQLite
//! database, so that a flush records its files and deletes the batches they hold in one
//! transaction ([`crate::wal::Wal::transaction`]); compaction and retention add and forget files
//! the same way.
//!
//! Owns the `parquet_files` table and nothing else of that database; it never touches objects
//! (the store writes them before and deletes them after the catalog changes).

use anyhow::Context;
use rusqlite::params;

use super::ParquetFile;

/// Creates the table if this database has none yet (the layout older releases wrote too).
pub fn create(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<()> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS parquet_files (
             path TEXT PRIMARY KEY,
             hour_ms INTEGER NOT NULL,
             n_rows INTEGER NOT NULL,
             n_bytes INTEGER NOT NULL,
             created_ms INTEGER NOT NULL
         );",
    )
    .context("create the parquet_files table")
}

/// Every recorded file, by path.
pub fn load(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<Vec<ParquetFile>> {
    let mut stmt =
        tx.prepare("SELECT path, hour_ms, n_rows, n_bytes FROM parquet_files ORDER BY path")?;
    let rows = stmt.query_map([], |row| {
        Ok(ParquetFile {
            path: row.get(0)?,
            hour_ms: row.get(1)?,
            n_rows: row.get(2)?,
            n_bytes: row.get(3)?,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("read the parquet_files table")
}

/// Records `added` and forgets `removed` (paths), stamped `created_ms`.
pub fn record(
    tx: &rusqlite::Transaction<'_>,
    added: &[ParquetFile],
    removed: &[String],
    created_ms: i64,
) -> anyhow::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR REPLACE INTO parquet_files (path, hour_ms, n_rows, n_bytes, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for file in added {
        insert.execute(params![
            file.path,
            file.hour_ms,
            file.n_rows,
            file.n_bytes,
            created_ms
        ])?;
    }
    let mut forget = tx.prepare_cached("DELETE FROM parquet_files WHERE path = ?1")?;
    for path in removed {
        forget.execute(params![path])?;
    }
    Ok(())
}
