//! Model scoring with tract-onnx: inputs mapped from event fields, batched inference off the
//! async workers, the output written to the event before rules run.
//!
//! Loading ([`model`]) uses tract's ONNX loader with our operators ([`ops`]) for what
//! scikit-learn and XGBoost exports need and tract 0.23 lacks or runs slowly: `ZipMap`,
//! `Scaler`, and tree ensembles, which go through a flat evaluator ([`trees`]). A model with an
//! operator neither knows fails at load, naming the operator. See docs/MODELS.md.
//!
//! Per batch, each model in config order: rows are built from the events (missing or
//! non-numeric fields take the input's default), inference runs in chunks of `batch_size`, and
//! the value is written to `score` or `attrs.<name>`. A failed chunk leaves its events as they
//! were and is counted (`runnel_agent_model_errors_total`); events are never dropped here.

pub mod model;
mod ops;
mod trees;

#[cfg(test)]
mod tests;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use runnel_common::{Event, Value};
use runnel_config::{EventField, ModelConfig, ModelInput, OutputField, Transform};

pub use model::{OnnxModel, Selection};

/// The loaded models of one pipeline.
#[derive(Default)]
pub struct Scoring {
    models: Arc<Vec<LoadedModel>>,
}

/// One model with its mapping.
#[derive(Debug)]
pub struct LoadedModel {
    config: ModelConfig,
    model: OnnxModel,
    rows: RowBuilder,
}

impl Scoring {
    /// Loads and optimises every model; fails with the model name (and the operator tract
    /// cannot run).
    pub fn build(models: &[ModelConfig]) -> anyhow::Result<Scoring> {
        let loaded = models
            .iter()
            .map(LoadedModel::load)
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Scoring {
            models: Arc::new(loaded),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// Scores a batch off the async workers; events a model cannot score keep their old value
    /// (counted).
    ///
    /// On a multi-threaded runtime the batch is scored in place (`block_in_place`: the worker's
    /// other tasks move to another thread), so the events stay in the cache of the core that
    /// just decoded them; handing them to a blocking-pool thread instead cost about as much per
    /// row as the mapping. Elsewhere (a current-thread runtime, tests) it goes to the blocking
    /// pool.
    pub async fn score(&self, events: Vec<Event>) -> Vec<Event> {
        let models = Arc::clone(&self.models);
        let work = move || {
            let mut events = events;
            for model in models.iter() {
                // Inference panics are caught per chunk; this also covers the mapping, so the
                // events always come back.
                let scored =
                    std::panic::catch_unwind(AssertUnwindSafe(|| model.score(&mut events)));
                if scored.is_err() {
                    model.failed(events.len(), "scoring panicked");
                }
            }
            events
        };
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            return tokio::task::block_in_place(work);
        }
        let task = tokio::task::spawn_blocking(work);
        match task.await {
            Ok(events) => events,
            Err(error) => {
                // Only when the runtime shuts down: the batch is not committed, so its source
                // was not acknowledged (the sender sees an error or retries).
                tracing::warn!(%error, "scoring task did not run");
                Vec::new()
            }
        }
    }

    /// Scores on the calling thread (benchmarks and tests).
    pub fn score_blocking(&self, events: &mut [Event]) {
        for model in self.models.iter() {
            model.score(events);
        }
    }
}

impl LoadedModel {
    /// Loads one model; errors name the model and the file.
    pub fn load(config: &ModelConfig) -> anyhow::Result<LoadedModel> {
        let selection = Selection {
            input: config.input.as_deref(),
            output: config.output.as_deref(),
            class: config.class.as_ref(),
        };
        let model = OnnxModel::load(&config.path, config.columns(), &selection)
            .with_context(|| format!("model {:?} ({})", config.name, config.path.display()))?;
        tracing::info!(
            model = %config.name,
            path = %config.path.display(),
            output = %model.output,
            operators = ?model.operators,
            "model loaded"
        );
        Ok(LoadedModel {
            config: config.clone(),
            model,
            rows: RowBuilder::new(&config.inputs),
        })
    }

    /// The model under the mapping (for benchmarks).
    pub fn onnx(&self) -> &OnnxModel {
        &self.model
    }

