//! Several aggregators, the agent's side: an agent that lists two aggregators ships to its
//! rendezvous first choice, moves to the other when the first is SIGKILLed, and keeps shipping
//! there. Real processes, two aggregators with their own data directories and one fleet CA.
//!
//! Covered: a move while the agent holds nothing unacknowledged, and the return to the first
//! choice. The agent's batch chain then continues after its last acknowledged event, above the
//! other aggregator's own high-water mark for it; the agent names that point in its `Resume`
//! (protocol 4) and the aggregator starts the chain there instead of parking the batch for a
//! predecessor it will never get. Events posted after each move are stored where the agent is,
//! with no stall; then a second kill with events acknowledged during the outage.
//!
//! Each aggregator has its own data directory here, so each answers over its own table and
//! recent rows: asserted is that every event the agent's source acknowledged is stored on one of
//! the two, and that what one acknowledged after a move is not on the other.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use runnel_tests::{
    AgentExtra, AgentOptions, AgentProcess, AggregatorOptions, AggregatorProcess, Certs, TestDir,
    Uplink, binaries, get_path, http_client, post_events, stored_event_ids, test_event,
    wait_all_stored,
};
use serde_json::Value;

/// `uplink.failover_after_ms` of the agent: short, so the test is quick.
const FAILOVER_AFTER_MS: u64 = 1_500;
/// `uplink.failback_after_ms` of the agent: short, so the test sees the return to the first.
const FAILBACK_AFTER_MS: u64 = 2_000;
/// Beyond the configured times: process start, debug builds on two shared cores.
const SLACK: Duration = Duration::from_secs(15);
/// How long a status value may take to reflect a connection that is up.
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);

async fn agent_status(http: SocketAddr) -> anyhow::Result<Value> {
    let reply = get_path(&http_client(), http, "/v1/status").await?;
    anyhow::ensure!(reply.status == 200, "GET /v1/status: {}", reply.status);
    Ok(reply.json())
}

/// Polls the agent's status until its uplink is connected to `aggregator`; returns the status
/// read then.
async fn wait_connected_to(
    dir: &TestDir,
    http: SocketAddr,
    aggregator: &str,
    timeout: Duration,
) -> Value {
    dir.wait_until(
        timeout,
        &format!("the agent is connected to {aggregator}"),
        || async move {
            let status = agent_status(http).await?;
            let uplink = &status["uplink"];
            anyhow::ensure!(
                uplink["connected"] == true && uplink["aggregator"] == aggregator,
                "uplink: {uplink}"
            );
            Ok(())
        },
    )
    .await;
    let status = agent_status(http).await.expect("agent status");
    assert_eq!(status["uplink"]["aggregator"], aggregator, "{status:#}");
    status
}

/// POSTs `n_events` events with ids `<prefix><idx>`; returns the ids (all acknowledged).
async fn post_acknowledged(http: SocketAddr, prefix: &str, n_events: usize) -> BTreeSet<String> {
    let ids: Vec<String> = (0..n_events)
        .map(|idx| format!("{prefix}{idx:03}"))
        .collect();
    let events: Vec<Value> = ids.iter().map(|id| test_event(id)).collect();
    let outcome = post_events(&http_client(), http, &events)
        .await
        .unwrap_or_else(|error| panic!("POST {prefix} events: {error:#}"));
    assert_eq!(
        outcome.status, 200,
        "POST {prefix} events: {:?}",
        outcome.body
    );
    ids.into_iter().collect()
}

/// Polls the agent's status until its buffer is empty: every event it took was acknowledged.
async fn wait_buffer_empty(dir: &TestDir, http: SocketAddr) {
    dir.wait_until(
        STATUS_TIMEOUT,
        "the agent holds nothing unacknowledged",
        || async move {
            let status = agent_status(http).await?;
            anyhow::ensure!(
                status["buffer"]["n_events"] == 0,
                "buffer: {}",
                status["buffer"]
            );
            Ok(())
        },
    )
    .await;
}

