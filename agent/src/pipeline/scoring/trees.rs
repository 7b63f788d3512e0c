//! The fast path for tree ensembles: `TreeEnsembleClassifier` and `TreeEnsembleRegressor`
//! (ai.onnx.ml) read from the node's attributes in the ONNX file into one flat array of nodes,
//! evaluated row by row without allocation. Semantics follow onnxruntime's CPU kernels, which is
//! what exporters test against: base values, `post_transform` (NONE, LOGISTIC, SOFTMAX,
//! SOFTMAX_ZERO), the binary classifier with one score column (one `base_values` entry, as
//! scikit-learn's GradientBoosting and XGBoost export), all six branch modes and
//! `nodes_missing_value_tracks_true`.

use std::collections::HashMap;

use anyhow::{Context, bail, ensure};
use tract_onnx::pb::{AttributeProto, NodeProto};

/// A branch node's comparison; `Leaf` ends the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
    Leaf,
}

/// One node of the flat array. `next` holds the flat indices of the false and the true child
/// (so the comparison's outcome indexes it, without a branch); a leaf points to itself twice
/// and reads feature 0, so a walk of fixed depth can pass it. `leaf` is a leaf's range of
/// weights in [`TreeEnsemble::weights`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    value: f32,
    feature: u32,
    next: [u32; 2],
    leaf: [u32; 2],
    mode: Mode,
    missing_true: bool,
}

/// How leaf values of one target combine across trees (regressors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

/// What is applied to the scores at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PostTransform {
    None,
    Logistic,
    Softmax,
    SoftmaxZero,
}

/// Class labels of a classifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Labels {
    Ints(Vec<i64>),
    Strings(Vec<String>),
}

impl Labels {
    pub(crate) fn len(&self) -> usize {
        match self {
            Labels::Ints(v) => v.len(),
            Labels::Strings(v) => v.len(),
        }
    }
}

/// A parsed tree ensemble.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TreeEnsemble {
    nodes: Vec<Node>,
    /// Flat index of each tree's root.
    roots: Vec<u32>,
    /// Branches on each tree's longest path.
    depths: Vec<u32>,
    /// Leaf weights: (class or target, weight).
    weights: Vec<(u32, f32)>,
    /// Classes (classifier) or targets (regressor): the width of the score output.
    n_outputs: usize,
    /// Highest feature index used, plus one.
    pub(crate) n_features: usize,
    base_values: Vec<f32>,
    post_transform: PostTransform,
    aggregate: Aggregate,
    /// Classifier only: its labels.
    pub(crate) labels: Option<Labels>,
    /// Classifier: two classes and leaves that only ever vote for one of them.
    binary_one_column: bool,
    /// Classifier: no leaf weight is negative (decides the binary layout, as onnxruntime does).
    weights_all_positive: bool,
    /// Classifier: whether some leaf votes for the class (onnxruntime's `has_score`).
    class_has_votes: Vec<bool>,
    /// How rows walk the trees.
    walk: Walk,
    /// Sums (or averages) with at most one weight per leaf, as gradient boosting and most
    /// regressors export: leaves are added without the general aggregate loop.
    one_weight_sum: bool,
}

/// The walk used: one comparison for every branch, or the general one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// Every branch is `BRANCH_LEQ` without a missing-value track (scikit-learn).
    Leq,
    /// Every branch is `BRANCH_LT` without a missing-value track (XGBoost, LightGBM).
    Lt,
    /// Anything else.
    Any,
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints<'a>(node: &'a NodeProto, name: &str) -> &'a [i64] {
    attr(node, name).map_or(&[], |a| &a.ints)
}

fn floats<'a>(node: &'a NodeProto, name: &str) -> &'a [f32] {
    attr(node, name).map_or(&[], |a| &a.floats)
}

fn strings(node: &NodeProto, name: &str) -> anyhow::Result<Vec<String>> {
    attr(node, name).map_or(Ok(Vec::new()), |a| {
        a.strings
            .iter()
            .map(|s| String::from_utf8(s.clone()).with_context(|| format!("attribute {name}")))
            .collect()
    })
}

