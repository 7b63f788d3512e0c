//! Fleet configuration: managed config documents, rollouts to label selectors with a canary step,
//! a health gate and rollback, and the desired config version of every agent.
//!
//! [`rollout`] decides (sans IO, time passed in); [`Fleet`] holds the state, persists it in
//! [`store`] (`fleet.db`), and [`drive`] is the thin task that feeds it what ingest reports
//! (connections and statuses in [`crate::registry`], wake-ups and config results as
//! [`FleetEvent`]s) and pushes what it decides: each tick it compares every connected protocol 2
//! agent's reported config version with its desired one and pushes the desired document when
//! they differ. An agent offline during a rollout therefore converges when it reconnects.
//!
//! It depends on the registry, never on the QUIC server in `ingest`.

pub mod api;
pub mod cli;
pub mod rollout;
pub mod selector;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use runnel_common::limits::{MAX_CONFIG_FILE_BYTES, MAX_CONFIG_FILES, MAX_CONFIG_PUSH_BYTES};
use runnel_common::wire::{
    ConfigFile, ConfigOutcome, ConfigPush, ConfigResult, FLEET_PROTOCOL_VERSION,
};
use runnel_config::managed::{self, Bootstrap, ManagedDocument};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::registry::{AgentConnectionSnapshot, ComponentSnapshot, ConnectedAgents, FleetEvent};
use rollout::{AgentView, Phase, Rollout, RolloutSpec, Sample, SetDesired, Step};
use selector::Selector;
use store::{Desired, FleetStore, KnownAgent, StoredFile};

/// Queue between ingest and the driver (of [`FleetEvent`]s, through the registry).
pub const EVENT_QUEUE: usize = 1024;
/// How often the driver advances rollouts and reconciles agents.
const TICK: Duration = Duration::from_millis(500);
/// A push not answered within this is sent again (the connection may have dropped it).
const PUSH_RETRY_MS: i64 = 30_000;
/// An agent's last-seen time is written to `fleet.db` at most this often.
const LAST_SEEN_WRITE_MS: i64 = 30_000;

/// Defaults of a push that does not say.
pub const DEFAULT_CANARY: Step = Step::Percent(10);
pub const DEFAULT_WAVE: Step = Step::Percent(25);

/// The bootstrap file documents are validated against: the smallest valid agent config. Keys a
/// managed document may not set (identity, uplink, HTTP listener) do not change what is valid.
const REPRESENTATIVE_BOOTSTRAP: &str = "[agent]\n\
    data_dir = \"/var/lib/runnel-agent\"\n\
    \n\
    [uplink]\n\
    aggregator = \"aggregator.invalid:9480\"\n\
    server_name = \"aggregator.invalid\"\n\
    ca_cert = \"/etc/runnel/certs/ca.pem\"\n\
    cert = \"/etc/runnel/certs/agent.pem\"\n\
    key = \"/etc/runnel/certs/agent.key\"\n";

