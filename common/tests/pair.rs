//! A simulated pair, after quinn-proto's `Pair`: the agent's [`UplinkSession`] and the
//! aggregator's [`IngestHandshake`], [`IngestSession`] and [`IngestSequencer`] driven against each
//! other the way `agent::uplink` and `aggregator::ingest` drive them, on a virtual clock, with a
//! link in between that the test controls.
//!
//! The link delays every message by its own random latency, so batch streams and their acks
//! arrive out of order (the control stream stays in order, as a QUIC stream does). It duplicates
//! some batches and acks, loses some messages (a loss kills the path: nothing more gets through
//! and each side notices only at its idle timeout, as with QUIC on a dead path), resets
//! connections, and restarts the aggregator (commits still queued for its WAL are lost). Each side
//! notices a close on its own time, so an old connection can still commit batches after the
//! agent's next one read the high-water mark. Behind the aggregator is a model WAL, one FIFO
//! queue like the real writer thread, with the same chain check as `aggregator::wal`; behind the
//! agent a model buffer that deletes only what an ack or a Welcome says is stored.
//!
//! Checked after every step of every schedule: the stored sequence numbers are contiguous from
//! 1, each stored once (no skip, no repeat); the mark is the last stored number; every event the
//! agent deletes (on an ack or below a Welcome's mark) is stored; every batch an agent session
//! cuts starts where the previous one on that connection ended (the first at the chain start: the
//! Welcome's mark, raised on protocol 4 by the agent's `Resume`, which with one aggregator never
//! names more than its WAL stores).
//! After the schedule's chaos ends and the link heals: every event produced is stored exactly once
//! and the agent's buffer is empty.
//!
//! A failure names its seed; `RUNNEL_PAIR_SEED=<seed>` replays that schedule alone and prints its
//! trace. `RUNNEL_PAIR_SCHEDULES=<n>` runs more schedules than the default.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use runnel_common::session::{
    Accepted, BatchDue, BufferHead, IngestHandshake, IngestSequencer, IngestSession, UplinkLimits,
    UplinkSession, WelcomeTerms,
};
use runnel_common::wire::{
    Ack, AckOutcome, AgentMessage, AggregatorMessage, FLEET_PROTOCOL_VERSION, Hello,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, RESUME_PROTOCOL_VERSION, Status,
};

/// Schedules run by the main test unless `RUNNEL_PAIR_SCHEDULES` says otherwise.
const DEFAULT_SCHEDULES: u64 = 2_000;
/// Schedules a mutation test tries before it concludes the pair cannot see the bug.
const MUTATION_SCHEDULES: u64 = 200;
/// Every event is this big in the model buffer (for the byte limit of a batch).
const EVENT_BYTES: usize = 100;
/// How long a side takes to notice a dead path (QUIC's idle timeout).
const IDLE_TIMEOUT: Duration = Duration::from_millis(300);
/// The heartbeat interval the aggregator announces.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// A schedule that has not finished this long after its chaos ended is stuck.
const HEAL_DEADLINE: Duration = Duration::from_secs(120);
/// Steps per schedule at most (a step is one message, commit, timer or fault).
const MAX_STEPS: usize = 2_000_000;

const AGENT_ID: &str = "pair-agent";

/// A deliberate bug, to show that the pair notices it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    None,
    /// The aggregator hands batches to the WAL as they arrive, and the WAL stores a batch whose
    /// predecessor is missing.
    NoSequencerNoChainCheck,
    /// The Welcome names one event more than is stored.
    WelcomeAheadOfTheMark,
}

/// One schedule's parameters, drawn from its seed.
#[derive(Debug, Clone)]
struct Knobs {
    n_events: u64,
    limits: UplinkLimits,
    aggregator_window: u32,
    /// The highest protocol version the agent offers (older agents too).
    agent_max_version: u16,
    max_latency_us: u64,
    max_wal_latency_us: u64,
    max_produce_gap_us: u64,
    max_burst: u64,
    max_backoff_us: u64,
    p_loss: f64,
    /// A message waits for a retransmission (the path lives): its stream stalls for a while.
    p_stall: f64,
    p_duplicate: f64,
    /// A commit fails in the WAL (a storage error): nothing is stored, the batch is rejected.
    p_wal_failure: f64,
    /// Mean time between connection resets, agent crashes and aggregator restarts (None: never).
    reset_every_us: Option<u64>,
    agent_crash_every_us: Option<u64>,
    restart_every_us: Option<u64>,
    /// Faults happen only before this (from the start); then the link heals.
    chaos_us: u64,
}

impl Knobs {
    fn draw(rng: &mut fastrand::Rng) -> Knobs {
        let pick = |rng: &mut fastrand::Rng, options: &[u64]| options[rng.usize(..options.len())];
        let agent_max_version = match rng.u8(0..10) {
            0 => MIN_PROTOCOL_VERSION,
            1 => FLEET_PROTOCOL_VERSION,
            // The last protocol without the Resume.
            2 => RESUME_PROTOCOL_VERSION - 1,
            _ => PROTOCOL_VERSION,
        };
        Knobs {
            n_events: rng.u64(20..=300),
            limits: UplinkLimits {
                max_in_flight_batches: rng.usize(1..=6),
                max_batch_events: rng.usize(1..=24),
                max_batch_bytes: EVENT_BYTES * rng.usize(1..=30),
                max_batch_age: Duration::from_micros(rng.u64(0..=20_000)),
            },
            aggregator_window: rng.u32(1..=8),
            agent_max_version,
            max_latency_us: pick(rng, &[0, 1_000, 5_000, 20_000, 80_000]),
            max_wal_latency_us: pick(rng, &[0, 500, 5_000]),
            max_produce_gap_us: pick(rng, &[0, 1_000, 10_000]),
            max_burst: rng.u64(1..=20),
            max_backoff_us: rng.u64(1_000..=100_000),
            p_loss: [0.0, 0.002, 0.01, 0.03][rng.usize(..4)],
            p_stall: [0.0, 0.01, 0.05][rng.usize(..3)],
            p_duplicate: [0.0, 0.005, 0.02][rng.usize(..3)],
            p_wal_failure: [0.0, 0.0, 0.01, 0.05][rng.usize(..4)],
            reset_every_us: [None, Some(50_000), Some(200_000), Some(1_000_000)][rng.usize(..4)],
            agent_crash_every_us: [None, Some(100_000), Some(500_000)][rng.usize(..3)],
            restart_every_us: [None, None, Some(300_000), Some(2_000_000)][rng.usize(..4)],
            chaos_us: rng.u64(50_000..=2_000_000),
        }
    }
}

