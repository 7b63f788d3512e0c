//! `[[windows]]` in the agent config: stateful rules (tumbling and sliding windows keyed by
//! fields, aggregates, a `having` condition that emits an alert). Owns the window keys and their
//! validation.

use serde::Deserialize;

use crate::common::Checker;
use crate::error::ConfigError;

/// `[[windows]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub(crate) struct RawWindows(Vec<toml::Value>);

/// One validated window rule.
#[derive(Debug, Clone)]
pub struct WindowConfig {}

impl RawWindows {
    pub(crate) fn validate(self, checker: &Checker<'_>) -> Result<Vec<WindowConfig>, ConfigError> {
        if !self.0.is_empty() {
            return Err(checker.invalid("windows", "[...]", "windows are not supported yet"));
        }
        Ok(Vec::new())
    }
}
