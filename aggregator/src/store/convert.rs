//! Upgrade from the previous layout: Hive-partitioned Parquet files (`date=YYYY-MM-DD/hour=HH/
//! part-<first>-<last>.parquet`) listed in the `parquet_files` table of the WAL's database. On
//! the first start of a release with the Delta table, their rows move into the table:
//!
//! 1. Every listed file is read; its rows are appended to the table, [`FILES_PER_COMMIT`] files
//!    per commit. Each commit records how many files are done as the transaction identifier
//!    [`CONVERSION_APP_ID`], so a conversion interrupted anywhere resumes after the last commit
//!    and never appends a file twice (the list does not change until step 3).
//! 2. The last commit also records each agent's high-water mark (the highest sequence number
//!    the files hold of it), so from then on the table says what it holds.
//! 3. The `parquet_files` table is replaced by a guard against older releases (one WAL
//!    transaction, see [`catalog`]), then the old files are deleted. Files a crash leaves behind
//!    here are referenced by no version; vacuum deletes them after the grace period.
//!
//! The WAL's batches are not touched: they are newer than every file (a flush deleted the
//! batches it wrote) and reach the table through the next flush as usual.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::UInt64Type;
use datafusion::object_store::ObjectStoreExt;
use datafusion::object_store::path::Path as ObjectPath;
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use deltalake_core::kernel::Transaction;

use super::{EventStore, Files, ParquetFile, catalog, table};
use crate::wal::Wal;

/// Transaction identifier whose version counts the previous layout's files already converted.
pub const CONVERSION_APP_ID: &str = "runnel-convert-hive-layout";

/// Files of the previous layout appended per commit.
pub const FILES_PER_COMMIT: usize = 16;

/// What a conversion did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Converted {
    /// Files listed by the previous layout.
    pub n_files: usize,
    /// Files appended by this run (fewer than `n_files` when an earlier run did some).
    pub n_files_appended: usize,
    pub n_rows_appended: u64,
    /// Whether the conversion finished (false only when `stop_after_commits` cut it short).
    pub finished: bool,
}

/// Converts the previous layout if the WAL's database still lists its files. Returns None when
/// there is nothing to convert. `stop_after_commits` interrupts it (for tests).
pub async fn previous_layout(
    store: &EventStore,
    wal: &Wal,
    files: &Files,
    stop_after_commits: Option<usize>,
) -> anyhow::Result<Option<Converted>> {
    let Some(listed) = wal
        .transaction(|tx| {
            if catalog::exists(tx)? {
                catalog::load(tx).map(Some)
            } else {
                catalog::guard(tx)?;
                Ok(None)
            }
        })
        .await
        .context("read the previous layout's file list")?
    else {
        return Ok(None);
    };
    tracing::info!(
        n_files = listed.len(),
        "converting the previous layout (Hive-partitioned Parquet) into the Delta table"
    );
    let object_store = Arc::clone(&files.store);
    let converted = store
        .with_table(async |delta| {
            let done = table::txn_version(delta, CONVERSION_APP_ID)
                .await?
                .map_or(0, |v| usize::try_from(v).unwrap_or(usize::MAX))
                .min(listed.len());
            let mut converted = Converted {
                n_files: listed.len(),
                ..Converted::default()
            };
            if done == listed.len() {
                converted.finished = true;
                return Ok(converted);
            }
            // Every agent's mark, from all files (also those converted before an interruption).
            let mut marks: BTreeMap<Arc<str>, u64> = BTreeMap::new();
            for (idx, file) in listed.iter().enumerate() {
                progress("reading marks", idx, listed.len());
                for batch in read(&*object_store, file, true).await? {
                    let agents = batch.column(0).as_string::<i32>();
                    let seqs = batch
                        .column_by_name("seq")
                        .context("a file without seq")?
                        .as_primitive::<UInt64Type>();
                    for row in 0..batch.num_rows() {
                        let agent = agents.value(row);
                        let seq = seqs.value(row);
                        match marks.get_mut(agent) {
                            Some(mark) => *mark = (*mark).max(seq),
                            None => {
                                marks.insert(Arc::from(agent), seq);
                            }
                        }
                    }
                }
            }
            let mut position = done;
            for (n_commits, chunk) in listed[done..].chunks(FILES_PER_COMMIT).enumerate() {
                if stop_after_commits.is_some_and(|n| n_commits >= n) {
                    return Ok(converted);
                }
                let mut batches = Vec::new();
                for (idx, file) in chunk.iter().enumerate() {
                    progress("appending", position + idx, listed.len());
                    for batch in read(&*object_store, file, false).await? {
                        converted.n_rows_appended += batch.num_rows() as u64;
                        batches.push(table::to_table_batch(&batch, file.hour_ms)?);
                    }
                }
                position += chunk.len();
                let last = position == listed.len();
                let progress = vec![Transaction::new(
                    CONVERSION_APP_ID,
                    i64::try_from(position).unwrap_or(i64::MAX),
                )];
                let no_marks = BTreeMap::new();
                *delta = table::append(
                    delta.clone(),
                    batches,
                    if last { &marks } else { &no_marks },
                    progress,
                )
                .await
                .context("append converted files")?;
                converted.n_files_appended += chunk.len();
                crate::faults::point("convert.after_commit").await;
            }
            converted.finished = true;
            Ok(converted)
        })
        .await?;
    if !converted.finished {
        return Ok(Some(converted));
    }
    wal.transaction(catalog::drop)
        .await
        .context("drop the previous layout's file list")?;
    for file in &listed {
        // A file left here is referenced by no version: vacuum deletes it later.
        if let Err(error) = files
            .store
            .delete(&ObjectPath::from(file.path.as_str()))
            .await
        {
            tracing::warn!(path = file.path, %error, "could not delete a converted file");
        }
    }
    tracing::info!(
        n_files = converted.n_files,
        n_files_appended = converted.n_files_appended,
        n_rows_appended = converted.n_rows_appended,
        "converted the previous layout into the Delta table"
    );
    Ok(Some(converted))
}

/// Keeps systemd waiting (a big store takes longer than a unit's start timeout) and says how far
/// the conversion is.
fn progress(step: &str, done: usize, of: usize) {
    runnel_service::probes::extend_startup(
        &format!("converting the previous layout: {step}, file {done} of {of}"),
        std::time::Duration::from_secs(120),
    );
}

/// The rows of one file of the previous layout (in `events`' schema), or only its `agent_id`
/// and `seq` columns (`marks_only`).
async fn read(
    store: &dyn datafusion::object_store::ObjectStore,
    file: &ParquetFile,
    marks_only: bool,
) -> anyhow::Result<Vec<RecordBatch>> {
    let bytes = store
        .get(&ObjectPath::from(file.path.as_str()))
        .await
        .with_context(|| format!("read {}", file.path))?
        .bytes()
        .await
        .with_context(|| format!("read {}", file.path))?;
    let path = file.path.clone();
    tokio::task::spawn_blocking(move || {
        let mut builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
        if marks_only {
            let mask = ProjectionMask::columns(builder.parquet_schema(), ["agent_id", "seq"]);
            builder = builder.with_projection(mask);
        }
        let reader = builder.build()?;
        let mut batches = Vec::new();
        for batch in reader {
            batches.push(batch?);
        }
        anyhow::Ok(batches)
    })
    .await
    .context("Parquet reader task")?
    .with_context(|| format!("decode {path}"))
}
