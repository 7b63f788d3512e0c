//! Operations: what an operator and a service manager use to see whether the agent is alive,
//! ready and keeping up. `GET /healthz` (liveness), `GET /readyz` (readiness) and
//! `GET /v1/status` (a JSON summary) on the HTTP source's listener; the systemd notifications
//! (`READY=1` once every component is up, `WATCHDOG=1` while the buffer's writer lives,
//! `STOPPING=1` on shutdown); and the client behind `runnel-agent status`.
//!
//! It only reads state the components already keep (buffer contents and counters, the uplink's
//! connection state); it must not change anything, and nothing here is on an event's path.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use runnel_common::human;
use runnel_config::AgentConfig;
use runnel_service::probes::{Lifecycle, Probes};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::buffer::Buffer;
use crate::uplink::{UplinkSnapshot, UplinkState};

/// The status endpoint. Beside Segment's `/v1/{call}`: the router prefers this literal path.
pub const STATUS_PATH: &str = "/v1/status";

/// How long `/v1/status` waits for the buffer's writer thread (busy with a large group commit,
/// or stuck) before it reports the oldest event as unknown.
const STATUS_BUFFER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long `runnel-agent status` waits for the whole answer.
const STATUS_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest status answer the client reads: a summary, not data.
const MAX_STATUS_BYTES: u64 = 1024 * 1024;

/// The addresses the agent bound (port 0 in the config becomes a real port).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Listen {
    pub http: String,
    pub mqtt_listener: Option<String>,
}

/// Shared by the HTTP handlers, the watchdog and `run`.
pub struct Ops {
    started: Instant,
    started_unix_ms: i64,
    /// Ready once every source is started (the HTTP listener answers from then on); stopping
    /// when shutdown begins.
    lifecycle: Lifecycle,
    agent_id: String,
    listen: Listen,
    config: AgentConfig,
    buffer: Buffer,
    uplink: Arc<UplinkState>,
    /// The config control: which managed config runs (set once by `run`).
    control: std::sync::OnceLock<Arc<crate::control::Control>>,
}

impl Ops {
    /// Tells status which managed config runs.
    pub fn set_control(&self, control: Arc<crate::control::Control>) {
        let _ = self.control.set(control);
    }

    pub fn new(
        config: &AgentConfig,
        agent_id: &str,
        listen: Listen,
        buffer: Buffer,
        uplink: Arc<UplinkState>,
    ) -> Ops {
        Ops {
            started: Instant::now(),
            started_unix_ms: crate::now_unix_ms(),
            lifecycle: Lifecycle::default(),
            agent_id: agent_id.to_owned(),
            listen,
            config: config.clone(),
            buffer,
            uplink,
            control: std::sync::OnceLock::new(),
        }
    }

    /// Every component is up: the buffer is open and every source started.
    pub fn set_ready(&self) {
        self.lifecycle.set_ready();
    }

    /// Connection and broker-session state of every configured MQTT subscriber.
    fn mqtt_subscribers(&self, config: &AgentConfig) -> Vec<MqttSubscriberStatus> {
        let Some(control) = self.control.get() else {
            return Vec::new();
        };
        let health = control.source_health();
        config
            .mqtt
            .iter()
            .map(|mqtt| {
                let state = health.get(&mqtt.name);
                let session = health.session(&mqtt.name).unwrap_or_default();
                let warning = (session.n_sessions_lost > 0).then(|| {
                    format!(
                        "the broker lost this subscriber's persistent session {} time(s): the \
                         messages it held for the agent were discarded (docs/SOURCES.md, \
                         \"Broker-side loss\")",
                        session.n_sessions_lost
                    )
                });
                MqttSubscriberStatus {
                    name: mqtt.name.clone(),
                    healthy: state.as_ref().is_none_or(|state| state.healthy),
                    detail: state.map(|state| state.detail).unwrap_or_default(),
                    n_connects: session.n_connects,
                    session_present: session.session_present,
                    n_sessions_lost: session.n_sessions_lost,
                    last_session_lost_unix_ms: session.last_session_lost_unix_ms,
                    warning,
                }
            })
            .collect()
    }

