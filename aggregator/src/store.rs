//! Event storage the query engine reads: recent rows in memory (Arrow record batches, queryable
//! the moment their WAL transaction commits) plus a Delta Lake table ([`table`]) partitioned by
//! event date and hour, which other engines read too (docs/STORAGE.md).
//!
//! A flush moves rows from memory to the table: one Delta commit adds the files and records each
//! agent's high-water mark as a transaction identifier; then, under the lock, the store swaps to
//! the new table version and drops the rows; then their WAL batches are deleted. A query takes
//! its snapshot (rows and table version) under the same lock, so it sees each row exactly once.
//!
//! After a crash the WAL may still hold batches the table already has (the crash came between
//! the commit and the delete) or the outcome of a commit may be unknown (an error after the
//! request left). [`EventStore::reconcile`] settles both before anything is written again: it
//! reads the table's mark of every agent with rows in memory and drops what the table holds.
//! Replaying a WAL therefore never commits an event twice.
//!
//! Compaction (a Delta optimize commit per partition), retention (a delete commit of whole
//! partitions) and vacuum (files no version references, after a grace period) run in the same
//! task as flushes, one at a time; each swaps the store to the version it committed.
//!
//! Architecture invariant: only `object_store` touches the files, so the same code serves a
//! local directory and S3-compatible storage.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use datafusion::arrow::array::{RecordBatch, UInt64Array};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::compute::kernels::cmp::gt;
use datafusion::object_store::ObjectStore;
use deltalake_core::DeltaTable;
use runnel_common::Event;
use tokio::sync::Notify;

use crate::schema::HOUR_MS;
use crate::wal::{self, CommittedBatches, Wal};

mod catalog;
pub mod convert;
pub mod table;

pub use table::TableView;

/// Where the table lives: a local directory (`storage.events_dir`) or an S3 bucket
/// (`storage.url`).
pub struct Files {
    /// The store, with paths relative to the events root (the previous layout's files).
    pub store: Arc<dyn ObjectStore>,
    /// The store whose root is the file system's or the bucket's (what Delta opens).
    pub root_store: Arc<dyn ObjectStore>,
    /// The table's URL: `file:///.../events/` or `s3://bucket/prefix/`.
    pub table_url: url::Url,
    /// The events root as a URL: `file:///...` or `s3://bucket/prefix`.
    pub root_url: String,
    /// A store DataFusion must be told about (`s3://bucket` and the bucket's store); None for
    /// the local file system, which it knows.
    pub register: Option<(String, Arc<dyn ObjectStore>)>,
}