/// A push as an operator sends it.
#[derive(Debug, Clone, Default)]
pub struct PushRequest {
    pub document: String,
    /// Files by the name the document uses.
    pub files: BTreeMap<String, Vec<u8>>,
    pub selector: String,
    pub canary: Option<Step>,
    pub wave: Option<Step>,
    pub bake_ms: Option<u64>,
    pub apply_timeout_ms: Option<u64>,
    pub note: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The request or the document is invalid (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// Another rollout is running (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// A document checked and ready to store: its hash and files.
#[derive(Debug, Clone)]
pub struct ValidDocument {
    pub hash: String,
    pub files: Vec<StoredFile>,
}

/// Validates a managed document and its files with the agent's own config code (merged over a
/// representative bootstrap file), and checks the sizes a push may have. Errors name the key.
pub fn validate(
    document: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<ValidDocument, String> {
    if files.len() > MAX_CONFIG_FILES {
        return Err(format!(
            "{} files; a push carries at most {MAX_CONFIG_FILES}",
            files.len()
        ));
    }
    let mut total = document.len();
    for (name, content) in files {
        if content.len() > MAX_CONFIG_FILE_BYTES {
            return Err(format!(
                "file {name:?} is {} bytes; at most {MAX_CONFIG_FILE_BYTES} per file",
                content.len()
            ));
        }
        total += content.len() + name.len();
    }
    if total > MAX_CONFIG_PUSH_BYTES {
        return Err(format!(
            "document and files are {total} bytes; a push is at most {MAX_CONFIG_PUSH_BYTES}"
        ));
    }
    let origin = Path::new("config document");
    let parsed = ManagedDocument::parse(document, origin).map_err(|e| e.to_string())?;
    let hashes: BTreeMap<String, String> = files
        .iter()
        .map(|(name, content)| (name.clone(), managed::sha256_hex(content)))
        .collect();
    let bootstrap = Bootstrap::parse(
        REPRESENTATIVE_BOOTSTRAP,
        Path::new("/etc/runnel/agent.toml"),
    )
    .map_err(|e| format!("representative bootstrap: {e}"))?;
    let unused: Vec<&String> = {
        let named = parsed.model_files();
        hashes.keys().filter(|name| !named.contains(name)).collect()
    };
    if !unused.is_empty() {
        return Err(format!(
            "files {unused:?} are not named by any models[].{} in the document",
            managed::MODEL_FILE_KEY
        ));
    }
    managed::merge(
        &bootstrap,
        &parsed,
        Path::new("/var/lib/runnel-agent/managed/0"),
        &hashes,
    )
    .map_err(|e| e.to_string())?;
    Ok(ValidDocument {
        hash: managed::document_hash(document, &hashes),
        files: files
            .iter()
            .map(|(name, content)| StoredFile {
                name: name.clone(),
                sha256: hashes[name].clone(),
                content: content.clone(),
            })
            .collect(),
    })
}

/// One agent as the fleet sees it: what it reports (if connected) and what it should run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentInfo {
    pub agent_id: String,
    pub connected: bool,
    pub labels: BTreeMap<String, String>,
    pub protocol_version: u16,
    pub agent_version: String,
    pub remote: Option<String>,
    pub connected_since_ms: Option<i64>,
    /// Hash of the effective config (bootstrap merged with the managed document).
    pub config_hash: String,
    /// Managed document version it runs (0: bootstrap only).
    pub config_version: Option<u64>,
    /// Version the fleet wants it to run (None: never targeted).
    pub desired_version: Option<u64>,
    /// `applied vN HASH` or `failed vN: error`.
    pub last_result: Option<String>,
    pub last_seen_ms: i64,
    pub n_buffered_events: Option<u64>,
    pub buffered_bytes: Option<u64>,
    pub oldest_unshipped_age_ms: Option<u64>,
    pub n_dropped_events: Option<u64>,
    pub drops: BTreeMap<String, u64>,
    pub healthy: Option<bool>,
    pub components: Vec<ComponentSnapshot>,
}

#[derive(Default)]
struct State {
    rollouts: Vec<Rollout>,
    desired: BTreeMap<String, Desired>,
    known: BTreeMap<String, KnownAgent>,
    /// Pushes sent and not answered: version and when.
    in_flight: HashMap<String, (u64, i64)>,
    /// The first status sample of each connection, by agent and connection start.
    first_samples: HashMap<(String, i64), Sample>,
    last_seen_written: HashMap<String, i64>,
}

pub struct Fleet {
    store: FleetStore,
    agents: Arc<ConnectedAgents>,
    state: std::sync::Mutex<State>,
    defaults: runnel_config::FleetConfig,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

fn sample_of(connection: &AgentConnectionSnapshot) -> Option<Sample> {
    connection.last_heartbeat_unix_ms.map(|at_ms| Sample {
        at_ms,
        drops: connection.drops.values().sum(),
        errors: connection
            .counters
            .iter()
            .filter(|(name, _)| name.contains("error") || name.contains("fail"))
            .map(|(_, n)| n)
            .sum(),
    })
}

/// The newest connection of each agent.
fn newest_connections(agents: &ConnectedAgents) -> BTreeMap<String, AgentConnectionSnapshot> {
    let mut newest: BTreeMap<String, AgentConnectionSnapshot> = BTreeMap::new();
    for connection in agents.snapshot().agents {
        match newest.get(&connection.agent_id) {
            Some(known) if known.connected_since_unix_ms >= connection.connected_since_unix_ms => {}
            _ => {
                newest.insert(connection.agent_id.clone(), connection);
            }
        }
    }
    newest
}

impl Fleet {
    /// Opens `fleet.db` in `data_dir`; `defaults` are the `[fleet]` settings.
    pub fn open(
        data_dir: &Path,
        agents: Arc<ConnectedAgents>,
        defaults: runnel_config::FleetConfig,
    ) -> anyhow::Result<Fleet> {
        agents.set_heartbeat_interval_ms(
            u32::try_from(defaults.heartbeat_interval_ms).unwrap_or(u32::MAX),
        );
        let store = FleetStore::open(data_dir)?;
        let state = State {
            rollouts: store.rollouts()?,
            desired: store.desired()?,
            known: store.agents()?,
            ..State::default()
        };
        Ok(Fleet {
            store,
            agents,
            state: std::sync::Mutex::new(state),
            defaults,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Validates and stores a document, and starts a rollout of it.
    pub fn push(&self, request: PushRequest, now_ms: i64) -> Result<Rollout, FleetError> {
        let selector = Selector::parse(&request.selector).map_err(FleetError::Invalid)?;
        let valid = validate(&request.document, &request.files).map_err(FleetError::Invalid)?;
        let mut state = self.lock();
        if let Some(active) = state.rollouts.iter().find(|r| r.phase.is_active()) {
            return Err(FleetError::Conflict(format!(
                "rollout {} is still {}; abort it or wait",
                active.id,
                active.phase.as_str()
            )));
        }
        let connected = newest_connections(&self.agents);
        self.observe(&mut state, &connected, now_ms);
        let targets: Vec<(String, u64, bool)> = state
            .known
            .iter()
            .filter(|(_, agent)| selector.matches(&agent.labels))
            .filter(|(_, agent)| agent.protocol_version >= FLEET_PROTOCOL_VERSION)
            .map(|(id, agent)| {
                let previous = state
                    .desired
                    .get(id)
                    .map(|d| d.version)
                    .or(agent.config_version)
                    .unwrap_or(0);
                (id.clone(), previous, connected.contains_key(id))
            })
            .collect();
        if targets.is_empty() {
            return Err(FleetError::Invalid(format!(
                "selector {:?} matches no agent that speaks protocol {FLEET_PROTOCOL_VERSION} \
                 (see `runnel-aggregator agents`)",
                selector.as_str()
            )));
        }
        let version = self.store.add_document(
            &valid.hash,
            &request.note,
            now_ms,
            &request.document,
            &valid.files,
        )?;
        let id = state.rollouts.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let spec = RolloutSpec {
            version,
            hash: valid.hash,
            selector: selector.as_str().to_owned(),
            canary: request.canary.unwrap_or(DEFAULT_CANARY),
            wave: request.wave.unwrap_or(DEFAULT_WAVE),
            bake_ms: request.bake_ms.unwrap_or(self.defaults.default_bake_ms),
            apply_timeout_ms: request
                .apply_timeout_ms
                .unwrap_or(self.defaults.default_apply_timeout_ms),
            note: request.note,
        };
        let rollout = Rollout::new(id, spec, targets, now_ms);
        self.store.save_rollout(&rollout)?;
        tracing::info!(rollout = id, version, selector = %selector, n_targets = rollout.targets.len(), "rollout started");
        state.rollouts.push(rollout);
        self.step_locked(&mut state, &connected, now_ms);
        let rollout = state
            .rollouts
            .last()
            .cloned()
            .ok_or_else(|| FleetError::Internal(anyhow::anyhow!("rollout vanished")))?;
        Ok(rollout)
    }

    pub fn abort(&self, id: u64, now_ms: i64) -> Result<Rollout, FleetError> {
        let mut state = self.lock();
        let rollout = state
            .rollouts
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| FleetError::NotFound(format!("no rollout {id}")))?;
        if !rollout.abort(now_ms) {
            return Err(FleetError::Conflict(format!(
                "rollout {id} is {} already",
                rollout.phase.as_str()
            )));
        }
        let rollout = rollout.clone();
        self.store.save_rollout(&rollout)?;
        Ok(rollout)
    }

    pub fn rollouts(&self) -> Vec<Rollout> {
        self.lock().rollouts.clone()
    }

    pub fn rollout(&self, id: u64) -> Option<Rollout> {
        self.lock().rollouts.iter().find(|r| r.id == id).cloned()
    }

    /// Every agent known to the fleet or connected now, matching `selector`, by id.
    pub fn agents(&self, selector: Option<&Selector>) -> Vec<AgentInfo> {
        let connected = newest_connections(&self.agents);
        let state = self.lock();
        let mut ids: Vec<&String> = state.known.keys().chain(connected.keys()).collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| {
                let known = state.known.get(id);
                let live = connected.get(id);
                let labels = live
                    .map(|c| c.labels.clone())
                    .or_else(|| known.map(|k| k.labels.clone()))
                    .unwrap_or_default();
                if selector.is_some_and(|s| !s.matches(&labels)) {
                    return None;
                }
                let last_result =
                    known
                        .and_then(|k| k.last_result.as_ref())
                        .map(|(version, hash, error)| match error {
                            None => format!("applied v{version} {hash}"),
                            Some(error) => format!("failed v{version}: {error}"),
                        });
                Some(AgentInfo {
                    agent_id: id.clone(),
                    connected: live.is_some(),
                    labels,
                    protocol_version: live
                        .map(|c| c.protocol_version)
                        .or(known.map(|k| k.protocol_version))
                        .unwrap_or(0),
                    agent_version: live
                        .map(|c| c.agent_version.clone())
                        .or(known.map(|k| k.agent_version.clone()))
                        .unwrap_or_default(),
                    remote: live.map(|c| c.remote.clone()),
                    connected_since_ms: live.map(|c| c.connected_since_unix_ms),
                    config_hash: live
                        .map(|c| c.config_hash.clone())
                        .or(known.map(|k| k.config_hash.clone()))
                        .unwrap_or_default(),
                    config_version: live
                        .and_then(|c| c.config_version)
                        .or(known.and_then(|k| k.config_version)),
                    desired_version: state.desired.get(id).map(|d| d.version),
                    last_result,
                    last_seen_ms: live
                        .map(|c| {
                            c.last_heartbeat_unix_ms
                                .unwrap_or(c.connected_since_unix_ms)
                        })
                        .or(known.map(|k| k.last_seen_ms))
                        .unwrap_or(0),
                    n_buffered_events: live.and_then(|c| c.n_buffered_events),
                    buffered_bytes: live.and_then(|c| c.buffered_bytes),
                    oldest_unshipped_age_ms: live.and_then(|c| c.oldest_unshipped_age_ms),
                    n_dropped_events: live.and_then(|c| c.n_dropped_events),
                    drops: live.map(|c| c.drops.clone()).unwrap_or_default(),
                    healthy: live.and_then(|c| c.healthy),
                    components: live.map(|c| c.components.clone()).unwrap_or_default(),
                })
            })
            .collect()
    }

    /// An agent answered a push.
    pub fn on_result(&self, agent_id: &str, result: &ConfigResult, now_ms: i64) {
        let mut state = self.lock();
        // The push stays in flight until a status shows the version running (that status is
        // sent right after this result): clearing it here would push the same version again.
        let error = match &result.outcome {
            ConfigOutcome::Applied => None,
            ConfigOutcome::Failed { error } => Some(error.clone()),
        };
        let outcome = if error.is_some() { "failed" } else { "applied" };
        ::metrics::counter!("runnel_aggregator_config_results_total", "outcome" => outcome)
            .increment(1);
        if error.is_some()
            && let Some(desired) = state.desired.get(agent_id).copied()
            && desired.version == result.version
        {
            let desired = Desired {
                failed_version: Some(result.version),
                ..desired
            };
            state.desired.insert(agent_id.to_owned(), desired);
            self.persist(self.store.set_desired(agent_id, desired));
        }
        let known = state.known.entry(agent_id.to_owned()).or_default();
        known.last_result = Some((result.version, result.hash.clone(), error));
        let known = known.clone();
        self.persist(self.store.save_agent(agent_id, &known));
        for rollout in &mut state.rollouts {
            let before = rollout.updated_ms;
            rollout.on_result(agent_id, result, now_ms);
            if rollout.updated_ms != before {
                self.persist(self.store.save_rollout(rollout));
            }
        }
    }

    fn persist(&self, result: anyhow::Result<()>) {
        if let Err(error) = result {
            tracing::error!(error = format!("{error:#}"), "fleet.db write failed");
        }
    }

    /// Advances rollouts and pushes desired configs to connected agents that do not run them.
    pub fn step(&self, now_ms: i64) {
        let connected = newest_connections(&self.agents);
        let mut state = self.lock();
        self.step_locked(&mut state, &connected, now_ms);
    }

    /// Records what connected agents report in `known`.
    fn observe(
        &self,
        state: &mut State,
        connected: &BTreeMap<String, AgentConnectionSnapshot>,
        now_ms: i64,
    ) {
        for (id, c) in connected {
            let seen = c
                .last_heartbeat_unix_ms
                .unwrap_or(c.connected_since_unix_ms);
            if !state.known.contains_key(id) && !state.desired.contains_key(id) {
                self.adopt(state, id, c, now_ms);
            }
            let known = state.known.entry(id.clone()).or_default();
            let changed = known.labels != c.labels
                || known.agent_version != c.agent_version
                || known.config_hash != c.config_hash
                || known.protocol_version != c.protocol_version
                || (c.config_version.is_some() && known.config_version != c.config_version);
            known.labels.clone_from(&c.labels);
            known.agent_version.clone_from(&c.agent_version);
            known.config_hash.clone_from(&c.config_hash);
            known.protocol_version = c.protocol_version;
            if c.config_version.is_some() {
                known.config_version = c.config_version;
            }
            known.last_seen_ms = seen;
            let known = known.clone();
            let written = state.last_seen_written.get(id).copied().unwrap_or(i64::MIN);
            if changed || now_ms.saturating_sub(written) >= LAST_SEEN_WRITE_MS {
                state.last_seen_written.insert(id.clone(), now_ms);
                self.persist(self.store.save_agent(id, &known));
            }
            if let Some(sample) = sample_of(c) {
                state
                    .first_samples
                    .entry((id.clone(), c.connected_since_unix_ms))
                    .or_insert(sample);
            }
        }
        state.first_samples.retain(|(id, since), _| {
            connected
                .get(id)
                .is_some_and(|c| c.connected_since_unix_ms == *since)
        });
    }

    /// An agent seen for the first time gets the version of the newest completed rollout whose
    /// selector matches its labels: a new agent joins its peers' config.
    fn adopt(&self, state: &mut State, id: &str, c: &AgentConnectionSnapshot, now_ms: i64) {
        if c.protocol_version < FLEET_PROTOCOL_VERSION {
            return;
        }
        let Some(rollout) = state.rollouts.iter_mut().rev().find(|r| {
            r.phase == Phase::Completed
                && Selector::parse(&r.spec.selector).is_ok_and(|s| s.matches(&c.labels))
        }) else {
            return;
        };
        let version = rollout.spec.version;
        rollout.history.push(rollout::HistoryEntry {
            at_ms: now_ms,
            message: format!("{id}: new agent matching the selector, given version {version}"),
        });
        self.persist(self.store.save_rollout(rollout));
        let desired = Desired {
            version,
            failed_version: None,
        };
        state.desired.insert(id.to_owned(), desired);
        self.persist(self.store.set_desired(id, desired));
        tracing::info!(agent_id = %id, version, rollout = rollout.id, "new agent adopts the fleet's config");
    }

    fn step_locked(
        &self,
        state: &mut State,
        connected: &BTreeMap<String, AgentConnectionSnapshot>,
        now_ms: i64,
    ) {
        self.observe(state, connected, now_ms);
        if state.rollouts.iter().any(|r| r.phase.is_active()) {
            let views: BTreeMap<String, AgentView> = state
                .known
                .iter()
                .map(|(id, known)| {
                    let live = connected.get(id);
                    let view = AgentView {
                        connected: live.is_some(),
                        config_version: live
                            .and_then(|c| c.config_version)
                            .or(known.config_version),
                        healthy: live.and_then(|c| c.healthy),
                        first: live.and_then(|c| {
                            state
                                .first_samples
                                .get(&(id.clone(), c.connected_since_unix_ms))
                                .copied()
                        }),
                        last: live.and_then(sample_of),
                    };
                    (id.clone(), view)
                })
                .collect();
            let mut actions: Vec<SetDesired> = Vec::new();
            for rollout in state.rollouts.iter_mut().filter(|r| r.phase.is_active()) {
                let before = (rollout.updated_ms, rollout.phase);
                actions.extend(rollout.tick(now_ms, &views));
                if (rollout.updated_ms, rollout.phase) != before {
                    if rollout.phase != before.1 {
                        tracing::info!(
                            rollout = rollout.id,
                            phase = rollout.phase.as_str(),
                            reason = rollout.reason.as_deref().unwrap_or(""),
                            "rollout phase"
                        );
                    }
                    self.persist(self.store.save_rollout(rollout));
                }
            }
            for action in actions {
                let desired = Desired {
                    version: action.version,
                    failed_version: None,
                };
                state.desired.insert(action.agent_id.clone(), desired);
                state.in_flight.remove(&action.agent_id);
                self.persist(self.store.set_desired(&action.agent_id, desired));
            }
        }
        self.reconcile(state, connected, now_ms);
    }

    /// Pushes the desired document to each connected protocol 2 agent that runs another one.
    fn reconcile(
        &self,
        state: &mut State,
        connected: &BTreeMap<String, AgentConnectionSnapshot>,
        now_ms: i64,
    ) {
        for (id, c) in connected {
            if c.protocol_version < FLEET_PROTOCOL_VERSION {
                continue;
            }
            let Some(desired) = state.desired.get(id).copied() else {
                continue;
            };
            // Until its first status the agent's version is unknown: wait for it.
            let Some(running) = c.config_version else {
                continue;
            };
            if running == desired.version {
                state.in_flight.remove(id);
                continue;
            }
            if desired.failed_version == Some(desired.version) {
                continue;
            }
            if state
                .in_flight
                .get(id)
                .is_some_and(|(v, at)| *v == desired.version && now_ms - at < PUSH_RETRY_MS)
            {
                continue;
            }
            let push = match self.config_push(desired.version) {
                Ok(push) => push,
                Err(error) => {
                    tracing::error!(agent_id = %id, version = desired.version, error = format!("{error:#}"), "cannot load the desired config");
                    continue;
                }
            };
            if self.agents.push_config(id, push) {
                ::metrics::counter!("runnel_aggregator_config_pushes_total").increment(1);
                tracing::info!(agent_id = %id, version = desired.version, running, "config pushed");
                state
                    .in_flight
                    .insert(id.clone(), (desired.version, now_ms));
            }
        }
    }

    /// The push of document `version` (0: the empty document, the bootstrap file alone).
    pub fn config_push(&self, version: u64) -> anyhow::Result<ConfigPush> {
        if version == 0 {
            return Ok(ConfigPush {
                version: 0,
                hash: managed::document_hash("", &BTreeMap::new()),
                document: String::new(),
                files: Vec::new(),
            });
        }
        let document = self
            .store
            .document(version)?
            .ok_or_else(|| anyhow::anyhow!("config document version {version} is not stored"))?;
        Ok(ConfigPush {
            version,
            hash: document.hash,
            document: document.text,
            files: document
                .files
                .into_iter()
                .map(|file| ConfigFile {
                    name: file.name,
                    sha256: file.sha256,
                    content: file.content,
                })
                .collect(),
        })
    }
}

/// The driver task: feeds events to the fleet and ticks it until `shutdown`. Each step may
/// write `fleet.db`, so it runs on the blocking pool.
pub async fn drive(
    fleet: Arc<Fleet>,
    mut events: mpsc::Receiver<FleetEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let result = tokio::select! {
            event = events.recv() => match event {
                Some(FleetEvent::ConfigResult { agent_id, result }) => Some((agent_id, result)),
                Some(FleetEvent::Connected { .. }) => None,
                // Statuses are read from the registry at the next tick.
                Some(FleetEvent::Status { .. }) => continue,
                None => return,
            },
            _ = ticker.tick() => None,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let fleet = Arc::clone(&fleet);
        let stepped = tokio::task::spawn_blocking(move || {
            if let Some((agent_id, result)) = result {
                fleet.on_result(&agent_id, &result, crate::wal::now_unix_ms());
            }
            fleet.step(crate::wal::now_unix_ms());
        })
        .await;
        if let Err(error) = stepped {
            tracing::error!(%error, "fleet step failed");
        }
    }
}

/// Phase names, for the API and SQL.
pub fn phase_name(phase: Phase) -> &'static str {
    phase.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_document_in_fleet_md_validates() {
        let doc = include_str!("../../../docs/FLEET.md");
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let text = &doc[start..];
        let text = &text[..text.find("```").expect("end of block")];
        validate(text, &[("fraud.onnx".to_owned(), b"model".to_vec())].into())
            .unwrap_or_else(|error| panic!("{error}\n{text}"));
    }

    #[test]
    fn representative_bootstrap_is_valid_and_documents_are_checked() {
        let valid = validate("[buffer]\nwhen_full = \"drop_oldest\"\n", &BTreeMap::new())
            .expect("a buffer policy is a valid document");
        assert_eq!(valid.hash.len(), 64);
        let error = validate("[buffer]\nwhen_full = \"explode\"\n", &BTreeMap::new())
            .expect_err("bad value");
        assert!(error.contains("buffer.when_full"), "{error}");
        let error = validate("[uplink]\naggregator = \"x:1\"\n", &BTreeMap::new())
            .expect_err("not a managed key");
        assert!(error.contains("uplink"), "{error}");
        let error = validate("", &[("m.onnx".to_owned(), vec![1])].into()).expect_err("unused");
        assert!(error.contains("m.onnx"), "{error}");
        let error = validate(
            "[[rules]]\nname = \"r\"\nwhen = \"name ==\"\ndrop = true\n",
            &BTreeMap::new(),
        )
        .expect_err("bad expression");
        assert!(error.contains("rules[0].when"), "{error}");
        let model = "[[models]]\nname = \"m\"\npath = \"m.onnx\"\n[[models.inputs]]\nfield = \"attrs.amount\"\n";
        let error = validate(model, &BTreeMap::new()).expect_err("missing model file");
        assert!(error.contains("models[0].path"), "{error}");
        validate(model, &[("m.onnx".to_owned(), vec![1, 2])].into())
            .expect("a model file that is sent validates (its content is the agent's to check)");
    }
}
