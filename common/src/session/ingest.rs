//! The aggregator's side of a connection: the handshake (expect a Hello, refuse it or negotiate
//! a version, build the Welcome around the stored high-water mark), what the control stream may
//! carry after it, and the per-connection sequencer that releases batches in chain order.
//! Driven by `aggregator::ingest`, which does the I/O (streams, frames, the WAL, timeouts).

use std::collections::BTreeMap;

use super::ProtocolError;
use crate::limits::MAX_PARKED_BATCHES;
use crate::wire::{
    AgentMessage, AggregatorMessage, ConfigResult, FLEET_PROTOCOL_VERSION, Heartbeat, Hello,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, RESUME_PROTOCOL_VERSION, Status, Welcome,
};

// Picks the protocol version for a Hello, on the aggregator.
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

/// How an agent message reads in an error.
fn describe(message: &AgentMessage) -> &'static str {
    match message {
        AgentMessage::Hello(_) => "a hello",
        AgentMessage::Heartbeat(_) => "a heartbeat",
        AgentMessage::Status(_) => "a status",
        AgentMessage::ConfigResult(_) => "a config result",
        AgentMessage::Resume(_) => "a resume",
    }
}

/// Checks, on the aggregator, that an agent message after the Hello belongs to the negotiated
/// protocol `version` (a Status on protocol 1 is a confused or hostile peer).
pub fn check_agent_message(version: u16, message: &AgentMessage) -> Result<(), ProtocolError> {
    if let AgentMessage::Hello(_) = message {
        return Err(ProtocolError::NotOnThisVersion {
            what: "a second hello",
            version,
        });
    }
    if let AgentMessage::Resume(_) = message
        && version >= RESUME_PROTOCOL_VERSION
    {
        // Its one place is right after the Welcome ([`IngestSession::on_resume`]).
        return Err(ProtocolError::NotOnThisVersion {
            what: "a second resume",
            version,
        });
    }
    if message.since_protocol() > version {
        return Err(ProtocolError::NotOnThisVersion {
            what: describe(message),
            version,
        });
    }
    Ok(())
}

/// What the aggregator announces in every Welcome besides the version and the mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeTerms {
    /// The agent's in-flight window is lowered to this, never raised.
    pub max_in_flight_batches: u32,
    pub heartbeat_interval_ms: u32,
    pub aggregator_version: String,
}

/// The aggregator's side of a connection before its Welcome: the first control-stream message
/// must be a Hello that offers a version this build speaks.
#[derive(Debug)]
pub struct IngestHandshake {
    agent_id: String,
}

/// Why the aggregator will not serve a connection. The connection closes after it.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub error: ProtocolError,
}

impl Refusal {
    /// What to send on the control stream before closing: an agent whose Hello was refused
    /// learns why; a peer that did not send a Hello gets nothing.
    pub fn reply(&self) -> Option<AggregatorMessage> {
        match self.error {
            ProtocolError::ExpectedHello { .. } => None,
            _ => Some(AggregatorMessage::Refused {
                reason: self.error.to_string(),
            }),
        }
    }

    /// The short reason the connection is closed with.
    pub fn close_reason(&self) -> &'static str {
        match self.error {
            ProtocolError::ExpectedHello { .. } => "expected hello",
            _ => "version",
        }
    }
}

impl IngestHandshake {
    /// `agent_id` is the identity from the verified client certificate; nothing the agent sends
    /// changes it.
    pub fn new(agent_id: impl Into<String>) -> Self {
        IngestHandshake {
            agent_id: agent_id.into(),
        }
    }

    /// Handles the first control-stream message.
    pub fn on_hello(self, message: AgentMessage) -> Result<Accepted, Refusal> {
        let hello = match message {
            AgentMessage::Hello(hello) => hello,
            other => {
                return Err(Refusal {
                    error: ProtocolError::ExpectedHello {
                        got: describe(&other),
                    },
                });
            }
        };
        let version = negotiate_version(&hello).map_err(|error| Refusal { error })?;
        Ok(Accepted {
            agent_id: self.agent_id,
            hello,
            version,
        })
    }
}

/// A Hello the aggregator will serve. The driver looks up the agent's high-water mark, then
/// builds the Welcome with [`Accepted::welcome`].
#[derive(Debug)]
pub struct Accepted {
    agent_id: String,
    hello: Hello,
    version: u16,
}

