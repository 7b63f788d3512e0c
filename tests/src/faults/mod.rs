//! Fault injection and the referee of the reliability suite (`tests/tests/reliability.rs`).
//!
//! [`FaultProxy`] is a UDP proxy that sits between agent and aggregator and, on the test's
//! command, drops a percentage of datagrams, delays them, reorders them, sends some twice, limits
//! the link's bandwidth, or cuts the link completely until it is healed. It sees opaque QUIC
//! datagrams and knows nothing of the protocol. The HTTP load ([`http_load`] on the shared
//! [`crate::load::Load`]) and [`MqttPublisher`] are sources that remember exactly which events
//! the agent (or the broker) acknowledged. The [`Referee`]
//! compares, by event id, what was acknowledged with what the aggregator stored (through SQL
//! only): lost = acknowledged but not stored, duplicated = stored more than once, and it prints
//! one summary line per scenario.
//!
//! Nothing here decides an outcome by timing: waits poll a condition with a deadline. The only
//! sleeps are the faults themselves (a datagram's delay, a client's pause after a 503).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub use crate::load::AckedEvent;
use crate::load::{GeneratedEvents, LoadConfig, OnTransportError, OtherAnswers, Requests};
use crate::{TestDir, http_client, poll_until, post_events, query_count, query_rows, test_event};

// ---------------------------------------------------------------------------------------------
// The proxy

/// Largest datagram the proxy relays. QUIC never sends more than 1500-ish bytes; this only
/// bounds the receive buffer.
const MAX_DATAGRAM_BYTES: usize = 65_535;

/// Most client addresses (agent UDP sockets) with an upstream socket of their own. Beyond it
/// datagrams of new clients are dropped and counted: a test has a handful of agents.
const MAX_CLIENTS: usize = 256;

/// Most datagrams waiting out a delay at once; more are dropped and counted (as a router's full
/// queue would), so a huge delay cannot grow memory without bound.
const MAX_DELAYED_DATAGRAMS: usize = 100_000;

/// With a bandwidth limit, a datagram that would wait longer than this behind the ones already
/// queued on the link is dropped (tail drop), as a router with a bounded queue does.
const MAX_LINK_QUEUE_DELAY: Duration = Duration::from_millis(250);

/// What the proxy does to datagrams, in both directions. `Faults::default()` is a clean link.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Drop every datagram: the link is cut.
    pub cut: bool,
    /// Percentage of datagrams dropped at random, each direction independently.
    pub drop_percent: f64,
    /// Percentage of datagrams sent twice (the copy gets its own delay).
    pub duplicate_percent: f64,
    /// Fixed one-way delay in milliseconds.
    pub delay_ms: u64,
    /// Random extra one-way delay, 0 to this many milliseconds per datagram, so datagrams
    /// overtake each other.
    pub jitter_ms: u64,
    /// Percentage of datagrams held back `reorder_hold_ms` longer, so later ones overtake them.
    pub reorder_percent: f64,
    pub reorder_hold_ms: u64,
    /// Link capacity in bytes per second and direction (None: unlimited).
    pub bandwidth_bytes_per_s: Option<u64>,
}

impl Faults {
    /// A cut link.
    pub fn cut() -> Faults {
        Faults {
            cut: true,
            ..Faults::default()
        }
    }

    /// The faults as `key=value` words for a summary line ("clean" when there are none).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if self.cut {
            out.push_str("cut ");
        }
        for (key, value, unit) in [
            ("drop", self.drop_percent, "%"),
            ("duplicate", self.duplicate_percent, "%"),
            ("reorder", self.reorder_percent, "%"),
        ] {
            if value > 0.0 {
                let _ = write!(out, "{key}={value}{unit} ");
            }
        }
        for (key, value) in [
            ("delay_ms", self.delay_ms),
            ("jitter_ms", self.jitter_ms),
            ("reorder_hold_ms", self.reorder_hold_ms),
        ] {
            if value > 0 {
                let _ = write!(out, "{key}={value} ");
            }
        }
        if let Some(rate) = self.bandwidth_bytes_per_s {
            let _ = write!(out, "bandwidth={rate}B/s ");
        }
        if out.is_empty() {
            "clean".to_owned()
        } else {
            out.trim_end().to_owned()
        }
    }
}

/// What the proxy did so far, over both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub n_received: u64,
    /// Datagrams sent on (a duplicate counts twice).
    pub n_sent: u64,
    pub n_dropped_random: u64,
    pub n_dropped_cut: u64,
    /// Tail drops of the bandwidth limit's queue, and drops over `MAX_DELAYED_DATAGRAMS`.
    pub n_dropped_queue: u64,
    pub n_duplicated: u64,
    /// Datagrams sent later than they arrived.
    pub n_delayed: u64,
    /// Client addresses seen (one upstream socket each).
    pub n_clients: u64,
}

