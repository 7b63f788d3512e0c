//! Operators registered on tract's ONNX loader for what scikit-learn exports and tract 0.23
//! lacks or runs slowly: `ZipMap` (its probability matrix is passed through, since scoring
//! reads one column of it), `Scaler` (`(x - offset) * scale`, wired to tract's own arithmetic),
//! and `TreeEnsembleClassifier`/`TreeEnsembleRegressor`, replaced by the fast path in
//! [`super::trees`].

use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::logic::wire_with_rank_broadcast;

use super::trees::{Labels, TreeEnsemble};

/// Registers our operators over tract's.
pub(crate) fn register(ops: &mut OnnxOpRegister) {
    ops.insert("ZipMap", zip_map);
    ops.insert("Scaler", scaler);
    ops.insert("TreeEnsembleClassifier", tree_ensemble);
    ops.insert("TreeEnsembleRegressor", tree_ensemble);
}

type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

fn zip_map(_ctx: &ParsingContext, _node: &NodeProto) -> Built {
    Ok((expand(ZipMap), vec![]))
}

fn scaler(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let floats = |name: &str| -> Vec<f32> {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.floats.clone())
            .unwrap_or_default()
    };
    Ok((
        expand(Scaler {
            offset: floats("offset"),
            scale: floats("scale"),
        }),
        vec![],
    ))
}

fn tree_ensemble(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let ensemble = TreeEnsemble::parse(node)?;
    Ok((
        expand(TreeOp {
            ensemble: Arc::new(ensemble),
        }),
        vec![],
    ))
}

/// `ZipMap`: a `[N, C]` probability matrix becomes a sequence of maps in ONNX. Here it stays the
/// matrix; the class labels are read from the node when the output is chosen.
#[derive(Debug, Clone)]
struct ZipMap;

impl Expansion for ZipMap {
    fn name(&self) -> StaticName {
        "ZipMap".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        _prefix: &str,
        _model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        Ok(tvec!(inputs[0]))
    }
}

/// `Scaler` (ai.onnx.ml): `(x - offset) * scale`, per column or one value for all.
#[derive(Debug, Clone)]
struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        if model.outlet_fact(x)?.datum_type != f32::datum_type() {
            x = model.wire_node(
                format!("{prefix}.to_f32"),
                tract_core::ops::cast::cast(f32::datum_type()),
                &[x],
            )?[0];
        }
        let fact = model.outlet_fact(x)?.clone();
        let width = fact
            .shape
            .last()
            .and_then(|d| d.as_i64())
            .map(|w| w as usize);
        let fits = |v: &[f32]| v.len() <= 1 || Some(v.len()) == width;
        if fact.rank() >= 1 && fits(&self.offset) && fits(&self.scale) {
            // One pass over the data (tract's broadcasting sub and mul cost more than the
            // model they feed).
            return model.wire_node(
                format!("{prefix}.scale"),
                ScalerEval {
                    offset: Arc::new(self.offset.clone()),
                    scale: Arc::new(self.scale.clone()),
                },
                &[x],
            );
        }
        if !self.offset.is_empty() {
            let offset = model.add_const(format!("{prefix}.offset"), rctensor1(&self.offset))?;
            x = wire_with_rank_broadcast(
                format!("{prefix}.sub"),
                model,
                tract_core::ops::math::sub(),
                &[x, offset],
            )?[0];
        }
        if !self.scale.is_empty() {
            let scale = model.add_const(format!("{prefix}.scale"), rctensor1(&self.scale))?;
            x = wire_with_rank_broadcast(
                format!("{prefix}.mul"),
                model,
                tract_core::ops::math::mul(),
                &[x, scale],
            )?[0];
        }
        Ok(tvec!(x))
    }
}

/// `(x - offset) * scale` over the last axis in one pass; `offset` and `scale` have one value
/// for all columns, one per column, or none.
#[derive(Debug, Clone)]
pub(crate) struct ScalerEval {
    offset: Arc<Vec<f32>>,
    scale: Arc<Vec<f32>>,
}

impl PartialEq for ScalerEval {
    fn eq(&self, other: &ScalerEval) -> bool {
        self.offset == other.offset && self.scale == other.scale
    }
}

impl Eq for ScalerEval {}

impl Op for ScalerEval {
    fn name(&self) -> StaticName {
        "RunnelScaler".into()
    }

    op_as_typed_op!();
}

