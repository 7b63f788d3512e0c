//! Event storage the query engine reads: recent rows in memory (Arrow record batches, queryable
//! the moment their WAL transaction commits) plus Parquet files partitioned by event hour.
//!
//! Layout under `storage.events_dir` (Hive style, readable by DuckDB, Spark, Trino):
//! `date=YYYY-MM-DD/hour=HH/part-<first WAL batch id>-<last WAL batch id>.parquet`.
//!
//! A flush moves rows from memory to Parquet in three steps: write the files (not yet visible to
//! queries), record them and delete their WAL batches in one transaction, then swap under the
//! lock: add the files, drop the rows. A query takes its snapshot under the same lock, so it sees
//! each row exactly once. Files on disk but not recorded are from an interrupted flush; their
//! rows are still in the WAL, so they are deleted at startup.
//!
//! Compaction merges the small files of an hour partition into one, and retention drops the
//! partitions older than `storage.retention_hours`; both change the file catalog ([`catalog`], a
//! table in the WAL's database) in one transaction and swap the store's file list under the lock, so
//! a query sees either the old files or the new ones. Objects are written before and deleted
//! after the catalog changes: a crash in between leaves an unrecorded file, removed at startup.
//!
//! Architecture invariant: only `object_store` touches the files, so the same code serves a
//! local directory and S3-compatible storage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::object_store::path::Path as ObjectPath;
use datafusion::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use futures::TryStreamExt;
use runnel_common::Event;
use tokio::sync::Notify;

use crate::schema::EVENTS_SCHEMA;
use crate::wal::{self, CommittedBatches, Wal};

mod catalog;

/// Where the Parquet files live: a local directory (`storage.events_dir`) or an S3 bucket
/// (`storage.url`), as one `object_store` rooted at the events root.
pub struct Files {
    /// The store, with paths relative to the events root.
    pub store: Arc<dyn ObjectStore>,
    /// The events root as a URL DataFusion reads: `file:///...` or `s3://bucket/prefix`.
    pub root_url: String,
    /// A store DataFusion must be told about (`s3://bucket` and the bucket's store); None for
    /// the local file system, which it knows.
    pub register: Option<(String, Arc<dyn ObjectStore>)>,
}

impl Files {
    /// A local root that queries never reach (unit tests of the query engine).
    pub fn local_for_tests() -> Files {
        Files {
            store: Arc::new(datafusion::object_store::memory::InMemory::new()),
            root_url: "file:///nonexistent".to_owned(),
            register: None,
        }
    }
}

/// Opens the events root `storage` names; creates the local directory if needed.
pub fn open_files(storage: &runnel_config::StorageConfig) -> anyhow::Result<Files> {
    let Some(s3) = &storage.s3 else {
        let dir = &storage.events_dir;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create storage.events_dir {}", dir.display()))?;
        let store = datafusion::object_store::local::LocalFileSystem::new_with_prefix(dir)
            .with_context(|| format!("open storage.events_dir {}", dir.display()))?;
        return Ok(Files {
            store: Arc::new(store),
            root_url: format!("file://{}", dir.display()),
            register: None,
        });
    };
    // `from_env` first, so the usual AWS variables (session token, web identity, container
    // credentials) apply unless the config names its own.
    let mut builder = datafusion::object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_region(&s3.region)
        .with_allow_http(s3.allow_http);
    if let Some(endpoint) = &s3.endpoint {
        // S3-compatible stores are addressed by path (`endpoint/bucket/key`), which all of
        // them support; virtual-hosted names need DNS set up for every bucket.
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
    }
    if let Some((key_id, secret)) = &s3.credentials {
        builder = builder
            .with_access_key_id(key_id)
            .with_secret_access_key(secret);
    }
    let bucket: Arc<dyn ObjectStore> = Arc::new(
        builder
            .build()
            .with_context(|| format!("open storage.url {}", s3.url()))?,
    );
    let store: Arc<dyn ObjectStore> = if s3.prefix.is_empty() {
        Arc::clone(&bucket)
    } else {
        Arc::new(datafusion::object_store::prefix::PrefixStore::new(
            Arc::clone(&bucket),
            s3.prefix.as_str(),
        ))
    };
    Ok(Files {
        store,
        root_url: s3.url(),
        register: Some((format!("s3://{}", s3.bucket), bucket)),
    })
}

/// A Parquet file that holds flushed events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetFile {
    /// Object path relative to the events root.
    pub path: String,
    pub hour_ms: i64,
    pub n_rows: u64,
    pub n_bytes: u64,
}

