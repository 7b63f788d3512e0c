//! The one HTTP load generator: concurrent clients posting to the agent's HTTP source, used by the
//! end-to-end tests, the reliability suite (`faults`) and the benchmark (`bench/load.rs`).
//!
//! A [`LoadConfig`] says what to send and what to make of each answer. Requests are either fresh
//! test events with unique ids (`<prefix>-<client>-<n>`, never sent twice, so storage can be
//! refereed by event id) or prepared bodies that the clients take in turn from a shared index,
//! each sent until acknowledged or given up. A request counts as acknowledged on a 200 (2xx for
//! unchecked prepared bodies); a 503 is backpressure, paused after; what other answers and
//! transport errors mean (a broken test, a refusal to count, a stopped client) is the config's
//! choice. The load remembers every acknowledged event id and its stream, counts acknowledged,
//! refused and failed requests live, and measures each acknowledged request's latency.
//!
//! It never decides an outcome by timing: the only sleeps are a client's pauses after a refusal
//! or between requests, and it runs until [`Load::stop`], until its prepared bodies are all sent,
//! or until its optional time limit passes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::{http_client, test_event};

/// Path of the agent's generic JSON endpoint.
pub const EVENTS_PATH: &str = "/v1/events";

/// One prepared request body and the number of events in it.
#[derive(Debug, Clone)]
pub struct Body {
    pub json: String,
    pub n_events: usize,
}

/// Fresh test events ([`crate::test_event`]) for every request, also after a refusal: an id
/// is sent at most once, so a request whose answer was lost can never be stored twice.
#[derive(Debug, Clone)]
pub struct GeneratedEvents {
    /// Event ids are `<prefix>-<client>-<n>`.
    pub prefix: String,
    /// Each event's `stream`, taken in turn (several streams per request). Empty: the events
    /// carry no `stream` and land on the agent's default stream.
    pub streams: Vec<String>,
    /// Events per request, drawn uniformly from this range.
    pub events_per_request: RangeInclusive<usize>,
}

/// Prepared bodies, taken in turn by the clients from a shared index. A body refused with 503 is
/// sent again after the pause; the load finishes when every body was taken.
#[derive(Debug, Clone)]
pub struct PreparedBodies {
    pub bodies: Arc<Vec<Body>>,
    /// Sends of the same body again after transport errors before the client moves on (with
    /// [`OnTransportError::Continue`]).
    pub max_transport_retries: u32,
    /// Whether a 2xx answer must be exactly a 200 that counts the body's events (`accepted`).
    /// Off for the benchmark, whose Snowplow bodies get other answers.
    pub check_answers: bool,
}

/// What the clients send.
#[derive(Debug, Clone)]
pub enum Requests {
    Events(GeneratedEvents),
    Bodies(PreparedBodies),
}

/// What a client does after a request got no answer (connection refused or reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTransportError {
    /// Panic: the agent is expected to be up, the test is broken.
    Panic,
    /// Count it and stop this client (the agent is gone and the test expects that).
    StopClient,
    /// Count it, pause, and carry on.
    Continue,
}

/// What answers other than 2xx and 503 mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtherAnswers {
    /// Every one panics: valid events must be taken.
    Panic,
    /// 5xx (a failed commit) are counted as failures; any other answer panics.
    CountServerErrors,
    /// All are counted as failures.
    CountAll,
}

/// Configuration of a [`Load`]. [`LoadConfig::events`] and [`LoadConfig::bodies`] are strict (a
/// test's view: anything but 200 and 503 is a bug); the reliability suite and the benchmark
/// loosen them.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub n_clients: usize,
    /// Path on the agent's HTTP source, such as [`EVENTS_PATH`].
    pub path: String,
    pub requests: Requests,
    /// Pause of a client after a 503.
    pub pause_after_busy: Duration,
    /// Pause of a client after a counted failure (see [`OtherAnswers`]) or a transport error.
    pub pause_after_failure: Duration,
    /// Pause of a client after every acknowledged request (zero: none): paces the load.
    pub pause_between_requests: Duration,
    pub on_transport_error: OnTransportError,
    pub other_answers: OtherAnswers,
    /// The clients stop by themselves when this has passed since the start.
    pub time_limit: Option<Duration>,
    /// The client to send with (None: [`crate::http_client`]).
    pub client: Option<reqwest::Client>,
}