fn string(node: &NodeProto, name: &str) -> anyhow::Result<Option<String>> {
    attr(node, name)
        .map(|a| String::from_utf8(a.s.clone()).with_context(|| format!("attribute {name}")))
        .transpose()
}

fn index(value: i64, what: &str) -> anyhow::Result<u32> {
    u32::try_from(value).with_context(|| format!("{what} {value} is out of range"))
}

/// The class labels of a classifier node (`TreeEnsembleClassifier`, `LinearClassifier`,
/// `ZipMap`, ...), if it has any.
pub(crate) fn class_labels(node: &NodeProto) -> anyhow::Result<Option<Labels>> {
    let int_labels = ints(node, "classlabels_int64s");
    let string_labels = strings(node, "classlabels_strings")?;
    Ok(match (int_labels.is_empty(), string_labels.is_empty()) {
        (false, _) => Some(Labels::Ints(int_labels.to_vec())),
        (true, false) => Some(Labels::Strings(string_labels)),
        (true, true) => None,
    })
}

impl TreeEnsemble {
    /// Reads a `TreeEnsembleClassifier` or `TreeEnsembleRegressor` node.
    pub(crate) fn parse(node: &NodeProto) -> anyhow::Result<TreeEnsemble> {
        let classifier = match node.op_type.as_str() {
            "TreeEnsembleClassifier" => true,
            "TreeEnsembleRegressor" => false,
            other => bail!("{other} is not a tree ensemble"),
        };
        for double in ["nodes_values_as_tensor", "base_values_as_tensor"] {
            ensure!(
                attr(node, double).is_none(),
                "{double} (double precision trees) is not supported"
            );
        }
        let tree_ids = ints(node, "nodes_treeids");
        let node_ids = ints(node, "nodes_nodeids");
        let feature_ids = ints(node, "nodes_featureids");
        let values = floats(node, "nodes_values");
        let true_ids = ints(node, "nodes_truenodeids");
        let false_ids = ints(node, "nodes_falsenodeids");
        let modes = strings(node, "nodes_modes")?;
        let missing = ints(node, "nodes_missing_value_tracks_true");
        let n = tree_ids.len();
        ensure!(n > 0, "the ensemble has no nodes");
        for (name, len) in [
            ("nodes_nodeids", node_ids.len()),
            ("nodes_featureids", feature_ids.len()),
            ("nodes_values", values.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
            ("nodes_modes", modes.len()),
        ] {
            ensure!(len == n, "{name} has {len} entries, nodes_treeids {n}");
        }
        ensure!(
            missing.is_empty() || missing.len() == n,
            "nodes_missing_value_tracks_true has {} entries, nodes_treeids {n}",
            missing.len()
        );

        // Flat index of every (tree, node) pair; trees keep the order of their first node.
        let mut flat: HashMap<(i64, i64), u32> = HashMap::with_capacity(n);
        let mut roots_by_tree: Vec<(i64, u32)> = Vec::new();
        for i in 0..n {
            let key = (tree_ids[i], node_ids[i]);
            let id = u32::try_from(i).context("too many nodes")?;
            ensure!(
                flat.insert(key, id).is_none(),
                "node {} of tree {} is listed twice",
                key.1,
                key.0
            );
            if roots_by_tree
                .last()
                .is_none_or(|(tree, _)| *tree != tree_ids[i])
                && !roots_by_tree.iter().any(|(tree, _)| *tree == tree_ids[i])
            {
                roots_by_tree.push((tree_ids[i], u32::MAX));
            }
        }
        for (tree, root) in &mut roots_by_tree {
            // The root is node 0 of the tree (the ONNX spec numbers nodes from 0).
            *root = *flat
                .get(&(*tree, 0))
                .with_context(|| format!("tree {tree} has no node 0"))?;
        }

        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mode = match modes[i].as_str() {
                "BRANCH_LEQ" => Mode::Leq,
                "BRANCH_LT" => Mode::Lt,
                "BRANCH_GTE" => Mode::Gte,
                "BRANCH_GT" => Mode::Gt,
                "BRANCH_EQ" => Mode::Eq,
                "BRANCH_NEQ" => Mode::Neq,
                "LEAF" => Mode::Leaf,
                other => bail!("node mode {other} is not supported"),
            };
            let self_id = u32::try_from(i).context("too many nodes")?;
            let (a, b) = if mode == Mode::Leaf {
                (self_id, self_id)
            } else {
                let child = |id: i64| {
                    flat.get(&(tree_ids[i], id)).copied().with_context(|| {
                        format!(
                            "node {} of tree {} points to missing node {id}",
                            node_ids[i], tree_ids[i]
                        )
                    })
                };
                (child(true_ids[i])?, child(false_ids[i])?)
            };
            nodes.push(Node {
                value: values[i],
                feature: if mode == Mode::Leaf {
                    0
                } else {
                    index(feature_ids[i], "feature id")?
                },
                next: [b, a],
                leaf: [0, 0],
                mode,
                missing_true: missing.get(i).is_some_and(|m| *m != 0),
            });
        }

        // Leaf weights, grouped by leaf in file order.
        let prefix = if classifier { "class" } else { "target" };
        let w_tree = ints(node, &format!("{prefix}_treeids"));
        let w_node = ints(node, &format!("{prefix}_nodeids"));
        let w_id = ints(node, &format!("{prefix}_ids"));
        let w_value = floats(node, &format!("{prefix}_weights"));
        let m = w_tree.len();
        for (name, len) in [
            ("nodeids", w_node.len()),
            ("ids", w_id.len()),
            ("weights", w_value.len()),
        ] {
            ensure!(
                len == m,
                "{prefix}_{name} has {len} entries, {prefix}_treeids {m}"
            );
        }
        let mut per_leaf: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        for j in 0..m {
            let leaf = *flat.get(&(w_tree[j], w_node[j])).with_context(|| {
                format!(
                    "a weight names missing node {} of tree {}",
                    w_node[j], w_tree[j]
                )
            })?;
            ensure!(
                nodes[leaf as usize].mode == Mode::Leaf,
                "a weight is attached to branch node {} of tree {}",
                w_node[j],
                w_tree[j]
            );
            per_leaf[leaf as usize].push((index(w_id[j], "class or target id")?, w_value[j]));
        }
        let mut weights = Vec::with_capacity(m);
        for (i, leaf_weights) in per_leaf.into_iter().enumerate() {
            if nodes[i].mode == Mode::Leaf {
                nodes[i].leaf[0] = u32::try_from(weights.len()).context("too many weights")?;
                weights.extend(leaf_weights);
                nodes[i].leaf[1] = u32::try_from(weights.len()).context("too many weights")?;
            }
        }

        let labels = if classifier {
            Some(
                class_labels(node)?
                    .context("a classifier needs classlabels_int64s or classlabels_strings")?,
            )
        } else {
            None
        };
        let n_outputs = match &labels {
            Some(labels) => labels.len(),
            None => {
                let targets = attr(node, "n_targets").map_or(1, |a| a.i);
                usize::try_from(targets)
                    .ok()
                    .filter(|t| *t > 0)
                    .context("n_targets must be at least 1")?
            }
        };
        ensure!(n_outputs > 0, "the classifier has no classes");
        if let Some(bad) = weights.iter().find(|(id, _)| *id as usize >= n_outputs) {
            bail!("a leaf votes for {prefix} {} of {n_outputs}", bad.0);
        }
        let base_values = floats(node, "base_values").to_vec();
        let post_transform = match string(node, "post_transform")?.as_deref() {
            None | Some("NONE") => PostTransform::None,
            Some("LOGISTIC") => PostTransform::Logistic,
            Some("SOFTMAX") => PostTransform::Softmax,
            Some("SOFTMAX_ZERO") => PostTransform::SoftmaxZero,
            Some(other) => bail!("post_transform {other} is not supported"),
        };
        let aggregate = match string(node, "aggregate_function")?.as_deref() {
            None | Some("SUM") => Aggregate::Sum,
            Some("AVERAGE") => Aggregate::Average,
            Some("MIN") => Aggregate::Min,
            Some("MAX") => Aggregate::Max,
            Some(other) => bail!("aggregate_function {other} is not supported"),
        };
        let mut class_has_votes = vec![false; n_outputs];
        for (id, _) in &weights {
            class_has_votes[*id as usize] = true;
        }
        let voted = class_has_votes.iter().filter(|v| **v).count();
        let binary_one_column = classifier && n_outputs == 2 && voted == 1;
        ensure!(
            base_values.is_empty()
                || base_values.len() == n_outputs
                || (binary_one_column && base_values.len() == 1),
            "base_values has {} entries for {n_outputs} outputs",
            base_values.len()
        );
        let n_features = nodes
            .iter()
            .filter(|node| node.mode != Mode::Leaf)
            .map(|node| node.feature as usize + 1)
            .max()
            .unwrap_or(0);
        let all = |mode: Mode| {
            nodes
                .iter()
                .all(|n| n.mode == Mode::Leaf || (n.mode == mode && !n.missing_true))
        };
        let walk = if all(Mode::Leq) {
            Walk::Leq
        } else if all(Mode::Lt) {
            Walk::Lt
        } else {
            Walk::Any
        };
        let one_weight_sum = matches!(aggregate, Aggregate::Sum | Aggregate::Average)
            && nodes
                .iter()
                .filter(|node| node.mode == Mode::Leaf)
                .all(|node| node.leaf[1] - node.leaf[0] <= 1);
        let roots: Vec<u32> = roots_by_tree.into_iter().map(|(_, root)| root).collect();
        let depths = roots
            .iter()
            .map(|root| depth_of(&nodes, *root))
            .collect::<anyhow::Result<Vec<u32>>>()?;
        Ok(TreeEnsemble {
            walk,
            depths,
            nodes,
            roots,
            weights_all_positive: weights.iter().all(|(_, w)| *w >= 0.0),
            weights,
            n_outputs,
            n_features,
            base_values,
            post_transform,
            aggregate,
            labels,
            binary_one_column,
            class_has_votes,
            one_weight_sum,
        })
    }