/// What happened across schedules: the pair must have exercised every path it claims to.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    n_connections: u64,
    n_batches_sent: u64,
    n_batches_parked: u64,
    n_commits_stored: u64,
    n_commits_duplicate: u64,
    n_commits_partial: u64,
    n_commits_gap: u64,
    /// Stored, but the ack never reached the agent (its connection or path died first).
    n_acks_lost: u64,
    n_messages_duplicated: u64,
    n_messages_stalled: u64,
    n_paths_lost: u64,
    n_resets: u64,
    n_agent_crashes: u64,
    n_restarts: u64,
    n_wal_failures: u64,
    n_agent_errors: u64,
    n_aggregator_errors: u64,
    n_stale_welcomes: u64,
    n_protocol_1: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.n_connections += other.n_connections;
        self.n_batches_sent += other.n_batches_sent;
        self.n_batches_parked += other.n_batches_parked;
        self.n_commits_stored += other.n_commits_stored;
        self.n_commits_duplicate += other.n_commits_duplicate;
        self.n_commits_partial += other.n_commits_partial;
        self.n_commits_gap += other.n_commits_gap;
        self.n_acks_lost += other.n_acks_lost;
        self.n_messages_duplicated += other.n_messages_duplicated;
        self.n_messages_stalled += other.n_messages_stalled;
        self.n_paths_lost += other.n_paths_lost;
        self.n_resets += other.n_resets;
        self.n_agent_crashes += other.n_agent_crashes;
        self.n_wal_failures += other.n_wal_failures;
        self.n_restarts += other.n_restarts;
        self.n_agent_errors += other.n_agent_errors;
        self.n_aggregator_errors += other.n_aggregator_errors;
        self.n_stale_welcomes += other.n_stale_welcomes;
        self.n_protocol_1 += other.n_protocol_1;
    }
}

/// A batch as the aggregator's WAL sees it after decoding: the chain link and the events.
#[derive(Debug, Clone)]
struct SimBatch {
    after_seq: u64,
    last_seq: u64,
    events: Vec<u64>,
}

#[derive(Debug, Clone)]
enum ToAggregator {
    Control(AgentMessage),
    Batch { stream: u64, batch: SimBatch },
}

#[derive(Debug, Clone)]
enum ToAgent {
    Control(AggregatorMessage),
    Ack { stream: u64, ack: Ack },
}

impl ToAgent {
    fn is_control(&self) -> bool {
        matches!(self, ToAgent::Control(_))
    }
}

impl ToAggregator {
    fn is_control(&self) -> bool {
        matches!(self, ToAggregator::Control(_))
    }
}

/// A message on the wire, delivered at `at` (ties in sending order).
#[derive(Debug)]
struct Flight<T> {
    at: Instant,
    order: u64,
    body: T,
}

/// One connection between the agent and the aggregator.
/// Which way a message travels on a link.
#[derive(Debug, Clone, Copy)]
enum Direction {
    ToAggregator,
    ToAgent,
}

#[derive(Debug)]
struct Link {
    /// False once a loss or a reset killed the path: nothing more gets through.
    path_alive: bool,
    /// Each side's view: open until it closes the connection or notices the close.
    agent_open: bool,
    aggregator_open: bool,
    agent_notices_at: Option<Instant>,
    aggregator_notices_at: Option<Instant>,
    to_aggregator: Vec<Flight<ToAggregator>>,
    to_agent: Vec<Flight<ToAgent>>,
    /// Control streams are ordered: a control message is never delivered before an earlier one.
    last_control_to_aggregator: Instant,
    last_control_to_agent: Instant,
}

/// The aggregator's side of one connection.
enum Server {
    AwaitingHello,
    /// The Hello was accepted; the high-water mark is being read from the WAL.
    AwaitingMark(Accepted),
    /// Protocol 4: welcomed, the agent's Resume not read yet. Batch streams that arrive
    /// meanwhile wait unaccepted, as QUIC streams the driver has not accepted do.
    AwaitingResume {
        session: IngestSession,
        early: Vec<(u64, SimBatch)>,
    },
    Open {
        session: IngestSession,
        sequencer: IngestSequencer<Pending>,
    },
    Closed,
}

/// A batch on its way to the WAL, and the stream its ack goes back on.
#[derive(Debug)]
struct Pending {
    link: usize,
    stream: u64,
    batch: SimBatch,
}

/// A request to the WAL's single writer, served in order.
#[derive(Debug)]
enum WalRequest {
    HighWaterMark { link: usize },
    Commit(Pending),
}

#[derive(Debug)]
enum Committed {
    Stored { n_new: u32 },
    Duplicate,
    Gap,
    Failed,
}

/// The aggregator's WAL: what is stored survives restarts; the queue does not.
#[derive(Debug, Default)]
struct Wal {
    stored: Vec<u64>,
    mark: u64,
    queue: VecDeque<WalRequest>,
    next_at: Option<Instant>,
}

/// The agent's side of its current connection.
struct AgentConnection {
    link: usize,
    /// `Some` once the Welcome arrived.
    session: Option<UplinkSession>,
    next_stream: u64,
    /// `last_seq` of the previous batch cut on this connection (the Welcome's mark at first).
    chain_seq: u64,
    next_status_at: Instant,
}

struct Agent {
    /// Committed to the buffer and not deleted.
    buffer: BTreeSet<u64>,
    /// Highest sequence number assigned.
    last_seq: u64,
    /// `Buffer::shipped_seq`: the highest sequence number deleted on an ack or a Welcome's mark.
    /// Kept with the buffer, so it survives the agent's crashes.
    shipped_seq: u64,
    connection: Option<AgentConnection>,
    reconnect_at: Option<Instant>,
}

