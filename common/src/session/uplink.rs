//! The agent's side of a connection: handshake, when a batch is due, the in-flight window and
//! which buffer rows an ack makes deletable. Driven by `agent::uplink`, which does the I/O.
//!
//! From [`FLEET_PROTOCOL_VERSION`] on, the agent sends [`Status`] instead of [`Heartbeat`] and
//! the control stream carries config pushes and their results;
//! [`UplinkSession::status_message`] and [`UplinkSession::on_control`] keep the agent to its
//! version.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::ProtocolError;
use crate::wire::{
    Ack, AckOutcome, AgentMessage, AggregatorMessage, ConfigPush, ConfigResult,
    FLEET_PROTOCOL_VERSION, Heartbeat, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    RESUME_PROTOCOL_VERSION, Resume, Status, Welcome,
};

/// A control-stream message the agent's driver must act on.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlAction {
    /// Apply this config, then answer with [`UplinkSession::config_result_message`].
    ConfigPush(ConfigPush),
}

/// Batching and flow-control limits of one uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkLimits {
    pub max_in_flight_batches: usize,
    pub max_batch_events: usize,
    pub max_batch_bytes: usize,
    pub max_batch_age: Duration,
}

/// What the buffer holds beyond what has been dispatched, as the driver last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BufferHead {
    /// Highest sequence number committed to the buffer.
    pub last_seq: u64,
    /// Average encoded event size so far, for estimating pending bytes.
    pub avg_event_bytes: usize,
}

/// When the next batch should be cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchDue {
    /// Nothing to send, or the in-flight window is full: wait for new events or an ack.
    Idle,
    /// Cut a batch now.
    Now,
    /// Cut a batch at this instant unless something changes before.
    At(Instant),
}

/// A batch the agent has sent and not yet seen acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub after_seq: u64,
    pub last_seq: u64,
    pub n_events: usize,
    pub sent_at: Instant,
}

/// A batch the aggregator made durable: the agent may delete `(after_seq, last_seq]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub after_seq: u64,
    pub last_seq: u64,
    pub n_events: usize,
    pub round_trip: Duration,
}

/// The agent's side of one connection.
#[derive(Debug)]
pub struct UplinkSession {
    limits: UplinkLimits,
    /// `Some` once the Welcome arrived.
    welcome: Option<Welcome>,
    /// Last sequence number handed to a batch on this connection; the next batch starts after it.
    dispatched_seq: u64,
    /// When the oldest undispatched event was first seen, if there is one.
    pending_since: Option<Instant>,
    head: BufferHead,
    /// In flight, by `last_seq`.
    in_flight: BTreeMap<u64, InFlight>,
}

impl UplinkSession {
    pub fn new(limits: UplinkLimits) -> Self {
        assert!(
            limits.max_in_flight_batches > 0,
            "in-flight window must be positive"
        );
        assert!(
            limits.max_batch_events > 0,
            "batches must hold at least one event"
        );
        UplinkSession {
            limits,
            welcome: None,
            dispatched_seq: 0,
            pending_since: None,
            head: BufferHead::default(),
            in_flight: BTreeMap::new(),
        }
    }

    /// Handles the Welcome. Returns the high-water mark: every buffered event at or below it is
    /// durable at the aggregator and may be deleted; the first batch starts after it.
    pub fn on_welcome(&mut self, welcome: Welcome) -> Result<u64, ProtocolError> {
        if welcome.protocol_version < MIN_PROTOCOL_VERSION
            || welcome.protocol_version > PROTOCOL_VERSION
        {
            return Err(ProtocolError::VersionMismatch {
                peer_min: welcome.protocol_version,
                peer_max: welcome.protocol_version,
            });
        }
        // The aggregator may lower our window, never raise it.
        let window = (welcome.max_in_flight_batches as usize).max(1);
        self.limits.max_in_flight_batches = self.limits.max_in_flight_batches.min(window);
        self.dispatched_seq = welcome.high_water_mark;
        let hwm = welcome.high_water_mark;
        self.welcome = Some(welcome);
        Ok(hwm)
    }

