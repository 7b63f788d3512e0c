//! The agent's durable buffer: SQLite in WAL mode, owned by one writer thread.
//!
//! Every operation goes through a bounded queue to the writer thread, which batches appends from
//! many concurrent requests into one transaction (group commit) and answers each request only
//! after the commit returned. That answer is what lets a source acknowledge: an HTTP 2xx is sent
//! only for events that are in a committed transaction.
//!
//! Durability: `journal_mode = WAL` with the configured `synchronous` level. With `full` (the
//! default) a commit is fsynced before it is acknowledged, so acknowledged events survive power
//! loss. With `normal`, WAL commits are fsynced only at checkpoints: they survive a process crash
//! (kill -9) but the last commits may be lost on power loss. `off` is for benchmarks.
//!
//! Sequence numbers are `seq INTEGER PRIMARY KEY AUTOINCREMENT`: SQLite persists the highest one
//! ever assigned, so they never repeat even after the table was emptied by shipping.
//!
//! This module must not block async workers: callers await a reply from the writer thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use runnel_common::Event;
use runnel_common::streams::AGENT_DROPS;
use runnel_config::{BufferConfig, WhenFull};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

/// Requests waiting for the writer thread. Beyond this, `append` waits (backpressure to the
/// HTTP handlers), which is what we want under overload.
const OP_QUEUE_DEPTH: usize = 4096;

/// Most events in one group commit. Bounds transaction size and reply latency.
const MAX_GROUP_EVENTS: usize = 50_000;

/// An event encoded for storage.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// The event in postcard, `seq` = 0 (the buffer assigns it); its length is the event's size
    /// for every byte limit.
    pub bytes: Vec<u8>,
    /// The event's stream, kept apart for the drop policies' stream priorities.
    pub stream: String,
}

impl EncodedEvent {
    /// Encodes an event for storage.
    pub fn encode(event: &Event) -> Result<EncodedEvent, postcard::Error> {
        postcard::to_stdvec(event).map(|bytes| EncodedEvent {
            bytes,
            stream: event.stream.clone(),
        })
    }
}

/// Priority of drop reports (stream [`AGENT_DROPS`]: one event per stream, reason and commit that
/// dropped events, committed in the same transaction as the drop, so the aggregator's counts are
/// exact): above anything a config can set, so never dropped or evicted themselves.
const DROP_REPORT_PRIORITY: i64 = 1000;

/// Why events were dropped; the `reason` of a drop report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// `when_full = "drop_newest"`: arriving events discarded.
    BufferFullDropNewest,
    /// `when_full = "drop_oldest"`: buffered events evicted for newer ones.
    BufferFullEvicted,
    /// `when_full = "drop_oldest"` but nothing evictable of the same or lower priority.
    BufferFullNoRoom,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [
        DropReason::BufferFullDropNewest,
        DropReason::BufferFullEvicted,
        DropReason::BufferFullNoRoom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferFullDropNewest => "buffer_full_drop_newest",
            DropReason::BufferFullEvicted => "buffer_full_evicted",
            DropReason::BufferFullNoRoom => "buffer_full_no_room",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Sequence numbers of the stored events; both 0 when none was stored (dropped).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Events of this request discarded by a drop policy (acknowledged, not stored).
    pub n_dropped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Nothing stored (`when_full = "block"`). The events come back, so a caller that waits for
    /// room can try again without having kept a copy.
    #[error("buffer is full ({buffered_bytes} of {max_bytes} bytes)")]
    Full {
        buffered_bytes: u64,
        max_bytes: u64,
        events: Vec<EncodedEvent>,
    },
    #[error("buffer write failed: {0}")]
    Storage(String),
    #[error("buffer is shut down")]
    Closed,
}

/// What the buffer holds right now (events, bytes) and the last sequence number it assigned,
/// published after every commit. The uplink derives the session's
/// [`runnel_common::session::BufferHead`] from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Contents {
    /// Highest sequence number committed.
    pub last_seq: u64,
    pub n_events: u64,
    pub n_bytes: u64,
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub n_appended: AtomicU64,
    pub n_refused_full: AtomicU64,
    pub n_commits: AtomicU64,
    pub n_deleted: AtomicU64,
    /// Events discarded or evicted by a drop policy.
    pub n_dropped: AtomicU64,
    /// `n_dropped` by reason, indexed by `DropReason as usize`.
    pub n_dropped_by_reason: [AtomicU64; DropReason::ALL.len()],
}

impl Stats {
    /// Drops since start by reason (`buffer_full_drop_newest`, ...), reasons with none left out.
    pub fn dropped_by_reason(&self) -> std::collections::BTreeMap<String, u64> {
        DropReason::ALL
            .iter()
            .map(|reason| {
                let n = self.n_dropped_by_reason[*reason as usize].load(Ordering::Relaxed);
                (reason.as_str().to_owned(), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

type AppendReply = oneshot::Sender<Result<Appended, AppendError>>;

/// Events read for shipping, already laid out as a batch payload: the postcard encoding of
/// `Vec<Event>` with every `seq` filled in. Built from the stored rows without decoding them.
#[derive(Debug)]
pub struct RawEvents {
    pub last_seq: u64,
    pub n_events: usize,
    pub raw: Vec<u8>,
}

/// Identifies a message a source acknowledged (or is about to) by its protocol's delivery id, so
/// a redelivery after a crash between our commit and the source's ack is recognised. For MQTT:
/// the subscriber's name, the packet id and a digest of topic and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryMark {
    pub source: String,
    pub delivery_id: u32,
    pub digest: [u8; 16],
}

enum Op {
    Append {
        events: Vec<EncodedEvent>,
        /// Recorded in the same transaction as the events.
        marks: Vec<DeliveryMark>,
        reply: AppendReply,
    },
    ReadRaw {
        after_seq: u64,
        max_events: usize,
        max_bytes: usize,
        reply: oneshot::Sender<anyhow::Result<Option<RawEvents>>>,
    },
    Delivered {
        mark: DeliveryMark,
        reply: oneshot::Sender<anyhow::Result<bool>>,
    },
    Read {
        after_seq: u64,
        max_events: usize,
        max_bytes: usize,
        reply: oneshot::Sender<anyhow::Result<Vec<Event>>>,
    },
    Delete {
        after_seq: u64,
        last_seq: u64,
        reply: oneshot::Sender<anyhow::Result<u64>>,
    },
    Reconcile {
        high_water_mark: u64,
        reply: oneshot::Sender<anyhow::Result<Reconciled>>,
    },
    Oldest {
        reply: oneshot::Sender<anyhow::Result<Option<Oldest>>>,
    },
    ShippedSeq {
        reply: oneshot::Sender<u64>,
    },
    SetPolicy {
        policy: Policy,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
}

/// The parts of `[buffer]` a managed config may change while the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub when_full: WhenFull,
    pub stream_priorities: std::collections::BTreeMap<String, u8>,
}

/// The oldest event still in the buffer (not yet acknowledged by the aggregator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oldest {
    pub seq: u64,
    pub receive_time_ms: i64,
}

/// What aligning the buffer with the aggregator's high-water mark did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// Events at or below the mark, already stored centrally, deleted here.
    pub n_deleted: u64,
    /// When the aggregator knew sequence numbers this buffer never assigned (the buffer was
    /// reset while the agent kept its identity), pending events were renumbered by this much.
    pub renumbered_by: u64,
}

/// Handle to the buffer. Cheap to clone; the writer thread stops when every handle is dropped.
#[derive(Clone)]
pub struct Buffer {
    ops: mpsc::Sender<Op>,
    contents: watch::Receiver<Contents>,
    stats: Arc<Stats>,
}

/// Owns the writer thread; join it on shutdown so the last commit finishes.
pub struct BufferThread(JoinHandle<()>);

impl BufferThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("buffer writer thread panicked");
        }
    }
}

