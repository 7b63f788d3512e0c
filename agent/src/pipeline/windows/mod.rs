//! Stateful rules: tumbling and sliding windows keyed by fields, aggregates, and a `having`
//! condition that emits an alert event (stream `alerts`). Owns the evaluation around the pure
//! [`state`] machine: the `when` filter, key and aggregate inputs (field paths read directly,
//! anything else through CEL), `having`, the alert events and their actions, the window
//! metrics, and saving state to `data_dir` ([`persist`]). It must not touch the buffer: alerts
//! go back to the caller (a source commits them with its batch; the timer task commits the
//! ones `tick` emits).
//!
//! Semantics (event time, watermark, lateness, sliding windows, bounds, persistence) are in
//! `docs/WINDOWS.md`.

mod persist;
mod state;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use runnel_common::{Event, SourceKind, Value};
use runnel_config::{AggregateFunction, WindowConfig};

use self::state::{AggregateSpec, Closed, Key, KeyPart, Outcome, Spec, WindowState};
use super::BuildContext;
use super::actions::{Fired, RuleActions};
use super::expr::{Expr, Vars, to_cel};

/// The file window state is saved to, in `data_dir`.
pub const STATE_FILE: &str = "windows.state";

/// The windows of one pipeline and their state.
#[derive(Default)]
pub struct Windows {
    windows: Vec<Window>,
    /// Where state is saved; `None` with no windows (nothing to save).
    state_path: Option<PathBuf>,
    /// One save at a time (the timer and a config swap may both save).
    saving: Mutex<()>,
}

/// One compiled window and its state.
struct Window {
    config: WindowConfig,
    name: Arc<str>,
    when: Option<Expr>,
    key: Vec<Input>,
    /// One per aggregate; `None`: `count` of events.
    inputs: Vec<Option<Input>>,
    having: Expr,
    /// `None` without actions.
    actions: Option<Arc<RuleActions>>,
    state: Mutex<WindowState>,
    metrics: WindowMetrics,
}

struct WindowMetrics {
    late: ::metrics::Counter,
    future: ::metrics::Counter,
    evictions: ::metrics::Counter,
    alerts: ::metrics::Counter,
    distinct_full: ::metrics::Counter,
    keys: ::metrics::Gauge,
}

impl WindowMetrics {
    fn new(window: &str) -> WindowMetrics {
        let label = || ("window", window.to_owned());
        WindowMetrics {
            late: ::metrics::counter!("runnel_agent_window_late_events_total", &[label()]),
            future: ::metrics::counter!("runnel_agent_window_future_events_total", &[label()]),
            evictions: ::metrics::counter!("runnel_agent_window_evictions_total", &[label()]),
            alerts: ::metrics::counter!("runnel_agent_window_alerts_total", &[label()]),
            distinct_full: ::metrics::counter!(
                "runnel_agent_window_distinct_overflow_total",
                &[label()]
            ),
            keys: ::metrics::gauge!("runnel_agent_window_keys", &[label()]),
        }
    }
}

/// Where a key part or aggregate input comes from.
enum Input {
    /// A field read directly: absent is `None`, never an error.
    Field(Field),
    /// A CEL expression over the event; an error (counted by the expression) is `None`.
    Expr(Expr),
}

/// The fields a plain path reads without CEL (the same names CEL sees).
enum Field {
    Name,
    Stream,
    Source,
    EventId,
    UserId,
    SessionId,
    Score,
    EventTimeMs,
    ReceiveTimeMs,
    Attr(String),
}

impl Field {
    fn parse(path: &str) -> Option<Field> {
        Some(match path {
            "name" => Field::Name,
            "stream" => Field::Stream,
            "source" => Field::Source,
            "event_id" => Field::EventId,
            "user_id" => Field::UserId,
            "session_id" => Field::SessionId,
            "score" => Field::Score,
            "event_time_ms" => Field::EventTimeMs,
            "receive_time_ms" => Field::ReceiveTimeMs,
            _ => {
                let attr = path.strip_prefix("attrs.")?;
                if !runnel_config::is_identifier(attr) {
                    return None;
                }
                Field::Attr(attr.to_owned())
            }
        })
    }

    fn read(&self, event: &Event) -> Option<Value> {
        let text = |s: &Option<String>| s.clone().map(Value::String);
        match self {
            Field::Name => Some(Value::String(event.name.clone())),
            Field::Stream => Some(Value::String(event.stream.clone())),
            Field::Source => Some(Value::String(event.source.as_str().to_owned())),
            Field::EventId => text(&event.event_id),
            Field::UserId => text(&event.user_id),
            Field::SessionId => text(&event.session_id),
            Field::Score => event.score.map(Value::Float),
            Field::EventTimeMs => Some(Value::Int(event.event_time_ms)),
            Field::ReceiveTimeMs => Some(Value::Int(event.receive_time_ms)),
            Field::Attr(name) => event.attrs.get(name).cloned(),
        }
    }
}

