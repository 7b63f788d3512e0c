//! An outside engine reads the events table while the aggregator writes it: the PyPI
//! `deltalake` package (`tests/python/read_delta.py`) polls the Delta table and reads every
//! version it finds while events arrive in many small rounds, each flushed on its own, and
//! small files are compacted. At every version it read there is no duplicate (agent_id, seq),
//! the count never goes down from one version to the next (a compaction rewrites rows, it must
//! not lose or repeat them in between), and the agent's transaction identifier names the highest
//! seq stored; at the end its count equals Runnel's `count(*)` and the number of events the
//! agent acknowledged.
//!
//! Needs `RUNNEL_TEST_PYTHON` (see `support/delta_reader.rs`); without it the test says so and
//! checks nothing else, as the S3 test does without its server.

#[path = "support/delta_reader.rs"]
mod delta_reader;

use std::net::SocketAddr;
use std::time::Duration;

use delta_reader::{Location, VersionRead};
use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, binaries, http_client, now_unix_ms, post_events,
    query_count, rfc3339, start_fleet_with,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);
const HOUR_MS: i64 = 3_600_000;
/// Rounds of events, each flushed to its own Delta commit before the next is sent.
const N_ROUNDS: i64 = 30;
const EVENTS_PER_ROUND: i64 = 20;

