//! Fleet configuration: managed config documents, rollouts to label selectors with a canary step,
//! a health gate and rollback, and the desired config of every agent.

use std::sync::Arc;

use runnel_common::wire::ConfigResult;

/// What ingest tells the fleet driver.
#[derive(Debug, Clone)]
pub enum FleetEvent {
    /// An agent connected (a wake-up: its state is in [`crate::ingest::ConnectedAgents`]).
    Connected { agent_id: Arc<str> },
    /// An agent sent a protocol 2 status (a wake-up, as above).
    Status { agent_id: Arc<str> },
    /// An agent answered a config push.
    ConfigResult {
        agent_id: Arc<str>,
        result: ConfigResult,
    },
}

pub mod rollout;
pub mod selector;
