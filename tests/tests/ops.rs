//! Operations, end to end: `/healthz`, `/readyz` and the status endpoints of both binaries,
//! `runnel-agent status` and `runnel-aggregator status` as an operator runs them, the systemd
//! notifications (`READY=1`, `WATCHDOG=1`, `STOPPING=1`) a `Type=notify` unit waits for, and
//! `--log-format json`. Real processes, temp directories, ports the OS picked.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, Certs, TestDir, Uplink, agent_config, binaries,
    get_path, http_client, post_events, start_fleet_with, test_event, wait_count_of,
};
use serde_json::Value;

/// How long a status value may take to reflect what happened (acks, reconnects).
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a command to completion; returns its output and a description for assertion messages.
fn run(program: &Path, args: &[&str]) -> (Output, String) {
    let output = Command::new(program)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|error| panic!("run {} {}: {error}", program.display(), args.join(" ")));
    let description = format!(
        "command: {} {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        program.display(),
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, description)
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// GETs `path` and returns the status code and the body as text.
async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let reply = get_path(&http_client(), addr, path)
        .await
        .unwrap_or_else(|error| panic!("GET {path} on {addr}: {error:#}"));
    (
        reply.status,
        String::from_utf8_lossy(&reply.bytes).into_owned(),
    )
}

