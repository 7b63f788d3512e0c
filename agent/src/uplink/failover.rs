//! Which aggregator the uplink dials, when, and when it moves to another: a sans-IO state
//! machine. The driver tells it what happened (an attempt failed, a connection came up or was
//! lost, a probe of the first choice answered or not) with the time, and asks it what to dial
//! next, when, and how long an attempt may take. It does no I/O and never reads the clock;
//! jitter comes from a [`fastrand::Rng`] it is given, so tests replay it on a virtual clock.
//!
//! The targets are the agent's aggregators in rendezvous order ([`super::rendezvous`]); index 0
//! is the first choice. The rules:
//! - Reconnects to the current target back off exponentially with equal jitter (half the delay
//!   fixed, half random), from `reconnect_min` to `reconnect_max`, so a fleet that lost its
//!   aggregator does not reconnect in lockstep.
//! - A target is unreachable from the start of the first attempt that failed, or from the
//!   moment its established connection was lost, until a connection is up again. Once that has
//!   lasted `failover_after`, the next attempt goes to the next target in order (wrapping), and
//!   that target gets `failover_after` of its own. Attempts are cut short at that deadline, so
//!   a target that swallows packets does not hold the agent for a whole connect timeout.
//! - While connected to a later choice, the first choice is probed (a QUIC handshake) about
//!   every `reconnect_max`, jittered. Once it has answered every probe for `failback_after`,
//!   the uplink leaves for it; a failed probe starts that wait again.
//!
//! A connection that comes up and is lost again at once never fails over: the target is
//! reachable. Whatever keeps it from working is in its logs and the agent's status.

use std::time::{Duration, Instant};

/// The timing of [`Failover`], from `[uplink]`.
#[derive(Debug, Clone, Copy)]
pub struct FailoverConfig {
    /// `uplink.failover_after_ms`.
    pub failover_after: Duration,
    /// `uplink.failback_after_ms`.
    pub failback_after: Duration,
    /// `uplink.reconnect_min_ms`: the first reconnect delay.
    pub reconnect_min: Duration,
    /// `uplink.reconnect_max_ms`: the largest reconnect delay and the probe interval.
    pub reconnect_max: Duration,
    /// The longest a connection attempt (or a probe) may take: `uplink.idle_timeout_ms`.
    pub connect_timeout: Duration,
}

/// Why the uplink moved to another aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveReason {
    /// The one it used could not be reached for this long.
    Unreachable { for_ms: u64 },
    /// The first choice has answered every probe for this long.
    FirstChoiceBack { for_ms: u64 },
}

/// A move from one target to another, to be logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub from_idx: usize,
    pub to_idx: usize,
    pub reason: MoveReason,
}

/// What the driver dials now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub target_idx: usize,
    /// Give up after this long: the connect timeout, or less when the failover deadline of the
    /// target comes first.
    pub timeout: Duration,
    /// Set when this attempt goes to another target than the last one did because the last
    /// one was unreachable for too long.
    pub moved: Option<Move>,
}

#[derive(Debug)]
pub struct Failover {
    n_targets: usize,
    config: FailoverConfig,
    target_idx: usize,
    /// A connection to the target is up (its Welcome arrived).
    connected: bool,
    /// Since when the target has been out of reach; `None` while connected and before the first
    /// attempt.
    unreachable_since: Option<Instant>,
    /// When the next attempt may start (while not connected).
    attempt_at: Instant,
    backoff: Backoff,
    /// While connected to a later choice: when to probe the first choice next.
    probe_at: Option<Instant>,
    /// Since when every probe of the first choice succeeded.
    first_reachable_since: Option<Instant>,
    /// The driver is leaving a connection for the first choice: its end is not a failure.
    leaving: bool,
    rng: fastrand::Rng,
}

impl Failover {
    /// Starts at the first choice, to be dialled at once. `n_targets` is at least 1.
    pub fn new(n_targets: usize, config: FailoverConfig, rng: fastrand::Rng, now: Instant) -> Self {
        assert!(n_targets >= 1, "config validation requires an aggregator");
        Failover {
            n_targets,
            config,
            target_idx: 0,
            connected: false,
            unreachable_since: None,
            attempt_at: now,
            backoff: Backoff::new(config.reconnect_min, config.reconnect_max),
            probe_at: None,
            first_reachable_since: None,
            leaving: false,
            rng,
        }
    }

