//! SIGKILL of the aggregator in the middle of each change it makes to the events table (a
//! flush, a compaction, a retention pass), just before and just after the Delta commit, on a
//! local directory and on S3: afterwards every event the agent's source acknowledged is stored
//! exactly once, in Runnel's SQL and in the table as an outside reader (the PyPI `deltalake`
//! package, `support/delta_reader.rs`) sees it, and expired events are gone from both.
//!
//! The aggregator stops at a named point when `RUNNEL_AGGREGATOR_PAUSE_AT` names it
//! (`aggregator/src/faults.rs`): it prints `paused at <point>` and hangs there until it is
//! killed. One fleet per storage kind goes through every point in turn; each point is its own
//! cycle with its own events: start with the point armed, send events until the aggregator
//! stops there, send one more round the agent accepts while it hangs, SIGKILL it, start it
//! again without the variable, and let the agent resend what was not acknowledged. Then, once
//! everything is flushed: Runnel's `count(*)`, its distinct (agent_id, seq) and distinct
//! event ids, the table's row count (status `storage.n_rows`) and the outside reader's count all
//! equal the number of acknowledged events that have not expired, and the agent's transaction
//! identifier in the table names the highest seq stored.
//!
//! The S3 half uses `RUNNEL_TEST_S3_URL` (moto, started by `.ci/run`) and skips without it, as
//! `s3.rs` does; without `RUNNEL_TEST_PYTHON` the outside reader's part is skipped, saying so.

#[path = "support/delta_reader.rs"]
mod delta_reader;

use std::net::SocketAddr;
use std::time::Duration;

use delta_reader::{Location, Reader};
use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, Fleet, binaries, create_s3_bucket, http_client,
    now_unix_ms, post_events, query_count, rfc3339, start_fleet_with,
};
use serde_json::{Value, json};

/// The aggregator's pause-point variable (`runnel_aggregator::faults::PAUSE_AT_VAR`).
const PAUSE_AT_VAR: &str = "RUNNEL_AGGREGATOR_PAUSE_AT";
const S3_URL_ENV: &str = "RUNNEL_TEST_S3_URL";

/// Every point, in the order the cycles run.
const POINTS: [&str; 6] = [
    "flush.before_commit",
    "flush.after_commit",
    "compact.before_commit",
    "compact.after_commit",
    "expire.before_commit",
    "expire.after_commit",
];

const TIMEOUT: Duration = Duration::from_secs(60);
const HOUR_MS: i64 = 3_600_000;
/// `storage.retention_hours`; old events are this much and two days more in the past.
const RETENTION_HOURS: i64 = 24;
/// `storage.compact_min_files`: a compaction cycle makes this many flushes of one partition.
const COMPACT_MIN_FILES: u64 = 3;
const EVENTS_PER_ROUND: i64 = 25;

const YOUNG_LIKE: &str = "event_id LIKE 'y-%'";
const OLD_LIKE: &str = "event_id LIKE 'o-%'";

/// The middle of the hour `hours_ago` hours before `now`.
fn mid_hour(now: i64, hours_ago: i64) -> i64 {
    (now - hours_ago * HOUR_MS) / HOUR_MS * HOUR_MS + HOUR_MS / 2
}

