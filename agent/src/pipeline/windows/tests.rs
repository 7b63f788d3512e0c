//! Windows end to end within the pipeline stage: config text -> build -> observe / tick with
//! explicit times (no clock) -> alert events, actions, and state across a rebuild.

use std::path::Path;

use runnel_common::{Event, SourceKind, Value};
use runnel_config::WindowConfig;

use super::*;

fn window_configs(windows_toml: &str) -> Vec<WindowConfig> {
    let text = format!(
        "[uplink]\naggregator = \"agg.example.com:9480\"\nca_cert = \"/c/ca.pem\"\n\
         cert = \"/c/a.pem\"\nkey = \"/c/a.key\"\n\n{windows_toml}"
    );
    runnel_config::parse_agent(&text, Path::new("/etc/runnel/agent.toml"))
        .unwrap_or_else(|error| panic!("{error}"))
        .windows
}

fn context(data_dir: &Path) -> BuildContext {
    BuildContext {
        data_dir: data_dir.to_path_buf(),
        agent_id: "agent-1".to_owned(),
    }
}

fn build(windows_toml: &str, data_dir: &Path) -> Windows {
    Windows::build(&window_configs(windows_toml), &context(data_dir)).expect("build")
}

fn event(name: &str, time_ms: i64, attrs: &[(&str, Value)]) -> Event {
    let mut event = Event::new(SourceKind::Http, "clicks", name, time_ms);
    for (key, value) in attrs {
        event.attrs.insert((*key).to_owned(), value.clone());
    }
    event
}

fn door(device: &str, time_ms: i64) -> Event {
    event(
        "door_open",
        time_ms,
        &[("device", Value::String(device.to_owned()))],
    )
}

const DOORS: &str = r#"
[[windows]]
name = "door_bursts"
when = "name == 'door_open'"
key = ["attrs.device"]
size_ms = 60000
aggregates = { n = "count" }
allowed_lateness_ms = 0
having = "n >= 3"
"#;

fn attr<'a>(alert: &'a Event, key: &str) -> &'a Value {
    alert
        .attrs
        .get(key)
        .unwrap_or_else(|| panic!("alert has no {key}: {alert:?}"))
}

#[test]
fn a_tumbling_window_alerts_when_having_holds() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(DOORS, dir.path());
    let mut fired = Vec::new();
    let batch = vec![
        door("d1", 1_000),
        door("d1", 2_000),
        door("d2", 3_000),
        door("d1", 59_999),
        event(
            "door_closed",
            4_000,
            &[("device", Value::String("d1".into()))],
        ),
    ];
    assert!(windows.observe(&batch, 59_999, &mut fired).is_empty());
    assert!(
        windows.tick(59_999, &mut fired).is_empty(),
        "not closed yet"
    );
    let alerts = windows.tick(60_000, &mut fired);
    assert_eq!(alerts.len(), 1, "only d1 has n >= 3: {alerts:?}");
    let alert = &alerts[0];
    assert_eq!(alert.stream, "alerts");
    assert_eq!(alert.source, SourceKind::Internal);
    assert_eq!(alert.name, "door_bursts");
    assert_eq!(alert.event_time_ms, 60_000);
    assert_eq!(alert.receive_time_ms, 60_000);
    assert_eq!(
        attr(alert, "n"),
        &Value::Int(3),
        "door_closed is filtered out"
    );
    assert_eq!(attr(alert, "device"), &Value::String("d1".into()));
    assert_eq!(attr(alert, "key"), &Value::Json("[\"d1\"]".into()));
    assert_eq!(attr(alert, "window_start_ms"), &Value::Int(0));
    assert_eq!(attr(alert, "window_end_ms"), &Value::Int(60_000));
    assert!(fired.is_empty(), "no actions configured");
    assert!(windows.tick(120_000, &mut fired).is_empty(), "alerts once");
}