#[derive(Default)]
struct Counters {
    n_received: AtomicU64,
    n_sent: AtomicU64,
    n_dropped_random: AtomicU64,
    n_dropped_cut: AtomicU64,
    n_dropped_queue: AtomicU64,
    n_duplicated: AtomicU64,
    n_delayed: AtomicU64,
    n_clients: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Agent to aggregator.
    Up = 0,
    /// Aggregator to agent.
    Down = 1,
}

struct Shared {
    faults: Mutex<Faults>,
    counters: Counters,
    n_delayed_now: AtomicUsize,
    /// Per direction: when the bandwidth-limited link is free again.
    link_free_at: Mutex<[Instant; 2]>,
    /// The return tasks (one per client), aborted with the proxy.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Where a datagram goes: upstream on the client's own connected socket, or back to the client
/// from the listening socket.
#[derive(Clone)]
enum Target {
    Upstream(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, SocketAddr),
}

impl Target {
    async fn send(&self, datagram: &[u8]) {
        // UDP: a send that fails (the aggregator is down, ICMP port unreachable came back) is a
        // lost datagram, which QUIC handles. Nothing to do about it here.
        let _ = match self {
            Target::Upstream(socket) => socket.send(datagram).await,
            Target::Client(socket, addr) => socket.send_to(datagram, addr).await,
        };
    }
}

/// A fault-injecting UDP proxy. Agents connect to [`FaultProxy::addr`]; each agent socket gets
/// its own upstream socket, so the aggregator sees one peer per agent, as without the proxy.
/// Stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and relays to `upstream` (the aggregator's ingest).
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listen = Arc::new(
            UdpSocket::bind(("127.0.0.1", 0))
                .await
                .expect("bind the proxy's UDP socket"),
        );
        let addr = listen.local_addr().expect("proxy address");
        let now = Instant::now();
        let shared = Arc::new(Shared {
            faults: Mutex::new(Faults::default()),
            counters: Counters::default(),
            n_delayed_now: AtomicUsize::new(0),
            link_free_at: Mutex::new([now, now]),
            tasks: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(relay_up(listen, upstream, shared.clone()));
        FaultProxy {
            addr,
            upstream,
            shared,
            task,
        }
    }

    /// The address agents send to instead of the aggregator's.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Replaces the faults; datagrams already delayed keep their schedule (but a cut drops them).
    pub fn set(&self, faults: Faults) {
        *self.shared.faults.lock().expect("faults lock") = faults;
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults.lock().expect("faults lock").clone()
    }

    /// Cuts the link completely (both directions), keeping the other faults for after the heal.
    pub fn cut(&self) {
        self.shared.faults.lock().expect("faults lock").cut = true;
    }

    /// Ends a cut.
    pub fn heal(&self) {
        self.shared.faults.lock().expect("faults lock").cut = false;
    }

    /// Back to a clean link.
    pub fn clear(&self) {
        self.set(Faults::default());
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProxyStats {
            n_received: get(&c.n_received),
            n_sent: get(&c.n_sent),
            n_dropped_random: get(&c.n_dropped_random),
            n_dropped_cut: get(&c.n_dropped_cut),
            n_dropped_queue: get(&c.n_dropped_queue),
            n_duplicated: get(&c.n_duplicated),
            n_delayed: get(&c.n_delayed),
            n_clients: get(&c.n_clients),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        for task in self.shared.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
    }
}

/// Agent -> aggregator: reads the listening socket, creates an upstream socket per new client.
async fn relay_up(listen: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
    loop {
        let Ok((n, client)) = listen.recv_from(&mut buf).await else {
            // Errors on an unconnected UDP socket are transient (ICMP reports): keep going.
            continue;
        };
        shared.counters.n_received.fetch_add(1, Ordering::Relaxed);
        let socket = match clients.get(&client) {
            Some(socket) => socket.clone(),
            None => {
                if clients.len() >= MAX_CLIENTS {
                    shared
                        .counters
                        .n_dropped_queue
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let socket = match UdpSocket::bind(("127.0.0.1", 0)).await {
                    Ok(socket) => socket,
                    Err(error) => panic!("bind an upstream socket for {client}: {error}"),
                };
                socket.connect(upstream).await.unwrap_or_else(|error| {
                    panic!("connect upstream socket to {upstream}: {error}")
                });
                let socket = Arc::new(socket);
                clients.insert(client, socket.clone());
                shared.counters.n_clients.fetch_add(1, Ordering::Relaxed);
                let task = tokio::spawn(relay_down(
                    socket.clone(),
                    listen.clone(),
                    client,
                    shared.clone(),
                ));
                shared.tasks.lock().expect("tasks lock").push(task);
                socket
            }
        };
        dispatch(&shared, Direction::Up, &buf[..n], Target::Upstream(socket)).await;
    }
}

/// Aggregator -> one agent.
async fn relay_down(
    upstream: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM_BYTES];
    loop {
        // A connected UDP socket reports ICMP port unreachable (aggregator down) as an error on
        // the next receive: not a reason to stop relaying.
        let Ok(n) = upstream.recv(&mut buf).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        shared.counters.n_received.fetch_add(1, Ordering::Relaxed);
        dispatch(
            &shared,
            Direction::Down,
            &buf[..n],
            Target::Client(listen.clone(), client),
        )
        .await;
    }
}

fn chance(percent: f64) -> bool {
    percent > 0.0 && fastrand::f64() * 100.0 < percent
}

/// Applies the current faults to one datagram: drops it, or sends it (and maybe a copy) now or
/// after its delay.
async fn dispatch(shared: &Arc<Shared>, direction: Direction, datagram: &[u8], target: Target) {
    let faults = shared.faults.lock().expect("faults lock").clone();
    let counters = &shared.counters;
    if faults.cut {
        counters.n_dropped_cut.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if chance(faults.drop_percent) {
        counters.n_dropped_random.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let n_copies = if chance(faults.duplicate_percent) {
        counters.n_duplicated.fetch_add(1, Ordering::Relaxed);
        2
    } else {
        1
    };
    for _ in 0..n_copies {
        let mut delay = Duration::from_millis(faults.delay_ms);
        if faults.jitter_ms > 0 {
            delay += Duration::from_millis(fastrand::u64(0..=faults.jitter_ms));
        }
        if chance(faults.reorder_percent) {
            delay += Duration::from_millis(faults.reorder_hold_ms);
        }
        let now = Instant::now();
        let mut send_at = now + delay;
        if let Some(rate) = faults.bandwidth_bytes_per_s.filter(|rate| *rate > 0) {
            let mut free_at = shared.link_free_at.lock().expect("link lock");
            let slot = &mut free_at[direction as usize];
            let start = send_at.max(*slot);
            if start.saturating_duration_since(send_at) > MAX_LINK_QUEUE_DELAY {
                counters.n_dropped_queue.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let transmit =
                Duration::from_nanos((datagram.len() as u64).saturating_mul(1_000_000_000) / rate);
            *slot = start + transmit;
            send_at = *slot;
        }
        if send_at <= now {
            target.send(datagram).await;
            counters.n_sent.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if shared.n_delayed_now.fetch_add(1, Ordering::Relaxed) >= MAX_DELAYED_DATAGRAMS {
            shared.n_delayed_now.fetch_sub(1, Ordering::Relaxed);
            counters.n_dropped_queue.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counters.n_delayed.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let target = target.clone();
        let datagram = datagram.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep_until(send_at.into()).await;
            // A datagram on the wire when the link is cut is lost with it.
            if shared.faults.lock().expect("faults lock").cut {
                shared
                    .counters
                    .n_dropped_cut
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                target.send(&datagram).await;
                shared.counters.n_sent.fetch_add(1, Ordering::Relaxed);
            }
            shared.n_delayed_now.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP load with streams, tolerant of every refusal

/// The suite's HTTP load ([`crate::load`]): `n_clients` clients posting 1 to 20 events per request
/// with ids `<prefix>-<client>-<n>`, each event on the next of `streams`. Unlike
/// [`LoadConfig::events`] it takes any refusal (503, 500 from a failed commit, a dead agent) as
/// "not acknowledged", pauses 100 ms and carries on; only an answer that is neither 2xx nor 5xx
/// fails the test.
pub fn http_load(n_clients: usize, prefix: &str, streams: &[&str]) -> LoadConfig {
    assert!(!streams.is_empty(), "an HTTP load needs a stream");
    let pause_after_refusal = Duration::from_millis(100);
    LoadConfig {
        requests: Requests::Events(GeneratedEvents {
            prefix: prefix.to_owned(),
            streams: streams.iter().map(|s| (*s).to_owned()).collect(),
            events_per_request: 1..=20,
        }),
        pause_after_busy: pause_after_refusal,
        pause_after_failure: pause_after_refusal,
        on_transport_error: OnTransportError::Continue,
        other_answers: OtherAnswers::CountServerErrors,
        ..LoadConfig::events(n_clients, prefix)
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT QoS 1 publisher that remembers what was acknowledged

#[derive(Debug, Default)]
struct PublisherState {
    /// Message ids handed to the client, not yet sent (the event loop sends them in order).
    queued: VecDeque<String>,
    /// Packet id -> message id, sent and not yet acknowledged.
    in_flight: HashMap<u16, String>,
    /// Message ids the peer acknowledged (PUBACK), in order.
    acked: Vec<String>,
    n_published: usize,
    connected: bool,
    /// The event loop's error: the connection is gone and this publisher is finished.
    error: Option<String>,
}

/// An MQTT 3.1.1 QoS 1 publisher (clean session) that records which messages the peer
/// acknowledged with a PUBACK. The peer is the agent's own listener (a PUBACK there means
/// committed to the buffer) or a broker. It does not reconnect: when the connection fails it is
/// finished, and what it had not seen acknowledged was never acknowledged.
pub struct MqttPublisher {
    client: rumqttc::AsyncClient,
    state: Arc<Mutex<PublisherState>>,
    task: JoinHandle<()>,
}

impl MqttPublisher {
    /// Connects and waits for the CONNACK (at most `timeout`).
    pub async fn connect(
        host: &str,
        port: u16,
        client_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<MqttPublisher> {
        use rumqttc::{Event, Outgoing, Packet};
        let mut options = rumqttc::MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(100)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let state = Arc::new(Mutex::new(PublisherState::default()));
        let loop_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let mut state = loop_state.lock().expect("publisher lock");
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => state.connected = true,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let id = state
                            .queued
                            .pop_front()
                            .expect("a publish was sent that the test did not queue");
                        state.in_flight.insert(pkid, id);
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(id) = state.in_flight.remove(&ack.pkid) {
                            state.acked.push(id);
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        state.error = Some(error.to_string());
                        return;
                    }
                }
            }
        });
        let publisher = MqttPublisher {
            client,
            state,
            task,
        };
        poll_until(timeout, || async {
            let state = publisher.state.lock().expect("publisher lock");
            if let Some(error) = &state.error {
                anyhow::bail!("connection failed: {error}");
            }
            anyhow::ensure!(state.connected, "no CONNACK yet");
            Ok(())
        })
        .await
        .with_context(|| format!("MQTT publisher {client_id} to {host}:{port}"))?;
        Ok(publisher)
    }

    /// Hands one QoS 1 message to the client without waiting. Returns false when the client's
    /// queue is full (try again later) or the connection is gone (see [`MqttPublisher::failed`]).
    /// Call from one task at a time: ids are matched to packets in order.
    pub fn try_publish(&self, topic: &str, id: &str, payload: Vec<u8>) -> bool {
        let mut state = self.state.lock().expect("publisher lock");
        if state.error.is_some() {
            return false;
        }
        // Queue the id first: the event loop may send the packet before try_publish returns.
        state.queued.push_back(id.to_owned());
        match self
            .client
            .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => {
                state.n_published += 1;
                true
            }
            Err(_) => {
                state.queued.pop_back();
                false
            }
        }
    }

    pub fn failed(&self) -> Option<String> {
        self.state.lock().expect("publisher lock").error.clone()
    }

    pub fn n_acked(&self) -> usize {
        self.state.lock().expect("publisher lock").acked.len()
    }

    pub fn n_published(&self) -> usize {
        self.state.lock().expect("publisher lock").n_published
    }

    /// Message ids acknowledged so far (each once).
    pub fn acked(&self) -> Vec<String> {
        let state = self.state.lock().expect("publisher lock");
        let distinct: BTreeSet<&String> = state.acked.iter().collect();
        assert_eq!(
            distinct.len(),
            state.acked.len(),
            "a message id was acknowledged twice: the publisher is broken"
        );
        state.acked.clone()
    }

    /// Waits until every message handed over was acknowledged, or the connection failed.
    pub async fn wait_all_acked(&self, timeout: Duration) -> anyhow::Result<()> {
        poll_until(timeout, || async {
            let state = self.state.lock().expect("publisher lock");
            if let Some(error) = &state.error {
                anyhow::bail!("publisher failed: {error}");
            }
            anyhow::ensure!(
                state.acked.len() == state.n_published,
                "{} of {} acknowledged",
                state.acked.len(),
                state.n_published
            );
            Ok(())
        })
        .await
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A telemetry payload whose `event_id` is the message id.
pub fn telemetry_payload(id: &str, n: usize) -> Vec<u8> {
    json!({"event_id": id, "msg_id": id, "temp": 20.0 + (n % 10) as f64 / 2.0})
        .to_string()
        .into_bytes()
}

/// Publishes `<prefix><n>` messages to `<topic_root>/d-<n % 4>/telemetry` at about
/// `n_per_s`, until stopped or the publisher fails. Returns how many it handed over.
pub struct MqttStream {
    stop: Arc<AtomicBool>,
    task: JoinHandle<usize>,
}

impl MqttStream {
    pub fn start(
        publisher: Arc<MqttPublisher>,
        topic_root: &str,
        prefix: &str,
        first_idx: usize,
        n_per_s: u64,
    ) -> MqttStream {
        /// Messages per tick; the tick interval follows from the rate.
        const PER_TICK: u64 = 4;
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            let topic_root = topic_root.to_owned();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut msg_idx = first_idx;
                let mut tick = tokio::time::interval(Duration::from_micros(
                    1_000_000 * PER_TICK / n_per_s.max(1),
                ));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                'ticks: while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    for _ in 0..PER_TICK {
                        let id = format!("{prefix}{msg_idx:07}");
                        let topic = format!("{topic_root}/d-{}/telemetry", msg_idx % 4);
                        if !publisher.try_publish(&topic, &id, telemetry_payload(&id, msg_idx)) {
                            if publisher.failed().is_some() {
                                break 'ticks;
                            }
                            // The client's queue is full: skip to the next tick.
                            continue 'ticks;
                        }
                        msg_idx += 1;
                    }
                }
                msg_idx - first_idx
            })
        };
        MqttStream { stop, task }
    }

    /// Stops publishing; returns the number of messages handed over.
    pub async fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("MQTT stream task panicked")
    }
}

// ---------------------------------------------------------------------------------------------
// Probes: how long until delivery resumed

/// Most time delivery may take to resume after a fault ended. Generous on purpose: the figure
/// is measured and printed; this only catches "never", not "slow".
pub const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// A probe's outcome: the probe ids the agent acknowledged (all belong to the referee) and the
/// time from the fault's end until one acknowledged after it was stored.
#[derive(Debug, Clone)]
pub struct Probe {
    pub acked: Vec<AckedEvent>,
    pub recovered_in: Duration,
}

/// Stream of probe events.
pub const PROBE_STREAM: &str = "probe";

/// Measures recovery: posts a probe event (stream [`PROBE_STREAM`], id `<id_prefix>-<n>`) until
/// the agent acknowledges one without dropping it, then waits until it is stored. The agent ships
/// in sequence order, so a stored probe also means everything acknowledged before it was shipped.
/// Fails after `timeout`.
pub async fn probe_recovery(
    http: SocketAddr,
    query_addr: SocketAddr,
    id_prefix: &str,
    fault_ended: Instant,
    timeout: Duration,
) -> anyhow::Result<Probe> {
    let client = http_client();
    let deadline = fault_ended + timeout;
    let mut acked = Vec::new();
    let mut last = String::new();
    let mut probe_idx = 0usize;
    let stored_id = loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no probe acknowledged within {timeout:?} after the fault ended; last answer: {last}"
        );
        let id = format!("{id_prefix}-{probe_idx}");
        probe_idx += 1;
        let mut event = test_event(&id);
        event["stream"] = Value::String(PROBE_STREAM.to_owned());
        match post_events(&client, http, &[event]).await {
            Ok(outcome) if outcome.status == 200 => {
                let dropped = outcome.body["dropped"].as_u64().unwrap_or(0) > 0;
                acked.push(AckedEvent {
                    id: id.clone(),
                    stream: PROBE_STREAM.to_owned(),
                    dropped_in_answer: dropped,
                });
                if !dropped {
                    break id;
                }
                last = format!("200 but dropped: {}", outcome.body);
            }
            Ok(outcome) => last = format!("HTTP {}: {}", outcome.status, outcome.body),
            Err(error) => last = format!("{error:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sql = format!("SELECT count(*) FROM events WHERE event_id = '{stored_id}'");
    let remaining = deadline.saturating_duration_since(Instant::now());
    poll_until(remaining, || async {
        let n = query_count(query_addr, &sql).await?;
        anyhow::ensure!(n > 0, "probe {stored_id} not stored yet");
        Ok(())
    })
    .await
    .with_context(|| format!("probe {stored_id} acknowledged but not stored within {timeout:?}"))?;
    Ok(Probe {
        acked,
        recovered_in: fault_ended.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------------
// The referee

/// Environment variable: when set to a file path, every summary line is appended to that file
/// too (the long run's figures for docs/RELIABILITY.md).
pub const SUMMARY_FILE_ENV: &str = "RUNNEL_RELIABILITY_SUMMARY";

/// Rows per page when reading stored ids: below the query API's default `max_result_rows`, and
/// small enough that the aggregator's sort for one page stays within its query memory limit.
const STORED_PAGE_ROWS: usize = 20_000;

/// Counts, by event id, what sources acknowledged against what the aggregator stored.
#[derive(Debug)]
pub struct Referee {
    scenario: String,
    /// Event id -> (stream, the agent said it dropped it).
    acked: BTreeMap<String, (String, bool)>,
    recoveries: Vec<Duration>,
    notes: Vec<(String, String)>,
    started: Instant,
}

/// The referee's findings for one scenario.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub scenario: String,
    pub n_acked: u64,
    /// Distinct event ids stored (acknowledged or not: a request whose answer was lost to a kill
    /// may be stored without its acknowledgement).
    pub n_stored: u64,
    /// Stored but never acknowledged (allowed: the answer was lost).
    pub n_stored_unacked: u64,
    /// Acknowledged, not stored, and not announced as dropped in the 200 answer. Under
    /// `drop_oldest` this includes evicted events; [`Verdict::n_lost`] subtracts the drop
    /// reports.
    pub lost: Vec<String>,
    /// Acknowledged and not stored, per stream (announced drops included).
    pub missing_by_stream: BTreeMap<String, u64>,
    /// The aggregator's `agent_drops` view: events dropped by a buffer policy, per stream.
    pub dropped_by_stream: BTreeMap<String, u64>,
    /// Event ids stored more than once, with their count.
    pub duplicated: Vec<(String, u64)>,
    /// Rows beyond the distinct (agent_id, seq) pairs: a sequence number stored twice.
    pub n_seq_duplicates: u64,
    pub recoveries: Vec<Duration>,
    pub notes: Vec<(String, String)>,
    pub elapsed: Duration,
}

impl Referee {
    pub fn new(scenario: &str) -> Referee {
        Referee {
            scenario: scenario.to_owned(),
            acked: BTreeMap::new(),
            recoveries: Vec::new(),
            notes: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Events a source acknowledged on `stream` (panics on an id acknowledged twice).
    pub fn add_acked(&mut self, stream: &str, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            self.insert(id, stream.to_owned(), false);
        }
    }

    /// Events an HTTP [`crate::Load`] or a probe saw acknowledged.
    pub fn add_acked_events(&mut self, events: impl IntoIterator<Item = AckedEvent>) {
        for event in events {
            self.insert(event.id, event.stream, event.dropped_in_answer);
        }
    }

    fn insert(&mut self, id: String, stream: String, dropped: bool) {
        if let Some(previous) = self.acked.insert(id.clone(), (stream, dropped)) {
            panic!("{id} was acknowledged twice ({previous:?}): the test is broken");
        }
    }

    /// Records a probe: its acknowledged ids and the recovery time.
    pub fn add_probe(&mut self, probe: Probe) {
        self.recoveries.push(probe.recovered_in);
        self.add_acked_events(probe.acked);
    }

    /// A `key=value` pair for the summary line.
    pub fn note(&mut self, key: &str, value: impl std::fmt::Display) {
        self.notes.push((key.to_owned(), value.to_string()));
    }

    pub fn n_acked(&self) -> usize {
        self.acked.len()
    }

    /// Waits (at most `timeout`) until every acknowledged event is stored or, per stream,
    /// accounted for by the drop reports in the aggregator's `agent_drops` view. Does not fail:
    /// the verdict says what is missing.
    pub async fn wait_stored(&self, query_addr: SocketAddr, timeout: Duration) {
        let _ = poll_until(timeout, || async {
            let verdict = self.verdict(query_addr).await?;
            anyhow::ensure!(verdict.n_lost() == 0, "{} missing", verdict.n_lost());
            Ok(())
        })
        .await;
    }

    /// Reads what the aggregator stored and compares.
    pub async fn verdict(&self, query_addr: SocketAddr) -> anyhow::Result<Verdict> {
        let stored = stored_id_counts(query_addr).await?;
        let mut lost = Vec::new();
        let mut missing_by_stream: BTreeMap<String, u64> = BTreeMap::new();
        for (id, (stream, dropped)) in &self.acked {
            if !stored.contains_key(id) {
                *missing_by_stream.entry(stream.clone()).or_default() += 1;
                if !dropped {
                    lost.push(id.clone());
                }
            }
        }
        let n_stored_unacked = stored
            .keys()
            .filter(|id| !self.acked.contains_key(*id))
            .count() as u64;
        let duplicated: Vec<(String, u64)> = stored
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        let n_rows = query_count(query_addr, "SELECT count(*) FROM events").await?;
        let n_distinct_seq = query_count(
            query_addr,
            "SELECT count(*) FROM (SELECT DISTINCT agent_id, seq FROM events)",
        )
        .await?;
        let mut dropped_by_stream = BTreeMap::new();
        for row in query_rows(
            query_addr,
            "SELECT stream, CAST(sum(n_events) AS BIGINT) FROM agent_drops GROUP BY stream",
        )
        .await?
        {
            let stream = row[0].as_str().unwrap_or("NULL").to_owned();
            let n = row[1]
                .as_u64()
                .with_context(|| format!("agent_drops sum is not a count: {row:?}"))?;
            dropped_by_stream.insert(stream, n);
        }
        Ok(Verdict {
            scenario: self.scenario.clone(),
            n_acked: self.acked.len() as u64,
            n_stored: stored.len() as u64,
            n_stored_unacked,
            lost,
            missing_by_stream,
            dropped_by_stream,
            duplicated,
            n_seq_duplicates: n_rows.saturating_sub(n_distinct_seq),
            recoveries: self.recoveries.clone(),
            notes: self.notes.clone(),
            elapsed: self.started.elapsed(),
        })
    }

    /// Waits for delivery, then returns the verdict after printing its summary line (also to
    /// [`SUMMARY_FILE_ENV`]'s file). Panics only when the aggregator cannot be queried.
    pub async fn settle(&self, dir: &TestDir, query_addr: SocketAddr) -> Verdict {
        self.wait_stored(query_addr, crate::ARRIVAL_TIMEOUT).await;
        let verdict = match self.verdict(query_addr).await {
            Ok(verdict) => verdict,
            Err(error) => panic!(
                "{}: cannot read the aggregator's answer: {error:#} (test dir {})",
                self.scenario,
                dir.path().display()
            ),
        };
        verdict.print();
        verdict
    }
}

/// Every stored event id with its number of rows (events without an id are left out).
async fn stored_id_counts(query_addr: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    // Keyset pages (ids after the last one seen): an OFFSET would make the aggregator sort
    // offset + limit rows per page, and run out of query memory on large runs.
    let mut after = String::new();
    loop {
        assert!(
            !after.contains('\''),
            "event ids of the suite never contain quotes: {after}"
        );
        let sql = format!(
            "SELECT event_id, count(*) FROM events WHERE event_id > '{after}' \
             GROUP BY event_id ORDER BY event_id LIMIT {STORED_PAGE_ROWS}"
        );
        let page = query_rows(query_addr, &sql).await?;
        let n_rows = page.len();
        for row in page {
            let id = row[0]
                .as_str()
                .with_context(|| format!("event_id is not text: {row:?}"))?
                .to_owned();
            let n = row[1]
                .as_u64()
                .with_context(|| format!("count is not a number: {row:?}"))?;
            after.clone_from(&id);
            counts.insert(id, n);
        }
        if n_rows < STORED_PAGE_ROWS {
            break;
        }
    }
    Ok(counts)
}

impl Verdict {
    /// Acknowledged events neither stored nor counted by a drop report: per stream, missing
    /// minus reported drops.
    pub fn n_lost(&self) -> u64 {
        self.missing_by_stream
            .iter()
            .map(|(stream, n_missing)| {
                n_missing.saturating_sub(self.dropped_by_stream.get(stream).copied().unwrap_or(0))
            })
            .sum()
    }

    /// Events stored more than once (by id or by sequence number).
    pub fn n_duplicated(&self) -> u64 {
        let by_id: u64 = self.duplicated.iter().map(|(_, n)| n - 1).sum();
        by_id.max(self.n_seq_duplicates)
    }

    /// The longest recovery, in milliseconds.
    pub fn recovered_in_ms(&self) -> Option<u128> {
        self.recoveries.iter().max().map(Duration::as_millis)
    }

    pub fn n_dropped(&self) -> u64 {
        self.dropped_by_stream.values().sum()
    }

    /// `scenario=... acked=... stored=... lost=0 duplicated=0 recovered_in_ms=...` and the
    /// scenario's notes.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "scenario={} acked={} stored={} lost={} duplicated={} recovered_in_ms={}",
            self.scenario,
            self.n_acked,
            self.n_stored,
            self.n_lost(),
            self.n_duplicated(),
            self.recovered_in_ms()
                .map_or_else(|| "n/a".to_owned(), |ms| ms.to_string()),
        );
        if self.recoveries.len() > 1 {
            let mut sorted = self.recoveries.clone();
            sorted.sort();
            let _ = write!(
                line,
                " recoveries={} recovered_median_ms={}",
                sorted.len(),
                sorted[sorted.len() / 2].as_millis()
            );
        }
        let _ = write!(line, " stored_unacked={}", self.n_stored_unacked);
        if !self.dropped_by_stream.is_empty() || !self.missing_by_stream.is_empty() {
            let _ = write!(
                line,
                " dropped={} missing_by_stream={} dropped_by_stream={}",
                self.n_dropped(),
                format_map(&self.missing_by_stream),
                format_map(&self.dropped_by_stream)
            );
        }
        for (key, value) in &self.notes {
            let _ = write!(line, " {key}={value}");
        }
        let _ = write!(line, " elapsed_s={:.1}", self.elapsed.as_secs_f64());
        line
    }

    /// Prints the summary line (and appends it to [`SUMMARY_FILE_ENV`]'s file when set).
    pub fn print(&self) {
        let line = self.summary();
        println!("{line}");
        if let Some(path) = std::env::var_os(SUMMARY_FILE_ENV) {
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| {
                    std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes())
                });
            if let Err(error) = appended {
                eprintln!("cannot append to {}: {error}", path.to_string_lossy());
            }
        }
    }

    /// The guarantees for a lossless scenario: nothing lost, nothing twice, nothing dropped by a
    /// policy, and delivery resumed within [`RECOVERY_BOUND`] after every fault.
    pub fn assert_lossless(&self) {
        self.assert_no_duplicates();
        assert!(
            self.lost.is_empty(),
            "{}: {} acknowledged events lost, such as {:?}\n{}",
            self.scenario,
            self.lost.len(),
            &self.lost[..self.lost.len().min(10)],
            self.summary()
        );
        assert!(
            self.dropped_by_stream.is_empty(),
            "{}: a lossless scenario reported drops\n{}",
            self.scenario,
            self.summary()
        );
        self.assert_recovered();
    }

    /// The guarantees under a drop policy: nothing twice, and per stream exactly the reported
    /// drops are missing; delivery resumed within [`RECOVERY_BOUND`].
    pub fn assert_drops_explain_missing(&self) {
        self.assert_no_duplicates();
        let missing_by_stream: BTreeMap<&String, u64> = self
            .missing_by_stream
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(stream, n)| (stream, *n))
            .collect();
        let dropped_by_stream: BTreeMap<&String, u64> = self
            .dropped_by_stream
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(stream, n)| (stream, *n))
            .collect();
        assert_eq!(
            missing_by_stream,
            dropped_by_stream,
            "{}: per stream, acknowledged-but-missing events (left) differ from the drops the \
             aggregator's agent_drops view reports (right)\n{}",
            self.scenario,
            self.summary()
        );
        self.assert_recovered();
    }

    pub fn assert_no_duplicates(&self) {
        assert!(
            self.duplicated.is_empty() && self.n_seq_duplicates == 0,
            "{}: stored more than once: {:?} ({} rows beyond distinct (agent_id, seq))\n{}",
            self.scenario,
            &self.duplicated[..self.duplicated.len().min(10)],
            self.n_seq_duplicates,
            self.summary()
        );
    }

    pub fn assert_recovered(&self) {
        for (fault_idx, recovered) in self.recoveries.iter().enumerate() {
            assert!(
                *recovered <= RECOVERY_BOUND,
                "{}: delivery took {recovered:?} to resume after fault {fault_idx}, over \
                 {RECOVERY_BOUND:?}\n{}",
                self.scenario,
                self.summary()
            );
        }
    }
}

fn format_map(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "{}".to_owned();
    }
    let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    parts.join(",")
}

