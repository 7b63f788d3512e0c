//! Prometheus `GET /metrics` on the HTTP source's listener.
//!
//! Two kinds of series. Events as they happen go through the `metrics` facade where they occur
//! (`runnel_agent_events_received_total` by source, `runnel_agent_dropped_events_total` by
//! stream and reason, the batch round-trip histogram, QUIC path figures). State the agent already keeps (buffer depth, oldest unshipped age, counters of the
//! buffer and the uplink) is read from [`Ops::status`] at scrape time, so it is never stale and
//! costs nothing between scrapes.
//!
//! Names follow Prometheus conventions: `_total` counters, `_seconds`, `_bytes`.
//!
//! `runnel_agent_mqtt_sessions_lost_total{source}` is read from the status too, so every
//! subscriber has the series from its first connection on (at 0), and an alert on `increase()`
//! sees the first loss.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use runnel_common::exposition::Exposition;

use crate::ops::Ops;

/// The process's recorder; see [`runnel_service::metrics::install`].
pub use runnel_service::metrics::install;

pub fn router(ops: Arc<Ops>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(ops)
}

async fn scrape(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    let status = ops.status().await;
    let mut text = String::new();
    if let Some(handle) = install() {
        text.push_str(&handle.render());
    }
    let buffer = &status.buffer;
    let uplink = &status.uplink.state;
    let mut out = Exposition(&mut text);
    out.gauge("runnel_agent_up", "1 while the agent runs.", 1.0);
    out.gauge(
        "runnel_agent_ready",
        "1 when every source is started and the buffer is open.",
        f64::from(u8::from(status.ready)),
    );
    out.gauge(
        "runnel_agent_buffer_events",
        "Events held in the buffer: not yet acknowledged by the aggregator.",
        buffer.n_events as f64,
    );
    out.gauge(
        "runnel_agent_buffer_bytes",
        "Encoded bytes of the events held in the buffer.",
        buffer.n_bytes as f64,
    );
    out.gauge(
        "runnel_agent_buffer_max_bytes",
        "The buffer's size limit (buffer.max_bytes).",
        buffer.max_bytes as f64,
    );
    out.gauge(
        "runnel_agent_buffer_oldest_unshipped_age_seconds",
        "Age of the oldest event not yet acknowledged by the aggregator (0 when empty).",
        buffer.oldest_unshipped_age_ms.unwrap_or(0) as f64 / 1000.0,
    );
    out.counter(
        "runnel_agent_buffered_events_total",
        "Events committed to the buffer.",
        buffer.n_appended,
    );
    out.counter(
        "runnel_agent_shipped_events_total",
        "Events acknowledged by the aggregator and removed from the buffer.",
        buffer.n_deleted,
    );
    out.counter(
        "runnel_agent_buffer_full_refusals_total",
        "Appends refused because the buffer was full (when_full = block).",
        buffer.n_refused_full,
    );
    out.counter(
        "runnel_agent_buffer_commits_total",
        "SQLite transactions of the buffer's writer.",
        buffer.n_commits,
    );
    out.gauge(
        "runnel_agent_uplink_connected",
        "1 while a QUIC connection to the aggregator is up.",
        f64::from(u8::from(uplink.connected)),
    );
    out.counter(
        "runnel_agent_uplink_connects_total",
        "QUIC connections established (the first one and every reconnect).",
        uplink.n_connects,
    );
    out.counter(
        "runnel_agent_uplink_connection_failures_total",
        "QUIC connections that failed or were lost.",
        uplink.n_connection_failures,
    );
    out.counter(
        "runnel_agent_uplink_acked_batches_total",
        "Batches the aggregator acknowledged.",
        uplink.n_batches_acked,
    );
    out.counter(
        "runnel_agent_uplink_failovers_total",
        "Moves to the next aggregator in this agent's order because the one in use was \
         unreachable for uplink.failover_after_ms.",
        uplink.n_failovers,
    );
    out.counter(
        "runnel_agent_uplink_failbacks_total",
        "Returns to the first-choice aggregator after it was reachable again for \
         uplink.failback_after_ms.",
        uplink.n_failbacks,
    );
    out.gauge(
        "runnel_agent_uplink_aggregator_choice",
        "Position of the aggregator in use in this agent's order (1: its first choice).",
        uplink.aggregator_choice as f64,
    );
    mqtt_sessions_lost(&mut text, &status.sources.mqtt_subscribers);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// One sample per MQTT subscriber that has connected.
fn mqtt_sessions_lost(text: &mut String, subscribers: &[crate::ops::MqttSubscriberStatus]) {
    use std::fmt::Write;

    let connected: Vec<_> = subscribers.iter().filter(|s| s.n_connects > 0).collect();
    if connected.is_empty() {
        return;
    }
    text.push_str(
        "# HELP runnel_agent_mqtt_sessions_lost_total Reconnects on which the broker no longer had \
         the subscriber's persistent session: the messages it queued for the agent were discarded.\n\
         # TYPE runnel_agent_mqtt_sessions_lost_total counter\n",
    );
    for subscriber in connected {
        // Source names are `a-z A-Z 0-9 _ . -` (config validation): nothing to escape.
        let _ = writeln!(
            text,
            "runnel_agent_mqtt_sessions_lost_total{{source=\"{}\"}} {}",
            subscriber.name, subscriber.n_sessions_lost
        );
    }
}