#[test]
fn an_event_past_the_window_closes_it_and_late_events_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(DOORS, dir.path());
    let mut fired = Vec::new();
    let batch: Vec<Event> = (0..3).map(|i| door("d1", 10_000 + i)).collect();
    assert!(windows.observe(&batch, 10_000, &mut fired).is_empty());
    // Event time moves the watermark even when the clock lags (a device replaying).
    let alerts = windows.observe(&[door("d9", 60_000)], 30_000, &mut fired);
    assert_eq!(alerts.len(), 1);
    assert_eq!(attr(&alerts[0], "n"), &Value::Int(3));
    // Late for [0, 60000): not added, and the window does not alert again.
    let late: Vec<Event> = (0..5).map(|i| door("d1", 20_000 + i)).collect();
    assert!(windows.observe(&late, 30_000, &mut fired).is_empty());
    assert!(windows.tick(200_000, &mut fired).is_empty(), "d9 has n = 1");
}

#[test]
fn allowed_lateness_delays_the_close_and_admits_late_events() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(
        &DOORS.replace("allowed_lateness_ms = 0", "allowed_lateness_ms = 5000"),
        dir.path(),
    );
    let mut fired = Vec::new();
    windows.observe(&[door("d1", 1_000), door("d1", 2_000)], 2_000, &mut fired);
    assert!(
        windows.tick(64_999, &mut fired).is_empty(),
        "open for 5 s more"
    );
    assert!(
        windows
            .observe(&[door("d1", 59_000)], 64_999, &mut fired)
            .is_empty()
    );
    let alerts = windows.tick(65_000, &mut fired);
    assert_eq!(alerts.len(), 1);
    assert_eq!(attr(&alerts[0], "n"), &Value::Int(3));
}

#[test]
fn sliding_windows_alert_for_every_window_that_holds() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(
        r#"
[[windows]]
name = "hot"
kind = "sliding"
size_ms = 30000
slide_ms = 10000
allowed_lateness_ms = 0
key = ["attrs.device"]
aggregates = { n = "count", peak = "max(attrs.temp)", mean = "avg(attrs.temp)" }
having = "n >= 2 && peak > 50.0"
"#,
        dir.path(),
    );
    let reading = |time_ms: i64, temp: f64| {
        event(
            "reading",
            time_ms,
            &[
                ("device", Value::String("d1".into())),
                ("temp", Value::Float(temp)),
            ],
        )
    };
    let mut fired = Vec::new();
    // Panes: 5000 -> [0, 10000); 15000 and 16000 -> [10000, 20000).
    let batch = [
        reading(5_000, 40.0),
        reading(15_000, 60.0),
        reading(16_000, 20.0),
    ];
    assert!(windows.observe(&batch, 16_000, &mut fired).is_empty());
    // [-20000, 10000) closed at 16000 with n = 1 (no alert); [-10000, 20000) closes at 20000.
    let at_20s = windows.tick(20_000, &mut fired);
    assert_eq!(at_20s.len(), 1, "{at_20s:?}");
    assert_eq!(attr(&at_20s[0], "window_start_ms"), &Value::Int(-10_000));
    assert_eq!(attr(&at_20s[0], "n"), &Value::Int(3));
    assert_eq!(attr(&at_20s[0], "peak"), &Value::Float(60.0));
    assert_eq!(attr(&at_20s[0], "mean"), &Value::Float(40.0));
    let rest = windows.tick(100_000, &mut fired);
    let starts: Vec<&Value> = rest.iter().map(|a| attr(a, "window_start_ms")).collect();
    // [0, 30000) holds all three; [10000, 40000) holds two with peak 60.
    assert_eq!(starts, [&Value::Int(0), &Value::Int(10_000)]);
    assert_eq!(attr(&rest[1], "n"), &Value::Int(2));
}

