//! The event store on a Delta table, in process: flushes, a crash between the Delta commit and
//! the WAL delete, and the conversion of the previous layout (also interrupted), each counted
//! through Runnel's SQL and through the table's own transaction identifiers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array};
use runnel_aggregator::query::QueryEngine;
use runnel_aggregator::store::{self, EventStore, Files, table};
use runnel_aggregator::wal::{CommitRequest, CommittedBatches, Wal, WalThread};
use runnel_common::{Event, SourceKind, Value};

const HOUR_MS: i64 = 3_600_000;
const T0: i64 = 1_769_860_800_000; // 2026-01-31T12:00:00Z

fn event(seq: u64, event_time_ms: i64) -> Event {
    Event {
        seq,
        event_time_ms,
        receive_time_ms: event_time_ms,
        source: SourceKind::Http,
        stream: "web".into(),
        name: "page_view".into(),
        event_id: Some(format!("e-{seq}")),
        user_id: None,
        session_id: None,
        score: None,
        tags: vec!["t".into()],
        attrs: BTreeMap::from([("url".to_owned(), Value::String(format!("/p/{seq}")))]),
    }
}

fn storage(dir: &Path) -> runnel_config::StorageConfig {
    let text = format!(
        "[ingest]\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"\n[storage]\nevents_dir = \"{}\"\nwal_path = \"{}\"\n",
        dir.join("events").display(),
        dir.join("wal.sqlite").display()
    );
    runnel_config::parse_aggregator(&text, &dir.join("aggregator.toml"))
        .expect("a valid config")
        .storage
}

struct Node {
    store: Arc<EventStore>,
    wal: Wal,
    thread: WalThread,
    files: Files,
    engine: QueryEngine,
}

/// Opens store, table and WAL the way the aggregator starts, up to and including reconcile.
async fn open(dir: &Path) -> Node {
    let config = storage(dir);
    let files = store::open_files(&config).expect("events root");
    let store = Arc::new(EventStore::new(1_000_000));
    store.open_table(&files).await.expect("open the table");
    let (wal, thread, _) = Wal::open(
        &config.wal_path,
        "full",
        Arc::clone(&store) as Arc<dyn CommittedBatches>,
    )
    .expect("open the WAL");
    let query = runnel_config::parse_aggregator(
        "[ingest]\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"",
        &dir.join("aggregator.toml"),
    )
    .expect("config")
    .query;
    let engine = QueryEngine::new(&query, Arc::clone(&store), &files).expect("engine");
    Node {
        store,
        wal,
        thread,
        files,
        engine,
    }
}

impl Node {
    async fn close(self) {
        drop(self.engine);
        drop(self.wal);
        drop(self.store);
        tokio::task::spawn_blocking(move || self.thread.join())
            .await
            .expect("join");
    }

    async fn commit(&self, agent: &str, after_seq: u64, events: Vec<Event>) {
        let last_seq = events.last().expect("events").seq;
        let batch = runnel_common::batch::encode(after_seq, &events).expect("encode");
        self.wal
            .commit(CommitRequest {
                agent_id: Arc::from(agent),
                after_seq,
                last_seq,
                events,
                batch,
            })
            .await
            .expect("commit to the WAL");
    }

    /// (rows, distinct (agent, seq)) through Runnel's SQL.
    async fn counts(&self) -> (i64, i64) {
        let result = self
            .engine
            .run(
                "SELECT count(*), count(DISTINCT agent_id || ':' || CAST(seq AS VARCHAR)) FROM events",
            )
            .await
            .expect("query");
        let batch = &result.batches[0];
        let get = |idx: usize| {
            batch
                .column(idx)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("a count")
                .value(0)
        };
        (get(0), get(1))
    }
}

/// The table's mark of `agent`, read from a fresh open of the table (what another reader sees).
async fn mark(files: &Files, agent: &str) -> Option<u64> {
    let table = table::open(Arc::clone(&files.root_store), &files.table_url)
        .await
        .expect("open");
    table::committed_seq(&table, agent)
        .await
        .expect("read mark")
}

