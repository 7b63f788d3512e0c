//! The previous layout's file list: the `parquet_files` table in the WAL's SQLite database,
//! which named the live Parquet files before the events became a Delta table. Read once by the
//! conversion ([`super::convert`]); nothing writes it any more.
//!
//! When the conversion finishes (and on a new database) a guard takes its name: a table
//! `parquet_files` without the columns an older release reads. An older release started on this
//! data directory by mistake then stops at its first query of the list ("no such column:
//! path") instead of taking every file of the Delta table for a leftover and deleting it.

use anyhow::Context;

use super::ParquetFile;

/// Whether this database still has the list (written by a release before the Delta table), not
/// the guard.
pub fn exists(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<bool> {
    let n: i64 = tx
        .query_row(
            "SELECT count(*) FROM pragma_table_info('parquet_files') WHERE name = 'path'",
            [],
            |row| row.get(0),
        )
        .context("look for the parquet_files table")?;
    Ok(n > 0)
}

/// Puts the guard in place unless there is a table of that name already (the list, which the
/// conversion replaces, or the guard).
pub fn guard(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<()> {
    tx.execute_batch(GUARD)
        .context("create the parquet_files guard")
}

const GUARD: &str = "CREATE TABLE IF NOT EXISTS parquet_files (
    events_are_in_the_delta_table_see_docs_operations_md INTEGER
);";

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

/// Replaces the list with the guard (the conversion is done).
pub fn drop(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<()> {
    tx.execute_batch("DROP TABLE IF EXISTS parquet_files")
        .context("drop the parquet_files table")?;
    guard(tx)
}