impl LoadConfig {
    /// `n_clients` clients posting 1 to 20 fresh events per request to [`EVENTS_PATH`] until
    /// stopped; a transport error stops a client, any answer other than 200 and 503 panics.
    pub fn events(n_clients: usize, prefix: &str) -> LoadConfig {
        LoadConfig {
            n_clients,
            path: EVENTS_PATH.to_owned(),
            requests: Requests::Events(GeneratedEvents {
                prefix: prefix.to_owned(),
                streams: Vec::new(),
                events_per_request: 1..=20,
            }),
            pause_after_busy: Duration::from_millis(100),
            pause_after_failure: Duration::from_millis(50),
            pause_between_requests: Duration::ZERO,
            on_transport_error: OnTransportError::StopClient,
            other_answers: OtherAnswers::Panic,
            time_limit: None,
            client: None,
        }
    }

    /// `n_clients` clients sending every one of `bodies` to `path` until each was acknowledged;
    /// a transport error or any answer other than 200 (counting the body's events) and 503
    /// panics.
    pub fn bodies(n_clients: usize, path: &str, bodies: Arc<Vec<Body>>) -> LoadConfig {
        LoadConfig {
            path: path.to_owned(),
            requests: Requests::Bodies(PreparedBodies {
                bodies,
                max_transport_retries: 0,
                check_answers: true,
            }),
            on_transport_error: OnTransportError::Panic,
            ..LoadConfig::events(n_clients, "")
        }
    }
}

/// An event the agent acknowledged: its id, stream, and whether the agent said (in its 200
/// answer) that a drop policy discarded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedEvent {
    pub id: String,
    pub stream: String,
    pub dropped_in_answer: bool,
}

/// What a [`Load`] saw, live or at the end.
#[derive(Debug, Clone, Default)]
pub struct LoadCounts {
    /// Events in every request sent, whatever the answer.
    pub n_offered: u64,
    pub n_events_acked: u64,
    pub n_requests_acked: u64,
    /// Body bytes of acknowledged requests.
    pub json_bytes_acked: u64,
    /// 503 answers (full buffer, `block`).
    pub n_busy: u64,
    /// Other refusals counted by [`OtherAnswers`] (a 5xx from a failed commit, say).
    pub n_failed: u64,
    /// Requests without an answer (connection refused or reset).
    pub n_transport_errors: u64,
    /// The last counted failure or transport error (not a 503).
    pub last_failure: Option<String>,
}

/// Everything a [`Load`] saw once it ended.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Every acknowledged event id (generated events only), each once.
    pub acked: BTreeSet<String>,
    /// The same events with their stream and drop flag, in order of acknowledgement per client.
    pub acked_events: Vec<AckedEvent>,
    pub counts: LoadCounts,
    /// Latency of every acknowledged request (send to full answer), microseconds, sorted.
    pub ack_latencies_us: Vec<u64>,
    pub elapsed: Duration,
    /// True when every prepared body was sent before the time limit (never for generated
    /// events, which run until stopped).
    pub complete: bool,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Index of the next prepared body.
    next_body: AtomicUsize,
    acked: Mutex<Vec<AckedEvent>>,
    n_offered: AtomicU64,
    n_events_acked: AtomicU64,
    n_requests_acked: AtomicU64,
    json_bytes_acked: AtomicU64,
    n_busy: AtomicU64,
    n_failed: AtomicU64,
    n_transport_errors: AtomicU64,
    last_failure: Mutex<Option<String>>,
}

impl Shared {
    fn counts(&self) -> LoadCounts {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LoadCounts {
            n_offered: get(&self.n_offered),
            n_events_acked: get(&self.n_events_acked),
            n_requests_acked: get(&self.n_requests_acked),
            json_bytes_acked: get(&self.json_bytes_acked),
            n_busy: get(&self.n_busy),
            n_failed: get(&self.n_failed),
            n_transport_errors: get(&self.n_transport_errors),
            last_failure: self.last_failure.lock().expect("failure lock").clone(),
        }
    }

    fn fail(&self, counter: &AtomicU64, failure: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        *self.last_failure.lock().expect("failure lock") = Some(failure);
    }
}

/// Concurrent clients posting to the agent, remembering what it acknowledged. Runs until
/// [`Load::stop`] (or [`Load::finish`] for prepared bodies or a time limit); the clients are
/// aborted when it is dropped.
pub struct Load {
    config: Arc<LoadConfig>,
    shared: Arc<Shared>,
    started: Instant,
    tasks: Vec<JoinHandle<Vec<u64>>>,
}

