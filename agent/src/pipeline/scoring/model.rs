//! Loading one ONNX model: tract's loader with our operators ([`super::ops`]), a check that
//! every operator is known (so a model tract cannot run fails at load, naming the operator),
//! the input and output chosen by config, the class column resolved, and the model optimised
//! for a `[N, columns]` f32 input.
//!
//! Without `output` in config, the output read must be a probability or a value: an integer or
//! string output (a classifier's label) is never read by default, and when the graph does not
//! say which output is meant the model is refused, listing its outputs. Loading never guesses a
//! score.

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail, ensure};
use runnel_config::ClassLabel;
use tract_onnx::pb::{self, ModelProto};
use tract_onnx::prelude::*;

use super::trees::{Labels, class_labels};

/// tract's ONNX loader with our operators registered.
pub(crate) fn loader() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    super::ops::register(&mut onnx.op_register);
    onnx
}

/// What the model is asked for.
#[derive(Debug, Clone, Default)]
pub struct Selection<'a> {
    /// The ONNX input name; `None`: the only input.
    pub input: Option<&'a str>,
    /// The ONNX output name; `None`: a classifier's probabilities, else a model's only float
    /// output (see [`choose_output`]).
    pub output: Option<&'a str>,
    /// The class whose probability is read; `None`: the last column.
    pub class: Option<&'a ClassLabel>,
}

/// Run states kept for reuse (one per thread scoring at once, up to this many).
const MAX_IDLE_STATES: usize = 8;

/// The `ai.onnx` opsets the fixtures (tests/fixtures/models) declare, lowest to highest.
/// docs/MODELS.md states this range ([`tested_opsets_text`]) and a test checks both against
/// every fixture. tract reads other versions too; a model declaring one loads with a warning.
pub const TESTED_ONNX_OPSETS: RangeInclusive<i64> = 9..=22;

/// The `ai.onnx.ml` opsets the fixtures declare (skl2onnx and onnxmltools declare the lowest
/// version the graph needs, not the one asked for: 1 in every fixture).
pub const TESTED_ONNX_ML_OPSETS: RangeInclusive<i64> = 1..=1;

/// An optimised model that maps `[N, columns]` f32 rows to one value per row.
#[derive(Debug)]
pub struct OnnxModel {
    plan: Arc<TypedRunnableModel>,
    /// Idle run states: spawning one per call costs more than a small batch's inference.
    states: Mutex<Vec<TypedSimpleState>>,
    columns: usize,
    /// The column of a `[N, C]` output that is read; `None` for `[N]` or `[N, 1]`.
    column: Option<usize>,
    /// The output read.
    pub output: String,
    /// Every operator in the graph, sorted.
    pub operators: Vec<String>,
}

impl OnnxModel {
    /// Loads `path` for `columns` input columns. Errors name the path, and the operators tract
    /// cannot run.
    pub fn load(
        path: &Path,
        columns: usize,
        selection: &Selection<'_>,
    ) -> anyhow::Result<OnnxModel> {
        let onnx = loader();
        let proto = read_proto(&onnx, path)?;
        for (domain, version) in untested_opsets(&proto) {
            tracing::warn!(
                path = %path.display(),
                domain,
                version,
                tested = %tested_opsets_text(),
                "the model declares an opset the fixtures do not cover; it may still score right"
            );
        }
        OnnxModel::from_proto(&onnx, &proto, columns, selection)
    }