#[test]
fn distinct_counts_and_cel_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(
        r#"
[[windows]]
name = "shared_accounts"
allowed_lateness_ms = 0
key = ["user_id", "size(name) == 3"]
size_ms = 1000
aggregates = { devices = "distinct(attrs.device)", spend = "sum(attrs.cents / 100)", n = "count(attrs.cents)" }
having = "devices >= 2 && key_1"
"#,
        dir.path(),
    );
    let click = |device: &str, cents: Option<i64>| {
        let mut e = event("buy", 100, &[("device", Value::String(device.into()))]);
        if let Some(cents) = cents {
            e.attrs.insert("cents".into(), Value::Int(cents));
        }
        e.user_id = Some("u1".into());
        e
    };
    let mut fired = Vec::new();
    let batch = [
        click("phone", Some(250)),
        click("laptop", Some(100)),
        click("phone", None),
    ];
    windows.observe(&batch, 100, &mut fired);
    let alerts = windows.tick(1_000, &mut fired);
    assert_eq!(alerts.len(), 1);
    let alert = &alerts[0];
    assert_eq!(attr(alert, "devices"), &Value::Int(2));
    assert_eq!(
        attr(alert, "spend"),
        &Value::Int(3),
        "integer division in CEL: 2 + 1"
    );
    assert_eq!(
        attr(alert, "n"),
        &Value::Int(2),
        "count(x) skips events without x"
    );
    assert_eq!(attr(alert, "user_id"), &Value::String("u1".into()));
    assert_eq!(attr(alert, "key_1"), &Value::Bool(true));
    assert_eq!(
        alert.user_id.as_deref(),
        Some("u1"),
        "a user_id key sets the core field"
    );
}

#[test]
fn having_false_emits_nothing_and_having_errors_are_false() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(
        r#"
[[windows]]
name = "quiet"
allowed_lateness_ms = 0
size_ms = 1000
aggregates = { n = "count", mean = "avg(attrs.temp)" }
having = "mean > 10.0"
"#,
        dir.path(),
    );
    let mut fired = Vec::new();
    // No temp at all: mean is null, and `null > 10.0` is an error, counted, not an alert.
    windows.observe(&[event("x", 1, &[])], 1, &mut fired);
    assert!(windows.tick(1_000, &mut fired).is_empty());
    windows.observe(
        &[event("x", 1_001, &[("temp", Value::Float(5.0))])],
        1_001,
        &mut fired,
    );
    assert!(windows.tick(2_000, &mut fired).is_empty());
}

#[test]
fn alerts_fire_the_window_actions() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(
        &DOORS.replace(
            "having",
            "actions = [{ kind = \"log\", message = \"burst on {{ attrs.device }}\" }, \
             { kind = \"log\", level = \"warn\", message = \"n={{ attrs.n }}\" }]\nhaving",
        ),
        dir.path(),
    );
    let mut fired = Vec::new();
    let batch: Vec<Event> = (0..3).map(|i| door("d1", i)).collect();
    windows.observe(&batch, 0, &mut fired);
    let alerts = windows.tick(60_000, &mut fired);
    assert_eq!(alerts.len(), 1);
    assert_eq!(fired.len(), 1, "one firing runs all the window's actions");
    assert_eq!(fired[0].actions.rule(), "door_bursts");
    assert_eq!(fired[0].event, alerts[0]);
}

#[test]
fn eviction_keeps_the_recently_updated_keys() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(&DOORS.replace("having", "max_keys = 2\nhaving"), dir.path());
    let mut fired = Vec::new();
    let batch = [
        door("d1", 1),
        door("d1", 2),
        door("d2", 3),
        door("d1", 4), // d1 updated after d2: d2 is the oldest
        door("d3", 5), // evicts d2
        door("d2", 6), // evicts d1 (updated at 4, before d3 at 5)
        door("d2", 7),
        door("d3", 8),
        door("d3", 9),
    ];
    windows.observe(&batch, 10, &mut fired);
    let alerts = windows.tick(60_000, &mut fired);
    let counts: Vec<(&Value, &Value)> = alerts
        .iter()
        .map(|a| (attr(a, "device"), attr(a, "n")))
        .collect();
    // d2 restarted from nothing after its eviction: 2 events, below the threshold.
    assert_eq!(counts, [(&Value::String("d3".into()), &Value::Int(3))]);
}

