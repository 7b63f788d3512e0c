//! End-to-end acceptance tests: the real agent and aggregator binaries, talking QUIC with mutual
//! TLS, checked through the aggregator's SQL API. Each test owns a temp directory and ports the OS
//! picked; every wait polls with a deadline.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use runnel_tests::load::{Body, EVENTS_PATH, LoadConfig};
use runnel_tests::{
    ARRIVAL_TIMEOUT, AgentExtra, AgentOptions, AgentProcess, AggregatorOptions, Certs, Fleet, Load,
    TestDir, Uplink, assert_no_duplicates, binaries, http_client, post_body, post_events, query,
    query_count, query_rows, start_fleet_with, test_event, wait_all_stored, wait_count_of,
};
use serde_json::Value;

/// The aggregator and one agent (`edge-1`) of a fresh fleet.
fn start_fleet(
    test_name: &str,
    aggregator_options: AggregatorOptions,
    agent_options: AgentOptions,
) -> Fleet {
    start_fleet_with(
        &binaries!(),
        test_name,
        "edge-1",
        aggregator_options,
        agent_options,
        &AgentExtra::default(),
    )
}

/// Waits until `SELECT count(*) FROM events` is exactly `n_expected` (failing early when it
/// overshoots: that is a duplicate).
async fn wait_count(dir: &TestDir, query_addr: std::net::SocketAddr, n_expected: u64) {
    wait_count_of(dir, query_addr, "SELECT count(*) FROM events", n_expected).await;
}

