//! The rollout state machine, sans IO: it is told what the agents report and what time it is,
//! and answers with the config version each agent should run. The driver ([`super::Fleet`])
//! persists those and pushes them.
//!
//! Phases: `canary` (push to the canary group, wait until each reports `applied` and runs the
//! version) -> `baking` (wait the bake time) -> gate (canaries still run it, healthy, drop and
//! error rates not worse than before the push) -> `waves` (the rest, one wave at a time; a wave
//! is done when its connected agents answered) -> `completed`. A failed canary, a canary that
//! does not apply in time, or a failed gate -> `rolled_back` (canaries get their previous
//! version again). A failure in a wave -> `failed` (the rollout stops; agents that failed keep
//! their last-good config). `aborted` stops it where it is.

use std::collections::BTreeMap;

use runnel_common::wire::{ConfigOutcome, ConfigResult};
use serde::{Deserialize, Serialize};

/// How many agents a step takes: a count or a percentage of the targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Step {
    Count(u32),
    Percent(u8),
}

impl From<Step> for String {
    fn from(step: Step) -> String {
        step.to_string()
    }
}

impl TryFrom<String> for Step {
    type Error = String;

    fn try_from(text: String) -> Result<Step, String> {
        Step::parse(&text)
    }
}

impl Step {
    /// `10%` or `3`.
    pub fn parse(text: &str) -> Result<Step, String> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            match percent.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(Step::Percent(p)),
                _ => Err(format!("{text:?} must be a percentage from 1% to 100%")),
            }
        } else {
            match text.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(Step::Count(n)),
                _ => Err(format!(
                    "{text:?} must be a count of agents (1 or more) or a percentage such as 10%"
                )),
            }
        }
    }

    /// Agents this step takes out of `n` (at least one when `n > 0`).
    pub fn of(self, n: usize) -> usize {
        let k = match self {
            Step::Count(k) => k as usize,
            Step::Percent(p) => (n * usize::from(p)).div_ceil(100),
        };
        k.clamp(usize::from(n > 0), n)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Count(n) => write!(f, "{n}"),
            Step::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What an operator asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// The document version to roll out, and its hash (`ConfigPush.hash`).
    pub version: u64,
    pub hash: String,
    pub selector: String,
    pub canary: Step,
    pub wave: Step,
    pub bake_ms: u64,
    /// How long a pushed agent has to answer before it counts as failed.
    pub apply_timeout_ms: u64,
    pub note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Canary,
    Baking,
    Waves,
    Completed,
    RolledBack,
    Failed,
    Aborted,
}

impl Phase {
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Canary | Phase::Baking | Phase::Waves)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Canary => "canary",
            Phase::Baking => "baking",
            Phase::Waves => "waves",
            Phase::Completed => "completed",
            Phase::RolledBack => "rolled_back",
            Phase::Failed => "failed",
            Phase::Aborted => "aborted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum TargetState {
    /// Not reached yet.
    Waiting,
    /// Desired version set; no answer yet (an offline agent stays here until it reconnects).
    Pushed {
        at_ms: i64,
    },
    Applied {
        at_ms: i64,
    },
    Failed {
        at_ms: i64,
        error: String,
    },
    /// A canary given its previous version again.
    RolledBack {
        at_ms: i64,
    },
}

/// Counters of one agent at one moment (from its status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sample {
    pub at_ms: i64,
    pub drops: u64,
    pub errors: u64,
}