#[derive(Default)]
struct Inner {
    /// Rows not yet in Parquet, by WAL batch id, each split by event hour.
    recent: BTreeMap<i64, Vec<(i64, RecordBatch)>>,
    n_recent_rows: usize,
    files: Vec<ParquetFile>,
}

/// What a query reads: a consistent cut of memory and files.
pub struct Snapshot {
    pub recent: Vec<RecordBatch>,
    pub files: Vec<ParquetFile>,
}

pub struct EventStore {
    inner: Mutex<Inner>,
    object_store: Arc<dyn ObjectStore>,
    max_recent_rows: usize,
    flush_wanted: Notify,
}

/// What the store holds: rows in memory (each also in the WAL, by batch) and Parquet files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreSummary {
    pub n_recent_rows: u64,
    pub n_recent_batches: u64,
    pub n_files: u64,
    pub n_file_rows: u64,
    pub n_file_bytes: u64,
}

/// Files smaller than this are compacted; a merged file holds at most about this much.
pub const COMPACT_TARGET_BYTES: u64 = 32 * 1024 * 1024;

/// What one compaction or retention pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub n_files_removed: usize,
    pub n_files_added: usize,
    pub n_rows: u64,
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub n_files: usize,
    pub n_rows: u64,
    pub n_batches: usize,
}

impl EventStore {
    pub fn new(object_store: Arc<dyn ObjectStore>, max_recent_rows: usize) -> EventStore {
        EventStore {
            inner: Mutex::default(),
            object_store,
            max_recent_rows,
            flush_wanted: Notify::new(),
        }
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.object_store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds rows of a committed WAL batch. Asks for a flush when memory holds too many rows.
    pub fn insert(&self, batch_id: i64, batches: Vec<(i64, RecordBatch)>) {
        let n_rows: usize = batches.iter().map(|(_, b)| b.num_rows()).sum();
        let mut inner = self.lock();
        inner.n_recent_rows += n_rows;
        let previous = inner.recent.insert(batch_id, batches);
        debug_assert!(previous.is_none(), "WAL batch ids are unique");
        if inner.n_recent_rows >= self.max_recent_rows {
            self.flush_wanted.notify_one();
        }
    }

    /// Reads the file catalog from the WAL's database (creating it on a new one) and serves
    /// those files. Returns how many there are.
    pub async fn open_catalog(&self, wal: &Wal) -> anyhow::Result<usize> {
        let files = wal
            .transaction(|tx| {
                catalog::create(tx)?;
                catalog::load(tx)
            })
            .await
            .context("open the Parquet file catalog")?;
        let n_files = files.len();
        self.lock().files = files;
        Ok(n_files)
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            recent: inner
                .recent
                .values()
                .flatten()
                .map(|(_, b)| b.clone())
                .collect(),
            files: inner.files.clone(),
        }
    }

    pub fn n_recent_rows(&self) -> usize {
        self.lock().n_recent_rows
    }

    /// Counts for status, without copying any rows.
    pub fn summary(&self) -> StoreSummary {
        let inner = self.lock();
        StoreSummary {
            n_recent_rows: inner.n_recent_rows as u64,
            n_recent_batches: inner.recent.len() as u64,
            n_files: inner.files.len() as u64,
            n_file_rows: inner.files.iter().map(|f| f.n_rows).sum(),
            n_file_bytes: inner.files.iter().map(|f| f.n_bytes).sum(),
        }
    }

    /// Resolves when memory holds more than `max_recent_rows`.
    pub async fn flush_wanted(&self) {
        self.flush_wanted.notified().await;
    }

    /// Deletes Parquet files that no committed flush recorded (leftovers of a crash mid-flush).
    pub async fn remove_unrecorded_files(&self) -> anyhow::Result<usize> {
        let recorded: BTreeSet<String> = self.lock().files.iter().map(|f| f.path.clone()).collect();
        let listed: Vec<_> = self
            .object_store
            .list(None)
            .try_collect()
            .await
            .context("list event files")?;
        let mut n_removed = 0;
        for meta in listed {
            let path = meta.location.to_string();
            if path.ends_with(".parquet") && !recorded.contains(&path) {
                tracing::warn!(
                    path,
                    "removing Parquet file of an interrupted flush (its rows are in the WAL)"
                );
                self.object_store
                    .delete(&meta.location)
                    .await
                    .with_context(|| format!("delete {path}"))?;
                n_removed += 1;
            }
        }
        Ok(n_removed)
    }