    /// Right after [`UplinkSession::on_welcome`], before any batch: tells the session the agent's
    /// delivered mark (every sequence number at or below it was acknowledged by some aggregator
    /// and will never be sent again). On protocol 4 the chain starts at the higher of it and the
    /// Welcome's mark, on both sides, and the returned [`AgentMessage::Resume`] must be the first
    /// message on the control stream. Before protocol 4 nothing changes: the chain starts at the
    /// Welcome's mark and there is nothing to send. [`UplinkSession::dispatched_seq`] is the
    /// chain start afterwards; the agent may delete what it holds at or below it.
    pub fn resume(&mut self, delivered_seq: u64) -> Option<AgentMessage> {
        let version = self.protocol_version()?;
        if version < RESUME_PROTOCOL_VERSION {
            return None;
        }
        self.dispatched_seq = self.dispatched_seq.max(delivered_seq);
        Some(AgentMessage::Resume(Resume { delivered_seq }))
    }

    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// The protocol version of this connection, once the Welcome arrived.
    pub fn protocol_version(&self) -> Option<u16> {
        self.welcome
            .as_ref()
            .map(|welcome| welcome.protocol_version)
    }

    /// Whether this connection speaks fleet configuration (status, config push and result).
    pub fn is_fleet(&self) -> bool {
        self.protocol_version()
            .is_some_and(|version| version >= FLEET_PROTOCOL_VERSION)
    }

    /// Handles a control-stream message after the Welcome.
    pub fn on_control(
        &mut self,
        message: AggregatorMessage,
    ) -> Result<ControlAction, ProtocolError> {
        let Some(version) = self.protocol_version() else {
            return Err(ProtocolError::BeforeHandshake {
                what: "a control message",
            });
        };
        match message {
            AggregatorMessage::Welcome(_) => Err(ProtocolError::SecondWelcome),
            AggregatorMessage::Refused { reason } => Err(ProtocolError::Refused(reason)),
            AggregatorMessage::ConfigPush(push) => {
                if version < FLEET_PROTOCOL_VERSION {
                    return Err(ProtocolError::NotOnThisVersion {
                        what: "a config push",
                        version,
                    });
                }
                Ok(ControlAction::ConfigPush(push))
            }
        }
    }

    /// The periodic status for this connection: a [`Status`] on the fleet protocol, the
    /// protocol-1 [`Heartbeat`] (with the drops added up) before it. `None` before the Welcome.
    pub fn status_message(&self, status: Status) -> Option<AgentMessage> {
        if self.is_fleet() {
            return Some(AgentMessage::Status(status));
        }
        self.welcome.as_ref()?;
        Some(AgentMessage::Heartbeat(Heartbeat {
            n_buffered_events: status.n_buffered_events,
            buffered_bytes: status.buffered_bytes,
            oldest_unshipped_age_ms: status.oldest_unshipped_age_ms,
            n_dropped_events: status
                .drops
                .values()
                .fold(0u64, |sum, n| sum.saturating_add(*n)),
        }))
    }

    /// The answer to a config push; `None` when this connection cannot carry it (protocol 1,
    /// where no push can arrive either).
    pub fn config_result_message(&self, result: ConfigResult) -> Option<AgentMessage> {
        self.is_fleet()
            .then_some(AgentMessage::ConfigResult(result))
    }

    pub fn limits(&self) -> UplinkLimits {
        self.limits
    }

    /// The next batch holds events with sequence numbers above this.
    pub fn dispatched_seq(&self) -> u64 {
        self.dispatched_seq
    }

    pub fn n_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Tells the session what the buffer holds now.
    pub fn on_buffer_head(&mut self, head: BufferHead, now: Instant) {
        self.head = head;
        if head.last_seq > self.dispatched_seq && self.pending_since.is_none() {
            self.pending_since = Some(now);
        }
    }