impl Buffer {
    pub fn open(config: &BufferConfig) -> anyhow::Result<(Buffer, BufferThread)> {
        let mut writer = Writer::open(config)?;
        let contents = writer.contents;
        let (contents_tx, contents_rx) = watch::channel(contents);
        let (ops_tx, ops_rx) = mpsc::channel(OP_QUEUE_DEPTH);
        let stats = Arc::new(Stats::default());
        let thread_stats = Arc::clone(&stats);
        let handle = std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || writer.run(ops_rx, contents_tx, &thread_stats))
            .context("spawn buffer writer thread")?;
        Ok((
            Buffer {
                ops: ops_tx,
                contents: contents_rx,
                stats,
            },
            BufferThread(handle),
        ))
    }

    /// Commits events and returns their sequence numbers. Returns only after the commit.
    pub async fn append(&self, events: Vec<EncodedEvent>) -> Result<Appended, AppendError> {
        self.append_marked(events, Vec::new()).await
    }

    /// As [`Buffer::append`], also recording `marks` in the same transaction: either the events
    /// and their marks are committed, or neither.
    pub async fn append_marked(
        &self,
        events: Vec<EncodedEvent>,
        marks: Vec<DeliveryMark>,
    ) -> Result<Appended, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::Append {
                events,
                marks,
                reply,
            })
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Whether a message with exactly this mark was committed (its events are, or were, here).
    pub async fn delivered(&self, mark: DeliveryMark) -> anyhow::Result<bool> {
        self.call(|reply| Op::Delivered { mark, reply }).await
    }

    /// Reads up to `max_events` events with `seq > after_seq`, in order, stopping before
    /// `max_bytes` of stored data (but always returning at least one event if there is one).
    pub async fn read_after(
        &self,
        after_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<Event>> {
        self.call(|reply| Op::Read {
            after_seq,
            max_events,
            max_bytes,
            reply,
        })
        .await
    }

    /// As [`Buffer::read_after`], but returns the events as a ready batch payload (`None` when
    /// there is nothing after `after_seq`).
    pub async fn read_raw(
        &self,
        after_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Option<RawEvents>> {
        self.call(|reply| Op::ReadRaw {
            after_seq,
            max_events,
            max_bytes,
            reply,
        })
        .await
    }

    /// Deletes events in `(after_seq, last_seq]`: the aggregator has them.
    pub async fn delete_range(&self, after_seq: u64, last_seq: u64) -> anyhow::Result<u64> {
        self.call(|reply| Op::Delete {
            after_seq,
            last_seq,
            reply,
        })
        .await
    }

    /// Aligns the buffer with the aggregator's high-water mark after a (re)connect.
    pub async fn reconcile(&self, high_water_mark: u64) -> anyhow::Result<Reconciled> {
        self.call(|reply| Op::Reconcile {
            high_water_mark,
            reply,
        })
        .await
    }

    /// The shipped mark: every sequence number at or below it was acknowledged by an aggregator
    /// (in an acknowledged batch's range, or at or below a Welcome's mark the buffer was
    /// reconciled with) and is never sent again. The uplink names it in its `Resume` (protocol
    /// 4), so that an aggregator it moved to starts the chain there. Kept in the buffer's
    /// database in the same transaction as the deletes that move it, so a restarted agent does
    /// not start a chain below events another aggregator holds.
    pub async fn shipped_seq(&self) -> anyhow::Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::ShippedSeq { reply })
            .await
            .map_err(|_| anyhow::anyhow!("buffer writer stopped"))?;
        rx.await.context("buffer writer stopped")
    }

    /// The oldest event in the buffer, for status: how far shipping lags. Reads only; unlike
    /// [`Buffer::read_after`] it does not count as handed to the uplink.
    pub async fn oldest(&self) -> anyhow::Result<Option<Oldest>> {
        self.call(|reply| Op::Oldest { reply }).await
    }

    /// Changes the full-buffer policy for appends queued after this call. Priorities apply to
    /// events appended from now on (stored rows keep the priority they were written with).
    pub async fn set_policy(&self, policy: Policy) -> anyhow::Result<()> {
        self.call(|reply| Op::SetPolicy { policy, reply }).await
    }

    pub fn contents(&self) -> watch::Receiver<Contents> {
        self.contents.clone()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Sends the op `make` builds around a reply channel and waits for the writer's answer.
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<anyhow::Result<T>>) -> Op,
    ) -> anyhow::Result<T> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(make(reply))
            .await
            .map_err(|_| anyhow::anyhow!("buffer writer stopped"))?;
        rx.await.context("buffer writer stopped")?
    }
}

struct PendingDelete {
    after_seq: u64,
    last_seq: u64,
    reply: oneshot::Sender<anyhow::Result<u64>>,
}

struct PendingAppend {
    events: Vec<EncodedEvent>,
    marks: Vec<DeliveryMark>,
    reply: AppendReply,
}

struct Writer {
    path: PathBuf,
    conn: Connection,
    max_bytes: u64,
    when_full: WhenFull,
    priorities: std::collections::BTreeMap<String, u8>,
    contents: Contents,
    /// Highest sequence number handed to the uplink since it last (re)connected. Rows at or below
    /// it may be in flight and are never evicted: evicting them would count as dropped events
    /// the aggregator then stores anyway.
    read_mark: u64,
    /// The newest drop report row per (stream, reason): its seq, count and encoded size. While
    /// its seq is above `read_mark` (the uplink has not read it), later drops of the same key add
    /// to it instead of writing a row each: under sustained overload reports stay one row per
    /// key and shipping round, not one per commit, so they cannot crowd out events.
    open_reports: std::collections::HashMap<(String, DropReason), OpenReport>,
    /// Commits with deletes since the file was last shrunk.
    n_commits_since_shrink: u32,
    /// See [`Buffer::shipped_seq`]; the row of `shipped_mark`.
    shipped_seq: u64,
}

/// Shrink the file after this many commits that deleted rows (or when the buffer is empty).
const SHRINK_EVERY_COMMITS: u32 = 64;

/// Free pages worth giving back to the file system (4 KiB pages: 1 MiB).
const SHRINK_MIN_FREE_PAGES: i64 = 256;

/// Largest size SQLite leaves the write-ahead log at after a checkpoint resets it.
const JOURNAL_SIZE_LIMIT_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
struct OpenReport {
    seq: u64,
    n_events: u64,
    n_bytes: u64,
}