impl Load {
    /// [`LoadConfig::events`] with ids `<prefix>-<client>-<n>`; with `retry_errors` a client
    /// pauses after a transport error and carries on instead of stopping.
    pub fn start(http: SocketAddr, n_clients: usize, prefix: &str, retry_errors: bool) -> Load {
        let mut config = LoadConfig::events(n_clients, prefix);
        if retry_errors {
            config.on_transport_error = OnTransportError::Continue;
        }
        Load::start_with(http, config)
    }

    /// Starts `config.n_clients` clients posting to `http`.
    pub fn start_with(http: SocketAddr, config: LoadConfig) -> Load {
        let client = config.client.clone().unwrap_or_else(http_client);
        let config = Arc::new(config);
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let deadline = config.time_limit.map(|limit| started + limit);
        let url = format!("http://{http}{}", config.path);
        let tasks = (0..config.n_clients)
            .map(|client_idx| {
                let client = client.clone();
                let url = url.clone();
                let config = config.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    client_loop(&client, &url, client_idx, &config, &shared, deadline).await
                })
            })
            .collect();
        Load {
            config,
            shared,
            started,
            tasks,
        }
    }

    /// Number of events acknowledged so far.
    pub fn n_acked(&self) -> usize {
        self.shared.n_events_acked.load(Ordering::Relaxed) as usize
    }

    pub fn counts(&self) -> LoadCounts {
        self.shared.counts()
    }

    /// Stops the clients (each finishes its current request) and returns what they saw.
    pub async fn stop(self) -> LoadReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.finish().await
    }

    /// Waits until the clients end by themselves (every prepared body sent, or the time limit
    /// passed) and returns what they saw. Panics when a client panicked.
    pub async fn finish(mut self) -> LoadReport {
        let mut ack_latencies_us = Vec::new();
        for task in std::mem::take(&mut self.tasks) {
            match task.await {
                Ok(latencies) => ack_latencies_us.extend(latencies),
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Err(error) => panic!("load client task failed: {error}"),
            }
        }
        let elapsed = self.started.elapsed();
        ack_latencies_us.sort_unstable();
        let complete = match &self.config.requests {
            Requests::Events(_) => false,
            Requests::Bodies(prepared) => {
                self.shared.next_body.load(Ordering::SeqCst) >= prepared.bodies.len()
                    && self
                        .config
                        .time_limit
                        .is_none_or(|limit| self.started.elapsed() < limit)
            }
        };
        let acked_events = std::mem::take(&mut *self.shared.acked.lock().expect("acked lock"));
        let acked: BTreeSet<String> = acked_events.iter().map(|event| event.id.clone()).collect();
        assert_eq!(
            acked.len(),
            acked_events.len(),
            "an event id was acknowledged twice: the load is broken"
        );
        LoadReport {
            acked,
            acked_events,
            counts: self.shared.counts(),
            ack_latencies_us,
            elapsed,
            complete,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One request: its body, its events' ids and streams (generated events only), and whether it
/// may be sent again after a refusal.
struct Request {
    json: String,
    n_events: usize,
    events: Vec<(String, String)>,
    repeatable: bool,
    check_answer: bool,
}

/// The ids and streams a client gives its generated events.
struct EventNames {
    event_idx: u64,
    stream_idx: usize,
}

impl EventNames {
    fn request(&mut self, client_idx: usize, generated: &GeneratedEvents) -> Request {
        let n_events = fastrand::usize(generated.events_per_request.clone());
        let mut events = Vec::with_capacity(n_events);
        let mut values = Vec::with_capacity(n_events);
        for _ in 0..n_events {
            let id = format!("{}-{client_idx}-{}", generated.prefix, self.event_idx);
            self.event_idx += 1;
            let mut event = test_event(&id);
            let stream = if generated.streams.is_empty() {
                runnel_agent::http::DEFAULT_STREAM.to_owned()
            } else {
                let stream = generated.streams[self.stream_idx % generated.streams.len()].clone();
                self.stream_idx += 1;
                event["stream"] = Value::String(stream.clone());
                stream
            };
            values.push(event);
            events.push((id, stream));
        }
        Request {
            json: Value::Array(values).to_string(),
            n_events,
            events,
            repeatable: false,
            check_answer: true,
        }
    }
}

/// Asserts that a 200 answer counts every event of the request, and that a drop policy dropped
/// the request's events all together or not at all; returns whether they were dropped.
fn check_answer(answer: &[u8], n_events: usize) -> bool {
    let body: Value = serde_json::from_slice(answer)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(answer).into_owned()));
    let n_dropped = body["dropped"].as_u64().unwrap_or(0);
    assert_eq!(
        body["accepted"].as_u64(),
        Some(n_events as u64),
        "200 answer does not count the events: {body}"
    );
    assert!(
        n_dropped == 0 || n_dropped == n_events as u64,
        "200 answer drops part of a request: {body}"
    );
    n_dropped > 0
}

