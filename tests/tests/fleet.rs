//! Fleet configuration end to end: real aggregator and agent processes, config documents pushed
//! through the aggregator's HTTP API and CLI, rolled out to label selectors, checked through the
//! `agents` and `rollouts` SQL tables, the fleet API and the agents' own status.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use runnel_tests::{
    AgentCert, AgentExtra, AgentOptions, AgentProcess, AggregatorOptions, AggregatorProcess, Certs,
    Load, TestDir, Uplink, binaries, http_client, post_events, query_count, query_rows, send,
    test_event, wait_all_stored, wait_count_of,
};
use serde_json::{Value, json};

/// How long a rollout or an agent's convergence may take (statuses come every 5 s).
const FLEET_TIMEOUT: Duration = Duration::from_secs(90);

/// A document that validates and changes the effective config: a buffer policy.
const DROP_OLDEST: &str = "[buffer]\nwhen_full = \"drop_oldest\"\n";

struct World {
    // Field order is drop order: processes go before the directory that holds their logs.
    agents: Vec<AgentProcess>,
    aggregator: AggregatorProcess,
    certs: Certs,
    uplink: Uplink,
    dir: TestDir,
}

impl World {
    /// An aggregator and one agent per `(id, labels)`, labels as a TOML inline table.
    fn start(test_name: &str, agents: &[(&str, &str)]) -> World {
        let options = AggregatorOptions {
            // Statuses every second: the gate and convergence see changes sooner.
            extra_toml: "[fleet]\nheartbeat_interval_ms = 1000\n".into(),
            ..AggregatorOptions::default()
        };
        World::start_with(test_name, agents, options)
    }

    fn start_with(test_name: &str, agents: &[(&str, &str)], options: AggregatorOptions) -> World {
        let bins = binaries!();
        let dir = TestDir::new(test_name);
        let certs = Certs::init(&dir.join("certs"));
        let aggregator = AggregatorProcess::start(&bins, &dir, &certs, options);
        let uplink = Uplink {
            aggregator: aggregator.ingest_addr(),
            ca_cert: certs.ca_cert.clone(),
        };
        let mut world = World {
            agents: Vec::new(),
            aggregator,
            certs,
            uplink,
            dir,
        };
        for (id, labels) in agents {
            world.add_agent(id, labels);
        }
        world
    }

    /// Starts one more agent with certificate `id` and `labels` (a TOML inline table).
    fn add_agent(&mut self, id: &str, labels: &str) {
        let cert: AgentCert = self.certs.issue_agent(id);
        let extra = AgentExtra {
            labels: Some(labels.to_owned()),
            ..AgentExtra::default()
        };
        let agent = AgentProcess::start_with(
            &binaries!(),
            &self.dir,
            &format!("agent-{id}"),
            &cert,
            &self.uplink,
            AgentOptions::default(),
            &extra,
        );
        assert_eq!(agent.agent_id(), id);
        self.agents.push(agent);
    }

    fn query(&self) -> SocketAddr {
        self.aggregator.query_addr()
    }

