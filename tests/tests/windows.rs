//! Stateful rules end to end: events posted to the real agent over HTTP fill a `[[windows]]`
//! window, its alert travels to the aggregator like any event and shows in the `alerts` view;
//! the window's state survives a graceful agent restart; and an alert's MQTT action reaches a
//! subscriber on a real broker (`RUNNEL_TEST_MQTT_URL`, else an in-process rumqttd, as in
//! `tests/rules.rs`).
//!
//! The windows lie an hour in the future (`max_future_ms` lets them in): the agent's clock can
//! then never close them during the test, whatever the wall clock and however slowly the agent
//! restarts, and the test closes them on demand with an event past the window's end.

#[path = "support/mqtt_broker.rs"]
mod mqtt_broker;

use mqtt_broker::broker;

use std::time::{SystemTime, UNIX_EPOCH};

use runnel_tests::{
    ARRIVAL_TIMEOUT, AgentExtra, AgentOptions, AgentProcess, AggregatorOptions, AggregatorProcess,
    Certs, TestDir, Uplink, attrs_of, binaries, http_client, post_body, query_rows, wait_count_of,
    wait_for_metrics,
};
use serde_json::{Value, json};

const WINDOW_MS: i64 = 60_000;

const WINDOWS_TOML: &str = r#"
[[windows]]
name = "door_bursts"
when = "name == 'door_open'"
key = ["attrs.device"]
size_ms = 60000
allowed_lateness_ms = 0
max_future_ms = 86400000
aggregates = { n = "count", users = "distinct(user_id)" }
having = "n >= 3"
"#;

struct Fleet {
    // Field order is drop order: processes go before the directory that holds their logs.
    agent: AgentProcess,
    aggregator: AggregatorProcess,
    _certs: Certs,
    dir: TestDir,
}

fn start_fleet(test_name: &str) -> Fleet {
    start_fleet_with(test_name, WINDOWS_TOML)
}

fn start_fleet_with(test_name: &str, windows_toml: &str) -> Fleet {
    let bins = binaries!();
    let dir = TestDir::new(test_name);
    let certs = Certs::init(&dir.join("certs"));
    let aggregator = AggregatorProcess::start(&bins, &dir, &certs, AggregatorOptions::default());
    let cert = certs.issue_agent("edge-1");
    let uplink = Uplink {
        aggregator: aggregator.ingest_addr(),
        ca_cert: certs.ca_cert.clone(),
    };
    let agent = AgentProcess::start_with(
        &bins,
        &dir,
        "agent-edge-1",
        &cert,
        &uplink,
        AgentOptions::default(),
        &AgentExtra {
            toml: windows_toml.to_owned(),
            ..AgentExtra::default()
        },
    );
    Fleet {
        agent,
        aggregator,
        _certs: certs,
        dir,
    }
}

/// The start of a window an hour from now.
fn future_window_start() -> i64 {
    let now_ms = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis(),
    )
    .expect("ms fit in i64");
    (now_ms / WINDOW_MS + 60) * WINDOW_MS
}

fn door(device: &str, user: &str, time_ms: i64) -> Value {
    json!({ "name": "door_open", "device": device, "user_id": user, "time": time_ms })
}

async fn post(fleet: &Fleet, events: &[Value]) {
    let outcome = post_body(
        &http_client(),
        fleet.agent.http_addr(),
        Value::Array(events.to_vec()).to_string(),
    )
    .await
    .expect("POST events");
    assert_eq!(outcome.status, 200, "{:?}", outcome.body);
}

