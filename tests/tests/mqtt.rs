//! End-to-end tests of the agent's MQTT subscriber and of backpressure: the real agent and
//! aggregator binaries against a real broker. With `RUNNEL_TEST_MQTT_URL` (`mqtt://host:port`,
//! which `.ci/run` sets) that broker is used; without it an in-process rumqttd broker on a free
//! loopback port. Every test uses its own random topic root and client ids, so tests neither see
//! each other's messages nor sessions left by earlier runs.
//!
//! The publisher is rumqttc with QoS 1. A PUBACK to the publisher comes from the broker, so the
//! guarantee under test is: every message the broker accepted is stored exactly once.

#[path = "support/mqtt_broker.rs"]
// Shared by several test crates; this one does not subscribe through it.
#[allow(dead_code)]
mod mqtt_broker;

use mqtt_broker::{Broker, MQTT_URL_ENV, broker};

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Outgoing, Packet, QoS};
use runnel_tests::{
    ARRIVAL_TIMEOUT, AgentExtra, AgentOptions, AggregatorOptions, Fleet, assert_no_duplicates,
    binaries, http_client, poll_until, post_events, query_count, start_fleet_with,
    stored_event_ids, stored_events, test_event, wait_count_of, wait_for_metrics,
};
use serde_json::{Value, json};

/// Panics unless `RUNNEL_TEST_MQTT_URL` names a broker: for tests the in-process rumqttd cannot
/// serve. rumqttd 0.20 resends the unacknowledged QoS 1 messages of a persistent session as new
/// publishes (a new packet id, DUP=0), where MQTT 3.1.1 §4.4 wants the original packet id with
/// DUP=1; the agent recognises a redelivery of a message it already stored by exactly that, so
/// after a SIGKILL it stores a few messages twice against rumqttd (not against Mosquitto).
fn require_real_broker(test: &str) {
    if std::env::var_os(MQTT_URL_ENV).is_none() {
        panic!(
            "{test} needs a real MQTT broker: set {MQTT_URL_ENV}=mqtt://host:port (.ci/run does). \
             The in-process rumqttd resends unacknowledged QoS 1 messages after a reconnect as new \
             publishes (new packet id, DUP=0), so redeliveries cannot be told from new messages."
        );
    }
}

