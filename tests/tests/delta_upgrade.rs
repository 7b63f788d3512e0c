//! Upgrade from the previous layout: a data directory written by the release before the Delta
//! table (hour-partitioned Parquet files listed in the WAL database's `parquet_files` table, and
//! acknowledged batches not yet flushed) becomes a Delta table on the first start of this
//! release, with no event lost or doubled; a conversion interrupted by SIGKILL after any of its
//! commits resumes and ends with the same exact counts; and an agent carries on numbering after
//! its high-water mark.
//!
//! The directory is `tests/fixtures/previous-layout/` (its README says how it was made, and from
//! which commit); the expected numbers below are that README's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use runnel_aggregator::store::convert::{CONVERSION_APP_ID, FILES_PER_COMMIT};
use runnel_aggregator::store::table::app_id;
use runnel_tests::{
    AgentOptions, AgentProcess, AggregatorOptions, AggregatorProcess, Certs, TestDir, Uplink,
    binaries, http_client, post_events, query_rows, tail, wait_count_of,
};
use serde_json::{Value, json};

// The fixture's numbers (tests/fixtures/previous-layout/README.md).
/// Events acknowledged in all.
const N_EVENTS: u64 = 318;
/// Each agent's highest sequence number (its mark in the WAL's `high_water`); each agent's
/// events are 1 to this, without a gap.
const MARKS: [(&str, u64); 2] = [("edge-1", 159), ("edge-2", 159)];
/// Files `parquet_files` lists, and the rows they hold.
const N_FILES: usize = 36;
const N_FILE_ROWS: u64 = 288;
/// Events in the WAL's `batches`, never flushed.
const N_WAL_EVENTS: u64 = 30;
/// Events per event-time hour (start of the hour, Unix ms): 2026-01-31 22:00 and 23:00,
/// 2026-02-01 00:00 UTC.
const PER_HOUR: [(i64, u64); 3] = [
    (1_769_896_800_000, 106),
    (1_769_900_400_000, 106),
    (1_769_904_000_000, 106),
];

const TIMEOUT: Duration = Duration::from_secs(120);

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/previous-layout")
}

/// The aggregator's data directory in a test directory (where [`AggregatorProcess::start`] puts
/// it).
fn data_dir(dir: &TestDir) -> PathBuf {
    dir.join("aggregator/data")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()))
    {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
    }
}

/// Copies the fixture's `wal.sqlite` and `events/` into the aggregator's data directory of `dir`,
/// checks they hold the README's numbers, and returns the paths `parquet_files` lists.
fn install_fixture(dir: &TestDir) -> Vec<String> {
    let data = data_dir(dir);
    std::fs::create_dir_all(&data).expect("create the data dir");
    std::fs::copy(fixture_dir().join("wal.sqlite"), data.join("wal.sqlite"))
        .expect("copy wal.sqlite");
    copy_dir(&fixture_dir().join("events"), &data.join("events"));

    // `immutable`: no lock, no -shm or -wal file, nothing written.
    let url = format!("file:{}?immutable=1", data.join("wal.sqlite").display());
    let db = rusqlite::Connection::open_with_flags(
        url,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
    )
    .expect("open the fixture's wal.sqlite");
    let listed: Vec<String> = db
        .prepare("SELECT path FROM parquet_files ORDER BY path")
        .and_then(|mut stmt| stmt.query_map([], |row| row.get(0))?.collect())
        .expect("read the fixture's parquet_files");
    let n_file_rows: u64 = db
        .query_row("SELECT sum(n_rows) FROM parquet_files", [], |row| {
            row.get(0)
        })
        .expect("sum the fixture's file rows");
    let n_wal_events: u64 = db
        .query_row("SELECT sum(n_events) FROM batches", [], |row| row.get(0))
        .expect("sum the fixture's WAL events");
    let marks: Vec<(String, u64)> = db
        .prepare("SELECT agent_id, seq FROM high_water ORDER BY agent_id")
        .and_then(|mut stmt| {
            stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect()
        })
        .expect("read the fixture's high_water");
    assert_eq!(
        (listed.len(), n_file_rows, n_wal_events),
        (N_FILES, N_FILE_ROWS, N_WAL_EVENTS),
        "the fixture is not what its README says"
    );
    assert_eq!(N_FILE_ROWS + N_WAL_EVENTS, N_EVENTS);
    let expected_marks: Vec<(String, u64)> =
        MARKS.iter().map(|(a, s)| ((*a).to_owned(), *s)).collect();
    assert_eq!(marks, expected_marks, "the fixture's high_water");
    const {
        assert!(
            N_FILES > 2 * FILES_PER_COMMIT,
            "the fixture needs at least three conversion commits"
        )
    };
    for path in &listed {
        assert!(data.join("events").join(path).is_file(), "{path} missing");
    }
    listed
}

