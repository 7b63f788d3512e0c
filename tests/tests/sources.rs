//! End-to-end tests of the agent's HTTP tracker sources: the Snowplow tracker protocol and the
//! Segment HTTP tracking API, from the fixtures under `agent/tests/fixtures/` to the columns and
//! `attrs` the aggregator answers; and bad input, which gets the documented error or becomes a
//! dead letter while nothing else changes. The real binaries run as processes; every wait polls
//! with a deadline.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;
use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, StoredEvent, binaries, get_path, http_client,
    post_events, post_path, query_count, send, start_fleet_with, stored_events, test_event,
    wait_count_of,
};
use serde_json::{Value, json};

const SNOWPLOW_TP2: &str = "/com.snowplowanalytics.snowplow/tp2";
const SNOWPLOW_CONTENT_TYPE: &str = "application/json; charset=UTF-8";

/// The text of a fixture under `agent/tests/fixtures/`.
fn fixture(relative: &str) -> String {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "..",
        "agent",
        "tests",
        "fixtures",
    ]
    .iter()
    .collect::<PathBuf>()
    .join(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("read fixture {}: {error}", path.display()))
}

fn fixture_json(relative: &str) -> Value {
    serde_json::from_str(&fixture(relative))
        .unwrap_or_else(|error| panic!("fixture {relative} is not JSON: {error}"))
}

/// Stored events keyed by event id (events without one are keyed "NULL:<seq>").
fn by_event_id(events: Vec<StoredEvent>) -> BTreeMap<String, StoredEvent> {
    events
        .into_iter()
        .map(|event| {
            let key = event
                .event_id
                .clone()
                .unwrap_or_else(|| format!("NULL:{}", event.seq));
            (key, event)
        })
        .collect()
}

