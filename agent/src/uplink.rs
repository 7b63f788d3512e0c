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

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
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
}

impl UplinkState {
    pub fn snapshot(&self) -> UplinkSnapshot {
        let nonzero = |ms: i64| (ms != 0).then_some(ms);
        UplinkSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            connected_since_unix_ms: nonzero(self.connected_since_unix_ms.load(Ordering::Relaxed)),
            n_connects: self.n_connects.load(Ordering::Relaxed),
            n_connection_failures: self.n_connection_failures.load(Ordering::Relaxed),
            n_batches_acked: self.n_batches_acked.load(Ordering::Relaxed),
            n_events_acked: self.n_events_acked.load(Ordering::Relaxed),
            last_ack_unix_ms: nonzero(self.last_ack_unix_ms.load(Ordering::Relaxed)),
            last_error: self.lock_last_error().clone(),
        }
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
            *self.lock_last_error() = Some(error.to_owned());
        }
    }

    fn on_ack(&self, n_events: u64) {
        self.n_batches_acked.fetch_add(1, Ordering::Relaxed);
        self.n_events_acked.fetch_add(n_events, Ordering::Relaxed);
        self.last_ack_unix_ms
            .store(crate::now_unix_ms(), Ordering::Relaxed);
    }

    fn lock_last_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // Plain data: a panic while holding the lock leaves nothing half-done.
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs until `shutdown` becomes true. Never returns an error: connection failures are logged
/// and retried with exponential backoff and jitter.
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
    let mut backoff = Backoff::new(
        uplink.config.reconnect_min_ms,
        uplink.config.reconnect_max_ms,
    );
    let mut last_error: Option<String> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let result = tokio::select! {
            result = connection(&uplink, &endpoint, &mut backoff, shutdown.clone()) => result,
            _ = stopped(&mut shutdown) => break,
        };
        match result {
            Ok(()) => break,
            Err(error) => {
                let delay = backoff.next_delay();
                let error = format!("{error:#}");
                uplink.state.on_disconnected(Some(&error));
                // A misconfigured or unreachable aggregator fails the same way on every retry:
                // warn on the first failure, when the reason changes, and every 10th retry.
                let n_failures = backoff.n_failures();
                if n_failures == 1
                    || n_failures.is_multiple_of(10)
                    || last_error.as_deref() != Some(error.as_str())
                {
                    tracing::warn!(
                        error,
                        aggregator = %uplink.config.aggregator,
                        n_failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "uplink connection failed"
                    );
                } else {
                    tracing::debug!(error, n_failures, "uplink connection failed again");
                }
                last_error = Some(error);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(&mut shutdown) => break,
                }
            }
        }
    }
    uplink.state.on_disconnected(None);
    endpoint.close(0u32.into(), b"agent shutting down");
    endpoint.wait_idle().await;
}