    pub async fn status(&self) -> AgentStatus {
        let contents = *self.buffer.contents().borrow();
        let stats = self.buffer.stats();
        let now_ms = crate::now_unix_ms();
        let (oldest, buffer_error) =
            match tokio::time::timeout(STATUS_BUFFER_TIMEOUT, self.buffer.oldest()).await {
                Ok(Ok(oldest)) => (oldest, None),
                Ok(Err(error)) => (None, Some(format!("{error:#}"))),
                Err(_) => (
                    None,
                    Some(format!(
                        "the buffer did not answer within {STATUS_BUFFER_TIMEOUT:?}"
                    )),
                ),
            };
        let current = self.control.get().map(|control| control.current());
        let config = current
            .as_ref()
            .map_or(&self.config, |current| &current.config);
        AgentStatus {
            service: "runnel-agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            agent_id: self.agent_id.clone(),
            labels: config.labels.clone(),
            started_unix_ms: self.started_unix_ms,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ready: self.readiness().is_ok(),
            not_ready_reason: self.readiness().err().map(str::to_owned),
            listen: Listen {
                http: self.listen.http.clone(),
                // The MQTT listener may move with a managed config.
                mqtt_listener: match self.control.get() {
                    Some(control) => control.mqtt_listener_addr_now().map(|a| a.to_string()),
                    None => self.listen.mqtt_listener.clone(),
                },
            },
            sources: SourcesStatus {
                snowplow: config.snowplow.enabled,
                segment: config.segment.enabled,
                mqtt: config.mqtt.iter().map(|m| m.name.clone()).collect(),
                mqtt_listener: config.mqtt_listener.enabled,
                mqtt_subscribers: self.mqtt_subscribers(config),
            },
            buffer: BufferStatus {
                path: config.buffer.path.display().to_string(),
                n_events: contents.n_events,
                n_bytes: contents.n_bytes,
                max_bytes: config.buffer.max_bytes,
                when_full: config.buffer.when_full.as_str().into(),
                synchronous: config.buffer.synchronous.as_str().into(),
                last_seq: contents.last_seq,
                oldest_unshipped_seq: oldest.map(|o| o.seq),
                oldest_unshipped_age_ms: oldest
                    .map(|o| u64::try_from(now_ms.saturating_sub(o.receive_time_ms)).unwrap_or(0)),
                n_appended: stats.n_appended.load(Ordering::Relaxed),
                n_refused_full: stats.n_refused_full.load(Ordering::Relaxed),
                n_dropped: stats.n_dropped.load(Ordering::Relaxed),
                n_deleted: stats.n_deleted.load(Ordering::Relaxed),
                n_commits: stats.n_commits.load(Ordering::Relaxed),
                error: buffer_error,
            },
            uplink: UplinkStatus {
                aggregator: self.uplink.aggregator().to_owned(),
                aggregators: self.uplink.order().to_vec(),
                server_name: config.uplink.server_name.clone(),
                state: self.uplink.snapshot(),
            },
            config: ConfigStatus {
                hash: current.as_ref().map(|c| c.hash.clone()).unwrap_or_default(),
                version: current.as_ref().map_or(0, |c| c.version),
                document_hash: current
                    .as_ref()
                    .map(|c| c.document_hash.clone())
                    .unwrap_or_default(),
            },
        }
    }
}

/// The answer of `GET /v1/status`. Every field has a default so that `runnel-agent status` of
/// one version reads the answer of another.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentStatus {
    pub service: String,
    pub version: String,
    pub pid: u32,
    pub agent_id: String,
    pub labels: BTreeMap<String, String>,
    pub started_unix_ms: i64,
    pub uptime_ms: u64,
    pub ready: bool,
    pub not_ready_reason: Option<String>,
    pub listen: Listen,
    pub sources: SourcesStatus,
    pub buffer: BufferStatus,
    pub uplink: UplinkStatus,
    /// Which config runs.
    pub config: ConfigStatus,
}