async fn status(query: SocketAddr) -> anyhow::Result<Value> {
    Ok(http_client()
        .get(format!("http://{query}/api/v1/status"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// One fleet, its table, and what its agent acknowledged.
struct Rig {
    fleet: Fleet,
    table: Location,
    reader: Option<Reader>,
    client: reqwest::Client,
    now: i64,
    /// Acknowledged events young enough to stay (`y-...`), and old ones (`o-...`) that
    /// retention removes.
    n_young: u64,
    n_old: u64,
    /// Rounds sent so far (part of every event id).
    n_rounds: u64,
}

impl Rig {
    /// POSTs one round: `n_young` young events at `young_ms` and `n_old` old ones (sent first,
    /// so the agent's highest seq is a young event's); asserts the source acknowledged it.
    async fn post_round(&mut self, young_ms: i64, n_young: i64, n_old: i64) {
        let round = self.n_rounds;
        self.n_rounds += 1;
        let old_ms = self.now - (RETENTION_HOURS + 48) * HOUR_MS;
        let old = (0..n_old).map(|idx| {
            json!({
                "event_id": format!("o-{round}-{idx}"),
                "name": "page_view",
                "timestamp": rfc3339(old_ms + idx),
            })
        });
        let young = (0..n_young).map(|idx| {
            json!({
                "event_id": format!("y-{round}-{idx}"),
                "name": "page_view",
                "timestamp": rfc3339(young_ms + idx),
            })
        });
        let events: Vec<Value> = old.chain(young).collect();
        let outcome = post_events(&self.client, self.fleet.agent.http_addr(), &events)
            .await
            .unwrap_or_else(|error| panic!("round {round}: {error:#}"));
        assert_eq!(outcome.status, 200, "round {round}: {outcome:?}");
        self.n_young += u64::try_from(n_young).expect("not negative");
        self.n_old += u64::try_from(n_old).expect("not negative");
    }

    /// stderr of the aggregator's current start.
    fn current_stderr(&self) -> String {
        let all = self.fleet.aggregator.stderr();
        match all.rfind("===== harness: start #") {
            Some(at) => all[at..].to_owned(),
            None => all,
        }
    }

    fn paused_at(&self, point: &str) -> bool {
        self.current_stderr()
            .contains(&format!("{PAUSE_AT_VAR}: paused at {point}"))
    }

    /// Polls until the current start paused at `point`, or every row is flushed (the table
    /// holds `n_young + n_old - expired` rows: `in_table`) with none in memory. True: paused.
    async fn wait_paused_or_flushed(&self, point: &str, in_table: u64) -> bool {
        let query = self.fleet.aggregator.query_addr();
        let mut paused = false;
        let what = format!("the aggregator pauses at {point} or holds {in_table} rows in files");
        let paused_ref = &mut paused;
        self.fleet
            .dir
            .wait_until(TIMEOUT, &what, || {
                let now_paused = self.paused_at(point);
                if now_paused {
                    *paused_ref = true;
                }
                async move {
                    if now_paused {
                        return Ok(());
                    }
                    // Briefly: a slow answer must not hold up the next poll for the pause.
                    let status = tokio::time::timeout(Duration::from_secs(1), status(query))
                        .await
                        .map_err(|_| anyhow::anyhow!("no status within 1 s"))??;
                    let files = status["storage"]["n_rows"].as_u64().unwrap_or(0);
                    let memory = status["wal"]["n_rows"].as_u64().unwrap_or(u64::MAX);
                    anyhow::ensure!(
                        files == in_table && memory == 0,
                        "not paused; {files} rows in files, {memory} in memory"
                    );
                    Ok(())
                }
            })
            .await;
        paused
    }

    async fn wait_paused(&self, point: &str) {
        let what = format!("the aggregator pauses at {point}");
        self.fleet
            .dir
            .wait_until(TIMEOUT, &what, || {
                let paused = self.paused_at(point);
                async move {
                    anyhow::ensure!(paused, "not yet");
                    Ok(())
                }
            })
            .await;
    }

    /// One cycle: arm `point`, reach it, SIGKILL there, restart clean, check exact counts.
    async fn crash_at(&mut self, storage: &str, cycle: i64, point: &str) {
        let started = std::time::Instant::now();
        // A clean stop (everything is flushed already), then a start with the point armed.
        self.fleet.aggregator.stop();
        self.fleet
            .aggregator
            .set_env(vec![(PAUSE_AT_VAR.to_owned(), point.to_owned())]);
        self.fleet.aggregator.restart();
        let recent = mid_hour(self.now, 1);
        match point.split('.').next() {
            Some("flush") => {
                self.post_round(recent, EVENTS_PER_ROUND, 0).await;
                self.wait_paused(point).await;
            }
            Some("compact") => {
                // A partition of its own: each round is one flush, one more small file; the
                // compaction after the COMPACT_MIN_FILES-th flush stops at the point.
                let partition = mid_hour(self.now, 3 + cycle);
                let mut paused = false;
                for _ in 0..=COMPACT_MIN_FILES {
                    self.post_round(partition, EVENTS_PER_ROUND, 0).await;
                    if self.wait_paused_or_flushed(point, self.n_young).await {
                        paused = true;
                        break;
                    }
                }
                assert!(
                    paused,
                    "{storage}: {} flushes of one partition and no pause at {point}:\n{}",
                    COMPACT_MIN_FILES + 1,
                    self.current_stderr()
                );
            }
            Some("expire") => {
                self.post_round(recent, EVENTS_PER_ROUND, EVENTS_PER_ROUND)
                    .await;
                self.wait_paused(point).await;
            }
            _ => panic!("unknown point {point}"),
        }
        // Accepted by the agent while the aggregator hangs: stored in its WAL and acknowledged
        // to the agent, or resent after the restart.
        self.post_round(recent, EVENTS_PER_ROUND, 0).await;
        self.fleet.aggregator.kill_hard();
        self.fleet.aggregator.set_env(Vec::new());
        self.fleet.aggregator.restart();
        self.check_exact(storage, point).await;
        if point == "flush.after_commit" {
            // The kill came after the commit, before the WAL let go of the batches: the restart
            // found them in the table and dropped them.
            let stderr = self.current_stderr();
            assert!(
                stderr.contains("dropped WAL batches the events table already holds"),
                "{storage}: the restart after {point} did not reconcile the WAL with the table:\n\
                 {stderr}"
            );
        }
        eprintln!(
            "{storage}: {point}: paused, killed, restarted; {} events stored once ({} old ones \
             expired) in {:?}",
            self.n_young,
            self.n_old,
            started.elapsed()
        );
    }

    /// Waits until Runnel stores every young acknowledged event once, no old one, and has
    /// flushed them all; then compares with the outside reader.
    async fn check_exact(&mut self, storage: &str, point: &str) {
        let query = self.fleet.aggregator.query_addr();
        let n_young = self.n_young;
        let what = format!(
            "{storage}, after a SIGKILL at {point}: {n_young} acknowledged events stored once, \
             none expired, all flushed"
        );
        self.fleet
            .dir
            .wait_until(TIMEOUT, &what, || async move {
                let young = query_count(
                    query,
                    &format!("SELECT count(*) FROM events WHERE {YOUNG_LIKE}"),
                )
                .await?;
                assert!(
                    young <= n_young,
                    "{storage}, after a SIGKILL at {point}: {young} young events stored, more \
                     than the {n_young} acknowledged"
                );
                let total = query_count(query, "SELECT count(*) FROM events").await?;
                let old = query_count(
                    query,
                    &format!("SELECT count(*) FROM events WHERE {OLD_LIKE}"),
                )
                .await?;
                let status = status(query).await?;
                let files = status["storage"]["n_rows"].as_u64().unwrap_or(0);
                let memory = status["wal"]["n_rows"].as_u64().unwrap_or(u64::MAX);
                anyhow::ensure!(
                    young == n_young
                        && total == n_young
                        && old == 0
                        && files == n_young
                        && memory == 0,
                    "{young} young and {old} old events stored ({total} in all), {files} rows in \
                     files, {memory} in memory"
                );
                Ok(())
            })
            .await;
        let distinct_seq = query_count(
            query,
            "SELECT count(*) FROM (SELECT DISTINCT agent_id, seq FROM events)",
        )
        .await
        .expect("count distinct (agent_id, seq)");
        let distinct_ids = query_count(query, "SELECT count(DISTINCT event_id) FROM events")
            .await
            .expect("count distinct event ids");
        assert_eq!(
            (distinct_seq, distinct_ids),
            (n_young, n_young),
            "{storage}, after a SIGKILL at {point}: distinct (agent_id, seq) and distinct \
             event ids"
        );
        let Some(reader) = &self.reader else {
            return;
        };
        let read = reader
            .read_once(&self.table)
            .unwrap_or_else(|error| panic!("{storage}, after a SIGKILL at {point}: {error:#}"));
        let max_seq = query_count(query, "SELECT max(seq) FROM events")
            .await
            .expect("highest seq");
        let agent = self.fleet.agent.agent_id().to_owned();
        assert!(
            read.n_rows == n_young
                && read.n_distinct == n_young
                && read.duplicates.is_empty()
                && read.max_seq.get(&agent).copied() == i64::try_from(max_seq).ok()
                && read.marks_match_rows(),
            "{storage}, after a SIGKILL at {point}: the outside reader sees {read:?}; Runnel \
             stores {n_young} rows, highest seq {max_seq}"
        );
    }
}

async fn run_every_point(storage: &str, fleet: Fleet, table: Location) {
    let reader = delta_reader::reader(&format!("the outside reader's counts ({storage})"));
    let mut rig = Rig {
        fleet,
        table,
        reader,
        client: http_client(),
        now: now_unix_ms(),
        n_young: 0,
        n_old: 0,
        n_rounds: 0,
    };
    for (cycle, point) in POINTS.iter().enumerate() {
        rig.crash_at(storage, i64::try_from(cycle).expect("few"), point)
            .await;
    }
}

fn aggregator_options(storage_extra: String, extra_toml: String) -> AggregatorOptions {
    AggregatorOptions {
        flush_interval_ms: 150,
        storage_extra: format!(
            "retention_hours = {RETENTION_HOURS}\ncompact_min_files = {COMPACT_MIN_FILES}\n\
             vacuum_grace_minutes = 1\n{storage_extra}"
        ),
        extra_toml,
        ..AggregatorOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_every_table_commit_on_a_local_directory() {
    let fleet = start_fleet_with(
        &binaries!(),
        "delta-crash-local",
        "edge-crash-local",
        aggregator_options(String::new(), String::new()),
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let table = Location::local(&fleet.dir.join("aggregator/data/events"));
    run_every_point("local directory", fleet, table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_every_table_commit_on_s3() {
    let Ok(endpoint) = std::env::var(S3_URL_ENV) else {
        eprintln!(
            "{S3_URL_ENV} is not set: skipping the S3 half of the crash test (.ci/run sets it)"
        );
        return;
    };
    let endpoint = endpoint.trim_end_matches('/').to_owned();
    let bucket = format!("runnel-crash-{}", std::process::id());
    create_s3_bucket(&endpoint, &bucket).await;
    let fleet = start_fleet_with(
        &binaries!(),
        "delta-crash-s3",
        "edge-crash-s3",
        aggregator_options(
            format!("url = \"s3://{bucket}/fleet/events\"\n"),
            format!(
                "[storage.s3]\n\
                 endpoint = \"{endpoint}\"\n\
                 allow_http = true\n\
                 access_key_id = \"test\"\n\
                 secret_access_key = \"test-secret\"\n"
            ),
        ),
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let table = Location::s3(&endpoint, &format!("{bucket}/fleet/events"));
    run_every_point("S3", fleet, table).await;
}