fn get<'a>(events: &'a BTreeMap<String, StoredEvent>, event_id: &str) -> &'a StoredEvent {
    events.get(event_id).unwrap_or_else(|| {
        panic!(
            "no stored event {event_id}; stored: {:?}",
            events.keys().collect::<Vec<_>>()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snowplow_tracker_events_land_in_columns_and_attrs() {
    let bins = binaries!();
    let fleet = start_fleet_with(
        &bins,
        "snowplow",
        "edge-sp",
        AggregatorOptions::default(),
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let client = http_client();
    let http = fleet.agent.http_addr();

    for name in [
        "post_page_view.json",
        "post_structured.json",
        "post_ue_px.json",
        "post_cx_standard.json",
        "post_cx_urlsafe.json",
    ] {
        let reply = post_path(
            &client,
            http,
            SNOWPLOW_TP2,
            SNOWPLOW_CONTENT_TYPE,
            fixture(&format!("snowplow/{name}")),
        )
        .await
        .unwrap_or_else(|error| panic!("{name}: {error:#}"));
        assert_eq!(reply.status, 200, "{name}: {:?}", reply.json());
        assert_eq!(reply.bytes, b"ok", "{name}: the collector answers `ok`");
    }

    // The pixel GET, on both paths the tracker protocol allows.
    let query_string = fixture("snowplow/get_pixel_ue_pr.txt");
    let query_string = query_string.trim_end();
    let reply = get_path(&client, http, &format!("/i?{query_string}"))
        .await
        .expect("pixel GET /i");
    assert_eq!(reply.status, 200, "{:?}", reply.json());
    assert_eq!(reply.header("content-type"), "image/gif");
    assert!(
        reply.bytes.starts_with(b"GIF89a") || reply.bytes.starts_with(b"GIF87a"),
        "the pixel is a GIF: {:?}",
        reply.bytes
    );
    assert!(
        reply.header("cache-control").contains("no-cache")
            && reply.header("cache-control").contains("no-store"),
        "the pixel is not cached: cache-control {:?}",
        reply.header("cache-control")
    );
    let second_pixel = query_string.replace(
        "eid=7b8c9d0e-1f2a-4b3c-8d4e-5f6a7b8c9d0e",
        "eid=pixel-on-tp2",
    );
    assert_ne!(second_pixel, query_string, "the fixture names its eid");
    let reply = get_path(&client, http, &format!("{SNOWPLOW_TP2}?{second_pixel}"))
        .await
        .expect("pixel GET tp2");
    assert_eq!(reply.status, 200, "{:?}", reply.json());
    assert_eq!(reply.header("content-type"), "image/gif");

    let query_addr = fleet.aggregator.query_addr();
    wait_count_of(
        &fleet.dir,
        query_addr,
        "SELECT count(*) FROM events WHERE source = 'snowplow'",
        7,
    )
    .await;
    let events = by_event_id(
        stored_events(query_addr, "source = 'snowplow'")
            .await
            .expect("stored snowplow events"),
    );
    for event in events.values() {
        assert_eq!(event.agent_id, "edge-sp");
        assert_eq!(
            event.stream, "clickstream",
            "sources.snowplow.stream default: {event:?}"
        );
        // No `ip` in the items (but the structured one): the request's address fills it in.
        if event.event_id.as_deref() != Some("2c0c8a55-0e1f-4a39-b3f4-6a7b8c9d0e1f") {
            assert_eq!(event.attrs["user_ipaddress"], "127.0.0.1", "{event:?}");
        }
        assert_eq!(event.attrs["platform"], "web", "{event:?}");
        for raw_key in [
            "e", "p", "tv", "eid", "uid", "sid", "cx", "ue_px", "ue_pr", "co",
        ] {
            assert!(
                event.attrs.get(raw_key).is_none(),
                "raw parameter {raw_key} left in attrs: {event:?}"
            );
        }
    }

    // pv: identifiers in columns, the device clock's skew (stm - dtm = 5 s) corrected against the
    // agent's receive time, the rest under Snowplow's canonical names.
    let pv = get(&events, "9d1a4a8e-6a0b-4c3e-9a52-2f2b8d6f0c11");
    assert_eq!(pv.name, "page_view");
    assert_eq!(pv.user_id.as_deref(), Some("user-42"));
    assert_eq!(
        pv.session_id.as_deref(),
        Some("0f6c3a2b-7d8e-4f90-a1b2-c3d4e5f60718")
    );
    assert_eq!(pv.event_time_ms, pv.receive_time_ms - 5_000, "{pv:?}");
    assert_eq!(
        pv.attrs["page_url"],
        "https://shop.example.com/products/42?ref=home"
    );
    assert_eq!(pv.attrs["page_title"], "Blue Kettle | Shop");
    assert_eq!(pv.attrs["page_referrer"], "https://www.example.org/");
    assert_eq!(
        pv.attrs["domain_user_id"],
        "5b7e1c2a-3f4d-4e5f-8a9b-0c1d2e3f4a5b"
    );
    assert_eq!(pv.attrs["app_id"], "shop-web");
    assert_eq!(pv.attrs["session_index"], 7);
    assert_eq!(pv.attrs["dvce_created_tstamp"], 1_769_860_790_000_i64);
    assert_eq!(pv.attrs["dvce_sent_tstamp"], 1_769_860_795_000_i64);
    assert!(
        pv.attrs.get("contexts").is_none(),
        "an empty cx is no context: {pv:?}"
    );

    // se: the structured fields, `ttm` as the event time, the item's own ip.
    let se = get(&events, "2c0c8a55-0e1f-4a39-b3f4-6a7b8c9d0e1f");
    assert_eq!(se.name, "structured");
    assert_eq!(se.user_id, None, "duid is not the user id: {se:?}");
    assert_eq!(
        se.session_id.as_deref(),
        Some("0f6c3a2b-7d8e-4f90-a1b2-c3d4e5f60718")
    );
    assert_eq!(se.event_time_ms, 1_769_860_799_000);
    assert_eq!(se.attrs["category"], "checkout");
    assert_eq!(se.attrs["action"], "add_to_cart");
    assert_eq!(se.attrs["label"], "kettle-blue");
    assert_eq!(se.attrs["property"], "sku-1042");
    assert_eq!(se.attrs["value"], 39.99);
    assert_eq!(se.attrs["user_ipaddress"], "203.0.113.9");
    assert_eq!(se.attrs["useragent"], "Mozilla/5.0 (X11; Linux x86_64)");

    // ue with ue_px: the self-describing event's name, schema and data.
    let ue = get(&events, "4e5f6a7b-8c9d-4e0f-a1b2-c3d4e5f6a7b8");
    assert_eq!(ue.name, "link_click");
    assert_eq!(ue.user_id.as_deref(), Some("user-42"));
    assert_eq!(ue.event_time_ms, 1_769_860_810_000, "only dtm: {ue:?}");
    assert_eq!(
        ue.attrs["event_schema"],
        "iglu:com.acme/link_click/jsonschema/1-0-0"
    );
    assert_eq!(
        ue.attrs["event"],
        json!({"targetUrl": "https://shop.example.com/sale", "elementId": "banner-1"})
    );

    // cx in standard (padded) and URL-safe unpadded base64: the same entities.
    for (event_id, expected) in [
        ("a1", "snowplow/cx_standard.expected.json"),
        ("a2", "snowplow/cx_urlsafe.expected.json"),
    ] {
        let event = get(&events, event_id);
        assert_eq!(event.name, "page_view");
        assert_eq!(
            event.attrs["contexts"],
            fixture_json(expected),
            "{event_id}: {event:?}"
        );
    }

    // The pixel: ue_pr and co as JSON in the query string.
    for event_id in ["7b8c9d0e-1f2a-4b3c-8d4e-5f6a7b8c9d0e", "pixel-on-tp2"] {
        let pixel = get(&events, event_id);
        assert_eq!(pixel.name, "newsletter_signup", "{pixel:?}");
        assert_eq!(pixel.user_id.as_deref(), Some("jane@example.com"));
        assert_eq!(
            pixel.session_id.as_deref(),
            Some("0f6c3a2b-7d8e-4f90-a1b2-c3d4e5f60718")
        );
        assert_eq!(pixel.event_time_ms, pixel.receive_time_ms - 5_000);
        assert_eq!(
            pixel.attrs["event"],
            json!({"list": "weekly deals", "source": "footer"})
        );
        assert_eq!(
            pixel.attrs["contexts"],
            json!([{"schema": "iglu:com.acme/experiment/jsonschema/1-0-0", "data": {"variant": "b"}}])
        );
        assert_eq!(
            pixel.attrs["page_url"],
            "https://shop.example.com/news?a=1&b=2"
        );
        assert_eq!(pixel.attrs["page_title"], "News & Offers");
        assert_eq!(pixel.attrs["cv"], "clj-1.1.0-tom-0.2.0");
    }

    assert_eq!(
        query_count(query_addr, "SELECT count(*) FROM events")
            .await
            .expect("count"),
        7,
        "nothing but the seven tracker events is stored"
    );
}

/// `Authorization: Basic base64(<write key>:)`, as Segment's libraries send it.
fn basic(write_key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_calls_land_in_columns_and_attrs_and_write_keys_are_checked() {
    let bins = binaries!();
    let extra = AgentExtra {
        toml: "[sources.segment]\nwrite_keys = [\"wk-server\", \"wk-batch\"]\n".to_owned(),
        ..AgentExtra::default()
    };
    let fleet = start_fleet_with(
        &bins,
        "segment",
        "edge-seg",
        AggregatorOptions::default(),
        AgentOptions::default(),
        &extra,
    );
    let client = http_client();
    let http = fleet.agent.http_addr();
    let url = |call: &str| format!("http://{http}/v1/{call}");

    // Wrong or missing write keys first: 401, and nothing of them is stored (checked below by
    // the sequence numbers of what follows).
    let track = fixture("segment/track.json");
    for (what, request) in [
        (
            "wrong Basic auth key",
            client
                .post(url("track"))
                .header("authorization", basic("wk-wrong"))
                .header("content-type", "application/json")
                .body(track.clone()),
        ),
        (
            "no key at all",
            client
                .post(url("track"))
                .header("content-type", "application/json")
                .body(track.clone()),
        ),
        (
            "wrong key in the body",
            client
                .post(url("batch"))
                .header("content-type", "application/json")
                .body(fixture("segment/batch.json").replace("wk-batch", "wk-other")),
        ),
    ] {
        let reply = send(request).await.expect(what);
        assert_eq!(reply.status, 401, "{what}: {:?}", reply.json());
        assert!(
            reply.error().contains("write key"),
            "{what}: the reason names the write key: {:?}",
            reply.json()
        );
    }

    for (call, body) in [
        ("track", track.clone()),
        ("identify", fixture("segment/identify.json")),
    ] {
        let reply = send(
            client
                .post(url(call))
                .header("authorization", basic("wk-server"))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
        .expect(call);
        assert_eq!(reply.status, 200, "{call}: {:?}", reply.json());
        assert_eq!(reply.json(), json!({"success": true}), "{call}");
    }
    // The batch carries its write key in the body.
    let reply = post_path(
        &client,
        http,
        "/v1/batch",
        "application/json",
        fixture("segment/batch.json"),
    )
    .await
    .expect("batch");
    assert_eq!(reply.status, 200, "batch: {:?}", reply.json());

    // Five events took sequence numbers 1..=5: the refused requests took none.
    let outcome = post_events(&client, http, &[test_event("after-segment")])
        .await
        .expect("post a generic event");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    assert_eq!(
        outcome.body["first_seq"], 6,
        "refused requests consumed sequence numbers: {}",
        outcome.body
    );

    let query_addr = fleet.aggregator.query_addr();
    wait_count_of(&fleet.dir, query_addr, "SELECT count(*) FROM events", 6).await;
    let events = by_event_id(
        stored_events(query_addr, "source = 'segment'")
            .await
            .expect("stored segment events"),
    );
    assert_eq!(events.len(), 5, "{:?}", events.keys().collect::<Vec<_>>());
    for event in events.values() {
        assert_eq!(event.stream, "clickstream", "{event:?}");
        assert!(
            !event.attrs.to_string().contains("wk-"),
            "a write key was stored: {event:?}"
        );
        assert!(
            event.attrs["received_at"].is_string(),
            "received_at: {event:?}"
        );
    }

    let track = get(&events, "msg-track-1");
    assert_eq!(track.name, "Order Completed");
    assert_eq!(track.user_id.as_deref(), Some("u-42"));
    assert_eq!(
        track.session_id.as_deref(),
        Some("sess-7"),
        "context.sessionId wins"
    );
    assert_eq!(
        track.event_time_ms, 1_769_860_798_250,
        "an explicit timestamp is the event time"
    );
    assert_eq!(track.attrs["type"], "track");
    assert_eq!(track.attrs["anonymous_id"], "anon-1");
    assert_eq!(
        track.attrs["properties"],
        json!({"revenue": 39.95, "currency": "EUR", "session_id": "not-used-context-wins"})
    );
    assert_eq!(
        track.attrs["context"]["library"],
        json!({"name": "analytics-python", "version": "2.3.2"})
    );
    assert_eq!(
        track.attrs["integrations"],
        json!({"All": true, "Mixpanel": false})
    );
    assert_eq!(track.attrs["channel"], "server");

    let identify = get(&events, "msg-identify-1");
    assert_eq!(identify.name, "identify");
    assert_eq!(identify.user_id.as_deref(), Some("1234"), "numeric userId");
    assert_eq!(identify.session_id, None);
    // sentAt - originalTimestamp = 5.5 s before the agent received it.
    assert_eq!(identify.event_time_ms, identify.receive_time_ms - 5_500);
    assert_eq!(
        identify.attrs["traits"],
        json!({"email": "ada@example.com", "plan": "pro", "address": {"city": "London"}})
    );
    assert_eq!(
        identify.attrs["original_timestamp"],
        "2026-01-31T11:00:00.000Z"
    );

    // The batch: top-level context and integrations merged into each item, item keys winning.
    let signed_up = get(&events, "b-1");
    assert_eq!(signed_up.name, "Signed Up");
    assert_eq!(signed_up.user_id.as_deref(), Some("u-1"));
    assert_eq!(signed_up.session_id.as_deref(), Some("sess-batch"));
    assert_eq!(signed_up.event_time_ms, signed_up.receive_time_ms - 3_000);
    assert_eq!(
        signed_up.attrs["context"],
        json!({"library": {"name": "analytics-node", "version": "6.0.0"}, "ip": "198.51.100.1", "sessionId": "sess-batch"})
    );
    assert_eq!(
        signed_up.attrs["integrations"],
        json!({"All": false, "Amplitude": true})
    );
    assert_eq!(signed_up.attrs["properties"], json!({"plan": "pro"}));

    let batch_identify = get(&events, "b-2");
    assert_eq!(batch_identify.name, "identify");
    assert_eq!(batch_identify.user_id.as_deref(), Some("anon-2"));
    assert_eq!(batch_identify.session_id.as_deref(), Some("sess-batch"));
    assert_eq!(batch_identify.event_time_ms, 1_769_846_400_000);
    assert_eq!(
        batch_identify.attrs["context"],
        json!({"library": {"name": "analytics-node", "version": "6.0.0"}, "ip": "192.0.2.44", "locale": "fr-FR", "sessionId": "sess-batch"})
    );
    assert_eq!(batch_identify.attrs["traits"], json!({"name": "Grace"}));

    let screen = events
        .values()
        .find(|event| event.name == "screen")
        .unwrap_or_else(|| panic!("no screen event: {events:?}"));
    assert_eq!(screen.event_id, None, "the screen item has no messageId");
    assert_eq!(screen.user_id.as_deref(), Some("u-3"));
    assert_eq!(screen.attrs["screen_name"], "Home");
    assert_eq!(
        screen.attrs["integrations"],
        json!({"All": false, "Amplitude": false})
    );
    assert_eq!(screen.event_time_ms, screen.receive_time_ms - 2_500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tracker_input_gets_errors_or_dead_letters_and_nothing_else_changes() {
    let bins = binaries!();
    let fleet = start_fleet_with(
        &bins,
        "bad-tracker-input",
        "edge-bad",
        AggregatorOptions::default(),
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let client = http_client();
    let http = fleet.agent.http_addr();

    // Request-level problems: 400 with a reason, nothing stored.
    let not_utf8: Vec<u8> = b"{\"userId\":\"u\",\"event\":\"\xff\xfe\"}".to_vec();
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "snowplow: not JSON",
            SNOWPLOW_TP2,
            fixture("snowplow/bad_body_not_json.txt").into_bytes(),
            "invalid JSON",
        ),
        (
            "snowplow: wrong payload_data schema",
            SNOWPLOW_TP2,
            fixture("snowplow/bad_body_wrong_schema.json").into_bytes(),
            "schema",
        ),
        (
            "snowplow: array body",
            SNOWPLOW_TP2,
            fixture("snowplow/bad_body_array.json").into_bytes(),
            "expected a JSON object",
        ),
        (
            "snowplow: no data",
            SNOWPLOW_TP2,
            fixture("snowplow/bad_body_no_data.json").into_bytes(),
            "data",
        ),
        (
            "snowplow: empty data",
            SNOWPLOW_TP2,
            fixture("snowplow/bad_body_empty_data.json").into_bytes(),
            "no events",
        ),
        (
            "segment: invalid JSON",
            "/v1/track",
            fixture("segment/bad_not_json.txt").into_bytes(),
            "invalid JSON",
        ),
        (
            "segment: truncated JSON",
            "/v1/track",
            br#"{"userId": "u-1", "event": "Order"#.to_vec(),
            "invalid JSON",
        ),
        ("segment: non-UTF-8", "/v1/track", not_utf8, ""),
        (
            "segment: no user ids",
            "/v1/track",
            fixture("segment/bad_no_user_ids.json").into_bytes(),
            "userId",
        ),
        (
            "segment: track without event",
            "/v1/track",
            fixture("segment/bad_track_without_event.json").into_bytes(),
            "event",
        ),
        (
            "segment: unknown type in a batch",
            "/v1/batch",
            fixture("segment/bad_unknown_type.json").into_bytes(),
            "unknown type",
        ),
        (
            "segment: batch item over 32 KB",
            "/v1/batch",
            fixture("segment/bad_batch_item_over_32kb.json").into_bytes(),
            "32 KB",
        ),
    ];
    for (what, path, body, expected_reason) in cases {
        let reply = post_path(&client, http, path, "application/json", body)
            .await
            .unwrap_or_else(|error| panic!("{what}: {error:#}"));
        eprintln!("{what}: HTTP {} {:?}", reply.status, reply.json());
        assert_eq!(reply.status, 400, "{what}: {:?}", reply.json());
        let reason = reply.error();
        assert!(!reason.trim().is_empty(), "{what}: 400 without a reason");
        assert!(
            reason.contains(expected_reason),
            "{what}: reason {reason:?} does not mention {expected_reason:?}"
        );
    }
    let reply = get_path(&client, http, "/i?e=pv&p=web&tv=js-3&url=%zz")
        .await
        .expect("pixel with a bad escape");
    assert_eq!(reply.status, 400, "{:?}", reply.json());
    assert!(
        reply.error().contains("percent-escape"),
        "{:?}",
        reply.json()
    );

    // One request whose items are partly bad: the good item is stored normally, each bad one
    // (no `e`, invalid base64 in `cx`, broken JSON in `ue_pr`) as a dead letter with its reason.
    let reply = post_path(
        &client,
        http,
        SNOWPLOW_TP2,
        SNOWPLOW_CONTENT_TYPE,
        fixture("snowplow/post_bad_items.json"),
    )
    .await
    .expect("post bad items");
    assert_eq!(reply.status, 200, "{:?}", reply.json());

    // Four events took sequence numbers 1..=4: none of the refused requests took any.
    let outcome = post_events(&client, http, &[test_event("after-bad-input")])
        .await
        .expect("post a generic event");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    assert_eq!(
        outcome.body["first_seq"], 5,
        "refused requests consumed sequence numbers: {}",
        outcome.body
    );

    let query_addr = fleet.aggregator.query_addr();
    wait_count_of(&fleet.dir, query_addr, "SELECT count(*) FROM events", 5).await;
    assert_eq!(
        query_count(
            query_addr,
            "SELECT count(*) FROM events WHERE stream = 'dead_letters'"
        )
        .await
        .expect("count dead letters"),
        3
    );
    let good = stored_events(query_addr, "stream <> 'dead_letters'")
        .await
        .expect("good events");
    let good_ids: Vec<Option<&str>> = good.iter().map(|e| e.event_id.as_deref()).collect();
    assert_eq!(
        good_ids,
        vec![Some("good-1"), Some("after-bad-input")],
        "{good:?}"
    );
    assert_eq!(good[0].name, "page_view");
    assert_eq!(good[0].source, "snowplow");
    assert_eq!(good[0].event_time_ms, 1_769_860_850_000);

    let dead = stored_events(query_addr, "stream = 'dead_letters'")
        .await
        .expect("dead letters");
    let items = fixture_json("snowplow/post_bad_items.json")["data"].clone();
    let expected = [
        (0, "missing required parameter `e`"),
        (2, "parameter `cx` is not base64"),
        (3, "parameter `ue_pr` is not JSON"),
    ];
    assert_eq!(dead.len(), expected.len(), "{dead:?}");
    for (event, (item_idx, reason)) in dead.iter().zip(expected) {
        assert_eq!(event.source, "snowplow", "{event:?}");
        assert_eq!(event.name, "dead_letter", "{event:?}");
        let stored_reason = event.attrs["reason"].as_str().unwrap_or_default();
        assert!(
            stored_reason.starts_with(reason),
            "dead letter of item {item_idx}: reason {stored_reason:?}, expected {reason:?}"
        );
        let raw: Value = serde_json::from_str(event.attrs["raw"].as_str().unwrap_or_default())
            .unwrap_or_else(|error| panic!("raw of item {item_idx} is not JSON text: {error}"));
        assert_eq!(raw, items[item_idx], "the raw item is kept");
        assert_eq!(event.event_time_ms, event.receive_time_ms);
    }
}