impl Sample {
    /// Drops and errors per second from `self` to `later`; a counter that went down (the agent
    /// restarted) counts from zero.
    fn rates_to(&self, later: &Sample) -> Option<(f64, f64)> {
        let span_ms = later.at_ms - self.at_ms;
        if span_ms < 500 {
            return None;
        }
        let delta = |before: u64, after: u64| {
            if after >= before {
                after - before
            } else {
                after
            }
        };
        let secs = span_ms as f64 / 1000.0;
        Some((
            delta(self.drops, later.drops) as f64 / secs,
            delta(self.errors, later.errors) as f64 / secs,
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub agent_id: String,
    /// The version it was told to run before this rollout (0: its bootstrap file only).
    pub previous_version: u64,
    /// 0: canary; 1, 2, ...: waves.
    pub group: u32,
    #[serde(flatten)]
    pub state: TargetState,
    /// Drop and error rates per second before the push (None: not enough data).
    pub before: Option<(f64, f64)>,
    /// Counters when it was first seen running the new version.
    pub applied_sample: Option<Sample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at_ms: i64,
    pub message: String,
}

/// What the driver knows of an agent now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentView {
    pub connected: bool,
    /// Managed config version from its last status.
    pub config_version: Option<u64>,
    /// All components healthy (None: unknown).
    pub healthy: Option<bool>,
    /// First status of this connection, and the last one.
    pub first: Option<Sample>,
    pub last: Option<Sample>,
}

/// The driver sets `agent_id`'s desired config version to `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDesired {
    pub agent_id: String,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: u64,
    pub spec: RolloutSpec,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub phase: Phase,
    /// When baking ends (phase `baking`).
    pub bake_until_ms: Option<i64>,
    /// The wave being rolled out (phase `waves`).
    pub wave: u32,
    pub n_waves: u32,
    /// Why it ended if not `completed`.
    pub reason: Option<String>,
    pub targets: Vec<Target>,
    pub history: Vec<HistoryEntry>,
}

/// A drop or error rate is "worse" above `before * RATE_FACTOR + RATE_SLACK_PER_SEC`.
const RATE_FACTOR: f64 = 1.2;
const RATE_SLACK_PER_SEC: f64 = 0.1;

impl Rollout {
    /// A rollout of `spec` to `targets` (agent id, version it runs now, connected). Canaries are
    /// taken among connected agents first, in id order; the rest are split into waves.
    pub fn new(
        id: u64,
        spec: RolloutSpec,
        mut targets: Vec<(String, u64, bool)>,
        now_ms: i64,
    ) -> Rollout {
        targets.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        let n = targets.len();
        let n_canary = spec.canary.of(n);
        let n_rest = n - n_canary;
        let wave_size = spec.wave.of(n_rest).max(1);
        let n_waves = n_rest.div_ceil(wave_size) as u32;
        let targets = targets
            .into_iter()
            .enumerate()
            .map(|(idx, (agent_id, previous_version, _))| Target {
                agent_id,
                previous_version,
                group: if idx < n_canary {
                    0
                } else {
                    1 + ((idx - n_canary) / wave_size) as u32
                },
                state: TargetState::Waiting,
                before: None,
                applied_sample: None,
            })
            .collect();
        let mut rollout = Rollout {
            id,
            spec,
            created_ms: now_ms,
            updated_ms: now_ms,
            phase: Phase::Canary,
            bake_until_ms: None,
            wave: 0,
            n_waves,
            reason: None,
            targets,
            history: Vec::new(),
        };
        rollout.log(
            now_ms,
            format!(
                "created: version {} to {} agents matching {:?} ({} canaries, {} waves)",
                rollout.spec.version, n, rollout.spec.selector, n_canary, n_waves
            ),
        );
        rollout
    }

    fn log(&mut self, now_ms: i64, message: String) {
        self.updated_ms = now_ms;
        self.history.push(HistoryEntry {
            at_ms: now_ms,
            message,
        });
    }

    /// Pushes to group `group`: their desired version becomes the rollout's.
    fn start_group(
        &mut self,
        group: u32,
        now_ms: i64,
        views: &BTreeMap<String, AgentView>,
        out: &mut Vec<SetDesired>,
    ) {
        let mut names = Vec::new();
        for target in self.targets.iter_mut().filter(|t| t.group == group) {
            let view = views.get(&target.agent_id);
            target.before = view
                .and_then(|v| Some(v.first?.rates_to(&v.last?)))
                .flatten();
            target.state = TargetState::Pushed { at_ms: now_ms };
            out.push(SetDesired {
                agent_id: target.agent_id.clone(),
                version: self.spec.version,
            });
            names.push(target.agent_id.clone());
        }
        let what = if group == 0 {
            "canaries".to_owned()
        } else {
            format!("wave {group}/{}", self.n_waves)
        };
        self.log(now_ms, format!("pushed to {what}: {}", names.join(", ")));
    }