    /// Width of the score output: classes or targets.
    pub(crate) fn n_outputs(&self) -> usize {
        self.n_outputs
    }

    pub(crate) fn is_classifier(&self) -> bool {
        self.labels.is_some()
    }

    /// The leaf a row reaches in the tree rooted at `root`, for any mix of modes.
    #[inline]
    fn leaf(&self, root: u32, _depth: u32, row: &[f32]) -> &Node {
        let mut node = &self.nodes[root as usize];
        loop {
            let x = row[node.feature as usize];
            let go_true = match node.mode {
                Mode::Leaf => return node,
                Mode::Leq => x <= node.value,
                Mode::Lt => x < node.value,
                Mode::Gte => x >= node.value,
                Mode::Gt => x > node.value,
                Mode::Eq => x == node.value,
                Mode::Neq => x != node.value,
            };
            let go_true = go_true || (node.missing_true && x.is_nan());
            node = &self.nodes[node.next[usize::from(go_true)] as usize];
        }
    }

    /// Rows scored together, tree by tree: the walks of different rows are independent, so
    /// the processor overlaps them, and the tree's nodes stay in cache.
    const BLOCK: usize = 32;

    /// Scores `rows` (row-major, `n_cols` columns each, at least [`Self::n_features`]) into
    /// `scores` (`n_outputs` per row) and, for classifiers, the winning class index per row
    /// into `winners`.
    pub(crate) fn eval(
        &self,
        rows: &[f32],
        n_cols: usize,
        scores: &mut [f32],
        winners: Option<&mut [usize]>,
    ) {
        match self.walk {
            Walk::Leq => self.eval_with(rows, n_cols, scores, winners, Self::walk_lockstep::<true>),
            Walk::Lt => self.eval_with(rows, n_cols, scores, winners, Self::walk_lockstep::<false>),
            Walk::Any => self.eval_with(rows, n_cols, scores, winners, Self::walk_each),
        }
    }