impl Writer {
    fn open(config: &BufferConfig) -> anyhow::Result<Writer> {
        let path = config.path.clone();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create buffer directory {}", parent.display()))?;
        }
        let conn = open_connection(&path, config.synchronous.as_pragma())?;
        if config.when_full == WhenFull::DropOldest {
            // Eviction picks the lowest priority, oldest first; without this index each eviction
            // would scan the buffer. Only built for drop_oldest: it costs every insert.
            conn.execute_batch(
                "CREATE INDEX IF NOT EXISTS events_by_priority ON events (priority, seq)",
            )
            .with_context(|| format!("index buffer {}", path.display()))?;
        }
        let (n_events, n_bytes): (u64, u64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(data)), 0) FROM events",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .with_context(|| format!("read buffer state from {}", path.display()))?;
        let last_seq = last_assigned_seq(&conn)?;
        let contents = Contents {
            last_seq,
            n_events,
            n_bytes,
        };
        let stored_shipped: Option<u64> = conn
            .query_row("SELECT seq FROM shipped_mark WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()
            .with_context(|| format!("read the shipped mark from {}", path.display()))?;
        // A buffer made before the mark existed: when it is empty, everything it ever assigned
        // was acknowledged; otherwise 0 is the safe guess (the chain then starts at the Welcome's
        // mark, as before).
        let shipped_seq = stored_shipped.unwrap_or(if n_events == 0 { last_seq } else { 0 });
        tracing::info!(path = %path.display(), n_events, n_bytes, last_seq, shipped_seq, "buffer opened");
        Ok(Writer {
            path,
            conn,
            max_bytes: config.max_bytes,
            when_full: config.when_full,
            priorities: config.stream_priorities.clone(),
            contents,
            read_mark: 0,
            open_reports: std::collections::HashMap::new(),
            n_commits_since_shrink: 0,
            shipped_seq,
        })
    }

    fn run(
        &mut self,
        mut ops: mpsc::Receiver<Op>,
        contents_tx: watch::Sender<Contents>,
        stats: &Stats,
    ) {
        let mut appends: Vec<PendingAppend> = Vec::new();
        let mut deletes: Vec<PendingDelete> = Vec::new();
        let mut others: Vec<Op> = Vec::new();
        while let Some(first) = ops.blocking_recv() {
            // Group commit: take everything already queued, up to a bound, into one transaction.
            let mut n_group_events = 0usize;
            let mut next = Some(first);
            while let Some(op) = next.take() {
                match op {
                    Op::Append {
                        events,
                        marks,
                        reply,
                    } => {
                        n_group_events += events.len();
                        appends.push(PendingAppend {
                            events,
                            marks,
                            reply,
                        });
                    }
                    // Shipped events are deleted in the same transaction as the next group
                    // commit: one fsync for both. Losing a delete to a crash only means the
                    // aggregator sees a replay, which it drops.
                    Op::Delete {
                        after_seq,
                        last_seq,
                        reply,
                    } => deletes.push(PendingDelete {
                        after_seq,
                        last_seq,
                        reply,
                    }),
                    other => others.push(other),
                }
                if n_group_events < MAX_GROUP_EVENTS {
                    next = ops.try_recv().ok();
                }
            }
            if !appends.is_empty() || !deletes.is_empty() {
                let had_deletes = !deletes.is_empty();
                self.commit_group(&mut deletes, &mut appends, stats);
                if had_deletes {
                    self.n_commits_since_shrink += 1;
                    if self.n_commits_since_shrink >= SHRINK_EVERY_COMMITS
                        || self.contents.n_events == 0
                    {
                        self.n_commits_since_shrink = 0;
                        self.shrink();
                    }
                }
            }
            for op in others.drain(..) {
                self.handle(op);
            }
            contents_tx.send_replace(self.contents);
        }
        tracing::debug!(path = %self.path.display(), "buffer writer stopped");
    }

    /// One transaction: the deletes (which free room), then the appends.
    fn commit_group(
        &mut self,
        deletes: &mut Vec<PendingDelete>,
        appends: &mut Vec<PendingAppend>,
        stats: &Stats,
    ) {
        let mut n_deleted: Vec<u64> = Vec::with_capacity(deletes.len());
        let shipped_before = self.shipped_seq;
        let shipped_after = deletes
            .iter()
            .map(|delete| delete.last_seq)
            .fold(shipped_before, u64::max);
        let mut outcomes: Vec<Result<Appended, AppendError>> = Vec::with_capacity(appends.len());
        let contents_before = self.contents;
        let mut drops: std::collections::BTreeMap<(String, DropReason), u64> =
            std::collections::BTreeMap::new();
        let Writer {
            conn,
            contents,
            priorities,
            open_reports,
            ..
        } = self;
        let mut reports_after: Vec<((String, DropReason), OpenReport)> = Vec::new();
        let (max_bytes, when_full, read_mark) = (self.max_bytes, self.when_full, self.read_mark);
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            for delete in deletes.iter() {
                let (n_events, n_bytes) = delete_rows(&tx, delete.after_seq, delete.last_seq)?;
                contents.n_events -= n_events;
                contents.n_bytes -= n_bytes;
                n_deleted.push(n_events);
            }
            if shipped_after > shipped_before {
                save_shipped_seq(&tx, shipped_after)?;
            }
            for PendingAppend { events, marks, .. } in appends.iter() {
                let n_bytes: u64 = events.iter().map(|e| e.bytes.len() as u64).sum();
                if contents.n_bytes + n_bytes > max_bytes {
                    let made_room = match when_full {
                        WhenFull::Block => {
                            outcomes.push(Err(AppendError::Full {
                                buffered_bytes: contents.n_bytes,
                                max_bytes,
                                events: Vec::new(),
                            }));
                            continue;
                        }
                        WhenFull::DropNewest => false,
                        WhenFull::DropOldest => {
                            let needed = contents.n_bytes + n_bytes - max_bytes;
                            let ceiling = events
                                .iter()
                                .map(|e| stream_priority(priorities, &e.stream))
                                .max()
                                .unwrap_or(0);
                            evict(&tx, contents, read_mark, needed, ceiling, &mut drops)? >= needed
                        }
                    };
                    if !made_room {
                        let reason = match when_full {
                            WhenFull::DropOldest => DropReason::BufferFullNoRoom,
                            _ => DropReason::BufferFullDropNewest,
                        };
                        for event in events {
                            *drops.entry((event.stream.clone(), reason)).or_default() += 1;
                        }
                        // The source's delivery is settled: a redelivery must not be stored either.
                        insert_marks(&tx, marks, MAX_DELIVERY_MARKS)?;
                        outcomes.push(Ok(Appended {
                            first_seq: 0,
                            last_seq: 0,
                            n_dropped: events.len(),
                        }));
                        continue;
                    }
                }
                let (first_seq, last_seq) = insert_events(&tx, contents, priorities, events)?;
                insert_marks(&tx, marks, MAX_DELIVERY_MARKS)?;
                contents.n_events += events.len() as u64;
                contents.n_bytes += n_bytes;
                outcomes.push(Ok(Appended {
                    first_seq,
                    last_seq,
                    n_dropped: 0,
                }));
            }
            // Reports may exceed max_bytes by their own (small) size: losing them would make
            // the drop counts wrong, which is worse. One row per key while unread (see
            // `open_reports`).
            for (key, n) in &drops {
                let open = open_reports
                    .get(key)
                    .copied()
                    .filter(|open| open.seq > read_mark);
                let n_events = open.map_or(0, |open| open.n_events) + n;
                let report = drop_report(&key.0, key.1, n_events);
                let n_bytes = report.bytes.len() as u64;
                let updated = match open {
                    Some(open) => {
                        let n_rows = tx
                            .prepare_cached("UPDATE events SET data = ?1 WHERE seq = ?2")?
                            .execute(params![report.bytes, open.seq])?;
                        (n_rows == 1).then(|| {
                            contents.n_bytes = contents.n_bytes - open.n_bytes + n_bytes;
                            open.seq
                        })
                    }
                    None => None,
                };
                let seq = match updated {
                    Some(seq) => seq,
                    None => {
                        let (_, seq) = insert_events(&tx, contents, priorities, &[report])?;
                        contents.n_events += 1;
                        contents.n_bytes += n_bytes;
                        seq
                    }
                };
                reports_after.push((
                    key.clone(),
                    OpenReport {
                        seq,
                        n_events,
                        n_bytes,
                    },
                ));
            }
            tx.commit()
        })();
        match result {
            Ok(()) => {
                self.shipped_seq = shipped_after;
                self.open_reports.extend(reports_after);
                stats.n_commits.fetch_add(1, Ordering::Relaxed);
                for (PendingDelete { reply, .. }, n) in deletes.drain(..).zip(n_deleted) {
                    stats.n_deleted.fetch_add(n, Ordering::Relaxed);
                    let _ = reply.send(Ok(n));
                }
                let n_dropped: u64 = drops.values().sum();
                for ((stream, reason), n) in &drops {
                    stats.n_dropped_by_reason[*reason as usize].fetch_add(*n, Ordering::Relaxed);
                    metrics::counter!(
                        "runnel_agent_dropped_events_total",
                        "stream" => stream.clone(),
                        "reason" => reason.as_str()
                    )
                    .increment(*n);
                }
                if n_dropped > 0 {
                    stats.n_dropped.fetch_add(n_dropped, Ordering::Relaxed);
                    tracing::debug!(
                        n_dropped,
                        policy = when_full.as_str(),
                        "buffer full: events dropped"
                    );
                }
                for (PendingAppend { events, reply, .. }, mut outcome) in
                    appends.drain(..).zip(outcomes)
                {
                    match &outcome {
                        Ok(appended) => stats.n_appended.fetch_add(
                            (events.len() - appended.n_dropped) as u64,
                            Ordering::Relaxed,
                        ),
                        Err(_) => stats
                            .n_refused_full
                            .fetch_add(events.len() as u64, Ordering::Relaxed),
                    };
                    if let Err(AppendError::Full {
                        events: returned, ..
                    }) = &mut outcome
                    {
                        *returned = events;
                    }
                    // The requester may have gone away (client disconnected); the events are
                    // committed either way and will be shipped.
                    let _ = reply.send(outcome);
                }
            }
            Err(error) => {
                // Nothing of this group is committed: refuse all of it, so no source acks it.
                self.contents = contents_before;
                tracing::warn!(%error, n_requests = appends.len(), "buffer commit failed");
                for PendingDelete { reply, .. } in deletes.drain(..) {
                    let _ = reply.send(Err(anyhow::anyhow!("buffer delete failed: {error}")));
                }
                for PendingAppend { reply, .. } in appends.drain(..) {
                    let _ = reply.send(Err(AppendError::Storage(error.to_string())));
                }
            }
        }
    }

    fn handle(&mut self, op: Op) {
        match op {
            Op::Append { .. } => unreachable!("appends are grouped by run()"),
            Op::SetPolicy { policy, reply } => {
                let mut result = Ok(());
                if policy.when_full == WhenFull::DropOldest {
                    // As in `open`: eviction needs the index.
                    result = self
                        .conn
                        .execute_batch(
                            "CREATE INDEX IF NOT EXISTS events_by_priority ON events (priority, seq)",
                        )
                        .with_context(|| format!("index buffer {}", self.path.display()));
                }
                if result.is_ok() {
                    tracing::info!(
                        when_full = policy.when_full.as_str(),
                        "buffer policy changed"
                    );
                    self.when_full = policy.when_full;
                    self.priorities = policy.stream_priorities;
                }
                let _ = reply.send(result);
            }
            Op::ReadRaw {
                after_seq,
                max_events,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(self.read_raw(after_seq, max_events, max_bytes));
            }
            Op::Delivered { mark, reply } => {
                let found = self
                    .conn
                    .prepare_cached(
                        "SELECT count(*) FROM delivery_marks WHERE source = ?1 AND delivery_id = ?2 AND digest = ?3",
                    )
                    .and_then(|mut stmt| {
                        stmt.query_row(params![mark.source, mark.delivery_id, &mark.digest[..]], |row| {
                            row.get::<_, u64>(0)
                        })
                    })
                    .map(|n| n > 0)
                    .context("look up delivery mark");
                let _ = reply.send(found);
            }
            Op::Read {
                after_seq,
                max_events,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(self.read_after(after_seq, max_events, max_bytes));
            }
            Op::Delete { .. } => unreachable!("deletes are grouped by run()"),
            Op::Reconcile {
                high_water_mark,
                reply,
            } => {
                let _ = reply.send(self.reconcile(high_water_mark));
            }
            Op::Oldest { reply } => {
                let _ = reply.send(self.oldest());
            }
            Op::ShippedSeq { reply } => {
                let _ = reply.send(self.shipped_seq);
            }
        }
    }

    fn oldest(&self) -> anyhow::Result<Option<Oldest>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, data FROM events ORDER BY seq LIMIT 1")?;
        let mut rows = stmt.query([])?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        let seq: u64 = row.get(0)?;
        let event: Event = postcard::from_bytes(row.get_ref(1)?.as_blob()?)
            .with_context(|| format!("buffer row {seq} does not decode (corrupt buffer?)"))?;
        Ok(Some(Oldest {
            seq,
            receive_time_ms: event.receive_time_ms,
        }))
    }

    fn read_after(
        &mut self,
        after_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<Event>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, data FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let mut rows = stmt.query(params![after_seq, max_events as u64])?;
        let mut events = Vec::new();
        let mut n_bytes = 0usize;
        while let Some(row) = rows.next()? {
            let seq: u64 = row.get(0)?;
            let data = row.get_ref(1)?.as_blob()?;
            if !events.is_empty() && n_bytes + data.len() > max_bytes {
                break;
            }
            n_bytes += data.len();
            let mut event: Event = postcard::from_bytes(data)
                .with_context(|| format!("buffer row {seq} does not decode (corrupt buffer?)"))?;
            event.seq = seq;
            events.push(event);
        }
        drop(rows);
        drop(stmt);
        if let Some(last) = events.last() {
            self.read_mark = self.read_mark.max(last.seq);
        }
        Ok(events)
    }

    fn read_raw(
        &mut self,
        after_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Option<RawEvents>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, data FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let mut rows = stmt.query(params![after_seq, max_events as u64])?;
        let mut body = Vec::new();
        let (mut n_events, mut last_seq) = (0usize, 0u64);
        while let Some(row) = rows.next()? {
            let seq: u64 = row.get(0)?;
            let data = row.get_ref(1)?.as_blob()?;
            if n_events > 0 && body.len() + data.len() > max_bytes {
                break;
            }
            // A row is a postcard `Event` stored with `seq` = 0. `seq` is the struct's first
            // field, a varint, so the row starts with the single byte 0; replacing that byte with
            // the real sequence number gives the event as it travels.
            anyhow::ensure!(
                data.first() == Some(&0),
                "buffer row {seq} does not start with seq 0 (corrupt buffer?)"
            );
            body = postcard::to_extend(&seq, body).context("encode sequence number")?;
            body.extend_from_slice(&data[1..]);
            n_events += 1;
            last_seq = seq;
        }
        drop(rows);
        drop(stmt);
        if n_events == 0 {
            return Ok(None);
        }
        self.read_mark = self.read_mark.max(last_seq);
        // A `Vec` is its length as a varint, then its elements.
        let mut raw = postcard::to_stdvec(&(n_events as u64)).context("encode event count")?;
        raw.extend_from_slice(&body);
        Ok(Some(RawEvents {
            last_seq,
            n_events,
            raw,
        }))
    }

    /// Gives disk space back. SQLite keeps the pages of deleted rows for reuse, so without this a
    /// buffer that once held a large backlog would stay that large on disk; `auto_vacuum =
    /// INCREMENTAL` lets us return them a chunk at a time, without rewriting the file.
    fn shrink(&mut self) {
        let free_pages: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |row| row.get(0))
            .unwrap_or(0);
        if free_pages < SHRINK_MIN_FREE_PAGES {
            return;
        }
        // The pragma frees one page per step: step it to the end.
        let result = (|| -> rusqlite::Result<()> {
            let mut vacuum = self.conn.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = vacuum.query([])?;
            while rows.next()?.is_some() {}
            drop(rows);
            drop(vacuum);
            self.conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        })();
        if let Err(error) = result {
            tracing::debug!(path = %self.path.display(), %error, "buffer shrink failed");
        }
    }

    fn delete_range(&mut self, after_seq: u64, last_seq: u64) -> anyhow::Result<u64> {
        let tx = self.conn.transaction()?;
        let (n_events, n_bytes) = delete_rows(&tx, after_seq, last_seq)?;
        if last_seq > self.shipped_seq {
            save_shipped_seq(&tx, last_seq)?;
        }
        tx.commit()?;
        self.shipped_seq = self.shipped_seq.max(last_seq);
        self.contents.n_events -= n_events;
        self.contents.n_bytes -= n_bytes;
        Ok(n_events)
    }

    fn reconcile(&mut self, high_water_mark: u64) -> anyhow::Result<Reconciled> {
        // A new connection: nothing above the mark is in flight any more.
        self.read_mark = high_water_mark;
        let mut renumbered_by = 0;
        if high_water_mark > self.contents.last_seq {
            // The aggregator has stored sequence numbers this buffer never assigned: the buffer
            // was reset (deleted, restored from an old backup) while the agent kept its
            // certificate. Move everything pending above the mark so it is not mistaken for a
            // replay, and continue numbering from there.
            renumbered_by = high_water_mark;
            let tx = self.conn.transaction()?;
            tx.execute("UPDATE events SET seq = seq + ?1", params![renumbered_by])?;
            let new_last = self.contents.last_seq + renumbered_by;
            tx.execute(
                "INSERT OR REPLACE INTO sqlite_sequence (name, seq) VALUES ('events', ?1)",
                params![new_last],
            )?;
            // The aggregator stored everything up to its mark.
            save_shipped_seq(&tx, high_water_mark)?;
            tx.commit()?;
            self.shipped_seq = self.shipped_seq.max(high_water_mark);
            tracing::warn!(
                high_water_mark,
                last_assigned_seq = self.contents.last_seq,
                renumbered_by,
                "aggregator knows sequence numbers this buffer never assigned (buffer reset?); renumbered pending events"
            );
            self.contents.last_seq = new_last;
            return Ok(Reconciled {
                n_deleted: 0,
                renumbered_by,
            });
        }
        let n_deleted = self.delete_range(0, high_water_mark)?;
        Ok(Reconciled {
            n_deleted,
            renumbered_by,
        })
    }
}