fn n_lines_with(text: &str, needle: &str) -> usize {
    text.lines().filter(|line| line.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_its_second_aggregator_and_keeps_shipping() {
    let bins = binaries!();
    let dir = TestDir::new("failover");
    let certs = Certs::init(&dir.join("certs"));
    let mut aggregators = [
        AggregatorProcess::start_named(
            &bins,
            &dir,
            "aggregator-a",
            &certs,
            AggregatorOptions::default(),
        ),
        AggregatorProcess::start_named(
            &bins,
            &dir,
            "aggregator-b",
            &certs,
            AggregatorOptions::default(),
        ),
    ];
    let addresses: Vec<String> = aggregators
        .iter()
        .map(|aggregator| aggregator.ingest_addr().to_string())
        .collect();
    let cert = certs.issue_agent("edge-failover");
    let uplink = Uplink {
        aggregator: aggregators[0].ingest_addr(),
        ca_cert: certs.ca_cert.clone(),
    };
    let options = AgentOptions::default();
    let idle_timeout_ms = options.idle_timeout_ms;
    let agent = AgentProcess::start_edited(
        &bins,
        &dir,
        "agent",
        &cert,
        &uplink,
        options,
        &AgentExtra::default(),
        |config| {
            let single = format!("aggregator = \"{}\"\n", uplink.aggregator);
            assert!(config.contains(&single), "{config}");
            let several = format!(
                "aggregators = [\"{}\", \"{}\"]\nfailover_after_ms = {FAILOVER_AFTER_MS}\n\
                 failback_after_ms = {FAILBACK_AFTER_MS}\n",
                addresses[0], addresses[1]
            );
            config.replacen(&single, &several, 1)
        },
    );
    let http = agent.http_addr();

    // The agent's order is the rendezvous order of its id; the status reports it.
    let order = runnel_agent::uplink::rendezvous::order(agent.agent_id(), &addresses);
    let first_idx = addresses
        .iter()
        .position(|address| *address == order[0])
        .expect("the order holds the addresses");
    let second_idx = 1 - first_idx;
    let status = wait_connected_to(&dir, http, &order[0], STATUS_TIMEOUT).await;
    assert_eq!(
        status["uplink"]["aggregators"],
        serde_json::json!(order),
        "{status:#}"
    );
    assert_eq!(status["uplink"]["aggregator_choice"], 1, "{status:#}");

    // Events reach the first choice, and the agent holds nothing unacknowledged.
    let mut acked = post_acknowledged(http, "fo-1-", 50).await;
    wait_all_stored(&dir, aggregators[first_idx].query_addr(), "fo-1-", &acked).await;
    wait_buffer_empty(&dir, http).await;

    // The first choice dies while the agent holds nothing unacknowledged: its chain continues
    // after what the first acknowledged, above anything the second stored of it. The agent names
    // that point in its Resume (protocol 4) and the second starts the chain there.
    aggregators[first_idx].kill_hard();
    let killed_at = Instant::now();
    let status = wait_connected_to(
        &dir,
        http,
        &order[1],
        Duration::from_millis(FAILOVER_AFTER_MS + idle_timeout_ms) + SLACK,
    )
    .await;
    let moved_after = killed_at.elapsed();
    eprintln!("moved to the second aggregator {moved_after:?} after the SIGKILL");
    assert!(
        moved_after >= Duration::from_millis(FAILOVER_AFTER_MS),
        "moved {moved_after:?} after the kill, before failover_after_ms"
    );
    let uplink_status = &status["uplink"];
    assert_eq!(uplink_status["aggregator_choice"], 2, "{status:#}");
    assert_eq!(uplink_status["n_failovers"], 1, "{status:#}");
    let last_move = uplink_status["last_move"].as_str().unwrap_or_default();
    assert!(
        last_move.contains(&format!("moved from {} to {}", order[0], order[1]))
            && last_move.contains("unreachable"),
        "{status:#}"
    );

    // The second never saw this agent: it starts the chain at what the first acknowledged.
    let second = &aggregators[second_idx];
    dir.wait_until(
        STATUS_TIMEOUT,
        "the second aggregator logs the agent's chain start",
        || async move {
            let log = second.stderr();
            anyhow::ensure!(
                n_lines_with(&log, "agent resumes above what this aggregator stored") == 1,
                "{log}"
            );
            Ok(())
        },
    )
    .await;

    // Events posted after the move are stored on the second, without a stall.
    let after_move = post_acknowledged(http, "fo-2-", 50).await;
    wait_all_stored(
        &dir,
        aggregators[second_idx].query_addr(),
        "fo-2-",
        &after_move,
    )
    .await;
    acked.extend(after_move);
    wait_buffer_empty(&dir, http).await;

    // The first comes back (its WAL holds what it acknowledged before the kill, its mark is
    // behind what the second acknowledged); the agent returns after failback_after_ms of good
    // probes, holding nothing unacknowledged again.
    aggregators[first_idx].restart();
    let status = wait_connected_to(
        &dir,
        http,
        &order[0],
        Duration::from_millis(FAILBACK_AFTER_MS + idle_timeout_ms) + STATUS_TIMEOUT,
    )
    .await;
    assert_eq!(status["uplink"]["aggregator_choice"], 1, "{status:#}");
    assert_eq!(status["uplink"]["n_failbacks"], 1, "{status:#}");

    // Events posted after the return are stored on the first, without a stall.
    let after_return = post_acknowledged(http, "fo-3-", 50).await;
    wait_all_stored(
        &dir,
        aggregators[first_idx].query_addr(),
        "fo-3-",
        &after_return,
    )
    .await;
    acked.extend(after_return);
    wait_buffer_empty(&dir, http).await;

    // The first dies again, now with events acknowledged by the agent's source during the
    // outage: they wait in its buffer and reach the second once the agent moved there.
    aggregators[first_idx].kill_hard();
    let during_outage = post_acknowledged(http, "fo-4-", 50).await;
    acked.extend(during_outage.iter().cloned());
    let status = wait_connected_to(
        &dir,
        http,
        &order[1],
        Duration::from_millis(FAILOVER_AFTER_MS + idle_timeout_ms) + SLACK,
    )
    .await;
    assert_eq!(status["uplink"]["n_failovers"], 2, "{status:#}");
    wait_all_stored(
        &dir,
        aggregators[second_idx].query_addr(),
        "fo-4-",
        &during_outage,
    )
    .await;
    aggregators[first_idx].restart();

    // Every acknowledged event is stored on one of the two, and each batch on one only: the
    // events of each phase are on the aggregator that acknowledged them and not on the other.
    let queries = [aggregators[0].query_addr(), aggregators[1].query_addr()];
    let acked = &acked;
    dir.wait_until(
        runnel_tests::ARRIVAL_TIMEOUT,
        "every acknowledged event is stored on one of the aggregators",
        || async move {
            let mut stored = stored_event_ids(queries[0], "fo-").await?;
            stored.extend(stored_event_ids(queries[1], "fo-").await?);
            let missing: Vec<&String> = acked.difference(&stored).collect();
            anyhow::ensure!(
                missing.is_empty(),
                "{} of {} acknowledged events stored on neither, such as {:?}",
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(5)]
            );
            Ok(())
        },
    )
    .await;
    for (prefix, on_idx) in [("fo-2-", first_idx), ("fo-3-", second_idx)] {
        let stored = stored_event_ids(queries[on_idx], prefix)
            .await
            .expect("query stored events");
        assert!(
            stored.is_empty(),
            "{prefix} events were shipped to one aggregator only, yet {} are on the other: {:?}",
            stored.len(),
            stored.iter().take(5).collect::<Vec<_>>()
        );
    }

    // The log says each move once, with its reason, not once per retry.
    let log = agent.stderr();
    assert_eq!(
        n_lines_with(&log, "uplink moves to the next aggregator in its order"),
        2,
        "{log}"
    );
    assert_eq!(
        n_lines_with(&log, "uplink returns to its first-choice aggregator"),
        1,
        "{log}"
    );
    let status = agent_status(http).await.expect("agent status");
    assert_eq!(status["uplink"]["aggregator"], order[1], "{status:#}");
    assert_eq!(status["uplink"]["n_failovers"], 2, "{status:#}");
    assert_eq!(status["uplink"]["n_failbacks"], 1, "{status:#}");
    for aggregator in &mut aggregators {
        aggregator.assert_running();
    }
}
