//! The table's lifecycle: small files of an hour partition are compacted (an optimize commit)
//! without losing or repeating a row, and retention removes only the partitions older than
//! configured (a delete commit). Files leave the disk only after the vacuum grace period
//! (`aggregator/tests/delta_store.rs` tests that part).

use std::path::{Path, PathBuf};
use std::time::Duration;

use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, binaries, http_client, poll_until, post_events,
    query_rows, rfc3339, start_fleet_with,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);
const HOUR_MS: i64 = 3_600_000;

/// The data files the latest version of the Delta table at `events_dir` references, as paths
/// relative to it: every `add` minus every `remove` of the JSON commits in `_delta_log/`, read
/// the way any Delta reader replays the log (checkpoints only summarise these commits).
fn parquet_files(events_dir: &Path) -> Vec<String> {
    let log = events_dir.join("_delta_log");
    let mut commits: Vec<PathBuf> = std::fs::read_dir(&log)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect()
        })
        .unwrap_or_default();
    commits.sort();
    let mut live = std::collections::BTreeSet::new();
    for commit in commits {
        let text = std::fs::read_to_string(&commit).expect("a readable commit");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let action: Value = serde_json::from_str(line).expect("a JSON action");
            if let Some(path) = action["add"]["path"].as_str() {
                live.insert(path.to_owned());
            }
            if let Some(path) = action["remove"]["path"].as_str() {
                live.remove(path);
            }
        }
    }
    live.into_iter().collect()
}

fn in_partition(files: &[String], partition: &str) -> usize {
    files.iter().filter(|f| f.starts_with(partition)).count()
}

fn partition_of(unix_ms: i64) -> String {
    let hour = chrono::DateTime::from_timestamp_millis(unix_ms).expect("a valid time");
    format!(
        "date={}/hour={}/",
        hour.format("%Y-%m-%d"),
        hour.format("%-H")
    )
}

async fn counts(query: std::net::SocketAddr, sql: &str) -> anyhow::Result<(i64, i64)> {
    let rows = query_rows(query, sql).await?;
    let get = |idx: usize| rows[0][idx].as_i64().unwrap_or(-1);
    Ok((get(0), get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_compacted_and_old_partitions_expire() {
    let fleet = start_fleet_with(
        &binaries!(),
        "storage-lifecycle",
        "edge-storage",
        AggregatorOptions {
            flush_interval_ms: 300,
            storage_extra: "retention_hours = 24\ncompact_min_files = 3\n".to_owned(),
            ..AggregatorOptions::default()
        },
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let events_dir: PathBuf = fleet.dir.join("aggregator/data/events");
    let query = fleet.aggregator.query_addr();
    let http = fleet.agent.http_addr();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // The middle of the hour two hours ago: all these events share one partition.
    let recent_ms = (now_ms - 2 * HOUR_MS) / HOUR_MS * HOUR_MS + HOUR_MS / 2;
    let recent_partition = partition_of(recent_ms);

    // Five rounds, each flushed on its own: five small files, merged once three are there.
    for round in 0..5i64 {
        let events: Vec<Value> = (0..10i64)
            .map(|idx| {
                json!({
                    "event_id": format!("keep-{round}-{idx}"),
                    "name": "page_view",
                    "timestamp": rfc3339(recent_ms + round * 1000 + idx),
                })
            })
            .collect();
        let outcome = post_events(&http_client(), http, &events).await.unwrap();
        assert_eq!(outcome.status, 200, "{outcome:?}");
        let expected = (round + 1) * 10;
        // Stored, and flushed out of memory into a file (the partition's row count in files).
        poll_until(TIMEOUT, || async {
            let (n, distinct) = counts(
                query,
                "SELECT count(*), count(DISTINCT event_id) FROM events WHERE event_id LIKE 'keep-%'",
            )
            .await?;
            anyhow::ensure!(n == expected && distinct == expected, "{n}/{distinct} of {expected}");
            // Every row of this round is in a file now (none left in memory), so each round
            // is its own flush and its own file.
            let status: Value = http_client()
                .get(format!("http://{query}/api/v1/status"))
                .send()
                .await?
                .json()
                .await?;
            let in_memory = status["wal"]["n_rows"].as_i64().unwrap_or(-1);
            let in_files = status["storage"]["n_rows"].as_i64().unwrap_or(-1);
            anyhow::ensure!(
                in_memory == 0 && in_files == expected,
                "{in_memory} rows in memory, {in_files} in files"
            );
            Ok(())
        })
        .await
        .unwrap_or_else(|error| panic!("round {round}: {error:#}\n{}", fleet.dir.report()));
    }
    poll_until(TIMEOUT, || async {
        let files = parquet_files(&events_dir);
        let n_files = in_partition(&files, &recent_partition);
        anyhow::ensure!(
            n_files <= 2,
            "{n_files} files in {recent_partition}: {files:?}"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|error| panic!("no compaction: {error:#}\n{}", fleet.dir.report()));
    let stderr = fleet.aggregator.stderr();
    assert!(stderr.contains("compacted Parquet files"), "{stderr}");
    // The replaced files stay on disk for readers of older versions (vacuum grace).
    assert!(events_dir.join(&recent_partition).is_dir());
    let (n, distinct) = counts(
        query,
        "SELECT count(*), count(DISTINCT event_id) FROM events WHERE event_id LIKE 'keep-%'",
    )
    .await
    .unwrap();
    assert_eq!(
        (n, distinct),
        (50, 50),
        "compaction neither loses nor repeats a row"
    );

    // Events three days old: stored, flushed, then their partition is deleted.
    let old_ms = now_ms - 72 * HOUR_MS;
    let old: Vec<Value> = (0..10i64)
        .map(|idx| json!({"event_id": format!("old-{idx}"), "name": "page_view", "timestamp": rfc3339(old_ms + idx)}))
        .collect();
    let outcome = post_events(&http_client(), http, &old).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");
    poll_until(TIMEOUT, || async {
        let stderr = fleet.aggregator.stderr();
        anyhow::ensure!(stderr.contains("deleted expired partitions"), "not yet");
        let (n, _) = counts(
            query,
            "SELECT count(*), 0 FROM events WHERE event_id LIKE 'old-%'",
        )
        .await?;
        anyhow::ensure!(n == 0, "{n} old events still there");
        Ok(())
    })
    .await
    .unwrap_or_else(|error| panic!("no retention: {error:#}\n{}", fleet.dir.report()));
    let files = parquet_files(&events_dir);
    assert_eq!(in_partition(&files, &partition_of(old_ms)), 0, "{files:?}");
    let (n, distinct) = counts(
        query,
        "SELECT count(*), count(DISTINCT event_id) FROM events WHERE event_id LIKE 'keep-%'",
    )
    .await
    .unwrap();
    assert_eq!(
        (n, distinct),
        (50, 50),
        "retention keeps younger partitions"
    );
}