/// Records the shipped mark ([`Buffer::shipped_seq`]) in the transaction of the deletes it covers.
fn save_shipped_seq(tx: &rusqlite::Transaction<'_>, seq: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO shipped_mark (id, seq) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)",
    )?
    .execute(params![seq])?;
    Ok(())
}

/// Deletes events in `(after_seq, last_seq]`; returns how many and their bytes.
fn delete_rows(
    tx: &rusqlite::Transaction<'_>,
    after_seq: u64,
    last_seq: u64,
) -> rusqlite::Result<(u64, u64)> {
    let counted = tx.prepare_cached(
        "SELECT count(*), coalesce(sum(length(data)), 0) FROM events WHERE seq > ?1 AND seq <= ?2",
    )?
    .query_row(params![after_seq, last_seq], |row| Ok((row.get(0)?, row.get(1)?)))?;
    tx.prepare_cached("DELETE FROM events WHERE seq > ?1 AND seq <= ?2")?
        .execute(params![after_seq, last_seq])?;
    Ok(counted)
}

fn stream_priority(priorities: &std::collections::BTreeMap<String, u8>, stream: &str) -> i64 {
    if stream == AGENT_DROPS {
        return DROP_REPORT_PRIORITY;
    }
    i64::from(
        priorities
            .get(stream)
            .copied()
            .unwrap_or(runnel_config::DEFAULT_STREAM_PRIORITY),
    )
}

