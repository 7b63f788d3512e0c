//! Stateful rules: tumbling and sliding windows keyed by fields, aggregates, and a `having`
//! condition that emits an alert event (stream `alerts`). Bounded state; saved to `data_dir`.

use runnel_common::Event;
use runnel_config::WindowConfig;

use super::BuildContext;
use super::actions::Fired;

/// The windows of one pipeline and their state.
#[derive(Default)]
pub struct Windows {}

impl Windows {
    /// Compiles the windows' expressions and restores saved state.
    pub fn build(config: &[WindowConfig], _context: &BuildContext) -> anyhow::Result<Windows> {
        anyhow::ensure!(config.is_empty(), "windows are not supported yet");
        Ok(Windows {})
    }

    pub fn is_empty(&self) -> bool {
        true
    }

    /// Adds a batch to its windows; returns alert events of windows it closed.
    pub fn observe(&self, _events: &[Event], _now_ms: i64, _fired: &mut Vec<Fired>) -> Vec<Event> {
        Vec::new()
    }

    /// Closes windows whose end (plus lateness) is before `now_ms`; returns their alerts.
    pub fn tick(&self, _now_ms: i64, _fired: &mut Vec<Fired>) -> Vec<Event> {
        Vec::new()
    }

    /// Saves window state to `data_dir`.
    pub fn persist(&self) -> anyhow::Result<()> {
        Ok(())
    }
}