    /// The leaves a block of rows reaches in one tree, row by row, for any mix of modes.
    fn walk_each(&self, root: u32, depth: u32, block: &[f32], n_cols: usize, leaves: &mut [u32]) {
        for (r, row) in block.chunks_exact(n_cols).enumerate() {
            let leaf = self.leaf(root, depth, row);
            leaves[r] = leaf.leaf[0];
            leaves[Self::BLOCK + r] = leaf.leaf[1];
        }
    }

    /// The leaves a block of rows reaches in one tree, all rows one level at a time: each
    /// level is [`Self::BLOCK`] independent loads the processor overlaps.
    #[inline(always)]
    fn walk_lockstep<const LEQ: bool>(
        &self,
        root: u32,
        depth: u32,
        block: &[f32],
        n_cols: usize,
        leaves: &mut [u32],
    ) {
        let n = block.len() / n_cols;
        let mut at = [root; Self::BLOCK];
        for _ in 0..depth {
            for (r, id) in at.iter_mut().enumerate().take(n) {
                let node = &self.nodes[*id as usize];
                let x = block[r * n_cols + node.feature as usize];
                let go_true = if LEQ { x <= node.value } else { x < node.value };
                *id = node.next[usize::from(go_true)];
            }
        }
        for (r, id) in at.iter().enumerate().take(n) {
            let leaf = &self.nodes[*id as usize];
            leaves[r] = leaf.leaf[0];
            leaves[Self::BLOCK + r] = leaf.leaf[1];
        }
    }