/// The effective config: the bootstrap file, with the managed config laid over it if one was
/// pushed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigStatus {
    /// Hash of the effective config (the one heartbeats report).
    pub hash: String,
    /// Version of the managed config (0: the bootstrap file alone).
    pub version: u64,
    /// Hash of the managed document as the aggregator pushed it ("" when none).
    pub document_hash: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SourcesStatus {
    pub snowplow: bool,
    pub segment: bool,
    /// Names of the MQTT subscribers.
    pub mqtt: Vec<String>,
    pub mqtt_listener: bool,
    /// Each MQTT subscriber's connection and broker session.
    pub mqtt_subscribers: Vec<MqttSubscriberStatus>,
}

/// One MQTT subscriber in the status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MqttSubscriberStatus {
    pub name: String,
    /// Reaches its broker (or has not failed yet).
    pub healthy: bool,
    /// What it is doing, or why it is unhealthy.
    pub detail: String,
    /// CONNACKs since the agent started.
    pub n_connects: u64,
    /// The session-present flag of the last CONNACK.
    pub session_present: Option<bool>,
    /// Reconnects on which the broker no longer had the persistent session this process had:
    /// the messages it held for the agent were lost at the broker.
    pub n_sessions_lost: u64,
    pub last_session_lost_unix_ms: Option<i64>,
    /// Set when something was lost at the broker.
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BufferStatus {
    pub path: String,
    /// Events held: not yet acknowledged by the aggregator.
    pub n_events: u64,
    pub n_bytes: u64,
    pub max_bytes: u64,
    pub when_full: String,
    pub synchronous: String,
    /// Highest sequence number ever assigned.
    pub last_seq: u64,
    pub oldest_unshipped_seq: Option<u64>,
    /// Milliseconds since the oldest held event was received.
    pub oldest_unshipped_age_ms: Option<u64>,
    /// Counters since start.
    pub n_appended: u64,
    pub n_refused_full: u64,
    pub n_dropped: u64,
    pub n_deleted: u64,
    pub n_commits: u64,
    /// Why the buffer could not be read for this answer.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct UplinkStatus {
    /// The aggregator connected to, or dialled next when not connected.
    pub aggregator: String,
    /// Every configured aggregator in this agent's order (rendezvous hashing on its id): the
    /// first is its first choice. `state.aggregator_choice` is the position of `aggregator`.
    pub aggregators: Vec<String>,
    pub server_name: String,
    #[serde(flatten)]
    pub state: UplinkSnapshot,
}

/// `/healthz`, `/readyz` and `/v1/status`, merged into the HTTP source's router.
pub fn router(ops: Arc<Ops>) -> axum::Router {
    runnel_service::probes::router(Arc::clone(&ops)).merge(
        axum::Router::new()
            .route(STATUS_PATH, get(status))
            .with_state(ops),
    )
}

impl Probes for Ops {
    /// Liveness: the buffer's writer thread runs (it publishes its contents; when it ends the
    /// channel closes). Without it nothing can be accepted or shipped: restart.
    fn health(&self) -> Result<(), &'static str> {
        match self.buffer.contents().has_changed() {
            Ok(_) => Ok(()),
            Err(_) => Err("the buffer's writer thread has stopped"),
        }
    }

    // Readiness is the default one: alive, started, not shutting down. An unreachable
    // aggregator does not make the agent unready: buffering through an outage is its job.
    fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }
}

async fn status(State(ops): State<Arc<Ops>>) -> Response {
    Json(ops.status().await).into_response()
}

// ---------------------------------------------------------------------------------------------
// systemd

/// Tells systemd the agent is ready, pings its watchdog while the agent is healthy, and marks
/// the agent stopping at shutdown ([`runnel_service::probes::supervise`]).
///
/// It holds a buffer handle: await it before waiting for that writer thread to end.
pub async fn supervise(ops: Arc<Ops>, shutdown: watch::Receiver<bool>) {
    let status = format!("agent {} on {}", ops.agent_id, ops.listen.http);
    runnel_service::probes::supervise(ops, "agent", &status, shutdown).await;
}

// ---------------------------------------------------------------------------------------------
// `runnel-agent status`

