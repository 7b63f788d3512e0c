//! The streams both binaries know by name: the agent writes events to them, the aggregator
//! serves a view over each. One definition, so the two sides cannot drift apart (the agent's
//! constant and an SQL literal at the aggregator did before).

/// Input a source could not decode, kept with the reason and (capped) raw bytes.
pub const DEAD_LETTERS: &str = "dead_letters";

/// One report per agent commit, stream and reason of the events a `drop_newest` /
/// `drop_oldest` buffer policy dropped.
pub const AGENT_DROPS: &str = "agent_drops";

/// Alerts raised by the agent's windows.
pub const ALERTS: &str = "alerts";
