//! Sans-IO session logic for both ends of an agent connection.
//!
//! [`UplinkSession`] is the agent's side: handshake, when a batch is due, the in-flight window
//! and which buffer rows an ack makes deletable. The aggregator's side is [`IngestHandshake`]
//! (expect a Hello, refuse it or negotiate a version, build the Welcome around the stored
//! high-water mark), then [`IngestSession`] (what the control stream may carry on that version)
//! and [`IngestSequencer`], which releases batches to the writer strictly in chain order,
//! whatever order their streams arrive in. None of them touches a socket or a clock: drivers
//! (`agent::uplink`, `aggregator::ingest`) feed them messages and `now`.
//!
//! Versions: the agent offers `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` in its Hello, the
//! aggregator picks the highest both speak ([`negotiate_version`]) and names it in the Welcome.
//! From [`FLEET_PROTOCOL_VERSION`] on, the agent sends [`Status`] instead of [`Heartbeat`] and the
//! control stream carries config pushes and their results; [`UplinkSession::status_message`],
//! [`UplinkSession::on_control`] and [`IngestSession::on_control`] keep each side to its version.
//! From [`RESUME_PROTOCOL_VERSION`] on, the agent's first control message after the Welcome is
//! a `Resume` naming its shipped mark ([`UplinkSession::resume`], [`IngestSession::on_resume`]):
//! both sides start the batch chain at the higher of it and the Welcome's mark, so an agent that
//! moved between aggregators is not held back waiting for batches another one acknowledged.
//!
//! `tests/pair.rs` drives both sides against each other on a virtual clock, through loss,
//! reordering, duplication and reconnects.
//!
//! [`Status`]: crate::wire::Status
//! [`Heartbeat`]: crate::wire::Heartbeat
//! [`FLEET_PROTOCOL_VERSION`]: crate::wire::FLEET_PROTOCOL_VERSION
//! [`RESUME_PROTOCOL_VERSION`]: crate::wire::RESUME_PROTOCOL_VERSION

mod ingest;
mod uplink;

pub use ingest::{
    Accepted, IngestHandshake, IngestSequencer, IngestSession, Refusal, Report, WelcomeTerms,
    check_agent_message, negotiate_version,
};
pub use uplink::{
    Acked, BatchDue, BufferHead, ControlAction, InFlight, UplinkLimits, UplinkSession,
};

use crate::wire::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

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
    #[error("{what} is not allowed on protocol version {version}")]
    NotOnThisVersion { what: &'static str, version: u16 },
    #[error("a second welcome on the control stream")]
    SecondWelcome,
    #[error("expected a hello, got {got}")]
    ExpectedHello { got: &'static str },
    #[error("expected the agent's resume right after the welcome, got {got}")]
    ExpectedResume { got: &'static str },
}