    /// [`Self::load`] on a parsed model (tests build graphs in memory).
    pub(crate) fn from_proto(
        onnx: &tract_onnx::Onnx,
        proto: &ModelProto,
        columns: usize,
        selection: &Selection<'_>,
    ) -> anyhow::Result<OnnxModel> {
        let graph = proto.graph.as_ref().context("the file holds no graph")?;
        let operators = check_operators(onnx, graph)?;
        let input = choose_input(graph, selection.input)?;
        let output = choose_output(graph, selection.output)?;
        let labels = labels_of(graph, &output)?;
        if let Some(declared) = declared_columns(graph, &input) {
            ensure!(
                declared == columns,
                "input {input:?} has {declared} columns, and [[models.inputs]] give {columns}"
            );
        }

        let mut model = onnx
            .model_for_proto_model(proto)
            .context("tract could not read the graph")?;
        let input_ix = model
            .input_outlets()?
            .iter()
            .position(|outlet| model.node(outlet.node).name == input)
            .with_context(|| format!("input {input:?} is not a graph input"))?;
        let n = model.symbols.sym("N");
        model.set_input_fact(
            input_ix,
            InferenceFact::dt_shape(f32::datum_type(), tvec![n.to_dim(), columns.to_dim()]),
        )?;
        let outlet = model
            .find_outlet_label(&output)
            .with_context(|| format!("output {output:?} is not in the graph"))?;
        model.select_output_outlets(&[outlet])?;
        let typed = model
            .into_optimized()
            .context("tract could not type and optimise the graph")?;
        let fact = typed.output_fact(0)?.clone();
        // The graph may not declare its outputs' types; tract's typing is the last word.
        if selection.output.is_none() && !fact.datum_type.is_float() {
            bail!(
                "output {output:?} holds {:?} values, not probabilities or values to score; {}",
                fact.datum_type,
                set_output_hint(graph)
            );
        }
        let width = match fact.rank() {
            1 => Some(1),
            2 => fact.shape[1].as_i64().map(|w| w as usize),
            rank => bail!("output {output:?} has rank {rank}; a [N] or [N, C] output is needed"),
        };
        let column = match (width, selection.class) {
            (Some(1), None) => None,
            (Some(1), Some(class)) => {
                bail!(
                    "output {output:?} has one column; class {} does not apply (it picks a \
                     column of a [N, classes] output); {}",
                    show(class),
                    set_output_hint(graph)
                )
            }
            (Some(width), class) => Some(resolve_class(class, labels.as_ref(), width, &output)?),
            (None, _) => bail!("output {output:?} has no fixed number of columns"),
        };
        let plan = typed.into_runnable()?;
        Ok(OnnxModel {
            plan,
            states: Mutex::new(Vec::new()),
            columns,
            column,
            output,
            operators,
        })
    }

    /// Input columns per row.
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Runs `rows` (row-major, [`Self::columns`] each) and returns one value per row.
    pub fn infer(&self, rows: &[f32]) -> anyhow::Result<Vec<f32>> {
        let n_rows = rows.len() / self.columns;
        let input = Tensor::from_shape(&[n_rows, self.columns], rows)?;
        let idle = self.states.lock().ok().and_then(|mut states| states.pop());
        let mut state = match idle {
            Some(state) => state,
            None => self.plan.spawn()?,
        };
        let mut outputs = state.run(tvec!(input.into_tvalue()))?;
        if let Ok(mut states) = self.states.lock()
            && states.len() < MAX_IDLE_STATES
        {
            states.push(state);
        }
        let output = outputs.pop().context("the model returned no output")?;
        let output = output.cast_to::<f32>()?;
        let plain = output.try_as_plain_ram()?;
        let values = plain.as_slice::<f32>()?;
        match self.column {
            None => {
                ensure!(
                    values.len() == n_rows,
                    "{} values for {n_rows} rows",
                    values.len()
                );
                Ok(values.to_vec())
            }
            Some(column) => {
                let width = values.len() / n_rows.max(1);
                ensure!(width > column, "output has {width} columns");
                Ok(values.chunks_exact(width).map(|row| row[column]).collect())
            }
        }
    }
}

/// Loads `path` with every graph output kept, for comparing all of them with references.
pub fn load_all_outputs(
    path: &Path,
    columns: usize,
) -> anyhow::Result<(Arc<TypedRunnableModel>, Vec<String>)> {
    let onnx = loader();
    let proto = read_proto(&onnx, path)?;
    let graph = proto.graph.as_ref().context("the file holds no graph")?;
    check_operators(&onnx, graph)?;
    let input = choose_input(graph, None)?;
    let mut model = onnx.model_for_proto_model(&proto)?;
    let input_ix = model
        .input_outlets()?
        .iter()
        .position(|outlet| model.node(outlet.node).name == input)
        .context("no input")?;
    let n = model.symbols.sym("N");
    model.set_input_fact(
        input_ix,
        InferenceFact::dt_shape(f32::datum_type(), tvec![n.to_dim(), columns.to_dim()]),
    )?;
    let names = graph.output.iter().map(|o| o.name.clone()).collect();
    Ok((model.into_optimized()?.into_runnable()?, names))
}