impl Input {
    fn compile(source: &str, window: &str) -> anyhow::Result<Input> {
        if let Some(field) = Field::parse(source) {
            return Ok(Input::Field(field));
        }
        Ok(Input::Expr(compile(source, window)?))
    }

    fn read(&self, event: &Event) -> Option<Value> {
        match self {
            Input::Field(field) => field.read(event),
            Input::Expr(expr) => expr.eval_value(&Vars::event(event)).ok(),
        }
    }
}

fn compile(source: &str, window: &str) -> anyhow::Result<Expr> {
    Expr::compile(source, window)
        .map_err(|error| anyhow::anyhow!("window {window}: expression {source:?}: {error}"))
}

impl Window {
    fn build(config: &WindowConfig) -> anyhow::Result<Window> {
        let name = config.name.as_str();
        let when = config
            .when
            .as_deref()
            .map(|source| compile(source, name))
            .transpose()?;
        let key = config
            .key
            .iter()
            .map(|source| Input::compile(source, name))
            .collect::<anyhow::Result<_>>()?;
        let inputs = config
            .aggregates
            .iter()
            .map(|aggregate| {
                aggregate
                    .input
                    .as_deref()
                    .map(|source| Input::compile(source, name))
                    .transpose()
            })
            .collect::<anyhow::Result<_>>()?;
        let having = compile(&config.having, name)?;
        let actions = RuleActions::build(name, &config.local)?;
        let to_i64 = |ms: u64| i64::try_from(ms).expect("validated: at most a week");
        let spec = Spec {
            size_ms: to_i64(config.size_ms),
            slide_ms: to_i64(config.slide_ms),
            lateness_ms: to_i64(config.allowed_lateness_ms),
            max_future_ms: to_i64(config.max_future_ms),
            max_keys: config.max_keys,
            aggregates: config
                .aggregates
                .iter()
                .map(|aggregate| AggregateSpec {
                    function: aggregate.function,
                    counts_events: aggregate.function == AggregateFunction::Count
                        && aggregate.input.is_none(),
                })
                .collect(),
        };
        Ok(Window {
            config: config.clone(),
            name: Arc::from(name),
            when,
            key,
            inputs,
            having,
            actions,
            state: Mutex::new(WindowState::new(spec)),
            metrics: WindowMetrics::new(name),
        })
    }

    fn lock(&self) -> MutexGuard<'_, WindowState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The event's time, key and aggregate inputs; `None` when `when` leaves it out.
    fn extract(&self, event: &Event) -> Option<(i64, Key, Vec<Option<Value>>)> {
        if let Some(when) = &self.when
            && !when.eval_bool(&Vars::event(event))
        {
            return None;
        }
        let key = self
            .key
            .iter()
            .map(|input| KeyPart::from_value(input.read(event)))
            .collect();
        let inputs = self
            .inputs
            .iter()
            .map(|input| input.as_ref().and_then(|input| input.read(event)))
            .collect();
        Some((event.event_time_ms, key, inputs))
    }

    fn observe(&self, events: &[Event], now_ms: i64, closed: &mut Vec<Closed>) {
        // CEL runs before the lock: sources contend only for the state updates.
        let extracted: Vec<_> = events.iter().filter_map(|e| self.extract(e)).collect();
        let (mut n_late, mut n_future, mut n_evicted, mut n_distinct_full) = (0, 0, 0, 0);
        let n_keys = {
            let mut state = self.lock();
            state.advance(now_ms);
            for (time_ms, key, inputs) in extracted {
                match state.add(time_ms, now_ms, key, &inputs) {
                    Outcome::Added {
                        evicted,
                        distinct_full,
                    } => {
                        n_evicted += u64::from(evicted);
                        n_distinct_full += u64::from(distinct_full);
                    }
                    Outcome::Late => n_late += 1,
                    Outcome::Future => n_future += 1,
                }
            }
            state.close_due(closed);
            state.n_keys()
        };
        self.metrics.late.increment(n_late);
        self.metrics.future.increment(n_future);
        self.metrics.evictions.increment(n_evicted);
        self.metrics.distinct_full.increment(n_distinct_full);
        self.metrics.keys.set(n_keys as f64);
        if n_late + n_future > 0 {
            tracing::debug!(window = %self.name, n_late, n_future, "events left out of a window");
        }
    }

