//! The load generator and the query-side measurements.
//!
//! Request bodies are built before the clock starts, so the generator spends its CPU on HTTP
//! only. `n_clients` tasks share one keep-alive connection pool and take the next body from a
//! shared index until all are sent or the deadline passes. A request counts as acknowledged on a
//! 2xx; a 503 (buffer full) is retried after a short pause, as a well-behaved client would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
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

/// One request body and the number of events in it.
pub struct Body {
    pub json: String,
    pub n_events: usize,
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

#[derive(Debug, Default)]
pub struct LoadResult {
    pub n_events_acked: u64,
    pub n_requests_acked: u64,
    /// Body bytes of acknowledged requests.
    pub json_bytes_acked: u64,
    pub n_busy: u64,
    pub n_transport_errors: u64,
    pub n_other_status: u64,
    pub last_error: Option<String>,
    /// Latency of every acknowledged request (send to full response), microseconds.
    pub ack_latencies_us: Vec<u64>,
    pub elapsed: Duration,
    /// False when the deadline stopped the load before every body was sent.
    pub complete: bool,
}

/// Path of the agent's generic JSON endpoint.
pub const EVENTS_PATH: &str = "/v1/events";

/// Sends every body as a `POST` to `path` on the agent, from `n_clients` concurrent clients.
pub async fn run(
    client: &reqwest::Client,
    http: SocketAddr,
    path: &str,
    bodies: Arc<Vec<Body>>,
    n_clients: usize,
    time_limit: Duration,
) -> LoadResult {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + time_limit;
    let url = format!("http://{http}{path}");
    let tasks: Vec<_> = (0..n_clients)
        .map(|_| {
            let client = client.clone();
            let bodies = Arc::clone(&bodies);
            let next = Arc::clone(&next);
            let url = url.clone();
            tokio::spawn(async move { client_loop(&client, &url, &bodies, &next, deadline).await })
        })
        .collect();
    let mut total = LoadResult::default();
    for task in tasks {
        let part = match task.await {
            Ok(part) => part,
            Err(error) => LoadResult {
                last_error: Some(format!("load client task failed: {error}")),
                ..LoadResult::default()
            },
        };
        total.n_events_acked += part.n_events_acked;
        total.n_requests_acked += part.n_requests_acked;
        total.json_bytes_acked += part.json_bytes_acked;
        total.n_busy += part.n_busy;
        total.n_transport_errors += part.n_transport_errors;
        total.n_other_status += part.n_other_status;
        if part.last_error.is_some() {
            total.last_error = part.last_error;
        }
        total.ack_latencies_us.extend(part.ack_latencies_us);
    }
    total.elapsed = started.elapsed();
    total.complete = next.load(Ordering::SeqCst) >= bodies.len() && Instant::now() < deadline;
    total.ack_latencies_us.sort_unstable();
    total
}

async fn client_loop(
    client: &reqwest::Client,
    url: &str,
    bodies: &[Body],
    next: &AtomicUsize,
    deadline: Instant,
) -> LoadResult {
    let mut result = LoadResult::default();
    'bodies: loop {
        let body_idx = next.fetch_add(1, Ordering::Relaxed);
        let Some(body) = bodies.get(body_idx) else {
            break;
        };
        let mut n_transport_retries = 0;
        loop {
            if Instant::now() >= deadline {
                break 'bodies;
            }
            let sent = Instant::now();
            let outcome = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.json.clone())
                .send()
                .await;
            let response = match outcome {
                Ok(response) => response,
                Err(error) => {
                    result.n_transport_errors += 1;
                    result.last_error = Some(format!("{error:#}"));
                    n_transport_retries += 1;
                    if n_transport_retries > MAX_TRANSPORT_RETRIES {
                        continue 'bodies;
                    }
                    continue;
                }
            };
            let status = response.status();
            // Read the whole answer: the ack is complete when the client has it.
            let text = response.bytes().await;
            let latency = sent.elapsed();
            if status.is_success() && text.is_ok() {
                result.n_events_acked += body.n_events as u64;
                result.n_requests_acked += 1;
                result.json_bytes_acked += body.json.len() as u64;
                result.ack_latencies_us.push(latency.as_micros() as u64);
                continue 'bodies;
            }
            if status.as_u16() == 503 {
                result.n_busy += 1;
                tokio::time::sleep(BUSY_RETRY_PAUSE).await;
                continue;
            }
            result.n_other_status += 1;
            result.last_error = Some(format!(
                "HTTP {status}: {}",
                text.map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            ));
            continue 'bodies;
        }
    }
    result
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
