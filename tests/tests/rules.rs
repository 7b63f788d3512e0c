//! End-to-end tests of stateless rules and local actions: the real agent and aggregator
//! binaries, events posted over HTTP, the stored rows read back with SQL, and a threshold
//! rule's MQTT action received by a subscriber on a real broker. With `RUNNEL_TEST_MQTT_URL`
//! (`mqtt://host:port`) that broker is used; without it an in-process rumqttd on a free
//! loopback port. Each test uses its own random topic root.

#[path = "support/mqtt_broker.rs"]
mod mqtt_broker;

use mqtt_broker::broker;

use std::collections::HashMap;

use runnel_tests::{
    ARRIVAL_TIMEOUT, AgentExtra, AgentOptions, AggregatorOptions, binaries, http_client,
    post_events, query_rows, start_fleet_with, wait_count_of, wait_for_metrics,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_route_and_set_rules_decide_what_is_stored() {
    let bins = binaries!();
    let extra = AgentExtra {
        toml: r#"
[[rules]]
name = "drop-health-checks"
when = 'name == "health_check"'
drop = true

[[rules]]
name = "orders"
when = 'name == "checkout"'
route = "orders"
set = { "attrs.total_cents" = "int(double(attrs.total) * 100.0)", "attrs.big" = "double(attrs.total) > 100.0" }
remove = ["attrs.card"]
tag = ["order"]

[[rules]]
name = "pages"
match = "first"
when = 'name == "page_view"'
  [[rules.rules]]
  name = "product-pages"
  when = 'attrs.url.startsWith("/products/")'
  set = { "attrs.section" = '"products"' }
  [[rules.rules]]
  name = "other-pages"
  set = { "attrs.section" = '"other"' }
"#
        .to_owned(),
        ..AgentExtra::default()
    };
    let fleet = start_fleet_with(
        &bins,
        "rules_drop_route_set",
        "edge-rules",
        AggregatorOptions::default(),
        AgentOptions::default(),
        &extra,
    );
    let client = http_client();
    let events = vec![
        json!({"event_id": "p1", "name": "page_view", "url": "/products/1"}),
        json!({"event_id": "p2", "name": "page_view", "url": "/about"}),
        json!({"event_id": "h1", "name": "health_check"}),
        json!({"event_id": "c1", "name": "checkout", "total": 150.5, "card": "4111"}),
        json!({"event_id": "h2", "name": "health_check"}),
        json!({"event_id": "c2", "name": "checkout", "total": 20.0, "card": "4242"}),
    ];
    let outcome = post_events(&client, fleet.agent.http_addr(), &events)
        .await
        .expect("post events");
    assert_eq!(outcome.status, 200, "{outcome:?}");

    let query = fleet.aggregator.query_addr();
    wait_count_of(&fleet.dir, query, "SELECT count(*) FROM events", 4).await;
    let rows = query_rows(
        query,
        "SELECT event_id, stream, name, attrs, tags FROM events ORDER BY event_id",
    )
    .await
    .expect("query rows");
    let rows: Vec<(String, String, String, Value, Value)> = rows
        .into_iter()
        .map(|row| {
            let attrs = serde_json::from_str(row[3].as_str().expect("attrs is JSON text"))
                .expect("attrs parse");
            (
                row[0].as_str().expect("event_id").to_owned(),
                row[1].as_str().expect("stream").to_owned(),
                row[2].as_str().expect("name").to_owned(),
                attrs,
                row[4].clone(),
            )
        })
        .collect();
    let ids: Vec<&str> = rows.iter().map(|row| row.0.as_str()).collect();
    assert_eq!(
        ids,
        ["c1", "c2", "p1", "p2"],
        "health checks dropped: {rows:#?}"
    );
    let by_id: HashMap<&str, &(String, String, String, Value, Value)> =
        rows.iter().map(|row| (row.0.as_str(), row)).collect();

    let c1 = by_id["c1"];
    assert_eq!(c1.1, "orders", "routed");
    assert_eq!(c1.3["total_cents"], json!(15050));
    assert_eq!(c1.3["big"], json!(true));
    assert!(c1.3.get("card").is_none(), "card removed: {}", c1.3);
    assert!(c1.4.to_string().contains("order"), "tagged: {}", c1.4);
    let c2 = by_id["c2"];
    assert_eq!(c2.1, "orders");
    assert_eq!(c2.3["total_cents"], json!(2000));
    assert_eq!(c2.3["big"], json!(false));
    assert!(c2.3.get("card").is_none());

    let (p1, p2) = (by_id["p1"], by_id["p2"]);
    assert_ne!(p1.1, "orders", "not routed");
    assert_eq!(p1.1, p2.1, "pages keep the source's stream");
    assert_eq!(p1.3["section"], json!("products"), "first match");
    assert_eq!(p2.3["section"], json!("other"), "the next rule of the set");

    // The counters say the same.
    wait_for_metrics(
        fleet.agent.http_addr(),
        &[
            r#"runnel_agent_rule_matches_total{rule="drop-health-checks"} 2"#,
            r#"runnel_agent_rule_dropped_events_total{rule="drop-health-checks",reason="drop"} 2"#,
            r#"runnel_agent_rule_matches_total{rule="orders"} 2"#,
            r#"runnel_agent_rule_matches_total{rule="product-pages"} 1"#,
            r#"runnel_agent_rule_matches_total{rule="other-pages"} 1"#,
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_rule_publishes_to_a_real_mqtt_topic() {
    let bins = binaries!();
    let broker = broker();
    let root = format!("runnel-rules-{:016x}", fastrand::u64(..));

    let mut subscription = broker
        .subscribe(&format!("{root}-sub"), &format!("{root}/alerts/#"))
        .await;

    let extra = AgentExtra {
        toml: format!(
            r#"
[[rules]]
name = "overheat"
when = 'name == "reading" && attrs.temp > 90.0'
tag = ["overheat"]
actions = [
  {{ kind = "mqtt", url = "{url}", topic = "{root}/alerts/{{{{ attrs.device }}}}", qos = 1, payload = '{{"device": "{{{{ attrs.device }}}}", "temp": {{{{ attrs.temp }}}}, "rule": "overheat"}}' }},
  {{ kind = "log", level = "warn", message = "overheat on {{{{ attrs.device }}}}: {{{{ attrs.temp }}}}" }},
]
"#,
            url = broker.url(),
        ),
        ..AgentExtra::default()
    };
    let fleet = start_fleet_with(
        &bins,
        "rules_mqtt_action",
        "edge-rules-mqtt",
        AggregatorOptions::default(),
        AgentOptions::default(),
        &extra,
    );
    let client = http_client();
    // The cold reading goes first: had it fired, its message would arrive before the hot one's
    // (one client, QoS 1, in order).
    for (id, device, temp) in [("r1", "press-1", 50.0), ("r2", "press-4", 95.5)] {
        let reading = json!({"event_id": id, "name": "reading", "device": device, "temp": temp});
        let outcome = post_events(&client, fleet.agent.http_addr(), &[reading])
            .await
            .expect("post reading");
        assert_eq!(outcome.status, 200, "{outcome:?}");
    }

    let (topic, payload) = tokio::time::timeout(ARRIVAL_TIMEOUT, subscription.messages.recv())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no MQTT message on {root}/alerts/# from {} within {ARRIVAL_TIMEOUT:?}\n{}",
                broker.what,
                fleet.dir.report()
            )
        })
        .expect("subscriber running");
    assert_eq!(topic, format!("{root}/alerts/press-4"));
    let payload: Value = serde_json::from_slice(&payload).expect("the payload is JSON");
    assert_eq!(
        payload,
        json!({"device": "press-4", "temp": 95.5, "rule": "overheat"})
    );

    // The event itself is stored, tagged; the action is counted.
    let query = fleet.aggregator.query_addr();
    wait_count_of(&fleet.dir, query, "SELECT count(*) FROM events", 2).await;
    wait_for_metrics(
        fleet.agent.http_addr(),
        &[
            r#"runnel_agent_rule_matches_total{rule="overheat"} 1"#,
            r#"runnel_agent_actions_total{rule="overheat",kind="mqtt",outcome="ok"} 1"#,
            r#"runnel_agent_actions_total{rule="overheat",kind="log",outcome="ok"} 1"#,
        ],
    )
    .await;
    assert!(
        fleet.agent.stderr().contains("overheat on press-4: 95.5"),
        "the log action's line:\n{}",
        fleet.agent.stderr()
    );
    assert!(
        subscription.messages.try_recv().is_err(),
        "exactly one message"
    );
}