impl Files {
    /// A root that queries never reach (unit tests of the query engine).
    pub fn local_for_tests() -> Files {
        let store: Arc<dyn ObjectStore> =
            Arc::new(datafusion::object_store::memory::InMemory::new());
        Files {
            store: Arc::clone(&store),
            root_store: store,
            table_url: url::Url::parse("memory:///nonexistent/").expect("a valid URL"),
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
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("resolve storage.events_dir {}", dir.display()))?;
        let store = datafusion::object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .with_context(|| format!("open storage.events_dir {}", dir.display()))?;
        let table_url = url::Url::from_directory_path(&dir).map_err(|()| {
            anyhow::anyhow!(
                "storage.events_dir {} is not an absolute path",
                dir.display()
            )
        })?;
        return Ok(Files {
            store: Arc::new(store),
            root_store: Arc::new(datafusion::object_store::local::LocalFileSystem::new()),
            table_url,
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
    let table_url = url::Url::parse(&format!("{}/", s3.url()))
        .with_context(|| format!("storage.url {} is not a valid URL", s3.url()))?;
    Ok(Files {
        store,
        root_store: Arc::clone(&bucket),
        table_url,
        root_url: s3.url(),
        register: Some((format!("s3://{}", s3.bucket), bucket)),
    })
}

/// A Parquet file of the previous layout (see [`convert`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParquetFile {
    /// Object path relative to the events root.
    pub path: String,
    pub hour_ms: i64,
    pub n_rows: u64,
    pub n_bytes: u64,
}

/// Rows of one committed WAL batch, waiting in memory for a flush.
struct Recent {
    agent_id: Arc<str>,
    /// The agent's sequence number this batch follows (its chain link, see the invariant in
    /// ARCHITECTURE.md), and its last.
    after_seq: u64,
    last_seq: u64,
    /// By event hour.
    batches: Vec<(i64, RecordBatch)>,
}

impl Recent {
    fn n_rows(&self) -> usize {
        self.batches.iter().map(|(_, b)| b.num_rows()).sum()
    }
}

#[derive(Default)]
struct Inner {
    /// Rows not yet in the table, by WAL batch id.
    recent: BTreeMap<i64, Recent>,
    n_recent_rows: usize,
    /// The table version queries read, and its files' totals.
    view: Option<TableView>,
    files: FileTotals,
    /// WAL batches the table holds whose delete from the WAL has not committed yet.
    stale: Vec<i64>,
}

#[derive(Debug, Default, Clone, Copy)]
struct FileTotals {
    n_files: u64,
    n_rows: u64,
    n_bytes: u64,
}

/// What a query reads: a consistent cut of memory and table.
pub struct Snapshot {
    pub recent: Vec<RecordBatch>,
    /// None until the table is opened (unit tests of the query engine never open one).
    pub table: Option<TableView>,
}

pub struct EventStore {
    inner: Mutex<Inner>,
    /// The table, for the one task that writes (flush, compaction, retention, vacuum).
    table: tokio::sync::Mutex<Option<DeltaTable>>,
    /// Set when what the table holds may differ from what this store believes (startup, or a
    /// commit whose outcome is unknown): [`EventStore::reconcile`] runs before the next write.
    unsure: AtomicBool,
    /// The table's mark of each agent, as of the last lookup or commit of this store (changed
    /// only with `table` locked; an agent missing here is looked up before a flush).
    marks: Mutex<HashMap<Arc<str>, u64>>,
    max_recent_rows: usize,
    flush_wanted: Notify,
}

/// What the store holds: rows in memory (each also in the WAL, by batch) and table files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreSummary {
    pub n_recent_rows: u64,
    pub n_recent_batches: u64,
    pub n_files: u64,
    pub n_file_rows: u64,
    pub n_file_bytes: u64,
    /// The table version queries read (-1 before the table is open).
    pub table_version: i64,
}

/// Files smaller than this are compacted; a merged file holds at most about this much.
pub const COMPACT_TARGET_BYTES: u64 = 32 * 1024 * 1024;

/// What one compaction or retention pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub n_files_removed: u64,
    pub n_files_added: u64,
    pub n_rows: u64,
}

/// What one flush did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub n_rows: u64,
    pub n_batches: usize,
    /// The table version the flush committed (None when there was nothing to write).
    pub version: Option<i64>,
}

/// What [`EventStore::reconcile`] found already in the table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    pub n_batches: usize,
    pub n_rows: u64,
}

impl EventStore {
    pub fn new(max_recent_rows: usize) -> EventStore {
        EventStore {
            inner: Mutex::default(),
            table: tokio::sync::Mutex::new(None),
            unsure: AtomicBool::new(true),
            marks: Mutex::default(),
            max_recent_rows,
            flush_wanted: Notify::new(),
        }
    }

