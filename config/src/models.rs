//! `[[models]]` in the agent config: ONNX models that score events before rules run. Owns the
//! model keys and their validation (paths resolved, input mappings checked); it does not open
//! the model file.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;

use crate::common::{Checker, Unit, quote};
use crate::error::ConfigError;

/// Default rows per inference call.
const DEFAULT_BATCH_SIZE: u64 = 256;
/// Largest `batch_size`.
const MAX_BATCH_SIZE: u64 = 65_536;
/// Largest number of model input columns (after one-hot expansion).
const MAX_COLUMNS: usize = 4096;

/// `[[models]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
pub(crate) struct RawModels(Vec<RawModel>);

/// One `[[models]]` entry as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    /// Names the model in logs, metrics and errors. Required, unique.
    name: Option<String>,
    /// The `.onnx` file; relative paths are resolved against the config file's directory.
    path: Option<PathBuf>,
    /// The model input the columns are fed to. Default: the model's only input.
    input: Option<String>,
    /// The model output to read. Default: a classifier's probability output, else the model's
    /// only float output; never an integer or string output (a predicted label). A model whose
    /// outputs leave the choice open fails to load, listing them.
    output: Option<String>,
    /// For classifiers: the class whose probability is written, by label (an integer or a
    /// string). Default: the last class (the positive class of a binary classifier).
    class: Option<toml::Value>,
    /// Where the value goes: `score` or `attrs.<name>`. Default: `score`.
    output_field: Option<String>,
    /// Rows per inference call. Default: 256.
    batch_size: Option<u64>,
    /// The model's input columns, in order.
    inputs: Option<Vec<RawInput>>,
}

/// One `[[models.inputs]]` entry as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    /// The event field: `score`, `event_time_ms`, `receive_time_ms`, `name`, `stream`,
    /// `source`, `user_id`, `session_id`, `event_id` or `attrs.<key>`.
    field: Option<String>,
    /// Value used when the field is missing or not numeric. Default: 0.
    default: Option<f64>,
    /// `none`, `log1p`, `bool` or `one_hot`. Default: `none`.
    transform: Option<String>,
    /// Multiplies the value (after the transform). Default: 1.
    scale: Option<f64>,
    /// Added after `scale`. Default: 0.
    offset: Option<f64>,
    /// For `one_hot`: the string values, one column each, in order.
    values: Option<Vec<String>>,
}

/// One validated model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `models.name`.
    pub name: String,
    /// `models.path`, absolute.
    pub path: PathBuf,
    /// `models.input`: the ONNX input name, if given.
    pub input: Option<String>,
    /// `models.output`: the ONNX output name, if given.
    pub output: Option<String>,
    /// `models.class`: the class label, if given.
    pub class: Option<ClassLabel>,
    /// `models.output_field`.
    pub output_field: OutputField,
    /// `models.batch_size`.
    pub batch_size: usize,
    /// `models.inputs`, in order.
    pub inputs: Vec<ModelInput>,
}

impl ModelConfig {
    /// Input columns the mapping produces (one-hot inputs produce one per value).
    pub fn columns(&self) -> usize {
        self.inputs.iter().map(ModelInput::columns).sum()
    }
}

/// A class label of a classifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassLabel {
    Int(i64),
    String(String),
}

/// Where a model's value is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputField {
    /// The event's `score`.
    Score,
    /// `attrs.<name>`, as a float.
    Attr(String),
}

/// An event field a model input reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventField {
    Score,
    EventTimeMs,
    ReceiveTimeMs,
    Name,
    Stream,
    Source,
    UserId,
    SessionId,
    EventId,
    /// `attrs.<key>`.
    Attr(String),
}

