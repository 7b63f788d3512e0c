//! `[[rules]]` in the agent config: stateless rules (a CEL condition plus actions) and the local
//! actions any rule may trigger. Owns the rule keys and their validation. CEL expressions are
//! compile-checked here (so `runnel-agent check` and the aggregator refuse a bad one), but the
//! agent compiles them again to run them: validated configs stay plain data.

use serde::Deserialize;

use crate::common::Checker;
use crate::error::ConfigError;

/// `[[rules]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub(crate) struct RawRules(Vec<toml::Value>);

/// The validated rules.
#[derive(Debug, Clone, Default)]
pub struct RulesConfig {}

impl RawRules {
    pub(crate) fn validate(self, checker: &Checker<'_>) -> Result<RulesConfig, ConfigError> {
        if !self.0.is_empty() {
            return Err(checker.invalid("rules", "[...]", "rules are not supported yet"));
        }
        Ok(RulesConfig {})
    }
}