/// The base URL of the running agent that uses the config at `config_path`: the address in its
/// runtime file (`<data_dir>/agent.runtime.json`), else `sources.http.listen`.
pub fn local_url(config_path: &Path) -> anyhow::Result<String> {
    let config = runnel_config::load_agent(config_path)
        .context("find the agent's address (or give it with --url)")?;
    let runtime_path = config.data_dir.join(crate::RUNTIME_FILE);
    let from_runtime = std::fs::read_to_string(&runtime_path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|value| value["http"].as_str().map(str::to_owned));
    let addr = match from_runtime {
        Some(addr) => addr,
        None => {
            let mut addr = config.http.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr {
                    std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            addr.to_string()
        }
    };
    Ok(format!("http://{addr}"))
}

/// Fetches `/v1/status` and `/readyz` from `base_url` (`http://host:port`).
pub async fn fetch_status(base_url: &str) -> anyhow::Result<AgentStatus> {
    let (code, body) = tokio::time::timeout(STATUS_CLIENT_TIMEOUT, http_get(base_url, STATUS_PATH))
        .await
        .with_context(|| format!("GET {base_url}{STATUS_PATH}: no answer within {STATUS_CLIENT_TIMEOUT:?}"))?
        .with_context(|| format!("GET {base_url}{STATUS_PATH} (is the agent running? `systemctl status runnel-agent`)"))?;
    anyhow::ensure!(
        code == 200,
        "GET {base_url}{STATUS_PATH} answered {code}: {}",
        String::from_utf8_lossy(&body).trim()
    );
    serde_json::from_slice(&body).with_context(|| {
        format!("GET {base_url}{STATUS_PATH}: the answer is not agent status JSON")
    })
}

/// A minimal HTTP/1.0 GET: the agent has no HTTP client otherwise, and this one request does
/// not justify one. HTTP/1.0 makes the server close the connection after the answer, so the
/// body is everything after the header.
async fn http_get(base_url: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let authority = base_url
        .strip_prefix("http://")
        .with_context(|| format!("{base_url:?}: only http:// URLs are supported"))?
        .trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect to {authority}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .context("send request")?;
    let mut answer = Vec::new();
    stream
        .take(MAX_STATUS_BYTES)
        .read_to_end(&mut answer)
        .await
        .context("read answer")?;
    let header_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("answer has no complete HTTP header")?;
    let status_line = answer
        .split(|&b| b == b'\r')
        .next()
        .and_then(|line| std::str::from_utf8(line).ok())
        .unwrap_or("");
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    Ok((code, answer[header_end + 4..].to_vec()))
}

/// The readable summary `runnel-agent status` prints.
pub fn render_status(status: &AgentStatus) -> String {
    let mut out = String::new();
    let line = |out: &mut String, label: &str, text: &str| {
        out.push_str(&format!("{label:<12}{text}\n"));
    };
    out.push_str(&format!(
        "{} {}, pid {}, up {}: {}\n",
        status.service,
        status.version,
        status.pid,
        human::duration_ms(status.uptime_ms),
        match (&status.ready, &status.not_ready_reason) {
            (true, _) => "ready".to_owned(),
            (false, Some(reason)) => format!("NOT READY ({reason})"),
            (false, None) => "NOT READY".to_owned(),
        }
    ));
    let labels = status
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    line(
        &mut out,
        "agent id",
        &if labels.is_empty() {
            status.agent_id.clone()
        } else {
            format!("{} ({labels})", status.agent_id)
        },
    );
    line(
        &mut out,
        "config",
        &match status.config.version {
            0 if status.config.hash.is_empty() => "not reported".to_owned(),
            0 => format!("bootstrap file only, hash {}", status.config.hash),
            version => format!(
                "managed config v{version} (document {}), effective hash {}",
                status.config.document_hash, status.config.hash
            ),
        },
    );
    let mut protocols = vec!["json"];
    if status.sources.snowplow {
        protocols.push("snowplow");
    }
    if status.sources.segment {
        protocols.push("segment");
    }
    line(
        &mut out,
        "http",
        &format!("{} ({})", status.listen.http, protocols.join(", ")),
    );
    if !status.sources.mqtt.is_empty() || status.listen.mqtt_listener.is_some() {
        let mut parts = Vec::new();
        if !status.sources.mqtt.is_empty() {
            parts.push(format!("subscribers: {}", status.sources.mqtt.join(", ")));
        }
        if let Some(addr) = &status.listen.mqtt_listener {
            parts.push(format!("listener on {addr}"));
        }
        line(&mut out, "mqtt", &parts.join("; "));
    }
    for subscriber in &status.sources.mqtt_subscribers {
        let session = match subscriber.session_present {
            Some(true) => ", session resumed",
            Some(false) => ", new session",
            None => "",
        };
        line(
            &mut out,
            "",
            &format!(
                "{}: {}{}, {} connections{session}",
                subscriber.name,
                if subscriber.healthy { "" } else { "UNHEALTHY " },
                subscriber.detail,
                subscriber.n_connects
            ),
        );
        if let Some(warning) = &subscriber.warning {
            let when = subscriber
                .last_session_lost_unix_ms
                .map(|at| {
                    let ago = u64::try_from(crate::now_unix_ms() - at).unwrap_or(0);
                    format!(" (last {} ago)", human::duration_ms(ago))
                })
                .unwrap_or_default();
            line(
                &mut out,
                "",
                &format!("WARNING {}: {warning}{when}", subscriber.name),
            );
        }
    }
    let buffer = &status.buffer;
    let percent = if buffer.max_bytes > 0 {
        buffer.n_bytes as f64 * 100.0 / buffer.max_bytes as f64
    } else {
        0.0
    };
    line(
        &mut out,
        "buffer",
        &format!(
            "{} events, {} of {} ({percent:.1} %), when full: {}, synchronous = {}",
            buffer.n_events,
            human::bytes(buffer.n_bytes),
            human::bytes(buffer.max_bytes),
            buffer.when_full,
            buffer.synchronous
        ),
    );
    let oldest = match (&buffer.error, buffer.oldest_unshipped_age_ms) {
        (Some(error), _) => format!("oldest unshipped: unknown ({error})"),
        (None, Some(age_ms)) => format!(
            "oldest unshipped: received {} ago (seq {})",
            human::duration_ms(age_ms),
            buffer.oldest_unshipped_seq.unwrap_or(0)
        ),
        (None, None) => "nothing waiting to be shipped".to_owned(),
    };
    line(&mut out, "", &oldest);
    line(
        &mut out,
        "",
        &format!(
            "since start: {} appended, {} refused (full), {} dropped by policy, {} shipped and deleted; last seq {}",
            buffer.n_appended,
            buffer.n_refused_full,
            buffer.n_dropped,
            buffer.n_deleted,
            buffer.last_seq
        ),
    );
    let uplink = &status.uplink;
    let state = &uplink.state;
    let now_ms = crate::now_unix_ms();
    let ago = |at_ms: i64| human::duration_ms(u64::try_from(now_ms - at_ms).unwrap_or(0));
    // With several aggregators: which of them, in this agent's order.
    let choice = match (uplink.aggregators.len(), state.aggregator_choice) {
        (0 | 1, _) | (_, 0) => String::new(),
        (n_choices, 1) => format!("first choice of {n_choices}, "),
        (n_choices, choice) => format!("choice {choice} of {n_choices}, "),
    };
    line(
        &mut out,
        "uplink",
        &match (state.connected, state.connected_since_unix_ms) {
            (true, Some(since)) => format!(
                "connected to {} ({choice}server name {}) for {}",
                uplink.aggregator,
                uplink.server_name,
                ago(since)
            ),
            (true, None) => format!("connected to {}", uplink.aggregator),
            (false, _) => format!(
                "NOT CONNECTED to {} ({choice}server name {}); events wait in the buffer",
                uplink.aggregator, uplink.server_name
            ),
        },
    );
    if uplink.aggregators.len() > 1 {
        line(
            &mut out,
            "",
            &format!(
                "aggregators in this agent's order: {}; since start: {} failovers, {} returns to the first choice",
                uplink.aggregators.join(", "),
                state.n_failovers,
                state.n_failbacks
            ),
        );
        if let (Some(why), Some(at)) = (&state.last_move, state.last_move_unix_ms) {
            line(&mut out, "", &format!("last move {} ago: {why}", ago(at)));
        }
    }
    line(
        &mut out,
        "",
        &format!(
            "since start: {} events in {} batches acknowledged{}, {} connections, {} failed",
            state.n_events_acked,
            state.n_batches_acked,
            state
                .last_ack_unix_ms
                .map(|at| format!(" (last {} ago)", ago(at)))
                .unwrap_or_default(),
            state.n_connects,
            state.n_connection_failures
        ),
    );
    if let Some(error) = &state.last_error {
        line(&mut out, "", &format!("last connection error: {error}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_of_another_version_still_reads() {
        // Fields added or removed between versions must not break `runnel-agent status`.
        let status: AgentStatus = serde_json::from_str(
            r#"{"service":"runnel-agent","version":"9.9.9","ready":true,"future_field":1,
                "buffer":{"n_events":3},"uplink":{"aggregator":"a:1","connected":true}}"#,
        )
        .unwrap();
        assert_eq!(status.buffer.n_events, 3);
        assert!(status.uplink.state.connected);
        let text = render_status(&status);
        assert!(text.contains("runnel-agent 9.9.9"), "{text}");
        assert!(text.contains("connected to a:1"), "{text}");
        assert!(text.contains("config      not reported"), "{text}");
    }

    #[test]
    fn status_says_which_of_several_aggregators_and_why_it_moved() {
        let mut status = AgentStatus::default();
        status.uplink.aggregator = "b:9480".into();
        status.uplink.aggregators = vec!["a:9480".into(), "b:9480".into(), "c:9480".into()];
        status.uplink.server_name = "fleet".into();
        status.uplink.state.connected = true;
        status.uplink.state.connected_since_unix_ms = Some(crate::now_unix_ms());
        status.uplink.state.aggregator_choice = 2;
        status.uplink.state.n_failovers = 1;
        status.uplink.state.last_move = Some("moved from a:9480 to b:9480".into());
        status.uplink.state.last_move_unix_ms = Some(crate::now_unix_ms());
        let text = render_status(&status);
        assert!(
            text.contains("connected to b:9480 (choice 2 of 3, server name fleet) for "),
            "{text}"
        );
        assert!(
            text.contains(
                "aggregators in this agent's order: a:9480, b:9480, c:9480; since start: 1 \
                 failovers, 0 returns to the first choice"
            ),
            "{text}"
        );
        assert!(text.contains("ago: moved from a:9480 to b:9480"), "{text}");
        status.uplink.state.aggregator_choice = 1;
        assert!(
            render_status(&status).contains("connected to b:9480 (first choice of 3, server"),
            "{text}"
        );
        // One aggregator: as before.
        status.uplink.aggregators.truncate(1);
        let text = render_status(&status);
        assert!(
            text.contains("connected to b:9480 (server name fleet) for "),
            "{text}"
        );
        assert!(
            !text.contains("aggregators in this agent's order"),
            "{text}"
        );
    }

    #[test]
    fn status_warns_about_a_lost_broker_session() {
        let mut status = AgentStatus::default();
        status.sources.mqtt = vec!["plant".into()];
        status.sources.mqtt_subscribers = vec![MqttSubscriberStatus {
            name: "plant".into(),
            healthy: true,
            detail: "connected to b:1883".into(),
            n_connects: 3,
            session_present: Some(false),
            n_sessions_lost: 1,
            last_session_lost_unix_ms: Some(crate::now_unix_ms()),
            warning: Some("the broker lost it".into()),
        }];
        let text = render_status(&status);
        assert!(
            text.contains("plant: connected to b:1883, 3 connections, new session"),
            "{text}"
        );
        assert!(
            text.contains("WARNING plant: the broker lost it (last "),
            "{text}"
        );
        status.sources.mqtt_subscribers[0].warning = None;
        assert!(!render_status(&status).contains("WARNING"));
    }

    #[test]
    fn status_names_the_running_config() {
        let mut status = AgentStatus::default();
        status.config.hash = "abc".into();
        let text = render_status(&status);
        assert!(
            text.contains("config      bootstrap file only, hash abc"),
            "{text}"
        );
        status.config.version = 7;
        status.config.document_hash = "d0c".into();
        let text = render_status(&status);
        assert!(
            text.contains("config      managed config v7 (document d0c), effective hash abc"),
            "{text}"
        );
    }
}