/// The next thing that happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    AgentNotices(usize),
    AggregatorNotices(usize),
    DeliverToAggregator(usize),
    DeliverToAgent(usize),
    Wal,
    Produce,
    Reconnect,
    Status,
    BatchTimer,
    Reset,
    AgentCrash,
    Restart,
}

struct World {
    rng: fastrand::Rng,
    knobs: Knobs,
    mutation: Mutation,
    now: Instant,
    chaos_until: Instant,
    links: Vec<Link>,
    servers: Vec<Server>,
    wal: Wal,
    agent: Agent,
    next_order: u64,
    next_produce_at: Option<Instant>,
    next_reset_at: Option<Instant>,
    next_agent_crash_at: Option<Instant>,
    next_restart_at: Option<Instant>,
    stats: Stats,
    trace: Option<Vec<String>>,
}

type Step = Result<(), String>;

impl World {
    fn new(seed: u64, mutation: Mutation, trace: bool) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        let knobs = Knobs::draw(&mut rng);
        // The virtual clock's origin; every later instant is derived from it, never read.
        let origin = Instant::now();
        let chaos_until = origin + Duration::from_micros(knobs.chaos_us);
        let mut world = World {
            next_reset_at: None,
            next_agent_crash_at: None,
            next_restart_at: None,
            rng,
            mutation,
            now: origin,
            chaos_until,
            links: Vec::new(),
            servers: Vec::new(),
            wal: Wal::default(),
            agent: Agent {
                buffer: BTreeSet::new(),
                last_seq: 0,
                shipped_seq: 0,
                connection: None,
                reconnect_at: Some(origin),
            },
            next_order: 0,
            next_produce_at: Some(origin),
            stats: Stats::default(),
            trace: trace.then(Vec::new),
            knobs,
        };
        world.next_reset_at = world.fault_after(world.knobs.reset_every_us);
        world.next_agent_crash_at = world.fault_after(world.knobs.agent_crash_every_us);
        world.next_restart_at = world.fault_after(world.knobs.restart_every_us);
        if world.knobs.agent_max_version < FLEET_PROTOCOL_VERSION {
            world.stats.n_protocol_1 += 1;
        }
        world
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push(line());
        }
    }

    fn chaos(&self) -> bool {
        self.now < self.chaos_until
    }

    fn fault_after(&mut self, every_us: Option<u64>) -> Option<Instant> {
        let every_us = every_us?;
        Some(self.now + Duration::from_micros(self.rng.u64(1..=2 * every_us)))
    }

    fn after_us(&mut self, max_us: u64) -> Instant {
        self.now + Duration::from_micros(self.rng.u64(0..=max_us))
    }

    /// When a message sent now arrives: its latency, plus a retransmission's stall sometimes.
    fn arrival(&mut self) -> Instant {
        let at = self.after_us(self.knobs.max_latency_us);
        if self.chaos() && self.rng.f64() < self.knobs.p_stall {
            self.stats.n_messages_stalled += 1;
            return at + Duration::from_micros(self.rng.u64(50_000..=300_000));
        }
        at
    }

    fn done(&self) -> bool {
        self.next_produce_at.is_none() && self.agent.buffer.is_empty() && self.wal.queue.is_empty()
    }

    /// The earliest thing due, with its time.
    fn next(&self) -> Option<(Instant, Due)> {
        let mut candidates: Vec<(Instant, Due)> = Vec::new();
        for (index, link) in self.links.iter().enumerate() {
            if link.agent_open
                && let Some(at) = link.agent_notices_at
            {
                candidates.push((at, Due::AgentNotices(index)));
            }
            if link.aggregator_open
                && let Some(at) = link.aggregator_notices_at
            {
                candidates.push((at, Due::AggregatorNotices(index)));
            }
            if !link.path_alive {
                continue;
            }
            if link.aggregator_open
                && let Some(flight) = link.to_aggregator.iter().min_by_key(|f| (f.at, f.order))
            {
                candidates.push((flight.at, Due::DeliverToAggregator(index)));
            }
            if link.agent_open
                && let Some(flight) = link.to_agent.iter().min_by_key(|f| (f.at, f.order))
            {
                candidates.push((flight.at, Due::DeliverToAgent(index)));
            }
        }
        if let Some(at) = self.wal.next_at {
            candidates.push((at, Due::Wal));
        }
        if let Some(at) = self.next_produce_at {
            candidates.push((at, Due::Produce));
        }
        if let Some(at) = self.agent.reconnect_at {
            candidates.push((at, Due::Reconnect));
        }
        if let Some(connection) = &self.agent.connection
            && let Some(session) = &connection.session
        {
            candidates.push((connection.next_status_at, Due::Status));
            if let BatchDue::At(at) = session.batch_due(self.now) {
                candidates.push((at, Due::BatchTimer));
            }
        }
        if self.chaos() {
            if let Some(at) = self.next_reset_at {
                candidates.push((at, Due::Reset));
            }
            if let Some(at) = self.next_agent_crash_at {
                candidates.push((at, Due::AgentCrash));
            }
            if let Some(at) = self.next_restart_at {
                candidates.push((at, Due::Restart));
            }
        }
        candidates.into_iter().min()
    }

    fn step(&mut self, due: Due) -> Step {
        match due {
            Due::AgentNotices(link) => {
                self.log(|| format!("link {link}: the agent notices the close"));
                self.agent_closes(link);
            }
            Due::AggregatorNotices(link) => {
                self.log(|| format!("link {link}: the aggregator notices the close"));
                self.aggregator_closes(link);
            }
            Due::DeliverToAggregator(link) => {
                let flights = &mut self.links[link].to_aggregator;
                let index = (0..flights.len())
                    .min_by_key(|&i| (flights[i].at, flights[i].order))
                    .expect("a flight was due");
                let flight = flights.swap_remove(index);
                self.on_aggregator_message(link, flight.body)?;
            }
            Due::DeliverToAgent(link) => {
                let flights = &mut self.links[link].to_agent;
                let index = (0..flights.len())
                    .min_by_key(|&i| (flights[i].at, flights[i].order))
                    .expect("a flight was due");
                let flight = flights.swap_remove(index);
                self.on_agent_message(link, flight.body)?;
            }
            Due::Wal => self.wal_step()?,
            Due::Produce => self.produce(),
            Due::Reconnect => self.connect(),
            Due::Status => self.send_status(),
            // The agent's poll after every step cuts the batch.
            Due::BatchTimer => {}
            Due::Reset => {
                self.next_reset_at = self.fault_after(self.knobs.reset_every_us);
                if let Some(link) = self.agent.connection.as_ref().map(|c| c.link) {
                    self.stats.n_resets += 1;
                    self.log(|| format!("link {link}: reset"));
                    let agent_at = self.after_us(30_000);
                    let aggregator_at = self.after_us(30_000);
                    self.kill_path(link, agent_at, aggregator_at);
                }
            }
            Due::AgentCrash => {
                self.next_agent_crash_at = self.fault_after(self.knobs.agent_crash_every_us);
                if let Some(link) = self.agent.connection.as_ref().map(|c| c.link) {
                    // No close reaches the aggregator: it notices at its idle timeout, and what
                    // the agent sent before keeps arriving until then.
                    self.stats.n_agent_crashes += 1;
                    self.log(|| format!("link {link}: the agent crashes and restarts"));
                    let notice = self.now + IDLE_TIMEOUT;
                    let state = &mut self.links[link];
                    state.aggregator_notices_at = Some(
                        state
                            .aggregator_notices_at
                            .map_or(notice, |t| t.min(notice)),
                    );
                    self.agent_closes(link);
                    // A restarted agent connects at once.
                    self.agent.reconnect_at = Some(self.after_us(2_000));
                }
            }
            Due::Restart => {
                self.next_restart_at = self.fault_after(self.knobs.restart_every_us);
                self.restart_aggregator();
            }
        }
        self.poll_agent()
    }

    // The link.

    fn send_to_aggregator(&mut self, link: usize, body: ToAggregator) {
        if !self.links[link].path_alive {
            return;
        }
        if self.chaos() && self.rng.f64() < self.knobs.p_loss {
            self.lose_path(link);
            return;
        }
        for (at, order) in self.arrivals(link, body.is_control(), Direction::ToAggregator) {
            self.links[link].to_aggregator.push(Flight {
                at,
                order,
                body: body.clone(),
            });
        }
    }

    fn send_to_agent(&mut self, link: usize, body: ToAgent) {
        if !self.links[link].path_alive {
            if matches!(body, ToAgent::Ack { .. }) {
                self.stats.n_acks_lost += 1;
            }
            return;
        }
        if self.chaos() && self.rng.f64() < self.knobs.p_loss {
            if matches!(body, ToAgent::Ack { .. }) {
                self.stats.n_acks_lost += 1;
            }
            self.lose_path(link);
            return;
        }
        for (at, order) in self.arrivals(link, body.is_control(), Direction::ToAgent) {
            self.links[link].to_agent.push(Flight {
                at,
                order,
                body: body.clone(),
            });
        }
    }

    /// When each copy of a message sent now arrives, with its tie-breaking order: one copy, or
    /// two when a batch or an ack is duplicated; a control message never overtakes an earlier
    /// one in its direction (control streams are ordered).
    fn arrivals(
        &mut self,
        link: usize,
        control: bool,
        direction: Direction,
    ) -> Vec<(Instant, u64)> {
        let copies = if !control && self.chaos() && self.rng.f64() < self.knobs.p_duplicate {
            self.stats.n_messages_duplicated += 1;
            2
        } else {
            1
        };
        (0..copies)
            .map(|_| {
                let mut at = self.arrival();
                if control {
                    let state = &mut self.links[link];
                    let last = match direction {
                        Direction::ToAggregator => &mut state.last_control_to_aggregator,
                        Direction::ToAgent => &mut state.last_control_to_agent,
                    };
                    at = at.max(*last);
                    *last = at;
                }
                let order = self.next_order;
                self.next_order += 1;
                (at, order)
            })
            .collect()
    }

    /// A lost message: the path is dead, and each side notices at its idle timeout.
    fn lose_path(&mut self, link: usize) {
        self.stats.n_paths_lost += 1;
        self.log(|| format!("link {link}: a message is lost, the path is dead"));
        let agent_at = IDLE_TIMEOUT + Duration::from_micros(self.rng.u64(0..=50_000));
        let aggregator_at = IDLE_TIMEOUT + Duration::from_micros(self.rng.u64(0..=50_000));
        self.kill_path(link, self.now + agent_at, self.now + aggregator_at);
    }

    fn kill_path(&mut self, link: usize, agent_at: Instant, aggregator_at: Instant) {
        let state = &mut self.links[link];
        state.path_alive = false;
        state.to_aggregator.clear();
        let n_acks = state
            .to_agent
            .drain(..)
            .filter(|f| matches!(f.body, ToAgent::Ack { .. }))
            .count();
        self.stats.n_acks_lost += n_acks as u64;
        state.agent_notices_at = Some(state.agent_notices_at.map_or(agent_at, |t| t.min(agent_at)));
        state.aggregator_notices_at = Some(
            state
                .aggregator_notices_at
                .map_or(aggregator_at, |t| t.min(aggregator_at)),
        );
    }

    /// The agent ends the connection (an error, or it noticed the close) and will reconnect.
    fn agent_closes(&mut self, link: usize) {
        let notice = self.after_us(30_000);
        let state = &mut self.links[link];
        if !state.agent_open {
            return;
        }
        state.agent_open = false;
        let n_acks = state
            .to_agent
            .drain(..)
            .filter(|f| matches!(f.body, ToAgent::Ack { .. }))
            .count();
        self.stats.n_acks_lost += n_acks as u64;
        state.aggregator_notices_at = Some(
            state
                .aggregator_notices_at
                .map_or(notice, |t| t.min(notice)),
        );
        if self.agent.connection.as_ref().map(|c| c.link) == Some(link) {
            self.agent.connection = None;
            self.agent.reconnect_at = Some(self.after_us(self.knobs.max_backoff_us));
        }
    }

    /// The aggregator ends the connection: its sequencer and parked batches are gone; what it
    /// already handed to the WAL still commits.
    fn aggregator_closes(&mut self, link: usize) {
        let notice = self.after_us(30_000);
        let state = &mut self.links[link];
        if !state.aggregator_open {
            return;
        }
        state.aggregator_open = false;
        state.to_aggregator.clear();
        state.agent_notices_at = Some(state.agent_notices_at.map_or(notice, |t| t.min(notice)));
        self.servers[link] = Server::Closed;
    }

    fn restart_aggregator(&mut self) {
        self.stats.n_restarts += 1;
        self.log(|| "the aggregator restarts; its WAL queue is lost".to_owned());
        for link in 0..self.links.len() {
            self.aggregator_closes(link);
        }
        let n_commits = self
            .wal
            .queue
            .iter()
            .filter(|r| matches!(r, WalRequest::Commit(_)))
            .count();
        self.log(|| format!("{n_commits} commits lost with the queue"));
        self.wal.queue.clear();
        self.wal.next_at = None;
    }

    // The aggregator, as `aggregator::ingest` drives the sessions.

    fn on_aggregator_message(&mut self, link: usize, message: ToAggregator) -> Step {
        let server = std::mem::replace(&mut self.servers[link], Server::Closed);
        match (server, message) {
            (Server::AwaitingHello, ToAggregator::Control(first)) => {
                match IngestHandshake::new(AGENT_ID).on_hello(first) {
                    Ok(accepted) => {
                        self.log(|| {
                            format!(
                                "link {link}: hello accepted on protocol {}",
                                accepted.protocol_version()
                            )
                        });
                        self.servers[link] = Server::AwaitingMark(accepted);
                        self.wal_push(WalRequest::HighWaterMark { link });
                    }
                    Err(refusal) => {
                        return Err(format!("the agent's hello was refused: {}", refusal.error));
                    }
                }
            }
            (Server::AwaitingResume { mut session, early }, ToAggregator::Control(message)) => {
                let chain_start = match session.on_resume(message) {
                    Ok(chain_start) => chain_start,
                    Err(error) => {
                        return Err(format!("the aggregator refused the resume: {error}"));
                    }
                };
                // One aggregator: whatever the agent shipped was acknowledged here, after the
                // WAL's commit, so the chain never starts above what this WAL stores.
                if chain_start > self.wal.mark {
                    return Err(format!(
                        "link {link}: the chain starts at {chain_start}, above the WAL's mark {}",
                        self.wal.mark
                    ));
                }
                self.log(|| format!("link {link}: resume, chain starts at {chain_start}"));
                let sequencer = session.sequencer();
                self.servers[link] = Server::Open { session, sequencer };
                for (stream, batch) in early {
                    // An early batch out of sequence closes the connection; the rest go with it.
                    if !matches!(self.servers[link], Server::Open { .. }) {
                        break;
                    }
                    self.on_aggregator_message(link, ToAggregator::Batch { stream, batch })?;
                }
            }
            (
                Server::AwaitingResume { session, mut early },
                ToAggregator::Batch { stream, batch },
            ) => {
                early.push((stream, batch));
                self.servers[link] = Server::AwaitingResume { session, early };
            }
            (Server::Open { session, sequencer }, ToAggregator::Control(message)) => {
                if let Err(error) = session.on_control(message) {
                    return Err(format!("the aggregator refused a control message: {error}"));
                }
                self.servers[link] = Server::Open { session, sequencer };
            }
            (
                Server::Open {
                    session,
                    mut sequencer,
                },
                ToAggregator::Batch { stream, batch },
            ) => {
                let (after_seq, last_seq) = (batch.after_seq, batch.last_seq);
                let pending = Pending {
                    link,
                    stream,
                    batch,
                };
                if self.mutation == Mutation::NoSequencerNoChainCheck {
                    self.wal_push(WalRequest::Commit(pending));
                    self.servers[link] = Server::Open { session, sequencer };
                    return Ok(());
                }
                match sequencer.offer(after_seq, last_seq, pending) {
                    Ok(ready) => {
                        if ready.is_empty() {
                            self.stats.n_batches_parked += 1;
                        }
                        self.log(|| {
                            format!(
                                "link {link}: batch ({after_seq}, {last_seq}] offered, {} released",
                                ready.len()
                            )
                        });
                        for pending in ready {
                            self.wal_push(WalRequest::Commit(pending));
                        }
                        self.servers[link] = Server::Open { session, sequencer };
                    }
                    Err(error) => {
                        // The driver closes the connection; the agent resends after the mark.
                        self.stats.n_aggregator_errors += 1;
                        self.log(|| format!("link {link}: out of sequence ({error}), closing"));
                        self.servers[link] = Server::Open { session, sequencer };
                        self.aggregator_closes(link);
                    }
                }
            }
            (server, message) => {
                let state = match server {
                    Server::AwaitingHello => "awaiting the hello",
                    Server::AwaitingMark(_) => "awaiting the mark",
                    Server::AwaitingResume { .. } => "awaiting the resume",
                    Server::Open { .. } => "open",
                    Server::Closed => "closed",
                };
                return Err(format!(
                    "link {link}: the aggregator got {message:?} while {state}"
                ));
            }
        }
        Ok(())
    }

    fn wal_push(&mut self, request: WalRequest) {
        if self.wal.queue.is_empty() {
            self.wal.next_at = Some(self.after_us(self.knobs.max_wal_latency_us));
        }
        self.wal.queue.push_back(request);
    }

    fn wal_step(&mut self) -> Step {
        let Some(request) = self.wal.queue.pop_front() else {
            self.wal.next_at = None;
            return Ok(());
        };
        self.wal.next_at = if self.wal.queue.is_empty() {
            None
        } else {
            Some(self.after_us(self.knobs.max_wal_latency_us))
        };
        match request {
            WalRequest::HighWaterMark { link } => {
                let server = std::mem::replace(&mut self.servers[link], Server::Closed);
                let Server::AwaitingMark(accepted) = server else {
                    // The connection ended while its mark was read.
                    self.servers[link] = server;
                    return Ok(());
                };
                let mark = match self.mutation {
                    Mutation::WelcomeAheadOfTheMark => self.wal.mark + 1,
                    _ => self.wal.mark,
                };
                let terms = WelcomeTerms {
                    max_in_flight_batches: self.knobs.aggregator_window,
                    heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
                    aggregator_version: "pair".to_owned(),
                };
                let (welcome, session) = accepted.welcome(mark, &terms);
                self.log(|| format!("link {link}: welcome at mark {mark}"));
                self.servers[link] = if session.awaiting_resume() {
                    Server::AwaitingResume {
                        session,
                        early: Vec::new(),
                    }
                } else {
                    let sequencer = session.sequencer();
                    Server::Open { session, sequencer }
                };
                self.send_to_agent(link, ToAgent::Control(AggregatorMessage::Welcome(welcome)));
            }
            WalRequest::Commit(pending) => {
                let committed = self.commit(&pending.batch)?;
                let link = pending.link;
                let mark = self.wal.mark;
                self.log(|| {
                    format!(
                        "WAL: batch ({}, {}] from link {link}: {committed:?}, mark {}",
                        pending.batch.after_seq, pending.batch.last_seq, mark
                    )
                });
                let open = matches!(self.servers[link], Server::Open { .. });
                let outcome = match committed {
                    Committed::Stored { n_new } => AckOutcome::Stored { n_new },
                    Committed::Duplicate => AckOutcome::Duplicate,
                    Committed::Gap | Committed::Failed => {
                        // The stream task answers Rejected and closes the connection.
                        if open {
                            self.stats.n_aggregator_errors += 1;
                            let ack = Ack {
                                last_seq: pending.batch.last_seq,
                                outcome: AckOutcome::Rejected {
                                    reason: format!("{committed:?}"),
                                },
                            };
                            self.send_to_agent(
                                link,
                                ToAgent::Ack {
                                    stream: pending.stream,
                                    ack,
                                },
                            );
                            self.aggregator_closes(link);
                        }
                        return Ok(());
                    }
                };
                let last_seq = pending.batch.last_seq;
                if open {
                    let ack = Ack { last_seq, outcome };
                    self.send_to_agent(
                        link,
                        ToAgent::Ack {
                            stream: pending.stream,
                            ack,
                        },
                    );
                } else if matches!(outcome, AckOutcome::Stored { .. }) {
                    self.stats.n_acks_lost += 1;
                }
            }
        }
        Ok(())
    }

    /// The chain check of `aggregator::wal`, and the invariant: stored numbers are contiguous
    /// from 1, each stored once, and the mark is the last of them.
    fn commit(&mut self, batch: &SimBatch) -> Result<Committed, String> {
        let mark = self.wal.mark;
        if batch.after_seq > mark && self.mutation != Mutation::NoSequencerNoChainCheck {
            self.stats.n_commits_gap += 1;
            return Ok(Committed::Gap);
        }
        if batch.last_seq <= mark {
            self.stats.n_commits_duplicate += 1;
            return Ok(Committed::Duplicate);
        }
        if self.chaos() && self.rng.f64() < self.knobs.p_wal_failure {
            self.stats.n_wal_failures += 1;
            return Ok(Committed::Failed);
        }
        if batch.after_seq < mark {
            self.stats.n_commits_partial += 1;
        }
        let mut n_new = 0u32;
        for &seq in batch.events.iter().filter(|&&seq| seq > mark) {
            let expected = self.wal.stored.last().map_or(1, |last| last + 1);
            if seq != expected {
                return Err(format!(
                    "the WAL would store seq {seq} after {:?}: the chain {}",
                    self.wal.stored.last(),
                    if seq > expected { "skips" } else { "repeats" }
                ));
            }
            self.wal.stored.push(seq);
            n_new += 1;
        }
        self.wal.mark = batch.last_seq;
        if self.wal.stored.last().copied().unwrap_or(0) != self.wal.mark {
            return Err(format!(
                "the mark {} is not the last stored seq {:?}",
                self.wal.mark,
                self.wal.stored.last()
            ));
        }
        self.stats.n_commits_stored += 1;
        Ok(Committed::Stored { n_new })
    }

    // The agent, as `agent::uplink` drives its session.

    fn produce(&mut self) {
        let n_left = self.knobs.n_events - self.agent.last_seq;
        let n = self.rng.u64(1..=self.knobs.max_burst).min(n_left);
        for _ in 0..n {
            self.agent.last_seq += 1;
            self.agent.buffer.insert(self.agent.last_seq);
        }
        self.next_produce_at = (self.agent.last_seq < self.knobs.n_events)
            .then(|| self.after_us(self.knobs.max_produce_gap_us));
    }

    fn connect(&mut self) {
        self.agent.reconnect_at = None;
        self.stats.n_connections += 1;
        let link = self.links.len();
        self.links.push(Link {
            path_alive: true,
            agent_open: true,
            aggregator_open: true,
            agent_notices_at: None,
            aggregator_notices_at: None,
            to_aggregator: Vec::new(),
            to_agent: Vec::new(),
            last_control_to_aggregator: self.now,
            last_control_to_agent: self.now,
        });
        self.servers.push(Server::AwaitingHello);
        self.agent.connection = Some(AgentConnection {
            link,
            session: None,
            next_stream: 0,
            chain_seq: 0,
            next_status_at: self.now,
        });
        self.log(|| format!("link {link}: the agent connects"));
        let hello = Hello {
            min_protocol_version: MIN_PROTOCOL_VERSION,
            max_protocol_version: self.knobs.agent_max_version,
            agent_version: "pair".to_owned(),
            config_hash: String::new(),
            labels: Default::default(),
            last_assigned_seq: self.agent.last_seq,
        };
        self.send_to_aggregator(link, ToAggregator::Control(AgentMessage::Hello(hello)));
    }

    fn send_status(&mut self) {
        let Some(connection) = &mut self.agent.connection else {
            return;
        };
        connection.next_status_at = self.now + HEARTBEAT_INTERVAL;
        let Some(session) = &connection.session else {
            return;
        };
        let status = Status {
            config_hash: String::new(),
            config_version: 0,
            agent_version: "pair".to_owned(),
            components: Vec::new(),
            n_buffered_events: self.agent.buffer.len() as u64,
            buffered_bytes: (self.agent.buffer.len() * EVENT_BYTES) as u64,
            oldest_unshipped_age_ms: 0,
            drops: Default::default(),
            counters: Default::default(),
        };
        let link = connection.link;
        if let Some(message) = session.status_message(status) {
            self.send_to_aggregator(link, ToAggregator::Control(message));
        }
    }

    fn on_agent_message(&mut self, link: usize, message: ToAgent) -> Step {
        let now = self.now;
        let wal_mark = self.wal.mark;
        let Some(connection) = &mut self.agent.connection else {
            return Err(format!(
                "link {link}: a message for an agent without a connection"
            ));
        };
        if connection.link != link {
            return Err(format!(
                "link {link}: a message on a connection the agent left"
            ));
        }
        match (&mut connection.session, message) {
            (None, ToAgent::Control(AggregatorMessage::Welcome(welcome))) => {
                let mut session = UplinkSession::new(self.knobs.limits);
                let mark = match session.on_welcome(welcome) {
                    Ok(mark) => mark,
                    Err(error) => return Err(format!("the agent refused the welcome: {error}")),
                };
                // Protocol 4: the Resume goes first on the control stream, before any batch.
                let resume = session.resume(self.agent.shipped_seq);
                let chain_start = session.dispatched_seq();
                connection.session = Some(session);
                connection.chain_seq = chain_start;
                connection.next_status_at = now + HEARTBEAT_INTERVAL;
                if mark < wal_mark {
                    self.stats.n_stale_welcomes += 1;
                }
                self.log(|| {
                    format!(
                        "link {link}: the agent is welcomed at mark {mark}, chain at {chain_start}"
                    )
                });
                if let Some(resume) = resume {
                    self.send_to_aggregator(link, ToAggregator::Control(resume));
                }
                // `Buffer::reconcile`: what is at or below the chain start is stored.
                self.delete(0, chain_start, "the welcome's mark")
            }
            (None, other) => Err(format!(
                "link {link}: the agent got {other:?} before its welcome"
            )),
            (Some(session), ToAgent::Control(message)) => {
                if let Err(error) = session.on_control(message) {
                    self.stats.n_agent_errors += 1;
                    self.log(|| format!("link {link}: control stream error ({error})"));
                    self.agent_closes(link);
                }
                Ok(())
            }
            (Some(session), ToAgent::Ack { stream, ack }) => match session.on_ack(&ack, now) {
                Ok(acked) => {
                    self.log(|| {
                        format!(
                            "link {link}: stream {stream} acked ({}, {}]",
                            acked.after_seq, acked.last_seq
                        )
                    });
                    self.delete(acked.after_seq, acked.last_seq, "an ack")
                }
                Err(error) => {
                    // The driver returns the error: the connection ends, the agent reconnects.
                    self.stats.n_agent_errors += 1;
                    self.log(|| format!("link {link}: ack error ({error}), reconnecting"));
                    self.agent_closes(link);
                    Ok(())
                }
            },
        }
    }

    /// `Buffer::delete_range`, and the invariant: the agent deletes only what is stored.
    fn delete(&mut self, after_seq: u64, last_seq: u64, why: &str) -> Step {
        if last_seq <= after_seq {
            return Ok(());
        }
        let doomed: Vec<u64> = self
            .agent
            .buffer
            .range(after_seq + 1..=last_seq)
            .copied()
            .collect();
        for seq in doomed {
            if seq > self.wal.mark {
                return Err(format!(
                    "the agent deletes seq {seq} on {why}, but the WAL stores only up to {}",
                    self.wal.mark
                ));
            }
            self.agent.buffer.remove(&seq);
        }
        self.agent.shipped_seq = self.agent.shipped_seq.max(last_seq);
        Ok(())
    }

    /// One pass of the uplink driver's loop: tell the session the buffer head and cut every
    /// batch that is due.
    fn poll_agent(&mut self) -> Step {
        let now = self.now;
        let Some(connection) = &mut self.agent.connection else {
            return Ok(());
        };
        let link = connection.link;
        let Some(session) = &mut connection.session else {
            return Ok(());
        };
        let mut to_send = Vec::new();
        session.on_buffer_head(
            BufferHead {
                last_seq: self.agent.last_seq,
                avg_event_bytes: EVENT_BYTES,
            },
            now,
        );
        while session.batch_due(now) == BatchDue::Now {
            let after_seq = session.dispatched_seq();
            if after_seq != connection.chain_seq {
                return Err(format!(
                    "link {link}: the next batch starts after {after_seq}, the last ended at {}",
                    connection.chain_seq
                ));
            }
            // `Buffer::read_raw`: events after the seq, at least one, within both limits.
            let limits = session.limits();
            let mut events = Vec::new();
            for &seq in self.agent.buffer.range(after_seq + 1..) {
                let full = events.len() >= limits.max_batch_events
                    || (!events.is_empty()
                        && (events.len() + 1) * EVENT_BYTES > limits.max_batch_bytes);
                if full {
                    break;
                }
                events.push(seq);
            }
            let Some(&last_seq) = events.last() else {
                session.on_batch_sent(self.agent.last_seq, 0, now);
                connection.chain_seq = self.agent.last_seq;
                break;
            };
            if events.first() != Some(&(after_seq + 1)) {
                return Err(format!(
                    "link {link}: the buffer has no seq {} after {after_seq} though it was never acked",
                    after_seq + 1
                ));
            }
            session.on_batch_sent(last_seq, events.len(), now);
            connection.chain_seq = last_seq;
            let stream = connection.next_stream;
            connection.next_stream += 1;
            to_send.push((
                stream,
                SimBatch {
                    after_seq,
                    last_seq,
                    events,
                },
            ));
        }
        for (stream, batch) in to_send {
            self.stats.n_batches_sent += 1;
            self.log(|| {
                format!(
                    "link {link}: stream {stream} sends ({}, {}]",
                    batch.after_seq, batch.last_seq
                )
            });
            self.send_to_aggregator(link, ToAggregator::Batch { stream, batch });
        }
        Ok(())
    }

    /// After the heal: everything produced is stored exactly once and the buffer is empty.
    fn check_final(&self) -> Step {
        let expected: Vec<u64> = (1..=self.knobs.n_events).collect();
        if self.wal.stored != expected {
            return Err(format!(
                "the WAL stores {} events (last {:?}), {} were produced",
                self.wal.stored.len(),
                self.wal.stored.last(),
                self.knobs.n_events
            ));
        }
        if !self.agent.buffer.is_empty() {
            return Err(format!("the agent still holds {:?}", self.agent.buffer));
        }
        Ok(())
    }
}

