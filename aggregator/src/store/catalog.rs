//! The previous layout's file list: the `parquet_files` table in the WAL's SQLite database,
//! which named the live Parquet files before the events became a Delta table. Read once by the
//! conversion ([`super::convert`]) and dropped when it finishes; nothing writes it any more.

use anyhow::Context;

use super::ParquetFile;

/// Whether this database still has the table (written by a release before the Delta table).
pub fn exists(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<bool> {
    let n: i64 = tx
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'parquet_files'",
            [],
            |row| row.get(0),
        )
        .context("look for the parquet_files table")?;
    Ok(n > 0)
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

/// Forgets the list (the conversion is done).
pub fn drop(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<()> {
    tx.execute_batch("DROP TABLE IF EXISTS parquet_files")
        .context("drop the parquet_files table")
}