    /// The target in use: connected to, or dialled next.
    pub fn target_idx(&self) -> usize {
        self.target_idx
    }

    /// When the next attempt may start. Only meaningful while not connected.
    pub fn attempt_at(&self) -> Instant {
        self.attempt_at
    }

    /// Whether the driver is leaving its connection for the first choice ([`Failover::on_probe`]
    /// said so, and the next attempt has not begun).
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// Failures since the last connection came up (for the driver's log rate).
    pub fn n_failures(&self) -> u64 {
        self.backoff.n_failures
    }

    /// An attempt starts now: to whom, for how long, and whether that is a move.
    pub fn begin_attempt(&mut self, now: Instant) -> Attempt {
        debug_assert!(!self.connected, "an attempt while connected");
        self.leaving = false;
        let mut moved = None;
        if let Some(since) = self.unreachable_since
            && self.n_targets > 1
            && now.saturating_duration_since(since) >= self.config.failover_after
        {
            let from_idx = self.target_idx;
            self.target_idx = (from_idx + 1) % self.n_targets;
            self.unreachable_since = None;
            self.backoff.reset();
            moved = Some(Move {
                from_idx,
                to_idx: self.target_idx,
                reason: MoveReason::Unreachable {
                    for_ms: millis(now.saturating_duration_since(since)),
                },
            });
        }
        let since = *self.unreachable_since.get_or_insert(now);
        let mut timeout = self.config.connect_timeout;
        if self.n_targets > 1 {
            let left = self
                .config
                .failover_after
                .saturating_sub(now.saturating_duration_since(since));
            timeout = timeout.min(left.max(MIN_ATTEMPT));
        }
        Attempt {
            target_idx: self.target_idx,
            timeout,
            moved,
        }
    }

    /// The connection to the target is up (its Welcome arrived).
    pub fn on_connected(&mut self, now: Instant) {
        self.connected = true;
        self.unreachable_since = None;
        self.backoff.reset();
        self.first_reachable_since = None;
        self.probe_at = (self.target_idx != 0).then(|| now + self.probe_delay());
    }

    /// The attempt failed, or the established connection was lost. The next attempt waits for
    /// the backoff, but not past the target's failover deadline (plus jitter), where the next
    /// attempt moves.
    pub fn on_failed(&mut self, now: Instant) {
        if self.leaving {
            // The connection being left ended badly while it drained: the first choice has
            // not been tried yet, and is dialled as planned.
            return;
        }
        if self.connected {
            self.connected = false;
            self.unreachable_since = Some(now);
        }
        self.probe_at = None;
        self.first_reachable_since = None;
        let since = *self.unreachable_since.get_or_insert(now);
        let mut attempt_at = now + self.backoff.next_delay(&mut self.rng);
        if self.n_targets > 1 {
            let deadline = since + self.config.failover_after;
            let jitter = equal_jitter(self.config.reconnect_min, &mut self.rng);
            attempt_at = attempt_at.min(deadline.max(now) + jitter);
        }
        self.attempt_at = attempt_at;
    }

    /// When to probe the first choice: only while connected to a later one.
    pub fn probe_at(&self) -> Option<Instant> {
        self.probe_at.filter(|_| self.connected)
    }

    /// A probe of the first choice answered (`reachable`) or not. `Some` tells the driver to
    /// leave the current connection and dial the first choice at once.
    pub fn on_probe(&mut self, reachable: bool, now: Instant) -> Option<Move> {
        if !self.connected || self.target_idx == 0 {
            return None;
        }
        if !reachable {
            self.first_reachable_since = None;
            self.probe_at = Some(now + self.probe_delay());
            return None;
        }
        let since = *self.first_reachable_since.get_or_insert(now);
        let reachable_for = now.saturating_duration_since(since);
        if reachable_for < self.config.failback_after {
            self.probe_at = Some(now + self.probe_delay());
            return None;
        }
        let from_idx = self.target_idx;
        self.target_idx = 0;
        self.connected = false;
        self.unreachable_since = None;
        self.probe_at = None;
        self.first_reachable_since = None;
        self.backoff.reset();
        self.attempt_at = now;
        self.leaving = true;
        Some(Move {
            from_idx,
            to_idx: 0,
            reason: MoveReason::FirstChoiceBack {
                for_ms: millis(reachable_for),
            },
        })
    }

