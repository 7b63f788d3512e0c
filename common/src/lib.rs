//! runnel-common: the event model, the wire protocol between agent and aggregator, framing, the
//! batch codec and the sans-IO session state machines.
//!
//! Architecture invariant: this crate does no I/O and never reads the clock. Time comes in as
//! `now: Instant` arguments; bytes come in as slices. No tokio, quinn, rusqlite, rumqttc or tract
//! here, so every protocol decision can be tested deterministically and fuzzed.
//!
//! Architecture invariant: the types in [`wire`] and [`event`] are a compatibility boundary.
//! Postcard is not self-describing, so enum variants are only ever appended and struct fields
//! never change; golden byte fixtures in `tests/golden.rs` fail when the format moves.

pub mod batch;
pub mod columnar;
pub mod event;
pub mod exposition;
pub mod frame;
pub mod fuzzing;
pub mod human;
pub mod limits;
pub mod log_limit;
pub mod session;
pub mod streams;
pub mod wire;

pub use event::{Event, SourceKind, Value};
