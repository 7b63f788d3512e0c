//! The aggregator's write-ahead log: SQLite in WAL mode, owned by one writer thread.
//!
//! A batch is acknowledged to an agent only after the transaction that stores it has committed.
//! The same transaction moves that agent's high-water mark, so "stored" and "counted as stored"
//! cannot disagree after a crash. Inside the transaction the writer checks the chain:
//! events at or below the mark are replays and are dropped; a batch whose predecessor was not
//! stored yet (`after_seq` above the mark) is rejected, because storing it would move the mark
//! past events that then look like replays and would be lost.
//!
//! The WAL holds only what is acknowledged and not yet committed to the events table: a flush
//! commits the rows to the table (with each agent's mark), then deletes their batches; batches
//! a crash left behind after their commit are dropped at startup (see `store`).
//!
//! The WAL knows nothing of the store: committed and replayed batches go to a
//! [`CommittedBatches`] sink, and the store's file catalog shares the WAL's transactions through
//! [`Wal::transaction`] (so a flush records its files and deletes its batches atomically)
//! without this module knowing its tables.
//!
//! Durability: `journal_mode = WAL` with `storage.synchronous` (`full` by default: a commit is
//! fsynced before the ack). Group commit: all commits queued at once share one transaction.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use runnel_common::Event;
use runnel_common::batch;
use runnel_common::wire::{Batch, Compression};
use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

/// Where committed batches go (the store that makes them queryable): called on the writer
/// thread after each commit, in commit order, and for every batch replayed at startup.
pub trait CommittedBatches: Send + Sync {
    /// `batch_id` is the WAL's id of the batch, unique and increasing; `after_seq` the agent's
    /// sequence number the batch follows.
    fn committed(
        &self,
        batch_id: i64,
        agent_id: &str,
        after_seq: u64,
        received_ms: i64,
        events: &[Event],
    );
}

/// Work run on the writer thread inside one transaction ([`Wal::transaction`]).
trait TransactionWork: Send {
    /// Runs inside the transaction; an error rolls it back.
    fn run(&mut self, tx: &rusqlite::Transaction<'_>) -> anyhow::Result<()>;
    /// The outcome: `Ok` once the transaction has committed.
    fn finish(self: Box<Self>, outcome: anyhow::Result<()>);
}

/// A closure and the channel its caller waits on, as [`TransactionWork`].
struct Work<T, F> {
    work: Option<F>,
    value: Option<T>,
    reply: oneshot::Sender<anyhow::Result<T>>,
}

impl<T, F> TransactionWork for Work<T, F>
where
    T: Send,
    F: FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T> + Send,
{
    fn run(&mut self, tx: &rusqlite::Transaction<'_>) -> anyhow::Result<()> {
        let work = self.work.take().context("transaction work ran twice")?;
        self.value = Some(work(tx)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: anyhow::Result<()>) {
        let Work { value, reply, .. } = *self;
        let result = outcome.and_then(|()| value.context("transaction work did not run"));
        let _ = reply.send(result);
    }
}

/// Commits waiting for the writer. When full, batch streams wait: backpressure reaches the
/// agents through QUIC flow control.
const OP_QUEUE_DEPTH: usize = 1024;

/// Most batches in one group commit.
const MAX_GROUP_BATCHES: usize = 256;

/// One batch for the writer: already decoded and checked by the ingest driver.
pub struct CommitRequest {
    pub agent_id: Arc<str>,
    pub after_seq: u64,
    pub last_seq: u64,
    pub events: Vec<Event>,
    /// The batch as received, stored as is when none of its events is a replay.
    pub batch: Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    Stored { n_new: u32 },
    Duplicate,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CommitError {
    #[error(
        "batch after seq {after_seq} arrived before seq {high_water_mark}+1..={after_seq} was stored"
    )]
    Gap {
        after_seq: u64,
        high_water_mark: u64,
    },
    #[error("WAL write failed: {0}")]
    Storage(String),
    #[error("WAL writer is shut down")]
    Closed,
}

pub type CommitReply = oneshot::Sender<Result<CommitOutcome, CommitError>>;

enum Op {
    Commit {
        request: CommitRequest,
        reply: CommitReply,
    },
    HighWaterMark {
        agent_id: Arc<str>,
        reply: oneshot::Sender<u64>,
    },
    StoredAgents {
        reply: oneshot::Sender<anyhow::Result<Vec<StoredAgent>>>,
    },
    /// Ordered after the commits queued before it; the closure replies by itself.
    Transaction { work: Box<dyn TransactionWork> },
    RaiseMarks {
        marks: Vec<(Arc<str>, u64)>,
        reply: oneshot::Sender<anyhow::Result<usize>>,
    },
}

/// An agent known to the WAL: the last sequence number it stored, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAgent {
    pub agent_id: String,
    pub high_water_mark: u64,
    pub updated_unix_ms: i64,
}

