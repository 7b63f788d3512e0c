//! `[[models]]` in the agent config: ONNX models that score events before rules run. Owns the
//! model keys and their validation (paths resolved, input mappings checked); it does not open
//! the model file.

use serde::Deserialize;

use crate::common::Checker;
use crate::error::ConfigError;

/// `[[models]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub(crate) struct RawModels(Vec<toml::Value>);

/// One validated model.
#[derive(Debug, Clone)]
pub struct ModelConfig {}

impl RawModels {
    pub(crate) fn validate(self, checker: &Checker<'_>) -> Result<Vec<ModelConfig>, ConfigError> {
        if !self.0.is_empty() {
            return Err(checker.invalid("models", "[...]", "models are not supported yet"));
        }
        Ok(Vec::new())
    }
}