async fn status(query: SocketAddr) -> anyhow::Result<Value> {
    Ok(http_client()
        .get(format!("http://{query}/api/v1/status"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// Panics unless every read is whole and consistent, and no read holds more than `n_acked`
/// events (all that were acknowledged when the reads were taken).
fn check_reads(reads: &[VersionRead], n_acked: u64) {
    let mut previous: Option<&VersionRead> = None;
    for read in reads {
        assert!(
            read.duplicates.is_empty() && read.n_distinct == read.n_rows,
            "version {}: {} rows but {} distinct (agent_id, seq); duplicated: {:?}",
            read.version,
            read.n_rows,
            read.n_distinct,
            read.duplicates
        );
        assert!(
            read.n_rows <= n_acked,
            "version {}: {} rows, more than the {n_acked} events acknowledged",
            read.version,
            read.n_rows
        );
        assert!(
            read.marks_match_rows(),
            "version {}: the transaction identifiers {:?} do not name the highest seq stored {:?}",
            read.version,
            read.txn,
            read.max_seq
        );
        if let Some(previous) = previous {
            assert!(
                read.version > previous.version,
                "the reader went from version {} back to {}",
                previous.version,
                read.version
            );
            assert!(
                read.n_rows >= previous.n_rows,
                "the count went down from {} rows at version {} to {} at version {}",
                previous.n_rows,
                previous.version,
                read.n_rows,
                read.version
            );
        }
        previous = Some(read);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_reader_sees_whole_versions_while_the_aggregator_flushes_and_compacts() {
    let Some(reader) = delta_reader::reader("the outside-reader test") else {
        return;
    };
    let fleet = start_fleet_with(
        &binaries!(),
        "delta-readers",
        "edge-reader",
        AggregatorOptions {
            flush_interval_ms: 100,
            storage_extra: "compact_min_files = 3\nvacuum_grace_minutes = 1\n".to_owned(),
            ..AggregatorOptions::default()
        },
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let query = fleet.aggregator.query_addr();
    let http = fleet.agent.http_addr();
    let client = http_client();
    let table = Location::local(&fleet.dir.join("aggregator/data/events"));
    let mut watcher = reader.watch(&table, &fleet.dir.join("reader"));

    // Two hour partitions, an hour and two hours ago (mid-hour: every round lands in the same
    // two), so each flush adds a file to each and compaction merges each every few flushes.
    let now = now_unix_ms();
    let hours = [
        (now - HOUR_MS) / HOUR_MS * HOUR_MS + HOUR_MS / 2,
        (now - 2 * HOUR_MS) / HOUR_MS * HOUR_MS + HOUR_MS / 2,
    ];
    let mut n_acked: u64 = 0;
    for round in 0..N_ROUNDS {
        let events: Vec<Value> = (0..EVENTS_PER_ROUND)
            .map(|idx| {
                let hour = hours[usize::try_from(idx % 2).expect("0 or 1")];
                json!({
                    "event_id": format!("reader-{round}-{idx}"),
                    "name": "page_view",
                    "timestamp": rfc3339(hour + round * 1000 + idx),
                })
            })
            .collect();
        let outcome = post_events(&client, http, &events).await.unwrap();
        assert_eq!(outcome.status, 200, "round {round}: {outcome:?}");
        n_acked += events.len() as u64;
        // Flushed: in the table, none left in memory. The next round is its own commit.
        let what = format!("round {round} is flushed ({n_acked} rows in the table)");
        fleet
            .dir
            .wait_until(TIMEOUT, &what, || async {
                let status = status(query).await?;
                let in_table = status["storage"]["n_rows"].as_u64().unwrap_or(0);
                let in_memory = status["wal"]["n_rows"].as_u64().unwrap_or(u64::MAX);
                anyhow::ensure!(
                    in_table == n_acked && in_memory == 0,
                    "{in_table} rows in the table, {in_memory} in memory"
                );
                Ok(())
            })
            .await;
        let reads = watcher
            .reads()
            .unwrap_or_else(|error| panic!("round {round}: {error:#}"));
        check_reads(&reads, n_acked);
    }

    // The reader catches up with the version Runnel serves; by then nothing is in memory.
    let final_version = status(query).await.unwrap()["storage"]["table_version"]
        .as_i64()
        .expect("storage.table_version");
    let mut reads = Vec::new();
    fleet
        .dir
        .wait_until(
            TIMEOUT,
            &format!("the reader reads version {final_version}"),
            || {
                let seen = watcher.reads();
                let done = match &seen {
                    Ok(seen) => seen.last().map(|r| r.version) == Some(final_version),
                    Err(_) => false,
                };
                if let Ok(seen) = &seen {
                    reads.clone_from(seen);
                }
                async move {
                    let seen = seen?;
                    anyhow::ensure!(
                        done,
                        "last version read: {:?}",
                        seen.last().map(|r| r.version)
                    );
                    Ok(())
                }
            },
        )
        .await;
    check_reads(&reads, n_acked);

    let last = reads.last().expect("at least one read");
    let n_runnel = query_count(query, "SELECT count(*) FROM events")
        .await
        .unwrap();
    let n_runnel_distinct = query_count(
        query,
        "SELECT count(*) FROM (SELECT DISTINCT agent_id, seq FROM events)",
    )
    .await
    .unwrap();
    assert_eq!(
        (last.n_rows, n_runnel, n_runnel_distinct),
        (n_acked, n_acked, n_acked),
        "at version {} the reader counts {} rows, Runnel {n_runnel} ({n_runnel_distinct} \
         distinct), and the agent acknowledged {n_acked}",
        last.version,
        last.n_rows
    );

    // The test saw what it is about: many versions, compactions among them, and the reader read
    // the table on both sides of a compaction (fewer files, no fewer rows).
    let stderr = fleet.aggregator.stderr();
    let n_compactions = stderr.matches("compacted Parquet files").count();
    assert!(n_compactions >= 2, "{n_compactions} compactions:\n{stderr}");
    let n_shrinks = reads
        .windows(2)
        .filter(|pair| pair[1].n_files < pair[0].n_files)
        .count();
    eprintln!(
        "the reader read {} versions (of {}), {n_shrinks} of them with fewer files than the one \
         before; the aggregator compacted {n_compactions} times; {n_acked} events",
        reads.len(),
        final_version + 1
    );
    assert!(
        reads.len() >= 10,
        "the reader read only {} versions: {reads:?}\nreader stderr:\n{}",
        reads.len(),
        watcher.stderr()
    );
    assert!(
        n_shrinks >= 1,
        "the reader never read a version right after a compaction: {reads:?}"
    );
}
