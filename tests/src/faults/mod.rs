//! Fault injection and the referee of the reliability suite (`tests/tests/reliability.rs`), in
//! three parts that do not know each other's insides:
//!
//! - [`proxy`]: [`FaultProxy`], a UDP proxy between agent and aggregator that, on the test's
//!   command, drops a percentage of datagrams, delays them, reorders them, sends some twice,
//!   limits the link's bandwidth, or cuts the link completely until it is healed; and [`disk`]:
//!   [`SmallDisk`], a buffer filesystem that fills up.
//! - [`load`]: sources that remember exactly which events the agent (or the broker)
//!   acknowledged: the HTTP load ([`http_load`] on the shared [`crate::load::Load`]), an MQTT
//!   publisher, and the probes that time recovery.
//! - [`referee`]: [`Referee`] compares, by event id, what was acknowledged with what the
//!   aggregator stored (through SQL only): lost = acknowledged but not stored, duplicated = stored
//!   more than once, and it prints one summary line per scenario.
//!
//! Nothing here decides an outcome by timing: waits poll a condition with a deadline. The only
//! sleeps are the faults themselves (a datagram's delay, a client's pause after a 503).

pub mod disk;
pub mod load;
pub mod proxy;
pub mod referee;

pub use crate::load::AckedEvent;
pub use disk::SmallDisk;
pub use load::{
    MqttPublisher, MqttStream, PROBE_STREAM, Probe, http_load, probe_recovery, telemetry_payload,
};
pub use proxy::{FaultProxy, Faults, ProxyStats};
pub use referee::{RECOVERY_BOUND, Referee, SUMMARY_FILE_ENV, Verdict};
