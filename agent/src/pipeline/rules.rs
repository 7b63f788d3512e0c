//! Stateless rules: a CEL condition and actions (drop, set, rename, remove, tag, route, sample),
//! applied in config order.

use runnel_common::Event;
use runnel_config::RulesConfig;

use super::actions::Fired;

/// The compiled rules of one pipeline.
#[derive(Default)]
pub struct Rules {}

impl Rules {
    /// Compiles every rule's expressions; fails with the rule name and position.
    pub fn build(_config: &RulesConfig) -> anyhow::Result<Rules> {
        Ok(Rules {})
    }

    pub fn is_empty(&self) -> bool {
        true
    }

    /// Applies the rules to a batch; local actions that fire are pushed to `fired`.
    pub fn apply(&self, events: Vec<Event>, _now_ms: i64, _fired: &mut Vec<Fired>) -> Vec<Event> {
        events
    }
}