impl Accepted {
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The version negotiated for this connection.
    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// The Welcome for this connection and the session after it. `high_water_mark` is the last
    /// sequence number stored for this agent: the agent deletes what it holds at or below it, and
    /// the first batch on this connection starts after it, or on protocol 4 after the higher of
    /// it and the agent's delivered mark ([`IngestSession::on_resume`]). The Welcome names this
    /// aggregator's own mark, never the agent's: it is what the agent may delete because it is
    /// stored here.
    pub fn welcome(self, high_water_mark: u64, terms: &WelcomeTerms) -> (Welcome, IngestSession) {
        debug_assert!(self.version >= MIN_PROTOCOL_VERSION && self.version <= PROTOCOL_VERSION);
        let welcome = Welcome {
            protocol_version: self.version,
            high_water_mark,
            max_in_flight_batches: terms.max_in_flight_batches,
            heartbeat_interval_ms: terms.heartbeat_interval_ms,
            agent_id: self.agent_id,
            aggregator_version: terms.aggregator_version.clone(),
        };
        let session = IngestSession {
            hello: self.hello,
            version: self.version,
            high_water_mark,
            chain_start: high_water_mark,
            awaiting_resume: self.version >= RESUME_PROTOCOL_VERSION,
        };
        (welcome, session)
    }
}

/// A control-stream message after the Welcome, checked against the connection's version.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Protocol 1: the agent's buffer.
    Heartbeat(Heartbeat),
    /// The fleet protocol: config, health, buffer and counters.
    Status(Status),
    /// The fleet protocol: the answer to a config push.
    ConfigResult(ConfigResult),
}

/// The aggregator's side of a connection after its Welcome.
#[derive(Debug)]
pub struct IngestSession {
    hello: Hello,
    version: u16,
    high_water_mark: u64,
    /// Where this connection's batch chain starts: the Welcome's mark, raised by the agent's
    /// delivered mark on protocol 4.
    chain_start: u64,
    /// Protocol 4 before the agent's Resume: no batch may be sequenced yet.
    awaiting_resume: bool,
}

impl IngestSession {
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    pub fn protocol_version(&self) -> u16 {
        self.version
    }

    /// Whether this connection speaks fleet configuration (status, config push and result).
    pub fn is_fleet(&self) -> bool {
        self.version >= FLEET_PROTOCOL_VERSION
    }

    /// The mark named in the Welcome.
    pub fn high_water_mark(&self) -> u64 {
        self.high_water_mark
    }

    /// Whether the driver must read the agent's [`AgentMessage::Resume`] (the first control
    /// message after the Welcome, on protocol 4) and hand it to [`IngestSession::on_resume`]
    /// before it accepts any batch.
    pub fn awaiting_resume(&self) -> bool {
        self.awaiting_resume
    }

    /// Handles the first control message after the Welcome on protocol 4, which must be the
    /// agent's Resume. Returns the chain start, `max(Welcome mark, delivered mark)`: the agent
    /// will never send what lies at or below it (another aggregator acknowledged it), so the
    /// driver raises the WAL's mark for the agent to it before the first batch, and the
    /// sequencer releases from it. Rows above it wait in the WAL until the table's mark reaches
    /// it (ARCHITECTURE.md, the invariant on the events table), so nothing is skipped or doubled.
    pub fn on_resume(&mut self, message: AgentMessage) -> Result<u64, ProtocolError> {
        if !self.awaiting_resume {
            return Err(ProtocolError::NotOnThisVersion {
                what: if self.version >= RESUME_PROTOCOL_VERSION {
                    "a second resume"
                } else {
                    "a resume"
                },
                version: self.version,
            });
        }
        let AgentMessage::Resume(resume) = message else {
            return Err(ProtocolError::ExpectedResume {
                got: describe(&message),
            });
        };
        self.awaiting_resume = false;
        self.chain_start = self.high_water_mark.max(resume.delivered_seq);
        Ok(self.chain_start)
    }

    /// Where this connection's batch chain starts (the Welcome's mark until a Resume raised it).
    pub fn chain_start(&self) -> u64 {
        self.chain_start
    }

    /// The reorder buffer for this connection's batches, starting at the chain start: the
    /// Welcome's mark, or on protocol 4 what [`IngestSession::on_resume`] returned.
    pub fn sequencer<T>(&self) -> IngestSequencer<T> {
        debug_assert!(
            !self.awaiting_resume,
            "the sequencer starts after the resume"
        );
        IngestSequencer::new(self.chain_start)
    }

    /// Handles a control-stream message after the Welcome. An error ends the connection.
    pub fn on_control(&self, message: AgentMessage) -> Result<Report, ProtocolError> {
        if self.awaiting_resume {
            return Err(ProtocolError::ExpectedResume {
                got: describe(&message),
            });
        }
        check_agent_message(self.version, &message)?;
        match message {
            AgentMessage::Heartbeat(beat) => Ok(Report::Heartbeat(beat)),
            AgentMessage::Status(status) => Ok(Report::Status(status)),
            AgentMessage::ConfigResult(result) => Ok(Report::ConfigResult(result)),
            AgentMessage::Hello(_) => Err(ProtocolError::NotOnThisVersion {
                what: "a second hello",
                version: self.version,
            }),
            AgentMessage::Resume(_) => Err(ProtocolError::NotOnThisVersion {
                what: "a second resume",
                version: self.version,
            }),
        }
    }
}

