//! Two aggregators and one agent, sans-IO, on a virtual clock: the agent's [`UplinkSession`]
//! against two aggregators' [`IngestHandshake`], [`IngestSession`] and [`IngestSequencer`],
//! driven the way `agent::uplink` and `aggregator::ingest` drive them, each aggregator with a
//! model WAL (the chain check of `aggregator::wal`, and `Wal::raise_marks`) and both in front of
//! one model events table (the chain rule of `aggregator::store`'s flush: a batch commits only as
//! the next link from the table's mark, rows at or below the mark are left out, a batch above
//! the mark waits in its WAL).
//!
//! The agent delivers to A, moves to B while A is unreachable (holding nothing unacknowledged:
//! its chain continues after what A acknowledged, above B's own mark), and returns to A. Checked:
//! every batch is released by exactly one aggregator's sequencer, in chain order, and none is
//! parked when its connection has nothing more in flight; every event ends up in the table
//! exactly once, whatever order the aggregators flush in. The same walk on protocol 3 (no
//! `Resume`) parks B's first batch forever, which is the stall the `Resume` removes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use runnel_common::session::{
    BatchDue, BufferHead, IngestHandshake, IngestSequencer, IngestSession, UplinkLimits,
    UplinkSession, WelcomeTerms,
};
use runnel_common::wire::{
    Ack, AckOutcome, AgentMessage, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    RESUME_PROTOCOL_VERSION,
};

const AGENT_ID: &str = "failover-agent";
const MAX_BATCH_AGE: Duration = Duration::from_millis(50);

/// A batch on its way: its range and the events in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SimBatch {
    after_seq: u64,
    last_seq: u64,
    events: Vec<u64>,
}

/// One aggregator: a WAL that outlives connections, and the connection's session state.
#[derive(Debug, Default)]
struct Aggregator {
    name: &'static str,
    /// The WAL's high-water mark for the agent.
    mark: u64,
    /// Batches committed to the WAL and not yet flushed to the table.
    wal: Vec<SimBatch>,
    /// Every batch its sequencers released, in release order.
    released: Vec<(u64, u64)>,
}

impl Aggregator {
    fn new(name: &'static str) -> Aggregator {
        Aggregator {
            name,
            ..Aggregator::default()
        }
    }

    /// `aggregator::wal`: a batch whose predecessor is missing is a gap; events at or below the
    /// mark are replays.
    fn commit(&mut self, batch: &SimBatch) -> AckOutcome {
        assert!(
            batch.after_seq <= self.mark,
            "{}: the WAL refuses ({}, {}] as a gap (mark {})",
            self.name,
            batch.after_seq,
            batch.last_seq,
            self.mark
        );
        if batch.last_seq <= self.mark {
            return AckOutcome::Duplicate;
        }
        let new: Vec<u64> = batch
            .events
            .iter()
            .copied()
            .filter(|seq| *seq > self.mark)
            .collect();
        let n_new = new.len() as u32;
        self.wal.push(SimBatch {
            after_seq: batch.after_seq,
            last_seq: batch.last_seq,
            events: new,
        });
        self.mark = batch.last_seq;
        AckOutcome::Stored { n_new }
    }

    /// `aggregator::store`'s flush: commits the WAL's batches that extend the table's chain
    /// from its mark, leaves out rows at or below it, and leaves in the WAL what follows a gap.
    /// Returns how many batches it committed.
    fn flush(&mut self, table: &mut Table) -> usize {
        let mut n_committed = 0;
        loop {
            let position = self
                .wal
                .iter()
                .position(|batch| batch.after_seq <= table.mark);
            let Some(position) = position else {
                break;
            };
            let batch = self.wal.remove(position);
            for seq in batch.events.iter().filter(|seq| **seq > table.mark) {
                *table.rows.entry(*seq).or_insert(0) += 1;
            }
            table.mark = table.mark.max(batch.last_seq);
            n_committed += 1;
        }
        n_committed
    }
}

/// The events table: the agent's mark (its transaction identifier) and how often each event
/// was committed.
#[derive(Debug, Default)]
struct Table {
    mark: u64,
    rows: BTreeMap<u64, u32>,
}

/// The agent: a buffer and its shipped mark (`Buffer::shipped_seq`), and the virtual clock.
struct Agent {
    buffer: BTreeSet<u64>,
    last_seq: u64,
    shipped_seq: u64,
    max_version: u16,
    now: Instant,
}

impl Agent {
    fn produce(&mut self, n_events: u64) {
        for _ in 0..n_events {
            self.last_seq += 1;
            self.buffer.insert(self.last_seq);
        }
    }

    /// `Buffer::delete_range` (also what `Buffer::reconcile` does below a mark).
    fn delete(&mut self, after_seq: u64, last_seq: u64) {
        self.buffer
            .retain(|seq| *seq <= after_seq || *seq > last_seq);
        self.shipped_seq = self.shipped_seq.max(last_seq);
    }
}

