//! Every fixture model (tests/fixtures/models, made by generate.py) scores its reference rows
//! as onnxruntime did, within 1e-5, on every output; the input mapping; load errors.

use std::path::{Path, PathBuf};

use runnel_common::{Event, SourceKind, Value};
use runnel_config::{ClassLabel, EventField, ModelConfig, ModelInput, OutputField, Transform};
use serde_json::Value as Json;
use tract_onnx::prelude::*;

use super::model::{OnnxModel, Selection, load_all_outputs};
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
    let events: Vec<Event> = rows
        .chunks(width)
        .take(40)
        .map(|row| {
            let attrs: Vec<(String, Value)> = row
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("f{i}"), Value::Float(f64::from(*v))))
                .collect();
            let attrs: Vec<(&str, Value)> =
                attrs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            event_with(&attrs)
        })
        .collect();
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