/// The core fields an input may name, besides `attrs.<key>`.
const CORE_FIELDS: [(&str, EventField); 9] = [
    ("score", EventField::Score),
    ("event_time_ms", EventField::EventTimeMs),
    ("receive_time_ms", EventField::ReceiveTimeMs),
    ("name", EventField::Name),
    ("stream", EventField::Stream),
    ("source", EventField::Source),
    ("user_id", EventField::UserId),
    ("session_id", EventField::SessionId),
    ("event_id", EventField::EventId),
];

/// How a field's value becomes columns.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// The number as is.
    None,
    /// `ln(1 + x)`; values below -1 take the default.
    Log1p,
    /// `true` → 1, `false` → 0 (also the strings `"true"`/`"false"` and numbers, as numbers).
    Bool,
    /// One column per listed string value: 1 in the column of the field's value, else 0.
    OneHot(Vec<String>),
}

/// One validated model input.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInput {
    pub field: EventField,
    pub default: f64,
    pub transform: Transform,
    pub scale: f64,
    pub offset: f64,
}

impl ModelInput {
    /// Columns this input produces.
    pub fn columns(&self) -> usize {
        match &self.transform {
            Transform::OneHot(values) => values.len(),
            _ => 1,
        }
    }
}

impl RawModels {
    pub(crate) fn validate(
        self,
        checker: &mut Checker<'_>,
    ) -> Result<Vec<ModelConfig>, ConfigError> {
        let mut names = BTreeSet::new();
        let mut models = Vec::with_capacity(self.0.len());
        for (i, raw) in self.0.into_iter().enumerate() {
            let model = raw.validate(checker, i)?;
            if !names.insert(model.name.clone()) {
                return Err(checker.invalid(
                    &format!("models[{i}].name"),
                    quote(&model.name),
                    "must be unique among models",
                ));
            }
            models.push(model);
        }
        Ok(models)
    }
}