/// Handle to the WAL writer. Cheap to clone; the thread stops when every handle is dropped.
#[derive(Clone)]
pub struct Wal {
    ops: mpsc::Sender<Op>,
}

/// A handle that does not keep the WAL writer running (for readers that live as long as the
/// query engine, such as the `agents` table).
#[derive(Clone)]
pub struct WeakWal {
    ops: mpsc::WeakSender<Op>,
}

impl WeakWal {
    /// The WAL, unless the writer has stopped (the aggregator is shutting down).
    pub fn upgrade(&self) -> Option<Wal> {
        self.ops.upgrade().map(|ops| Wal { ops })
    }
}

pub struct WalThread(JoinHandle<()>);

impl WalThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("WAL writer thread panicked");
        }
    }
}

/// What the WAL held at startup.
pub struct Recovered {
    pub n_batches: usize,
    pub n_events: usize,
}

impl Wal {
    /// Opens the WAL, replays unflushed batches into `store`, and starts the writer thread.
    pub fn open(
        path: &Path,
        synchronous: &str,
        store: Arc<dyn CommittedBatches>,
    ) -> anyhow::Result<(Wal, WalThread, Recovered)> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
        }
        let conn =
            Connection::open(path).with_context(|| format!("open WAL {}", path.display()))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        anyhow::ensure!(
            mode.eq_ignore_ascii_case("wal"),
            "WAL {}: SQLite refused WAL mode ({mode})",
            path.display()
        );
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {synchronous};
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS batches (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 agent_id TEXT NOT NULL,
                 after_seq INTEGER NOT NULL,
                 last_seq INTEGER NOT NULL,
                 n_events INTEGER NOT NULL,
                 uncompressed_bytes INTEGER NOT NULL,
                 compression INTEGER NOT NULL,
                 received_ms INTEGER NOT NULL,
                 payload BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS high_water (
                 agent_id TEXT PRIMARY KEY,
                 seq INTEGER NOT NULL,
                 updated_ms INTEGER NOT NULL
             );"
        ))
        .with_context(|| format!("initialise WAL {}", path.display()))?;

        let high_water = {
            let mut stmt = conn.prepare("SELECT agent_id, seq FROM high_water")?;
            let rows = stmt.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, u64>(1)?))
            })?;
            rows.map(|r| r.map(|(a, s)| (Arc::<str>::from(a), s)))
                .collect::<Result<HashMap<_, _>, _>>()?
        };
        let (n_batches, n_events) =
            replay(&conn, &*store).with_context(|| format!("replay WAL {}", path.display()))?;
        tracing::info!(path = %path.display(), n_agents = high_water.len(), n_batches, n_events, "WAL opened");

        let (ops_tx, ops_rx) = mpsc::channel(OP_QUEUE_DEPTH);
        let mut writer = Writer {
            conn,
            high_water,
            store,
        };
        let handle = std::thread::Builder::new()
            .name("wal-writer".into())
            .spawn(move || writer.run(ops_rx))
            .context("spawn WAL writer thread")?;
        Ok((
            Wal { ops: ops_tx },
            WalThread(handle),
            Recovered {
                n_batches,
                n_events,
            },
        ))
    }

    /// Whether the writer thread still takes requests (for health checks).
    pub fn is_open(&self) -> bool {
        !self.ops.is_closed()
    }

    /// Commits a batch; returns once it is durable (or refused).
    pub async fn commit(&self, request: CommitRequest) -> Result<CommitOutcome, CommitError> {
        let (reply, rx) = oneshot::channel();
        self.submit(request, reply).await?;
        rx.await.map_err(|_| CommitError::Closed)?
    }

    /// Queues a batch for commit without waiting for it; `reply` gets the outcome. Batches
    /// submitted one after another by one task are committed in that order, which is what lets
    /// an agent's chain be pipelined into one group commit.
    pub async fn submit(
        &self,
        request: CommitRequest,
        reply: CommitReply,
    ) -> Result<(), CommitError> {
        self.ops
            .send(Op::Commit { request, reply })
            .await
            .map_err(|_| CommitError::Closed)
    }

    /// The stored high-water mark of an agent (0 if unknown), ordered after queued commits.
    pub async fn high_water_mark(&self, agent_id: Arc<str>) -> anyhow::Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::HighWaterMark { agent_id, reply })
            .await
            .map_err(|_| anyhow::anyhow!("WAL writer stopped"))?;
        rx.await.context("WAL writer stopped")
    }

    /// Raises agents' high-water marks to at least `marks` (what the events table holds of
    /// them), so that a resend of events the table has is a duplicate even when this WAL never
    /// stored them (a restored backup of the WAL, another writer of the table). Returns how many
    /// marks moved.
    pub async fn raise_marks(&self, marks: Vec<(Arc<str>, u64)>) -> anyhow::Result<usize> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::RaiseMarks { marks, reply })
            .await
            .map_err(|_| anyhow::anyhow!("WAL writer stopped"))?;
        rx.await.context("WAL writer stopped")?
    }

    pub fn downgrade(&self) -> WeakWal {
        WeakWal {
            ops: self.ops.downgrade(),
        }
    }

    /// Every agent that ever stored a batch: its high-water mark and when it last moved.
    pub async fn stored_agents(&self) -> anyhow::Result<Vec<StoredAgent>> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::StoredAgents { reply })
            .await
            .map_err(|_| anyhow::anyhow!("WAL writer stopped"))?;
        rx.await.context("WAL writer stopped")?
    }

    /// Runs `work` on the writer thread in one transaction of the WAL's database, after the
    /// commits queued before it, and commits it when `work` returns `Ok`. For state that must
    /// change atomically with the WAL's batches (the store's file catalog, with
    /// [`delete_batches`]); the tables `work` touches belong to its caller.
    pub async fn transaction<T: Send + 'static>(
        &self,
        work: impl FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (reply, rx) = oneshot::channel();
        let work = Box::new(Work {
            work: Some(work),
            value: None,
            reply,
        });
        self.ops
            .send(Op::Transaction { work })
            .await
            .map_err(|_| anyhow::anyhow!("WAL writer stopped"))?;
        rx.await.context("WAL writer stopped")?
    }
}