async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let reply = get_path(&http_client(), addr, path).await?;
    anyhow::ensure!(reply.status == 200, "GET {path}: {}", reply.status);
    Ok(reply.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_status_of_a_working_fleet() {
    let bins = binaries!();
    let fleet = start_fleet_with(
        &bins,
        "ops-status",
        "edge-1",
        AggregatorOptions::default(),
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let (http, query) = (fleet.agent.http_addr(), fleet.aggregator.query_addr());
    let n_events = 25u64;
    let events: Vec<Value> = (0..n_events)
        .map(|n| test_event(&format!("ops-{n}")))
        .collect();
    let outcome = post_events(&http_client(), http, &events).await.unwrap();
    assert_eq!(outcome.status, 200, "{:?}", outcome.body);
    wait_count_of(&fleet.dir, query, "SELECT count(*) FROM events", n_events).await;

    for (addr, who) in [(http, "agent"), (query, "aggregator")] {
        for probe in ["/healthz", "/readyz"] {
            assert_eq!(
                get_text(addr, probe).await,
                (200, "ok\n".to_owned()),
                "{who} {probe}"
            );
        }
    }

    // The agent's status settles once the last ack is in and the buffer is empty.
    fleet
        .dir
        .wait_until(
            STATUS_TIMEOUT,
            "the agent reports every event shipped",
            || async {
                let status = get_json(http, "/v1/status").await?;
                anyhow::ensure!(
                    status["uplink"]["n_events_acked"] == n_events
                        && status["buffer"]["n_events"] == 0,
                    "{status:#}"
                );
                Ok(())
            },
        )
        .await;
    let status = get_json(http, "/v1/status").await.unwrap();
    assert_eq!(status["service"], "runnel-agent", "{status:#}");
    assert_eq!(status["agent_id"], "edge-1", "{status:#}");
    assert_eq!(status["ready"], true, "{status:#}");
    assert_eq!(status["labels"]["test"], "e2e", "{status:#}");
    assert_eq!(status["listen"]["http"], http.to_string(), "{status:#}");
    assert_eq!(status["buffer"]["n_appended"], n_events, "{status:#}");
    assert_eq!(status["buffer"]["n_deleted"], n_events, "{status:#}");
    assert_eq!(status["buffer"]["last_seq"], n_events, "{status:#}");
    assert_eq!(status["buffer"]["oldest_unshipped_age_ms"], Value::Null);
    assert_eq!(status["uplink"]["connected"], true, "{status:#}");
    assert_eq!(status["uplink"]["n_connects"], 1, "{status:#}");
    assert!(status["uptime_ms"].as_u64().is_some(), "{status:#}");

    let status = get_json(query, "/api/v1/status").await.unwrap();
    assert_eq!(status["service"], "runnel-aggregator", "{status:#}");
    assert_eq!(status["ready"], true, "{status:#}");
    let agents = status["ingest"]["agents"].as_array().expect("agents array");
    assert_eq!(agents.len(), 1, "{status:#}");
    assert_eq!(agents[0]["agent_id"], "edge-1", "{status:#}");
    assert_eq!(agents[0]["n_events_stored"], n_events, "{status:#}");
    assert_eq!(status["ingest"]["n_events_stored"], n_events, "{status:#}");
    // The harness flushes every 60 s: the rows are still in the WAL, none in Parquet yet.
    assert_eq!(status["wal"]["n_rows"], n_events, "{status:#}");
    assert!(
        status["wal"]["file_bytes"].as_u64().unwrap() > 0,
        "{status:#}"
    );
    assert_eq!(status["storage"]["n_files"], 0, "{status:#}");
    assert_eq!(
        status["listen"]["ingest"],
        fleet.aggregator.ingest_addr().to_string()
    );

    // The commands, as an operator runs them: from the config file (the runtime file names the
    // address) and from a URL.
    let (output, description) = run(
        &bins.agent,
        &["status", "--config", path_arg(fleet.agent.config_path())],
    );
    assert!(output.status.success(), "{description}");
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        ": ready",
        "agent id    edge-1 (test=e2e)",
        "0 events",
        "nothing waiting to be shipped",
        "connected to",
        &format!("{n_events} events in"),
    ] {
        assert!(text.contains(expected), "no {expected:?} in\n{description}");
    }
    let (output, description) = run(
        &bins.agent,
        &["status", "--url", &format!("http://{http}"), "--json"],
    );
    assert!(output.status.success(), "{description}");
    let json: Value = serde_json::from_slice(&output.stdout).expect(&description);
    assert_eq!(json["agent_id"], "edge-1", "{description}");

    let aggregator_config = fleet.dir.join("aggregator").join("aggregator.toml");
    let (output, description) = run(
        &bins.aggregator,
        &["status", "--config", path_arg(&aggregator_config)],
    );
    assert!(output.status.success(), "{description}");
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        ": ready",
        "1 connected",
        "edge-1 from 127.0.0.1:",
        &format!("stored {n_events} events"),
        &format!("{n_events} rows in"),
    ] {
        assert!(text.contains(expected), "no {expected:?} in\n{description}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stays_ready_and_reports_the_backlog_while_the_aggregator_is_down() {
    let bins = binaries!();
    let mut fleet = start_fleet_with(
        &bins,
        "ops-backlog",
        "edge-1",
        AggregatorOptions::default(),
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let http = fleet.agent.http_addr();
    let query = fleet.aggregator.query_addr();
    fleet.aggregator.stop();
    fleet
        .dir
        .wait_until(
            STATUS_TIMEOUT,
            "the agent reports the uplink down",
            || async {
                let status = get_json(http, "/v1/status").await?;
                anyhow::ensure!(status["uplink"]["connected"] == false, "{status:#}");
                Ok(())
            },
        )
        .await;
    let events: Vec<Value> = (0..3).map(|n| test_event(&format!("late-{n}"))).collect();
    let outcome = post_events(&http_client(), http, &events).await.unwrap();
    assert_eq!(outcome.status, 200, "{:?}", outcome.body);

    // Buffering through an outage is the agent's job: still ready.
    assert_eq!(get_text(http, "/readyz").await, (200, "ok\n".to_owned()));
    let status = get_json(http, "/v1/status").await.unwrap();
    assert_eq!(status["buffer"]["n_events"], 3, "{status:#}");
    assert_eq!(status["buffer"]["oldest_unshipped_seq"], 1, "{status:#}");
    assert!(
        status["buffer"]["oldest_unshipped_age_ms"]
            .as_u64()
            .is_some(),
        "{status:#}"
    );
    assert!(
        status["uplink"]["n_connection_failures"].as_u64().unwrap() >= 1,
        "{status:#}"
    );
    let (output, description) = run(
        &bins.agent,
        &["status", "--config", path_arg(fleet.agent.config_path())],
    );
    assert!(output.status.success(), "{description}");
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in ["3 events", "oldest unshipped: received", "NOT CONNECTED"] {
        assert!(text.contains(expected), "no {expected:?} in\n{description}");
    }

    // The aggregator is not running: its status command says so and fails.
    let (output, description) = run(
        &bins.aggregator,
        &["status", "--url", &format!("http://{query}")],
    );
    assert!(!output.status.success(), "{description}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is the aggregator running?"),
        "{description}"
    );
}

#[test]
fn status_without_a_running_agent_fails_with_a_hint() {
    let bins = binaries!();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let (output, description) = run(
        &bins.agent,
        &["status", "--url", &format!("http://127.0.0.1:{port}")],
    );
    assert_eq!(output.status.code(), Some(1), "{description}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is the agent running?"), "{description}");
}

/// A stand-in for systemd's notification socket: collects the datagrams a service sends.
struct NotifySocket {
    socket: UnixDatagram,
    messages: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("set read timeout");
        NotifySocket {
            socket,
            messages: Vec::new(),
        }
    }

    /// Reads datagrams until one holds `line` (a whole line such as `READY=1`); panics with
    /// everything received after `timeout`.
    fn wait_for(&mut self, line: &str, timeout: Duration, context: &dyn Fn() -> String) {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = message.lines().any(|l| l == line);
                self.messages.push(message);
                if found {
                    return;
                }
            }
        }
        panic!(
            "no {line:?} within {timeout:?}; received {:?}\n{}",
            self.messages,
            context()
        );
    }
}

