//! The uplink driver: one QUIC connection to the aggregator, batches from the buffer, acks back.
//!
//! The decisions (when a batch is due, the in-flight window, what an ack allows us to delete)
//! are made by [`runnel_common::session::UplinkSession`]; this module only does the I/O:
//! connect, handshake, read the buffer, send frames, wait for acks, reconnect with backoff.
//!
//! Events leave the buffer only after an ack that says they are durable at the aggregator. A
//! connection that fails for any reason leaves them in place; the next connection starts from
//! the aggregator's high-water mark, so nothing is lost and the aggregator drops the replays.
//!
//! On the fleet protocol (2) the control stream is read concurrently with everything else: a
//! config push can arrive at any time. It is applied by [`crate::control`] in a task of its own
//! (batches keep flowing meanwhile), answered with a `ConfigResult`, and followed at once by a
//! `Status`. A `Status` also goes out every heartbeat interval; on protocol 1 a `Heartbeat`.
//!
//! With several aggregators (`uplink.aggregators`), which one to dial, when, and when to move
//! is decided by [`failover::Failover`] over the agent's [`rendezvous`] order; this module feeds
//! it what happened, dials what it says, and probes the first choice (a QUIC handshake, closed
//! at once) when it asks. Leaving for the first choice drains the in-flight batches first, as a
//! shutdown does. Every connection, to whichever aggregator, starts its chain from the higher of
//! that aggregator's high-water mark in its Welcome and the buffer's shipped mark (what some
//! aggregator acknowledged), which the agent names in a `Resume` on protocol 4: a move never
//! skips an event, and an aggregator that never saw this agent does not wait for batches that
//! were acknowledged elsewhere. An aggregator on protocol 3 gets no `Resume` and starts at its
//! mark, as before.

mod failover;
pub mod rendezvous;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::{Fuse, FusedFuture, FutureExt};
use futures::stream::{FuturesUnordered, StreamExt};
use runnel_common::limits::{MAX_CONTROL_FRAME_BYTES, MAX_FRAME_BYTES};
use runnel_common::session::{BatchDue, BufferHead, ControlAction, UplinkLimits, UplinkSession};
use runnel_common::wire::{
    AckMessage, AgentMessage, AggregatorMessage, BatchMessage, ComponentHealth, Compression, Hello,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Status,
};
use runnel_common::{batch, frame};
use runnel_config::UplinkConfig;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::buffer::{Buffer, Contents};
use crate::tls::Identity;
use failover::{Failover, FailoverConfig, Move, MoveReason};

/// How long to wait for in-flight acks when shutting down, so a clean stop does not resend.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

pub struct Uplink {
    pub config: UplinkConfig,
    pub identity: Identity,
    pub buffer: Buffer,
    pub labels: std::collections::BTreeMap<String, String>,
    /// What the uplink reports about itself, for `/v1/status`.
    pub state: Arc<UplinkState>,
    /// Applies config pushes; names the effective config in Hello and Status.
    pub control: Arc<crate::control::Control>,
}

/// Control frames read ahead of the main loop (a push is answered before the next is read).
const CONTROL_QUEUE_DEPTH: usize = 2;

/// Aborts a task when dropped: the control-stream reader ends with its connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The uplink's connection state and counters, written by the driver and read by the status
/// endpoint. Plain atomics: a reader may see one field updated before another, never a torn value.
#[derive(Debug, Default)]
pub struct UplinkState {
    /// This agent's aggregators in rendezvous order: the first is its first choice.
    order: Vec<String>,
    /// Index in `order` of the aggregator connected to or dialled now.
    target_idx: AtomicUsize,
    /// Moves to the next aggregator because the one in use was unreachable.
    n_failovers: AtomicU64,
    /// Returns to the first choice.
    n_failbacks: AtomicU64,
    /// Unix ms of the last move (0: none yet).
    last_move_unix_ms: AtomicI64,
    /// Why the uplink last moved, as logged.
    last_move: Mutex<Option<String>>,
    connected: AtomicBool,
    /// Unix ms of the current connection's Welcome (0: not connected).
    connected_since_unix_ms: AtomicI64,
    n_connects: AtomicU64,
    n_connection_failures: AtomicU64,
    n_batches_acked: AtomicU64,
    n_events_acked: AtomicU64,
    /// Unix ms of the last ack (0: none yet).
    last_ack_unix_ms: AtomicI64,
    /// Why the last connection failed, as logged.
    last_error: Mutex<Option<String>>,
}