/// Deletes the batches `batch_ids` (moved to durable storage) inside a [`Wal::transaction`].
pub fn delete_batches(tx: &rusqlite::Transaction<'_>, batch_ids: &[i64]) -> anyhow::Result<()> {
    let mut delete = tx.prepare_cached("DELETE FROM batches WHERE id = ?1")?;
    for id in batch_ids {
        delete.execute(params![id])?;
    }
    Ok(())
}

fn replay(conn: &Connection, store: &dyn CommittedBatches) -> anyhow::Result<(usize, usize)> {
    let mut stmt = conn.prepare(
        "SELECT id, agent_id, after_seq, last_seq, n_events, uncompressed_bytes, compression, received_ms, payload
         FROM batches ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    let (mut n_batches, mut n_events) = (0, 0);
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let agent_id: String = row.get(1)?;
        let batch = Batch {
            after_seq: row.get(2)?,
            last_seq: row.get(3)?,
            n_events: row.get(4)?,
            uncompressed_bytes: row.get(5)?,
            compression: match row.get::<_, i64>(6)? {
                0 => Compression::None,
                1 => Compression::Zstd,
                2 => Compression::ZstdColumns,
                3 => Compression::ZstdColumns2,
                other => anyhow::bail!("WAL batch {id} has unknown compression code {other}"),
            },
            payload: row.get(8)?,
        };
        let received_ms: i64 = row.get(7)?;
        let events = batch::decode(&batch)
            .with_context(|| format!("WAL batch {id} of agent {agent_id} is corrupt"))?;
        n_batches += 1;
        n_events += events.len();
        store.committed(id, &agent_id, batch.after_seq, received_ms, &events);
    }
    Ok((n_batches, n_events))
}