/// Waits for exactly one alert and returns its name and attrs.
async fn the_alert(fleet: &Fleet) -> (String, Value) {
    let query_addr = fleet.aggregator.query_addr();
    wait_count_of(&fleet.dir, query_addr, "SELECT count(*) FROM alerts", 1).await;
    let rows = query_rows(query_addr, "SELECT name, attrs FROM alerts")
        .await
        .expect("query alerts");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let name = rows[0][0].as_str().expect("name is text").to_owned();
    (name, attrs_of(&rows[0][1]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_alert_reaches_the_aggregator() {
    let fleet = start_fleet("windows-alert");
    let start = future_window_start();
    post(
        &fleet,
        &[
            door("d1", "u1", start + 1_000),
            door("d1", "u2", start + 2_000),
            door("d2", "u1", start + 2_500),
            json!({ "name": "door_closed", "device": "d1", "time": start + 2_600 }),
        ],
    )
    .await;
    post(&fleet, &[door("d1", "u1", start + 59_999)]).await;
    // An event at the window's end moves the watermark past it: the window closes now.
    post(&fleet, &[door("d9", "u9", start + WINDOW_MS)]).await;
    let (name, attrs) = the_alert(&fleet).await;
    assert_eq!(name, "door_bursts");
    assert_eq!(attrs["device"], json!("d1"), "{attrs}");
    assert_eq!(attrs["n"], json!(3), "door_closed is filtered out: {attrs}");
    assert_eq!(attrs["users"], json!(2), "{attrs}");
    assert_eq!(attrs["window_start_ms"], json!(start), "{attrs}");
    assert_eq!(attrs["window_end_ms"], json!(start + WINDOW_MS), "{attrs}");
    // A late event: counted, stored like any event, and no second alert.
    post(&fleet, &[door("d1", "u5", start + 30_000)]).await;
    wait_for_metrics(
        fleet.agent.http_addr(),
        &[
            r#"runnel_agent_window_alerts_total{window="door_bursts"} 1"#,
            r#"runnel_agent_window_late_events_total{window="door_bursts"} 1"#,
        ],
    )
    .await;
    // The events themselves arrive too, unchanged: 7 posted, plus the alert.
    wait_count_of(
        &fleet.dir,
        fleet.aggregator.query_addr(),
        "SELECT count(*) FROM events",
        8,
    )
    .await;
    let n_alerts =
        runnel_tests::query_count(fleet.aggregator.query_addr(), "SELECT count(*) FROM alerts")
            .await
            .expect("count alerts");
    assert_eq!(n_alerts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_state_survives_a_graceful_restart() {
    let mut fleet = start_fleet("windows-restart");
    let start = future_window_start();
    post(
        &fleet,
        &[
            door("d1", "u1", start + 1_000),
            door("d1", "u2", start + 2_000),
        ],
    )
    .await;
    fleet.agent.stop();
    let state_file = fleet.dir.join("agent-edge-1/data/windows.state");
    assert!(
        state_file.exists(),
        "a graceful stop saves window state to {}",
        state_file.display()
    );
    fleet.agent.restart();
    post(&fleet, &[door("d1", "u3", start + 3_000)]).await;
    post(&fleet, &[door("d9", "u9", start + WINDOW_MS)]).await;
    let (name, attrs) = the_alert(&fleet).await;
    assert_eq!(name, "door_bursts");
    assert_eq!(
        attrs["n"],
        json!(3),
        "two events before the restart and one after: {attrs}"
    );
    assert_eq!(attrs["users"], json!(3), "{attrs}");
    assert_eq!(attrs["window_start_ms"], json!(start), "{attrs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_alert_publishes_to_a_real_mqtt_topic() {
    let broker = broker();
    let root = format!("runnel-windows-{:016x}", fastrand::u64(..));

    let mut subscription = broker
        .subscribe(&format!("{root}-sub"), &format!("{root}/#"))
        .await;

    let windows_toml = WINDOWS_TOML.replace(
        "having = \"n >= 3\"\n",
        &format!(
            "having = \"n >= 3\"\nactions = [{{ kind = \"mqtt\", url = \"{url}\", \
             topic = \"{root}/doors/{{{{ attrs.device }}}}\", \
             payload = '{{\"device\": \"{{{{ attrs.device }}}}\", \"n\": {{{{ attrs.n }}}}, \
             \"start\": {{{{ attrs.window_start_ms }}}}}}' }}]\n",
            url = broker.url()
        ),
    );
    let fleet = start_fleet_with("windows-mqtt", &windows_toml);
    let start = future_window_start();
    post(
        &fleet,
        &[
            door("d2", "u1", start + 100),
            door("d1", "u1", start + 1_000),
            door("d1", "u2", start + 2_000),
            door("d1", "u3", start + 3_000),
        ],
    )
    .await;
    post(&fleet, &[door("d9", "u9", start + WINDOW_MS)]).await;

    let (topic, payload) = tokio::time::timeout(ARRIVAL_TIMEOUT, subscription.messages.recv())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no MQTT message on {root}/# from {} within {ARRIVAL_TIMEOUT:?}\n{}",
                broker.what,
                fleet.dir.report()
            )
        })
        .expect("subscriber running");
    assert_eq!(topic, format!("{root}/doors/d1"));
    let payload: Value = serde_json::from_slice(&payload).expect("the payload is JSON");
    assert_eq!(payload, json!({"device": "d1", "n": 3, "start": start}));
    // The alert is stored too; d2 (n = 1) neither alerts nor publishes.
    let (name, attrs) = the_alert(&fleet).await;
    assert_eq!(
        (name.as_str(), &attrs["device"]),
        ("door_bursts", &json!("d1"))
    );
    wait_for_metrics(
        fleet.agent.http_addr(),
        &[r#"runnel_agent_actions_total{rule="door_bursts",kind="mqtt",outcome="ok"} 1"#],
    )
    .await;
    assert!(
        subscription.messages.try_recv().is_err(),
        "exactly one message"
    );
}