#[test]
fn state_survives_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let mut fired = Vec::new();
    {
        let windows = build(DOORS, dir.path());
        windows.observe(&[door("d1", 1_000), door("d1", 2_000)], 2_000, &mut fired);
        windows.persist().expect("persist");
    }
    assert!(dir.path().join(STATE_FILE).exists());
    let windows = build(DOORS, dir.path());
    windows.observe(&[door("d1", 3_000)], 3_000, &mut fired);
    let alerts = windows.tick(61_000, &mut fired);
    assert_eq!(alerts.len(), 1, "two events before the restart, one after");
    assert_eq!(attr(&alerts[0], "n"), &Value::Int(3));
    windows.persist().expect("persist");
    let again = build(DOORS, dir.path());
    assert!(
        again.tick(200_000, &mut fired).is_empty(),
        "the closed window is not restored"
    );
}

#[test]
fn a_restart_after_the_window_ended_alerts_on_the_first_tick() {
    let dir = tempfile::tempdir().unwrap();
    let mut fired = Vec::new();
    {
        let windows = build(DOORS, dir.path());
        let batch: Vec<Event> = (0..4).map(|i| door("d1", 1_000 + i)).collect();
        windows.observe(&batch, 1_004, &mut fired);
        windows.persist().expect("persist");
    }
    // The agent was down while the window ended.
    let windows = build(DOORS, dir.path());
    let alerts = windows.tick(3_600_000, &mut fired);
    assert_eq!(alerts.len(), 1);
    assert_eq!(attr(&alerts[0], "n"), &Value::Int(4));
}

#[test]
fn state_of_a_changed_definition_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let mut fired = Vec::new();
    {
        let windows = build(DOORS, dir.path());
        let batch: Vec<Event> = (0..3).map(|i| door("d1", i)).collect();
        windows.observe(&batch, 0, &mut fired);
        windows.persist().expect("persist");
    }
    let resized = build(&DOORS.replace("60000", "30000"), dir.path());
    assert!(
        resized.tick(3_600_000, &mut fired).is_empty(),
        "size changed"
    );
    let reaggregated = build(
        &DOORS.replace("{ n = \"count\" }", "{ n = \"count(attrs.device)\" }"),
        dir.path(),
    );
    assert!(
        reaggregated.tick(3_600_000, &mut fired).is_empty(),
        "aggregates changed"
    );
    // `having` is not part of the definition: the state is kept.
    let rethreshold = build(&DOORS.replace("n >= 3", "n >= 2"), dir.path());
    assert_eq!(rethreshold.tick(3_600_000, &mut fired).len(), 1);
}

#[test]
fn an_unreadable_state_file_starts_the_windows_empty() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(STATE_FILE), b"RNLWIN\0\0\x09\0\0\0garbage").unwrap();
    let windows = build(DOORS, dir.path());
    let mut fired = Vec::new();
    let batch: Vec<Event> = (0..3).map(|i| door("d1", i)).collect();
    windows.observe(&batch, 0, &mut fired);
    assert_eq!(windows.tick(60_000, &mut fired).len(), 1);
    windows.persist().expect("a good file replaces the bad one");
    std::fs::write(dir.path().join(STATE_FILE), b"short").unwrap();
    build(DOORS, dir.path());
}

#[test]
fn persist_writes_only_when_something_changed() {
    let dir = tempfile::tempdir().unwrap();
    let windows = build(DOORS, dir.path());
    let path = dir.path().join(STATE_FILE);
    windows.persist().expect("persist");
    assert!(path.exists(), "the first save writes even an empty state");
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"marker").unwrap();
    windows.persist().expect("persist");
    assert_eq!(std::fs::read(&path).unwrap(), b"marker", "nothing changed");
    let mut fired = Vec::new();
    windows.observe(&[door("d1", 1)], 1, &mut fired);
    windows.persist().expect("persist");
    assert_ne!(std::fs::read(&path).unwrap(), b"marker");
}