// ---------------------------------------------------------------------------------------------
// A small filesystem that fills up

/// A tmpfs of a fixed size mounted on a directory of the test (root only), unmounted (lazily,
/// in case a killed process still holds a file) when dropped.
pub struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// Whether this process may mount a tmpfs (root with the capability to mount: not every
    /// container grants it); the error says why not. Tries it on a temporary directory.
    pub fn can_mount() -> Result<(), String> {
        let is_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0");
        if !is_root {
            return Err("not root".to_owned());
        }
        let dir = tempfile::Builder::new()
            .prefix("runnel-mount-check-")
            .tempdir()
            .map_err(|error| format!("create a temp dir: {error}"))?;
        let disk = SmallDisk::mount(dir.path(), 1 << 20).map_err(|error| format!("{error:#}"))?;
        drop(disk);
        Ok(())
    }

    /// Mounts a tmpfs of `size_bytes` on `path` (created).
    pub fn mount(path: &std::path::Path, size_bytes: u64) -> anyhow::Result<SmallDisk> {
        std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(path)
            .output()
            .context("run mount")?;
        anyhow::ensure!(
            output.status.success(),
            "mount -t tmpfs on {}: {} {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(SmallDisk {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes a ballast file until the filesystem is full, then shrinks it so `headroom_bytes`
    /// remain free. Returns the ballast's path and size.
    pub fn fill(&self, headroom_bytes: u64) -> anyhow::Result<(std::path::PathBuf, u64)> {
        use std::io::Write as _;
        let path = self.path.join("ballast");
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut n_bytes = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => n_bytes += n as u64,
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(error) => {
                    return Err(error).with_context(|| format!("write {}", path.display()));
                }
            }
        }
        let size = n_bytes.saturating_sub(headroom_bytes);
        file.set_len(size)
            .with_context(|| format!("shrink {}", path.display()))?;
        file.sync_all().ok();
        Ok((path, size))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