/// One connection between the agent and `aggregator`, handshake done.
struct Connection {
    uplink: UplinkSession,
    ingest: IngestSession,
    sequencer: IngestSequencer<SimBatch>,
    /// `last_seq` of the previous batch the sequencer released on this connection.
    chain_seq: u64,
}

fn connect(agent: &mut Agent, aggregator: &mut Aggregator) -> Connection {
    let hello = Hello {
        min_protocol_version: MIN_PROTOCOL_VERSION,
        max_protocol_version: agent.max_version,
        agent_version: "pair".into(),
        config_hash: String::new(),
        labels: Default::default(),
        last_assigned_seq: agent.last_seq,
    };
    let accepted = IngestHandshake::new(AGENT_ID)
        .on_hello(AgentMessage::Hello(hello))
        .expect("a hello both speak");
    let terms = WelcomeTerms {
        max_in_flight_batches: 4,
        heartbeat_interval_ms: 0,
        aggregator_version: "pair".into(),
    };
    let (welcome, mut ingest) = accepted.welcome(aggregator.mark, &terms);
    let mut uplink = UplinkSession::new(UplinkLimits {
        max_in_flight_batches: 4,
        max_batch_events: 10,
        max_batch_bytes: 1 << 20,
        max_batch_age: MAX_BATCH_AGE,
    });
    let mark = uplink.on_welcome(welcome).expect("the welcome");
    // The Welcome names only what this aggregator stored: the agent deletes nothing it holds
    // that is stored nowhere.
    assert_eq!(mark, aggregator.mark);
    if let Some(resume) = uplink.resume(agent.shipped_seq) {
        let chain_start = ingest.on_resume(resume).expect("the resume");
        assert_eq!(
            chain_start,
            uplink.dispatched_seq(),
            "both sides start alike"
        );
        // `aggregator::ingest`: `Wal::raise_marks` before the first batch.
        aggregator.mark = aggregator.mark.max(chain_start);
    } else {
        assert!(!ingest.awaiting_resume());
    }
    let chain_start = uplink.dispatched_seq();
    // `Buffer::reconcile`.
    agent.delete(0, chain_start);
    let sequencer = ingest.sequencer();
    assert_eq!(sequencer.released_seq(), chain_start);
    Connection {
        uplink,
        ingest,
        sequencer,
        chain_seq: chain_start,
    }
}

/// Ships everything the agent holds over `connection`: cuts the due batches (as the uplink
/// driver does, including its skip past rows that are gone), delivers them to the aggregator in
/// reverse order (so early ones park), commits what the sequencer releases and acks it.
/// Returns false when batches stay parked with nothing in flight to release them: a stall.
fn ship(agent: &mut Agent, aggregator: &mut Aggregator, connection: &mut Connection) -> bool {
    for _ in 0..1_000 {
        agent.now += MAX_BATCH_AGE;
        let now = agent.now;
        let session = &mut connection.uplink;
        session.on_buffer_head(
            BufferHead {
                last_seq: agent.last_seq,
                avg_event_bytes: 100,
            },
            now,
        );
        let mut sent = Vec::new();
        while session.batch_due(now) == BatchDue::Now {
            let after_seq = session.dispatched_seq();
            let events: Vec<u64> = agent
                .buffer
                .range(after_seq + 1..)
                .take(session.limits().max_batch_events)
                .copied()
                .collect();
            let Some(&last_seq) = events.last() else {
                // `agent::uplink`: everything pending was removed from the buffer meanwhile.
                session.on_batch_sent(agent.last_seq, 0, now);
                break;
            };
            session.on_batch_sent(last_seq, events.len(), now);
            sent.push(SimBatch {
                after_seq,
                last_seq,
                events,
            });
        }
        if sent.is_empty() {
            let stalled = connection.sequencer.n_parked() > 0;
            return !stalled && agent.buffer.is_empty();
        }
        for batch in sent.into_iter().rev() {
            let ready = connection
                .sequencer
                .offer(batch.after_seq, batch.last_seq, batch.clone())
                .expect("a batch in sequence");
            for released in ready {
                assert_eq!(
                    released.after_seq, connection.chain_seq,
                    "{}: released out of chain order",
                    aggregator.name
                );
                connection.chain_seq = released.last_seq;
                aggregator
                    .released
                    .push((released.after_seq, released.last_seq));
                let outcome = aggregator.commit(&released);
                let acked = connection
                    .uplink
                    .on_ack(
                        &Ack {
                            last_seq: released.last_seq,
                            outcome,
                        },
                        now,
                    )
                    .expect("an ack in flight");
                agent.delete(acked.after_seq, acked.last_seq);
            }
        }
        if connection.uplink.n_in_flight() > 0 && connection.sequencer.n_parked() > 0 {
            // Sent, parked, and nothing more will come on this connection before an ack.
            return false;
        }
    }
    panic!("shipping did not settle");
}

