//! Model scoring end to end: the real agent and aggregator binaries, events posted over HTTP,
//! a `[[models]]` fixture (tests/fixtures/models, made by generate.py) scoring them, and the
//! score read back with SQL and compared with onnxruntime's reference. And `runnel-agent check`
//! on models: a `zipmap=False` export that loads, and models that cannot load: an unsupported
//! operator, a missing file, a `class` on the one-column label output.

use std::path::{Path, PathBuf};
use std::process::Command;

use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, Certs, TestDir, Uplink, agent_config_with,
    binaries, http_client, post_events, query_rows, start_fleet_with, wait_count_of,
};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name)
}

fn references() -> Value {
    let text = std::fs::read_to_string(fixture("references.json")).expect("references.json");
    serde_json::from_str(&text).expect("references parse")
}

/// `[[models]]` reading `attrs.f0` .. `attrs.f7`.
fn models_toml(name: &str, file: &Path, extra: &str) -> String {
    let mut toml = format!(
        "[[models]]\nname = \"{name}\"\npath = \"{}\"\nbatch_size = 4\n{extra}",
        file.display()
    );
    for i in 0..8 {
        toml.push_str(&format!("[[models.inputs]]\nfield = \"attrs.f{i}\"\n"));
    }
    toml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_reach_the_aggregator_and_rules_see_them() {
    let bins = binaries!();
    let mut toml = models_toml("forest", &fixture("rf_classifier.onnx"), "");
    toml.push_str(
        r#"
[[rules]]
name = "risky"
when = 'score > 0.5'
tag = ["risky"]
"#,
    );
    let extra = AgentExtra {
        toml,
        ..AgentExtra::default()
    };
    let fleet = start_fleet_with(
        &bins,
        "scoring_end_to_end",
        "edge-scoring",
        AggregatorOptions::default(),
        AgentOptions::default(),
        &extra,
    );
    let references = references();
    let reference = &references["models"]["rf_classifier"];
    let inputs = reference["inputs"].as_array().expect("inputs");
    let probabilities = reference["outputs"]["output_probability"]
        .as_array()
        .expect("probabilities");
    let n = 12;
    let events: Vec<Value> = inputs
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, row)| {
            let mut event = json!({"event_id": format!("e{i:02}"), "name": "payment"});
            for (j, value) in row.as_array().expect("row").iter().enumerate() {
                event[format!("f{j}")] = value.clone();
            }
            event
        })
        .collect();
    let client = http_client();
    let outcome = post_events(&client, fleet.agent.http_addr(), &events)
        .await
        .expect("post events");
    assert_eq!(outcome.status, 200, "{outcome:?}");

    let query = fleet.aggregator.query_addr();
    wait_count_of(&fleet.dir, query, "SELECT count(*) FROM events", n as u64).await;
    let rows = query_rows(
        query,
        "SELECT event_id, score, tags FROM events ORDER BY event_id",
    )
    .await
    .expect("query");
    assert_eq!(rows.len(), n);
    let mut risky = 0;
    for (i, row) in rows.iter().enumerate() {
        let score = row[1]
            .as_f64()
            .unwrap_or_else(|| panic!("no score in {row:?}"));
        let expected = probabilities[i][1].as_f64().expect("p1");
        assert!(
            (score - expected).abs() <= 1e-5,
            "{}: score {score}, onnxruntime {expected}",
            row[0]
        );
        let tagged = row[2].to_string().contains("risky");
        assert_eq!(tagged, score > 0.5, "the rule sees the score: {row:?}");
        risky += usize::from(tagged);
    }
    assert!(
        risky > 0 && risky < n,
        "the rows include both sides: {risky} of {n}"
    );
}

/// Runs `runnel-agent check` on a config with `models`; returns (success, stderr).
fn check_with(test_name: &str, models: &str) -> (bool, String) {
    let bins = binaries!();
    let dir = TestDir::new(test_name);
    let certs = Certs::init(&dir.join("certs"));
    let cert = certs.issue_agent("edge-check");
    let uplink = Uplink {
        aggregator: ([127, 0, 0, 1], 9480).into(),
        ca_cert: certs.ca_cert.clone(),
    };
    let extra = AgentExtra {
        toml: models.to_owned(),
        ..AgentExtra::default()
    };
    let config = agent_config_with(
        &dir.join("data"),
        &cert,
        &uplink,
        &AgentOptions::default(),
        &extra,
    );
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config).expect("write config");
    let output = Command::new(&bins.agent)
        .args(["check", "--config"])
        .arg(&config_path)
        .env("NO_COLOR", "1")
        .output()
        .expect("run runnel-agent check");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_model_that_loads() {
    let (ok, stderr) = check_with(
        "scoring_check_good",
        &models_toml("boosted", &fixture("xgb_classifier.onnx"), ""),
    );
    assert!(ok, "{stderr}");
}

#[test]
fn check_names_an_unsupported_operator() {
    let (ok, stderr) = check_with(
        "scoring_check_unsupported",
        &models_toml("svr", &fixture("unsupported_svr.onnx"), ""),
    );
    assert!(!ok, "check passed a model tract cannot run");
    assert!(stderr.contains("SVMRegressor"), "{stderr}");
    assert!(stderr.contains("\"svr\""), "names the model: {stderr}");
}

#[test]
fn check_names_a_missing_model_file() {
    let missing = std::env::temp_dir().join("runnel-no-such-dir/fraud.onnx");
    let (ok, stderr) = check_with("scoring_check_missing", &models_toml("fraud", &missing, ""));
    assert!(!ok, "check passed a missing model file");
    assert!(
        stderr.contains(&missing.display().to_string()),
        "names the path: {stderr}"
    );
}

#[test]
fn check_accepts_a_zipmap_false_export_with_class_1() {
    let (ok, stderr) = check_with(
        "scoring_check_nozipmap",
        &models_toml(
            "boosted",
            &fixture("gb_classifier_nozipmap.onnx"),
            "class = 1\n",
        ),
    );
    assert!(ok, "{stderr}");
}

#[test]
fn check_refuses_a_class_on_the_label_and_says_which_key_to_set() {
    let (ok, stderr) = check_with(
        "scoring_check_label",
        &models_toml(
            "mlp",
            &fixture("mlp_classifier_nozipmap.onnx"),
            "output = \"label\"\nclass = 1\n",
        ),
    );
    assert!(!ok, "check passed class = 1 on a one-column output");
    assert!(stderr.contains("\"mlp\""), "names the model: {stderr}");
    assert!(
        stderr.contains("output \"label\" has one column; class 1 does not apply"),
        "{stderr}"
    );
    assert!(
        stderr.contains("set `output = \"probabilities\"`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\"label\" (int64, [N]), \"probabilities\" (float, [N, 2])"),
        "lists the outputs: {stderr}"
    );
}