    /// Whether a batch should be cut now, later, or not at all.
    pub fn batch_due(&self, now: Instant) -> BatchDue {
        if self.welcome.is_none() || self.in_flight.len() >= self.limits.max_in_flight_batches {
            return BatchDue::Idle;
        }
        let Some(since) = self.pending_since else {
            return BatchDue::Idle;
        };
        // An upper bound: sequence numbers can have gaps (dropped events), never duplicates.
        let n_pending = self.head.last_seq.saturating_sub(self.dispatched_seq);
        if n_pending == 0 {
            return BatchDue::Idle;
        }
        let n_pending_bytes = (n_pending as usize).saturating_mul(self.head.avg_event_bytes);
        let due_at = since + self.limits.max_batch_age;
        if n_pending as usize >= self.limits.max_batch_events
            || n_pending_bytes >= self.limits.max_batch_bytes
            || due_at <= now
        {
            BatchDue::Now
        } else {
            BatchDue::At(due_at)
        }
    }

    /// Records a batch the driver read from the buffer and sent: events in
    /// `(self.dispatched_seq(), last_seq]`. If the buffer had nothing (all rows in that range
    /// were dropped), call it with `n_events = 0` to move past them without sending.
    pub fn on_batch_sent(&mut self, last_seq: u64, n_events: usize, now: Instant) {
        assert!(last_seq >= self.dispatched_seq, "batches move forward");
        let after_seq = self.dispatched_seq;
        self.dispatched_seq = last_seq;
        if n_events > 0 {
            self.in_flight.insert(
                last_seq,
                InFlight {
                    after_seq,
                    last_seq,
                    n_events,
                    sent_at: now,
                },
            );
        }
        // What remains was committed before now; restart its clock conservatively at now.
        self.pending_since = (self.head.last_seq > self.dispatched_seq).then_some(now);
    }

    /// Handles an Ack. On success returns the range the agent may delete from its buffer.
    pub fn on_ack(&mut self, ack: &Ack, now: Instant) -> Result<Acked, ProtocolError> {
        if self.welcome.is_none() {
            return Err(ProtocolError::BeforeHandshake { what: "an ack" });
        }
        let Some(in_flight) = self.in_flight.remove(&ack.last_seq) else {
            return Err(ProtocolError::UnexpectedAck {
                last_seq: ack.last_seq,
            });
        };
        if let AckOutcome::Rejected { reason } = &ack.outcome {
            return Err(ProtocolError::Rejected {
                last_seq: ack.last_seq,
                reason: reason.clone(),
            });
        }
        debug_assert!(ack.outcome.is_durable());
        Ok(Acked {
            after_seq: in_flight.after_seq,
            last_seq: in_flight.last_seq,
            n_events: in_flight.n_events,
            round_trip: now.saturating_duration_since(in_flight.sent_at),
        })
    }

    /// Batches sent and not yet acknowledged, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &InFlight> {
        self.in_flight.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::check_agent_message;
    use crate::wire::Hello;

    fn welcome(hwm: u64, window: u32) -> Welcome {
        Welcome {
            protocol_version: PROTOCOL_VERSION,
            high_water_mark: hwm,
            max_in_flight_batches: window,
            heartbeat_interval_ms: 0,
            agent_id: "a".into(),
            aggregator_version: "0".into(),
        }
    }

    fn limits() -> UplinkLimits {
        UplinkLimits {
            max_in_flight_batches: 2,
            max_batch_events: 100,
            max_batch_bytes: 1 << 20,
            max_batch_age: Duration::from_millis(200),
        }
    }

    #[test]
    fn nothing_is_due_before_welcome() {
        let now = Instant::now();
        let mut session = UplinkSession::new(limits());
        session.on_buffer_head(
            BufferHead {
                last_seq: 1000,
                avg_event_bytes: 300,
            },
            now,
        );
        assert_eq!(session.batch_due(now), BatchDue::Idle);
    }