    /// Moves everything now in memory to Parquet. See the module docs for the protocol.
    pub async fn flush(&self, wal: &Wal) -> anyhow::Result<Flushed> {
        let taken: Vec<(i64, Vec<(i64, RecordBatch)>)> = self
            .lock()
            .recent
            .iter()
            .map(|(id, b)| (*id, b.clone()))
            .collect();
        let (Some(first_id), Some(last_id)) =
            (taken.first().map(|t| t.0), taken.last().map(|t| t.0))
        else {
            return Ok(Flushed::default());
        };
        let mut by_hour: BTreeMap<i64, Vec<RecordBatch>> = BTreeMap::new();
        for (_, batches) in &taken {
            for (hour, batch) in batches {
                by_hour.entry(*hour).or_default().push(batch.clone());
            }
        }
        let mut files = Vec::with_capacity(by_hour.len());
        for (hour_ms, batches) in by_hour {
            let path = file_path(hour_ms, first_id, last_id);
            let (bytes, n_rows) = tokio::task::spawn_blocking(move || encode_parquet(&batches))
                .await
                .context("Parquet encoder task")??;
            let n_bytes = bytes.len() as u64;
            self.object_store
                .put(&ObjectPath::from(path.as_str()), PutPayload::from(bytes))
                .await
                .with_context(|| format!("write {path}"))?;
            files.push(ParquetFile {
                path,
                hour_ms,
                n_rows,
                n_bytes,
            });
        }
        let batch_ids: Vec<i64> = taken.iter().map(|(id, _)| *id).collect();
        let (recorded, moved) = (files.clone(), batch_ids.clone());
        wal.transaction(move |tx| {
            catalog::record(tx, &recorded, &[], wal::now_unix_ms())?;
            wal::delete_batches(tx, &moved)
        })
        .await
        .context("record flushed files")?;

        let flushed = Flushed {
            n_files: files.len(),
            n_rows: files.iter().map(|f| f.n_rows).sum(),
            n_batches: batch_ids.len(),
        };
        let mut inner = self.lock();
        for id in &batch_ids {
            if let Some(batches) = inner.recent.remove(id) {
                inner.n_recent_rows -= batches.iter().map(|(_, b)| b.num_rows()).sum::<usize>();
            }
        }
        inner.files.extend(files);
        Ok(flushed)
    }
}

impl EventStore {
    /// Merges the small files (under [`COMPACT_TARGET_BYTES`]) of every hour partition that has
    /// at least `min_files` of them, in groups of up to about that many bytes.
    pub async fn compact(&self, wal: &Wal, min_files: usize) -> anyhow::Result<Rewritten> {
        let mut done = Rewritten::default();
        if min_files < 2 {
            return Ok(done);
        }
        let mut by_hour: BTreeMap<i64, Vec<ParquetFile>> = BTreeMap::new();
        for file in self.lock().files.iter() {
            if file.n_bytes < COMPACT_TARGET_BYTES && batch_range(&file.path).is_some() {
                by_hour.entry(file.hour_ms).or_default().push(file.clone());
            }
        }
        for (hour_ms, mut small) in by_hour {
            if small.len() < min_files {
                continue;
            }
            small.sort_by_key(|f| batch_range(&f.path));
            let mut groups: Vec<Vec<ParquetFile>> = vec![Vec::new()];
            let mut n_group_bytes = 0;
            for file in small {
                if n_group_bytes + file.n_bytes > COMPACT_TARGET_BYTES
                    && groups.last().is_some_and(|g| g.len() >= 2)
                {
                    groups.push(Vec::new());
                    n_group_bytes = 0;
                }
                n_group_bytes += file.n_bytes;
                groups.last_mut().expect("one group at least").push(file);
            }
            for group in groups.into_iter().filter(|g| g.len() >= 2) {
                let merged = self.merge(hour_ms, &group).await?;
                let removed: Vec<String> = group.iter().map(|f| f.path.clone()).collect();
                done.n_rows += merged.n_rows;
                done.n_files_added += 1;
                done.n_files_removed += removed.len();
                self.replace(wal, vec![merged], removed).await?;
            }
        }
        Ok(done)
    }

    /// Drops every file of an hour that ended at or before `cutoff_ms`.
    pub async fn expire(&self, wal: &Wal, cutoff_ms: i64) -> anyhow::Result<Rewritten> {
        let expired: Vec<ParquetFile> = self
            .lock()
            .files
            .iter()
            .filter(|f| f.hour_ms + HOUR_MS <= cutoff_ms)
            .cloned()
            .collect();
        if expired.is_empty() {
            return Ok(Rewritten::default());
        }
        let done = Rewritten {
            n_files_removed: expired.len(),
            n_files_added: 0,
            n_rows: expired.iter().map(|f| f.n_rows).sum(),
        };
        self.replace(
            wal,
            Vec::new(),
            expired.into_iter().map(|f| f.path).collect(),
        )
        .await?;
        Ok(done)
    }