/// A copy of [`UplinkState`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct UplinkSnapshot {
    pub connected: bool,
    pub connected_since_unix_ms: Option<i64>,
    pub n_connects: u64,
    pub n_connection_failures: u64,
    pub n_batches_acked: u64,
    pub n_events_acked: u64,
    pub last_ack_unix_ms: Option<i64>,
    pub last_error: Option<String>,
    /// Position of the aggregator in use in this agent's order: 1 is its first choice (0: not
    /// reported, an older agent).
    pub aggregator_choice: usize,
    /// Moves to the next aggregator because the one in use was unreachable for
    /// `uplink.failover_after_ms`.
    pub n_failovers: u64,
    /// Returns to the first choice after it was reachable for `uplink.failback_after_ms`.
    pub n_failbacks: u64,
    pub last_move_unix_ms: Option<i64>,
    /// Why the uplink last moved to another aggregator.
    pub last_move: Option<String>,
}

impl UplinkState {
    /// The state of an uplink that tries `order` (this agent's rendezvous order) in turn.
    pub fn new(order: Vec<String>) -> UplinkState {
        UplinkState {
            order,
            ..UplinkState::default()
        }
    }

    /// This agent's aggregators in the order it tries them.
    pub fn order(&self) -> &[String] {
        &self.order
    }

    /// The aggregator connected to or dialled now ("" without any).
    pub fn aggregator(&self) -> &str {
        self.order
            .get(self.target_idx.load(Ordering::Relaxed))
            .map_or("", String::as_str)
    }

    pub fn snapshot(&self) -> UplinkSnapshot {
        let nonzero = |ms: i64| (ms != 0).then_some(ms);
        UplinkSnapshot {
            aggregator_choice: self.target_idx.load(Ordering::Relaxed) + 1,
            n_failovers: self.n_failovers.load(Ordering::Relaxed),
            n_failbacks: self.n_failbacks.load(Ordering::Relaxed),
            last_move_unix_ms: nonzero(self.last_move_unix_ms.load(Ordering::Relaxed)),
            last_move: lock(&self.last_move).clone(),
            connected: self.connected.load(Ordering::Relaxed),
            connected_since_unix_ms: nonzero(self.connected_since_unix_ms.load(Ordering::Relaxed)),
            n_connects: self.n_connects.load(Ordering::Relaxed),
            n_connection_failures: self.n_connection_failures.load(Ordering::Relaxed),
            n_batches_acked: self.n_batches_acked.load(Ordering::Relaxed),
            n_events_acked: self.n_events_acked.load(Ordering::Relaxed),
            last_ack_unix_ms: nonzero(self.last_ack_unix_ms.load(Ordering::Relaxed)),
            last_error: lock(&self.last_error).clone(),
        }
    }

    fn on_target(&self, target_idx: usize) {
        self.target_idx.store(target_idx, Ordering::Relaxed);
    }