struct Writer {
    conn: Connection,
    /// Mirror of the `high_water` table, changed only after the transaction that wrote it.
    high_water: HashMap<Arc<str>, u64>,
    store: Arc<dyn CommittedBatches>,
}

/// A commit that passed the chain check, waiting for the transaction.
struct Accepted {
    agent_id: Arc<str>,
    events: Vec<Event>,
    batch: Batch,
}

impl Writer {
    fn run(&mut self, mut ops: mpsc::Receiver<Op>) {
        let mut commits: Vec<(CommitRequest, CommitReply)> = Vec::new();
        let mut others: Vec<Op> = Vec::new();
        while let Some(first) = ops.blocking_recv() {
            let mut next = Some(first);
            while let Some(op) = next.take() {
                match op {
                    Op::Commit { request, reply } => commits.push((request, reply)),
                    other => others.push(other),
                }
                if commits.len() < MAX_GROUP_BATCHES {
                    next = ops.try_recv().ok();
                }
            }
            if !commits.is_empty() {
                self.commit_group(&mut commits);
            }
            for op in others.drain(..) {
                match op {
                    Op::Commit { .. } => unreachable!("commits are grouped"),
                    Op::HighWaterMark { agent_id, reply } => {
                        let _ = reply.send(self.high_water.get(&agent_id).copied().unwrap_or(0));
                    }
                    Op::StoredAgents { reply } => {
                        let _ = reply.send(self.stored_agents());
                    }
                    Op::Transaction { work } => self.transaction(work),
                    Op::RaiseMarks { marks, reply } => {
                        let _ = reply.send(self.raise_marks(marks));
                    }
                }
            }
        }
        tracing::debug!("WAL writer stopped");
    }

    fn commit_group(&mut self, commits: &mut Vec<(CommitRequest, CommitReply)>) {
        let received_ms = now_unix_ms();
        // Chain check against the marks as they will be once earlier commits of this group land.
        let mut marks: HashMap<Arc<str>, u64> = HashMap::new();
        let mut outcomes: Vec<Result<Option<Accepted>, CommitError>> =
            Vec::with_capacity(commits.len());
        for (request, _) in commits.iter_mut() {
            let mark = *marks
                .entry(Arc::clone(&request.agent_id))
                .or_insert_with(|| self.high_water.get(&request.agent_id).copied().unwrap_or(0));
            if request.after_seq > mark {
                outcomes.push(Err(CommitError::Gap {
                    after_seq: request.after_seq,
                    high_water_mark: mark,
                }));
                continue;
            }
            if request.last_seq <= mark {
                outcomes.push(Ok(None));
                continue;
            }
            let mut events = std::mem::take(&mut request.events);
            let mut batch = std::mem::replace(&mut request.batch, empty_batch());
            if request.after_seq < mark {
                // Partial replay (the agent re-batched after a reconnect): keep the new events.
                events.retain(|e| e.seq > mark);
                match batch::encode(mark, &events) {
                    Ok(b) => batch = b,
                    Err(error) => {
                        outcomes.push(Err(CommitError::Storage(format!(
                            "re-encode partial batch: {error}"
                        ))));
                        continue;
                    }
                }
            }
            marks.insert(Arc::clone(&request.agent_id), request.last_seq);
            outcomes.push(Ok(Some(Accepted {
                agent_id: Arc::clone(&request.agent_id),
                events,
                batch,
            })));
        }

        let result = (|| -> rusqlite::Result<Vec<i64>> {
            let tx = self.conn.transaction()?;
            let mut ids = Vec::new();
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO batches (agent_id, after_seq, last_seq, n_events, uncompressed_bytes, compression, received_ms, payload)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for accepted in outcomes.iter().flatten().flatten() {
                    let b = &accepted.batch;
                    let compression = match b.compression {
                        Compression::None => 0,
                        Compression::Zstd => 1,
                        Compression::ZstdColumns => 2,
                        Compression::ZstdColumns2 => 3,
                    };
                    insert.execute(params![
                        &*accepted.agent_id,
                        b.after_seq,
                        b.last_seq,
                        b.n_events,
                        b.uncompressed_bytes,
                        compression,
                        received_ms,
                        b.payload
                    ])?;
                    ids.push(tx.last_insert_rowid());
                }
                let mut mark = tx.prepare_cached(
                    "INSERT INTO high_water (agent_id, seq, updated_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (agent_id) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms",
                )?;
                for (agent_id, seq) in &marks {
                    if self.high_water.get(agent_id) != Some(seq) {
                        mark.execute(params![&**agent_id, seq, received_ms])?;
                    }
                }
            }
            tx.commit()?;
            Ok(ids)
        })();

