//! Every fixture model (tests/fixtures/models, made by generate.py) scores its reference rows
//! as onnxruntime did, within 1e-5, on every output; the default output of classifiers
//! exported with and without `ZipMap`, and the refusal of outputs that are not a score; the
//! opsets docs/MODELS.md states; the input mapping; load errors.

use std::path::{Path, PathBuf};

use runnel_common::{Event, SourceKind, Value};
use runnel_config::{ClassLabel, EventField, ModelConfig, ModelInput, OutputField, Transform};
use serde_json::Value as Json;
use tract_onnx::prelude::*;

use super::model::{
    OnnxModel, Selection, TESTED_ONNX_ML_OPSETS, TESTED_ONNX_OPSETS, load_all_outputs, loader,
    tested_opsets_text, untested_opsets,
};
use super::{LoadedModel, Scoring, push_row};

const TOLERANCE: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn references() -> serde_json::Map<String, Json> {
    let text = std::fs::read_to_string(fixtures().join("references.json")).expect("references");
    let json: Json = serde_json::from_str(&text).expect("references parse");
    json["models"].as_object().expect("models").clone()
}

fn rows_of(reference: &Json) -> (Vec<f32>, usize) {
    let rows = reference["inputs"].as_array().expect("inputs");
    let width = rows[0].as_array().expect("row").len();
    let flat = rows
        .iter()
        .flat_map(|row| row.as_array().expect("row").iter())
        .map(|v| v.as_f64().map_or(f32::NAN, |v| v as f32))
        .collect();
    (flat, width)
}

fn flatten(json: &Json) -> Vec<f64> {
    match json {
        Json::Array(items) => items.iter().flat_map(flatten).collect(),
        Json::Number(n) => vec![n.as_f64().expect("number")],
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn every_fixture_matches_onnxruntime_on_every_output() {
    let references = references();
    assert!(references.len() >= 10, "{} fixtures", references.len());
    for (name, reference) in &references {
        let path = fixtures().join(reference["file"].as_str().expect("file"));
        let (rows, width) = rows_of(reference);
        let n_rows = rows.len() / width;
        let (plan, names) =
            load_all_outputs(&path, width).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let input = Tensor::from_shape(&[n_rows, width], &rows).expect("tensor");
        let outputs = plan
            .run(tvec!(input.into_tvalue()))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(outputs.len(), names.len(), "{name}");
        for (output, output_name) in outputs.iter().zip(&names) {
            let expected = flatten(&reference["outputs"][output_name]);
            let got = output
                .cast_to::<f64>()
                .unwrap_or_else(|e| panic!("{name}.{output_name}: {e:#}"));
            let got = got.try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f64>().expect("f64");
            assert_eq!(got.len(), expected.len(), "{name}.{output_name}: lengths");
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (g - e).abs() <= TOLERANCE,
                    "{name}.{output_name}[{i}] (row {}): got {g}, onnxruntime {e}",
                    i / (expected.len() / n_rows)
                );
            }
        }
    }
}

#[test]
fn the_default_output_is_the_positive_class_or_the_value() {
    for (name, reference) in &references() {
        let path = fixtures().join(reference["file"].as_str().expect("file"));
        let (rows, width) = rows_of(reference);
        let model = OnnxModel::load(&path, width, &Selection::default())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let got = model.infer(&rows).expect("infer");
        let outputs = reference["outputs"].as_object().expect("outputs");
        let expected: Vec<f64> = if reference["kind"] == "classifier" {
            let probabilities = outputs
                .iter()
                .find(|(_, v)| v[0].is_array())
                .map(|(_, v)| v)
                .expect("a probability output");
            probabilities
                .as_array()
                .expect("rows")
                .iter()
                .map(|row| flatten(row)[1])
                .collect()
        } else {
            flatten(outputs.values().next().expect("an output"))
        };
        assert_eq!(got.len(), expected.len(), "{name}");
        for (g, e) in got.iter().zip(&expected) {
            assert!((f64::from(*g) - e).abs() <= TOLERANCE, "{name}: {g} vs {e}");
        }
    }
}