impl EvalOp for ScalerEval {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape: TVec<usize> = input.shape().into();
        let width = shape.last().copied().unwrap_or(1).max(1);
        let plain = input.try_as_plain_ram()?;
        let values = plain.as_slice::<f32>()?;
        let pick = |v: &[f32], column: usize, default: f32| match v.len() {
            0 => default,
            1 => v[0],
            _ => v[column],
        };
        let offsets: Vec<f32> = (0..width).map(|c| pick(&self.offset, c, 0.0)).collect();
        let scales: Vec<f32> = (0..width).map(|c| pick(&self.scale, c, 1.0)).collect();
        let mut out = Vec::with_capacity(values.len());
        for row in values.chunks(width) {
            for ((x, o), s) in row.iter().zip(&offsets).zip(&scales) {
                out.push((x - o) * s);
            }
        }
        Ok(tvec!(Tensor::from_shape(&shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for ScalerEval {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// A tree ensemble node while the model is inferred; wires [`TreeEval`].
#[derive(Debug, Clone)]
struct TreeOp {
    ensemble: Arc<TreeEnsemble>,
}

impl TreeOp {
    fn label_type(&self) -> Option<DatumType> {
        self.ensemble.labels.as_ref().map(|labels| match labels {
            Labels::Ints(_) => DatumType::I64,
            Labels::Strings(_) => DatumType::String,
        })
    }
}

impl Expansion for TreeOp {
    fn name(&self) -> StaticName {
        if self.ensemble.is_classifier() {
            "TreeEnsembleClassifier".into()
        } else {
            "TreeEnsembleRegressor".into()
        }
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(if self.ensemble.is_classifier() { 2 } else { 1 })
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        let scores = match self.label_type() {
            Some(label_type) => {
                check_output_arity(outputs, 2)?;
                s.equals(&outputs[0].datum_type, label_type)?;
                s.equals(&outputs[0].rank, 1)?;
                s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
                &outputs[1]
            }
            None => {
                check_output_arity(outputs, 1)?;
                &outputs[0]
            }
        };
        s.equals(&scores.datum_type, DatumType::F32)?;
        s.equals(&scores.rank, 2)?;
        s.equals(&scores.shape[0], &inputs[0].shape[0])?;
        s.equals(&scores.shape[1], self.ensemble.n_outputs().to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        let fact = model.outlet_fact(x)?.clone();
        ensure!(
            fact.rank() == 2,
            "tree ensembles take a [rows, features] input"
        );
        if let Some(cols) = fact.shape[1].as_i64() {
            ensure!(
                cols as usize >= self.ensemble.n_features,
                "the trees read feature {} of a {cols}-column input",
                self.ensemble.n_features - 1
            );
        }
        if fact.datum_type != f32::datum_type() {
            x = model.wire_node(
                format!("{prefix}.to_f32"),
                tract_core::ops::cast::cast(f32::datum_type()),
                &[x],
            )?[0];
        }
        model.wire_node(
            format!("{prefix}.trees"),
            TreeEval {
                ensemble: Arc::clone(&self.ensemble),
            },
            &[x],
        )
    }
}

/// Evaluates a tree ensemble on a `[rows, features]` f32 tensor: `(labels, probabilities)` for
/// a classifier, `(values)` for a regressor.
#[derive(Debug, Clone)]
pub(crate) struct TreeEval {
    ensemble: Arc<TreeEnsemble>,
}

/// Two evaluators are equal when they share their trees (tract compares ops to merge nodes).
impl PartialEq for TreeEval {
    fn eq(&self, other: &TreeEval) -> bool {
        Arc::ptr_eq(&self.ensemble, &other.ensemble)
    }
}

impl Eq for TreeEval {}

impl Op for TreeEval {
    fn name(&self) -> StaticName {
        "RunnelTreeEnsemble".into()
    }

    op_as_typed_op!();
}

impl EvalOp for TreeEval {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        ensure!(
            shape.len() == 2,
            "tree ensembles take a [rows, features] input"
        );
        let (n_rows, n_cols) = (shape[0], shape[1]);
        ensure!(
            n_cols >= self.ensemble.n_features,
            "the trees read feature {} of a {n_cols}-column input",
            self.ensemble.n_features.saturating_sub(1)
        );
        let rows = input.try_as_plain_ram()?;
        let rows = rows.as_slice::<f32>()?;
        let k = self.ensemble.n_outputs();
        let mut scores = vec![0f32; n_rows * k];
        let scores_tensor;
        match &self.ensemble.labels {
            None => {
                self.ensemble.eval(rows, n_cols, &mut scores, None);
                scores_tensor = Tensor::from_shape(&[n_rows, k], &scores)?;
                Ok(tvec!(scores_tensor.into_tvalue()))
            }
            Some(labels) => {
                let mut winners = vec![0usize; n_rows];
                self.ensemble
                    .eval(rows, n_cols, &mut scores, Some(&mut winners));
                scores_tensor = Tensor::from_shape(&[n_rows, k], &scores)?;
                let labels = match labels {
                    Labels::Ints(ints) => {
                        let picked: Vec<i64> = winners.iter().map(|w| ints[*w]).collect();
                        Tensor::from_shape(&[n_rows], &picked)?
                    }
                    Labels::Strings(strings) => {
                        let picked: Vec<String> =
                            winners.iter().map(|w| strings[*w].clone()).collect();
                        tensor1(&picked)
                    }
                };
                Ok(tvec!(labels.into_tvalue(), scores_tensor.into_tvalue()))
            }
        }
    }
}

impl TypedOp for TreeEval {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = inputs[0].shape[0].clone();
        let scores = f32::fact(&[n.clone(), self.ensemble.n_outputs().to_dim()]);
        Ok(match &self.ensemble.labels {
            None => tvec!(scores),
            Some(Labels::Ints(_)) => tvec!(i64::fact(&[n]), scores),
            Some(Labels::Strings(_)) => tvec!(String::fact(&[n]), scores),
        })
    }

    as_op!();
}