fn read_proto(onnx: &tract_onnx::Onnx, path: &Path) -> anyhow::Result<ModelProto> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    onnx.proto_model_for_read(&mut &bytes[..])
        .with_context(|| format!("{} is not an ONNX model", path.display()))
}

/// The sorted operator names of the graph; fails naming those no loader knows.
fn check_operators(onnx: &tract_onnx::Onnx, graph: &pb::GraphProto) -> anyhow::Result<Vec<String>> {
    let mut operators: Vec<String> = graph.node.iter().map(|n| n.op_type.clone()).collect();
    operators.sort();
    operators.dedup();
    let unknown: Vec<&str> = operators
        .iter()
        .filter(|op| !onnx.op_register.0.contains_key(op.as_str()))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        bail!(
            "unsupported operator{} {} (see docs/MODELS.md for the operators that load)",
            if unknown.len() == 1 { "" } else { "s" },
            unknown.join(", ")
        );
    }
    Ok(operators)
}

fn choose_input(graph: &pb::GraphProto, wanted: Option<&str>) -> anyhow::Result<String> {
    let initialized: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&str> = graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|name| !initialized.contains(name))
        .collect();
    match wanted {
        Some(name) if inputs.contains(&name) => Ok(name.to_owned()),
        Some(name) => bail!("input {name:?} is not a graph input (inputs: {inputs:?})"),
        None => match inputs.as_slice() {
            [only] => Ok((*only).to_owned()),
            _ => bail!("the graph has inputs {inputs:?}: say which one in `input`"),
        },
    }
}

/// The output read when config names none: the one output a `ZipMap`, a classifier's
/// probability output or a `Softmax` / `Sigmoid` makes (through pass-through operators such as
/// `Identity`, `Cast`, `Reshape` and `Concat`); else the graph's only output if it is a float
/// tensor (a regressor); else the only float `[N, C]` output beside integer or string ones (a
/// classifier whose probabilities are built in a way not recognised above). An integer or
/// string output is never chosen; anything else is refused, listing the outputs.
fn choose_output(graph: &pb::GraphProto, wanted: Option<&str>) -> anyhow::Result<String> {
    let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    if let Some(name) = wanted {
        ensure!(
            outputs.contains(&name),
            "output {name:?} is not a graph output (outputs: {})",
            describe_outputs(graph)
        );
        return Ok(name.to_owned());
    }
    ensure!(!graph.output.is_empty(), "the graph has no outputs");
    let producers: HashMap<&str, &pb::NodeProto> = graph
        .node
        .iter()
        .flat_map(|node| node.output.iter().map(move |o| (o.as_str(), node)))
        .collect();
    let probabilities: Vec<&pb::ValueInfoProto> = graph
        .output
        .iter()
        .filter(|o| element_kind(o) != ElementKind::NotScore)
        .filter(|o| is_probability(&producers, &o.name))
        .collect();
    match probabilities.as_slice() {
        [only] => return Ok(only.name.clone()),
        [] => {}
        several => bail!(
            "outputs {} all look like probabilities; {}",
            several
                .iter()
                .map(|o| format!("{:?}", o.name))
                .collect::<Vec<_>>()
                .join(", "),
            set_output_hint(graph)
        ),
    }
    let floats: Vec<&pb::ValueInfoProto> = graph
        .output
        .iter()
        .filter(|o| element_kind(o) == ElementKind::Float)
        .collect();
    if let [only] = graph.output.as_slice()
        && element_kind(only) != ElementKind::NotScore
    {
        // One output of a float (or undeclared, checked once typed) type: a regressor's value.
        return Ok(only.name.clone());
    }
    let others_are_labels = graph
        .output
        .iter()
        .all(|o| element_kind(o) != ElementKind::Unknown);
    if let [only] = floats.as_slice()
        && others_are_labels
        && is_class_matrix(only)
    {
        return Ok(only.name.clone());
    }
    bail!(
        "cannot tell which output holds the score: none is a probability output this loader \
         recognises or a model's only float output; {}",
        set_output_hint(graph)
    )
}

