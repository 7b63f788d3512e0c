//! The registry of connected agents: who is connected right now, from where, on which protocol
//! version, what each connection stored and what the agent last reported (heartbeat or status),
//! plus the counters since start. Also the wake-ups the fleet driver gets from ingest
//! ([`FleetEvent`]).
//!
//! Ingest writes it (a connection registers after its Welcome and is removed when it ends,
//! however it ends); the fleet, ops, the `agents` table and the query engine read it. The fleet
//! driver decides on it: which agents a rollout reaches, the samples of its health gate and the
//! reported config versions it reconciles with the desired ones come from here, and its config
//! pushes go out through a connection's control queue ([`ConnectedAgents::push_config`]).
//!
//! It owns no socket and knows nothing of QUIC: a connection is a key, an address and the
//! sending end of its control-stream queue. Ingest is the only writer of connections; nothing
//! here is on a batch's path besides counting what was stored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use runnel_common::wire::{
    AggregatorMessage, ConfigPush, ConfigResult, FLEET_PROTOCOL_VERSION, Status,
};
use serde::Serialize;
use tokio::sync::mpsc;

/// Heartbeat interval announced to agents unless `fleet.heartbeat_interval_ms` says otherwise.
const HEARTBEAT_INTERVAL_MS: u32 = 5_000;

/// What ingest tells the fleet driver.
#[derive(Debug, Clone)]
pub enum FleetEvent {
    /// An agent connected (a wake-up: its state is in [`ConnectedAgents`]).
    Connected { agent_id: Arc<str> },
    /// An agent sent a protocol 2 status (a wake-up, as above).
    Status { agent_id: Arc<str> },
    /// An agent answered a config push.
    ConfigResult {
        agent_id: Arc<str>,
        result: ConfigResult,
    },
}

/// The agents connected right now, by connection (an agent that reconnects may briefly hold
/// two), and counters since start.
#[derive(Debug, Default)]
pub struct ConnectedAgents {
    connections: std::sync::Mutex<BTreeMap<usize, Arc<AgentConnection>>>,
    n_connections_total: AtomicU64,
    n_batches_stored: AtomicU64,
    n_events_stored: AtomicU64,
    /// Where connections, statuses and config results go (the fleet driver), once it runs.
    fleet: std::sync::OnceLock<mpsc::Sender<FleetEvent>>,
    /// Heartbeat interval announced in the Welcome (0: [`HEARTBEAT_INTERVAL_MS`]).
    heartbeat_interval_ms: std::sync::atomic::AtomicU32,
}

/// One agent connection: who, from where, and what it stored and reported.
#[derive(Debug)]
pub struct AgentConnection {
    agent_id: Arc<str>,
    remote: SocketAddr,
    agent_version: String,
    connected_unix_ms: i64,
    n_batches_stored: AtomicU64,
    n_events_stored: AtomicU64,
    /// From the last heartbeat (0 before the first).
    last_heartbeat_unix_ms: AtomicI64,
    n_buffered_events: AtomicU64,
    buffered_bytes: AtomicU64,
    oldest_unshipped_age_ms: AtomicU64,
    n_dropped_events: AtomicU64,
    /// From the Hello.
    labels: BTreeMap<String, String>,
    protocol_version: u16,
    hello_config_hash: String,
    /// The last protocol 2 [`Status`], if any.
    status: std::sync::Mutex<Option<Status>>,
    /// The control stream's single writer (protocol 2 config pushes).
    control: mpsc::Sender<AggregatorMessage>,
}

/// One component's health, as the agent last reported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ComponentSnapshot {
    pub name: String,
    pub healthy: bool,
    pub detail: String,
}

/// A copy of one [`AgentConnection`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AgentConnectionSnapshot {
    pub agent_id: String,
    pub remote: String,
    pub agent_version: String,
    pub connected_since_unix_ms: i64,
    /// Batches and new (not replayed) events committed on this connection.
    pub n_batches_stored: u64,
    pub n_events_stored: u64,
    pub last_heartbeat_unix_ms: Option<i64>,
    /// The agent's buffer as of its last heartbeat.
    pub n_buffered_events: Option<u64>,
    pub buffered_bytes: Option<u64>,
    pub oldest_unshipped_age_ms: Option<u64>,
    /// Events dropped since the agent started (all reasons).
    pub n_dropped_events: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub protocol_version: u16,
    /// Hash of the effective config: from the last status, else from the Hello.
    pub config_hash: String,
    /// Managed config version from the last status (protocol 2; 0: bootstrap only).
    pub config_version: Option<u64>,
    /// Drops by reason and other counters since the agent started (protocol 2).
    pub drops: BTreeMap<String, u64>,
    pub counters: BTreeMap<String, u64>,
    pub components: Vec<ComponentSnapshot>,
    /// All components healthy (protocol 2 status received), else unknown.
    pub healthy: Option<bool>,
}