/// A read-only connection to the WAL database of a running or killed aggregator.
fn open_wal(dir: &TestDir) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        data_dir(dir).join("wal.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open wal.sqlite")
}

/// Whether wal.sqlite still holds the previous layout's file list (`parquet_files` with its
/// `path` column; after the conversion a guard table of that name without it is left, so that
/// an older release refuses to start instead of deleting the table's files).
fn has_parquet_files_table(dir: &TestDir) -> bool {
    let n: i64 = open_wal(dir)
        .query_row(
            "SELECT count(*) FROM pragma_table_info('parquet_files') WHERE name = 'path'",
            [],
            |row| row.get(0),
        )
        .expect("read the parquet_files columns");
    n > 0
}

/// Whether the guard against older releases is in place: a `parquet_files` an older release
/// cannot read (its query of `path` fails).
fn has_guard(dir: &TestDir) -> bool {
    let conn = open_wal(dir);
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'parquet_files'",
            [],
            |row| row.get(0),
        )
        .expect("read sqlite_master");
    n == 1
        && conn
            .prepare("SELECT path, hour_ms, n_rows, n_bytes FROM parquet_files ORDER BY path")
            .is_err()
}

fn n_wal_batches(dir: &TestDir) -> anyhow::Result<i64> {
    Ok(open_wal(dir).query_row("SELECT count(*) FROM batches", [], |row| row.get(0))?)
}

/// The Delta log as an outside reader sees it: the number of commit files, and the highest
/// version of every transaction identifier (`txn` action) in them.
fn delta_log(dir: &TestDir) -> (usize, BTreeMap<String, i64>) {
    let log = data_dir(dir).join("events/_delta_log");
    let mut n_commits = 0;
    let mut txns: BTreeMap<String, i64> = BTreeMap::new();
    for entry in std::fs::read_dir(&log).unwrap_or_else(|e| panic!("read {}: {e}", log.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        n_commits += 1;
        let text = std::fs::read_to_string(&path).expect("read a commit");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let action: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", path.display()));
            if let (Some(app), Some(version)) = (
                action["txn"]["appId"].as_str(),
                action["txn"]["version"].as_i64(),
            ) {
                let entry = txns.entry(app.to_owned()).or_insert(version);
                *entry = (*entry).max(version);
            }
        }
    }
    (n_commits, txns)
}

/// Files under `events/` named as the previous layout named them: `part-<12 digits>-<12
/// digits>.parquet`.
fn previous_layout_files(dir: &TestDir) -> Vec<PathBuf> {
    fn is_old_name(name: &str) -> bool {
        let Some(middle) = name
            .strip_prefix("part-")
            .and_then(|n| n.strip_suffix(".parquet"))
        else {
            return false;
        };
        let mut parts = middle.split('-');
        matches!(
            (parts.next(), parts.next(), parts.next()),
            (Some(a), Some(b), None)
                if a.len() == 12 && b.len() == 12
                    && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
        )
    }
    fn walk(path: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if is_old_name(&entry.file_name().to_string_lossy()) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir(dir).join("events"), &mut out);
    out
}

fn number(cell: &Value) -> u64 {
    cell.as_u64()
        .unwrap_or_else(|| panic!("expected a number, got {cell}"))
}