/// Runs `program args` like systemd runs a `Type=notify` unit with `WatchdogSec=`: checks
/// `READY=1` (with a `STATUS=`), watchdog pings, then SIGTERM, `STOPPING=1` and exit 0. Returns
/// the process's stderr.
fn check_systemd_protocol(dir: &TestDir, label: &str, program: &Path, args: &[&str]) -> String {
    let socket_path = dir.join(format!("{label}.notify"));
    let mut notify = NotifySocket::bind(&socket_path);
    let stderr_path = dir.join(format!("{label}.stderr"));
    let mut child = Command::new(program)
        .args(args)
        .env("NOTIFY_SOCKET", &socket_path)
        // 400 ms: the service pings every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env("RUNNEL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("create stderr file"))
        .spawn()
        .expect("spawn the service");
    let context = || {
        format!(
            "{label} stderr:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    };
    notify.wait_for("READY=1", Duration::from_secs(60), &context);
    assert!(
        notify
            .messages
            .last()
            .expect("wait_for saw a message")
            .contains("STATUS="),
        "READY=1 comes with a STATUS=: {:?}",
        notify.messages
    );
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5), &context);
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5), &context);
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    notify.wait_for("STOPPING=1", Duration::from_secs(30), &context);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{label} did not exit after SIGTERM\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "{label} exited with {status}\n{}",
        context()
    );
    std::fs::read_to_string(&stderr_path).expect("read stderr")
}

#[test]
fn both_binaries_speak_the_systemd_notify_protocol_and_log_json() {
    let bins = binaries!();
    let dir = TestDir::new("ops-notify");
    let certs = Certs::init(&dir.join("certs"));

    let aggregator_config = dir.join("aggregator.toml");
    std::fs::write(
        &aggregator_config,
        format!(
            "[aggregator]\ndata_dir = {:?}\n[ingest]\nlisten = \"127.0.0.1:0\"\nca_cert = {:?}\ncert = {:?}\nkey = {:?}\n[query]\nlisten = \"127.0.0.1:0\"\n[pgwire]\nlisten = \"127.0.0.1:0\"\n",
            path_arg(&dir.join("aggregator-data")),
            path_arg(&certs.ca_cert),
            path_arg(&certs.server_cert),
            path_arg(&certs.server_key),
        ),
    )
    .unwrap();
    let stderr = check_systemd_protocol(
        &dir,
        "aggregator",
        &bins.aggregator,
        &[
            "--log-format",
            "json",
            "serve",
            "--config",
            path_arg(&aggregator_config),
        ],
    );
    assert_json_lines("aggregator", &stderr, "aggregator started");

    let cert = certs.issue_agent("edge-notify");
    let uplink = Uplink {
        // Nothing listens there: the agent is ready without its aggregator.
        aggregator: ([127, 0, 0, 1], 9).into(),
        ca_cert: certs.ca_cert.clone(),
    };
    let agent_config_path = dir.join("agent.toml");
    std::fs::write(
        &agent_config_path,
        agent_config(
            &dir.join("agent-data"),
            &cert,
            &uplink,
            &AgentOptions::default(),
        ),
    )
    .unwrap();
    let stderr = check_systemd_protocol(
        &dir,
        "agent",
        &bins.agent,
        &[
            "--log-format",
            "json",
            "run",
            "--config",
            path_arg(&agent_config_path),
        ],
    );
    assert_json_lines("agent", &stderr, "agent started");
}

/// Every line of `stderr` is a JSON object with a level and fields, one of them `message`.
fn assert_json_lines(label: &str, stderr: &str, message: &str) {
    let mut found = false;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("{label}: not a JSON log line ({error}): {line}"));
        assert!(value["level"].is_string(), "{label}: {line}");
        found |= value["fields"]["message"] == message;
    }
    assert!(found, "{label}: no {message:?} in\n{stderr}");
}