/// Whether `name` is made by a `ZipMap`, by a classifier as its probabilities (its second
/// output), or by `Softmax` / `Sigmoid`, possibly through pass-through operators. Each value is
/// looked at once, so a hostile graph costs no more than its size.
fn is_probability(producers: &HashMap<&str, &pb::NodeProto>, name: &str) -> bool {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut pending: Vec<&str> = vec![name];
    while let Some(name) = pending.pop() {
        if !seen.insert(name) {
            continue;
        }
        let Some(node) = producers.get(name) else {
            continue;
        };
        match node.op_type.as_str() {
            "ZipMap" | "Softmax" | "Sigmoid" => return true,
            op if op.ends_with("Classifier") && node.output.get(1).is_some_and(|o| o == name) => {
                return true;
            }
            // Every input is data: one probability column next to another (MLPClassifier
            // builds `[1 - p, p]` this way).
            "Concat" => pending.extend(node.input.iter().map(String::as_str)),
            // The first input is the data; the others (a shape, axes) are not.
            "Identity" | "Cast" | "CastLike" | "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => {
                pending.extend(node.input.first().map(String::as_str));
            }
            _ => {}
        }
    }
    false
}

/// What an output's declared element type says about reading it as a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElementKind {
    /// float, double, float16, bfloat16.
    Float,
    /// Integers, booleans, strings: labels, never a score by default.
    NotScore,
    /// Not a tensor (a `ZipMap`'s sequence of maps) or not declared.
    Unknown,
}

fn tensor_type(info: &pb::ValueInfoProto) -> Option<&pb::type_proto::Tensor> {
    let pb::type_proto::Value::TensorType(tensor) = info.r#type.as_ref()?.value.as_ref()?;
    Some(tensor)
}

fn element_kind(info: &pb::ValueInfoProto) -> ElementKind {
    use pb::tensor_proto::DataType;
    match tensor_type(info).map(|t| DataType::try_from(t.elem_type)) {
        Some(Ok(DataType::Float | DataType::Double | DataType::Float16 | DataType::Bfloat16)) => {
            ElementKind::Float
        }
        Some(Ok(DataType::Undefined)) | Some(Err(_)) | None => ElementKind::Unknown,
        Some(Ok(_)) => ElementKind::NotScore,
    }
}

/// Whether `info` is declared `[N, C]` with C not 1 (or not fixed).
fn is_class_matrix(info: &pb::ValueInfoProto) -> bool {
    use pb::tensor_shape_proto::dimension::Value;
    let Some(shape) = tensor_type(info).and_then(|t| t.shape.as_ref()) else {
        return false;
    };
    match shape.dim.as_slice() {
        [_, columns] => !matches!(columns.value, Some(Value::DimValue(1))),
        _ => false,
    }
}