/// Asserts, through Runnel's SQL, that the aggregator stores exactly the fixture's events plus
/// `n_more` events of `edge-1` numbered right after its mark: each once, none missing.
async fn assert_counts(query: SocketAddr, n_more: u64) {
    let total = N_EVENTS + n_more;
    let rows = query_rows(
        query,
        "SELECT count(*), count(DISTINCT event_id) FROM events",
    )
    .await
    .expect("count events");
    assert_eq!(
        (number(&rows[0][0]), number(&rows[0][1])),
        (total, total),
        "count(*), count(DISTINCT event_id)"
    );
    let rows = query_rows(
        query,
        "SELECT count(*) FROM (SELECT DISTINCT agent_id, seq FROM events)",
    )
    .await
    .expect("count distinct (agent_id, seq)");
    assert_eq!(number(&rows[0][0]), total, "distinct (agent_id, seq)");

    let rows = query_rows(
        query,
        "SELECT agent_id, count(*), min(seq), max(seq) FROM events GROUP BY agent_id \
         ORDER BY agent_id",
    )
    .await
    .expect("per-agent counts");
    let seen: Vec<(String, u64, u64, u64)> = rows
        .iter()
        .map(|row| {
            (
                row[0].as_str().expect("agent_id").to_owned(),
                number(&row[1]),
                number(&row[2]),
                number(&row[3]),
            )
        })
        .collect();
    let expected: Vec<(String, u64, u64, u64)> = MARKS
        .iter()
        .map(|(agent, mark)| {
            let mark = if *agent == "edge-1" {
                mark + n_more
            } else {
                *mark
            };
            // Every sequence number from 1 to the mark, once: no gap, no duplicate.
            ((*agent).to_owned(), mark, 1, mark)
        })
        .collect();
    assert_eq!(seen, expected, "per agent: count, min(seq), max(seq)");

    let rows = query_rows(
        query,
        "SELECT CAST(event_time AS BIGINT) / 3600000 * 3600000 AS hour, count(*) FROM events \
         WHERE event_id LIKE 'fx-%' GROUP BY hour ORDER BY hour",
    )
    .await
    .expect("per-hour counts");
    let seen: Vec<(i64, u64)> = rows
        .iter()
        .map(|row| (row[0].as_i64().expect("hour"), number(&row[1])))
        .collect();
    assert_eq!(
        seen,
        PER_HOUR.to_vec(),
        "the fixture's events per event hour"
    );

    // Bounds on event_time also prune by the `date` partition: the converted rows must sit in
    // the partitions of their event time for these to count right.
    let midnight = "TIMESTAMP '2026-02-01T00:00:00Z'";
    let last_hour = "TIMESTAMP '2026-01-31T23:00:00Z'";
    for (filter, expected) in [
        (format!("event_time >= {midnight}"), PER_HOUR[2].1),
        (
            format!("event_time < {midnight}"),
            PER_HOUR[0].1 + PER_HOUR[1].1,
        ),
        (
            format!("event_time >= {last_hour} AND event_time < {midnight}"),
            PER_HOUR[1].1,
        ),
    ] {
        let sql = format!("SELECT count(*) FROM events WHERE event_id LIKE 'fx-%' AND {filter}");
        let rows = query_rows(query, &sql)
            .await
            .expect("count in a time range");
        assert_eq!(number(&rows[0][0]), expected, "{sql}");
    }
}

/// Asserts the data directory is in the new layout: a Delta log, the guard for the file list, none
/// of the previous layout's files (`listed`, or any file named like them).
fn assert_new_layout(dir: &TestDir, listed: &[String]) {
    let log = data_dir(dir).join("events/_delta_log");
    assert!(log.is_dir(), "no {}", log.display());
    assert!(
        !has_parquet_files_table(dir),
        "wal.sqlite still has the parquet_files table"
    );
    assert!(
        has_guard(dir),
        "no guard against older releases in wal.sqlite"
    );
    let events = data_dir(dir).join("events");
    let left: Vec<&String> = listed
        .iter()
        .filter(|path| events.join(path).exists())
        .collect();
    assert!(left.is_empty(), "converted files not deleted: {left:?}");
    let old = previous_layout_files(dir);
    assert!(old.is_empty(), "files of the previous layout left: {old:?}");
    let (_, txns) = delta_log(dir);
    assert_eq!(
        txns.get(CONVERSION_APP_ID),
        Some(&(N_FILES as i64)),
        "the conversion's progress in the Delta log: {txns:?}"
    );
}