/// Inserts events; returns the first and last sequence number assigned.
fn insert_events(
    tx: &rusqlite::Transaction<'_>,
    contents: &mut Contents,
    priorities: &std::collections::BTreeMap<String, u8>,
    events: &[EncodedEvent],
) -> rusqlite::Result<(u64, u64)> {
    let mut insert =
        tx.prepare_cached("INSERT INTO events (data, stream, priority) VALUES (?1, ?2, ?3)")?;
    let (mut first_seq, mut last_seq) = (0, 0);
    for event in events {
        insert.execute(params![
            event.bytes,
            event.stream,
            stream_priority(priorities, &event.stream)
        ])?;
        last_seq = u64::try_from(tx.last_insert_rowid()).unwrap_or(0);
        if first_seq == 0 {
            first_seq = last_seq;
        }
    }
    contents.last_seq = contents.last_seq.max(last_seq);
    Ok((first_seq, last_seq))
}

/// Most delivery marks kept. A subscriber needs at most 65536 (one per packet id), but listener
/// clients choose their own ids, so the oldest marks beyond this are forgotten. A mark matters
/// only until the peer has our PUBACK, which is seconds, not a million messages later.
const MAX_DELIVERY_MARKS: i64 = 1_000_000;

fn insert_marks(
    tx: &rusqlite::Transaction<'_>,
    marks: &[DeliveryMark],
    max_marks: i64,
) -> rusqlite::Result<()> {
    if marks.is_empty() {
        return Ok(());
    }
    // REPLACE deletes the old row and inserts a new one, so rowid order is recency order.
    let mut mark = tx.prepare_cached(
        "INSERT OR REPLACE INTO delivery_marks (source, delivery_id, digest) VALUES (?1, ?2, ?3)",
    )?;
    for m in marks {
        mark.execute(params![m.source, m.delivery_id, &m.digest[..]])?;
    }
    tx.prepare_cached(
        "DELETE FROM delivery_marks WHERE rowid <= (SELECT max(rowid) FROM delivery_marks) - ?1",
    )?
    .execute(params![max_marks])?;
    Ok(())
}