fn events(range: std::ops::RangeInclusive<u64>, hour: i64) -> Vec<Event> {
    range
        .map(|seq| event(seq, T0 + hour * HOUR_MS + seq as i64))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_commit_rows_and_marks_and_a_replay_after_the_commit_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.store.reconcile(&node.wal).await.unwrap();
    node.commit("edge-a", 0, events(1..=10, 0)).await;
    node.commit("edge-b", 0, events(1..=5, 1)).await;
    assert_eq!(node.counts().await, (15, 15), "queryable from memory");
    let flushed = node.store.flush(&node.wal).await.unwrap();
    assert_eq!((flushed.n_rows, flushed.n_batches), (15, 2));
    assert_eq!(node.counts().await, (15, 15), "queryable from the table");
    assert_eq!(node.store.summary().n_recent_rows, 0);
    assert_eq!(mark(&node.files, "edge-a").await, Some(10));
    assert_eq!(mark(&node.files, "edge-b").await, Some(5));

    // A crash after the Delta commit and before the WAL delete: commit to the WAL, then append
    // the same rows to the table directly (as the flush would), and "crash" (drop everything).
    node.commit("edge-a", 10, events(11..=20, 0)).await;
    let files = store::open_files(&storage(dir.path())).unwrap();
    let delta = table::open(Arc::clone(&files.root_store), &files.table_url)
        .await
        .unwrap();
    let rows = runnel_aggregator::schema::to_record_batches("edge-a", T0, &events(11..=20, 0));
    let batches = rows
        .iter()
        .map(|(hour, batch)| table::to_table_batch(batch, *hour).unwrap())
        .collect();
    table::append(
        delta,
        batches,
        &BTreeMap::from([(Arc::<str>::from("edge-a"), 20u64)]),
        Vec::new(),
    )
    .await
    .unwrap();
    node.close().await;

    let node = open(dir.path()).await;
    assert_eq!(node.store.summary().n_recent_rows, 10, "the WAL replayed");
    let reconciled = node.store.reconcile(&node.wal).await.unwrap();
    assert_eq!((reconciled.n_batches, reconciled.n_rows), (1, 10));
    assert_eq!(node.counts().await, (25, 25), "nothing doubled");
    let flushed = node.store.flush(&node.wal).await.unwrap();
    assert_eq!(flushed.n_rows, 0, "nothing left to write");
    node.close().await;

    // And the WAL is empty now: a third start replays nothing.
    let node = open(dir.path()).await;
    assert_eq!(node.store.summary().n_recent_rows, 0);
    node.store.reconcile(&node.wal).await.unwrap();
    assert_eq!(node.counts().await, (25, 25));
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_retention_are_commits_that_keep_counts_exact() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.store.reconcile(&node.wal).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis() / HOUR_MS * HOUR_MS;
    let mut seq = 0;
    // Four flushes into one recent partition: four small files.
    for _ in 0..4 {
        let batch: Vec<Event> = (seq + 1..=seq + 5)
            .map(|s| event(s, now - 2 * HOUR_MS + s as i64))
            .collect();
        node.commit("edge-a", seq, batch).await;
        seq += 5;
        node.store.flush(&node.wal).await.unwrap();
    }
    // One flush three days back.
    let old: Vec<Event> = (seq + 1..=seq + 5)
        .map(|s| event(s, now - 72 * HOUR_MS + s as i64))
        .collect();
    node.commit("edge-a", seq, old).await;
    node.store.flush(&node.wal).await.unwrap();
    assert_eq!(node.store.summary().n_files, 5);
    assert_eq!(node.counts().await, (25, 25));

    let compacted = node.store.compact(3).await.unwrap();
    assert_eq!((compacted.n_files_removed, compacted.n_files_added), (4, 1));
    assert_eq!(node.store.summary().n_files, 2);
    assert_eq!(
        node.counts().await,
        (25, 25),
        "compaction loses and repeats nothing"
    );

    let expired = node.store.expire(now - 24 * HOUR_MS).await.unwrap();
    assert_eq!((expired.n_files_removed, expired.n_rows), (1, 5));
    assert_eq!(node.store.summary().n_files, 1);
    assert_eq!(
        node.counts().await,
        (20, 20),
        "retention removed the old partition only"
    );
    // Replaced and expired files stay until the grace period is over.
    let on_disk = || {
        walk(&dir.path().join("events"))
            .into_iter()
            .filter(|p| p.ends_with(".parquet") && !p.contains("_delta_log"))
            .count()
    };
    assert_eq!(on_disk(), 6);
    // A data file an interrupted flush wrote but never committed: no version references it.
    let orphan = dir
        .path()
        .join("events/date=2026-01-31/hour=12/part-00000-orphan.parquet");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"PAR1 not a real file PAR1").unwrap();
    assert_eq!(on_disk(), 7);
    assert_eq!(
        node.store
            .vacuum(std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        0,
        "nothing is deleted within the grace period"
    );
    assert_eq!(
        node.store.vacuum(std::time::Duration::ZERO).await.unwrap(),
        6
    );
    assert_eq!(on_disk(), 1);
    assert!(!orphan.exists());
    assert_eq!(node.counts().await, (20, 20));
    node.close().await;
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

/// Writes the previous layout: `n_files` Hive-partitioned Parquet files of 3 events each
/// (agents alternating) listed in `parquet_files`, as the release before the Delta table did.
fn write_previous_layout(dir: &Path, n_files: u64) -> (u64, BTreeMap<String, u64>) {
    let events_dir = dir.join("events");
    let conn =
        rusqlite::Connection::open(dir.join("wal.sqlite")).expect("write the previous layout");
    conn.execute_batch(
        "CREATE TABLE parquet_files (path TEXT PRIMARY KEY, hour_ms INTEGER NOT NULL,
         n_rows INTEGER NOT NULL, n_bytes INTEGER NOT NULL, created_ms INTEGER NOT NULL);",
    )
    .expect("write the previous layout");
    let mut marks = BTreeMap::new();
    let mut n_rows = 0;
    for idx in 0..n_files {
        let agent = if idx % 2 == 0 { "edge-a" } else { "edge-b" };
        let first = idx / 2 * 3 + 1;
        let hour = T0 + (idx as i64 % 3) * HOUR_MS;
        let events: Vec<Event> = (first..first + 3)
            .map(|s| event(s, hour + s as i64))
            .collect();
        marks.insert(agent.to_owned(), first + 2);
        let (_, batch) = runnel_aggregator::schema::to_record_batches(agent, T0, &events)
            .pop()
            .expect("write the previous layout");
        let hour_dt =
            chrono::DateTime::from_timestamp_millis(hour).expect("write the previous layout");
        let path = format!(
            "date={}/hour={}/part-{:012}-{:012}.parquet",
            hour_dt.format("%Y-%m-%d"),
            hour_dt.format("%H"),
            idx + 1,
            idx + 1
        );
        let full = events_dir.join(&path);
        std::fs::create_dir_all(full.parent().expect("write the previous layout"))
            .expect("write the previous layout");
        let file = std::fs::File::create(&full).expect("write the previous layout");
        let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(
            file,
            runnel_aggregator::schema::EVENTS_SCHEMA.clone(),
            None,
        )
        .expect("write the previous layout");
        writer.write(&batch).expect("write the previous layout");
        writer.close().expect("write the previous layout");
        let n_bytes = std::fs::metadata(&full)
            .expect("write the previous layout")
            .len();
        conn.execute(
            "INSERT INTO parquet_files VALUES (?1, ?2, ?3, ?4, 0)",
            rusqlite::params![path, hour, 3, n_bytes],
        )
        .expect("write the previous layout");
        n_rows += 3;
    }
    (n_rows, marks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_layout_converts_once_even_when_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let n_files = store::convert::FILES_PER_COMMIT as u64 * 2 + 3;
    let (n_rows, marks) = write_previous_layout(dir.path(), n_files);

    // Interrupted after the first commit.
    let node = open(dir.path()).await;
    let first = store::convert::previous_layout(&node.store, &node.wal, &node.files, Some(1))
        .await
        .unwrap()
        .expect("something to convert");
    assert!(!first.finished);
    assert_eq!(first.n_files_appended, store::convert::FILES_PER_COMMIT);
    assert_eq!(
        mark(&node.files, "edge-a").await,
        None,
        "marks come with the last commit"
    );
    node.close().await;

    // The next start resumes where it stopped.
    let node = open(dir.path()).await;
    let second = store::convert::previous_layout(&node.store, &node.wal, &node.files, None)
        .await
        .unwrap()
        .expect("the rest to convert");
    assert!(second.finished);
    assert_eq!(
        (first.n_files_appended + second.n_files_appended) as u64,
        n_files
    );
    node.store.reconcile(&node.wal).await.unwrap();
    assert_eq!(node.counts().await, (n_rows as i64, n_rows as i64));
    for (agent, seq) in &marks {
        assert_eq!(mark(&node.files, agent).await, Some(*seq), "{agent}");
    }
    let old_files: Vec<String> = walk(&dir.path().join("events"))
        .into_iter()
        // The previous layout's names: `part-<12 digits>-<12 digits>.parquet`.
        .filter(|p| {
            let name = p.rsplit('/').next().unwrap_or_default();
            name.len() == "part-000000000001-000000000001.parquet".len() && !name.contains("c000")
        })
        .collect();
    assert!(old_files.is_empty(), "{old_files:?}");
    node.close().await;

    // Done: a third start has nothing to convert and the same counts.
    let node = open(dir.path()).await;
    let third = store::convert::previous_layout(&node.store, &node.wal, &node.files, None)
        .await
        .unwrap();
    assert_eq!(third, None);
    node.store.reconcile(&node.wal).await.unwrap();
    assert_eq!(node.counts().await, (n_rows as i64, n_rows as i64));
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_skip_partitions_and_files_outside_the_filter() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    node.store.reconcile(&node.wal).await.unwrap();
    // Three flushes: two days apart, and two hours of one day.
    node.commit("edge-a", 0, events(1..=5, 0)).await;
    node.store.flush(&node.wal).await.unwrap();
    node.commit("edge-a", 5, events(6..=10, 1)).await;
    node.store.flush(&node.wal).await.unwrap();
    node.commit("edge-a", 10, events(11..=15, 48)).await;
    node.store.flush(&node.wal).await.unwrap();
    assert_eq!(node.store.summary().n_files, 3);
    let plan = |sql: String| {
        let engine = &node.engine;
        async move {
            let result = engine.run(&format!("EXPLAIN {sql}")).await.unwrap();
            let json = runnel_aggregator::query::to_json(&result);
            json["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|row| row[1].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
                .join("\n")
        }
    };
    let ts = |hour: i64| {
        chrono::DateTime::from_timestamp_millis(T0 + hour * HOUR_MS)
            .unwrap()
            .to_rfc3339()
    };
    // The first hour only: one file of three is read.
    let sql = format!(
        "SELECT count(*) FROM events WHERE event_time >= '{}' AND event_time < '{}'",
        ts(0),
        ts(1)
    );
    let explained = plan(sql.clone()).await;
    assert_eq!(explained.matches(".parquet").count(), 1, "{explained}");
    let result = node.engine.run(&sql).await.unwrap();
    assert_eq!(
        runnel_aggregator::query::to_json(&result)["rows"],
        serde_json::json!([[5]])
    );
    // Two days later: the partition of that date only.
    let sql = format!(
        "SELECT count(*) FROM events WHERE event_time >= '{}'",
        ts(24)
    );
    let explained = plan(sql.clone()).await;
    assert_eq!(explained.matches(".parquet").count(), 1, "{explained}");
    node.close().await;
}