/// Waits until the WAL holds no batch (the flush moved every row into the table), then asserts
/// the table's marks: the fixture's, edge-1's moved by `n_more`.
async fn assert_flushed(dir: &TestDir, n_more: u64) {
    dir.wait_until(
        TIMEOUT,
        "the WAL's batches are flushed to the table",
        || async {
            let n = n_wal_batches(dir)?;
            anyhow::ensure!(n == 0, "{n} batches in the WAL");
            Ok(())
        },
    )
    .await;
    let (_, txns) = delta_log(dir);
    for (agent, mark) in MARKS {
        let mark = if agent == "edge-1" {
            mark + n_more
        } else {
            mark
        };
        assert_eq!(
            txns.get(&app_id(agent)),
            Some(&(mark as i64)),
            "{agent}'s mark in the Delta log: {txns:?}"
        );
    }
}

fn aggregator_options() -> AggregatorOptions {
    AggregatorOptions {
        flush_interval_ms: 300,
        ..AggregatorOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_layout_becomes_a_delta_table_on_first_start() {
    let dir = TestDir::new("delta-upgrade");
    let certs = Certs::init(&dir.join("certs"));
    let listed = install_fixture(&dir);
    let mut aggregator = AggregatorProcess::start(&binaries!(), &dir, &certs, aggregator_options());
    // The conversion runs before the aggregator serves: every event is there at once, the WAL's
    // batches in memory, the rest in the table.
    assert_counts(aggregator.query_addr(), 0).await;
    assert_new_layout(&dir, &listed);
    // The WAL's batches reach the table through a flush, with the agents' marks.
    assert_flushed(&dir, 0).await;
    assert_counts(aggregator.query_addr(), 0).await;

    // A restart finds nothing to convert and the same events, all in the table now.
    aggregator.stop();
    let (n_commits, _) = delta_log(&dir);
    aggregator.restart();
    assert_counts(aggregator.query_addr(), 0).await;
    assert_new_layout(&dir, &listed);
    assert_eq!(n_commits, delta_log(&dir).0, "a restart commits nothing");
    aggregator.stop();
}

/// An aggregator of this release started on `dir`'s data directory with
/// `RUNNEL_AGGREGATOR_PAUSE_AT=convert.after_commit`: it never gets as far as serving (the
/// conversion runs first), so the harness's start, which waits for the runtime file, cannot
/// run it. Killed on drop.
struct Paused {
    child: Child,
    stderr: PathBuf,
}

impl Paused {
    fn start(dir: &TestDir, certs: &Certs, label: &str) -> Paused {
        let home = dir.join(label);
        std::fs::create_dir_all(&home).expect("create the paused aggregator's dir");
        let config = home.join("aggregator.toml");
        let quote = |path: &Path| json!(path.display().to_string()).to_string();
        std::fs::write(
            &config,
            format!(
                "[aggregator]\ndata_dir = {data}\n\n\
                 [ingest]\nlisten = \"127.0.0.1:0\"\nca_cert = {ca}\ncert = {cert}\nkey = {key}\n\n\
                 [storage]\nflush_interval_ms = 300\n\n\
                 [pgwire]\nlisten = \"127.0.0.1:0\"\n\n\
                 [query]\nlisten = \"127.0.0.1:0\"\n",
                data = quote(&data_dir(dir)),
                ca = quote(&certs.ca_cert),
                cert = quote(&certs.server_cert),
                key = quote(&certs.server_key),
            ),
        )
        .expect("write the paused aggregator's config");
        let stderr = home.join("aggregator.stderr");
        let open = |path: PathBuf| std::fs::File::create(&path).expect("create a log file");
        let child = Command::new(binaries!().aggregator)
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUNNEL_AGGREGATOR_PAUSE_AT", "convert.after_commit")
            .env("RUNNEL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(open(home.join("aggregator.stdout")))
            .stderr(open(stderr.clone()))
            .spawn()
            .expect("spawn the aggregator");
        Paused { child, stderr }
    }

    /// Waits until it says it paused after a conversion commit (panics if it exits first or
    /// does not within the timeout), then SIGKILLs it.
    fn kill_when_paused(mut self) {
        let deadline = Instant::now() + TIMEOUT;
        let line = "RUNNEL_AGGREGATOR_PAUSE_AT: paused at convert.after_commit";
        loop {
            if std::fs::read_to_string(&self.stderr).is_ok_and(|text| text.contains(line)) {
                break;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "the paused aggregator exited with {status} before pausing; stderr:\n{}",
                    tail(&self.stderr, 12_000)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} within {TIMEOUT:?}; stderr:\n{}",
                tail(&self.stderr, 12_000)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_conversion_resumes_without_losing_or_doubling_events() {
    let dir = TestDir::new("delta-upgrade-interrupted");
    let certs = Certs::init(&dir.join("certs"));
    let listed = install_fixture(&dir);
    // SIGKILL after each conversion commit: 16, 32, then all 36 files (the last kill comes after
    // the last commit, before the file list is dropped). Each start resumes where the last left.
    let mut progress = Vec::new();
    let mut expected = Vec::new();
    let mut done = 0;
    while done < N_FILES {
        done = (done + FILES_PER_COMMIT).min(N_FILES);
        expected.push(done as i64);
        Paused::start(&dir, &certs, &format!("paused-{}", progress.len() + 1)).kill_when_paused();
        let (_, txns) = delta_log(&dir);
        progress.push(txns.get(CONVERSION_APP_ID).copied().unwrap_or(0));
        // Until the conversion has finished, the previous layout stays whole.
        assert!(
            has_parquet_files_table(&dir),
            "parquet_files dropped before the conversion finished"
        );
        let events = data_dir(&dir).join("events");
        let missing: Vec<&String> = listed
            .iter()
            .filter(|path| !events.join(path).is_file())
            .collect();
        assert!(missing.is_empty(), "deleted before the end: {missing:?}");
    }
    assert_eq!(
        progress, expected,
        "files converted after each interrupted start"
    );

    let aggregator = AggregatorProcess::start(&binaries!(), &dir, &certs, aggregator_options());
    assert_counts(aggregator.query_addr(), 0).await;
    assert_new_layout(&dir, &listed);
    assert_flushed(&dir, 0).await;
    assert_counts(aggregator.query_addr(), 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_continues_after_its_mark_once_upgraded() {
    const N_MORE: u64 = 20;
    let dir = TestDir::new("delta-upgrade-agent");
    let certs = Certs::init(&dir.join("certs"));
    install_fixture(&dir);
    let bins = binaries!();
    let aggregator = AggregatorProcess::start(&bins, &dir, &certs, aggregator_options());
    assert_counts(aggregator.query_addr(), 0).await;
    // A new buffer under a known identity: the aggregator's Welcome names the mark the WAL kept
    // through the conversion (159), and the agent numbers its events after it.
    let cert = certs.issue_agent("edge-1");
    let uplink = Uplink {
        aggregator: aggregator.ingest_addr(),
        ca_cert: certs.ca_cert.clone(),
    };
    let agent = AgentProcess::start(
        &bins,
        &dir,
        "agent-edge-1",
        &cert,
        &uplink,
        AgentOptions::default(),
    );
    let events: Vec<Value> = (0..N_MORE)
        .map(|idx| json!({"event_id": format!("after-{idx:02}"), "name": "page_view"}))
        .collect();
    let outcome = post_events(&http_client(), agent.http_addr(), &events)
        .await
        .expect("post events");
    assert_eq!(outcome.status, 200, "{outcome:?}");
    wait_count_of(
        &dir,
        aggregator.query_addr(),
        "SELECT count(*) FROM events",
        N_EVENTS + N_MORE,
    )
    .await;
    assert_counts(aggregator.query_addr(), N_MORE).await;
    let rows = query_rows(
        aggregator.query_addr(),
        "SELECT min(seq), max(seq) FROM events WHERE event_id LIKE 'after-%'",
    )
    .await
    .expect("the new events' seq");
    let edge_1_mark = MARKS[0].1;
    assert_eq!(
        (number(&rows[0][0]), number(&rows[0][1])),
        (edge_1_mark + 1, edge_1_mark + N_MORE),
        "the new events come right after the converted ones"
    );
    assert_flushed(&dir, N_MORE).await;
    assert_counts(aggregator.query_addr(), N_MORE).await;
}
