//! Loading one ONNX model: tract's loader with our operators ([`super::ops`]), a check that
//! every operator is known (so a model tract cannot run fails at load, naming the operator),
//! the input and output chosen by config, the class column resolved, and the model optimised
//! for a `[N, columns]` f32 input.

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
    /// The ONNX output name; `None`: a classifier's probabilities, else the first output.
    pub output: Option<&'a str>,
    /// The class whose probability is read; `None`: the last column.
    pub class: Option<&'a ClassLabel>,
}

/// Run states kept for reuse (one per thread scoring at once, up to this many).
const MAX_IDLE_STATES: usize = 8;

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
        let graph = proto.graph.as_ref().context("the file holds no graph")?;
        let operators = check_operators(&onnx, graph)?;
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
            .model_for_proto_model(&proto)
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
        let width = match fact.rank() {
            1 => Some(1),
            2 => fact.shape[1].as_i64().map(|w| w as usize),
            rank => bail!("output {output:?} has rank {rank}; a [N] or [N, C] output is needed"),
        };
        let column = match (width, selection.class) {
            (Some(1), None) => None,
            (Some(1), Some(class)) => {
                bail!(
                    "output {output:?} has one column; class {} does not apply",
                    show(class)
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

/// The output read when config names none: what a `ZipMap` makes, else a classifier's
/// probability output, else the first output.
fn choose_output(graph: &pb::GraphProto, wanted: Option<&str>) -> anyhow::Result<String> {
    let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    if let Some(name) = wanted {
        ensure!(
            outputs.contains(&name),
            "output {name:?} is not a graph output (outputs: {outputs:?})"
        );
        return Ok(name.to_owned());
    }
    let produced_by = |name: &str| {
        graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == name))
    };
    let probabilities = outputs.iter().find(|name| {
        produced_by(name).is_some_and(|node| {
            node.op_type == "ZipMap"
                || (node.op_type.ends_with("Classifier")
                    && node.output.get(1).is_some_and(|o| o == *name))
        })
    });
    probabilities
        .or(outputs.first())
        .map(|name| (*name).to_owned())
        .context("the graph has no outputs")
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