/// Evicts up to `needed` bytes of events above `read_mark` with priority at most `ceiling`,
/// lowest priority and oldest first. Returns the bytes freed; counts evictions in `drops`.
fn evict(
    tx: &rusqlite::Transaction<'_>,
    contents: &mut Contents,
    read_mark: u64,
    needed: u64,
    ceiling: i64,
    drops: &mut std::collections::BTreeMap<(String, DropReason), u64>,
) -> rusqlite::Result<u64> {
    /// Rows looked at per query while evicting.
    const EVICT_CHUNK: u64 = 256;
    let mut freed = 0u64;
    let mut select = tx.prepare_cached(
        "SELECT seq, length(data), stream FROM events WHERE seq > ?1 AND priority <= ?2
         ORDER BY priority, seq LIMIT ?3",
    )?;
    let mut delete = tx.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
    while freed < needed {
        let victims: Vec<(u64, u64, String)> = select
            .query_map(params![read_mark, ceiling, EVICT_CHUNK], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        if victims.is_empty() {
            break;
        }
        for (seq, n_bytes, stream) in victims {
            if freed >= needed {
                break;
            }
            delete.execute(params![seq])?;
            freed += n_bytes;
            contents.n_events -= 1;
            contents.n_bytes -= n_bytes;
            *drops
                .entry((stream, DropReason::BufferFullEvicted))
                .or_default() += 1;
        }
    }
    Ok(freed)
}

/// One drop-report event per (stream, reason).
/// The report event of `n` events of `stream` dropped for `reason`.
fn drop_report(stream: &str, reason: DropReason, n: u64) -> EncodedEvent {
    let mut attrs = std::collections::BTreeMap::new();
    attrs.insert(
        "stream".to_owned(),
        runnel_common::Value::String(stream.to_owned()),
    );
    attrs.insert(
        "reason".to_owned(),
        runnel_common::Value::String(reason.as_str().to_owned()),
    );
    attrs.insert(
        "n_events".to_owned(),
        runnel_common::Value::Int(i64::try_from(n).unwrap_or(i64::MAX)),
    );
    let event = Event {
        attrs,
        ..Event::new(
            runnel_common::SourceKind::Internal,
            AGENT_DROPS,
            "events_dropped",
            crate::now_unix_ms(),
        )
    };
    EncodedEvent::encode(&event).expect("a drop report is small and always encodes")
}

fn open_connection(path: &Path, synchronous: &str) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("open buffer {}", path.display()))?;
    let journal_mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .with_context(|| format!("set WAL mode on {}", path.display()))?;
    anyhow::ensure!(
        journal_mode.eq_ignore_ascii_case("wal"),
        "buffer {}: SQLite refused WAL mode (got {journal_mode}); is it on a network filesystem?",
        path.display()
    );
    // Free pages go back to the file system (see `Writer::shrink`). A buffer made before this
    // is converted once, by a VACUUM.
    let auto_vacuum: i64 = conn.query_row("PRAGMA auto_vacuum", [], |row| row.get(0))?;
    if auto_vacuum != 2 {
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
            .with_context(|| format!("enable incremental vacuum on {}", path.display()))?;
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {synchronous};
         PRAGMA busy_timeout = 5000;
         PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES};
         CREATE TABLE IF NOT EXISTS events (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             data BLOB NOT NULL,
             -- For drop policies: the event's stream and that stream's priority.
             stream TEXT NOT NULL DEFAULT '',
             priority INTEGER NOT NULL DEFAULT 100
         );
         -- The last committed message per source and delivery id (an MQTT packet id is reused
         -- only after it was acknowledged); at most MAX_DELIVERY_MARKS rows, oldest dropped.
         CREATE TABLE IF NOT EXISTS delivery_marks (
             source TEXT NOT NULL,
             delivery_id INTEGER NOT NULL,
             digest BLOB NOT NULL,
             UNIQUE (source, delivery_id)
         );
         -- One row: the highest sequence number acknowledged by an aggregator (Buffer::shipped_seq).
         CREATE TABLE IF NOT EXISTS shipped_mark (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             seq INTEGER NOT NULL
         );"
    ))
    .with_context(|| format!("initialise buffer {}", path.display()))?;
    // Buffers made before drop policies existed lack the two columns.
    let has_stream: bool = conn
        .query_row(
            "SELECT count(*) FROM pragma_table_info('events') WHERE name = 'stream'",
            [],
            |row| row.get::<_, u64>(0),
        )
        .map(|n| n > 0)?;
    if !has_stream {
        conn.execute_batch(
            "ALTER TABLE events ADD COLUMN stream TEXT NOT NULL DEFAULT '';
             ALTER TABLE events ADD COLUMN priority INTEGER NOT NULL DEFAULT 100;",
        )
        .with_context(|| format!("upgrade buffer {}", path.display()))?;
    }
    Ok(conn)
}

