//! The events table on S3 (`storage.url = "s3://bucket/prefix"`): events are flushed into a
//! Delta table in the bucket (commits with conditional PUTs, data under the same partition
//! layout as a local `events_dir`), queries read them back, and a restart (SIGKILL) of the
//! aggregator keeps every row exactly once.
//!
//! The store comes from `RUNNEL_TEST_S3_URL`, an S3-compatible endpoint that accepts any
//! credentials and unsigned bucket creation (`.ci/run` starts moto's server for it). The test
//! makes its own bucket. Without the variable it says so and checks nothing else: there is no
//! in-process S3 server to fall back on.

use std::time::Duration;

use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, binaries, create_s3_bucket, http_client,
    poll_until, post_events, query_rows, start_fleet_with,
};
use serde_json::{Value, json};

const S3_URL_ENV: &str = "RUNNEL_TEST_S3_URL";
const TIMEOUT: Duration = Duration::from_secs(60);
const N_EVENTS: i64 = 300;

/// Keys in `bucket` (S3 ListObjectsV2, unsigned: the test store accepts that).
async fn list_keys(endpoint: &str, bucket: &str) -> anyhow::Result<Vec<String>> {
    let body = http_client()
        .get(format!("{endpoint}/{bucket}?list-type=2"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(body
        .split("<Key>")
        .skip(1)
        .filter_map(|rest| rest.split_once("</Key>").map(|(key, _)| key.to_owned()))
        .collect())
}

async fn counts(query: std::net::SocketAddr) -> anyhow::Result<(i64, i64)> {
    let rows = query_rows(
        query,
        "SELECT count(*), count(DISTINCT event_id) FROM events WHERE event_id LIKE 's3-%'",
    )
    .await?;
    let get = |idx: usize| rows[0][idx].as_i64().unwrap_or(-1);
    Ok((get(0), get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_table_lives_in_an_s3_bucket_and_survives_a_restart() {
    let Ok(endpoint) = std::env::var(S3_URL_ENV) else {
        eprintln!("{S3_URL_ENV} is not set: skipping the S3 storage test (.ci/run sets it)");
        return;
    };
    let endpoint = endpoint.trim_end_matches('/').to_owned();
    let bucket = format!("runnel-test-{}", std::process::id());
    create_s3_bucket(&endpoint, &bucket).await;

    let mut fleet = start_fleet_with(
        &binaries!(),
        "s3-storage",
        "edge-s3",
        AggregatorOptions {
            flush_interval_ms: 300,
            storage_extra: format!("url = \"s3://{bucket}/fleet/events\"\n"),
            extra_toml: format!(
                "[storage.s3]\n\
                 endpoint = \"{endpoint}\"\n\
                 allow_http = true\n\
                 access_key_id = \"test\"\n\
                 secret_access_key = \"test-secret\"\n"
            ),
            ..AggregatorOptions::default()
        },
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let http = fleet.agent.http_addr();
    let events: Vec<Value> = (0..N_EVENTS)
        .map(|idx| json!({ "event_id": format!("s3-{idx}"), "name": "page_view" }))
        .collect();
    let outcome = post_events(&http_client(), http, &events).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");

    // Stored, and flushed out of memory into objects under the prefix.
    let query = fleet.aggregator.query_addr();
    poll_until(TIMEOUT, || async {
        let (n, distinct) = counts(query).await?;
        anyhow::ensure!(n == N_EVENTS && distinct == N_EVENTS, "{n}/{distinct}");
        let status: Value = http_client()
            .get(format!("http://{query}/api/v1/status"))
            .send()
            .await?
            .json()
            .await?;
        let in_files = status["storage"]["n_rows"].as_i64().unwrap_or(-1);
        anyhow::ensure!(in_files == N_EVENTS, "{in_files} rows in files");
        Ok(())
    })
    .await
    .unwrap_or_else(|error| panic!("flush to S3: {error:#}\n{}", fleet.dir.report()));
    let keys = list_keys(&endpoint, &bucket).await.unwrap();
    let (log, data): (Vec<&String>, Vec<&String>) = keys
        .iter()
        .partition(|key| key.starts_with("fleet/events/_delta_log/"));
    assert!(
        log.iter()
            .any(|key| key.ends_with("00000000000000000001.json"))
            && !data.is_empty()
            && data.iter().all(|key| {
                key.starts_with("fleet/events/date=")
                    && key.contains("/hour=")
                    && key.ends_with(".parquet")
            }),
        "objects: {keys:?}"
    );

    // Nothing left in the WAL's memory: after a SIGKILL every row comes from the bucket.
    fleet.aggregator.restart();
    let query = fleet.aggregator.query_addr();
    poll_until(TIMEOUT, || async {
        let (n, distinct) = counts(query).await?;
        anyhow::ensure!(n == N_EVENTS && distinct == N_EVENTS, "{n}/{distinct}");
        Ok(())
    })
    .await
    .unwrap_or_else(|error| panic!("after restart: {error:#}\n{}", fleet.dir.report()));
    assert_eq!(
        list_keys(&endpoint, &bucket).await.unwrap(),
        keys,
        "a restart neither adds nor removes objects"
    );
}