/// A schedule that broke an invariant.
#[derive(Debug)]
struct Failure {
    seed: u64,
    message: String,
    knobs: Knobs,
    trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {}: {}", self.seed, self.message)?;
        writeln!(f, "knobs: {:?}", self.knobs)?;
        let skip = self.trace.len().saturating_sub(80);
        for line in &self.trace[skip..] {
            writeln!(f, "  {line}")?;
        }
        write!(
            f,
            "replay alone: RUNNEL_PAIR_SEED={} cargo test --workspace --test pair",
            self.seed
        )
    }
}

/// Runs one schedule to the end; `trace` records what happened, for a failure report.
fn run_schedule(seed: u64, mutation: Mutation, trace: bool) -> Result<Stats, Box<Failure>> {
    let mut world = World::new(seed, mutation, trace);
    let fail = |world: &mut World, message: String| {
        Box::new(Failure {
            seed,
            message,
            knobs: world.knobs.clone(),
            trace: world.trace.take().unwrap_or_default(),
        })
    };
    for _ in 0..MAX_STEPS {
        if world.done() {
            return match world.check_final() {
                Ok(()) => Ok(world.stats),
                Err(message) => Err(fail(&mut world, message)),
            };
        }
        let Some((at, due)) = world.next() else {
            return Err(fail(
                &mut world,
                "nothing is due, yet the schedule is not done".to_owned(),
            ));
        };
        world.now = world.now.max(at);
        if world.now > world.chaos_until + HEAL_DEADLINE {
            return Err(fail(
                &mut world,
                format!("not done {HEAL_DEADLINE:?} after the link healed"),
            ));
        }
        if let Err(message) = world.step(due) {
            return Err(fail(&mut world, message));
        }
    }
    Err(fail(
        &mut world,
        format!("not done after {MAX_STEPS} steps"),
    ))
}