    /// An agent's answer to a push.
    pub fn on_result(&mut self, agent_id: &str, result: &ConfigResult, now_ms: i64) {
        if result.version != self.spec.version {
            return;
        }
        let Some(target) = self.targets.iter_mut().find(|t| t.agent_id == agent_id) else {
            return;
        };
        if !matches!(
            target.state,
            TargetState::Pushed { .. } | TargetState::Applied { .. }
        ) {
            return;
        }
        let message = match &result.outcome {
            ConfigOutcome::Applied => {
                target.state = TargetState::Applied { at_ms: now_ms };
                format!("{agent_id}: applied version {}", result.version)
            }
            ConfigOutcome::Failed { error } => {
                target.state = TargetState::Failed {
                    at_ms: now_ms,
                    error: error.clone(),
                };
                format!(
                    "{agent_id}: failed to apply version {}: {error}",
                    result.version
                )
            }
        };
        self.log(now_ms, message);
    }

    pub fn abort(&mut self, now_ms: i64) -> bool {
        if !self.phase.is_active() {
            return false;
        }
        self.phase = Phase::Aborted;
        self.reason = Some("aborted by an operator".into());
        self.log(now_ms, "aborted".into());
        true
    }

    /// Advances the rollout; returns the desired versions to set.
    pub fn tick(&mut self, now_ms: i64, views: &BTreeMap<String, AgentView>) -> Vec<SetDesired> {
        let mut out = Vec::new();
        // Counters when each applied agent is first seen running the version.
        for target in &mut self.targets {
            if target.applied_sample.is_none()
                && matches!(target.state, TargetState::Applied { .. })
                && let Some(view) = views.get(&target.agent_id)
                && view.config_version == Some(self.spec.version)
            {
                target.applied_sample = view.last;
            }
        }
        // Loops while a phase change can make progress at the same instant.
        for _ in 0..=self.n_waves + 3 {
            let before = (self.phase, self.wave);
            match self.phase {
                Phase::Canary => self.tick_canary(now_ms, views, &mut out),
                Phase::Baking => self.tick_baking(now_ms, views, &mut out),
                Phase::Waves => self.tick_waves(now_ms, views, &mut out),
                _ => {}
            }
            if (self.phase, self.wave) == before {
                break;
            }
        }
        out
    }

    fn tick_canary(
        &mut self,
        now_ms: i64,
        views: &BTreeMap<String, AgentView>,
        out: &mut Vec<SetDesired>,
    ) {
        if self
            .targets
            .iter()
            .any(|t| t.group == 0 && t.state == TargetState::Waiting)
        {
            self.start_group(0, now_ms, views, out);
        }
        let mut all_running = true;
        for target in self.targets.iter().filter(|t| t.group == 0) {
            match &target.state {
                TargetState::Failed { error, .. } => {
                    let reason = format!("canary {} failed: {error}", target.agent_id);
                    return self.roll_back(now_ms, reason, out);
                }
                TargetState::Pushed { at_ms } | TargetState::Applied { at_ms }
                    if target.applied_sample.is_none() =>
                {
                    all_running = false;
                    if now_ms - at_ms > self.spec.apply_timeout_ms as i64 {
                        let reason = format!(
                            "canary {} did not report running version {} within {} ms",
                            target.agent_id, self.spec.version, self.spec.apply_timeout_ms
                        );
                        return self.roll_back(now_ms, reason, out);
                    }
                }
                _ => {}
            }
        }
        if all_running {
            self.phase = Phase::Baking;
            self.bake_until_ms = Some(now_ms + self.spec.bake_ms as i64);
            let message = format!(
                "canaries run version {}; baking {} ms",
                self.spec.version, self.spec.bake_ms
            );
            self.log(now_ms, message);
        }
    }

