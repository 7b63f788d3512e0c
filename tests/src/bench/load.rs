//! The benchmark's side of the load: request bodies built before the clock starts, the
//! benchmark's settings of the shared generator ([`runnel_tests::load`]), and the query-side
//! measurements.
//!
//! Bodies are built before the clock starts, so the generator spends its CPU on HTTP only.
//! `n_clients` clients share one keep-alive connection pool and take the next body from a shared
//! index until all are sent or the deadline passes. A request counts as acknowledged on a 2xx; a
//! 503 (buffer full) is retried after a short pause, as a well-behaved client would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
pub use runnel_tests::load::{Body, EVENTS_PATH, LoadReport};
use runnel_tests::load::{
    Load, LoadConfig, OnTransportError, OtherAnswers, PreparedBodies, Requests,
};
use serde_json::{Value, json};

/// Per-request timeout: a hung request is a finding, not something to wait for forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before retrying a request refused with 503.
const BUSY_RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Retries of one request after transport errors before the client gives up on it.
const MAX_TRANSPORT_RETRIES: u32 = 3;

pub fn http_client(n_clients: usize) -> reqwest::Client {
    runnel_tests::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(n_clients)
        .build()
        .expect("build HTTP client")
}

/// Bodies of `events_per_request` events: a plain object for 1, a JSON array otherwise.
pub fn bodies(events: &[String], events_per_request: usize) -> Vec<Body> {
    events
        .chunks(events_per_request)
        .map(|chunk| {
            let json = if events_per_request == 1 {
                chunk[0].clone()
            } else {
                format!("[{}]", chunk.join(","))
            };
            Body {
                json,
                n_events: chunk.len(),
            }
        })
        .collect()
}

/// Sends every body as a `POST` to `path` on the agent, from `n_clients` concurrent clients,
/// until all are sent or `time_limit` passed. Every answer and error is counted, none fails.
pub async fn run(
    client: &reqwest::Client,
    http: SocketAddr,
    path: &str,
    bodies: Arc<Vec<Body>>,
    n_clients: usize,
    time_limit: Duration,
) -> LoadReport {
    let config = LoadConfig {
        requests: Requests::Bodies(PreparedBodies {
            bodies,
            max_transport_retries: MAX_TRANSPORT_RETRIES,
            check_answers: false,
        }),
        pause_after_busy: BUSY_RETRY_PAUSE,
        pause_after_failure: Duration::ZERO,
        on_transport_error: OnTransportError::Continue,
        other_answers: OtherAnswers::CountAll,
        time_limit: Some(time_limit),
        client: Some(client.clone()),
        ..LoadConfig::bodies(n_clients, path, Arc::default())
    };
    Load::start_with(http, config).finish().await
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100).
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------------------------
// Queries

pub async fn query(client: &reqwest::Client, addr: SocketAddr, sql: &str) -> anyhow::Result<Value> {
    let url = format!("http://{addr}/api/v1/query");
    let response = client
        .post(&url)
        .json(&json!({ "sql": sql }))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response.text().await.context("read query answer")?;
    anyhow::ensure!(status.is_success(), "{sql:?}: HTTP {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("{sql:?}: answer is not JSON"))
}

pub async fn count_events(client: &reqwest::Client, addr: SocketAddr) -> anyhow::Result<u64> {
    query_u64s(client, addr, "SELECT count(*) FROM events", 1)
        .await
        .map(|row| row[0])
}

/// The first `n_columns` columns of the first row of `sql`, as unsigned integers.
pub async fn query_u64s(
    client: &reqwest::Client,
    addr: SocketAddr,
    sql: &str,
    n_columns: usize,
) -> anyhow::Result<Vec<u64>> {
    let answer = query(client, addr, sql).await?;
    (0..n_columns)
        .map(|idx| {
            answer["rows"][0][idx]
                .as_u64()
                .with_context(|| format!("{sql:?}: unexpected answer {answer}"))
        })
        .collect()
}

/// Polls `SELECT count(*) FROM events` every `interval` until it reaches `n_expected`; returns
/// when that was first seen, or the last count when `deadline` passed.
pub async fn wait_queryable(
    client: &reqwest::Client,
    addr: SocketAddr,
    n_expected: u64,
    interval: Duration,
    deadline: Instant,
) -> Result<Instant, u64> {
    let mut last = 0;
    loop {
        if let Ok(n) = count_events(client, addr).await {
            last = n;
            if n >= n_expected {
                return Ok(Instant::now());
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(interval).await;
    }
}

/// Edge-to-queryable latencies in ms (`ingest_time - receive_time`, both stamped in ms), of a
/// sample of at most `max_rows` events spread evenly over the sequence numbers, sorted.
pub async fn edge_latencies_ms(
    client: &reqwest::Client,
    addr: SocketAddr,
    n_events: u64,
    max_rows: u64,
) -> anyhow::Result<Vec<u64>> {
    let step = n_events.div_ceil(max_rows.max(1)).max(1);
    let sql = format!(
        "SELECT CAST(ingest_time AS BIGINT) - CAST(receive_time AS BIGINT) AS ms \
         FROM events WHERE seq % {step} = 0"
    );
    let answer = query(client, addr, &sql).await?;
    let rows = answer["rows"].as_array().context("no rows in answer")?;
    let mut values: Vec<u64> = rows
        .iter()
        .map(|row| row[0].as_i64().map(|v| v.max(0) as u64))
        .collect::<Option<_>>()
        .with_context(|| format!("latency rows are not integers: {}", &answer["columns"]))?;
    values.sort_unstable();
    Ok(values)
}
