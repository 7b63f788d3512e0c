//! The fault-injecting link: [`FaultProxy`], a UDP proxy between agents and the aggregator that
//! drops, delays, reorders, duplicates or rate-limits datagrams, or cuts the link until it is
//! healed, on the test's command.
//!
//! It sees opaque QUIC datagrams and knows nothing of the protocol; it never decides an outcome.
//! The only sleeps here are the faults themselves (a datagram's delay).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

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