    fn tick_baking(
        &mut self,
        now_ms: i64,
        views: &BTreeMap<String, AgentView>,
        out: &mut Vec<SetDesired>,
    ) {
        let until = self.bake_until_ms.unwrap_or(now_ms);
        let deadline = until + self.spec.apply_timeout_ms as i64;
        let mut problems = Vec::new();
        let mut waiting = false;
        for target in self.targets.iter().filter(|t| t.group == 0) {
            let id = &target.agent_id;
            let Some(view) = views.get(id).filter(|v| v.connected) else {
                waiting = true;
                problems.push(format!("canary {id} is not connected"));
                continue;
            };
            if view.config_version != Some(self.spec.version) {
                problems.push(format!(
                    "canary {id} runs version {} instead of {}",
                    view.config_version.map_or("?".into(), |v| v.to_string()),
                    self.spec.version
                ));
                continue;
            }
            if view.healthy == Some(false) {
                // Unhealthy at any point of the bake fails the gate at once.
                problems.push(format!("canary {id} reports an unhealthy component"));
                return self.roll_back(now_ms, problems.join("; "), out);
            }
            if now_ms < until {
                continue;
            }
            let after = target
                .applied_sample
                .zip(view.last)
                .and_then(|(applied, last)| applied.rates_to(&last));
            if let Some((drops_after, errors_after)) = after {
                let (drops_before, errors_before) = target.before.unwrap_or((0.0, 0.0));
                if drops_after > drops_before * RATE_FACTOR + RATE_SLACK_PER_SEC {
                    problems.push(format!(
                        "canary {id} drops {drops_after:.2}/s, {drops_before:.2}/s before"
                    ));
                }
                if errors_after > errors_before * RATE_FACTOR + RATE_SLACK_PER_SEC {
                    problems.push(format!(
                        "canary {id} has {errors_after:.2} errors/s, {errors_before:.2}/s before"
                    ));
                }
            }
        }
        if now_ms < until {
            return;
        }
        if problems.is_empty() {
            self.log(now_ms, "health gate passed".into());
            self.phase = Phase::Waves;
            self.wave = 0;
        } else if waiting && now_ms < deadline {
            // A canary that reconnects in time is judged then.
        } else {
            self.roll_back(
                now_ms,
                format!("health gate failed: {}", problems.join("; ")),
                out,
            );
        }
    }

    fn tick_waves(
        &mut self,
        now_ms: i64,
        views: &BTreeMap<String, AgentView>,
        out: &mut Vec<SetDesired>,
    ) {
        if self.wave > 0 {
            // The current wave is done when every connected agent of it answered.
            let mut failures = Vec::new();
            let mut pending = false;
            for target in self.targets.iter().filter(|t| t.group == self.wave) {
                let connected = views.get(&target.agent_id).is_some_and(|v| v.connected);
                match &target.state {
                    TargetState::Failed { error, .. } => {
                        failures.push(format!("{}: {error}", target.agent_id));
                    }
                    TargetState::Pushed { at_ms } if connected => {
                        if now_ms - at_ms > self.spec.apply_timeout_ms as i64 {
                            failures.push(format!(
                                "{}: no answer within {} ms",
                                target.agent_id, self.spec.apply_timeout_ms
                            ));
                        } else {
                            pending = true;
                        }
                    }
                    _ => {}
                }
            }
            if !failures.is_empty() {
                // Agents that failed keep their last-good config: stop telling them otherwise.
                for target in self.targets.iter().filter(|t| t.group == self.wave) {
                    if matches!(target.state, TargetState::Failed { .. }) {
                        out.push(SetDesired {
                            agent_id: target.agent_id.clone(),
                            version: target.previous_version,
                        });
                    }
                }
                self.phase = Phase::Failed;
                let reason = format!("wave {} failed: {}", self.wave, failures.join("; "));
                self.reason = Some(reason.clone());
                self.log(now_ms, reason);
                return;
            }
            if pending {
                return;
            }
        }
        if self.wave >= self.n_waves {
            self.phase = Phase::Completed;
            let offline = self
                .targets
                .iter()
                .filter(|t| matches!(t.state, TargetState::Pushed { .. }))
                .count();
            let message = if offline > 0 {
                format!("completed; {offline} agents offline get the version when they reconnect")
            } else {
                "completed".into()
            };
            self.log(now_ms, message);
            return;
        }
        self.wave += 1;
        self.start_group(self.wave, now_ms, views, out);
    }