/// Sends `json` and reads the whole answer: the acknowledgement is complete when the client has
/// it.
async fn post(
    client: &reqwest::Client,
    url: &str,
    json: String,
) -> Result<(u16, Vec<u8>), reqwest::Error> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(json)
        .send()
        .await?;
    let status = response.status().as_u16();
    let answer = response.bytes().await?;
    Ok((status, answer.to_vec()))
}

async fn pause(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

/// One client: sends requests until stopped, out of prepared bodies, or past `deadline`;
/// returns the latencies of its acknowledged requests in microseconds.
async fn client_loop(
    client: &reqwest::Client,
    url: &str,
    client_idx: usize,
    config: &LoadConfig,
    shared: &Shared,
    deadline: Option<Instant>,
) -> Vec<u64> {
    let mut ack_latencies_us = Vec::new();
    let mut names = EventNames {
        event_idx: 0,
        stream_idx: client_idx,
    };
    'requests: loop {
        let request = match &config.requests {
            Requests::Events(generated) => names.request(client_idx, generated),
            Requests::Bodies(prepared) => {
                let body_idx = shared.next_body.fetch_add(1, Ordering::Relaxed);
                let Some(body) = prepared.bodies.get(body_idx) else {
                    break;
                };
                Request {
                    json: body.json.clone(),
                    n_events: body.n_events,
                    events: Vec::new(),
                    repeatable: true,
                    check_answer: prepared.check_answers,
                }
            }
        };
        let max_transport_retries = match &config.requests {
            Requests::Bodies(prepared) => prepared.max_transport_retries,
            Requests::Events(_) => 0,
        };
        let mut n_transport_retries = 0;
        loop {
            if shared.stop.load(Ordering::SeqCst)
                || deadline.is_some_and(|deadline| Instant::now() >= deadline)
            {
                break 'requests;
            }
            shared
                .n_offered
                .fetch_add(request.n_events as u64, Ordering::Relaxed);
            let sent = Instant::now();
            let (status, answer) = match post(client, url, request.json.clone()).await {
                Ok(outcome) => outcome,
                Err(error) => {
                    let failure = format!("POST {url}: {error:#}");
                    if config.on_transport_error == OnTransportError::Panic {
                        panic!("{failure}");
                    }
                    shared.fail(&shared.n_transport_errors, failure);
                    if config.on_transport_error == OnTransportError::StopClient {
                        break 'requests;
                    }
                    pause(config.pause_after_failure).await;
                    n_transport_retries += 1;
                    if request.repeatable && n_transport_retries <= max_transport_retries {
                        continue;
                    }
                    continue 'requests;
                }
            };
            let latency = sent.elapsed();
            let acked = if request.check_answer {
                status == 200
            } else {
                (200..300).contains(&status)
            };
            if acked {
                let dropped = request.check_answer && check_answer(&answer, request.n_events);
                shared
                    .n_events_acked
                    .fetch_add(request.n_events as u64, Ordering::Relaxed);
                shared.n_requests_acked.fetch_add(1, Ordering::Relaxed);
                shared
                    .json_bytes_acked
                    .fetch_add(request.json.len() as u64, Ordering::Relaxed);
                if !request.events.is_empty() {
                    shared.acked.lock().expect("acked lock").extend(
                        request.events.into_iter().map(|(id, stream)| AckedEvent {
                            id,
                            stream,
                            dropped_in_answer: dropped,
                        }),
                    );
                }
                ack_latencies_us.push(latency.as_micros() as u64);
                pause(config.pause_between_requests).await;
                continue 'requests;
            }
            if status == 503 {
                shared.n_busy.fetch_add(1, Ordering::Relaxed);
                pause(config.pause_after_busy).await;
                if request.repeatable {
                    continue;
                }
                continue 'requests;
            }
            let failure = format!("HTTP {status}: {}", String::from_utf8_lossy(&answer));
            let counted = match config.other_answers {
                OtherAnswers::Panic => false,
                OtherAnswers::CountServerErrors => status >= 500,
                OtherAnswers::CountAll => true,
            };
            assert!(counted, "agent answered {failure} to valid events");
            shared.fail(&shared.n_failed, failure);
            pause(config.pause_after_failure).await;
            continue 'requests;
        }
    }
    ack_latencies_us
}