    fn probe_delay(&mut self) -> Duration {
        equal_jitter(self.config.reconnect_max, &mut self.rng)
    }
}

/// The shortest attempt worth making: a handshake on a LAN takes about a millisecond, across
/// continents a few hundred.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Half of `base` fixed, half random.
fn equal_jitter(base: Duration, rng: &mut fastrand::Rng) -> Duration {
    let half_ms = millis(base) / 2;
    Duration::from_millis(half_ms + rng.u64(0..=half_ms.max(1)))
}

/// Exponential backoff with "equal jitter": half the delay fixed, half random, so a fleet that
/// lost its aggregator does not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    /// Failures since the last successful connection.
    n_failures: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
            n_failures: 0,
        }
    }

    fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        self.n_failures += 1;
        let base = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        equal_jitter(base, rng)
    }

    fn reset(&mut self) {
        self.current = self.min;
        self.n_failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> FailoverConfig {
        FailoverConfig {
            failover_after: 5_000 * MS,
            failback_after: 60_000 * MS,
            reconnect_min: 100 * MS,
            reconnect_max: 10_000 * MS,
            connect_timeout: 10_000 * MS,
        }
    }

    /// A failover over `n_targets` on a virtual clock that starts at `t0`.
    struct Sim {
        failover: Failover,
        t0: Instant,
        now: Instant,
        /// Which targets accept connections.
        up: Vec<bool>,
        /// How long a failing attempt takes before it gives up (a timeout, or a refusal).
        fail_after: Duration,
        /// Every move, with when it happened (ms since `t0`).
        moves: Vec<(u64, Move)>,
        /// (ms since `t0`, target) of every attempt.
        attempts: Vec<(u64, usize)>,
    }

    impl Sim {
        fn new(n_targets: usize, config: FailoverConfig, seed: u64) -> Sim {
            let t0 = Instant::now();
            Sim {
                failover: Failover::new(n_targets, config, fastrand::Rng::with_seed(seed), t0),
                t0,
                now: t0,
                up: vec![true; n_targets],
                fail_after: 2_000 * MS,
                moves: Vec::new(),
                attempts: Vec::new(),
            }
        }

        /// Moves so far: returns to the first choice, or failovers.
        fn n_moves(&self, failbacks: bool) -> usize {
            self.moves
                .iter()
                .filter(|(_, m)| {
                    matches!(m.reason, MoveReason::FirstChoiceBack { .. }) == failbacks
                })
                .count()
        }

        fn ms(&self) -> u64 {
            millis(self.now - self.t0)
        }

        /// Dials until a connection is up; returns the target.
        fn connect(&mut self) -> usize {
            for _ in 0..10_000 {
                self.now = self.now.max(self.failover.attempt_at());
                let attempt = self.failover.begin_attempt(self.now);
                self.attempts.push((self.ms(), attempt.target_idx));
                if let Some(moved) = attempt.moved {
                    self.moves.push((self.ms(), moved));
                }
                if self.up[attempt.target_idx] {
                    self.now += MS;
                    self.failover.on_connected(self.now);
                    return attempt.target_idx;
                }
                self.now += self.fail_after.min(attempt.timeout);
                self.failover.on_failed(self.now);
            }
            panic!("no connection after 10000 attempts: {:?}", self.up);
        }

        /// Runs the probes of a connection until it is left (returns the move) or `for_ms`
        /// passed.
        fn probe_for(&mut self, for_ms: u64) -> Option<Move> {
            let end = self.now + Duration::from_millis(for_ms);
            while let Some(at) = self.failover.probe_at() {
                if at > end {
                    break;
                }
                self.now = at;
                let reachable = self.up[0];
                if let Some(moved) = self.failover.on_probe(reachable, self.now) {
                    self.moves.push((self.ms(), moved));
                    return Some(moved);
                }
            }
            self.now = self.now.max(end);
            None
        }
    }

    #[test]
    fn the_first_choice_is_dialled_at_once_and_kept() {
        let mut sim = Sim::new(3, config(), 1);
        assert_eq!(sim.connect(), 0);
        assert_eq!(sim.attempts, [(0, 0)]);
        assert_eq!(
            sim.failover.probe_at(),
            None,
            "nothing to probe on the first choice"
        );
        // Lost and back within failover_after: same target.
        sim.now += 30_000 * MS;
        sim.failover.on_failed(sim.now);
        let lost_at = sim.ms();
        assert_eq!(sim.connect(), 0);
        assert!(sim.moves.is_empty());
        let (retry_ms, _) = sim.attempts[1];
        assert!(
            (lost_at + 50..=lost_at + 100).contains(&retry_ms),
            "first retry after a jittered reconnect_min: {retry_ms}"
        );
    }

    #[test]
    fn an_unreachable_aggregator_is_left_after_failover_after() {
        for seed in 0..50 {
            let mut sim = Sim::new(3, config(), seed);
            assert_eq!(sim.connect(), 0);
            sim.now += 1_000 * MS;
            sim.up[0] = false;
            let lost_ms = sim.ms();
            sim.failover.on_failed(sim.now);
            assert_eq!(sim.connect(), 1, "seed {seed}");
            let [(moved_ms, moved)] = sim.moves[..] else {
                panic!("one move expected: {:?}", sim.moves);
            };
            assert_eq!((moved.from_idx, moved.to_idx), (0, 1));
            let MoveReason::Unreachable { for_ms } = moved.reason else {
                panic!("{moved:?}");
            };
            assert!(for_ms >= 5_000, "seed {seed}: moved after {for_ms} ms");
            // Not later than the deadline plus a jittered reconnect_min (and the attempt that
            // was cut short at the deadline).
            assert!(
                (lost_ms + 5_000..=lost_ms + 5_100).contains(&moved_ms),
                "seed {seed}: lost at {lost_ms}, moved at {moved_ms}"
            );
            // No attempt ran past the deadline on the old target.
            for (at_ms, target) in &sim.attempts {
                if *target == 0 && *at_ms > lost_ms {
                    assert!(*at_ms < lost_ms + 5_000, "{:?}", sim.attempts);
                }
            }
            assert_eq!(sim.n_moves(false), 1);
        }
    }

    #[test]
    fn a_target_that_swallows_packets_is_cut_short_at_its_deadline() {
        let mut sim = Sim::new(2, config(), 7);
        sim.up[0] = false;
        sim.fail_after = 10_000 * MS; // every attempt runs into the connect timeout
        assert_eq!(sim.connect(), 1);
        let [(moved_ms, _)] = sim.moves[..] else {
            panic!("{:?}", sim.moves)
        };
        // The first attempt starts at 0 and is given 5 s, not the connect timeout of 10 s.
        assert!((5_000..=5_100).contains(&moved_ms), "moved at {moved_ms}");
    }

    #[test]
    fn moves_go_round_the_order_and_wrap() {
        let mut sim = Sim::new(3, config(), 3);
        sim.up = vec![false, false, true];
        assert_eq!(sim.connect(), 2);
        let path: Vec<(usize, usize)> = sim
            .moves
            .iter()
            .map(|(_, m)| (m.from_idx, m.to_idx))
            .collect();
        assert_eq!(path, [(0, 1), (1, 2)]);
        // The third goes down while the first is still down: wrap to the first, then the second.
        sim.up = vec![false, true, false];
        sim.failover.on_failed(sim.now);
        assert_eq!(sim.connect(), 1);
        let path: Vec<(usize, usize)> = sim
            .moves
            .iter()
            .map(|(_, m)| (m.from_idx, m.to_idx))
            .collect();
        assert_eq!(path, [(0, 1), (1, 2), (2, 0), (0, 1)]);
        assert_eq!(sim.n_moves(false), 4);
    }

    #[test]
    fn one_aggregator_is_never_left() {
        let mut sim = Sim::new(1, config(), 5);
        sim.up[0] = false;
        sim.fail_after = 10_000 * MS;
        for _ in 0..20 {
            sim.now = sim.now.max(sim.failover.attempt_at());
            let attempt = sim.failover.begin_attempt(sim.now);
            assert_eq!(attempt.target_idx, 0);
            assert_eq!(attempt.moved, None);
            assert_eq!(attempt.timeout, 10_000 * MS, "the whole connect timeout");
            sim.now += attempt.timeout;
            sim.failover.on_failed(sim.now);
        }
        // The backoff grows to reconnect_max and no further.
        let delay = sim.failover.attempt_at() - sim.now;
        assert!((5_000 * MS..=10_000 * MS).contains(&delay), "{delay:?}");
    }

    #[test]
    fn the_first_choice_is_probed_and_returned_to_after_failback_after() {
        let mut sim = Sim::new(3, config(), 11);
        sim.up[0] = false;
        assert_eq!(sim.connect(), 1);
        // Probes fail while the first choice is down: no move, probes keep coming about every
        // reconnect_max.
        let first_probe = sim
            .failover
            .probe_at()
            .expect("probing from a later choice");
        let gap = first_probe - sim.now;
        assert!((5_000 * MS..=10_000 * MS).contains(&gap), "{gap:?}");
        assert_eq!(sim.probe_for(120_000), None);
        // Back, but down again for one probe in the middle: the wait starts again.
        sim.up[0] = true;
        let back_ms = sim.ms();
        assert_eq!(sim.probe_for(40_000), None);
        sim.up[0] = false;
        assert_eq!(sim.probe_for(10_000), None);
        sim.up[0] = true;
        let back_again_ms = sim.ms();
        let moved = sim.probe_for(120_000).expect("returns to the first choice");
        assert_eq!((moved.from_idx, moved.to_idx), (1, 0));
        let MoveReason::FirstChoiceBack { for_ms } = moved.reason else {
            panic!("{moved:?}");
        };
        assert!(for_ms >= 60_000, "returned after {for_ms} ms");
        let (moved_ms, _) = *sim.moves.last().unwrap();
        assert!(
            moved_ms >= back_again_ms + 60_000 && moved_ms <= back_again_ms + 60_000 + 2 * 10_000,
            "back at {back_ms} and {back_again_ms}, returned at {moved_ms}"
        );
        // The driver leaves and dials the first choice at once, also when the connection it
        // leaves fails while it drains.
        assert!(sim.failover.is_leaving());
        sim.failover.on_failed(sim.now + 5 * MS);
        assert_eq!(sim.failover.attempt_at(), sim.now);
        assert_eq!(sim.failover.probe_at(), None);
        assert_eq!(sim.connect(), 0);
        assert_eq!(sim.n_moves(true), 1);
        assert_eq!(sim.n_moves(false), 1);
    }

    #[test]
    fn losing_a_later_choice_stops_probing_and_counts_from_the_loss() {
        let mut sim = Sim::new(2, config(), 13);
        sim.up[0] = false;
        assert_eq!(sim.connect(), 1);
        assert!(sim.failover.probe_at().is_some());
        sim.now += 1_000 * MS;
        sim.failover.on_failed(sim.now);
        assert_eq!(sim.failover.probe_at(), None);
        // The second is down too now, the first is back: the move after failover_after wraps
        // to the first.
        sim.up = vec![true, false];
        assert_eq!(sim.connect(), 0);
        let (_, moved) = *sim.moves.last().unwrap();
        assert_eq!((moved.from_idx, moved.to_idx), (1, 0));
        assert!(matches!(moved.reason, MoveReason::Unreachable { .. }));
    }

    #[test]
    fn failback_after_zero_returns_at_the_first_good_probe() {
        let config = FailoverConfig {
            failback_after: Duration::ZERO,
            ..config()
        };
        let mut sim = Sim::new(2, config, 17);
        sim.up[0] = false;
        assert_eq!(sim.connect(), 1);
        sim.up[0] = true;
        let moved = sim.probe_for(20_000).expect("returns");
        assert_eq!(moved.reason, MoveReason::FirstChoiceBack { for_ms: 0 });
    }

    #[test]
    fn reconnects_are_jittered_across_a_fleet() {
        // A hundred agents lose the same aggregator at the same instant: their retries spread.
        let mut first_retries = std::collections::BTreeSet::new();
        for seed in 0..100 {
            let mut sim = Sim::new(2, config(), seed);
            assert_eq!(sim.connect(), 0);
            sim.failover.on_failed(sim.now);
            first_retries.insert(sim.failover.attempt_at() - sim.now);
        }
        assert!(first_retries.len() > 20, "{first_retries:?}");
        assert!(
            first_retries
                .iter()
                .all(|d| (50 * MS..=100 * MS).contains(d))
        );
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut rng = fastrand::Rng::with_seed(1);
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        let delays: Vec<u64> = (0..6)
            .map(|_| millis(backoff.next_delay(&mut rng)))
            .collect();
        assert!((50..=100).contains(&delays[0]), "{delays:?}");
        assert!((100..=200).contains(&delays[1]), "{delays:?}");
        assert!(delays[5] <= 1000 && delays[5] >= 500, "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= 100 * MS);
    }
}