    fn roll_back(&mut self, now_ms: i64, reason: String, out: &mut Vec<SetDesired>) {
        let mut names = Vec::new();
        for target in self.targets.iter_mut().filter(|t| t.group == 0) {
            if matches!(target.state, TargetState::Waiting) {
                continue;
            }
            out.push(SetDesired {
                agent_id: target.agent_id.clone(),
                version: target.previous_version,
            });
            if !matches!(target.state, TargetState::Failed { .. }) {
                target.state = TargetState::RolledBack { at_ms: now_ms };
            }
            names.push(format!(
                "{} -> version {}",
                target.agent_id, target.previous_version
            ));
        }
        self.phase = Phase::RolledBack;
        self.reason = Some(reason.clone());
        self.log(
            now_ms,
            format!("rolled back ({reason}): {}", names.join(", ")),
        );
    }

    /// Counts per target state, for summaries.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for target in &self.targets {
            let key = match target.state {
                TargetState::Waiting => "waiting",
                TargetState::Pushed { .. } => "pushed",
                TargetState::Applied { .. } => "applied",
                TargetState::Failed { .. } => "failed",
                TargetState::RolledBack { .. } => "rolled_back",
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(canary: Step, wave: Step) -> RolloutSpec {
        RolloutSpec {
            version: 7,
            hash: "h7".into(),
            selector: "site=berlin".into(),
            canary,
            wave,
            bake_ms: 10_000,
            apply_timeout_ms: 5_000,
            note: String::new(),
        }
    }

    fn applied() -> ConfigResult {
        ConfigResult {
            version: 7,
            hash: "h7".into(),
            outcome: ConfigOutcome::Applied,
        }
    }

    fn view(version: u64, at_ms: i64, drops: u64) -> AgentView {
        AgentView {
            connected: true,
            config_version: Some(version),
            healthy: Some(true),
            first: Some(Sample {
                at_ms: 0,
                drops: 0,
                errors: 0,
            }),
            last: Some(Sample {
                at_ms,
                drops,
                errors: 0,
            }),
        }
    }

    fn views(entries: &[(&str, AgentView)]) -> BTreeMap<String, AgentView> {
        entries
            .iter()
            .map(|(id, v)| ((*id).to_owned(), v.clone()))
            .collect()
    }

    fn targets(ids: &[&str]) -> Vec<(String, u64, bool)> {
        ids.iter().map(|id| ((*id).to_owned(), 3, true)).collect()
    }

    #[test]
    fn steps() {
        assert_eq!(Step::parse("10%"), Ok(Step::Percent(10)));
        assert_eq!(Step::parse("2"), Ok(Step::Count(2)));
        assert!(Step::parse("0").is_err() && Step::parse("101%").is_err());
        assert_eq!(Step::Percent(10).of(3), 1);
        assert_eq!(Step::Percent(50).of(3), 2);
        assert_eq!(Step::Count(5).of(3), 3);
        assert_eq!(Step::Count(5).of(0), 0);
    }

    #[test]
    fn canary_bake_gate_waves_complete() {
        let mut r = Rollout::new(
            1,
            spec(Step::Count(1), Step::Count(1)),
            targets(&["a", "b", "c"]),
            1_000,
        );
        assert_eq!(r.n_waves, 2);
        let v = views(&[
            ("a", view(3, 1_000, 0)),
            ("b", view(3, 1_000, 0)),
            ("c", view(3, 1_000, 0)),
        ]);
        let out = r.tick(1_000, &v);
        assert_eq!(
            out,
            vec![SetDesired {
                agent_id: "a".into(),
                version: 7
            }]
        );
        assert_eq!(r.phase, Phase::Canary);
        r.on_result("a", &applied(), 2_000);
        // Applied but not yet seen running it: still canary.
        assert!(r.tick(2_000, &v).is_empty());
        assert_eq!(r.phase, Phase::Canary);
        let v = views(&[
            ("a", view(7, 2_500, 0)),
            ("b", view(3, 2_500, 0)),
            ("c", view(3, 2_500, 0)),
        ]);
        r.tick(2_500, &v);
        assert_eq!(r.phase, Phase::Baking);
        assert!(r.tick(12_000, &v).is_empty(), "still baking");
        let v = views(&[
            ("a", view(7, 12_600, 0)),
            ("b", view(3, 12_600, 0)),
            ("c", view(3, 12_600, 0)),
        ]);
        let out = r.tick(12_600, &v);
        assert_eq!(r.phase, Phase::Waves);
        assert_eq!(
            out,
            vec![SetDesired {
                agent_id: "b".into(),
                version: 7
            }]
        );
        r.on_result("b", &applied(), 13_000);
        let out = r.tick(13_000, &v);
        assert_eq!(
            out,
            vec![SetDesired {
                agent_id: "c".into(),
                version: 7
            }]
        );
        r.on_result("c", &applied(), 13_500);
        assert!(r.tick(13_500, &v).is_empty());
        assert_eq!(r.phase, Phase::Completed);
        assert_eq!(r.counts().get("applied"), Some(&3));
    }

    #[test]
    fn failed_canary_rolls_back() {
        let mut r = Rollout::new(
            1,
            spec(Step::Count(2), Step::Count(1)),
            targets(&["a", "b", "c"]),
            0,
        );
        let v = views(&[
            ("a", view(3, 0, 0)),
            ("b", view(3, 0, 0)),
            ("c", view(3, 0, 0)),
        ]);
        assert_eq!(r.tick(0, &v).len(), 2);
        r.on_result("a", &applied(), 100);
        r.on_result(
            "b",
            &ConfigResult {
                version: 7,
                hash: "h7".into(),
                outcome: ConfigOutcome::Failed {
                    error: "port taken".into(),
                },
            },
            200,
        );
        let out = r.tick(300, &v);
        assert_eq!(r.phase, Phase::RolledBack);
        assert!(
            r.reason
                .as_deref()
                .is_some_and(|s| s.contains("port taken"))
        );
        assert_eq!(
            out,
            vec![
                SetDesired {
                    agent_id: "a".into(),
                    version: 3
                },
                SetDesired {
                    agent_id: "b".into(),
                    version: 3
                }
            ]
        );
        assert!(
            !out.iter().any(|d| d.agent_id == "c"),
            "c was never touched"
        );
        assert!(
            r.tick(99_000, &v).is_empty(),
            "a rolled-back rollout is done"
        );
    }

    #[test]
    fn silent_canary_times_out_and_rolls_back() {
        let mut r = Rollout::new(
            1,
            spec(Step::Count(1), Step::Count(1)),
            targets(&["a", "b"]),
            0,
        );
        let v = views(&[("a", view(3, 0, 0)), ("b", view(3, 0, 0))]);
        r.tick(0, &v);
        assert!(r.tick(5_000, &v).is_empty());
        assert_eq!(r.phase, Phase::Canary);
        let out = r.tick(5_001, &v);
        assert_eq!(r.phase, Phase::RolledBack);
        assert_eq!(
            out,
            vec![SetDesired {
                agent_id: "a".into(),
                version: 3
            }]
        );
    }

    #[test]
    fn more_drops_after_the_push_fail_the_gate() {
        let mut r = Rollout::new(
            1,
            spec(Step::Count(1), Step::Count(1)),
            targets(&["a", "b"]),
            0,
        );
        // Before: 10 drops in 10 s.
        let v = views(&[("a", view(3, 10_000, 10)), ("b", view(3, 10_000, 0))]);
        r.tick(10_000, &v);
        r.on_result("a", &applied(), 10_100);
        let v = views(&[("a", view(7, 10_200, 10)), ("b", view(3, 10_200, 0))]);
        r.tick(10_200, &v);
        assert_eq!(r.phase, Phase::Baking);
        // After: 50 drops in 10 s: 5/s against 1/s.
        let v = views(&[("a", view(7, 20_200, 60)), ("b", view(3, 20_200, 0))]);
        let out = r.tick(20_200, &v);
        assert_eq!(r.phase, Phase::RolledBack, "{:?}", r.history);
        assert!(r.reason.as_deref().is_some_and(|s| s.contains("drops")));
        assert_eq!(
            out,
            vec![SetDesired {
                agent_id: "a".into(),
                version: 3
            }]
        );
    }

    #[test]
    fn unhealthy_canary_fails_during_bake() {
        let mut r = Rollout::new(
            1,
            spec(Step::Count(1), Step::Count(1)),
            targets(&["a", "b"]),
            0,
        );
        let v = views(&[("a", view(3, 0, 0)), ("b", view(3, 0, 0))]);
        r.tick(0, &v);
        r.on_result("a", &applied(), 100);
        let mut a = view(7, 200, 0);
        r.tick(200, &views(&[("a", a.clone()), ("b", view(3, 200, 0))]));
        assert_eq!(r.phase, Phase::Baking);
        a.healthy = Some(false);
        r.tick(300, &views(&[("a", a), ("b", view(3, 300, 0))]));
        assert_eq!(r.phase, Phase::RolledBack);
    }

    #[test]
    fn offline_targets_do_not_hold_waves_and_canaries_prefer_connected_agents() {
        let mut r = Rollout::new(
            1,
            spec(Step::Count(1), Step::Percent(100)),
            vec![("a".into(), 0, false), ("b".into(), 0, true)],
            0,
        );
        let mut offline = view(0, 0, 0);
        offline.connected = false;
        let v = views(&[("a", offline.clone()), ("b", view(0, 0, 0))]);
        let out = r.tick(0, &v);
        assert_eq!(
            out,
            vec![SetDesired {
                agent_id: "b".into(),
                version: 7
            }]
        );
        r.on_result("b", &applied(), 10);
        let v = views(&[("a", offline), ("b", view(7, 20, 0))]);
        r.tick(20, &v);
        let out = r.tick(10_020, &v);
        assert_eq!(
            out,
            vec![SetDesired {
                agent_id: "a".into(),
                version: 7
            }]
        );
        r.tick(10_030, &v);
        assert_eq!(r.phase, Phase::Completed);
        assert!(
            r.history
                .last()
                .is_some_and(|h| h.message.contains("offline"))
        );
        // It answers after reconnecting: recorded even though the rollout completed.
        r.on_result("a", &applied(), 20_000);
        assert_eq!(r.counts().get("applied"), Some(&2));
    }

    #[test]
    fn failed_wave_stops_and_abort_stops() {
        let mut r = Rollout::new(
            1,
            spec(Step::Count(1), Step::Count(1)),
            targets(&["a", "b", "c"]),
            0,
        );
        let v = views(&[
            ("a", view(3, 0, 0)),
            ("b", view(3, 0, 0)),
            ("c", view(3, 0, 0)),
        ]);
        r.tick(0, &v);
        r.on_result("a", &applied(), 10);
        let v = views(&[
            ("a", view(7, 20, 0)),
            ("b", view(3, 20, 0)),
            ("c", view(3, 20, 0)),
        ]);
        r.tick(20, &v);
        r.tick(10_020, &v);
        assert_eq!(r.phase, Phase::Waves);
        let out = r.tick(15_021, &v);
        assert_eq!(r.phase, Phase::Failed, "b did not answer in time");
        assert!(out.is_empty());
        let mut r2 = Rollout::new(
            2,
            spec(Step::Count(1), Step::Count(1)),
            targets(&["a", "b"]),
            0,
        );
        r2.tick(0, &v);
        assert!(r2.abort(1));
        assert!(r2.tick(100_000, &v).is_empty());
        assert_eq!(r2.phase, Phase::Aborted);
        assert!(!r2.abort(2));
    }
}