    fn agent(&mut self, id: &str) -> &mut AgentProcess {
        self.agents
            .iter_mut()
            .find(|a| a.agent_id() == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }

    /// Runs the aggregator CLI against this aggregator: exit success, stdout, stderr.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let url = format!("http://{}", self.query());
        let output = std::process::Command::new(binaries!().aggregator)
            .args(args)
            .args(["--url", &url])
            .output()
            .expect("run runnel-aggregator");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

async fn api_get(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let reply = send(http_client().get(format!("http://{addr}{path}"))).await?;
    anyhow::ensure!(
        reply.status == 200,
        "GET {path}: {} {}",
        reply.status,
        reply.error()
    );
    Ok(reply.json())
}

/// The fleet API's view of one agent.
async fn api_agent(addr: SocketAddr, id: &str) -> anyhow::Result<Value> {
    let agents = api_get(addr, "/api/v1/agents").await?;
    agents["agents"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["agent_id"] == id).cloned())
        .ok_or_else(|| anyhow::anyhow!("agent {id} not in {agents}"))
}

/// Waits until each agent is connected on protocol 2 and has reported its config version.
async fn wait_reporting(world: &World, ids: &[&str]) {
    let addr = world.query();
    for id in ids {
        world
            .dir
            .wait_until(
                FLEET_TIMEOUT,
                &format!("{id} reports its config"),
                || async move {
                    let agent = api_agent(addr, id).await?;
                    anyhow::ensure!(agent["connected"] == true, "not connected: {agent}");
                    anyhow::ensure!(
                        agent["protocol_version"]
                            == u64::from(runnel_common::wire::PROTOCOL_VERSION),
                        "protocol: {agent}"
                    );
                    anyhow::ensure!(agent["config_version"].is_u64(), "no status yet: {agent}");
                    Ok(())
                },
            )
            .await;
    }
}

async fn push(addr: SocketAddr, body: Value) -> runnel_tests::HttpReply {
    send(
        http_client()
            .post(format!("http://{addr}/api/v1/config"))
            .json(&body),
    )
    .await
    .expect("POST /api/v1/config")
}

/// Waits until rollout `id` is in `phase`; returns it.
async fn wait_phase(world: &World, id: u64, phase: &str) -> Value {
    let addr = world.query();
    let what = format!("rollout {id} is {phase}");
    world
        .dir
        .wait_until(FLEET_TIMEOUT, &what, || async move {
            let rollout = api_get(addr, &format!("/api/v1/rollouts/{id}")).await?;
            let now = rollout["phase"].as_str().unwrap_or("").to_owned();
            assert!(
                now == phase || ["canary", "baking", "waves"].contains(&now.as_str()),
                "rollout {id} ended {now} instead of {phase}: {rollout:#}"
            );
            anyhow::ensure!(now == phase, "phase {now}");
            Ok(())
        })
        .await;
    api_get(addr, &format!("/api/v1/rollouts/{id}"))
        .await
        .expect("read rollout")
}

/// `config_version, desired_version, last_config_result, config_hash` of one agent from SQL.
async fn agent_row(addr: SocketAddr, id: &str) -> anyhow::Result<Vec<Value>> {
    let rows = query_rows(
        addr,
        &format!(
            "SELECT config_version, desired_version, last_config_result, config_hash, labels \
             FROM agents WHERE agent_id = '{id}'"
        ),
    )
    .await?;
    rows.into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no row for {id} in agents"))
}

/// Waits until the `agents` table shows `id` running managed config `version`.
async fn wait_running(world: &World, id: &str, version: u64) {
    let addr = world.query();
    world
        .dir
        .wait_until(
            FLEET_TIMEOUT,
            &format!("{id} runs config version {version}"),
            || async move {
                let row = agent_row(addr, id).await?;
                anyhow::ensure!(row[0] == version, "agents row {row:?}");
                Ok(())
            },
        )
        .await;
}

/// Lines of the aggregator log that record a push to `id`.
fn pushes_to(world: &World, id: &str) -> usize {
    world
        .aggregator
        .stderr()
        .lines()
        .filter(|line| line.contains("config pushed") && line.contains(&format!("agent_id={id}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn push_to_a_selector_reaches_exactly_the_matching_agents_and_loses_no_event() {
    let mut world = World::start(
        "fleet-selector",
        &[
            ("berlin-pos", "{ site = \"berlin\", role = \"pos\" }"),
            ("berlin-kiosk", "{ site = \"berlin\", role = \"kiosk\" }"),
            ("paris-pos", "{ site = \"paris\", role = \"pos\" }"),
        ],
    );
    let addr = world.query();
    wait_reporting(&world, &["berlin-pos", "berlin-kiosk", "paris-pos"]).await;
    let hash_before = agent_row(addr, "berlin-pos").await.expect("row")[3].clone();

    // Events flow into every agent during the rollout.
    let loads: Vec<(String, Load)> = world
        .agents
        .iter()
        .map(|agent| {
            let prefix = format!("fl-{}", agent.agent_id());
            let load = Load::start(agent.http_addr(), 2, &prefix, false);
            (prefix, load)
        })
        .collect();

    let reply = push(
        addr,
        json!({
            "document": DROP_OLDEST,
            "selector": "site=berlin",
            "canary": "1",
            "wave": "100%",
            "bake": "2s",
            "apply_timeout": "30s",
            "note": "drop oldest in Berlin",
        }),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.error());
    let created = reply.json();
    let id = created["id"].as_u64().expect("rollout id");
    let version = created["spec"]["version"].as_u64().expect("version");
    let hash = created["spec"]["hash"].as_str().expect("hash").to_owned();
    let targets: BTreeSet<&str> = created["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t["agent_id"].as_str())
        .collect();
    assert_eq!(targets, BTreeSet::from(["berlin-kiosk", "berlin-pos"]));

    let rollout = wait_phase(&world, id, "completed").await;
    assert_eq!(rollout["counts"]["applied"], 2, "{rollout:#}");
    for berlin in ["berlin-pos", "berlin-kiosk"] {
        wait_running(&world, berlin, version).await;
        let row = agent_row(addr, berlin).await.expect("row");
        assert_eq!(row[1], version, "desired version of {berlin}");
        assert_eq!(
            row[2].as_str(),
            Some(format!("applied v{version} {hash}").as_str()),
            "{berlin} reported applied with the pushed hash"
        );
        assert_ne!(
            row[3], hash_before,
            "{berlin}'s effective config hash changed"
        );
        assert_eq!(pushes_to(&world, berlin), 1, "{berlin} got the push once");
    }
    let paris = agent_row(addr, "paris-pos").await.expect("row");
    assert_eq!(paris[0], 0, "paris runs its bootstrap config: {paris:?}");
    assert!(
        paris[1].is_null() && paris[2].is_null(),
        "paris was never targeted: {paris:?}"
    );
    assert_eq!(pushes_to(&world, "paris-pos"), 0);
    assert!(
        paris[4]
            .as_str()
            .unwrap_or("")
            .contains("\"site\":\"paris\""),
        "{paris:?}"
    );

    // The agents apply it for real: their own status shows the pushed policy.
    for agent in &world.agents {
        let status = send(http_client().get(format!("http://{}/v1/status", agent.http_addr())))
            .await
            .expect("agent status")
            .json();
        let expected = if agent.agent_id().starts_with("berlin") {
            "drop_oldest"
        } else {
            "block"
        };
        assert_eq!(
            status["buffer"]["when_full"],
            expected,
            "{}: {status}",
            agent.agent_id()
        );
    }

    // No event lost or doubled across the swap.
    let mut n_acked = 0;
    for (prefix, load) in loads {
        let report = load.stop().await;
        assert!(
            report.acked.len() > 10,
            "{prefix}: only {} events acknowledged",
            report.acked.len()
        );
        n_acked += report.acked.len() as u64;
        wait_all_stored(&world.dir, addr, &prefix, &report.acked).await;
    }
    wait_count_of(&world.dir, addr, "SELECT count(*) FROM events", n_acked).await;
    let distinct = query_count(
        addr,
        "SELECT count(*) FROM (SELECT DISTINCT agent_id, seq FROM events)",
    )
    .await
    .expect("distinct count");
    assert_eq!(distinct, n_acked);

    // The same through SQL `rollouts` and the CLI.
    let rows = query_rows(
        addr,
        "SELECT id, phase, n_targets, n_applied, selector FROM rollouts",
    )
    .await
    .expect("rollouts");
    assert_eq!(
        rows,
        vec![vec![
            json!(id),
            json!("completed"),
            json!(2),
            json!(2),
            json!("site=berlin")
        ]]
    );
    let (ok, out, err) = world.cli(&["agents", "--selector", "site=berlin"]);
    assert!(ok, "agents CLI failed: {err}");
    assert!(
        out.contains("berlin-pos") && out.contains("berlin-kiosk"),
        "{out}"
    );
    assert!(!out.contains("paris-pos"), "{out}");
    assert!(out.contains(&format!("v{version}")), "{out}");
    let (ok, out, err) = world.cli(&["rollout", "status"]);
    assert!(
        ok && out.contains("completed") && out.contains("health gate passed"),
        "{out}{err}"
    );

    // An agent that joins later with matching labels gets its peers' config.
    world.add_agent("berlin-late", "{ site = \"berlin\", role = \"pos\" }");
    wait_running(&world, "berlin-late", version).await;
    assert_eq!(agent_row(addr, "paris-pos").await.expect("row")[0], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_documents_are_refused_before_anything_is_sent() {
    let world = World::start("fleet-invalid", &[("berlin-1", "{ site = \"berlin\" }")]);
    let addr = world.query();
    wait_reporting(&world, &["berlin-1"]).await;

    let bad_rule = "[[rules]]\nname = \"r\"\nwhen = \"name ==\"\ndrop = true\n";
    let reply = push(
        addr,
        json!({ "document": bad_rule, "selector": "site=berlin" }),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.error());
    assert!(reply.error().contains("rules[0].when"), "{}", reply.error());

    let model = "[[models]]\nname = \"m\"\npath = \"m.onnx\"\n[[models.inputs]]\nfield = \"attrs.amount\"\n";
    let reply = push(
        addr,
        json!({ "document": model, "selector": "site=berlin" }),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.error());
    assert!(
        reply.error().contains("models[0].path"),
        "{}",
        reply.error()
    );

    let reply = push(
        addr,
        json!({ "document": "[uplink]\naggregator = \"x:1\"\n", "selector": "" }),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.error());
    assert!(reply.error().contains("uplink"), "{}", reply.error());

    let reply = push(
        addr,
        json!({ "document": DROP_OLDEST, "selector": "site=nowhere" }),
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.error());
    assert!(
        reply.error().contains("matches no agent"),
        "{}",
        reply.error()
    );

    // The CLI refuses the same document and names the key.
    let file = world.dir.join("bad.toml");
    std::fs::write(&file, bad_rule).expect("write bad.toml");
    let (ok, _, err) = world.cli(&[
        "config",
        "push",
        file.to_str().expect("path"),
        "--selector",
        "site=berlin",
    ]);
    assert!(!ok, "the CLI accepted an invalid document");
    assert!(err.contains("rules[0].when"), "{err}");

    // Nothing was stored as a rollout, nothing pushed, the agent runs its bootstrap config.
    let rollouts = api_get(addr, "/api/v1/rollouts").await.expect("rollouts");
    assert_eq!(rollouts["rollouts"], json!([]));
    assert_eq!(pushes_to(&world, "berlin-1"), 0);
    assert_eq!(agent_row(addr, "berlin-1").await.expect("row")[0], 0);

    // A valid document through the CLI, with a bake long enough to abort it.
    let file = world.dir.join("good.toml");
    std::fs::write(&file, DROP_OLDEST).expect("write good.toml");
    let (ok, out, err) = world.cli(&[
        "config",
        "push",
        file.to_str().expect("path"),
        "--selector",
        "site=berlin",
        "--canary",
        "100%",
        "--bake",
        "10m",
        "--note",
        "slow bake",
    ]);
    assert!(ok, "push failed: {err}");
    assert!(out.contains("rollout 1 of config version 1"), "{out}");
    let reply = push(
        addr,
        json!({ "document": DROP_OLDEST, "selector": "site=berlin" }),
    )
    .await;
    assert_eq!(
        reply.status,
        409,
        "a second rollout while one runs: {}",
        reply.error()
    );
    wait_phase(&world, 1, "baking").await;
    let (ok, out, err) = world.cli(&["rollout", "abort", "1"]);
    assert!(ok && out.contains("aborted"), "{out}{err}");
    let (ok, out, err) = world.cli(&["rollout", "history"]);
    assert!(
        ok && out.contains("aborted") && out.contains("slow bake"),
        "{out}{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_config_that_fails_on_the_canary_is_rolled_back_and_the_rest_never_get_it() {
    let mut world = World::start(
        "fleet-rollback",
        &[
            ("a-canary", "{ site = \"berlin\" }"),
            ("b-rest", "{ site = \"berlin\" }"),
        ],
    );
    let addr = world.query();
    wait_reporting(&world, &["a-canary", "b-rest"]).await;

    // Validates at the aggregator (the file is sent), fails on the agent (not an ONNX model).
    let document = "[[models]]\nname = \"m\"\npath = \"m.onnx\"\n[[models.inputs]]\nfield = \"attrs.amount\"\n";
    let corrupt = base64::engine::general_purpose::STANDARD.encode(b"this is not an ONNX model");
    let reply = push(
        addr,
        json!({
            "document": document,
            "files": [{ "name": "m.onnx", "content_base64": corrupt }],
            "selector": "site=berlin",
            "canary": "1",
            "bake": "1s",
            "apply_timeout": "30s",
        }),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.error());
    let id = reply.json()["id"].as_u64().expect("id");
    let version = reply.json()["spec"]["version"].as_u64().expect("version");

    let rollout = wait_phase(&world, id, "rolled_back").await;
    let reason = rollout["reason"].as_str().unwrap_or("");
    assert!(reason.contains("canary a-canary failed"), "{rollout:#}");

    let canary = agent_row(addr, "a-canary").await.expect("row");
    assert_eq!(
        canary[0], 0,
        "the canary keeps its last-good config: {canary:?}"
    );
    assert_eq!(
        canary[1], 0,
        "its desired version is back to the previous one: {canary:?}"
    );
    assert!(
        canary[2]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("failed v{version}:")),
        "{canary:?}"
    );
    let rest = agent_row(addr, "b-rest").await.expect("row");
    assert!(rest[1].is_null(), "b-rest was never targeted: {rest:?}");
    assert_eq!(pushes_to(&world, "b-rest"), 0);

    // The canary still takes events on its old pipeline.
    let http = world.agent("a-canary").http_addr();
    let events: Vec<Value> = (0..20)
        .map(|i| test_event(&format!("after-rollback-{i}")))
        .collect();
    let outcome = post_events(&http_client(), http, &events)
        .await
        .expect("post");
    assert_eq!(outcome.status, 200, "{:?}", outcome.body);
    wait_count_of(
        &world.dir,
        addr,
        "SELECT count(*) FROM events WHERE event_id LIKE 'after-rollback-%'",
        20,
    )
    .await;
    world.agent("a-canary").assert_running();

    // Another failure only the agent can see: an MQTT listener on a port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port to hold");
    let port = taken.local_addr().expect("held port").port();
    let document =
        format!("[sources.mqtt_listener]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n");
    let reply = push(
        addr,
        json!({ "document": document, "selector": "site=berlin", "canary": "1", "bake": "1s" }),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.error());
    let id = reply.json()["id"].as_u64().expect("id");
    let version = reply.json()["spec"]["version"].as_u64().expect("version");
    let rollout = wait_phase(&world, id, "rolled_back").await;
    assert!(
        rollout["reason"]
            .as_str()
            .unwrap_or("")
            .contains("canary a-canary failed"),
        "{rollout:#}"
    );
    let canary = agent_row(addr, "a-canary").await.expect("row");
    assert_eq!(canary[0], 0, "still the last-good config: {canary:?}");
    assert!(
        canary[2]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("failed v{version}:")),
        "{canary:?}"
    );
    assert_eq!(pushes_to(&world, "b-rest"), 0);
    drop(taken);

    // A failure the apply cannot see: the config applies, but its MQTT broker is unreachable.
    // The canary reports its sources unhealthy during the bake, which fails the gate.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
        listener.local_addr().expect("port").port()
    };
    let document = format!(
        "[[sources.mqtt]]\nname = \"plant\"\nurl = \"mqtt://127.0.0.1:{closed}\"\n\
         topics = [\"plant/#\"]\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n"
    );
    let reply = push(
        addr,
        json!({ "document": document, "selector": "site=berlin", "canary": "1", "bake": "10s" }),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.error());
    let id = reply.json()["id"].as_u64().expect("id");
    let rollout = wait_phase(&world, id, "rolled_back").await;
    let reason = rollout["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("canary a-canary reports an unhealthy component"),
        "{rollout:#}"
    );
    assert_eq!(pushes_to(&world, "b-rest"), 0);
    world.agent("a-canary").assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_agent_converges_on_reconnect_and_a_restarted_agent_keeps_its_config() {
    let mut world = World::start(
        "fleet-offline",
        &[
            ("a-online", "{ site = \"berlin\" }"),
            ("b-offline", "{ site = \"berlin\" }"),
        ],
    );
    let addr = world.query();
    wait_reporting(&world, &["a-online", "b-offline"]).await;
    world.agent("b-offline").kill_hard();
    world
        .dir
        .wait_until(FLEET_TIMEOUT, "b-offline is seen offline", || async move {
            let agent = api_agent(addr, "b-offline").await?;
            anyhow::ensure!(agent["connected"] == false, "{agent}");
            Ok(())
        })
        .await;

    let reply = push(
        addr,
        json!({
            "document": DROP_OLDEST,
            "selector": "site=berlin",
            "canary": "1",
            "wave": "100%",
            "bake": "1s",
            "apply_timeout": "30s",
        }),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.error());
    let id = reply.json()["id"].as_u64().expect("id");
    let version = reply.json()["spec"]["version"].as_u64().expect("version");
    let rollout = wait_phase(&world, id, "completed").await;
    let canary = &rollout["targets"].as_array().expect("targets")[0];
    assert_eq!(
        canary["agent_id"], "a-online",
        "the connected agent is the canary"
    );
    assert!(
        rollout["history"].to_string().contains("offline"),
        "{rollout:#}"
    );
    assert_eq!(agent_row(addr, "b-offline").await.expect("row")[1], version);

    // The desired versions survive an aggregator restart; then b comes back and converges.
    world.aggregator.restart();
    let addr = world.query();
    assert_eq!(agent_row(addr, "b-offline").await.expect("row")[1], version);
    world.agent("b-offline").restart();
    wait_running(&world, "b-offline", version).await;
    assert_eq!(pushes_to(&world, "b-offline"), 1);

    // A restart after a successful apply starts with the new config, without a new push.
    wait_running(&world, "a-online", version).await;
    let n_pushes = pushes_to(&world, "a-online");
    assert_eq!(n_pushes, 1);
    let connected_before =
        api_agent(addr, "a-online").await.expect("agent")["connected_since_ms"].clone();
    world.agent("a-online").restart();
    let http = world.agent("a-online").http_addr();
    let status = send(http_client().get(format!("http://{http}/v1/status")))
        .await
        .expect("agent status")
        .json();
    assert_eq!(status["buffer"]["when_full"], "drop_oldest", "{status}");
    world
        .dir
        .wait_until(
            FLEET_TIMEOUT,
            "a-online reconnects and reports version",
            || {
                let connected_before = connected_before.clone();
                async move {
                    let agent = api_agent(addr, "a-online").await?;
                    anyhow::ensure!(
                        agent["connected_since_ms"] != connected_before,
                        "old connection"
                    );
                    anyhow::ensure!(agent["config_version"] == version, "{agent}");
                    Ok(())
                }
            },
        )
        .await;
    assert_eq!(
        pushes_to(&world, "a-online"),
        n_pushes,
        "no push was needed after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_api_asks_for_the_query_credentials() {
    let options = AggregatorOptions {
        query_extra: "[[query.users]]\nname = \"ops\"\npassword = \"fleet secret\"\n".into(),
        ..AggregatorOptions::default()
    };
    let world = World::start_with(
        "fleet-auth",
        &[("berlin-1", "{ site = \"berlin\" }")],
        options,
    );
    let addr = world.query();
    let client = http_client();
    for request in [
        client.get(format!("http://{addr}/api/v1/agents")),
        client.get(format!("http://{addr}/api/v1/rollouts")),
        client.post(format!("http://{addr}/api/v1/rollouts/1/abort")),
        client
            .post(format!("http://{addr}/api/v1/config"))
            .json(&json!({ "document": DROP_OLDEST })),
    ] {
        let reply = send(request).await.expect("request");
        assert_eq!(reply.status, 401, "{}", reply.error());
        let wrong = send(
            client
                .get(format!("http://{addr}/api/v1/agents"))
                .basic_auth("ops", Some("wrong")),
        )
        .await
        .expect("request");
        assert_eq!(wrong.status, 401);
    }
    world
        .dir
        .wait_until(FLEET_TIMEOUT, "berlin-1 is listed with credentials", || {
            let client = client.clone();
            async move {
                let agents = send(
                    client
                        .get(format!(
                            "http://{addr}/api/v1/agents?selector=site%3Dberlin"
                        ))
                        .basic_auth("ops", Some("fleet secret")),
                )
                .await?;
                anyhow::ensure!(agents.status == 200, "{}", agents.error());
                let json = agents.json();
                anyhow::ensure!(json["agents"][0]["agent_id"] == "berlin-1", "{json}");
                Ok(())
            }
        })
        .await;
    let url = format!("http://{addr}");
    let output = std::process::Command::new(binaries!().aggregator)
        .args(["agents", "--user", "ops", "--url", &url])
        .env("RUNNEL_QUERY_PASSWORD", "fleet secret")
        .output()
        .expect("run runnel-aggregator");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("berlin-1") && stdout.contains("site=berlin"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_in_a_wave_stops_the_rollout_and_the_agent_keeps_its_last_good_config() {
    let world = World::start(
        "fleet-wave",
        &[
            ("a-canary", "{ site = \"berlin\" }"),
            ("b-wave", "{ site = \"berlin\" }"),
            ("c-wave", "{ site = \"berlin\" }"),
        ],
    );
    let addr = world.query();
    wait_reporting(&world, &["a-canary", "b-wave", "c-wave"]).await;

    // All agents run on this host: the canary binds the listener port, so the first wave's
    // agent finds it taken. The canary passes the gate; the wave fails.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("find a free port")
        .local_addr()
        .expect("port")
        .port();
    let document =
        format!("[sources.mqtt_listener]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n");
    let reply = push(
        addr,
        json!({ "document": document, "selector": "site=berlin", "canary": "1", "wave": "1", "bake": "1s" }),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.error());
    let id = reply.json()["id"].as_u64().expect("id");
    let version = reply.json()["spec"]["version"].as_u64().expect("version");
    let rollout = wait_phase(&world, id, "failed").await;
    let reason = rollout["reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("wave 1 failed: b-wave:"), "{rollout:#}");
    assert!(
        rollout["history"]
            .to_string()
            .contains("health gate passed"),
        "{rollout:#}"
    );

    let canary = agent_row(addr, "a-canary").await.expect("row");
    assert_eq!(
        canary[0], version,
        "the canary keeps the new config: {canary:?}"
    );
    let failed = agent_row(addr, "b-wave").await.expect("row");
    assert_eq!(
        failed[0], 0,
        "b-wave keeps its last-good config: {failed:?}"
    );
    assert_eq!(
        failed[1], 0,
        "and is no longer told to run the new one: {failed:?}"
    );
    let untouched = agent_row(addr, "c-wave").await.expect("row");
    assert!(
        untouched[1].is_null(),
        "the second wave never started: {untouched:?}"
    );
    assert_eq!(pushes_to(&world, "c-wave"), 0);
    let rows = query_rows(
        addr,
        "SELECT phase, n_applied, n_failed, n_pending FROM rollouts",
    )
    .await
    .expect("rollouts");
    assert_eq!(
        rows,
        vec![vec![json!("failed"), json!(1), json!(1), json!(1)]]
    );
}