    /// Scores `events` in chunks of `batch_size`.
    pub fn score(&self, events: &mut [Event]) {
        let name = self.config.name.clone();
        let mut rows =
            Vec::with_capacity(self.config.batch_size.min(events.len()) * self.rows.width());
        for chunk in events.chunks_mut(self.config.batch_size) {
            rows.clear();
            for event in chunk.iter() {
                self.rows.push(event, &mut rows);
            }
            let started = Instant::now();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.model.infer(&rows)));
            ::metrics::histogram!("runnel_agent_model_batch_seconds", "model" => name.clone())
                .record(started.elapsed().as_secs_f64());
            let values = match result {
                Ok(Ok(values)) if values.len() == chunk.len() => values,
                Ok(Ok(values)) => {
                    self.failed(
                        chunk.len(),
                        &format!("{} values for {} rows", values.len(), chunk.len()),
                    );
                    continue;
                }
                Ok(Err(error)) => {
                    self.failed(chunk.len(), &format!("{error:#}"));
                    continue;
                }
                Err(_) => {
                    self.failed(chunk.len(), "inference panicked");
                    continue;
                }
            };
            let mut not_finite = 0u64;
            for (event, value) in chunk.iter_mut().zip(values) {
                if !value.is_finite() {
                    not_finite += 1;
                    continue;
                }
                let value = f64::from(value);
                match &self.config.output_field {
                    OutputField::Score => event.score = Some(value),
                    OutputField::Attr(attr) => {
                        event.attrs.insert(attr.clone(), Value::Float(value));
                    }
                }
            }
            ::metrics::counter!("runnel_agent_model_rows_total", "model" => name.clone())
                .increment(chunk.len() as u64);
            if not_finite > 0 {
                ::metrics::counter!(
                    "runnel_agent_model_errors_total",
                    "model" => name.clone(),
                    "reason" => "not_finite"
                )
                .increment(not_finite);
            }
        }
    }

    fn failed(&self, rows: usize, error: &str) {
        ::metrics::counter!(
            "runnel_agent_model_errors_total",
            "model" => self.config.name.clone(),
            "reason" => "inference"
        )
        .increment(rows as u64);
        tracing::warn!(model = %self.config.name, rows, error, "scoring failed; events keep their values");
    }
}

/// Builds rows of model input from events, for one model's `inputs`.
///
/// Inputs read from `attrs` are found in one merge pass over the event's sorted attributes
/// (the inputs are sorted by key once, here) instead of one map lookup per input: this is the
/// per-event part of scoring that onnxruntime, fed ready arrays, does not do.
#[derive(Debug, Clone)]
pub struct RowBuilder {
    inputs: Vec<ModelInput>,
    /// Where each input's first column is in a row.
    offsets: Vec<usize>,
    width: usize,
    /// The inputs read from `attrs`, sorted by key: (key, input index).
    attrs: Vec<(Key, usize)>,
}

/// An attribute key with its first bytes as one integer, so the merge pass compares the short
/// keys events mostly have without a call to `memcmp` (which dominated it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key {
    text: String,
    short: Option<u64>,
}

impl Key {
    pub(crate) fn new(text: String) -> Key {
        let short = short_key(&text);
        Key { text, short }
    }

    /// Orders like `str::cmp` against `other`, whose [`short_key`] is `other_short`.
    #[inline]
    pub(crate) fn cmp_str(&self, other: &str, other_short: Option<u64>) -> std::cmp::Ordering {
        match (self.short, other_short) {
            // Zero-padded big-endian prefixes order like the bytes; equal ones leave the
            // shorter key first, as byte order does.
            (Some(a), Some(b)) => a.cmp(&b).then(self.text.len().cmp(&other.len())),
            _ => self.text.as_str().cmp(other),
        }
    }
}

/// A key of at most 8 bytes as a big-endian integer, zero-padded.
#[inline]
pub(crate) fn short_key(key: &str) -> Option<u64> {
    let bytes = key.as_bytes();
    if bytes.len() > 8 {
        return None;
    }
    let mut value = 0u64;
    for (idx, byte) in bytes.iter().enumerate() {
        value |= u64::from(*byte) << (56 - 8 * idx);
    }
    Some(value)
}

impl RowBuilder {
    pub fn new(inputs: &[ModelInput]) -> RowBuilder {
        let mut offsets = Vec::with_capacity(inputs.len());
        let mut width = 0;
        for input in inputs {
            offsets.push(width);
            width += input.columns();
        }
        let mut attrs: Vec<(Key, usize)> = inputs
            .iter()
            .enumerate()
            .filter_map(|(idx, input)| match &input.field {
                EventField::Attr(key) => Some((Key::new(key.clone()), idx)),
                _ => None,
            })
            .collect();
        attrs.sort_by(|(a, ia), (b, ib)| a.text.cmp(&b.text).then(ia.cmp(ib)));
        RowBuilder {
            inputs: inputs.to_vec(),
            offsets,
            width,
            attrs,
        }
    }