    #[test]
    fn batch_due_by_count_age_and_bytes() {
        let t0 = Instant::now();
        let mut session = UplinkSession::new(limits());
        assert_eq!(session.on_welcome(welcome(10, 64)), Ok(10));
        session.on_buffer_head(
            BufferHead {
                last_seq: 15,
                avg_event_bytes: 300,
            },
            t0,
        );
        assert_eq!(
            session.batch_due(t0),
            BatchDue::At(t0 + Duration::from_millis(200))
        );
        assert_eq!(
            session.batch_due(t0 + Duration::from_millis(200)),
            BatchDue::Now
        );
        session.on_buffer_head(
            BufferHead {
                last_seq: 110,
                avg_event_bytes: 300,
            },
            t0,
        );
        assert_eq!(
            session.batch_due(t0),
            BatchDue::Now,
            "100 pending events fill a batch"
        );
        session.on_buffer_head(
            BufferHead {
                last_seq: 20,
                avg_event_bytes: 1 << 19,
            },
            t0,
        );
        assert_eq!(
            session.batch_due(t0),
            BatchDue::Now,
            "10 events of 512 KiB fill 1 MiB"
        );
    }

    #[test]
    fn window_limits_in_flight_and_acks_free_it() {
        let t0 = Instant::now();
        let mut session = UplinkSession::new(limits());
        session.on_welcome(welcome(0, 64)).unwrap();
        session.on_buffer_head(
            BufferHead {
                last_seq: 500,
                avg_event_bytes: 10,
            },
            t0,
        );
        session.on_batch_sent(100, 100, t0);
        session.on_batch_sent(200, 100, t0);
        assert_eq!(session.batch_due(t0), BatchDue::Idle, "window of 2 is full");
        let t1 = t0 + Duration::from_millis(5);
        let acked = session
            .on_ack(
                &Ack {
                    last_seq: 200,
                    outcome: AckOutcome::Stored { n_new: 100 },
                },
                t1,
            )
            .unwrap();
        assert_eq!(
            (acked.after_seq, acked.last_seq, acked.round_trip),
            (100, 200, Duration::from_millis(5))
        );
        assert_eq!(session.batch_due(t1), BatchDue::Now);
        assert_eq!(session.dispatched_seq(), 200);
    }

    #[test]
    fn the_chain_starts_at_the_delivered_mark_on_protocol_4_only() {
        let mut session = UplinkSession::new(limits());
        assert_eq!(session.resume(100), None, "nothing before the welcome");
        assert_eq!(session.on_welcome(welcome(10, 8)), Ok(10));
        assert_eq!(
            session.resume(100),
            Some(AgentMessage::Resume(Resume { delivered_seq: 100 }))
        );
        assert_eq!(session.dispatched_seq(), 100);
        // A delivered mark below the Welcome's changes nothing.
        let mut session = UplinkSession::new(limits());
        session.on_welcome(welcome(10, 8)).unwrap();
        assert!(session.resume(5).is_some());
        assert_eq!(session.dispatched_seq(), 10);
        // An aggregator on protocol 3 gets no Resume; the chain starts at its mark.
        let mut session = UplinkSession::new(limits());
        let mut old = welcome(10, 8);
        old.protocol_version = 3;
        session.on_welcome(old).unwrap();
        assert_eq!(session.resume(100), None);
        assert_eq!(session.dispatched_seq(), 10);
    }

    #[test]
    fn aggregator_lowers_the_window() {
        let mut session = UplinkSession::new(limits());
        session.on_welcome(welcome(0, 1)).unwrap();
        assert_eq!(session.limits().max_in_flight_batches, 1);
    }

    #[test]
    fn unknown_and_rejected_acks_are_errors() {
        let t0 = Instant::now();
        let mut session = UplinkSession::new(limits());
        assert!(matches!(
            session.on_ack(
                &Ack {
                    last_seq: 1,
                    outcome: AckOutcome::Duplicate
                },
                t0
            ),
            Err(ProtocolError::BeforeHandshake { .. })
        ));
        session.on_welcome(welcome(0, 8)).unwrap();
        session.on_buffer_head(
            BufferHead {
                last_seq: 5,
                avg_event_bytes: 10,
            },
            t0,
        );
        session.on_batch_sent(5, 5, t0);
        assert_eq!(
            session.on_ack(
                &Ack {
                    last_seq: 4,
                    outcome: AckOutcome::Duplicate
                },
                t0
            ),
            Err(ProtocolError::UnexpectedAck { last_seq: 4 })
        );
        let rejected = Ack {
            last_seq: 5,
            outcome: AckOutcome::Rejected {
                reason: "disk".into(),
            },
        };
        assert!(matches!(
            session.on_ack(&rejected, t0),
            Err(ProtocolError::Rejected { .. })
        ));
    }