    fn on_move(&self, moved: &Move, why: String) {
        match moved.reason {
            MoveReason::Unreachable { .. } => &self.n_failovers,
            MoveReason::FirstChoiceBack { .. } => &self.n_failbacks,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.last_move_unix_ms
            .store(crate::now_unix_ms(), Ordering::Relaxed);
        *lock(&self.last_move) = Some(why);
    }

    fn on_connected(&self) {
        self.n_connects.fetch_add(1, Ordering::Relaxed);
        self.connected_since_unix_ms
            .store(crate::now_unix_ms(), Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }

    fn on_disconnected(&self, error: Option<&str>) {
        self.connected.store(false, Ordering::Relaxed);
        self.connected_since_unix_ms.store(0, Ordering::Relaxed);
        if let Some(error) = error {
            self.n_connection_failures.fetch_add(1, Ordering::Relaxed);
            *lock(&self.last_error) = Some(error.to_owned());
        }
    }

    fn on_ack(&self, n_events: u64) {
        self.n_batches_acked.fetch_add(1, Ordering::Relaxed);
        self.n_events_acked.fetch_add(n_events, Ordering::Relaxed);
        self.last_ack_unix_ms
            .store(crate::now_unix_ms(), Ordering::Relaxed);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: a panic while holding the lock leaves nothing half-done.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs until `shutdown` becomes true. Never returns an error: connection failures are logged
/// and retried with exponential backoff and jitter, on the aggregator [`Failover`] says.
pub async fn run(uplink: Uplink, mut shutdown: watch::Receiver<bool>) {
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut endpoint = match quinn::Endpoint::client(bind) {
        Ok(endpoint) => endpoint,
        Err(error) => {
            tracing::error!(%error, "cannot open a UDP socket for the uplink; nothing will be shipped");
            return;
        }
    };
    endpoint.set_default_client_config(uplink.identity.client_config.clone());
    let config = &uplink.config;
    let order = uplink.state.order().to_vec();
    if order.is_empty() {
        tracing::error!("the uplink has no aggregator to connect to; nothing will be shipped");
        return;
    }
    if order.len() > 1 {
        tracing::info!(
            agent_id = %uplink.identity.agent_id,
            order = order.join(", "),
            failover_after_ms = config.failover_after_ms,
            failback_after_ms = config.failback_after_ms,
            "several aggregators: this agent tries them in this order"
        );
    }
    let mut failover = Failover::new(
        order.len(),
        FailoverConfig {
            failover_after: Duration::from_millis(config.failover_after_ms),
            failback_after: Duration::from_millis(config.failback_after_ms),
            reconnect_min: Duration::from_millis(config.reconnect_min_ms),
            reconnect_max: Duration::from_millis(config.reconnect_max_ms),
            connect_timeout: Duration::from_millis(config.idle_timeout_ms),
        },
        fastrand::Rng::new(),
        Instant::now(),
    );
    let mut last_error: Option<String> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(failover.attempt_at().into()) => {}
            _ = stopped(&mut shutdown) => break,
        }
        let attempt = failover.begin_attempt(Instant::now());
        let address = order[attempt.target_idx].as_str();
        uplink.state.on_target(attempt.target_idx);
        if let Some(moved) = attempt.moved {
            log_move(&uplink.state, &order, &moved);
            last_error = None;
        }
        let result = tokio::select! {
            result = connection(&uplink, &endpoint, address, attempt.timeout, &mut failover, shutdown.clone()) => result,
            _ = stopped(&mut shutdown) => break,
        };
        match result {
            Ok(Ended::Shutdown) => break,
            Ok(Ended::Left) => {
                uplink.state.on_disconnected(None);
                last_error = None;
            }
            Err(error) if failover.is_leaving() => {
                // The connection being left for the first choice failed while it drained: its
                // unacknowledged batches go to the first choice.
                uplink.state.on_disconnected(None);
                tracing::debug!(
                    error = format!("{error:#}"),
                    aggregator = address,
                    "uplink connection ended while leaving it"
                );
            }
            Err(error) => {
                failover.on_failed(Instant::now());
                let delay = failover
                    .attempt_at()
                    .saturating_duration_since(Instant::now());
                let error = format!("{error:#}");
                uplink.state.on_disconnected(Some(&error));
                // A misconfigured or unreachable aggregator fails the same way on every retry:
                // warn on the first failure, when the reason changes, and every 10th retry.
                let n_failures = failover.n_failures();
                if n_failures == 1
                    || n_failures.is_multiple_of(10)
                    || last_error.as_deref() != Some(error.as_str())
                {
                    tracing::warn!(
                        error,
                        aggregator = address,
                        n_failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "uplink connection failed"
                    );
                } else {
                    tracing::debug!(error, n_failures, "uplink connection failed again");
                }
                last_error = Some(error);
            }
        }
    }
    uplink.state.on_disconnected(None);
    endpoint.close(0u32.into(), b"agent shutting down");
    endpoint.wait_idle().await;
}

/// Logs a move once, with the reason, and records it for the status.
fn log_move(state: &UplinkState, order: &[String], moved: &Move) {
    let (from, to) = (&order[moved.from_idx], &order[moved.to_idx]);
    let choice = moved.to_idx + 1;
    let n_choices = order.len();
    let why = match moved.reason {
        MoveReason::Unreachable { for_ms } => {
            let why = format!(
                "moved from {from} to {to} (choice {choice} of {n_choices}): {from} was \
                 unreachable for {for_ms} ms (uplink.failover_after_ms)"
            );
            tracing::warn!(
                from = %from,
                to = %to,
                choice,
                unreachable_ms = for_ms,
                "uplink moves to the next aggregator in its order: {why}"
            );
            why
        }
        MoveReason::FirstChoiceBack { for_ms } => {
            let why = format!(
                "returned from {from} to its first choice {to}: reachable again for {for_ms} ms \
                 (uplink.failback_after_ms)"
            );
            tracing::info!(
                from = %from,
                to = %to,
                reachable_ms = for_ms,
                "uplink returns to its first-choice aggregator: {why}"
            );
            why
        }
    };
    state.on_move(moved, why);
}

/// How a connection ended without an error.
enum Ended {
    /// The agent shuts down.
    Shutdown,
    /// Left (drained) for the first choice, which [`Failover`] found reachable again.
    Left,
}

/// QUIC application close code of a probe; the aggregator sees a connection that closed before
/// its Hello.
const PROBE_CLOSE_CODE: u32 = 0;

/// A probe: can a connection to `address` be made (QUIC handshake with mutual TLS) within
/// `timeout`? The connection is closed at once.
async fn probe(
    endpoint: &quinn::Endpoint,
    address: &str,
    server_name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let handshake = async {
        let addr = resolve(address).await?;
        let connection = endpoint
            .connect(addr, server_name)
            .with_context(|| format!("connect to {address} ({addr})"))?
            .await
            .with_context(|| format!("QUIC/TLS handshake with {address}"))?;
        connection.close(PROBE_CLOSE_CODE.into(), b"uplink probe");
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .with_context(|| format!("probe {address}: no handshake within {timeout:?}"))?
}

/// Connects to `address`: QUIC and TLS handshakes, the control stream, Hello and Welcome.
async fn establish(
    uplink: &Uplink,
    endpoint: &quinn::Endpoint,
    address: &str,
) -> anyhow::Result<(
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    runnel_common::wire::Welcome,
)> {
    let config = &uplink.config;
    let addr = resolve(address).await?;
    let connection = endpoint
        .connect(addr, &config.server_name)
        .with_context(|| format!("connect to {address} ({addr})"))?
        .await
        .with_context(|| format!("QUIC/TLS handshake with {address}"))?;
    let (mut control_send, mut control_recv) =
        connection.open_bi().await.context("open control stream")?;
    let hello = Hello {
        min_protocol_version: MIN_PROTOCOL_VERSION,
        max_protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        config_hash: uplink.control.current().hash.clone(),
        labels: uplink.labels.clone(),
        last_assigned_seq: uplink.buffer.contents().borrow().last_seq,
    };
    write_frame(
        &mut control_send,
        &AgentMessage::Hello(hello),
        MAX_CONTROL_FRAME_BYTES,
    )
    .await?;
    let welcome = match read_frame::<AggregatorMessage>(&mut control_recv, MAX_CONTROL_FRAME_BYTES)
        .await
        .context("read welcome")?
    {
        AggregatorMessage::Welcome(welcome) => welcome,
        AggregatorMessage::Refused { reason } => {
            anyhow::bail!("aggregator {address} refused this agent: {reason}")
        }
        AggregatorMessage::ConfigPush(_) => {
            anyhow::bail!("aggregator {address} sent a config push before its welcome")
        }
    };
    Ok((connection, control_send, control_recv, welcome))
}

/// One connection's life. Returns Ok only on shutdown or when it left for the first choice.
async fn connection(
    uplink: &Uplink,
    endpoint: &quinn::Endpoint,
    address: &str,
    timeout: Duration,
    failover: &mut Failover,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Ended> {
    let config = &uplink.config;
    let (connection, mut control_send, control_recv, welcome) =
        tokio::time::timeout(timeout, establish(uplink, endpoint, address))
            .await
            .with_context(|| format!("connect to {address}: no welcome within {timeout:?}"))??;
    let mut session = UplinkSession::new(UplinkLimits {
        max_in_flight_batches: config.max_in_flight_batches,
        max_batch_events: config.max_batch_events,
        max_batch_bytes: config.max_batch_bytes,
        max_batch_age: Duration::from_millis(config.max_batch_age_ms),
    });
    let heartbeat_interval_ms = welcome.heartbeat_interval_ms;
    let hwm = session.on_welcome(welcome).context("handshake")?;
    // Protocol 4: name what this agent no longer holds, before any batch, so an aggregator it
    // moved to (or back to) starts the chain there instead of waiting for batches that will
    // never come. Older aggregators start at their own mark, as before.
    let shipped_seq = uplink.buffer.shipped_seq().await?;
    if let Some(resume) = session.resume(shipped_seq) {
        write_frame(&mut control_send, &resume, MAX_CONTROL_FRAME_BYTES).await?;
    }
    let chain_start = session.dispatched_seq();
    let reconciled = uplink.buffer.reconcile(chain_start).await?;
    tracing::info!(
        agent_id = %uplink.identity.agent_id,
        aggregator = address,
        choice = failover.target_idx() + 1,
        high_water_mark = hwm,
        shipped_seq,
        chain_start,
        n_already_stored = reconciled.n_deleted,
        "uplink connected"
    );
    failover.on_connected(Instant::now());
    uplink.state.on_connected();

    // Fleet protocol: read control frames as they come. On protocol 1 the aggregator sends
    // nothing after its Welcome, and the stream is left alone.
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(CONTROL_QUEUE_DEPTH);
    let mut control_recv = control_recv;
    let _reader = session.is_fleet().then(|| {
        AbortOnDrop(tokio::spawn(async move {
            loop {
                let message =
                    read_frame::<AggregatorMessage>(&mut control_recv, MAX_CONTROL_FRAME_BYTES)
                        .await;
                let failed = message.is_err();
                if control_tx.send(message).await.is_err() || failed {
                    break;
                }
            }
        }))
    });
    let mut applies = FuturesUnordered::new();

    // A probe of the first choice, while connected to a later one.
    let first_choice = uplink.state.order()[0].as_str();
    let probe_timeout = Duration::from_millis(config.idle_timeout_ms);
    let probing = Fuse::terminated();
    tokio::pin!(probing);

    let mut contents_rx = uplink.buffer.contents();
    let mut shutdown = shutdown;
    let mut acks = FuturesUnordered::new();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(u64::from(
        heartbeat_interval_ms.max(1000),
    )));
    // Set when the connection drains: on shutdown, or to leave for the first choice.
    let mut draining: Option<(Instant, Ended)> = None;
    loop {
        let now = Instant::now();
        session.on_buffer_head(buffer_head(&contents_rx.borrow_and_update()), now);
        if draining.is_none() {
            while session.batch_due(now) == BatchDue::Now {
                let after_seq = session.dispatched_seq();
                let read = uplink
                    .buffer
                    .read_raw(after_seq, config.max_batch_events, config.max_batch_bytes)
                    .await?;
                let Some(read) = read else {
                    // Everything pending was removed from the buffer meanwhile.
                    let last_seq = contents_rx.borrow().last_seq;
                    session.on_batch_sent(last_seq, 0, now);
                    break;
                };
                let (last_seq, n_events) = (read.last_seq, read.n_events);
                // Aggregators on protocol 2 and later take a column-wise layout (half the bytes
                // of rows on clickstream events); older ones get rows as stored.
                let layout = session
                    .protocol_version()
                    .and_then(|v| Compression::for_protocol(v).columns_layout());
                // zstd is CPU work: off the async workers.
                let bytes = tokio::task::spawn_blocking(move || {
                    let batch = if let Some(layout) = layout {
                        let events: Vec<runnel_common::Event> =
                            postcard::from_bytes(&read.raw).context("decode buffered events")?;
                        batch::encode_columns(layout, after_seq, &events)?
                    } else {
                        batch::compress(after_seq, last_seq, n_events, &read.raw)?
                    };
                    anyhow::Ok(frame::encode(&BatchMessage::Batch(batch), MAX_FRAME_BYTES)?)
                })
                .await
                .context("batch encoder task")?
                .context("encode batch")?;
                session.on_batch_sent(last_seq, n_events, now);
                acks.push(send_batch(connection.clone(), bytes));
            }
        }
        let due_at = match session.batch_due(now) {
            BatchDue::At(at) if draining.is_none() => Some(at),
            _ => None,
        };
        if let Some((since, _)) = &draining
            && (session.n_in_flight() == 0 || since.elapsed() >= SHUTDOWN_GRACE)
        {
            let (_, ended) = draining.take().expect("draining was checked");
            let reason: &[u8] = match ended {
                Ended::Shutdown => b"agent shutting down",
                Ended::Left => b"agent returns to its first-choice aggregator",
            };
            connection.close(0u32.into(), reason);
            return Ok(ended);
        }
        let probe_at = failover
            .probe_at()
            .filter(|_| draining.is_none() && probing.is_terminated());
        let drained_at = draining.as_ref().map(|(since, _)| *since + SHUTDOWN_GRACE);
        tokio::select! {
            changed = contents_rx.changed() => changed.context("buffer stopped")?,
            _ = sleep_until(due_at) => {}
            _ = sleep_until(drained_at) => {}
            Some(ack) = acks.next() => {
                let ack = ack?;
                let acked = session.on_ack(&ack, Instant::now())?;
                uplink.buffer.delete_range(acked.after_seq, acked.last_seq).await?;
                uplink.state.on_ack(acked.n_events as u64);
                metrics::histogram!("runnel_agent_batch_round_trip_seconds")
                    .record(acked.round_trip.as_secs_f64());
                tracing::trace!(last_seq = acked.last_seq, n_events = acked.n_events, rtt_us = acked.round_trip.as_micros() as u64, "batch acknowledged");
            }
            _ = heartbeat.tick() => {
                let path = connection.stats().path;
                metrics::gauge!("runnel_agent_quic_rtt_seconds").set(path.rtt.as_secs_f64());
                metrics::counter!("runnel_agent_quic_lost_packets_total").absolute(path.lost_packets);
                metrics::counter!("runnel_agent_quic_sent_packets_total").absolute(path.sent_packets);
                if let Some(beat) = session.status_message(status(uplink).await) {
                    write_frame(&mut control_send, &beat, MAX_CONTROL_FRAME_BYTES).await?;
                }
            }
            Some(message) = control_rx.recv() => {
                let message = message.context("read control stream")?;
                match session.on_control(message).context("control stream")? {
                    ControlAction::ConfigPush(push) => {
                        tracing::info!(version = push.version, hash = %push.hash, n_files = push.files.len(), "config push received");
                        let control = Arc::clone(&uplink.control);
                        applies.push(tokio::spawn(async move { control.apply(push).await }));
                    }
                }
            }
            Some(result) = applies.next() => {
                let result = result.context("config apply task")?;
                if let Some(message) = session.config_result_message(result) {
                    write_frame(&mut control_send, &message, MAX_CONTROL_FRAME_BYTES).await?;
                }
                // Right after an apply, so the fleet registry sees the new hash at once.
                if let Some(beat) = session.status_message(status(uplink).await) {
                    write_frame(&mut control_send, &beat, MAX_CONTROL_FRAME_BYTES).await?;
                }
            }
            _ = sleep_until(probe_at) => {
                probing.set(probe(endpoint, first_choice, &config.server_name, probe_timeout).fuse());
            }
            result = &mut probing => {
                if let Err(error) = &result {
                    tracing::debug!(error = format!("{error:#}"), "first-choice aggregator not reachable yet");
                }
                if let Some(moved) = failover.on_probe(result.is_ok(), Instant::now()) {
                    log_move(&uplink.state, uplink.state.order(), &moved);
                    draining = Some((Instant::now(), Ended::Left));
                }
            }
            error = connection.closed() => return Err(anyhow::Error::new(error).context(format!("connection to {address} closed"))),
            _ = stopped(&mut shutdown), if draining.is_none() => {
                draining = Some((Instant::now(), Ended::Shutdown));
            }
        }
    }
}

/// How long a status waits for the buffer's oldest event before it reports the age as 0.
const STATUS_OLDEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent's status for the fleet registry.
async fn status(uplink: &Uplink) -> Status {
    let current = uplink.control.current();
    let contents_rx = uplink.buffer.contents();
    let contents = *contents_rx.borrow();
    let stats = uplink.buffer.stats();
    // A status without the age beats none: a failed or slow read reports 0 and says so.
    let (oldest_unshipped_age_ms, buffer_detail) =
        match tokio::time::timeout(STATUS_OLDEST_TIMEOUT, uplink.buffer.oldest()).await {
            Ok(Ok(Some(oldest))) => (
                u64::try_from(crate::now_unix_ms().saturating_sub(oldest.receive_time_ms))
                    .unwrap_or(0),
                String::new(),
            ),
            Ok(Ok(None)) => (0, String::new()),
            Ok(Err(error)) => (0, format!("oldest event unknown: {error:#}")),
            Err(_) => (
                0,
                "oldest event unknown: the buffer did not answer".to_owned(),
            ),
        };
    let buffer_alive = contents_rx.has_changed().is_ok();
    let config = &current.config;
    let mut sources = vec!["http".to_owned()];
    let mut sources_healthy = true;
    for mqtt in &config.mqtt {
        match uplink.control.source_health().get(&mqtt.name) {
            Some(state) if !state.healthy => {
                sources_healthy = false;
                sources.push(format!("mqtt:{} ({})", mqtt.name, state.detail));
            }
            _ => sources.push(format!("mqtt:{}", mqtt.name)),
        }
    }
    if config.mqtt_listener.enabled {
        sources.push("mqtt_listener".to_owned());
    }
    let uplink_state = uplink.state.snapshot();
    let components = vec![
        ComponentHealth {
            name: "buffer".into(),
            healthy: buffer_alive,
            detail: if buffer_alive {
                buffer_detail
            } else {
                "the buffer's writer thread has stopped".into()
            },
        },
        ComponentHealth {
            name: "pipeline".into(),
            healthy: true,
            detail: format!(
                "{} models, {} windows",
                config.models.len(),
                config.windows.len()
            ),
        },
        ComponentHealth {
            name: "sources".into(),
            healthy: sources_healthy,
            detail: sources.join(", "),
        },
        ComponentHealth {
            name: "uplink".into(),
            healthy: uplink_state.connected,
            detail: match (uplink_state.connected, uplink_state.aggregator_choice) {
                (true, choice) if choice > 1 => format!(
                    "on {} (choice {choice} of {}): {}",
                    uplink.state.aggregator(),
                    uplink.state.order().len(),
                    uplink_state.last_move.unwrap_or_default()
                ),
                _ => uplink_state.last_error.unwrap_or_default(),
            },
        },
    ];
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    Status {
        config_hash: current.hash.clone(),
        config_version: current.version,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        components,
        n_buffered_events: contents.n_events,
        buffered_bytes: contents.n_bytes,
        oldest_unshipped_age_ms,
        drops: stats.dropped_by_reason(),
        counters: std::collections::BTreeMap::from([
            ("events_appended".to_owned(), load(&stats.n_appended)),
            (
                "events_refused_full".to_owned(),
                load(&stats.n_refused_full),
            ),
            ("events_acked".to_owned(), uplink_state.n_events_acked),
            ("batches_acked".to_owned(), uplink_state.n_batches_acked),
            (
                "connection_failures".to_owned(),
                uplink_state.n_connection_failures,
            ),
            ("uplink_failovers".to_owned(), uplink_state.n_failovers),
            ("uplink_failbacks".to_owned(), uplink_state.n_failbacks),
            ("buffer_commits".to_owned(), load(&stats.n_commits)),
        ]),
    }
}

fn buffer_head(contents: &Contents) -> BufferHead {
    BufferHead {
        last_seq: contents.last_seq,
        avg_event_bytes: contents.n_bytes.checked_div(contents.n_events).unwrap_or(0) as usize,
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn send_batch(
    connection: quinn::Connection,
    bytes: Vec<u8>,
) -> anyhow::Result<runnel_common::wire::Ack> {
    let (mut send, mut recv) = connection.open_bi().await.context("open batch stream")?;
    send.write_all(&bytes).await.context("send batch")?;
    send.finish().context("finish batch stream")?;
    match read_frame::<AckMessage>(&mut recv, MAX_CONTROL_FRAME_BYTES)
        .await
        .context("read ack")?
    {
        AckMessage::Ack(ack) => Ok(ack),
    }
}

/// Resolves an address of `uplink.aggregator` or `uplink.aggregators`, on every connect: DNS may
/// change while the agent runs.
async fn resolve(aggregator: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(aggregator)
        .await
        .with_context(|| format!("resolve aggregator {aggregator:?} (uplink.aggregator or uplink.aggregators)"))?
        .next()
        .with_context(|| format!("aggregator {aggregator:?} (uplink.aggregator or uplink.aggregators) resolves to no address"))
}

pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
    max_bytes: usize,
) -> anyhow::Result<()> {
    let bytes = frame::encode(message, max_bytes)?;
    send.write_all(&bytes).await.context("write frame")?;
    Ok(())
}

pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max_bytes: usize,
) -> anyhow::Result<T> {
    let mut prefix = [0u8; frame::LENGTH_PREFIX_BYTES];
    recv.read_exact(&mut prefix)
        .await
        .context("read frame length")?;
    let n_bytes = frame::payload_len(prefix, max_bytes)?;
    let mut payload = vec![0u8; n_bytes];
    recv.read_exact(&mut payload)
        .await
        .context("read frame payload")?;
    Ok(frame::decode_payload(&payload)?)
}