/// Column 1 of a reference output `[N, 2]`.
fn class_1_of(reference: &Json, output: &str) -> Vec<f64> {
    reference["outputs"][output]
        .as_array()
        .unwrap_or_else(|| panic!("no output {output}"))
        .iter()
        .map(|row| flatten(row)[1])
        .collect()
}

fn assert_close(name: &str, got: &[f32], expected: &[f64]) {
    assert_eq!(got.len(), expected.len(), "{name}: lengths");
    for (row, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (f64::from(*g) - e).abs() <= TOLERANCE,
            "{name} row {row}: got {g}, onnxruntime {e}"
        );
    }
}

/// skl2onnx with `zipmap=False`: an int64 `label` and a float `probabilities`, through an
/// `Identity` (GradientBoosting) or built by a `Concat` (MLP). The default is the probability
/// of class 1, never the label; `class = 1` reads the same column.
#[test]
fn zipmap_false_exports_score_the_probability_of_class_1_by_default() {
    let references = references();
    for name in ["gb_classifier_nozipmap", "mlp_classifier_nozipmap"] {
        let reference = &references[name];
        let path = fixtures().join(reference["file"].as_str().expect("file"));
        let (rows, width) = rows_of(reference);
        let expected = class_1_of(reference, "probabilities");
        let model = OnnxModel::load(&path, width, &Selection::default())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(model.output, "probabilities", "{name}");
        assert_close(name, &model.infer(&rows).expect("infer"), &expected);

        let one = ClassLabel::Int(1);
        let with_class = Selection {
            class: Some(&one),
            ..Selection::default()
        };
        let model = OnnxModel::load(&path, width, &with_class)
            .unwrap_or_else(|e| panic!("{name} with class = 1: {e:#}"));
        assert_close(name, &model.infer(&rows).expect("infer"), &expected);

        // Through the config path, as the agent loads it.
        let mut events: Vec<Event> = rows.chunks(width).map(event_of_row).collect();
        let mut config = model_config(name, path.clone(), width);
        config.class = Some(ClassLabel::Int(1));
        Scoring::build(&[config])
            .unwrap_or_else(|e| panic!("{name}: {e:#}"))
            .score_blocking(&mut events);
        for (row, (event, e)) in events.iter().zip(&expected).enumerate() {
            let score = event
                .score
                .unwrap_or_else(|| panic!("{name} row {row}: no score"));
            // Missing values (tree fixtures) went in as the input default, not NaN: those rows
            // are not comparable here, and `infer` above covered them.
            if rows[row * width..(row + 1) * width]
                .iter()
                .all(|v| v.is_finite())
            {
                assert!(
                    (score - e).abs() <= TOLERANCE,
                    "{name} row {row}: {score} vs {e}"
                );
            }
        }
    }
}

/// The parsed graph of a fixture, for variants built in memory.
fn fixture_proto(file: &str) -> tract_onnx::pb::ModelProto {
    loader()
        .proto_model_for_path(fixtures().join(file))
        .unwrap_or_else(|e| panic!("{file}: {e:#}"))
}

fn load_proto(
    proto: &tract_onnx::pb::ModelProto,
    selection: &Selection<'_>,
) -> anyhow::Result<OnnxModel> {
    OnnxModel::from_proto(&loader(), proto, 8, selection)
}

/// The error of loading `proto` with the default output (its Display chain).
fn load_error(proto: &tract_onnx::pb::ModelProto) -> String {
    match load_proto(proto, &Selection::default()) {
        Ok(model) => panic!("loaded, reading output {:?}", model.output),
        Err(error) => format!("{error:#}"),
    }
}

#[test]
fn an_integer_label_is_never_the_default_output() {
    // gb_classifier_nozipmap with its probabilities output removed: only the int64 label.
    let mut proto = fixture_proto("gb_classifier_nozipmap.onnx");
    let graph = proto.graph.as_mut().expect("graph");
    graph.output.retain(|o| o.name == "label");
    let message = load_error(&proto);
    assert!(message.contains("\"label\" (int64, [N])"), "{message}");
    assert!(message.contains("set `output = "), "{message}");
    assert!(message.contains("[[models]]"), "{message}");
    // Asked for by name, it loads: the user chose it.
    load_proto(
        &proto,
        &Selection {
            output: Some("label"),
            ..Selection::default()
        },
    )
    .expect("an output named in config loads");
}