/// Encodes `events` as one of the body shapes the HTTP source accepts, chosen by `shape`.
fn encode_body(events: &[Value], shape: usize) -> String {
    match (events.len(), shape % 3) {
        (1, 0) => events[0].to_string(),
        (_, 1) => events
            .iter()
            .map(|event| format!("{event}\n"))
            .collect::<String>(),
        _ => Value::Array(events.to_vec()).to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_events_arrive_exactly_once() {
    const N_EVENTS: usize = 10_000;
    const N_CLIENTS: usize = 50;
    let fleet = start_fleet(
        "ten-thousand",
        AggregatorOptions::default(),
        AgentOptions::default(),
    );

    // Requests of 1 to 100 events in all three body shapes, shared out to the clients.
    let mut requests: Vec<Vec<Value>> = Vec::new();
    let mut event_idx = 0;
    while event_idx < N_EVENTS {
        let n = fastrand::usize(1..=100).min(N_EVENTS - event_idx);
        requests.push(
            (event_idx..event_idx + n)
                .map(|i| test_event(&format!("ev-{i}")))
                .collect(),
        );
        event_idx += n;
    }
    let n_requests = requests.len();
    let bodies: Vec<Body> = requests
        .iter()
        .enumerate()
        .map(|(request_idx, events)| Body {
            json: encode_body(events, request_idx),
            n_events: events.len(),
        })
        .collect();
    let load = Load::start_with(
        fleet.agent.http_addr(),
        LoadConfig::bodies(N_CLIENTS, EVENTS_PATH, Arc::new(bodies)),
    );
    let report = load.finish().await;
    assert_eq!(
        report.counts.n_events_acked, N_EVENTS as u64,
        "events acknowledged over {n_requests} requests"
    );

    let query_addr = fleet.aggregator.query_addr();
    wait_count(&fleet.dir, query_addr, N_EVENTS as u64).await;
    assert_no_duplicates(query_addr).await;
    let n_ids = query_count(
        query_addr,
        "SELECT count(DISTINCT event_id) FROM events WHERE agent_id = 'edge-1' AND event_id LIKE 'ev-%'",
    )
    .await
    .expect("count distinct ids");
    assert_eq!(n_ids, N_EVENTS as u64);
    let max_seq = query_count(query_addr, "SELECT max(seq) FROM events")
        .await
        .expect("max seq");
    assert_eq!(
        max_seq, N_EVENTS as u64,
        "sequence numbers are 1..=N without gaps"
    );

    // Fields arrive where the event model puts them.
    let row = query(
        query_addr,
        "SELECT agent_id, source, stream, name, user_id, session_id, score, attrs FROM events WHERE event_id = 'ev-42'",
    )
    .await
    .expect("one event");
    assert_eq!(row["n_rows"], 1, "{row}");
    let values = &row["rows"][0];
    assert_eq!(values[0], "edge-1", "{row}");
    assert_eq!(values[3], "page_view", "{row}");
    assert_eq!(values[5], "s-1", "{row}");
    let attrs: Value =
        serde_json::from_str(values[7].as_str().expect("attrs is text")).expect("attrs is JSON");
    assert_eq!(attrs["url"], "/products/ev-42", "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_both_keeps_counts_without_duplicates() {
    const N_FIRST: usize = 500;
    const N_SECOND: usize = 300;
    let aggregator_options = AggregatorOptions {
        // Flush to Parquet during the test, so counts span files and recent rows.
        flush_interval_ms: 500,
        ..AggregatorOptions::default()
    };
    let mut fleet = start_fleet("restart-both", aggregator_options, AgentOptions::default());
    let client = http_client();

    let first: Vec<Value> = (0..N_FIRST)
        .map(|i| test_event(&format!("a-{i}")))
        .collect();
    for chunk in first.chunks(50) {
        let outcome = post_events(&client, fleet.agent.http_addr(), chunk)
            .await
            .expect("post");
        assert_eq!(outcome.status, 200, "{}", outcome.body);
    }
    wait_count(&fleet.dir, fleet.aggregator.query_addr(), N_FIRST as u64).await;

    fleet.agent.stop();
    fleet.aggregator.stop();
    fleet.aggregator.restart();
    fleet.agent.restart();

    // What was stored before the restart is still there, once.
    let query_addr = fleet.aggregator.query_addr();
    wait_count(&fleet.dir, query_addr, N_FIRST as u64).await;

    let second: Vec<Value> = (0..N_SECOND)
        .map(|i| test_event(&format!("b-{i}")))
        .collect();
    for chunk in second.chunks(30) {
        let outcome = post_events(&client, fleet.agent.http_addr(), chunk)
            .await
            .expect("post");
        assert_eq!(outcome.status, 200, "{}", outcome.body);
    }
    wait_count(&fleet.dir, query_addr, (N_FIRST + N_SECOND) as u64).await;
    assert_no_duplicates(query_addr).await;
    let max_seq = query_count(query_addr, "SELECT max(seq) FROM events")
        .await
        .expect("max seq");
    assert_eq!(
        max_seq,
        (N_FIRST + N_SECOND) as u64,
        "the agent continues its sequence after a restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_sigkill_loses_no_acknowledged_event() {
    let agent_options = AgentOptions {
        // This test is about durability: the shipped default.
        synchronous: "full",
        ..AgentOptions::default()
    };
    let mut fleet = start_fleet("agent-sigkill", AggregatorOptions::default(), agent_options);
    let query_addr = fleet.aggregator.query_addr();

    let load = Load::start(fleet.agent.http_addr(), 8, "k", false);
    fleet
        .dir
        .wait_until(
            ARRIVAL_TIMEOUT,
            "clients got 2000 events acknowledged and some are stored",
            || {
                let n_acked = load.n_acked();
                async move {
                    let n_stored = query_count(query_addr, "SELECT count(*) FROM events").await?;
                    anyhow::ensure!(
                        n_acked >= 2000 && n_stored > 0,
                        "{n_acked} acknowledged, {n_stored} stored"
                    );
                    Ok(())
                }
            },
        )
        .await;
    fleet.agent.kill_hard();
    let report = load.stop().await;
    let n_stored_at_kill = query_count(query_addr, "SELECT count(*) FROM events")
        .await
        .expect("count");
    eprintln!(
        "agent killed: {} events acknowledged, {n_stored_at_kill} stored; clients saw: {:?}",
        report.acked.len(),
        report.counts
    );

    fleet.agent.restart();
    wait_all_stored(&fleet.dir, query_addr, "k-", &report.acked).await;
    assert_no_duplicates(query_addr).await;

    // The restarted agent takes and ships new events too.
    let outcome = post_events(
        &http_client(),
        fleet.agent.http_addr(),
        &[test_event("after-restart")],
    )
    .await
    .expect("post after restart");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    wait_all_stored(
        &fleet.dir,
        query_addr,
        "after-restart",
        &BTreeSet::from(["after-restart".to_owned()]),
    )
    .await;
    assert_no_duplicates(query_addr).await;
}

/// Agent and aggregator both speak protocol 3, so batches travel in the second column-wise
/// layout (`Compression::ZstdColumns2`, stored as code 3 in the WAL), and a SIGKILL of the
/// aggregator replays them from the WAL exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_batches_are_stored_and_replayed_after_sigkill() {
    const N: usize = 400;
    // No flush during the test: every batch stays in the WAL until the kill.
    let mut fleet = start_fleet(
        "column-batches",
        AggregatorOptions::default(),
        AgentOptions::default(),
    );
    let client = http_client();
    let events: Vec<Value> = (0..N).map(|i| test_event(&format!("c-{i}"))).collect();
    for chunk in events.chunks(40) {
        let outcome = post_events(&client, fleet.agent.http_addr(), chunk)
            .await
            .expect("post");
        assert_eq!(outcome.status, 200, "{}", outcome.body);
    }
    wait_count(&fleet.dir, fleet.aggregator.query_addr(), N as u64).await;
    let wal = rusqlite::Connection::open_with_flags(
        fleet.dir.join("aggregator/data/wal.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the aggregator's WAL");
    let codes: Vec<(i64, i64)> = wal
        .prepare("SELECT compression, sum(n_events) FROM batches GROUP BY compression")
        .and_then(|mut statement| {
            statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect()
        })
        .expect("read the WAL's batches");
    drop(wal);
    assert_eq!(
        codes,
        vec![(3, N as i64)],
        "(compression code, events) in the WAL"
    );

    fleet.aggregator.kill_hard();
    fleet.aggregator.restart();
    let query_addr = fleet.aggregator.query_addr();
    wait_count(&fleet.dir, query_addr, N as u64).await;
    assert_no_duplicates(query_addr).await;
    let rows = query_rows(
        query_addr,
        "SELECT event_id, user_id, session_id, json_get_str(attrs, 'url') FROM events \
         WHERE event_id = 'c-7'",
    )
    .await
    .expect("query");
    assert_eq!(
        rows,
        vec![vec![
            Value::from("c-7"),
            Value::from("user-3"),
            Value::from("s-1"),
            Value::from("/products/c-7"),
        ]],
        "fields survive the column layout and the replay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aggregator_sigkill_and_restart_loses_nothing() {
    let aggregator_options = AggregatorOptions {
        synchronous: "full",
        flush_interval_ms: 500,
        ..AggregatorOptions::default()
    };
    let mut fleet = start_fleet(
        "aggregator-sigkill",
        aggregator_options,
        AgentOptions::default(),
    );
    let query_addr = fleet.aggregator.query_addr();

    // The agent stays up throughout, so clients retry transport errors instead of stopping.
    let load = Load::start(fleet.agent.http_addr(), 8, "g", true);
    fleet
        .dir
        .wait_until(
            ARRIVAL_TIMEOUT,
            "1000 events are stored while clients keep posting",
            || async move {
                let n_stored = query_count(query_addr, "SELECT count(*) FROM events").await?;
                anyhow::ensure!(n_stored >= 1000, "{n_stored} stored");
                Ok(())
            },
        )
        .await;
    fleet.aggregator.kill_hard();
    let n_acked_at_kill = load.n_acked();

    // The agent keeps taking events while the aggregator is down: its buffer holds them.
    fleet
        .dir
        .wait_until(
            ARRIVAL_TIMEOUT,
            "the agent acknowledges 1000 more events while the aggregator is down",
            || {
                let n_acked = load.n_acked();
                async move {
                    anyhow::ensure!(
                        n_acked >= n_acked_at_kill + 1000,
                        "{n_acked} acknowledged, {n_acked_at_kill} at the kill"
                    );
                    Ok(())
                }
            },
        )
        .await;

    fleet.aggregator.restart();
    let query_addr = fleet.aggregator.query_addr();
    let n_acked_at_restart = load.n_acked();
    fleet
        .dir
        .wait_until(
            ARRIVAL_TIMEOUT,
            "events flow again after the restart",
            || {
                let target = n_acked_at_restart as u64;
                async move {
                    let n_stored = query_count(query_addr, "SELECT count(*) FROM events").await?;
                    anyhow::ensure!(
                        n_stored >= target,
                        "{n_stored} stored, waiting for {target}"
                    );
                    Ok(())
                }
            },
        )
        .await;
    let report = load.stop().await;
    eprintln!(
        "{} events acknowledged; clients saw: {:?}",
        report.acked.len(),
        report.counts
    );
    fleet.agent.assert_running();

    wait_all_stored(&fleet.dir, query_addr, "g-", &report.acked).await;
    assert_no_duplicates(query_addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_or_missing_certificate_is_refused() {
    let bins = binaries!();
    let fleet = start_fleet(
        "foreign-cert",
        AggregatorOptions::default(),
        AgentOptions::default(),
    );
    let query_addr = fleet.aggregator.query_addr();

    // An agent whose certificate another CA signed; it trusts the real server, so only its own
    // certificate can be the reason it is refused.
    let foreign = Certs::init(&fleet.dir.join("foreign-certs"));
    let intruder_cert = foreign.issue_agent("intruder");
    let uplink = Uplink {
        aggregator: fleet.aggregator.ingest_addr(),
        ca_cert: fleet.certs.ca_cert.clone(),
    };
    let mut intruder = AgentProcess::start(
        &bins,
        &fleet.dir,
        "agent-intruder",
        &intruder_cert,
        &uplink,
        AgentOptions::default(),
    );
    let client = http_client();
    let intruder_events: Vec<Value> = (0..10)
        .map(|i| test_event(&format!("intruder-{i}")))
        .collect();
    let outcome = post_events(&client, intruder.http_addr(), &intruder_events)
        .await
        .expect("post to intruder");
    assert_eq!(
        outcome.status, 200,
        "the intruder's own buffer takes events: {}",
        outcome.body
    );

    let good_events: Vec<Value> = (0..10).map(|i| test_event(&format!("good-{i}"))).collect();
    let outcome = post_events(&client, fleet.agent.http_addr(), &good_events)
        .await
        .expect("post to edge-1");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    wait_count(&fleet.dir, query_addr, 10).await;

    fleet
        .dir
        .wait_until(
            Duration::from_secs(30),
            "the aggregator logs why it refused the intruder",
            || {
                let stderr = fleet.aggregator.stderr();
                async move {
                    // Every `certs init` CA has a unique name, so rustls says the issuer is unknown.
                    anyhow::ensure!(
                        stderr.lines().any(|line| line.contains("refused")
                            && line.contains("invalid peer certificate")
                            && line.contains("UnknownIssuer")),
                        "no stderr line says the connection was refused for an unknown issuer"
                    );
                    Ok(())
                }
            },
        )
        .await;
    fleet
        .dir
        .wait_until(
            Duration::from_secs(30),
            "the intruder logs that its connection failed",
            || {
                let stderr = intruder.stderr();
                async move {
                    anyhow::ensure!(stderr.contains("uplink connection failed"), "not yet");
                    Ok(())
                }
            },
        )
        .await;
    intruder.assert_running();

    // A client without any certificate.
    let outcome =
        connect_without_client_certificate(&fleet.certs, fleet.aggregator.ingest_addr()).await;
    eprintln!("client without certificate: {outcome}");
    fleet
        .dir
        .wait_until(
            Duration::from_secs(30),
            "the aggregator logs the client without certificate",
            || {
                let stderr = fleet.aggregator.stderr();
                async move {
                    anyhow::ensure!(
                        stderr.lines().any(|line| line.contains("refused") && line.contains("no certificates")),
                        "no stderr line says the connection was refused because the peer sent no certificates"
                    );
                    Ok(())
                }
            },
        )
        .await;

    let n_intruder = query_count(
        query_addr,
        "SELECT count(*) FROM events WHERE agent_id = 'intruder' OR event_id LIKE 'intruder-%'",
    )
    .await
    .expect("count intruder events");
    assert_eq!(
        n_intruder, 0,
        "events of an agent with a foreign certificate were stored"
    );
    assert_eq!(
        query_count(query_addr, "SELECT count(*) FROM events")
            .await
            .expect("count"),
        10
    );
}

/// Connects with the fleet CA as trust root but no client certificate, then tries the agent's
/// first exchange (Hello on a new stream, read the answer). Panics if that exchange succeeds or
/// the aggregator only goes silent instead of closing the connection; returns what happened.
async fn connect_without_client_certificate(certs: &Certs, ingest: std::net::SocketAddr) -> String {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&certs.ca_cert).expect("read CA") {
        roots.add(cert.expect("parse CA")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![runnel_common::wire::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("idle timeout"),
    ));
    client_config.transport_config(Arc::new(transport));
    let mut endpoint =
        quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).expect("client endpoint");
    endpoint.set_default_client_config(client_config);

    let connection = match endpoint
        .connect(ingest, "localhost")
        .expect("start connect")
        .await
    {
        Err(error) => return format!("handshake failed: {error}"),
        Ok(connection) => connection,
    };
    let hello = runnel_common::wire::AgentMessage::Hello(runnel_common::wire::Hello {
        min_protocol_version: runnel_common::wire::MIN_PROTOCOL_VERSION,
        max_protocol_version: runnel_common::wire::PROTOCOL_VERSION,
        agent_version: "test".to_owned(),
        config_hash: String::new(),
        labels: Default::default(),
        last_assigned_seq: 0,
    });
    let frame =
        runnel_common::frame::encode(&hello, runnel_common::limits::MAX_CONTROL_FRAME_BYTES)
            .expect("encode hello");
    let exchange = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&frame).await?;
        let mut prefix = [0u8; runnel_common::frame::LENGTH_PREFIX_BYTES];
        recv.read_exact(&mut prefix).await?;
        anyhow::Ok(prefix)
    };
    match tokio::time::timeout(Duration::from_secs(20), exchange).await {
        Ok(Ok(prefix)) => {
            panic!("a client without certificate got an answer from the aggregator: {prefix:?}")
        }
        Ok(Err(error)) => {
            let reason = connection.close_reason();
            assert!(
                !matches!(reason, Some(quinn::ConnectionError::TimedOut) | None),
                "the aggregator did not close the connection of a client without certificate: {error:#}, close reason {reason:?}"
            );
            format!("connection closed: {error:#} (close reason {reason:?})")
        }
        Err(_) => panic!(
            "the aggregator neither answered nor closed the connection of a client without certificate"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_errors() {
    let agent_options = AgentOptions {
        max_body_bytes: Some(16 * 1024),
        max_event_bytes: Some(1024),
        ..AgentOptions::default()
    };
    let fleet = start_fleet("malformed", AggregatorOptions::default(), agent_options);
    let client = http_client();
    let http = fleet.agent.http_addr();

    let big_attr = "x".repeat(4096);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "truncated JSON",
            r#"{"event_id": "bad-1", "name":"#.to_owned(),
            400,
            "invalid JSON",
        ),
        ("empty body", String::new(), 400, "empty body"),
        (
            "not an object",
            r#"[{"event_id": "bad-2"}, 3]"#.to_owned(),
            400,
            "expected a JSON object",
        ),
        (
            "bare string",
            r#""hello""#.to_owned(),
            400,
            "expected a JSON object",
        ),
        (
            "wrong field type",
            r#"{"event_id": "bad-3", "score": "high"}"#.to_owned(),
            400,
            "score",
        ),
        (
            "bad time",
            r#"{"event_id": "bad-4", "timestamp": "yesterday"}"#.to_owned(),
            400,
            "timestamp",
        ),
        (
            "NDJSON with a broken line",
            "{\"event_id\": \"bad-5\"}\n{\"event_id\": \n".to_owned(),
            400,
            "invalid JSON",
        ),
        (
            "event over max_event_bytes",
            format!(r#"{{"event_id": "bad-6", "blob": "{big_attr}"}}"#),
            413,
            "max_event_bytes",
        ),
        (
            "body over max_body_bytes",
            format!(
                "[{}]",
                vec![format!(r#"{{"event_id": "bad-7", "a": "{}"}}"#, "y".repeat(500)); 64]
                    .join(",")
            ),
            413,
            "sources.http.max_body_bytes",
        ),
    ];
    for (what, body, expected_status, expected_reason) in cases {
        let outcome = post_body(&client, http, body)
            .await
            .unwrap_or_else(|error| panic!("{what}: {error:#}"));
        eprintln!("{what}: HTTP {} {}", outcome.status, outcome.body);
        assert_eq!(outcome.status, expected_status, "{what}: {}", outcome.body);
        let reason = match &outcome.body {
            Value::Object(object) => object
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{what}: answer has no \"error\": {}", outcome.body))
                .to_owned(),
            Value::String(text) => text.clone(),
            other => panic!("{what}: unexpected answer {other}"),
        };
        assert!(!reason.trim().is_empty(), "{what}: empty reason");
        assert!(
            reason.contains(expected_reason),
            "{what}: reason {reason:?} does not mention {expected_reason:?}"
        );
        if expected_status == 400 {
            assert!(
                outcome.body.get("error").is_some(),
                "{what}: 400 without a JSON error: {}",
                outcome.body
            );
        }
    }

    // Nothing of the rejected requests is stored: events ship in sequence order, so once a good
    // event sent afterwards is stored, anything accepted before it would be too.
    let outcome = post_events(&client, http, &[test_event("good-after")])
        .await
        .expect("post good event");
    assert_eq!(outcome.status, 200, "{}", outcome.body);
    assert_eq!(
        outcome.body["first_seq"], 1,
        "rejected requests consumed sequence numbers: {}",
        outcome.body
    );
    let query_addr = fleet.aggregator.query_addr();
    wait_count(&fleet.dir, query_addr, 1).await;
    let ids = runnel_tests::query_strings(query_addr, "SELECT event_id FROM events")
        .await
        .expect("ids");
    assert_eq!(ids, vec!["good-after".to_owned()]);
}