/// One connection's life. Returns Ok(()) only on shutdown.
async fn connection(
    uplink: &Uplink,
    endpoint: &quinn::Endpoint,
    backoff: &mut Backoff,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let config = &uplink.config;
    let addr = resolve(&config.aggregator).await?;
    let connecting = endpoint
        .connect(addr, &config.server_name)
        .with_context(|| format!("connect to {} ({addr})", config.aggregator))?;
    let connection =
        tokio::time::timeout(Duration::from_millis(config.idle_timeout_ms), connecting)
            .await
            .with_context(|| format!("connect to {}: timed out", config.aggregator))?
            .with_context(|| format!("QUIC/TLS handshake with {}", config.aggregator))?;

    let (mut control_send, control_recv) =
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
    let mut control_recv = control_recv;
    let welcome = match read_frame::<AggregatorMessage>(&mut control_recv, MAX_CONTROL_FRAME_BYTES)
        .await
        .context("read welcome")?
    {
        AggregatorMessage::Welcome(welcome) => welcome,
        AggregatorMessage::Refused { reason } => {
            anyhow::bail!("aggregator refused this agent: {reason}")
        }
        AggregatorMessage::ConfigPush(_) => {
            anyhow::bail!("aggregator sent a config push before its welcome")
        }
    };
    let mut session = UplinkSession::new(UplinkLimits {
        max_in_flight_batches: config.max_in_flight_batches,
        max_batch_events: config.max_batch_events,
        max_batch_bytes: config.max_batch_bytes,
        max_batch_age: Duration::from_millis(config.max_batch_age_ms),
    });
    let heartbeat_interval_ms = welcome.heartbeat_interval_ms;
    let hwm = session.on_welcome(welcome).context("handshake")?;
    let reconciled = uplink.buffer.reconcile(hwm).await?;
    tracing::info!(
        agent_id = %uplink.identity.agent_id,
        aggregator = %config.aggregator,
        high_water_mark = hwm,
        n_already_stored = reconciled.n_deleted,
        "uplink connected"
    );
    backoff.reset();
    uplink.state.on_connected();

    // Fleet protocol: read control frames as they come. On protocol 1 the aggregator sends
    // nothing after its Welcome, and the stream is left alone.
    let (control_tx, mut control_rx) = tokio::sync::mpsc::channel(CONTROL_QUEUE_DEPTH);
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

    let mut contents_rx = uplink.buffer.contents();
    let mut shutdown = shutdown;
    let mut acks = FuturesUnordered::new();
    let mut heartbeat = tokio::time::interval(Duration::from_millis(u64::from(
        heartbeat_interval_ms.max(1000),
    )));
    let mut draining_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        session.on_buffer_head(buffer_head(&contents_rx.borrow_and_update()), now);
        if draining_since.is_none() {
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
            BatchDue::At(at) if draining_since.is_none() => Some(at),
            _ => None,
        };
        if let Some(since) = draining_since
            && (session.n_in_flight() == 0 || since.elapsed() >= SHUTDOWN_GRACE)
        {
            connection.close(0u32.into(), b"agent shutting down");
            return Ok(());
        }
        tokio::select! {
            changed = contents_rx.changed() => changed.context("buffer stopped")?,
            _ = sleep_until(due_at) => {}
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
            error = connection.closed() => return Err(anyhow::Error::new(error).context("connection closed")),
            _ = stopped(&mut shutdown), if draining_since.is_none() => {
                draining_since = Some(Instant::now());
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
            detail: uplink_state.last_error.unwrap_or_default(),
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

async fn resolve(aggregator: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(aggregator)
        .await
        .with_context(|| format!("resolve uplink.aggregator = {aggregator:?}"))?
        .next()
        .with_context(|| format!("uplink.aggregator = {aggregator:?} resolves to no address"))
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

/// Exponential backoff with "equal jitter": half the delay fixed, half random, so a fleet that
/// lost its aggregator does not reconnect in lockstep.
struct Backoff {
    min_ms: u64,
    max_ms: u64,
    current_ms: u64,
    /// Failures since the last successful connection.
    n_failures: u64,
}

impl Backoff {
    fn new(min_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            min_ms,
            max_ms,
            current_ms: min_ms,
            n_failures: 0,
        }
    }

    fn next_delay(&mut self) -> Duration {
        self.n_failures += 1;
        let base = self.current_ms;
        self.current_ms = (self.current_ms.saturating_mul(2)).min(self.max_ms);
        let half = base / 2;
        Duration::from_millis(half + fastrand::u64(0..=half.max(1)))
    }

    fn reset(&mut self) {
        self.current_ms = self.min_ms;
        self.n_failures = 0;
    }

    fn n_failures(&self) -> u64 {
        self.n_failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut backoff = Backoff::new(100, 1000);
        let delays: Vec<u64> = (0..6)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert!((50..=100).contains(&delays[0]), "{delays:?}");
        assert!((100..=200).contains(&delays[1]), "{delays:?}");
        assert!(delays[5] <= 1000 && delays[5] >= 500, "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay().as_millis() <= 100);
    }
}
