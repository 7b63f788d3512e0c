//! runnel-service: what the agent and the aggregator both need as long-running services, in one
//! place so that a fix lands once: logging set-up and how `main` reports an error
//! ([`logging`]), the process's metrics recorder ([`metrics`]), the health and readiness probes
//! and the systemd supervision loop ([`probes`]), and reading certificates and keys ([`tls`]).
//!
//! Architecture invariant: the two binaries never depend on each other; what they share and
//! what does I/O lives here (unlike `runnel-common`, which does no I/O). This crate knows
//! neither binary's types: everything specific comes in through arguments and the [`Probes`]
//! trait. No protocol, storage or pipeline code belongs here.
//!
//! [`Probes`]: probes::Probes

pub mod logging;
pub mod metrics;
pub mod probes;
pub mod tls;