/// `name (element type, [shape])` for every output, for errors.
fn describe_outputs(graph: &pb::GraphProto) -> String {
    use pb::tensor_proto::DataType;
    use pb::tensor_shape_proto::dimension::Value;
    let describe = |info: &pb::ValueInfoProto| {
        let Some(tensor) = tensor_type(info) else {
            return format!("{:?} (not a tensor)", info.name);
        };
        let element = match DataType::try_from(tensor.elem_type) {
            Ok(DataType::Undefined) | Err(_) => "undeclared type".to_owned(),
            Ok(data_type) => data_type.as_str_name().to_lowercase(),
        };
        let shape = match &tensor.shape {
            None => "undeclared shape".to_owned(),
            Some(shape) => {
                let dims: Vec<String> = shape
                    .dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(Value::DimValue(v)) => v.to_string(),
                        Some(Value::DimParam(p)) if !p.is_empty() => p.clone(),
                        _ => "N".to_owned(),
                    })
                    .collect();
                format!("[{}]", dims.join(", "))
            }
        };
        format!("{:?} ({element}, {shape})", info.name)
    };
    graph
        .output
        .iter()
        .map(describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The fix for an output that cannot be read by default: the config key and the outputs.
fn set_output_hint(graph: &pb::GraphProto) -> String {
    let example = graph
        .output
        .iter()
        .find(|o| element_kind(o) == ElementKind::Float && is_class_matrix(o))
        .or_else(|| {
            graph
                .output
                .iter()
                .find(|o| element_kind(o) == ElementKind::Float)
        })
        .map_or("<output name>", |o| o.name.as_str());
    format!(
        "set `output = \"{example}\"` (the output to read) in this model's [[models]] entry, \
         with `class` for a [N, classes] output; the outputs are {}",
        describe_outputs(graph)
    )
}

/// The opsets `proto` declares outside [`TESTED_ONNX_OPSETS`] and [`TESTED_ONNX_ML_OPSETS`]:
/// (domain, version).
pub(crate) fn untested_opsets(proto: &ModelProto) -> Vec<(String, i64)> {
    proto
        .opset_import
        .iter()
        .filter(|import| match import.domain.as_str() {
            "" | "ai.onnx" => !TESTED_ONNX_OPSETS.contains(&import.version),
            "ai.onnx.ml" => !TESTED_ONNX_ML_OPSETS.contains(&import.version),
            _ => true,
        })
        .map(|import| {
            let domain = if import.domain.is_empty() {
                "ai.onnx"
            } else {
                import.domain.as_str()
            };
            (domain.to_owned(), import.version)
        })
        .collect()
}

/// The tested opsets as docs/MODELS.md states them (a test checks the sentence is there).
pub fn tested_opsets_text() -> String {
    let range = |r: &RangeInclusive<i64>| {
        if r.start() == r.end() {
            format!("opset {}", r.start())
        } else {
            format!("opsets {} to {}", r.start(), r.end())
        }
    };
    format!(
        "`ai.onnx` {} and `ai.onnx.ml` {}",
        range(&TESTED_ONNX_OPSETS),
        range(&TESTED_ONNX_ML_OPSETS)
    )
}

/// The class labels of `output`, if a `ZipMap` or a classifier makes it (through `Identity`
/// or `Cast`).
fn labels_of(graph: &pb::GraphProto, output: &str) -> anyhow::Result<Option<Labels>> {
    let mut name = output.to_owned();
    for _ in 0..graph.node.len() {
        let Some(node) = graph.node.iter().find(|n| n.output.contains(&name)) else {
            return Ok(None);
        };
        match node.op_type.as_str() {
            "ZipMap" => return class_labels(node),
            op if op.ends_with("Classifier") => return class_labels(node),
            "Identity" | "Cast" => match node.input.first() {
                Some(input) => name.clone_from(input),
                None => return Ok(None),
            },
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// The declared width of a `[N, C]` graph input, if fixed.
fn declared_columns(graph: &pb::GraphProto, input: &str) -> Option<usize> {
    let info = graph.input.iter().find(|i| i.name == input)?;
    let pb::type_proto::Value::TensorType(tensor) = info.r#type.as_ref()?.value.as_ref()?;
    let dims = &tensor.shape.as_ref()?.dim;
    if dims.len() != 2 {
        return None;
    }
    match dims[1].value.as_ref()? {
        pb::tensor_shape_proto::dimension::Value::DimValue(v) if *v > 0 => usize::try_from(*v).ok(),
        _ => None,
    }
}

fn show(class: &ClassLabel) -> String {
    match class {
        ClassLabel::Int(i) => i.to_string(),
        ClassLabel::String(s) => format!("{s:?}"),
    }
}

fn resolve_class(
    class: Option<&ClassLabel>,
    labels: Option<&Labels>,
    width: usize,
    output: &str,
) -> anyhow::Result<usize> {
    let Some(class) = class else {
        return Ok(width - 1);
    };
    let found = match (labels, class) {
        (Some(Labels::Ints(ints)), ClassLabel::Int(i)) => ints.iter().position(|l| l == i),
        (Some(Labels::Strings(strings)), ClassLabel::String(s)) => {
            strings.iter().position(|l| l == s)
        }
        (Some(Labels::Strings(strings)), ClassLabel::Int(i)) => {
            strings.iter().position(|l| *l == i.to_string())
        }
        (Some(Labels::Ints(_)), ClassLabel::String(_)) => None,
        // No labels known: an integer is the column.
        (None, ClassLabel::Int(i)) => usize::try_from(*i).ok().filter(|i| *i < width),
        (None, ClassLabel::String(_)) => None,
    };
    found.with_context(|| match labels {
        Some(Labels::Ints(l)) => format!(
            "class {} is not one of the model's classes {l:?}",
            show(class)
        ),
        Some(Labels::Strings(l)) => format!(
            "class {} is not one of the model's classes {l:?}",
            show(class)
        ),
        None => format!(
            "class {} is not a column of output {output:?} ({width} columns, no class labels)",
            show(class)
        ),
    })
}