/// A short random name part: topic roots and client ids of one test.
fn unique(label: &str) -> String {
    format!(
        "rt-{label}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

// ---------------------------------------------------------------------------------------------
// Publisher

#[derive(Debug, Default)]
struct PublisherState {
    /// Message ids handed to the client, not yet sent (the event loop sends them in order).
    queued: VecDeque<String>,
    /// Packet id -> message id, sent and not yet acknowledged.
    in_flight: HashMap<u16, String>,
    /// Message ids the broker acknowledged (PUBACK), in order.
    acked: Vec<String>,
    n_published: usize,
    connected: bool,
    /// The event loop's error, if it failed: the test cannot trust its counts then.
    error: Option<String>,
}

/// A QoS 1 publisher that records which messages the broker acknowledged.
struct Publisher {
    client: AsyncClient,
    state: Arc<Mutex<PublisherState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    async fn connect(broker: &Broker, client_id: &str) -> Publisher {
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(100)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let state = Arc::new(Mutex::new(PublisherState::default()));
        let loop_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let mut state = loop_state.lock().expect("publisher lock");
                match event {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => state.connected = true,
                    Ok(MqttEvent::Outgoing(Outgoing::Publish(pkid))) => {
                        let id = state
                            .queued
                            .pop_front()
                            .expect("a publish was sent that the test did not queue");
                        state.in_flight.insert(pkid, id);
                    }
                    Ok(MqttEvent::Incoming(Packet::PubAck(ack))) => {
                        if let Some(id) = state.in_flight.remove(&ack.pkid) {
                            state.acked.push(id);
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        state.error = Some(error.to_string());
                        return;
                    }
                }
            }
        });
        let publisher = Publisher {
            client,
            state,
            task,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let state = publisher.state.lock().expect("publisher lock");
                if state.connected {
                    break;
                }
                if let Some(error) = &state.error {
                    panic!("test publisher cannot connect to {}: {error}", broker.what);
                }
            }
            assert!(
                Instant::now() < deadline,
                "test publisher not connected to {} within 30 s",
                broker.what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        publisher
    }

    /// Hands one QoS 1 message to the client; `id` names it in [`Publisher::acked`]. Call from
    /// one task at a time (ids are matched to packets in order).
    async fn publish(&self, topic: &str, id: &str, payload: impl Into<Vec<u8>>) {
        {
            let mut state = self.state.lock().expect("publisher lock");
            if let Some(error) = &state.error {
                panic!("test publisher failed: {error}");
            }
            state.queued.push_back(id.to_owned());
            state.n_published += 1;
        }
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue a publish");
    }

    fn n_acked(&self) -> usize {
        self.state.lock().expect("publisher lock").acked.len()
    }

    fn acked(&self) -> BTreeSet<String> {
        let state = self.state.lock().expect("publisher lock");
        let acked: BTreeSet<String> = state.acked.iter().cloned().collect();
        assert_eq!(
            acked.len(),
            state.acked.len(),
            "a message id was acked twice"
        );
        acked
    }

    /// Waits until the broker acknowledged every message handed over so far.
    async fn wait_all_acked(&self) {
        let outcome = poll_until(Duration::from_secs(60), || async {
            let state = self.state.lock().expect("publisher lock");
            if let Some(error) = &state.error {
                panic!("test publisher failed: {error}");
            }
            anyhow::ensure!(
                state.acked.len() == state.n_published,
                "{} of {} acknowledged",
                state.acked.len(),
                state.n_published
            );
            Ok(())
        })
        .await;
        if let Err(last) = outcome {
            panic!("the broker did not acknowledge every publish: {last:#}");
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Fleet with an MQTT source

/// One `[[sources.mqtt]]` subscribed to `<root>/#` with QoS 1 on a persistent session.
fn mqtt_source_toml(broker: &Broker, name: &str, root: &str, more: &str) -> String {
    format!(
        "[[sources.mqtt]]\n\
         name = \"{name}\"\n\
         url = \"{url}\"\n\
         topics = [\"{root}/#\"]\n\
         qos = 1\n\
         client_id = \"{root}-{name}\"\n\
         clean_session = false\n\
         reconnect_min_ms = 50\n\
         reconnect_max_ms = 1000\n\
         {more}\n",
        url = broker.url(),
    )
}

struct MqttFleet {
    fleet: Fleet,
    broker: Broker,
    root: String,
    publisher: Publisher,
}

async fn start_mqtt_fleet(
    test_name: &str,
    agent_options: AgentOptions,
    buffer_max_bytes: Option<u64>,
    source_more: &str,
) -> MqttFleet {
    let bins = binaries!();
    let broker = broker();
    eprintln!("MQTT broker: {}", broker.what);
    let root = unique(test_name);
    let template = format!("topic_template = \"{root}/{{site}}/{{device}}/telemetry\"\n");
    let extra = AgentExtra {
        buffer_max_bytes,
        labels: None,
        toml: mqtt_source_toml(&broker, "sub", &root, &format!("{template}{source_more}")),
    };
    let fleet = start_fleet_with(
        &bins,
        test_name,
        "edge-mqtt",
        AggregatorOptions::default(),
        agent_options,
        &extra,
    );
    let publisher = Publisher::connect(&broker, &format!("{root}-pub")).await;
    MqttFleet {
        fleet,
        broker,
        root,
        publisher,
    }
}

/// A telemetry message whose id is its event id (and `msg_id`, an attr).
fn telemetry(id: &str, n: usize) -> Vec<u8> {
    json!({"event_id": id, "msg_id": id, "temp": 20.0 + (n % 10) as f64 / 2.0})
        .to_string()
        .into_bytes()
}

/// Publishes probes under `<root>/probe/...` until one is stored: the agent's subscription is in
/// place (a QoS 1 message to a topic nobody subscribed yet is dropped by the broker).
async fn wait_subscribed(
    fleet: &Fleet,
    publisher: &Publisher,
    root: &str,
    id_prefix: &str,
) -> String {
    let query_addr = fleet.aggregator.query_addr();
    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    for probe_idx in 0.. {
        let id = format!("{id_prefix}-probe-{probe_idx}");
        publisher
            .publish(&format!("{root}/probe/p/telemetry"), &id, telemetry(&id, 0))
            .await;
        // A text subscriber keeps the payload in attrs, so look there too.
        let sql = format!(
            "SELECT count(*) FROM events WHERE event_id LIKE '{id_prefix}-probe-%' \
             OR attrs LIKE '%{id_prefix}-probe-%'"
        );
        let seen = poll_until(Duration::from_secs(2), || async {
            let n = query_count(query_addr, &sql).await?;
            anyhow::ensure!(n > 0, "no probe stored");
            Ok(())
        })
        .await;
        if seen.is_ok() {
            return id;
        }
        if Instant::now() >= deadline {
            panic!(
                "no probe published under {root}/ reached the aggregator within {ARRIVAL_TIMEOUT:?}: \
                 the agent did not subscribe; agent stderr:\n{}",
                fleet.agent.stderr()
            );
        }
    }
    unreachable!("the probe loop only ends by returning or panicking")
}

/// Waits until the stored ids that start with `prefix` are exactly `expected`.
async fn wait_exactly_stored(fleet: &Fleet, prefix: &str, expected: &BTreeSet<String>) {
    let query_addr = fleet.aggregator.query_addr();
    let what = format!(
        "exactly the {} messages {prefix}* are stored",
        expected.len()
    );
    fleet
        .dir
        .wait_until(ARRIVAL_TIMEOUT, &what, || async move {
            let stored = stored_event_ids(query_addr, prefix).await?;
            let unexpected: Vec<&String> = stored.difference(expected).collect();
            assert!(
                unexpected.is_empty(),
                "stored but never acknowledged by the broker: {:?}",
                &unexpected[..unexpected.len().min(5)]
            );
            let missing: Vec<&String> = expected.difference(&stored).collect();
            anyhow::ensure!(
                missing.is_empty(),
                "{} of {} missing, such as {:?}",
                missing.len(),
                expected.len(),
                &missing[..missing.len().min(5)]
            );
            Ok(())
        })
        .await;
    let n_rows = query_count(
        query_addr,
        &format!("SELECT count(*) FROM events WHERE event_id LIKE '{prefix}%'"),
    )
    .await
    .expect("count rows");
    assert_eq!(
        n_rows,
        expected.len() as u64,
        "{prefix}*: rows != distinct ids: a message was stored twice"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_messages_published_while_the_agent_is_down_arrive_once() {
    const N_MESSAGES: usize = 300;
    let mut mf = start_mqtt_fleet("mqtt-session", AgentOptions::default(), None, "").await;
    let root = mf.root.clone();
    // The first start subscribes, so the broker holds a persistent session for the client id.
    wait_subscribed(&mf.fleet, &mf.publisher, &root, &root).await;
    mf.fleet.agent.stop();

    let prefix = format!("{root}-m-");
    let mut expected = BTreeSet::new();
    for msg_idx in 0..N_MESSAGES {
        let id = format!("{prefix}{msg_idx:04}");
        let topic = format!("{root}/site-{}/dev-{}/telemetry", msg_idx % 2, msg_idx % 3);
        mf.publisher
            .publish(&topic, &id, telemetry(&id, msg_idx))
            .await;
        expected.insert(id);
    }
    mf.publisher.wait_all_acked().await;
    assert!(mf.publisher.acked().is_superset(&expected));

    mf.fleet.agent.restart();
    wait_exactly_stored(&mf.fleet, &prefix, &expected).await;
    let query_addr = mf.fleet.aggregator.query_addr();
    assert_no_duplicates(query_addr).await;

    // Fields: the topic template's levels, the topic, the payload's keys.
    let events = stored_events(query_addr, &format!("event_id = '{prefix}0005'"))
        .await
        .expect("one event");
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event.source, "mqtt");
    assert_eq!(event.stream, "telemetry");
    assert_eq!(event.name, "telemetry", "the last topic level");
    assert_eq!(
        event.attrs["topic"],
        format!("{root}/site-1/dev-2/telemetry")
    );
    assert_eq!(event.attrs["site"], "site-1");
    assert_eq!(event.attrs["device"], "dev-2");
    assert_eq!(event.attrs["msg_id"], format!("{prefix}0005"));
    assert_eq!(event.attrs["temp"], 22.5);
    eprintln!("broker: {}", mf.broker.what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mqtt_sigkill_mid_stream_stores_every_accepted_message_once() {
    const N_WHILE_DOWN: usize = 200;
    require_real_broker("mqtt_sigkill_mid_stream_stores_every_accepted_message_once");
    let agent_options = AgentOptions {
        // Durability is under test: the shipped default.
        synchronous: "full",
        ..AgentOptions::default()
    };
    let mut mf = start_mqtt_fleet("mqtt-sigkill", agent_options, None, "").await;
    let root = mf.root.clone();
    wait_subscribed(&mf.fleet, &mf.publisher, &root, &root).await;
    let query_addr = mf.fleet.aggregator.query_addr();

    // A steady stream, at a rate the agent keeps up with: a broker drops QoS 1 messages beyond
    // its per-client queue (Mosquitto: max_queued_messages, 1000), after acknowledging them.
    let publisher = Arc::new(mf.publisher);
    let stop = Arc::new(AtomicBool::new(false));
    let stream_prefix = format!("{root}-k-");
    let streamer = {
        let publisher = publisher.clone();
        let stop = stop.clone();
        let root = root.clone();
        let prefix = stream_prefix.clone();
        tokio::spawn(async move {
            let mut msg_idx = 0usize;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                for _ in 0..4 {
                    let id = format!("{prefix}{msg_idx:06}");
                    let topic = format!("{root}/s/d-{}/telemetry", msg_idx % 4);
                    publisher
                        .publish(&topic, &id, telemetry(&id, msg_idx))
                        .await;
                    msg_idx += 1;
                }
            }
            msg_idx
        })
    };
    let sql = format!("SELECT count(*) FROM events WHERE event_id LIKE '{stream_prefix}%'");
    mf.fleet
        .dir
        .wait_until(
            ARRIVAL_TIMEOUT,
            "the broker acknowledged 1500 messages and the aggregator stored 300",
            || {
                let n_acked = publisher.n_acked();
                let sql = sql.clone();
                async move {
                    let n_stored = query_count(query_addr, &sql).await?;
                    anyhow::ensure!(
                        n_acked >= 1500 && n_stored >= 300,
                        "{n_acked} acknowledged, {n_stored} stored"
                    );
                    Ok(())
                }
            },
        )
        .await;
    mf.fleet.agent.kill_hard();
    stop.store(true, Ordering::SeqCst);
    let n_streamed = streamer.await.expect("streamer task");
    publisher.wait_all_acked().await;
    let n_stored_at_kill = query_count(query_addr, &sql).await.expect("count");
    eprintln!("agent killed: {n_streamed} streamed, {n_stored_at_kill} stored");

    let down_prefix = format!("{root}-d-");
    for msg_idx in 0..N_WHILE_DOWN {
        let id = format!("{down_prefix}{msg_idx:04}");
        publisher
            .publish(
                &format!("{root}/s/down/telemetry"),
                &id,
                telemetry(&id, msg_idx),
            )
            .await;
    }
    publisher.wait_all_acked().await;

    mf.fleet.agent.restart();
    let acked = publisher.acked();
    let streamed: BTreeSet<String> = acked
        .iter()
        .filter(|id| id.starts_with(&stream_prefix))
        .cloned()
        .collect();
    let while_down: BTreeSet<String> = acked
        .iter()
        .filter(|id| id.starts_with(&down_prefix))
        .cloned()
        .collect();
    assert_eq!(streamed.len(), n_streamed);
    assert_eq!(while_down.len(), N_WHILE_DOWN);
    wait_exactly_stored(&mf.fleet, &stream_prefix, &streamed).await;
    wait_exactly_stored(&mf.fleet, &down_prefix, &while_down).await;
    assert_no_duplicates(query_addr).await;
    let duplicates = runnel_tests::query_rows(
        query_addr,
        "SELECT event_id, count(*) FROM events GROUP BY event_id HAVING count(*) > 1 LIMIT 10",
    )
    .await
    .expect("duplicates query");
    assert!(duplicates.is_empty(), "stored twice: {duplicates:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_undecodable_payloads_become_dead_letters() {
    let broker = broker();
    let text_root = unique("mqtt-text");
    // A second subscriber that keeps payloads as text: non-UTF-8 is its dead letter.
    let text_source = mqtt_source_toml(&broker, "text", &text_root, "payload = \"text\"\n");
    let mf = start_mqtt_fleet("mqtt-dead", AgentOptions::default(), None, &text_source).await;
    let root = mf.root.clone();
    wait_subscribed(&mf.fleet, &mf.publisher, &root, &root).await;
    wait_subscribed(&mf.fleet, &mf.publisher, &text_root, &text_root).await;
    let query_addr = mf.fleet.aggregator.query_addr();
    let n_before = query_count(query_addr, "SELECT count(*) FROM events")
        .await
        .expect("count");

    let json_topic = format!("{root}/plant/press/telemetry");
    let text_topic = format!("{text_root}/plant/lamp/state");
    let publisher = &mf.publisher;
    publisher
        .publish(&json_topic, "not-json", "temperature: 21.5".as_bytes())
        .await;
    publisher
        .publish(&json_topic, "binary", vec![0xff, 0x00, 0x01, 0x02])
        .await;
    let array = json!([
        {"event_id": format!("{root}-arr-1"), "temp": 1},
        {"event_id": format!("{root}-arr-2"), "temp": 2}
    ]);
    publisher
        .publish(&json_topic, "array", array.to_string().into_bytes())
        .await;
    publisher
        .publish(&text_topic, "not-utf8", vec![b'O', 0xff, b'N'])
        .await;
    publisher
        .publish(&text_topic, "text", "ON".as_bytes())
        .await;
    publisher.wait_all_acked().await;

    // Two dead letters from the JSON subscriber, one from the text subscriber; two events from
    // the array, one from the text message.
    wait_count_of(
        &mf.fleet.dir,
        query_addr,
        "SELECT count(*) FROM events",
        n_before + 6,
    )
    .await;
    let dead = stored_events(query_addr, "stream = 'dead_letters'")
        .await
        .expect("dead letters");
    assert_eq!(dead.len(), 3, "{dead:?}");
    let expected: [(&str, &str, Value); 3] = [
        (
            json_topic.as_str(),
            "invalid JSON",
            Value::String("temperature: 21.5".to_owned()),
        ),
        (
            json_topic.as_str(),
            "invalid JSON",
            Value::String("ff000102".to_owned()),
        ),
        (
            text_topic.as_str(),
            "is not UTF-8",
            Value::String("4fff4e".to_owned()),
        ),
    ];
    for (topic, reason, raw) in expected {
        let found = dead.iter().find(|event| event.attrs["raw"] == raw);
        let event = found.unwrap_or_else(|| panic!("no dead letter with raw {raw}: {dead:?}"));
        assert_eq!(event.source, "mqtt", "{event:?}");
        assert_eq!(event.attrs["topic"], topic, "{event:?}");
        let stored_reason = event.attrs["reason"].as_str().unwrap_or_default();
        assert!(
            stored_reason.starts_with(&format!("payload on {topic}"))
                && stored_reason.contains(reason),
            "reason {stored_reason:?} should name the topic and say {reason:?}"
        );
    }

    let good = stored_events(
        query_addr,
        &format!("event_id LIKE '{root}-arr-%' OR attrs LIKE '%{text_root}/plant/lamp/state%'"),
    )
    .await
    .expect("good events");
    let good: Vec<&runnel_tests::StoredEvent> =
        good.iter().filter(|e| e.stream != "dead_letters").collect();
    assert_eq!(good.len(), 3, "{good:?}");
    let text = good
        .iter()
        .find(|e| e.attrs["topic"] == text_topic)
        .expect("the text message");
    assert_eq!(text.attrs["payload"], "ON");
    assert_eq!(text.name, "state");
    // Dead letters and text events have no event id: count distinct (agent_id, seq) instead.
    let n_rows = query_count(query_addr, "SELECT count(*) FROM events")
        .await
        .expect("count");
    let n_distinct = query_count(
        query_addr,
        "SELECT count(*) FROM (SELECT DISTINCT agent_id, seq FROM events)",
    )
    .await
    .expect("count distinct");
    assert_eq!(n_rows, n_distinct, "a sequence number was stored twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_buffer_backpressures_http_and_mqtt_then_delivers_everything_once() {
    const BUFFER_MAX_BYTES: u64 = 1 << 20;
    const N_MQTT: usize = 200;
    const EVENTS_PER_REQUEST: usize = 100;
    let mut mf = start_mqtt_fleet(
        "backpressure",
        AgentOptions::default(),
        Some(BUFFER_MAX_BYTES),
        // Short keep-alive: a subscriber that stops reading while full is dropped by the broker
        // and must come back without losing or doubling anything.
        "keep_alive_s = 5\n",
    )
    .await;
    let root = mf.root.clone();
    wait_subscribed(&mf.fleet, &mf.publisher, &root, &root).await;
    mf.fleet.aggregator.stop();

    // Flood until the buffer is full: 503 with Retry-After.
    let client = http_client();
    let http_prefix = format!("{root}-h-");
    let mut acked_http: BTreeSet<String> = BTreeSet::new();
    let mut refused_http: BTreeSet<String> = BTreeSet::new();
    let mut next_idx = 0usize;
    // Far more than 1 MiB of events: if none is refused by then, there is no backpressure.
    let max_requests = 10 * (BUFFER_MAX_BYTES as usize) / (EVENTS_PER_REQUEST * 100);
    let mut busy = None;
    for _ in 0..max_requests {
        let ids: Vec<String> = (next_idx..next_idx + EVENTS_PER_REQUEST)
            .map(|i| format!("{http_prefix}{i:06}"))
            .collect();
        next_idx += EVENTS_PER_REQUEST;
        let events: Vec<Value> = ids.iter().map(|id| test_event(id)).collect();
        let outcome = post_events(&client, mf.fleet.agent.http_addr(), &events)
            .await
            .expect("post while the aggregator is down");
        match outcome.status {
            200 => acked_http.extend(ids),
            503 => {
                refused_http.extend(ids);
                busy = Some(outcome);
                break;
            }
            status => panic!("HTTP {status} while filling the buffer: {}", outcome.body),
        }
    }
    let busy = busy.unwrap_or_else(|| {
        panic!(
            "{} events ({} requests) accepted with a {BUFFER_MAX_BYTES}-byte buffer and the \
             aggregator down: no backpressure",
            acked_http.len(),
            max_requests
        )
    });
    let retry_after = busy
        .retry_after
        .clone()
        .unwrap_or_else(|| panic!("503 without Retry-After: {}", busy.body));
    assert!(
        retry_after.trim().parse::<u64>().is_ok_and(|s| s >= 1),
        "Retry-After is not a number of seconds: {retry_after:?}"
    );
    let reason = busy.body["error"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("full"), "503 reason: {:?}", busy.body);
    eprintln!(
        "buffer full after {} acknowledged events: 503, Retry-After {retry_after}, {reason}",
        acked_http.len()
    );
    assert!(!acked_http.is_empty(), "the buffer took nothing at all");

    // Top it up with ever smaller requests until not even one event fits.
    let mut n_events = EVENTS_PER_REQUEST / 2;
    while n_events >= 1 {
        let ids: Vec<String> = (next_idx..next_idx + n_events)
            .map(|i| format!("{http_prefix}{i:06}"))
            .collect();
        next_idx += n_events;
        let events: Vec<Value> = ids.iter().map(|id| test_event(id)).collect();
        let outcome = post_events(&client, mf.fleet.agent.http_addr(), &events)
            .await
            .expect("top up the buffer");
        match outcome.status {
            200 => acked_http.extend(ids),
            503 => {
                assert!(outcome.retry_after.is_some(), "503 without Retry-After");
                refused_http.extend(ids);
                n_events /= 2;
            }
            status => panic!("HTTP {status} while filling the buffer: {}", outcome.body),
        }
    }

    // MQTT meanwhile: the broker takes the messages, the agent cannot store them, so it must
    // not acknowledge them.
    let mqtt_prefix = format!("{root}-q-");
    let mut expected_mqtt = BTreeSet::new();
    for msg_idx in 0..N_MQTT {
        let id = format!("{mqtt_prefix}{msg_idx:04}");
        mf.publisher
            .publish(
                &format!("{root}/s/full/telemetry"),
                &id,
                telemetry(&id, msg_idx),
            )
            .await;
        expected_mqtt.insert(id);
    }
    mf.publisher.wait_all_acked().await;

    // Still full: another request is refused.
    let probe_ids: Vec<String> = (0..1).map(|i| format!("{root}-late-{i:04}")).collect();
    let outcome = post_events(
        &client,
        mf.fleet.agent.http_addr(),
        &probe_ids
            .iter()
            .map(|id| test_event(id))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("post while full");
    assert_eq!(outcome.status, 503, "{}", outcome.body);
    refused_http.extend(probe_ids);

    // Kill the agent while it holds MQTT messages it could not store: only what the broker
    // still has (unacknowledged) can reach the aggregator now.
    mf.fleet.agent.kill_hard();
    mf.fleet.agent.restart();
    let outcome = post_events(
        &client,
        mf.fleet.agent.http_addr(),
        &[test_event(&format!("{root}-late-after-restart"))],
    )
    .await
    .expect("post after restart");
    assert_eq!(
        outcome.status, 503,
        "the full buffer survived the restart: {}",
        outcome.body
    );
    refused_http.insert(format!("{root}-late-after-restart"));

    mf.fleet.aggregator.restart();
    wait_exactly_stored(&mf.fleet, &http_prefix, &acked_http).await;
    wait_exactly_stored(&mf.fleet, &mqtt_prefix, &expected_mqtt).await;
    let query_addr = mf.fleet.aggregator.query_addr();
    let n_refused_stored = query_count(
        query_addr,
        &format!("SELECT count(*) FROM events WHERE event_id LIKE '{root}-late-%'"),
    )
    .await
    .expect("count refused");
    assert_eq!(n_refused_stored, 0, "events answered 503 were stored");
    let stored_http = stored_event_ids(query_addr, &http_prefix)
        .await
        .expect("stored http ids");
    assert!(
        stored_http.is_disjoint(&refused_http),
        "events answered 503 were stored"
    );
    assert_no_duplicates(query_addr).await;
}

/// Connects with the agent's client id and leaves at once: the broker disconnects the agent
/// (MQTT-3.1.4-2), and with `clean_session` the broker discards the agent's persistent session
/// and every message queued in it (MQTT-3.1.2-6), as a broker restart without persistence does.
/// Returns once this connection's CONNACK came (or the agent took the id back first).
async fn take_over_client_id(broker: &Broker, client_id: &str, clean_session: bool) {
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean_session);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let outcome = tokio::time::timeout(ARRIVAL_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.disconnect().await;
                }
                Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) => {
                    // Sent: the broker has it once the socket is flushed; one more poll does that
                    // or fails with the closed connection.
                    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
                    return Ok(());
                }
                Ok(_) => {}
                // The agent reconnected first and took the id back: this connection had its
                // effect (its CONNECT reached the broker) or will be retried by the caller.
                Err(error) => return Err(error.to_string()),
            }
        }
    })
    .await;
    eprintln!("take-over of {client_id} (clean_session = {clean_session}): {outcome:?}");
}

/// The agent's `/v1/status` entry for MQTT subscriber `name`.
async fn subscriber_status(fleet: &Fleet, name: &str) -> anyhow::Result<Value> {
    let client = http_client();
    let reply = runnel_tests::get_path(&client, fleet.agent.http_addr(), "/v1/status").await?;
    anyhow::ensure!(reply.status == 200, "status answered {}", reply.status);
    let status = reply.json();
    status["sources"]["mqtt_subscribers"]
        .as_array()
        .and_then(|subscribers| subscribers.iter().find(|s| s["name"] == name))
        .cloned()
        .with_context(|| format!("no subscriber {name} in {status}"))
}

/// Waits until subscriber `name` has had at least `n_connects` CONNACKs; returns its status.
async fn wait_connects(fleet: &Fleet, name: &str, n_connects: u64) -> Value {
    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    loop {
        let status = subscriber_status(fleet, name).await;
        if let Ok(status) = &status
            && status["n_connects"].as_u64().unwrap_or(0) >= n_connects
        {
            return status.clone();
        }
        if Instant::now() >= deadline {
            panic!(
                "subscriber {name} did not reach {n_connects} connections within \
                 {ARRIVAL_TIMEOUT:?}: {status:?}; agent stderr:\n{}",
                fleet.agent.stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_the_broker_lost_is_counted_and_shown() {
    let mf = start_mqtt_fleet("mqtt-lost-session", AgentOptions::default(), None, "").await;
    let root = mf.root.clone();
    let client_id = format!("{root}-sub");
    wait_subscribed(&mf.fleet, &mf.publisher, &root, &format!("{root}-a")).await;
    let first = wait_connects(&mf.fleet, "sub", 1).await;
    assert_eq!(first["n_sessions_lost"], 0, "{first}");

    // A takeover that keeps the session: the agent reconnects and the broker still has it.
    take_over_client_id(&mf.broker, &client_id, false).await;
    let resumed = wait_connects(&mf.fleet, "sub", 2).await;
    assert_eq!(resumed["session_present"], true, "{resumed}");
    assert_eq!(resumed["n_sessions_lost"], 0, "{resumed}");
    assert!(resumed["warning"].is_null(), "{resumed}");

    // A takeover with a clean session: the broker discards the agent's session.
    take_over_client_id(&mf.broker, &client_id, true).await;
    let lost = wait_connects(&mf.fleet, "sub", 3).await;
    assert_eq!(lost["session_present"], false, "{lost}");
    assert!(lost["n_sessions_lost"].as_u64().unwrap_or(0) >= 1, "{lost}");
    let warning = lost["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("lost this subscriber's persistent session"),
        "{lost}"
    );
    wait_for_metrics(
        mf.fleet.agent.http_addr(),
        &["runnel_agent_mqtt_sessions_lost_total{source=\"sub\"} "],
    )
    .await;
    let text = runnel_tests::get_path(&http_client(), mf.fleet.agent.http_addr(), "/metrics")
        .await
        .expect("metrics");
    let metrics = String::from_utf8_lossy(&text.bytes).into_owned();
    assert!(
        !metrics.contains("runnel_agent_mqtt_sessions_lost_total{source=\"sub\"} 0\n"),
        "{metrics}"
    );

    // The agent subscribed again on the new session, and a device's `ts` in seconds is the
    // event time.
    wait_subscribed(&mf.fleet, &mf.publisher, &root, &format!("{root}-b")).await;
    let id = format!("{root}-ts");
    mf.publisher
        .publish(
            &format!("{root}/yard/meter-1/telemetry"),
            &id,
            json!({"event_id": id, "ts": 1_700_000_000, "kwh": 3}).to_string(),
        )
        .await;
    let query_addr = mf.fleet.aggregator.query_addr();
    wait_count_of(
        &mf.fleet.dir,
        query_addr,
        &format!("SELECT count(*) FROM events WHERE event_id = '{id}'"),
        1,
    )
    .await;
    let events = stored_events(query_addr, &format!("event_id = '{id}'"))
        .await
        .expect("the event");
    assert_eq!(events[0].event_time_ms, 1_700_000_000_000, "{events:?}");
    assert!(events[0].attrs.get("ts").is_none(), "{events:?}");
}