impl RawModel {
    fn validate(self, checker: &mut Checker<'_>, i: usize) -> Result<ModelConfig, ConfigError> {
        let key = |k: &str| format!("models[{i}].{k}");
        let name = self.name.ok_or_else(|| {
            checker.missing(&key("name"), "a name for the model, such as \"fraud\"")
        })?;
        if name.is_empty() || name.len() > 63 || !name.chars().all(is_name_char) {
            return Err(checker.invalid(
                &key("name"),
                quote(&name),
                "must be 1 to 63 characters of a-z A-Z 0-9 _ . -",
            ));
        }
        let path = checker.required_path(
            &key("path"),
            self.path.as_deref(),
            "the .onnx file, relative to this config file or absolute",
        )?;
        for (k, value) in [("input", &self.input), ("output", &self.output)] {
            if value.as_deref() == Some("") {
                return Err(checker.invalid(&key(k), "\"\"", "must not be empty"));
            }
        }
        let class = match self.class {
            None => None,
            Some(toml::Value::Integer(n)) => Some(ClassLabel::Int(n)),
            Some(toml::Value::String(s)) if !s.is_empty() => Some(ClassLabel::String(s)),
            Some(other) => {
                return Err(checker.invalid(
                    &key("class"),
                    match other {
                        toml::Value::Float(f) => f.to_string(),
                        toml::Value::Boolean(b) => b.to_string(),
                        toml::Value::String(s) => quote(&s),
                        _ => "...".to_owned(),
                    },
                    "must be a class label: an integer or a non-empty string",
                ));
            }
        };
        let output_field = match self.output_field.as_deref() {
            None | Some("score") => OutputField::Score,
            Some(text) => match text.strip_prefix("attrs.") {
                Some(attr) if !attr.is_empty() => OutputField::Attr(attr.to_owned()),
                _ => {
                    return Err(checker.invalid(
                        &key("output_field"),
                        quote(text),
                        "must be \"score\" or \"attrs.<name>\"",
                    ));
                }
            },
        };
        let batch_size = checker.int_usize(
            &key("batch_size"),
            self.batch_size,
            DEFAULT_BATCH_SIZE,
            1,
            Some(MAX_BATCH_SIZE),
            Unit::Plain,
        )?;
        let raw_inputs = self.inputs.unwrap_or_default();
        if raw_inputs.is_empty() {
            return Err(checker.missing(
                &key("inputs"),
                "at least one [[models.inputs]] entry naming an event field, such as \
                 field = \"attrs.amount\"",
            ));
        }
        let inputs = raw_inputs
            .into_iter()
            .enumerate()
            .map(|(j, input)| input.validate(checker, &key(&format!("inputs[{j}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let model = ModelConfig {
            name,
            path,
            input: self.input,
            output: self.output,
            class,
            output_field,
            batch_size,
            inputs,
        };
        if model.columns() > MAX_COLUMNS {
            return Err(checker.invalid(
                &key("inputs"),
                "[...]",
                format!(
                    "produce {} columns; at most {MAX_COLUMNS} are allowed",
                    model.columns()
                ),
            ));
        }
        Ok(model)
    }
}

impl RawInput {
    fn validate(self, checker: &Checker<'_>, prefix: &str) -> Result<ModelInput, ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let text = self.field.ok_or_else(|| {
            checker.missing(
                &key("field"),
                "the event field to read, such as \"attrs.amount\" or \"score\"",
            )
        })?;
        let field = parse_field(&text).ok_or_else(|| {
            checker.invalid(
                &key("field"),
                quote(&text),
                "must be one of score, event_time_ms, receive_time_ms, name, stream, source, \
                 user_id, session_id, event_id, or attrs.<key>",
            )
        })?;
        let finite = |k: &str, value: Option<f64>, default: f64| match value {
            Some(v) if !v.is_finite() => {
                Err(checker.invalid(&key(k), v.to_string(), "must be finite"))
            }
            Some(v) => Ok(v),
            None => Ok(default),
        };
        // NaN is allowed as a default: tree models route it along their missing-value branches.
        let default = match self.default {
            Some(v) if v.is_infinite() => {
                return Err(checker.invalid(
                    &key("default"),
                    v.to_string(),
                    "must not be infinite",
                ));
            }
            Some(v) => v,
            None => 0.0,
        };
        let scale = finite("scale", self.scale, 1.0)?;
        let offset = finite("offset", self.offset, 0.0)?;
        let transform = match (self.transform.as_deref(), self.values) {
            (None | Some("none"), None) => Transform::None,
            (Some("log1p"), None) => Transform::Log1p,
            (Some("bool"), None) => Transform::Bool,
            (Some("one_hot"), Some(values)) => {
                if values.is_empty() {
                    return Err(checker.invalid(
                        &key("values"),
                        "[]",
                        "must list at least one value",
                    ));
                }
                let mut seen = BTreeSet::new();
                if let Some(dup) = values.iter().find(|v| !seen.insert(v.as_str())) {
                    return Err(checker.invalid(
                        &key("values"),
                        quote(dup),
                        "is listed twice; each value is one column",
                    ));
                }
                Transform::OneHot(values)
            }
            (Some("one_hot"), None) => {
                return Err(checker.missing(
                    &key("values"),
                    "the string values of the one_hot transform, one column each, such as \
                     [\"web\", \"pos\"]",
                ));
            }
            (None | Some("none" | "log1p" | "bool"), Some(_)) => {
                return Err(checker.invalid(
                    &key("values"),
                    "[...]",
                    "only applies to transform = \"one_hot\"",
                ));
            }
            (Some(other), _) => {
                return Err(checker.invalid(
                    &key("transform"),
                    quote(other),
                    "must be \"none\", \"log1p\", \"bool\" or \"one_hot\"",
                ));
            }
        };
        Ok(ModelInput {
            field,
            default,
            transform,
            scale,
            offset,
        })
    }
}

fn parse_field(text: &str) -> Option<EventField> {
    if let Some(attr) = text.strip_prefix("attrs.") {
        return (!attr.is_empty()).then(|| EventField::Attr(attr.to_owned()));
    }
    CORE_FIELDS
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, field)| field.clone())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Result<Vec<ModelConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct File {
            models: RawModels,
        }
        let origin = Path::new("/etc/runnel/agent.toml");
        let file: File = crate::common::parse_toml(text, origin)?;
        file.models.validate(&mut Checker::new(origin))
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("should be rejected").to_string()
    }

    #[test]
    fn a_full_model_validates() {
        let models = parse(
            r#"
            [[models]]
            name = "fraud"
            path = "models/fraud.onnx"
            output = "output_probability"
            class = 1
            output_field = "attrs.fraud_p"
            batch_size = 64
            [[models.inputs]]
            field = "attrs.amount"
            transform = "log1p"
            default = -1.5
            [[models.inputs]]
            field = "attrs.channel"
            transform = "one_hot"
            values = ["web", "pos"]
            [[models.inputs]]
            field = "score"
            scale = 2.0
            offset = 0.5
            "#,
        )
        .expect("valid");
        let model = &models[0];
        assert_eq!(model.path, Path::new("/etc/runnel/models/fraud.onnx"));
        assert_eq!(model.class, Some(ClassLabel::Int(1)));
        assert_eq!(model.output_field, OutputField::Attr("fraud_p".into()));
        assert_eq!(model.batch_size, 64);
        assert_eq!(model.columns(), 4);
        assert_eq!(model.inputs[0].transform, Transform::Log1p);
        assert_eq!(model.inputs[0].default, -1.5);
        assert_eq!(model.inputs[2].field, EventField::Score);
        assert_eq!((model.inputs[2].scale, model.inputs[2].offset), (2.0, 0.5));
    }

    #[test]
    fn errors_name_the_key() {
        let base = "[[models]]\nname = \"m\"\npath = \"m.onnx\"\n";
        let cases = [
            (
                "[[models]]\npath = \"m.onnx\"\n",
                "models[0].name is required",
            ),
            ("[[models]]\nname = \"m\"\n", "models[0].path is required"),
            (base, "models[0].inputs is required"),
            (
                &format!("{base}[[models.inputs]]\nfield = \"amount\"\n"),
                "models[0].inputs[0].field = \"amount\"",
            ),
            (
                &format!("{base}[[models.inputs]]\nfield = \"score\"\ntransform = \"sqrt\"\n"),
                "models[0].inputs[0].transform = \"sqrt\"",
            ),
            (
                &format!("{base}[[models.inputs]]\nfield = \"name\"\ntransform = \"one_hot\"\n"),
                "models[0].inputs[0].values is required",
            ),
            (
                &format!("{base}output_field = \"amount\"\n[[models.inputs]]\nfield = \"score\"\n"),
                "models[0].output_field = \"amount\"",
            ),
            (
                &format!("{base}batch_size = 0\n[[models.inputs]]\nfield = \"score\"\n"),
                "models[0].batch_size = 0",
            ),
            (
                &format!("{base}class = 1.5\n[[models.inputs]]\nfield = \"score\"\n"),
                "models[0].class = 1.5",
            ),
            (
                &format!(
                    "{base}[[models.inputs]]\nfield = \"score\"\n{base}[[models.inputs]]\nfield = \"score\"\n"
                ),
                "models[1].name = \"m\": must be unique",
            ),
        ];
        for (text, expected) in cases {
            let message = error(text);
            assert!(
                message.contains(expected),
                "{message} should contain {expected}"
            );
        }
    }

    #[test]
    fn validation_does_not_open_the_model_file() {
        let models = parse(
            "[[models]]\nname = \"m\"\npath = \"/nonexistent/m.onnx\"\n[[models.inputs]]\nfield = \"score\"\n",
        )
        .expect("a missing file is the agent's problem, at load");
        assert_eq!(models[0].path, Path::new("/nonexistent/m.onnx"));
    }
}