/// The walk: deliver to A, move to B (A unreachable), come back to A. Returns the two
/// aggregators and whether every connection shipped everything without a stall.
fn walk(max_version: u16) -> (Aggregator, Aggregator, bool) {
    let mut agent = Agent {
        buffer: BTreeSet::new(),
        last_seq: 0,
        shipped_seq: 0,
        max_version,
        now: Instant::now(),
    };
    let mut a = Aggregator::new("A");
    let mut b = Aggregator::new("B");

    agent.produce(95);
    let mut to_a = connect(&mut agent, &mut a);
    assert!(
        ship(&mut agent, &mut a, &mut to_a),
        "A ships the first events"
    );
    assert_eq!(a.mark, 95);
    assert!(agent.buffer.is_empty());
    drop(to_a);

    // A is unreachable; the agent holds nothing unacknowledged when it moves to B, and new
    // events arrive after the move.
    let mut to_b = connect(&mut agent, &mut b);
    // The driver polls the buffer right after the Welcome, before new events arrive.
    assert!(ship(&mut agent, &mut b, &mut to_b), "nothing to ship yet");
    agent.produce(47);
    let b_shipped = ship(&mut agent, &mut b, &mut to_b);
    if !b_shipped {
        return (a, b, false);
    }
    assert_eq!(to_b.ingest.chain_start(), 95);
    drop(to_b);

    // Back to A, whose mark is behind what B acknowledged.
    let mut back_to_a = connect(&mut agent, &mut a);
    assert!(
        ship(&mut agent, &mut a, &mut back_to_a),
        "nothing to ship yet"
    );
    agent.produce(33);
    let a_shipped = ship(&mut agent, &mut a, &mut back_to_a);
    (a, b, a_shipped)
}

/// The released ranges of both aggregators, together, are one chain from 0 to `last_seq`:
/// each batch released by exactly one aggregator, none skipped, none twice.
fn assert_one_chain(a: &Aggregator, b: &Aggregator, last_seq: u64) {
    let mut ranges: Vec<(u64, u64, &str)> = a
        .released
        .iter()
        .map(|(after, last)| (*after, *last, a.name))
        .chain(
            b.released
                .iter()
                .map(|(after, last)| (*after, *last, b.name)),
        )
        .collect();
    ranges.sort();
    let mut chain_seq = 0;
    for (after_seq, last_seq, name) in &ranges {
        assert_eq!(
            *after_seq, chain_seq,
            "{name} released ({after_seq}, {last_seq}] but the chain was at {chain_seq}: {ranges:?}"
        );
        chain_seq = *last_seq;
    }
    assert_eq!(chain_seq, last_seq, "{ranges:?}");
}

#[test]
fn an_agent_moves_between_two_aggregators_and_every_batch_is_released_once_in_chain_order() {
    const { assert!(PROTOCOL_VERSION >= RESUME_PROTOCOL_VERSION) };
    let (mut a, mut b, shipped) = walk(PROTOCOL_VERSION);
    assert!(shipped, "a connection stalled: A {a:?}, B {b:?}");
    assert_one_chain(&a, &b, 95 + 47 + 33);
    // The chains on B and back on A started where the other aggregator left off.
    assert_eq!(b.released.first().map(|range| range.0), Some(95));
    assert!(a.released.iter().any(|range| range.0 == 95 + 47));

    // The table decides: B's and A's later rows wait until the mark reaches their chain start,
    // whichever flushes first, and then every event is committed exactly once.
    let mut table = Table::default();
    assert_eq!(
        b.flush(&mut table),
        0,
        "B's rows follow A's, which are not in the table yet"
    );
    assert_eq!(table.mark, 0);
    a.flush(&mut table);
    assert_eq!(table.mark, 95, "A's later rows follow B's");
    assert!(!a.wal.is_empty());
    b.flush(&mut table);
    a.flush(&mut table);
    assert!(a.wal.is_empty() && b.wal.is_empty(), "A {a:?}, B {b:?}");
    assert_eq!(table.mark, 175);
    let expected: BTreeMap<u64, u32> = (1..=175).map(|seq| (seq, 1)).collect();
    assert_eq!(table.rows, expected);
}

/// Without the Resume (an agent or aggregator on protocol 3), B's Welcome says 0, the agent's
/// chain skips past what it no longer holds, and B parks the first batch forever: the stall
/// protocol 4 removes. This shows the walk above can fail.
#[test]
fn on_protocol_3_the_second_aggregator_parks_the_first_batch_forever() {
    let (_, b, shipped) = walk(RESUME_PROTOCOL_VERSION - 1);
    assert!(!shipped, "protocol 3 was expected to stall at B: {b:?}");
    assert!(b.released.is_empty(), "{b:?}");
}