// The aggregator's per-connection reorder buffer. Batch streams are independent, so batch 2
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
    use crate::wire::Resume;

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

    #[test]
    fn negotiates_protocol_1_with_an_old_agent() {
        // An agent of the first release offers 1..=1 and gets 1, whatever this build speaks.
        assert_eq!(negotiate_version(&hello_for(1, 1)), Ok(1));
    }

    #[test]
    fn negotiates_the_fleet_protocol_when_both_speak_it() {
        let expected = FLEET_PROTOCOL_VERSION.min(PROTOCOL_VERSION);
        assert_eq!(
            negotiate_version(&hello_for(1, FLEET_PROTOCOL_VERSION)),
            Ok(expected)
        );
        assert_eq!(
            negotiate_version(&hello_for(1, FLEET_PROTOCOL_VERSION + 5)),
            Ok(PROTOCOL_VERSION)
        );
        // An agent that insists on a version this build does not speak is refused.
        assert_eq!(
            negotiate_version(&hello_for(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2)),
            Err(ProtocolError::VersionMismatch {
                peer_min: PROTOCOL_VERSION + 1,
                peer_max: PROTOCOL_VERSION + 2
            })
        );
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

    fn terms() -> WelcomeTerms {
        WelcomeTerms {
            max_in_flight_batches: 8,
            heartbeat_interval_ms: 5_000,
            aggregator_version: "9.9.9".into(),
        }
    }

    fn heartbeat() -> Heartbeat {
        Heartbeat {
            n_buffered_events: 1,
            buffered_bytes: 2,
            oldest_unshipped_age_ms: 3,
            n_dropped_events: 4,
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
            drops: BTreeMap::new(),
            counters: BTreeMap::new(),
        }
    }

    #[test]
    fn a_hello_gets_a_welcome_with_the_mark_and_the_identity_from_the_certificate() {
        let accepted = IngestHandshake::new("shop-1")
            .on_hello(AgentMessage::Hello(hello_for(1, PROTOCOL_VERSION)))
            .expect("a hello this build speaks");
        assert_eq!(accepted.protocol_version(), PROTOCOL_VERSION);
        assert_eq!(accepted.hello().max_protocol_version, PROTOCOL_VERSION);
        let (welcome, mut session) = accepted.welcome(42, &terms());
        assert_eq!(
            welcome,
            Welcome {
                protocol_version: PROTOCOL_VERSION,
                high_water_mark: 42,
                max_in_flight_batches: 8,
                heartbeat_interval_ms: 5_000,
                agent_id: "shop-1".into(),
                aggregator_version: "9.9.9".into(),
            }
        );
        assert_eq!(session.high_water_mark(), 42);
        assert_eq!(session.protocol_version(), PROTOCOL_VERSION);
        assert!(session.awaiting_resume());
        // An agent that delivered nothing elsewhere: the chain starts at the Welcome's mark.
        assert_eq!(
            session.on_resume(AgentMessage::Resume(Resume { delivered_seq: 7 })),
            Ok(42)
        );
        let mut sequencer = session.sequencer::<char>();
        assert_eq!(sequencer.released_seq(), 42);
        assert_eq!(sequencer.offer(42, 50, 'a').unwrap(), vec!['a']);
    }

    /// An agent that moved here from another aggregator: its delivered mark is above what this
    /// aggregator stored, and the chain starts there; the Welcome still names this one's mark.
    #[test]
    fn the_chain_starts_at_the_agents_delivered_mark_when_it_is_higher() {
        let (welcome, mut session) = IngestHandshake::new("a")
            .on_hello(AgentMessage::Hello(hello_for(1, PROTOCOL_VERSION)))
            .expect("the newest protocol")
            .welcome(0, &terms());
        assert_eq!(
            welcome.high_water_mark, 0,
            "the Welcome names only what is stored here"
        );
        assert_eq!(
            session.on_control(AgentMessage::Status(status())),
            Err(ProtocolError::ExpectedResume { got: "a status" })
        );
        assert_eq!(
            session.on_resume(AgentMessage::Status(status())),
            Err(ProtocolError::ExpectedResume { got: "a status" })
        );
        assert_eq!(
            session.on_resume(AgentMessage::Resume(Resume { delivered_seq: 100 })),
            Ok(100)
        );
        assert_eq!(session.chain_start(), 100);
        assert_eq!(session.high_water_mark(), 0);
        let mut sequencer = session.sequencer::<char>();
        assert_eq!(sequencer.offer(100, 110, 'a').unwrap(), vec!['a']);
        assert_eq!(
            session.on_resume(AgentMessage::Resume(Resume { delivered_seq: 200 })),
            Err(ProtocolError::NotOnThisVersion {
                what: "a second resume",
                version: PROTOCOL_VERSION
            })
        );
    }

    /// An agent or aggregator on protocol 3 works as before: no Resume, the chain starts at the
    /// Welcome's mark, and a Resume is not allowed.
    #[test]
    fn protocol_3_has_no_resume() {
        let (_, mut session) = IngestHandshake::new("a")
            .on_hello(AgentMessage::Hello(hello_for(1, 3)))
            .expect("protocol 3")
            .welcome(9, &terms());
        assert!(!session.awaiting_resume());
        assert_eq!(session.sequencer::<char>().released_seq(), 9);
        assert_eq!(
            session.on_control(AgentMessage::Resume(Resume { delivered_seq: 50 })),
            Err(ProtocolError::NotOnThisVersion {
                what: "a resume",
                version: 3
            })
        );
        assert_eq!(
            session.on_resume(AgentMessage::Resume(Resume { delivered_seq: 50 })),
            Err(ProtocolError::NotOnThisVersion {
                what: "a resume",
                version: 3
            })
        );
        assert_eq!(session.chain_start(), 9);
    }

    #[test]
    fn anything_but_a_hello_first_is_refused_without_a_reply() {
        let refusal = IngestHandshake::new("a")
            .on_hello(AgentMessage::Heartbeat(heartbeat()))
            .expect_err("a heartbeat is not a hello");
        assert_eq!(
            refusal.error,
            ProtocolError::ExpectedHello { got: "a heartbeat" }
        );
        assert_eq!(refusal.reply(), None);
        assert_eq!(refusal.close_reason(), "expected hello");
    }

    #[test]
    fn a_hello_without_a_common_version_is_refused_with_the_reason() {
        let refusal = IngestHandshake::new("a")
            .on_hello(AgentMessage::Hello(hello_for(
                PROTOCOL_VERSION + 1,
                PROTOCOL_VERSION + 2,
            )))
            .expect_err("no common version");
        assert_eq!(
            refusal.error,
            ProtocolError::VersionMismatch {
                peer_min: PROTOCOL_VERSION + 1,
                peer_max: PROTOCOL_VERSION + 2,
            }
        );
        let Some(AggregatorMessage::Refused { reason }) = refusal.reply() else {
            panic!("a refused hello is answered with Refused");
        };
        assert!(reason.contains("no common protocol version"), "{reason}");
        assert_eq!(refusal.close_reason(), "version");
    }

    #[test]
    fn the_control_stream_carries_what_the_version_allows() {
        let (_, old) = IngestHandshake::new("a")
            .on_hello(AgentMessage::Hello(hello_for(1, 1)))
            .expect("protocol 1")
            .welcome(0, &terms());
        assert!(!old.is_fleet());
        assert_eq!(
            old.on_control(AgentMessage::Heartbeat(heartbeat())),
            Ok(Report::Heartbeat(heartbeat()))
        );
        assert_eq!(
            old.on_control(AgentMessage::Status(status())),
            Err(ProtocolError::NotOnThisVersion {
                what: "a status",
                version: 1
            })
        );
        assert_eq!(
            old.on_control(AgentMessage::Hello(hello_for(1, 1))),
            Err(ProtocolError::NotOnThisVersion {
                what: "a second hello",
                version: 1
            })
        );
        let (_, mut fleet) = IngestHandshake::new("a")
            .on_hello(AgentMessage::Hello(hello_for(1, PROTOCOL_VERSION)))
            .expect("the newest protocol")
            .welcome(0, &terms());
        assert!(fleet.is_fleet());
        // On protocol 4 the Resume comes first, then once only.
        assert_eq!(
            fleet.on_control(AgentMessage::Status(status())),
            Err(ProtocolError::ExpectedResume { got: "a status" })
        );
        fleet
            .on_resume(AgentMessage::Resume(Resume { delivered_seq: 0 }))
            .expect("the resume");
        assert_eq!(
            fleet.on_control(AgentMessage::Resume(Resume { delivered_seq: 0 })),
            Err(ProtocolError::NotOnThisVersion {
                what: "a second resume",
                version: PROTOCOL_VERSION
            })
        );
        assert_eq!(
            fleet.on_control(AgentMessage::Status(status())),
            Ok(Report::Status(status()))
        );
        let result = ConfigResult {
            version: 1,
            hash: "h".into(),
            outcome: crate::wire::ConfigOutcome::Applied,
        };
        assert_eq!(
            fleet.on_control(AgentMessage::ConfigResult(result.clone())),
            Ok(Report::ConfigResult(result))
        );
    }
}