#[test]
fn two_probability_outputs_are_refused_listing_the_outputs() {
    // The classifier's own probability output exported next to its Identity copy.
    let mut proto = fixture_proto("gb_classifier_nozipmap.onnx");
    let graph = proto.graph.as_mut().expect("graph");
    let mut raw = graph
        .output
        .iter()
        .find(|o| o.name == "probabilities")
        .expect("probabilities")
        .clone();
    raw.name = "proba_output".into();
    graph.output.push(raw);
    let message = load_error(&proto);
    assert!(
        message.contains("outputs \"probabilities\", \"proba_output\" all look like probabilities"),
        "{message}"
    );
    assert!(
        message.contains(
            "the outputs are \"label\" (int64, [N]), \"probabilities\" (float, [N, 2]), \
             \"proba_output\" (float, [N, 2])"
        ),
        "{message}"
    );
    assert!(
        message.contains("set `output = \"probabilities\"`"),
        "{message}"
    );
}

#[test]
fn an_unrecognised_float_matrix_beside_a_label_is_read() {
    // The Identity replaced by an operator that says nothing about probabilities (Abs leaves
    // them as they are): the only float [N, 2] output next to an int64 label is still read.
    let mut proto = fixture_proto("gb_classifier_nozipmap.onnx");
    let graph = proto.graph.as_mut().expect("graph");
    let identity = graph
        .node
        .iter_mut()
        .find(|n| n.op_type == "Identity")
        .expect("an Identity");
    identity.op_type = "Abs".into();
    let model = load_proto(&proto, &Selection::default()).expect("loads");
    assert_eq!(model.output, "probabilities");
    let reference = &references()["gb_classifier_nozipmap"];
    let (rows, _) = rows_of(reference);
    let got = model.infer(&rows).expect("infer");
    assert_close("abs", &got, &class_1_of(reference, "probabilities"));

    // Two such outputs and no sign which is the score: refused.
    let graph = proto.graph.as_mut().expect("graph");
    let mut abs = graph
        .node
        .iter()
        .find(|n| n.op_type == "Abs")
        .expect("the Abs")
        .clone();
    abs.name = "second_abs".into();
    abs.output = vec!["probabilities_2".into()];
    graph.node.push(abs);
    let mut copy = graph.output[1].clone();
    copy.name = "probabilities_2".into();
    graph.output.push(copy);
    let message = load_error(&proto);
    assert!(
        message.contains("cannot tell which output holds the score"),
        "{message}"
    );
    assert!(
        message.contains("\"probabilities_2\" (float, [N, 2])"),
        "{message}"
    );
    assert!(message.contains("set `output = "), "{message}");
}

#[test]
fn a_class_on_a_one_column_output_hints_at_output() {
    let path = fixtures().join("gb_classifier_nozipmap.onnx");
    let one = ClassLabel::Int(1);
    let selection = Selection {
        output: Some("label"),
        class: Some(&one),
        ..Selection::default()
    };
    let message = match OnnxModel::load(&path, 8, &selection) {
        Ok(model) => panic!("loaded, reading column {:?}", model.output),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        message.contains("output \"label\" has one column; class 1 does not apply"),
        "{message}"
    );
    assert!(
        message.contains("set `output = \"probabilities\"`"),
        "{message}"
    );
    assert!(
        message.contains("\"probabilities\" (float, [N, 2])"),
        "{message}"
    );
}