/// Runs a schedule; on failure replays it with a trace for the report.
fn run_reported(seed: u64, mutation: Mutation) -> Result<Stats, Box<Failure>> {
    run_schedule(seed, mutation, false).map_err(|_| {
        run_schedule(seed, mutation, true).expect_err("a schedule is deterministic in its seed")
    })
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

#[test]
fn the_batch_chain_never_skips_or_repeats_through_loss_reordering_and_reconnects() {
    if let Some(seed) = env_u64("RUNNEL_PAIR_SEED") {
        match run_schedule(seed, Mutation::None, true) {
            Ok(stats) => println!("seed {seed}: ok, {stats:?}"),
            Err(failure) => panic!("{failure}"),
        }
        return;
    }
    let n_schedules = env_u64("RUNNEL_PAIR_SCHEDULES").unwrap_or(DEFAULT_SCHEDULES);
    let mut total = Stats::default();
    for seed in 0..n_schedules {
        match run_reported(seed, Mutation::None) {
            Ok(stats) => total.add(&stats),
            Err(failure) => panic!("{failure}"),
        }
    }
    println!("{n_schedules} schedules: {total:?}");
    // The schedules must have gone through every path the pair claims to test.
    let exercised = [
        ("reconnects", total.n_connections > n_schedules),
        (
            "batches parked for an earlier one",
            total.n_batches_parked > 0,
        ),
        (
            "replays dropped as duplicates",
            total.n_commits_duplicate > 0,
        ),
        ("partial replays", total.n_commits_partial > 0),
        ("batches refused for a gap", total.n_commits_gap > 0),
        ("acks lost in flight", total.n_acks_lost > 0),
        ("duplicated messages", total.n_messages_duplicated > 0),
        ("stalled messages", total.n_messages_stalled > 0),
        ("lost paths", total.n_paths_lost > 0),
        ("connection resets", total.n_resets > 0),
        ("agent crashes", total.n_agent_crashes > 0),
        ("WAL failures", total.n_wal_failures > 0),
        ("aggregator restarts", total.n_restarts > 0),
        ("agent errors", total.n_agent_errors > 0),
        ("aggregator errors", total.n_aggregator_errors > 0),
        (
            "welcomes behind the stored mark",
            total.n_stale_welcomes > 0,
        ),
        ("protocol 1 agents", total.n_protocol_1 > 0),
    ];
    let missing: Vec<&str> = exercised
        .iter()
        .filter(|(_, seen)| !seen)
        .map(|(what, _)| *what)
        .collect();
    assert!(
        missing.is_empty(),
        "never exercised: {missing:?} ({total:?})"
    );
}

/// The first schedule among `MUTATION_SCHEDULES` that notices `mutation`.
fn first_failure(mutation: Mutation) -> Option<Box<Failure>> {
    (0..MUTATION_SCHEDULES).find_map(|seed| run_schedule(seed, mutation, false).err())
}

#[test]
fn the_pair_notices_a_chain_that_skips() {
    let failure = first_failure(Mutation::NoSequencerNoChainCheck)
        .expect("committing batches out of order must break the chain in some schedule");
    assert!(failure.message.contains("skips"), "{failure}");
}

#[test]
fn the_pair_notices_an_agent_deleting_what_is_not_stored() {
    let failure = first_failure(Mutation::WelcomeAheadOfTheMark)
        .expect("a welcome ahead of the mark must make the agent delete an unstored event");
    assert!(failure.message.contains("the agent deletes"), "{failure}");
}