        match result {
            Ok(ids) => {
                self.high_water.extend(marks);
                let mut ids = ids.into_iter();
                for ((_, reply), outcome) in commits.drain(..).zip(outcomes) {
                    let reply_value = match outcome {
                        Ok(Some(accepted)) => {
                            let id = ids.next().expect("one id per accepted batch");
                            self.store.committed(
                                id,
                                &accepted.agent_id,
                                accepted.batch.after_seq,
                                received_ms,
                                &accepted.events,
                            );
                            Ok(CommitOutcome::Stored {
                                n_new: accepted.events.len() as u32,
                            })
                        }
                        Ok(None) => Ok(CommitOutcome::Duplicate),
                        Err(error) => Err(error),
                    };
                    let _ = reply.send(reply_value);
                }
            }
            Err(error) => {
                tracing::warn!(%error, n_batches = commits.len(), "WAL commit failed");
                for (_, reply) in commits.drain(..) {
                    let _ = reply.send(Err(CommitError::Storage(error.to_string())));
                }
            }
        }
    }

    fn stored_agents(&mut self) -> anyhow::Result<Vec<StoredAgent>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT agent_id, seq, updated_ms FROM high_water ORDER BY agent_id")?;
        let rows = stmt.query_map([], |row| {
            Ok(StoredAgent {
                agent_id: row.get(0)?,
                high_water_mark: row.get(1)?,
                updated_unix_ms: row.get(2)?,
            })
        })?;
        rows.collect::<Result<_, _>>().context("read high_water")
    }

    fn raise_marks(&mut self, marks: Vec<(Arc<str>, u64)>) -> anyhow::Result<usize> {
        let raised: Vec<(Arc<str>, u64)> = marks
            .into_iter()
            .filter(|(agent, seq)| self.high_water.get(agent).is_none_or(|mark| mark < seq))
            .collect();
        if raised.is_empty() {
            return Ok(0);
        }
        let now = now_unix_ms();
        let tx = self.conn.transaction().context("begin WAL transaction")?;
        {
            let mut mark = tx.prepare_cached(
                "INSERT INTO high_water (agent_id, seq, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (agent_id) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms",
            )?;
            for (agent_id, seq) in &raised {
                mark.execute(params![&**agent_id, seq, now])?;
            }
        }
        tx.commit().context("commit raised high-water marks")?;
        let n = raised.len();
        self.high_water.extend(raised);
        Ok(n)
    }

    /// Runs `work` in one transaction and tells it whether the transaction committed.
    fn transaction(&mut self, mut work: Box<dyn TransactionWork>) {
        let outcome = (|| -> anyhow::Result<()> {
            let tx = self.conn.transaction().context("begin WAL transaction")?;
            work.run(&tx)?;
            tx.commit().context("commit WAL transaction")
        })();
        work.finish(outcome);
    }
}

fn empty_batch() -> Batch {
    Batch {
        after_seq: 0,
        last_seq: 0,
        n_events: 0,
        uncompressed_bytes: 0,
        compression: Compression::None,
        payload: Vec::new(),
    }
}

pub fn now_unix_ms() -> i64 {
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