fn last_assigned_seq(conn: &Connection) -> anyhow::Result<u64> {
    let seq: Option<u64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    Ok(seq.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_common::{SourceKind, Value};
    use runnel_config::Synchronous;

    fn config(dir: &Path, max_bytes: u64) -> BufferConfig {
        BufferConfig {
            path: dir.join("buffer.sqlite"),
            max_bytes,
            synchronous: Synchronous::Normal,
            when_full: WhenFull::Block,
            block_timeout_ms: 0,
            stream_priorities: Default::default(),
        }
    }

    fn event(n: i64) -> EncodedEvent {
        let mut event = Event {
            seq: 0,
            event_time_ms: n,
            receive_time_ms: n,
            source: SourceKind::Http,
            stream: "s".into(),
            name: format!("e{n}"),
            event_id: None,
            user_id: None,
            session_id: None,
            score: None,
            tags: vec![],
            attrs: Default::default(),
        };
        event.attrs.insert("n".into(), Value::Int(n));
        EncodedEvent::encode(&event).unwrap()
    }

    #[tokio::test]
    async fn append_read_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, thread) = Buffer::open(&config(dir.path(), 1 << 20)).unwrap();
        let a = buffer.append(vec![event(1), event(2)]).await.unwrap();
        let b = buffer.append(vec![event(3)]).await.unwrap();
        assert_eq!(
            (a.first_seq, a.last_seq, b.first_seq, b.last_seq),
            (1, 2, 3, 3)
        );
        let read = buffer.read_after(1, 10, 1 << 20).await.unwrap();
        assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(read[1].name, "e3");
        assert_eq!(buffer.delete_range(0, 3).await.unwrap(), 3);
        drop(buffer);
        thread.join();

        // Sequence numbers never repeat, even after the table was emptied.
        let (buffer, thread) = Buffer::open(&config(dir.path(), 1 << 20)).unwrap();
        assert_eq!(
            *buffer.contents().borrow(),
            Contents {
                last_seq: 3,
                n_events: 0,
                n_bytes: 0
            }
        );
        assert_eq!(buffer.append(vec![event(4)]).await.unwrap().first_seq, 4);
        drop(buffer);
        thread.join();
    }

    #[tokio::test]
    async fn oldest_is_the_first_event_not_yet_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, thread) = Buffer::open(&config(dir.path(), 1 << 20)).unwrap();
        assert_eq!(buffer.oldest().await.unwrap(), None);
        buffer.append(vec![event(10), event(20)]).await.unwrap();
        let oldest = buffer.oldest().await.unwrap();
        assert_eq!(
            oldest,
            Some(Oldest {
                seq: 1,
                receive_time_ms: 10
            })
        );
        assert_eq!(buffer.delete_range(0, 1).await.unwrap(), 1);
        assert_eq!(buffer.oldest().await.unwrap().map(|o| o.seq), Some(2));
        drop(buffer);
        thread.join();
    }

    /// The shipped mark follows acks (out of order too) and reconciles, never goes down, and
    /// survives a restart: a restarted agent must not start a chain below events another
    /// aggregator acknowledged.
    #[tokio::test]
    async fn the_shipped_mark_follows_acks_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, thread) = Buffer::open(&config(dir.path(), 1 << 20)).unwrap();
        assert_eq!(buffer.shipped_seq().await.unwrap(), 0);
        buffer.append((1..=6).map(event).collect()).await.unwrap();
        // The ack of the second batch arrives first: (0, 2] is still held.
        buffer.delete_range(2, 4).await.unwrap();
        assert_eq!(buffer.shipped_seq().await.unwrap(), 4);
        buffer.delete_range(0, 2).await.unwrap();
        assert_eq!(buffer.shipped_seq().await.unwrap(), 4, "never goes down");
        buffer.reconcile(5).await.unwrap();
        assert_eq!(buffer.shipped_seq().await.unwrap(), 5);
        drop(buffer);
        thread.join();
        let (buffer, _thread) = Buffer::open(&config(dir.path(), 1 << 20)).unwrap();
        assert_eq!(
            buffer.shipped_seq().await.unwrap(),
            5,
            "kept across a restart"
        );
        assert_eq!(buffer.contents().borrow().n_events, 1);
    }

    #[tokio::test]
    async fn full_buffer_refuses_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let one = event(1).bytes.len() as u64;
        let (buffer, _thread) = Buffer::open(&config(dir.path(), one * 2)).unwrap();
        buffer.append(vec![event(1), event(2)]).await.unwrap();
        assert!(matches!(
            buffer.append(vec![event(3)]).await,
            Err(AppendError::Full { .. })
        ));
        buffer.delete_range(0, 1).await.unwrap();
        assert_eq!(buffer.append(vec![event(3)]).await.unwrap().first_seq, 3);
        assert_eq!(buffer.stats().n_refused_full.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn reconcile_deletes_stored_and_renumbers_after_reset() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _thread) = Buffer::open(&config(dir.path(), 1 << 20)).unwrap();
        buffer
            .append(vec![event(1), event(2), event(3)])
            .await
            .unwrap();
        let r = buffer.reconcile(2).await.unwrap();
        assert_eq!(
            r,
            Reconciled {
                n_deleted: 2,
                renumbered_by: 0
            }
        );
        // The aggregator knows seq 100 although this buffer only ever assigned 3.
        let r = buffer.reconcile(100).await.unwrap();
        assert_eq!(r.renumbered_by, 100);
        let read = buffer.read_after(100, 10, 1 << 20).await.unwrap();
        assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![103]);
        assert_eq!(buffer.append(vec![event(4)]).await.unwrap().first_seq, 104);
    }

    #[tokio::test]
    async fn read_respects_byte_limit_but_returns_one() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _thread) = Buffer::open(&config(dir.path(), 1 << 20)).unwrap();
        buffer.append((0..10).map(event).collect()).await.unwrap();
        assert_eq!(buffer.read_after(0, 100, 1).await.unwrap().len(), 1);
        let one = event(1).bytes.len();
        assert_eq!(buffer.read_after(0, 100, one * 3).await.unwrap().len(), 3);
        assert_eq!(buffer.read_after(0, 4, 1 << 20).await.unwrap().len(), 4);
    }

    fn on_stream(stream: &str) -> EncodedEvent {
        let mut event = postcard::from_bytes::<Event>(&event(1).bytes).unwrap();
        event.stream = stream.into();
        EncodedEvent::encode(&event).unwrap()
    }

    /// Drop reports in the buffer, as (stream, reason, n_events).
    async fn drop_reports_in(buffer: &Buffer) -> Vec<(String, String, i64)> {
        let events = buffer.read_after(0, 1000, 1 << 30).await.unwrap();
        let mut reports: Vec<(String, String, i64)> = events
            .iter()
            .filter(|e| e.stream == AGENT_DROPS)
            .map(|e| {
                let text = |k: &str| match &e.attrs[k] {
                    Value::String(s) => s.clone(),
                    other => panic!("{k}: {other:?}"),
                };
                let Value::Int(n) = e.attrs["n_events"] else {
                    panic!("n_events")
                };
                (text("stream"), text("reason"), n)
            })
            .collect();
        reports.sort();
        reports
    }

    #[tokio::test]
    async fn drop_newest_accepts_discards_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let one = on_stream("web").bytes.len() as u64;
        let config = BufferConfig {
            when_full: WhenFull::DropNewest,
            ..config(dir.path(), one * 2)
        };
        let (buffer, _thread) = Buffer::open(&config).unwrap();
        buffer
            .append(vec![on_stream("web"), on_stream("web")])
            .await
            .unwrap();
        let dropped = buffer
            .append(vec![on_stream("web"), on_stream("iot")])
            .await
            .unwrap();
        assert_eq!(
            (dropped.first_seq, dropped.last_seq, dropped.n_dropped),
            (0, 0, 2)
        );
        assert_eq!(
            drop_reports_in(&buffer).await,
            vec![
                ("iot".into(), "buffer_full_drop_newest".into(), 1),
                ("web".into(), "buffer_full_drop_newest".into(), 1),
            ]
        );
        assert_eq!(buffer.stats().n_dropped.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_drained_backlog_gives_its_disk_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), 1 << 30);
        let (buffer, _thread) = Buffer::open(&config).unwrap();
        let padded = |n: i64| {
            let mut event: Event = postcard::from_bytes(&event(n).bytes).unwrap();
            event
                .attrs
                .insert("pad".into(), Value::String("x".repeat(1000)));
            EncodedEvent::encode(&event).unwrap()
        };
        let mut last = 0;
        for chunk in 0..20 {
            let events = (0..200).map(|i| padded(chunk * 200 + i)).collect();
            last = buffer.append(events).await.unwrap().last_seq;
        }
        let file_bytes = |path: &Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let wal = dir.path().join("buffer.sqlite-wal");
        let full = file_bytes(&config.path) + file_bytes(&wal);
        assert!(full > 4_000_000, "4,000 events of 1 KB: {full} bytes");
        // The last append's reply, not `contents()`: the writer publishes its contents after replying.
        buffer.delete_range(0, last).await.unwrap();
        // The writer shrinks the file right after the commit that emptied it, after replying and
        // before it takes the next request: once any later request is answered, it is done.
        assert_eq!(buffer.oldest().await.unwrap(), None);
        let empty = file_bytes(&config.path);
        assert!(
            empty < 1_000_000,
            "after the backlog is shipped the file shrinks: {empty} bytes (was {full} with its WAL)"
        );
        assert!(
            file_bytes(&wal) <= JOURNAL_SIZE_LIMIT_BYTES + 1_000_000,
            "WAL: {} bytes",
            file_bytes(&wal)
        );
    }

    #[tokio::test]
    async fn drop_reports_add_up_in_one_row_until_the_uplink_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let one = on_stream("web").bytes.len() as u64;
        let config = BufferConfig {
            when_full: WhenFull::DropNewest,
            ..config(dir.path(), one * 2)
        };
        let (buffer, _thread) = Buffer::open(&config).unwrap();
        buffer
            .append(vec![on_stream("web"), on_stream("web")])
            .await
            .unwrap();
        // Five commits that each drop: one report row, counting five.
        for _ in 0..5 {
            let appended = buffer.append(vec![on_stream("web")]).await.unwrap();
            assert_eq!(appended.n_dropped, 1);
        }
        let contents = *buffer.contents().borrow();
        assert_eq!(contents.n_events, 3, "two events and one report");
        // The uplink reads everything: the next drop starts a new row.
        let read = buffer.read_raw(0, 1000, 1 << 30).await.unwrap();
        assert_eq!(read.expect("rows to read").n_events, 3);
        buffer.append(vec![on_stream("web")]).await.unwrap();
        assert_eq!(
            drop_reports_in(&buffer).await,
            vec![
                ("web".into(), "buffer_full_drop_newest".into(), 1),
                ("web".into(), "buffer_full_drop_newest".into(), 5),
            ]
        );
        assert_eq!(buffer.stats().n_dropped.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn drop_oldest_evicts_lowest_priority_first_and_never_upwards() {
        let dir = tempfile::tempdir().unwrap();
        let size = |s: &str| on_stream(s).bytes.len() as u64;
        let config = BufferConfig {
            when_full: WhenFull::DropOldest,
            stream_priorities: [("pings".to_string(), 10), ("orders".to_string(), 200)].into(),
            ..config(dir.path(), size("pings") + size("orders") + size("web"))
        };
        let (buffer, _thread) = Buffer::open(&config).unwrap();
        buffer
            .append(vec![
                on_stream("orders"),
                on_stream("pings"),
                on_stream("web"),
            ])
            .await
            .unwrap();
        // A "web" (priority 100) event evicts the ping (10), not the older order (200).
        let stored = buffer.append(vec![on_stream("web")]).await.unwrap();
        assert_eq!(stored.n_dropped, 0);
        let streams = |events: Vec<Event>| events.into_iter().map(|e| e.stream).collect::<Vec<_>>();
        let left = streams(buffer.read_after(0, 100, 1 << 30).await.unwrap());
        assert_eq!(&left[..3], ["orders", "web", "web"]);
        // A ping cannot evict anything of a higher priority: it is dropped itself.
        let dropped = buffer.append(vec![on_stream("pings")]).await.unwrap();
        assert_eq!(dropped.n_dropped, 1);
        let reports = drop_reports_in(&buffer).await;
        assert!(
            reports.contains(&("pings".into(), "buffer_full_evicted".into(), 1)),
            "{reports:?}"
        );
        assert!(
            reports.contains(&("pings".into(), "buffer_full_no_room".into(), 1)),
            "{reports:?}"
        );
    }

    #[tokio::test]
    async fn drop_oldest_never_evicts_what_the_uplink_has_read() {
        let dir = tempfile::tempdir().unwrap();
        let one = on_stream("web").bytes.len() as u64;
        let config = BufferConfig {
            when_full: WhenFull::DropOldest,
            ..config(dir.path(), one * 2)
        };
        let (buffer, _thread) = Buffer::open(&config).unwrap();
        buffer
            .append(vec![on_stream("web"), on_stream("web")])
            .await
            .unwrap();
        // The uplink read both: they may be in flight.
        assert_eq!(buffer.read_after(0, 10, 1 << 20).await.unwrap().len(), 2);
        let outcome = buffer.append(vec![on_stream("web")]).await.unwrap();
        assert_eq!(
            outcome.n_dropped, 1,
            "nothing evictable: the new event is dropped"
        );
        assert!(
            !drop_reports_in(&buffer)
                .await
                .iter()
                .any(|r| r.1 == "buffer_full_evicted")
        );
        // After a reconnect at mark 1, event 2 is no longer in flight and may be evicted.
        buffer.reconcile(1).await.unwrap();
        buffer.append(vec![on_stream("web")]).await.unwrap();
        let reports = drop_reports_in(&buffer).await;
        assert!(
            reports.contains(&("web".into(), "buffer_full_evicted".into(), 1)),
            "{reports:?}"
        );
    }

    #[tokio::test]
    async fn block_returns_the_events_for_a_retry() {
        let dir = tempfile::tempdir().unwrap();
        let one = event(1).bytes.len() as u64;
        let (buffer, _thread) = Buffer::open(&config(dir.path(), one)).unwrap();
        buffer.append(vec![event(1)]).await.unwrap();
        let Err(AppendError::Full { events, .. }) = buffer.append(vec![event(2), event(3)]).await
        else {
            panic!("expected Full");
        };
        assert_eq!(events.len(), 2);
        assert!(
            drop_reports_in(&buffer).await.is_empty(),
            "block drops nothing"
        );
    }

    #[test]
    fn delivery_marks_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_connection(&dir.path().join("b.sqlite"), "OFF").unwrap();
        let mark = |id: u32| DeliveryMark {
            source: "s".into(),
            delivery_id: id,
            digest: [id as u8; 16],
        };
        let tx = conn.transaction().unwrap();
        insert_marks(&tx, &[mark(1), mark(2), mark(3), mark(4)], 3).unwrap();
        // Replacing mark 2 makes it the newest.
        insert_marks(&tx, &[mark(2)], 3).unwrap();
        insert_marks(&tx, &[mark(5)], 3).unwrap();
        let ids: Vec<u32> = tx
            .prepare("SELECT delivery_id FROM delivery_marks ORDER BY rowid")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(ids, vec![4, 2, 5]);
    }

    #[tokio::test]
    async fn raw_reads_are_the_postcard_encoding_of_the_events() {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, _thread) = Buffer::open(&config(dir.path(), 1 << 30)).unwrap();
        // Sequence numbers of 1 and of several varint bytes, with a gap.
        buffer.append((0..300).map(event).collect()).await.unwrap();
        buffer.delete_range(10, 20).await.unwrap();
        let events = buffer.read_after(5, 250, 1 << 20).await.unwrap();
        let raw = buffer.read_raw(5, 250, 1 << 20).await.unwrap().unwrap();
        assert_eq!(raw.raw, postcard::to_stdvec(&events).unwrap());
        assert_eq!(
            (raw.n_events, raw.last_seq),
            (events.len(), events.last().unwrap().seq)
        );
        let batch =
            runnel_common::batch::compress(5, raw.last_seq, raw.n_events, &raw.raw).unwrap();
        assert_eq!(runnel_common::batch::decode(&batch).unwrap(), events);
        // Byte limit, at least one event, nothing after the end.
        assert_eq!(
            buffer.read_raw(5, 250, 1).await.unwrap().unwrap().n_events,
            1
        );
        assert!(buffer.read_raw(300, 10, 1 << 20).await.unwrap().is_none());
    }
}
