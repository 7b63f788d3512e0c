//! The decision stage between decode and buffer: scoring, stateless rules, windows, and the
//! local actions they trigger. Sources hand every decoded batch to [`PipelineHandle::process`]
//! and commit what comes back (events may be changed, dropped, routed, or joined by alerts).
//!
//! Order per batch: [`scoring`] (models write `score` or a named field), then [`rules`] (in
//! config order), then [`windows`] (which see the events the rules kept and may emit alert
//! events), then [`actions`] (dispatched without waiting; never on the source's path).
//!
//! The running pipeline sits behind a [`PipelineHandle`] so a pushed config can replace it
//! atomically: a batch runs entirely on the pipeline it started with.
//!
//! Architecture invariant: the pipeline never touches the buffer on a source's path; alert
//! events go back to the caller, and only the timer task ([`run_timers`]) appends on its own.
//! Agent-made streams (dead letters, drop reports) pass through untouched.

pub mod actions;
pub mod expr;
pub mod rules;
pub mod scoring;
pub mod windows;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use runnel_common::Event;
use runnel_config::AgentConfig;
use tokio::sync::watch;

use crate::buffer::{Buffer, EncodedEvent};

/// Streams the agent makes itself; rules, models and windows never see them.
const AGENT_STREAMS: [&str; 2] = [
    runnel_common::streams::DEAD_LETTERS,
    runnel_common::streams::AGENT_DROPS,
];

/// How often the timer task closes windows whose time has passed.
const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// How often the timer task saves window state (and once more at shutdown).
const PERSIST_INTERVAL: Duration = Duration::from_secs(10);

/// What building a pipeline needs besides its config sections.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// `agent.data_dir`: where window state is kept.
    pub data_dir: PathBuf,
    /// This agent's id (for alert events and action payloads).
    pub agent_id: String,
}

/// One immutable pipeline, built from one config.
pub struct Pipeline {
    scoring: scoring::Scoring,
    rules: rules::Rules,
    windows: windows::Windows,
    actions: actions::Actions,
}

impl Pipeline {
    /// Compiles rules, loads models and restores window state. Spawns nothing, so
    /// `runnel-agent check` can build one to validate a config; fails with the rule, window or
    /// model name in the message.
    pub fn build(config: &AgentConfig, context: &BuildContext) -> anyhow::Result<Pipeline> {
        Ok(Pipeline {
            scoring: scoring::Scoring::build(&config.models)?,
            rules: rules::Rules::build(&config.rules)?,
            windows: windows::Windows::build(&config.windows, context)?,
            actions: actions::Actions::build(&config.rules, &config.windows, context)?,
        })
    }

    /// A pipeline that passes every event through unchanged.
    pub fn passthrough() -> Pipeline {
        Pipeline {
            scoring: scoring::Scoring::default(),
            rules: rules::Rules::default(),
            windows: windows::Windows::default(),
            actions: actions::Actions::default(),
        }
    }

    /// Whether this pipeline has no models, rules or windows.
    pub fn is_passthrough(&self) -> bool {
        self.scoring.is_empty() && self.rules.is_empty() && self.windows.is_empty()
    }

    /// Runs one batch through scoring, rules and windows; returns what to commit.
    pub async fn process(&self, events: Vec<Event>, now_ms: i64) -> Vec<Event> {
        if self.is_passthrough() {
            return events;
        }
        let agent_made = |event: &Event| AGENT_STREAMS.contains(&event.stream.as_str());
        // Events are large: move them only when the batch holds agent-made ones.
        let (mut events, agent_made): (Vec<Event>, Vec<Event>) = if events.iter().any(agent_made) {
            events.into_iter().partition(|event| !agent_made(event))
        } else {
            (events, Vec::new())
        };
        if !self.scoring.is_empty() {
            events = self.scoring.score(events).await;
        }
        let mut fired = Vec::new();
        events = self.rules.apply(events, now_ms, &mut fired);
        let alerts = self.windows.observe(&events, now_ms, &mut fired);
        events.extend(alerts);
        events.extend(agent_made);
        self.actions.dispatch(fired);
        events
    }

    /// Closes windows whose end (plus allowed lateness) has passed by `now_ms`; returns the
    /// alert events they emit.
    pub fn tick(&self, now_ms: i64) -> Vec<Event> {
        let mut fired = Vec::new();
        let alerts = self.windows.tick(now_ms, &mut fired);
        self.actions.dispatch(fired);
        alerts
    }

    /// Saves window state so it survives a restart.
    pub fn persist(&self) -> anyhow::Result<()> {
        self.windows.persist()
    }
}

/// The running pipeline, replaceable while sources use it.
#[derive(Clone)]
pub struct PipelineHandle(Arc<RwLock<Arc<Pipeline>>>);

impl PipelineHandle {
    pub fn new(pipeline: Pipeline) -> PipelineHandle {
        PipelineHandle(Arc::new(RwLock::new(Arc::new(pipeline))))
    }

    /// The pipeline new batches run on.
    pub fn current(&self) -> Arc<Pipeline> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Makes `pipeline` the one new batches run on; returns the old one (batches already on it
    /// finish there). The caller persists the old one's state first if it matters.
    pub fn replace(&self, pipeline: Pipeline) -> Arc<Pipeline> {
        let mut current = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::replace(&mut *current, Arc::new(pipeline))
    }

    /// Runs one batch on the current pipeline.
    pub async fn process(&self, events: Vec<Event>) -> Vec<Event> {
        let pipeline = self.current();
        if pipeline.is_passthrough() {
            return events;
        }
        pipeline.process(events, crate::now_unix_ms()).await
    }
}

/// Closes windows on the wall clock (so a quiet key still alerts), commits the alerts they
/// emit, and saves window state every [`PERSIST_INTERVAL`] and once more at shutdown.
pub async fn run_timers(
    pipeline: PipelineHandle,
    buffer: Buffer,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TICK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_persist = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
        let current = pipeline.current();
        if current.is_passthrough() {
            continue;
        }
        let alerts = current.tick(crate::now_unix_ms());
        if !alerts.is_empty() {
            commit_alerts(&buffer, alerts).await;
        }
        if last_persist.elapsed() >= PERSIST_INTERVAL {
            last_persist = tokio::time::Instant::now();
            persist(&current).await;
        }
    }
    persist(&pipeline.current()).await;
}

async fn persist(pipeline: &Arc<Pipeline>) {
    let pipeline = Arc::clone(pipeline);
    match tokio::task::spawn_blocking(move || pipeline.persist()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(error = format!("{error:#}"), "save window state"),
        Err(error) => tracing::warn!(%error, "save window state task failed"),
    }
}

/// Commits alerts from the timer. The buffer may be full: alerts are retried a few times and
/// then dropped with a warning (the window values are in the log line).
async fn commit_alerts(buffer: &Buffer, alerts: Vec<Event>) {
    let mut encoded = Vec::with_capacity(alerts.len());
    for alert in &alerts {
        match EncodedEvent::encode(alert) {
            Ok(e) => encoded.push(e),
            Err(error) => tracing::warn!(%error, name = %alert.name, "alert does not encode"),
        }
    }
    for attempt in 0..10 {
        match buffer.append(encoded).await {
            Ok(_) => return,
            Err(crate::buffer::AppendError::Full { events, .. }) => {
                encoded = events;
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
            Err(error) => {
                tracing::warn!(%error, n_alerts = alerts.len(), "commit alerts");
                return;
            }
        }
    }
    tracing::warn!(n_alerts = alerts.len(), alerts = ?alerts, "buffer full; alerts dropped");
}