    fn tick(&self, now_ms: i64, closed: &mut Vec<Closed>) {
        let n_keys = {
            let mut state = self.lock();
            state.advance(now_ms);
            state.close_due(closed);
            state.n_keys()
        };
        self.metrics.keys.set(n_keys as f64);
    }

    /// Alerts of the closed windows where `having` holds, and their actions.
    fn alerts(&self, closed: Vec<Closed>, now_ms: i64, fired: &mut Vec<Fired>) -> Vec<Event> {
        let mut alerts = Vec::new();
        for window in closed {
            let key_values: Vec<Value> = window.key.iter().map(KeyPart::to_value).collect();
            let key_json = serde_json::Value::Array(
                key_values.iter().map(super::expr::value_to_json).collect(),
            )
            .to_string();
            let mut vars = Vars::none()
                .with("window_start_ms", to_cel(&Value::Int(window.start_ms)))
                .with("window_end_ms", to_cel(&Value::Int(window.end_ms)))
                .with("key", to_cel(&Value::Json(key_json.clone())));
            for (name, value) in self.config.key_names.iter().zip(&key_values) {
                vars = vars.with(name.as_str(), to_cel(value));
            }
            for (aggregate, value) in self.config.aggregates.iter().zip(&window.values) {
                vars = vars.with(aggregate.name.as_str(), to_cel(value));
            }
            if !self.having.eval_bool(&vars) {
                continue;
            }
            let mut alert = Event::new(
                SourceKind::Internal,
                runnel_common::streams::ALERTS,
                &*self.name,
                window.end_ms,
            );
            alert.receive_time_ms = now_ms;
            alert
                .attrs
                .insert("window_start_ms".to_owned(), Value::Int(window.start_ms));
            alert
                .attrs
                .insert("window_end_ms".to_owned(), Value::Int(window.end_ms));
            alert.attrs.insert("key".to_owned(), Value::Json(key_json));
            for ((name, source), value) in self
                .config
                .key_names
                .iter()
                .zip(&self.config.key)
                .zip(key_values)
            {
                let text = match &value {
                    Value::String(text) => Some(text.clone()),
                    _ => None,
                };
                match source.as_str() {
                    "user_id" => alert.user_id = text,
                    "session_id" => alert.session_id = text,
                    _ => {}
                }
                alert.attrs.insert(name.clone(), value);
            }
            for (aggregate, value) in self.config.aggregates.iter().zip(window.values) {
                alert.attrs.insert(aggregate.name.clone(), value);
            }
            self.metrics.alerts.increment(1);
            if let Some(actions) = &self.actions {
                fired.push(Fired {
                    actions: Arc::clone(actions),
                    event: alert.clone(),
                });
            }
            alerts.push(alert);
        }
        alerts
    }
}

impl Windows {
    /// Compiles the windows' expressions and restores saved state (state saved by a different
    /// definition of a window is discarded with a log line).
    pub fn build(config: &[WindowConfig], context: &BuildContext) -> anyhow::Result<Windows> {
        let windows: Vec<Window> = config
            .iter()
            .map(Window::build)
            .collect::<anyhow::Result<_>>()?;
        if windows.is_empty() {
            return Ok(Windows::default());
        }
        let state_path = context.data_dir.join(STATE_FILE);
        persist::restore(&state_path, &windows);
        Ok(Windows {
            windows,
            state_path: Some(state_path),
            saving: Mutex::new(()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Adds a batch to its windows; returns alert events of windows it closed.
    pub fn observe(&self, events: &[Event], now_ms: i64, fired: &mut Vec<Fired>) -> Vec<Event> {
        let mut alerts = Vec::new();
        for window in &self.windows {
            let mut closed = Vec::new();
            window.observe(events, now_ms, &mut closed);
            alerts.extend(window.alerts(closed, now_ms, fired));
        }
        alerts
    }

    /// Closes windows whose end (plus lateness) is before `now_ms`; returns their alerts.
    pub fn tick(&self, now_ms: i64, fired: &mut Vec<Fired>) -> Vec<Event> {
        let mut alerts = Vec::new();
        for window in &self.windows {
            let mut closed = Vec::new();
            window.tick(now_ms, &mut closed);
            alerts.extend(window.alerts(closed, now_ms, fired));
        }
        alerts
    }

    /// Saves window state to `data_dir` (atomically: a temp file renamed over the old one),
    /// when it changed since the last save.
    pub fn persist(&self) -> anyhow::Result<()> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        let _saving = self
            .saving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        persist::save(path, &self.windows)
    }
}

#[cfg(test)]
mod tests;