    fn hello_for(min: u16, max: u16) -> Hello {
        Hello {
            min_protocol_version: min,
            max_protocol_version: max,
            agent_version: "x".into(),
            config_hash: String::new(),
            labels: BTreeMap::new(),
            last_assigned_seq: 0,
        }
    }

    fn status() -> Status {
        Status {
            config_hash: "h".into(),
            config_version: 3,
            agent_version: "0".into(),
            components: Vec::new(),
            n_buffered_events: 5,
            buffered_bytes: 50,
            oldest_unshipped_age_ms: 7,
            drops: BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 3)]),
            counters: BTreeMap::new(),
        }
    }

    fn push() -> ConfigPush {
        ConfigPush {
            version: 1,
            hash: "h".into(),
            document: String::new(),
            files: Vec::new(),
        }
    }

    #[test]
    fn protocol_1_connection_sends_heartbeats_and_refuses_pushes() {
        let mut session = UplinkSession::new(limits());
        assert_eq!(
            session.status_message(status()),
            None,
            "nothing before welcome"
        );
        let mut first = welcome(0, 8);
        first.protocol_version = 1;
        session.on_welcome(first).unwrap();
        assert!(!session.is_fleet());
        assert_eq!(
            session.status_message(status()),
            Some(AgentMessage::Heartbeat(Heartbeat {
                n_buffered_events: 5,
                buffered_bytes: 50,
                oldest_unshipped_age_ms: 7,
                n_dropped_events: 5,
            }))
        );
        assert_eq!(
            session.on_control(AggregatorMessage::ConfigPush(push())),
            Err(ProtocolError::NotOnThisVersion {
                what: "a config push",
                version: 1
            })
        );
        let result = ConfigResult {
            version: 1,
            hash: "h".into(),
            outcome: crate::wire::ConfigOutcome::Applied,
        };
        assert_eq!(session.config_result_message(result), None);
        assert!(check_agent_message(1, &AgentMessage::Status(status())).is_err());
        assert!(
            check_agent_message(
                1,
                &AgentMessage::Heartbeat(Heartbeat {
                    n_buffered_events: 0,
                    buffered_bytes: 0,
                    oldest_unshipped_age_ms: 0,
                    n_dropped_events: 0,
                })
            )
            .is_ok()
        );
    }

    #[test]
    fn fleet_connection_sends_status_and_takes_pushes() {
        if PROTOCOL_VERSION < FLEET_PROTOCOL_VERSION {
            // This build does not speak the fleet protocol yet: a Welcome naming it is refused.
            let mut session = UplinkSession::new(limits());
            let mut fleet = welcome(0, 8);
            fleet.protocol_version = FLEET_PROTOCOL_VERSION;
            assert!(session.on_welcome(fleet).is_err());
            return;
        }
        let mut session = UplinkSession::new(limits());
        let mut fleet = welcome(0, 8);
        fleet.protocol_version = FLEET_PROTOCOL_VERSION;
        session.on_welcome(fleet).unwrap();
        assert!(session.is_fleet());
        assert_eq!(
            session.status_message(status()),
            Some(AgentMessage::Status(status()))
        );
        assert_eq!(
            session.on_control(AggregatorMessage::ConfigPush(push())),
            Ok(ControlAction::ConfigPush(push()))
        );
        let result = ConfigResult {
            version: 1,
            hash: "h".into(),
            outcome: crate::wire::ConfigOutcome::Applied,
        };
        assert_eq!(
            session.config_result_message(result.clone()),
            Some(AgentMessage::ConfigResult(result))
        );
        assert_eq!(
            session.on_control(AggregatorMessage::Welcome(welcome(0, 8))),
            Err(ProtocolError::SecondWelcome)
        );
        assert!(
            check_agent_message(FLEET_PROTOCOL_VERSION, &AgentMessage::Status(status())).is_ok()
        );
        assert!(
            check_agent_message(
                FLEET_PROTOCOL_VERSION,
                &AgentMessage::Hello(hello_for(1, 2))
            )
            .is_err()
        );
    }
}