/// docs/MODELS.md states [`TESTED_ONNX_OPSETS`] and [`TESTED_ONNX_ML_OPSETS`]; every fixture
/// declares opsets within them, the fixtures reach both ends of each range, and every fixture
/// that tract can run loads with its default output.
#[test]
fn the_fixtures_cover_exactly_the_documented_opsets_and_load() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/MODELS.md");
    let docs = std::fs::read_to_string(&docs).expect("docs/MODELS.md");
    let sentence = tested_opsets_text();
    assert!(
        docs.contains(&sentence),
        "docs/MODELS.md does not say {sentence}"
    );

    let mut onnx_versions = Vec::new();
    let mut ml_versions = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("fixtures")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "{} fixtures", files.len());
    for path in &files {
        let file = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let proto = fixture_proto(&file);
        assert_eq!(untested_opsets(&proto), vec![], "{file}");
        for import in &proto.opset_import {
            match import.domain.as_str() {
                "" | "ai.onnx" => onnx_versions.push(import.version),
                "ai.onnx.ml" => ml_versions.push(import.version),
                other => panic!("{file}: domain {other:?}"),
            }
        }
        if file != "unsupported_svr.onnx" {
            OnnxModel::load(path, 8, &Selection::default())
                .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        }
    }
    for (domain, versions, range) in [
        ("ai.onnx", &onnx_versions, TESTED_ONNX_OPSETS),
        ("ai.onnx.ml", &ml_versions, TESTED_ONNX_ML_OPSETS),
    ] {
        assert_eq!(versions.iter().min(), Some(range.start()), "{domain}");
        assert_eq!(versions.iter().max(), Some(range.end()), "{domain}");
    }
}

#[test]
fn class_labels_choose_the_column() {
    let path = fixtures().join("rf_classifier.onnx");
    let zero = ClassLabel::Int(0);
    let one = ClassLabel::Int(1);
    let load = |class| {
        OnnxModel::load(
            &path,
            8,
            &Selection {
                class,
                ..Selection::default()
            },
        )
    };
    let rows = vec![0.5f32; 8];
    let p0 = load(Some(&zero))
        .expect("class 0")
        .infer(&rows)
        .expect("infer")[0];
    let p1 = load(Some(&one))
        .expect("class 1")
        .infer(&rows)
        .expect("infer")[0];
    assert!((p0 + p1 - 1.0).abs() < 1e-6, "{p0} + {p1}");
    let error = load(Some(&ClassLabel::Int(7))).expect_err("no class 7");
    assert!(format!("{error:#}").contains("class 7 is not one of the model's classes [0, 1]"));
}

#[test]
fn an_unsupported_operator_fails_at_load_naming_it() {
    let config = model_config("svr", fixtures().join("unsupported_svr.onnx"), 8);
    let error = LoadedModel::load(&config).expect_err("SVMRegressor is not supported");
    let message = format!("{error:#}");
    assert!(message.contains("model \"svr\""), "{message}");
    assert!(
        message.contains("unsupported operator SVMRegressor"),
        "{message}"
    );
}

#[test]
fn a_missing_file_fails_with_its_path() {
    let config = model_config("gone", PathBuf::from("/nonexistent/dir/gone.onnx"), 8);
    let error = LoadedModel::load(&config).expect_err("no file");
    let message = format!("{error:#}");
    assert!(message.contains("/nonexistent/dir/gone.onnx"), "{message}");
    assert!(message.contains("model \"gone\""), "{message}");
}

#[test]
fn a_column_count_mismatch_fails_at_load() {
    let config = model_config("short", fixtures().join("logistic.onnx"), 5);
    let message = format!(
        "{:#}",
        LoadedModel::load(&config).expect_err("5 of 8 columns")
    );
    assert!(
        message.contains("has 8 columns, and [[models.inputs]] give 5"),
        "{message}"
    );
}

fn model_config(name: &str, path: PathBuf, columns: usize) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        path,
        input: None,
        output: None,
        class: None,
        output_field: OutputField::Score,
        batch_size: 16,
        inputs: (0..columns)
            .map(|i| ModelInput {
                field: EventField::Attr(format!("f{i}")),
                default: 0.0,
                transform: Transform::None,
                scale: 1.0,
                offset: 0.0,
            })
            .collect(),
    }
}

fn event_with(attrs: &[(&str, Value)]) -> Event {
    let mut event = Event::new(SourceKind::Http, "clicks", "buy", 1_700_000_000_000);
    for (key, value) in attrs {
        event.attrs.insert((*key).into(), value.clone());
    }
    event
}

/// An event whose attributes `f0`, `f1`, ... hold one row of model inputs.
fn event_of_row(row: &[f32]) -> Event {
    let attrs: Vec<(String, Value)> = row
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("f{i}"), Value::Float(f64::from(*v))))
        .collect();
    let attrs: Vec<(&str, Value)> = attrs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    event_with(&attrs)
}

