//! Sans-IO session logic for both ends of an agent connection.
//!
//! [`UplinkSession`] is the agent's side: handshake, when a batch is due, the in-flight window
//! and which buffer rows an ack makes deletable. [`IngestSequencer`] is the aggregator's side: it
//! releases batches to the writer strictly in chain order, whatever order their streams arrive
//! in. Neither touches a socket or a clock: drivers feed them messages and `now`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::limits::MAX_PARKED_BATCHES;
use crate::wire::{Ack, AckOutcome, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Welcome};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error(
        "no common protocol version: peer speaks {peer_min}..={peer_max}, we speak {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
    )]
    VersionMismatch { peer_min: u16, peer_max: u16 },
    #[error("received {what} before the handshake completed")]
    BeforeHandshake { what: &'static str },
    #[error("ack for batch ending at seq {last_seq}, which is not in flight")]
    UnexpectedAck { last_seq: u64 },
    #[error("aggregator rejected the batch ending at seq {last_seq}: {reason}")]
    Rejected { last_seq: u64, reason: String },
    #[error("batch after seq {after_seq} is already parked")]
    DuplicateBatch { after_seq: u64 },
    #[error("too many batches waiting for an earlier one ({n_parked})")]
    TooManyParked { n_parked: usize },
    #[error("batch range ({after_seq}, {last_seq}] is empty or reversed")]
    BadRange { after_seq: u64, last_seq: u64 },
    #[error("{0}")]
    Refused(String),
}

/// Picks the protocol version for a Hello, on the aggregator.
pub fn negotiate_version(hello: &Hello) -> Result<u16, ProtocolError> {
    let version = hello.max_protocol_version.min(PROTOCOL_VERSION);
    if version < hello.min_protocol_version || version < MIN_PROTOCOL_VERSION {
        return Err(ProtocolError::VersionMismatch {
            peer_min: hello.min_protocol_version,
            peer_max: hello.max_protocol_version,
        });
    }
    Ok(version)
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

    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
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

/// The aggregator's per-connection reorder buffer. Batch streams are independent, so batch 2
/// may be read before batch 1; committing it first would move the high-water mark past batch 1,
/// which would then be ignored as a replay and lost. The sequencer releases batches to the
/// writer only when the chain before them has been released.
#[derive(Debug)]
pub struct IngestSequencer<T> {
    /// Highest `last_seq` released to the writer (starts at the stored high-water mark).
    released_seq: u64,
    /// Waiting for an earlier batch, by `after_seq`.
    parked: BTreeMap<u64, (u64, T)>,
    max_parked: usize,
}

impl<T> IngestSequencer<T> {
    pub fn new(high_water_mark: u64) -> Self {
        IngestSequencer {
            released_seq: high_water_mark,
            parked: BTreeMap::new(),
            max_parked: MAX_PARKED_BATCHES,
        }
    }

    pub fn with_max_parked(mut self, max_parked: usize) -> Self {
        self.max_parked = max_parked;
        self
    }

    pub fn released_seq(&self) -> u64 {
        self.released_seq
    }

    pub fn n_parked(&self) -> usize {
        self.parked.len()
    }

    /// Offers a batch covering `(after_seq, last_seq]`. Returns every batch that may now go to
    /// the writer, in chain order (possibly none, if this one waits for an earlier batch).
    /// A batch whose range starts at or below what was released goes through at once: the
    /// writer drops the events it already has (replays after a reconnect).
    pub fn offer(
        &mut self,
        after_seq: u64,
        last_seq: u64,
        item: T,
    ) -> Result<Vec<T>, ProtocolError> {
        if last_seq <= after_seq {
            return Err(ProtocolError::BadRange {
                after_seq,
                last_seq,
            });
        }
        if after_seq > self.released_seq {
            if self.parked.contains_key(&after_seq) {
                return Err(ProtocolError::DuplicateBatch { after_seq });
            }
            if self.parked.len() >= self.max_parked {
                return Err(ProtocolError::TooManyParked {
                    n_parked: self.parked.len(),
                });
            }
            self.parked.insert(after_seq, (last_seq, item));
            return Ok(Vec::new());
        }
        let mut ready = vec![item];
        self.released_seq = self.released_seq.max(last_seq);
        while let Some(entry) = self.parked.first_entry() {
            if *entry.key() > self.released_seq {
                break;
            }
            let (last_seq, item) = entry.remove();
            self.released_seq = self.released_seq.max(last_seq);
            ready.push(item);
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn version_negotiation() {
        let mut hello = Hello {
            min_protocol_version: 1,
            max_protocol_version: 7,
            agent_version: "x".into(),
            config_hash: String::new(),
            labels: BTreeMap::new(),
            last_assigned_seq: 0,
        };
        assert_eq!(negotiate_version(&hello), Ok(PROTOCOL_VERSION));
        hello.min_protocol_version = PROTOCOL_VERSION + 1;
        assert!(negotiate_version(&hello).is_err());
    }

    #[test]
    fn sequencer_releases_in_chain_order() {
        let mut sequencer = IngestSequencer::new(100);
        assert_eq!(sequencer.offer(300, 400, 'c').unwrap(), Vec::<char>::new());
        assert_eq!(sequencer.offer(200, 300, 'b').unwrap(), Vec::<char>::new());
        assert_eq!(sequencer.offer(100, 200, 'a').unwrap(), vec!['a', 'b', 'c']);
        assert_eq!(sequencer.released_seq(), 400);
        assert_eq!(sequencer.n_parked(), 0);
        // A replay below the mark goes straight through; the writer drops what it has.
        assert_eq!(sequencer.offer(50, 150, 'r').unwrap(), vec!['r']);
        assert_eq!(sequencer.released_seq(), 400);
    }

    #[test]
    fn sequencer_limits_parking() {
        let mut sequencer = IngestSequencer::new(0).with_max_parked(1);
        sequencer.offer(10, 20, ()).unwrap();
        assert_eq!(
            sequencer.offer(10, 20, ()),
            Err(ProtocolError::DuplicateBatch { after_seq: 10 })
        );
        assert_eq!(
            sequencer.offer(30, 40, ()),
            Err(ProtocolError::TooManyParked { n_parked: 1 })
        );
        assert_eq!(
            sequencer.offer(5, 5, ()),
            Err(ProtocolError::BadRange {
                after_seq: 5,
                last_seq: 5
            })
        );
    }
}