    #[inline(always)]
    fn eval_with<'a>(
        &'a self,
        rows: &[f32],
        n_cols: usize,
        scores: &mut [f32],
        mut winners: Option<&mut [usize]>,
        walk: impl Fn(&'a Self, u32, u32, &[f32], usize, &mut [u32]),
    ) {
        let k = self.n_outputs;
        let mut acc = vec![0f64; Self::BLOCK * k];
        let mut touched = vec![false; Self::BLOCK * k];
        // Weight ranges of the leaves reached: starts, then ends.
        let mut leaves = [0u32; 2 * Self::BLOCK];
        for (b, block) in rows.chunks(Self::BLOCK * n_cols).enumerate() {
            let n = block.len() / n_cols;
            acc.iter_mut().for_each(|a| *a = 0.0);
            touched.iter_mut().for_each(|t| *t = false);
            for (&root, &depth) in self.roots.iter().zip(&self.depths) {
                walk(self, root, depth, block, n_cols, &mut leaves);
                if self.one_weight_sum {
                    for r in 0..n {
                        let (start, end) = (leaves[r] as usize, leaves[Self::BLOCK + r] as usize);
                        if end > start {
                            let (id, w) = self.weights[start];
                            acc[r * k + id as usize] += f64::from(w);
                        }
                    }
                    continue;
                }
                for r in 0..n {
                    let range = leaves[r] as usize..leaves[Self::BLOCK + r] as usize;
                    for &(id, w) in &self.weights[range] {
                        let i = r * k + id as usize;
                        let w = f64::from(w);
                        acc[i] = match self.aggregate {
                            Aggregate::Sum | Aggregate::Average => acc[i] + w,
                            Aggregate::Min if touched[i] => acc[i].min(w),
                            Aggregate::Max if touched[i] => acc[i].max(w),
                            Aggregate::Min | Aggregate::Max => w,
                        };
                        touched[i] = true;
                    }
                }
            }
            for r in 0..n {
                let row = b * Self::BLOCK + r;
                let out = &mut scores[row * k..(row + 1) * k];
                let acc = &mut acc[r * k..(r + 1) * k];
                let winner = if self.is_classifier() {
                    self.finish_classifier(acc, out)
                } else {
                    self.finish_regressor(acc, out);
                    0
                };
                if let Some(winners) = winners.as_deref_mut() {
                    winners[row] = winner;
                }
            }
        }
    }