    fn marks_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, u64>> {
        self.marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens (or creates) the Delta table and serves its current version.
    pub async fn open_table(&self, files: &Files) -> anyhow::Result<i64> {
        let table = table::open(Arc::clone(&files.root_store), &files.table_url).await?;
        let version = self.serve(&table)?;
        *self.table.lock().await = Some(table);
        Ok(version)
    }

    /// Makes queries read `table`'s version. Returns it.
    fn serve(&self, table: &DeltaTable) -> anyhow::Result<i64> {
        let view = TableView::of(table)?;
        let files = table::files(&view.snapshot);
        let totals = FileTotals {
            n_files: files.len() as u64,
            n_rows: files.iter().map(|f| f.n_rows).sum(),
            n_bytes: files.iter().map(|f| f.n_bytes).sum(),
        };
        let version = view.version();
        let mut inner = self.lock();
        inner.view = Some(view);
        inner.files = totals;
        Ok(version)
    }

    /// Adds rows of a committed WAL batch of `agent_id` that follows `after_seq` and ends at
    /// `last_seq`. Asks for a flush when memory holds too many rows.
    pub fn insert(
        &self,
        batch_id: i64,
        agent_id: &str,
        (after_seq, last_seq): (u64, u64),
        batches: Vec<(i64, RecordBatch)>,
    ) {
        let recent = Recent {
            agent_id: Arc::from(agent_id),
            after_seq,
            last_seq,
            batches,
        };
        let n_rows = recent.n_rows();
        let mut inner = self.lock();
        inner.n_recent_rows += n_rows;
        let previous = inner.recent.insert(batch_id, recent);
        debug_assert!(previous.is_none(), "WAL batch ids are unique");
        if inner.n_recent_rows >= self.max_recent_rows {
            self.flush_wanted.notify_one();
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            recent: inner
                .recent
                .values()
                .flat_map(|r| r.batches.iter().map(|(_, b)| b.clone()))
                .collect(),
            table: inner.view.clone(),
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
            n_files: inner.files.n_files,
            n_file_rows: inner.files.n_rows,
            n_file_bytes: inner.files.n_bytes,
            table_version: inner.view.as_ref().map_or(-1, TableView::version),
        }
    }

    /// Resolves when memory holds more than `max_recent_rows`.
    pub async fn flush_wanted(&self) {
        self.flush_wanted.notified().await;
    }

    /// Drops from memory and from the WAL every row the table already holds, by the table's
    /// mark of each agent with rows in memory. Runs at startup and after a commit whose outcome
    /// is unknown; a no-op otherwise.
    pub async fn reconcile(&self, wal: &Wal) -> anyhow::Result<Reconciled> {
        let mut guard = self.table.lock().await;
        let table = guard.as_mut().context("the events table is not open")?;
        self.reconcile_locked(table, wal).await
    }

    async fn reconcile_locked(
        &self,
        table: &mut DeltaTable,
        wal: &Wal,
    ) -> anyhow::Result<Reconciled> {
        if !self.unsure.load(Ordering::Acquire) {
            return Ok(Reconciled::default());
        }
        table
            .update_state()
            .await
            .context("read the events table's latest version")?;
        self.serve(table)?;
        let agents: BTreeSet<Arc<str>> = self
            .lock()
            .recent
            .values()
            .map(|r| Arc::clone(&r.agent_id))
            .collect();
        let marks = lookup_marks(table, agents).await?;
        *self.marks_lock() = marks.clone();
        // The WAL's marks are at least the table's (a WAL restored from an older backup is not).
        wal.raise_marks(marks.iter().map(|(a, s)| (Arc::clone(a), *s)).collect())
            .await
            .context("raise the WAL's high-water marks to the table's")?;
        let mut done = Reconciled::default();
        let stale: Vec<i64> = {
            let mut inner = self.lock();
            let mut stale = Vec::new();
            let mut n_removed_rows = 0;
            for (id, recent) in inner.recent.iter_mut() {
                let Some(&mark) = marks.get(&recent.agent_id) else {
                    continue;
                };
                if recent.last_seq <= mark {
                    stale.push(*id);
                    continue;
                }
                // Partly in the table (only when another writer stored some of it): keep the
                // rest. Batches hold one agent's events in sequence order.
                for (_, batch) in recent.batches.iter_mut() {
                    let before = batch.num_rows();
                    *batch = keep_after(batch, mark)?;
                    n_removed_rows += before - batch.num_rows();
                }
            }
            for id in &stale {
                if let Some(recent) = inner.recent.remove(id) {
                    n_removed_rows += recent.n_rows();
                }
            }
            inner.n_recent_rows -= n_removed_rows;
            done.n_rows = n_removed_rows as u64;
            done.n_batches = stale.len();
            inner.stale.extend(stale.iter().copied());
            inner.stale.clone()
        };
        if !stale.is_empty() {
            self.delete_stale(wal, stale).await?;
        }
        self.unsure.store(false, Ordering::Release);
        Ok(done)
    }

    /// Deletes WAL batches the table holds.
    async fn delete_stale(&self, wal: &Wal, ids: Vec<i64>) -> anyhow::Result<()> {
        let deleted = ids.clone();
        wal.transaction(move |tx| wal::delete_batches(tx, &ids))
            .await
            .context("delete WAL batches the table holds")?;
        self.lock().stale.retain(|id| !deleted.contains(id));
        Ok(())
    }

    /// Moves everything now in memory to the table. See the module docs for the protocol.
    pub async fn flush(&self, wal: &Wal) -> anyhow::Result<Flushed> {
        let mut guard = self.table.lock().await;
        let table = guard.as_mut().context("the events table is not open")?;
        self.reconcile_locked(table, wal).await?;
        let stale = self.lock().stale.clone();
        if !stale.is_empty() {
            self.delete_stale(wal, stale).await?;
        }
        // Every agent with rows here needs the table's mark: its rows go in only as the next
        // link of its chain (the invariant in ARCHITECTURE.md).
        let unknown: BTreeSet<Arc<str>> = {
            let inner = self.lock();
            let known = self.marks_lock();
            inner
                .recent
                .values()
                .filter(|r| !known.contains_key(&r.agent_id))
                .map(|r| Arc::clone(&r.agent_id))
                .collect()
        };
        if !unknown.is_empty() {
            let found = lookup_marks(table, unknown).await?;
            self.marks_lock().extend(found);
        }
        let plan = {
            let inner = self.lock();
            plan_flush(&inner.recent, &self.marks_lock())?
        };
        for (agent, (from, to)) in &plan.waiting {
            tracing::warn!(
                agent_id = &**agent,
                waiting_for = format!("{}..={}", from + 1, to),
                "rows of this agent wait in the WAL: the table's mark is below their first \
                 sequence number (another aggregator holds the batches in between)"
            );
        }
        let Flush {
            ids,
            marks,
            batches,
            ..
        } = plan;
        if ids.is_empty() {
            return Ok(Flushed::default());
        }
        let n_rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        crate::faults::point("flush.before_commit").await;
        let committed = match table::append(table.clone(), batches, &marks, Vec::new()).await {
            Ok(committed) => committed,
            Err(error) => {
                // The commit may have landed before the error: check the table first next time.
                self.unsure.store(true, Ordering::Release);
                return Err(error);
            }
        };
        crate::faults::point("flush.after_commit").await;
        *table = committed;
        self.marks_lock()
            .extend(marks.iter().map(|(agent, seq)| (Arc::clone(agent), *seq)));
        let version = {
            let view = TableView::of(table)?;
            let files = table::files(&view.snapshot);
            let version = view.version();
            let mut inner = self.lock();
            for id in &ids {
                if let Some(recent) = inner.recent.remove(id) {
                    inner.n_recent_rows -= recent.n_rows();
                }
            }
            inner.view = Some(view);
            inner.files = FileTotals {
                n_files: files.len() as u64,
                n_rows: files.iter().map(|f| f.n_rows).sum(),
                n_bytes: files.iter().map(|f| f.n_bytes).sum(),
            };
            inner.stale.extend(ids.iter().copied());
            version
        };
        // The rows are in the table; if this delete fails, the next flush (or the next start)
        // deletes them.
        self.delete_stale(wal, ids.clone()).await?;
        Ok(Flushed {
            n_rows,
            n_batches: ids.len(),
            version: Some(version),
        })
    }

    /// Merges the small files (under [`COMPACT_TARGET_BYTES`]) of every hour partition that has
    /// at least `min_files` of them: one optimize commit per partition.
    pub async fn compact(&self, min_files: usize) -> anyhow::Result<Rewritten> {
        let mut done = Rewritten::default();
        if min_files < 2 {
            return Ok(done);
        }
        let mut guard = self.table.lock().await;
        let table = guard.as_mut().context("the events table is not open")?;
        let mut small: BTreeMap<i64, (usize, u64)> = BTreeMap::new();
        if let Some(view) = self.lock().view.clone() {
            for file in table::files(&view.snapshot) {
                if file.n_bytes < COMPACT_TARGET_BYTES {
                    let entry = small.entry(file.hour_ms).or_default();
                    entry.0 += 1;
                    entry.1 += file.n_rows;
                }
            }
        }
        for (hour_ms, (n_files, n_rows)) in small {
            if n_files < min_files {
                continue;
            }
            crate::faults::point("compact.before_commit").await;
            let (compacted, (removed, added)) =
                table::compact_partition(table.clone(), hour_ms, COMPACT_TARGET_BYTES).await?;
            crate::faults::point("compact.after_commit").await;
            *table = compacted;
            self.serve(table)?;
            done.n_files_removed += removed;
            done.n_files_added += added;
            done.n_rows += n_rows;
        }
        Ok(done)
    }

    /// Removes every partition of an hour that ended at or before `cutoff_ms`: one commit.
    pub async fn expire(&self, cutoff_ms: i64) -> anyhow::Result<Rewritten> {
        let mut guard = self.table.lock().await;
        let table = guard.as_mut().context("the events table is not open")?;
        let Some(view) = self.lock().view.clone() else {
            return Ok(Rewritten::default());
        };
        let expired: Vec<table::TableFile> = table::files(&view.snapshot)
            .into_iter()
            .filter(|f| f.hour_ms + HOUR_MS <= cutoff_ms)
            .collect();
        if expired.is_empty() {
            return Ok(Rewritten::default());
        }
        crate::faults::point("expire.before_commit").await;
        *table = table::expire(table.clone(), cutoff_ms).await?;
        crate::faults::point("expire.after_commit").await;
        self.serve(table)?;
        Ok(Rewritten {
            n_files_removed: expired.len() as u64,
            n_files_added: 0,
            n_rows: expired.iter().map(|f| f.n_rows).sum(),
        })
    }

    /// Deletes the files no table version references that are older than `grace`. Returns how
    /// many.
    pub async fn vacuum(&self, grace: std::time::Duration) -> anyhow::Result<usize> {
        let mut guard = self.table.lock().await;
        let table = guard.as_mut().context("the events table is not open")?;
        let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
        let (vacuumed, n_deleted) = table::vacuum(table.clone(), grace).await?;
        *table = vacuumed;
        self.serve(table)?;
        Ok(n_deleted)
    }

    /// Runs `work` with the open table, and serves the version it leaves (the previous
    /// layout's conversion).
    pub(crate) async fn with_table<T>(
        &self,
        work: impl AsyncFnOnce(&mut DeltaTable) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut guard = self.table.lock().await;
        let table = guard.as_mut().context("the events table is not open")?;
        let result = work(table).await;
        self.serve(table)?;
        result
    }
}

/// What one flush commits: WAL batches, each agent's new mark, the rows in the table's types;
/// and the agents whose rows must wait (the table's mark, the first `after_seq` found).
struct Flush {
    ids: Vec<i64>,
    marks: BTreeMap<Arc<str>, u64>,
    batches: Vec<RecordBatch>,
    waiting: BTreeMap<Arc<str>, (u64, u64)>,
}

/// Picks the rows of `recent` that extend each agent's chain from its mark in `marks`: in WAL
/// order (an agent's batches are in sequence order there), a batch joins when it follows the
/// chain's end (`after_seq` at or below it; rows at or below it are left out), and the first
/// batch of an agent that does not stops that agent's rows until the next flush.
fn plan_flush(
    recent: &BTreeMap<i64, Recent>,
    marks: &HashMap<Arc<str>, u64>,
) -> anyhow::Result<Flush> {
    let mut flush = Flush {
        ids: Vec::new(),
        marks: BTreeMap::new(),
        batches: Vec::new(),
        waiting: BTreeMap::new(),
    };
    for (id, recent) in recent {
        let agent = &recent.agent_id;
        if flush.waiting.contains_key(agent) {
            continue;
        }
        let end = flush
            .marks
            .get(agent)
            .or_else(|| marks.get(agent))
            .copied()
            .unwrap_or(0);
        if recent.after_seq > end {
            flush
                .waiting
                .insert(Arc::clone(agent), (end, recent.after_seq));
            continue;
        }
        flush.ids.push(*id);
        if recent.last_seq <= end {
            continue;
        }
        flush.marks.insert(Arc::clone(agent), recent.last_seq);
        for (hour_ms, batch) in &recent.batches {
            let batch = if recent.after_seq < end {
                keep_after(batch, end)?
            } else {
                batch.clone()
            };
            if batch.num_rows() > 0 {
                flush.batches.push(table::to_table_batch(&batch, *hour_ms)?);
            }
        }
    }
    Ok(flush)
}

/// The table's marks of `agents` (0 for an agent the table has no rows of), looked up a few at
/// a time (on S3 each lookup reads the log).
async fn lookup_marks(
    table: &DeltaTable,
    agents: BTreeSet<Arc<str>>,
) -> anyhow::Result<HashMap<Arc<str>, u64>> {
    use futures::StreamExt;
    let found: Vec<anyhow::Result<(Arc<str>, u64)>> = futures::stream::iter(agents)
        .map(|agent| async move {
            let seq = table::committed_seq(table, &agent).await?.unwrap_or(0);
            Ok((agent, seq))
        })
        .buffer_unordered(16)
        .collect()
        .await;
    found.into_iter().collect()
}

/// The rows of `batch` (one agent's, in `events`' schema) with a sequence number above `mark`.
fn keep_after(batch: &RecordBatch, mark: u64) -> anyhow::Result<RecordBatch> {
    let seq = batch.column_by_name("seq").context("a batch without seq")?;
    let keep = gt(seq, &UInt64Array::new_scalar(mark)).context("compare seq")?;
    filter_record_batch(batch, &keep).context("filter rows")
}

impl CommittedBatches for EventStore {
    fn committed(
        &self,
        batch_id: i64,
        agent_id: &str,
        after_seq: u64,
        received_ms: i64,
        events: &[Event],
    ) {
        let last_seq = events.iter().map(|e| e.seq).max().unwrap_or(after_seq);
        self.insert(
            batch_id,
            agent_id,
            (after_seq, last_seq),
            crate::schema::to_record_batches(agent_id, received_ms, events),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recent(agent: &str, after_seq: u64, last_seq: u64) -> Recent {
        let events: Vec<Event> = (after_seq + 1..=last_seq)
            .map(|seq| Event {
                seq,
                event_time_ms: 1_769_860_800_000,
                receive_time_ms: 1_769_860_800_000,
                source: runnel_common::SourceKind::Http,
                stream: "web".into(),
                name: "n".into(),
                event_id: None,
                user_id: None,
                session_id: None,
                score: None,
                tags: vec![],
                attrs: Default::default(),
            })
            .collect();
        Recent {
            agent_id: Arc::from(agent),
            after_seq,
            last_seq,
            batches: crate::schema::to_record_batches(agent, 0, &events),
        }
    }

    #[test]
    fn a_flush_extends_each_chain_from_the_tables_mark_and_holds_back_gaps() {
        let recent = BTreeMap::from([
            (1, recent("a", 0, 5)),
            (2, recent("b", 20, 30)),
            (3, recent("a", 5, 10)),
            (4, recent("c", 3, 8)),
            (5, recent("b", 30, 40)),
            (6, recent("d", 0, 4)),
        ]);
        let marks = HashMap::from([
            (Arc::from("b"), 10u64),
            (Arc::from("c"), 5),
            (Arc::from("d"), 4),
        ]);
        let flush = plan_flush(&recent, &marks).unwrap();
        // a from 0: both batches; c from its mark 5: rows 6..=8 only; d's batch is in the table
        // already (its id goes, no rows); b's first batch follows 20, the table ends at 10: b
        // waits, also with its later batch.
        assert_eq!(flush.ids, vec![1, 3, 4, 6]);
        assert_eq!(
            flush.marks,
            BTreeMap::from([(Arc::from("a"), 10u64), (Arc::from("c"), 8)])
        );
        let n_rows: usize = flush.batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(n_rows, 5 + 5 + 3);
        assert_eq!(flush.waiting, BTreeMap::from([(Arc::from("b"), (10, 20))]));
    }
}