#[test]
fn inputs_map_fields_defaults_and_transforms() {
    let input = |field: EventField, transform: Transform| ModelInput {
        field,
        default: -7.0,
        transform,
        scale: 1.0,
        offset: 0.0,
    };
    let inputs = vec![
        input(EventField::Attr("amount".into()), Transform::Log1p),
        ModelInput {
            scale: 2.0,
            offset: 0.5,
            ..input(EventField::Attr("count".into()), Transform::None)
        },
        input(EventField::Attr("text_number".into()), Transform::None),
        input(EventField::Attr("flag".into()), Transform::Bool),
        input(EventField::Attr("flag_text".into()), Transform::Bool),
        input(EventField::Attr("missing".into()), Transform::None),
        input(EventField::Attr("word".into()), Transform::None),
        input(
            EventField::Attr("channel".into()),
            Transform::OneHot(vec!["web".into(), "pos".into(), "app".into()]),
        ),
        input(
            EventField::Name,
            Transform::OneHot(vec!["view".into(), "buy".into()]),
        ),
        input(EventField::Score, Transform::None),
        // The same attribute twice, and keys out of order: the merge pass finds both.
        input(EventField::Attr("amount".into()), Transform::None),
        input(EventField::Attr("aaa".into()), Transform::None),
    ];
    let mut event = event_with(&[
        ("aaa", Value::Int(1)),
        ("not_an_input", Value::Int(5)),
        ("zzz", Value::Int(6)),
        ("amount", Value::Float(99.0)),
        ("count", Value::Int(3)),
        ("text_number", Value::String("2.5".into())),
        ("flag", Value::Bool(true)),
        ("flag_text", Value::String("false".into())),
        ("word", Value::String("many".into())),
        ("channel", Value::String("pos".into())),
    ]);
    event.score = Some(0.25);
    // A row appended after another: offsets are relative to the row's start.
    let mut row = vec![42.0];
    push_row(&inputs, &event, &mut row);
    assert_eq!(row.remove(0), 42.0);
    let expected = [
        100f64.ln() as f32,
        6.5,
        2.5,
        1.0,
        0.0,
        -7.0,
        -7.0,
        0.0,
        1.0,
        0.0,
        0.0,
        1.0,
        0.25,
        99.0,
        1.0,
    ];
    assert_eq!(row.len(), expected.len());
    for (i, (g, e)) in row.iter().zip(expected).enumerate() {
        assert!((g - e).abs() < 1e-6, "column {i}: {g} vs {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_writes_the_value_and_leaves_others_alone() {
    let references = references();
    let reference = &references["gb_classifier"];
    let (rows, width) = rows_of(reference);
    let mut config = model_config("gb", fixtures().join("gb_classifier.onnx"), width);
    config.output_field = OutputField::Attr("fraud_p".into());
    config.batch_size = 7;
    let scoring = Scoring::build(&[config]).expect("load");
    let events: Vec<Event> = rows.chunks(width).take(40).map(event_of_row).collect();
    let scored = scoring.score(events).await;
    assert_eq!(scored.len(), 40);
    let probabilities = reference["outputs"]["output_probability"]
        .as_array()
        .expect("rows");
    for (event, expected) in scored.iter().zip(probabilities) {
        let Some(Value::Float(p)) = event.attrs.get("fraud_p") else {
            panic!("no fraud_p in {event:?}");
        };
        assert!((p - flatten(expected)[1]).abs() <= TOLERANCE);
        assert_eq!(event.score, None);
    }
}

#[test]
fn the_example_config_loads_its_model() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/agent-models.toml");
    let config = runnel_config::load_agent(&path).expect("the example validates");
    assert_eq!(config.models.len(), 1);
    let scoring = Scoring::build(&config.models).expect("the example's model loads");
    let mut events = vec![event_with(&[
        ("amount", Value::Float(120.0)),
        ("card_present", Value::Bool(true)),
    ])];
    scoring.score_blocking(&mut events);
    let score = events[0].score.expect("scored");
    assert!((0.0..=1.0).contains(&score), "{score}");
}

/// A hand-made `TreeEnsembleRegressor` with the branch modes and missing-value tracks the
/// fixtures do not use: tree 0 is `x0 >= 1 (NaN: true) ? 10 : (x1 != 5 ? 20 : 30)`, tree 1 a
/// single leaf of 4; base value 0.5.
fn hand_made_regressor(aggregate: &str) -> tract_onnx::pb::NodeProto {
    use tract_onnx::pb::{AttributeProto, NodeProto};
    let ints = |name: &str, values: &[i64]| AttributeProto {
        name: name.into(),
        ints: values.to_vec(),
        ..AttributeProto::default()
    };
    let floats = |name: &str, values: &[f32]| AttributeProto {
        name: name.into(),
        floats: values.to_vec(),
        ..AttributeProto::default()
    };
    let strings = |name: &str, values: &[&str]| AttributeProto {
        name: name.into(),
        strings: values.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..AttributeProto::default()
    };
    NodeProto {
        op_type: "TreeEnsembleRegressor".into(),
        attribute: vec![
            ints("nodes_treeids", &[0, 0, 0, 0, 0, 1]),
            ints("nodes_nodeids", &[0, 1, 2, 3, 4, 0]),
            ints("nodes_featureids", &[0, 0, 1, 0, 0, 0]),
            floats("nodes_values", &[1.0, 0.0, 5.0, 0.0, 0.0, 0.0]),
            ints("nodes_truenodeids", &[1, 0, 3, 0, 0, 0]),
            ints("nodes_falsenodeids", &[2, 0, 4, 0, 0, 0]),
            strings(
                "nodes_modes",
                &["BRANCH_GTE", "LEAF", "BRANCH_NEQ", "LEAF", "LEAF", "LEAF"],
            ),
            ints("nodes_missing_value_tracks_true", &[1, 0, 0, 0, 0, 0]),
            ints("target_treeids", &[0, 0, 0, 1]),
            ints("target_nodeids", &[1, 3, 4, 0]),
            ints("target_ids", &[0, 0, 0, 0]),
            floats("target_weights", &[10.0, 20.0, 30.0, 4.0]),
            floats("base_values", &[0.5]),
            AttributeProto {
                name: "aggregate_function".into(),
                s: aggregate.as_bytes().to_vec(),
                ..AttributeProto::default()
            },
        ],
        ..NodeProto::default()
    }
}

#[test]
fn trees_follow_every_mode_missing_tracks_and_aggregate() {
    let rows = [2.0, 0.0, 0.0, 5.0, 0.0, 1.0, f32::NAN, 5.0, 0.5, f32::NAN];
    // Leaves of tree 0 per row: 10, 30, 20, 10 (NaN tracks true), 20 (NaN != 5).
    let cases: [(&str, [f32; 5]); 4] = [
        ("SUM", [14.5, 34.5, 24.5, 14.5, 24.5]),
        ("AVERAGE", [7.5, 17.5, 12.5, 7.5, 12.5]),
        ("MIN", [4.5, 4.5, 4.5, 4.5, 4.5]),
        ("MAX", [10.5, 30.5, 20.5, 10.5, 20.5]),
    ];
    for (aggregate, expected) in cases {
        let ensemble = super::trees::TreeEnsemble::parse(&hand_made_regressor(aggregate))
            .unwrap_or_else(|e| panic!("{aggregate}: {e:#}"));
        let mut scores = [0f32; 5];
        ensemble.eval(&rows, 2, &mut scores, None);
        assert_eq!(scores, expected, "{aggregate}");
    }
}

#[test]
fn attribute_keys_compare_like_strings() {
    let keys = [
        "",
        "\0",
        "a",
        "a\0",
        "aa",
        "ab",
        "b",
        "f0",
        "f10",
        "f7",
        "abcdefgh",
        "abcdefghi",
        "abcdefgi",
        "zzzzzzzzzz",
        "é",
        "\u{7f}",
    ];
    for a in keys {
        let key = super::Key::new(a.to_owned());
        for b in keys {
            assert_eq!(
                key.cmp_str(b, super::short_key(b)),
                a.cmp(b),
                "{a:?} vs {b:?}"
            );
        }
    }
}