    fn finish_regressor(&self, acc: &mut [f64], out: &mut [f32]) {
        if self.aggregate == Aggregate::Average {
            let n_trees = self.roots.len() as f64;
            acc.iter_mut().for_each(|a| *a /= n_trees);
        }
        for (i, a) in acc.iter_mut().enumerate() {
            *a += f64::from(self.base_values.get(i).copied().unwrap_or(0.0));
        }
        post_transform(self.post_transform, acc, out);
    }

    /// Returns the winning class index.
    fn finish_classifier(&self, acc: &mut [f64], out: &mut [f32]) -> usize {
        if !self.binary_one_column {
            for (i, a) in acc.iter_mut().enumerate() {
                *a += f64::from(self.base_values.get(i).copied().unwrap_or(0.0));
            }
            let winner = argmax(acc);
            post_transform(self.post_transform, acc, out);
            return winner;
        }
        // Two classes, one voted column (onnxruntime's binary case).
        let column = self.class_has_votes.iter().position(|v| *v).unwrap_or(0);
        if column == 1 {
            // Votes for class 1 only: an ordinary two-column result.
            match self.base_values.as_slice() {
                [b] => acc[1] += f64::from(*b),
                [b0, b1] => {
                    acc[0] += f64::from(*b0);
                    acc[1] += f64::from(*b1);
                }
                _ => {}
            }
            let winner = argmax(acc);
            post_transform(self.post_transform, acc, out);
            return winner;
        }
        let s = acc[0] + f64::from(self.base_values.first().copied().unwrap_or(0.0));
        let positive = if self.weights_all_positive {
            // The votes are already the probability of class 1.
            out[1] = s as f32;
            out[0] = (1.0 - s) as f32;
            s > 0.5
        } else {
            let mut pair = [-s, s];
            if self.post_transform == PostTransform::Logistic {
                out[0] = logistic(-s) as f32;
                out[1] = logistic(s) as f32;
            } else {
                post_transform(self.post_transform, &mut pair, out);
            }
            s > 0.0
        };
        usize::from(positive)
    }
}

/// Branches on the longest path from `root`; fails on a cycle.
fn depth_of(nodes: &[Node], root: u32) -> anyhow::Result<u32> {
    let mut deepest = 0;
    let mut stack = vec![(root, 0u32)];
    let mut visits = 0usize;
    while let Some((id, depth)) = stack.pop() {
        visits += 1;
        ensure!(visits <= nodes.len(), "the trees' child links form a cycle");
        let node = &nodes[id as usize];
        if node.mode == Mode::Leaf {
            deepest = deepest.max(depth);
        } else {
            stack.push((node.next[0], depth + 1));
            stack.push((node.next[1], depth + 1));
        }
    }
    Ok(deepest)
}

fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

fn logistic(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn post_transform(transform: PostTransform, acc: &mut [f64], out: &mut [f32]) {
    match transform {
        PostTransform::None => {
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                *o = *a as f32;
            }
        }
        PostTransform::Logistic => {
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                *o = logistic(*a) as f32;
            }
        }
        PostTransform::Softmax | PostTransform::SoftmaxZero => {
            let zero = transform == PostTransform::SoftmaxZero;
            let max = acc
                .iter()
                .filter(|a| !zero || **a != 0.0)
                .fold(f64::NEG_INFINITY, |m, a| m.max(*a));
            let mut sum = 0.0;
            for a in acc.iter_mut() {
                *a = if zero && *a == 0.0 {
                    0.0
                } else {
                    (*a - max).exp()
                };
                sum += *a;
            }
            for (o, a) in out.iter_mut().zip(acc.iter()) {
                *o = if sum > 0.0 { (*a / sum) as f32 } else { 0.0 };
            }
        }
    }
}