    /// Reads `group` (one hour partition, in batch order) and writes it as one file.
    async fn merge(&self, hour_ms: i64, group: &[ParquetFile]) -> anyhow::Result<ParquetFile> {
        let mut inputs = Vec::with_capacity(group.len());
        for file in group {
            let bytes = self
                .object_store
                .get(&ObjectPath::from(file.path.as_str()))
                .await
                .with_context(|| format!("read {}", file.path))?
                .bytes()
                .await
                .with_context(|| format!("read {}", file.path))?;
            inputs.push(bytes);
        }
        let first = group
            .iter()
            .filter_map(|f| batch_range(&f.path))
            .map(|r| r.0)
            .min();
        let last = group
            .iter()
            .filter_map(|f| batch_range(&f.path))
            .map(|r| r.1)
            .max();
        let (Some(first), Some(last)) = (first, last) else {
            anyhow::bail!("compaction group without batch ranges");
        };
        let path = file_path(hour_ms, first, last);
        let (bytes, n_rows) = tokio::task::spawn_blocking(move || {
            let mut batches = Vec::new();
            for input in inputs {
                let reader =
                    datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                        input,
                    )?
                    .build()?;
                for batch in reader {
                    batches.push(batch?);
                }
            }
            encode_parquet(&batches)
        })
        .await
        .context("compaction task")??;
        let n_bytes = bytes.len() as u64;
        self.object_store
            .put(&ObjectPath::from(path.as_str()), PutPayload::from(bytes))
            .await
            .with_context(|| format!("write {path}"))?;
        Ok(ParquetFile {
            path,
            hour_ms,
            n_rows,
            n_bytes,
        })
    }

    /// Catalog first (one transaction), then the swap, then the objects.
    async fn replace(
        &self,
        wal: &Wal,
        added: Vec<ParquetFile>,
        removed: Vec<String>,
    ) -> anyhow::Result<()> {
        let (recorded, forgotten) = (added.clone(), removed.clone());
        wal.transaction(move |tx| catalog::record(tx, &recorded, &forgotten, wal::now_unix_ms()))
            .await
            .context("record replaced files")?;
        {
            let mut inner = self.lock();
            inner.files.retain(|f| !removed.contains(&f.path));
            inner.files.extend(added);
        }
        for path in removed {
            // A failure leaves an unrecorded file, removed at the next start.
            if let Err(error) = self
                .object_store
                .delete(&ObjectPath::from(path.as_str()))
                .await
            {
                tracing::warn!(path, %error, "could not delete a replaced Parquet file");
            }
        }
        Ok(())
    }
}

impl CommittedBatches for EventStore {
    fn committed(&self, batch_id: i64, agent_id: &str, received_ms: i64, events: &[Event]) {
        self.insert(
            batch_id,
            crate::schema::to_record_batches(agent_id, received_ms, events),
        );
    }
}

const HOUR_MS: i64 = 3_600_000;

/// The WAL batch ids in a file name made by [`file_path`].
fn batch_range(path: &str) -> Option<(i64, i64)> {
    let name = path.rsplit('/').next()?;
    let range = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let (first, last) = range.split_once('-')?;
    Some((first.parse().ok()?, last.parse().ok()?))
}

/// `date=YYYY-MM-DD/hour=HH/part-<first>-<last>.parquet`
fn file_path(hour_ms: i64, first_batch_id: i64, last_batch_id: i64) -> String {
    let hour = chrono::DateTime::from_timestamp_millis(hour_ms).unwrap_or_default();
    format!(
        "date={}/hour={}/part-{first_batch_id:012}-{last_batch_id:012}.parquet",
        hour.format("%Y-%m-%d"),
        hour.format("%H")
    )
}

fn encode_parquet(batches: &[RecordBatch]) -> anyhow::Result<(Vec<u8>, u64)> {
    let batch = concat_batches(&EVENTS_SCHEMA, batches).context("concatenate batches")?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).context("zstd level")?,
        ))
        .build();
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, EVENTS_SCHEMA.clone(), Some(properties))
        .context("Parquet writer")?;
    writer.write(&batch).context("write Parquet")?;
    writer.close().context("finish Parquet")?;
    Ok((bytes, batch.num_rows() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_are_hive_partitioned() {
        assert_eq!(
            file_path(1_769_860_800_000, 1, 22),
            "date=2026-01-31/hour=12/part-000000000001-000000000022.parquet"
        );
        assert_eq!(
            batch_range("date=2026-01-31/hour=12/part-000000000001-000000000022.parquet"),
            Some((1, 22))
        );
        assert_eq!(batch_range("date=2026-01-31/hour=12/other.parquet"), None);
    }
}