    /// Columns per row.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Appends one row built from `event`: missing or non-numeric fields take the input's
    /// default, one-hot inputs a column per value.
    pub fn push(&self, event: &Event, row: &mut Vec<f32>) {
        let start = row.len();
        row.resize(start + self.width, 0.0);
        let out = &mut row[start..];
        for (input, &offset) in self.inputs.iter().zip(&self.offsets) {
            match &input.field {
                // Defaults now; the values present are written by the merge pass below.
                EventField::Attr(_) => {
                    if !matches!(input.transform, Transform::OneHot(_)) {
                        out[offset] = input.default as f32;
                    }
                }
                field => match &input.transform {
                    Transform::OneHot(values) => {
                        let text = field_text(field, event);
                        one_hot(values, text.as_deref(), &mut out[offset..]);
                    }
                    transform => {
                        let boolean = transform == &Transform::Bool;
                        out[offset] = number_input(input, field_number(field, event, boolean));
                    }
                },
            }
        }
        let mut wanted = self.attrs.iter().peekable();
        for (key, value) in &event.attrs {
            let short = short_key(key);
            while wanted
                .next_if(|(want, _)| want.cmp_str(key, short) == std::cmp::Ordering::Less)
                .is_some()
            {}
            while let Some((_, idx)) =
                wanted.next_if(|(want, _)| want.cmp_str(key, short) == std::cmp::Ordering::Equal)
            {
                let input = &self.inputs[*idx];
                let offset = self.offsets[*idx];
                match &input.transform {
                    Transform::OneHot(values) => {
                        one_hot(values, value_text(value).as_deref(), &mut out[offset..])
                    }
                    transform => {
                        let number = value_number(value, transform == &Transform::Bool);
                        out[offset] = number_input(input, number);
                    }
                }
            }
            if wanted.peek().is_none() {
                break;
            }
        }
    }
}

/// Appends one row of model input built from `event` (one-off callers; scoring uses a
/// [`RowBuilder`] made once per model).
pub fn push_row(inputs: &[ModelInput], event: &Event, row: &mut Vec<f32>) {
    RowBuilder::new(inputs).push(event, row);
}

fn one_hot(values: &[String], text: Option<&str>, out: &mut [f32]) {
    for (slot, value) in out.iter_mut().zip(values) {
        *slot = if text == Some(value.as_str()) {
            1.0
        } else {
            0.0
        };
    }
}

/// A numeric input's value: the transform, then scale and offset; the default when missing.
fn number_input(input: &ModelInput, number: Option<f64>) -> f32 {
    number
        .filter(|x| x.is_finite())
        .and_then(|x| match input.transform {
            Transform::Log1p => (x > -1.0).then(|| x.ln_1p()),
            _ => Some(x),
        })
        .map_or(input.default, |x| x * input.scale + input.offset) as f32
}

/// A field as a number: numbers, booleans (1/0), and strings that parse as one. With
/// `boolean`, the strings `"true"`/`"false"` count too.
fn field_number(field: &EventField, event: &Event, boolean: bool) -> Option<f64> {
    let from_text = |s: &str| text_number(s, boolean);
    let number = match field {
        EventField::Score => event.score,
        EventField::EventTimeMs => Some(event.event_time_ms as f64),
        EventField::ReceiveTimeMs => Some(event.receive_time_ms as f64),
        EventField::Name => from_text(&event.name),
        EventField::Stream => from_text(&event.stream),
        EventField::Source => None,
        EventField::UserId => event.user_id.as_deref().and_then(from_text),
        EventField::SessionId => event.session_id.as_deref().and_then(from_text),
        EventField::EventId => event.event_id.as_deref().and_then(from_text),
        EventField::Attr(key) => value_number(event.attrs.get(key)?, boolean),
    };
    number.filter(|x| x.is_finite())
}

/// An attribute as a number (see [`field_number`]).
fn value_number(value: &Value, boolean: bool) -> Option<f64> {
    match value {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::String(s) => text_number(s, boolean),
        Value::Null | Value::Bytes(_) | Value::Json(_) => None,
    }
}

fn text_number(text: &str, boolean: bool) -> Option<f64> {
    match text {
        "true" if boolean => Some(1.0),
        "false" if boolean => Some(0.0),
        _ => text.trim().parse::<f64>().ok(),
    }
}

/// A field as text, for one-hot inputs.
fn field_text(field: &EventField, event: &Event) -> Option<String> {
    match field {
        EventField::Score => event.score.map(|s| s.to_string()),
        EventField::EventTimeMs => Some(event.event_time_ms.to_string()),
        EventField::ReceiveTimeMs => Some(event.receive_time_ms.to_string()),
        EventField::Name => Some(event.name.clone()),
        EventField::Stream => Some(event.stream.clone()),
        EventField::Source => Some(event.source.as_str().to_owned()),
        EventField::UserId => event.user_id.clone(),
        EventField::SessionId => event.session_id.clone(),
        EventField::EventId => event.event_id.clone(),
        EventField::Attr(key) => value_text(event.attrs.get(key)?),
    }
}

/// An attribute as text (see [`field_text`]).
fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Null | Value::Bytes(_) | Value::Json(_) => None,
    }
}
