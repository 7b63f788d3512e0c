//! Model scoring with tract-onnx: inputs mapped from event fields, batched inference on a
//! blocking thread, the output written to the event before rules run.

use runnel_common::Event;
use runnel_config::ModelConfig;

/// The loaded models of one pipeline.
#[derive(Default)]
pub struct Scoring {}

impl Scoring {
    /// Loads and optimises every model; fails with the model name (and the operator tract
    /// cannot run).
    pub fn build(models: &[ModelConfig]) -> anyhow::Result<Scoring> {
        anyhow::ensure!(models.is_empty(), "models are not supported yet");
        Ok(Scoring {})
    }

    pub fn is_empty(&self) -> bool {
        true
    }

    /// Scores a batch; events a model cannot score keep their old value (counted).
    pub async fn score(&self, events: Vec<Event>) -> Vec<Event> {
        events
    }
}