/// Counters of all connections since start, and the connections open now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IngestSnapshot {
    pub n_connections_total: u64,
    pub n_batches_stored: u64,
    pub n_events_stored: u64,
    pub agents: Vec<AgentConnectionSnapshot>,
}

impl ConnectedAgents {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, Arc<AgentConnection>>> {
        // Plain data: a panic while holding the lock leaves nothing half-done.
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn snapshot(&self) -> IngestSnapshot {
        let mut agents: Vec<AgentConnectionSnapshot> = self
            .lock()
            .values()
            .map(|connection| {
                let heartbeat_ms = connection.last_heartbeat_unix_ms.load(Ordering::Relaxed);
                let heard = heartbeat_ms != 0;
                let status = connection
                    .status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                AgentConnectionSnapshot {
                    agent_id: connection.agent_id.to_string(),
                    remote: connection.remote.to_string(),
                    agent_version: connection.agent_version.clone(),
                    connected_since_unix_ms: connection.connected_unix_ms,
                    n_batches_stored: connection.n_batches_stored.load(Ordering::Relaxed),
                    n_events_stored: connection.n_events_stored.load(Ordering::Relaxed),
                    last_heartbeat_unix_ms: heard.then_some(heartbeat_ms),
                    n_buffered_events: heard
                        .then(|| connection.n_buffered_events.load(Ordering::Relaxed)),
                    buffered_bytes: heard
                        .then(|| connection.buffered_bytes.load(Ordering::Relaxed)),
                    oldest_unshipped_age_ms: heard
                        .then(|| connection.oldest_unshipped_age_ms.load(Ordering::Relaxed)),
                    n_dropped_events: heard
                        .then(|| connection.n_dropped_events.load(Ordering::Relaxed)),
                    labels: connection.labels.clone(),
                    protocol_version: connection.protocol_version,
                    config_hash: status.as_ref().map_or_else(
                        || connection.hello_config_hash.clone(),
                        |status| status.config_hash.clone(),
                    ),
                    config_version: status.as_ref().map(|status| status.config_version),
                    drops: status
                        .as_ref()
                        .map(|status| status.drops.clone())
                        .unwrap_or_default(),
                    counters: status
                        .as_ref()
                        .map(|status| status.counters.clone())
                        .unwrap_or_default(),
                    components: status
                        .as_ref()
                        .map(|status| {
                            status
                                .components
                                .iter()
                                .map(|c| ComponentSnapshot {
                                    name: c.name.clone(),
                                    healthy: c.healthy,
                                    detail: c.detail.clone(),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    healthy: status
                        .as_ref()
                        .map(|status| status.components.iter().all(|c| c.healthy)),
                }
            })
            .collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        IngestSnapshot {
            n_connections_total: self.n_connections_total.load(Ordering::Relaxed),
            n_batches_stored: self.n_batches_stored.load(Ordering::Relaxed),
            n_events_stored: self.n_events_stored.load(Ordering::Relaxed),
            agents,
        }
    }

    /// Announces `interval_ms` as the heartbeat interval to agents that connect from now on.
    pub fn set_heartbeat_interval_ms(&self, interval_ms: u32) {
        self.heartbeat_interval_ms
            .store(interval_ms, Ordering::Relaxed);
    }

    /// The heartbeat interval to announce in a Welcome now.
    pub fn heartbeat_interval_ms(&self) -> u32 {
        match self.heartbeat_interval_ms.load(Ordering::Relaxed) {
            0 => HEARTBEAT_INTERVAL_MS,
            ms => ms,
        }
    }

    /// Sends fleet events to `sink` from now on (once; later calls are ignored).
    pub fn set_fleet(&self, sink: mpsc::Sender<FleetEvent>) {
        let _ = self.fleet.set(sink);
    }

    /// A wake-up for the fleet driver; lost when its queue is full (it also polls).
    pub fn notify_fleet(&self, event: FleetEvent) {
        if let Some(fleet) = self.fleet.get() {
            let _ = fleet.try_send(event);
        }
    }

    /// Hands a config result to the fleet driver. Not a wake-up: a result must reach the driver,
    /// so this waits for room in its queue. False when no driver runs or it stopped.
    pub async fn send_config_result(&self, agent_id: Arc<str>, result: ConfigResult) -> bool {
        let Some(fleet) = self.fleet.get() else {
            return false;
        };
        fleet
            .send(FleetEvent::ConfigResult { agent_id, result })
            .await
            .is_ok()
    }

    /// Queues a config push on the newest protocol 2 connection of `agent_id`. False when the
    /// agent is not connected on protocol 2 or its control queue is full (retry later).
    pub fn push_config(&self, agent_id: &str, push: ConfigPush) -> bool {
        let connection = self
            .lock()
            .values()
            .filter(|c| &*c.agent_id == agent_id && c.protocol_version >= FLEET_PROTOCOL_VERSION)
            .max_by_key(|c| c.connected_unix_ms)
            .cloned();
        match connection {
            Some(connection) => connection
                .control
                .try_send(AggregatorMessage::ConfigPush(push))
                .is_ok(),
            None => false,
        }
    }

    /// Records a connection under `key` (unique among open connections) until the returned
    /// guard drops.
    pub fn register(self: &Arc<Self>, connection: NewConnection, key: usize) -> Registered {
        let connection = Arc::new(AgentConnection {
            agent_id: connection.agent_id,
            remote: connection.remote,
            agent_version: connection.agent_version,
            connected_unix_ms: crate::wal::now_unix_ms(),
            n_batches_stored: AtomicU64::new(0),
            n_events_stored: AtomicU64::new(0),
            last_heartbeat_unix_ms: AtomicI64::new(0),
            n_buffered_events: AtomicU64::new(0),
            buffered_bytes: AtomicU64::new(0),
            oldest_unshipped_age_ms: AtomicU64::new(0),
            n_dropped_events: AtomicU64::new(0),
            labels: connection.labels,
            protocol_version: connection.protocol_version,
            hello_config_hash: connection.hello_config_hash,
            status: std::sync::Mutex::new(None),
            control: connection.control,
        });
        self.n_connections_total.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(key, Arc::clone(&connection));
        Registered {
            agents: Arc::clone(self),
            key,
            connection,
        }
    }
}

/// A connection that completed its handshake, as ingest registers it.
#[derive(Debug)]
pub struct NewConnection {
    /// From the verified client certificate.
    pub agent_id: Arc<str>,
    pub remote: SocketAddr,
    /// From the Hello.
    pub agent_version: String,
    pub labels: BTreeMap<String, String>,
    pub hello_config_hash: String,
    /// As negotiated for the Welcome.
    pub protocol_version: u16,
    /// The control stream's single writer (protocol 2 config pushes).
    pub control: mpsc::Sender<AggregatorMessage>,
}

/// Removes its connection from [`ConnectedAgents`] when dropped, however the connection ends.
#[derive(Debug)]
pub struct Registered {
    agents: Arc<ConnectedAgents>,
    key: usize,
    connection: Arc<AgentConnection>,
}

impl Registered {
    pub fn connection(&self) -> &Arc<AgentConnection> {
        &self.connection
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.agents.lock().remove(&self.key);
    }
}

impl AgentConnection {
    /// The protocol version negotiated for this connection.
    pub fn protocol_version(&self) -> u16 {
        self.protocol_version
    }

    /// Records what a heartbeat or status says about the agent's buffer, and when it came.
    pub fn on_buffer(
        &self,
        n_buffered_events: u64,
        buffered_bytes: u64,
        oldest_unshipped_age_ms: u64,
        n_dropped_events: u64,
    ) {
        self.n_buffered_events
            .store(n_buffered_events, Ordering::Relaxed);
        self.buffered_bytes.store(buffered_bytes, Ordering::Relaxed);
        self.oldest_unshipped_age_ms
            .store(oldest_unshipped_age_ms, Ordering::Relaxed);
        self.n_dropped_events
            .store(n_dropped_events, Ordering::Relaxed);
        self.last_heartbeat_unix_ms
            .store(crate::wal::now_unix_ms(), Ordering::Relaxed);
    }

    /// Records a protocol 2 status: its buffer figures and the whole status for snapshots.
    pub fn on_status(&self, status: Status) {
        self.on_buffer(
            status.n_buffered_events,
            status.buffered_bytes,
            status.oldest_unshipped_age_ms,
            status.drops.values().sum(),
        );
        *self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
    }

    /// Counts a batch committed on this connection with `n_new` new events.
    pub fn on_stored(&self, agents: &ConnectedAgents, n_new: u32) {
        self.n_batches_stored.fetch_add(1, Ordering::Relaxed);
        self.n_events_stored
            .fetch_add(u64::from(n_new), Ordering::Relaxed);
        agents.n_batches_stored.fetch_add(1, Ordering::Relaxed);
        agents
            .n_events_stored
            .fetch_add(u64::from(n_new), Ordering::Relaxed);
        metrics::counter!("runnel_aggregator_stored_events_total", "agent_id" => self.agent_id.to_string())
            .increment(u64::from(n_new));
        metrics::counter!("runnel_aggregator_stored_batches_total", "agent_id" => self.agent_id.to_string())
            .increment(1);
    }
}
