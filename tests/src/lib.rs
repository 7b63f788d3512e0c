//! The end-to-end test harness: a temp directory per test, the fleet PKI in it, and the real
//! `runnel-agent` and `runnel-aggregator` binaries run as child processes against each other.
//!
//! Processes are configured through real config files, listen on port 0 and report the addresses
//! they bound through their runtime files (`agent.runtime.json`, `aggregator.runtime.json`), which
//! the harness polls with a deadline. Their stdout and stderr go to files in the test directory.
//! Every wait has a deadline and says what it waited for; when a test panics for any reason the
//! [`TestDir`] prints each process's command, exit status and the tail of its output, and keeps
//! the directory for a post-mortem. Processes are killed when their handle is dropped.
//!
//! The harness must not sleep to let something happen: it polls for the observable outcome.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

pub mod faults;
pub mod load;

pub use load::{Load, LoadReport};

/// How long a process may take to write its runtime file after it was spawned. Generous: debug
/// builds on 2 shared cores start slowly, and a timeout here only delays a failure.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a process may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Default deadline for events to travel from agent to a query result.
pub const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(120);

/// Bytes of each log file shown when a test fails.
const LOG_TAIL_BYTES: usize = 12_000;

/// Set this environment variable to keep the directories of passing tests too.
pub const KEEP_ENV: &str = "RUNNEL_TEST_KEEP";

/// Interval between two polls of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Paths of the binaries under test. Build it with [`binaries!`] in an integration test, where
/// Cargo sets `CARGO_BIN_EXE_*`.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    pub aggregator: PathBuf,
}

/// The [`Binaries`] of this package, for integration tests in `tests/tests/`.
#[macro_export]
macro_rules! binaries {
    () => {
        $crate::Binaries {
            agent: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_runnel-test-agent")),
            aggregator: ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_runnel-test-aggregator")),
        }
    };
}

/// What the harness knows about one process, for the failure report.
#[derive(Debug, Clone)]
struct ProcessRecord {
    label: String,
    command: String,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Exit statuses seen so far, as text, in order.
    exits: Vec<String>,
}

type Registry = Arc<Mutex<Vec<ProcessRecord>>>;

/// A temp directory for one test. On a panic it prints the report of every process started in it
/// and keeps the directory (its path is printed).
pub struct TestDir {
    dir: tempfile::TempDir,
    registry: Registry,
}

impl TestDir {
    pub fn new(test_name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("runnel-{test_name}-"))
            .tempdir()
            .expect("create a temp dir for the test");
        TestDir {
            dir,
            registry: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Command, exit statuses and the output tail of every process started in this directory.
    pub fn report(&self) -> String {
        let records = self.registry.lock().expect("registry lock").clone();
        let mut out = String::new();
        for record in &records {
            let _ = writeln!(
                out,
                "\n===== {}: {}\n      exits: {}",
                record.label,
                record.command,
                if record.exits.is_empty() {
                    "(still running or killed on drop)".to_owned()
                } else {
                    record.exits.join(", ")
                }
            );
            for (name, path) in [("stdout", &record.stdout), ("stderr", &record.stderr)] {
                let _ = writeln!(
                    out,
                    "----- {} {name} ({}), last {LOG_TAIL_BYTES} bytes:\n{}",
                    record.label,
                    path.display(),
                    tail(path, LOG_TAIL_BYTES)
                );
            }
        }
        out
    }

    /// Polls `check` until it returns `Ok(())`, at most `timeout`. An `Err` means "not yet" and
    /// says what was seen; on timeout the test panics with `what` and the last thing seen (the
    /// process report follows when the `TestDir` drops during the panic).
    pub async fn wait_until<F, Fut>(&self, timeout: Duration, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        if let Err(last) = poll_until(timeout, check).await {
            panic!(
                "timed out after {timeout:?} waiting until {what}; last seen: {last:#}\n(process report follows)"
            );
        }
    }

    fn register(&self, record: ProcessRecord) -> usize {
        let mut registry = self.registry.lock().expect("registry lock");
        registry.push(record);
        registry.len() - 1
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "{}\n===== test directory kept at {}",
                self.report(),
                self.dir.path().display()
            );
        } else if std::env::var_os(KEEP_ENV).is_some() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "===== {KEEP_ENV} is set: test directory kept at {}",
                self.dir.path().display()
            );
        }
    }
}

/// Polls `check` until it returns `Ok(())` or `timeout` passed; returns the last error then.
pub async fn poll_until<F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// Polls an agent's `/metrics` at `http` until it has every one of `lines` (30 s at most);
/// panics naming the missing lines otherwise.
pub async fn wait_for_metrics(http: SocketAddr, lines: &[&str]) {
    let client = http_client();
    let client = &client;
    let found = poll_until(Duration::from_secs(30), || async move {
        let text = client
            .get(format!("http://{http}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let missing: Vec<&&str> = lines.iter().filter(|line| !text.contains(**line)).collect();
        anyhow::ensure!(missing.is_empty(), "missing {missing:?} in:\n{text}");
        Ok(())
    })
    .await;
    if let Err(error) = found {
        panic!("/metrics: {error:#}");
    }
}

/// The last `max_bytes` of a file, lossily decoded.
pub fn tail(path: &Path, max_bytes: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max_bytes);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(error) => format!("(cannot read: {error})"),
    }
}

/// Quotes a string for TOML (a JSON string is a valid TOML basic string).
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

fn toml_path(path: &Path) -> String {
    toml_string(path.to_str().expect("test paths are UTF-8"))
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// The fleet PKI of a test: CA and server certificate (for `localhost` and `127.0.0.1`), made by
/// the aggregator's own `certs` code.
#[derive(Debug, Clone)]
pub struct Certs {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// An agent certificate; `name` is its common name, the agent id.
#[derive(Debug, Clone)]
pub struct AgentCert {
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Validity of test certificates in days.
const TEST_CERT_DAYS: u32 = 30;

impl Certs {
    pub fn init(dir: &Path) -> Certs {
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let files = runnel_aggregator::certs::init(dir, &names, TEST_CERT_DAYS, false)
            .unwrap_or_else(|error| panic!("certs init in {}: {error:#}", dir.display()));
        Certs {
            dir: dir.to_owned(),
            ca_cert: files.ca_cert,
            server_cert: files.server_cert,
            server_key: files.server_key,
        }
    }

    pub fn issue_agent(&self, name: &str) -> AgentCert {
        let out_dir = self.dir.join("agents");
        let files =
            runnel_aggregator::certs::issue_agent(&self.dir, name, &out_dir, TEST_CERT_DAYS)
                .unwrap_or_else(|error| panic!("certs issue-agent {name}: {error:#}"));
        AgentCert {
            name: name.to_owned(),
            cert: files.cert,
            key: files.key,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// One child process with its output in files, registered with its `TestDir` for the report.
struct ManagedChild {
    label: String,
    program: PathBuf,
    args: Vec<String>,
    stdout: PathBuf,
    stderr: PathBuf,
    registry: Registry,
    record_idx: usize,
    child: Option<Child>,
    n_starts: u32,
    /// Environment variables set for the next start, beyond the harness's own.
    env: Vec<(String, String)>,
}

impl ManagedChild {
    fn new(dir: &TestDir, label: &str, program: &Path, args: Vec<String>, log_dir: &Path) -> Self {
        let stdout = log_dir.join(format!("{label}.stdout"));
        let stderr = log_dir.join(format!("{label}.stderr"));
        let record_idx = dir.register(ProcessRecord {
            label: label.to_owned(),
            command: format!("{} {}", program.display(), args.join(" ")),
            stdout: stdout.clone(),
            stderr: stderr.clone(),
            exits: Vec::new(),
        });
        ManagedChild {
            label: label.to_owned(),
            program: program.to_owned(),
            args,
            stdout,
            stderr,
            registry: dir.registry.clone(),
            record_idx,
            child: None,
            n_starts: 0,
            env: Vec::new(),
        }
    }

    /// Spawns the process; output is appended to its files after a header naming the start.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.label);
        self.n_starts += 1;
        let open = |path: &Path| {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
            writeln!(
                file,
                "===== harness: start #{} of {}",
                self.n_starts, self.label
            )
            .expect("write log header");
            file
        };
        let stdout = open(&self.stdout);
        let stderr = open(&self.stderr);
        let child = Command::new(&self.program)
            .args(&self.args)
            .env(
                "RUNNEL_LOG",
                std::env::var("RUNNEL_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "spawn {} {}: {error}",
                    self.program.display(),
                    self.args.join(" ")
                )
            });
        self.child = Some(child);
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn record_exit(&self, status: &str) {
        let mut registry = self.registry.lock().expect("registry lock");
        registry[self.record_idx]
            .exits
            .push(format!("start #{}: {status}", self.n_starts));
    }

    /// Panics (with the process's stderr) if it has exited.
    fn assert_running(&mut self, context: &str) {
        let child = self.child.as_mut().expect("process was started");
        if let Some(status) = child.try_wait().expect("try_wait") {
            self.child = None;
            self.record_exit(&status.to_string());
            panic!(
                "{} exited with {status} while {context}; stderr:\n{}",
                self.label,
                tail(&self.stderr, LOG_TAIL_BYTES)
            );
        }
    }

    /// SIGKILL and reap. No-op when not running.
    fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let status = child.wait().expect("wait for killed child");
            self.record_exit(&format!("{status} (SIGKILL by harness)"));
        }
    }

    /// SIGTERM, then wait at most [`STOP_TIMEOUT`]; SIGKILL and panic if it does not exit.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("stop: process is running");
        send_sigterm(child.id());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.record_exit(&format!("{status} (after SIGTERM)"));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait().expect("wait for killed child");
                self.record_exit(&format!(
                    "{status} (SIGKILL: no exit {STOP_TIMEOUT:?} after SIGTERM)"
                ));
                panic!(
                    "{} did not exit within {STOP_TIMEOUT:?} after SIGTERM",
                    self.label
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits for a JSON runtime file naming this process's pid; panics if the process exits or
    /// the deadline passes.
    fn wait_runtime_file(&mut self, path: &Path) -> Value {
        let pid = self.pid().expect("process was started");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.assert_running(&format!("waiting for {}", path.display()));
            let last = match std::fs::read_to_string(path) {
                Ok(text) => match serde_json::from_str::<Value>(&text) {
                    Ok(value) if value["pid"].as_u64() == Some(u64::from(pid)) => return value,
                    Ok(value) => format!("file names another pid: {value}"),
                    Err(error) => format!("not (yet) valid JSON: {error}: {text:?}"),
                },
                Err(error) => format!("{error}"),
            };
            if Instant::now() >= deadline {
                panic!(
                    "{} did not write {} within {STARTUP_TIMEOUT:?} ({last}); stderr:\n{}",
                    self.label,
                    path.display(),
                    tail(&self.stderr, LOG_TAIL_BYTES)
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// All of stderr so far (every start).
    fn stderr_text(&self) -> String {
        std::fs::read(&self.stderr)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Sends SIGTERM, as systemd does on `stop`.
#[allow(unsafe_code)]
fn send_sigterm(pid: u32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; `pid` is our own child,
    // not yet reaped, so it cannot name another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, SIGTERM): {}",
        std::io::Error::last_os_error()
    );
}

fn parse_addr(value: &Value, key: &str, file: &str) -> SocketAddr {
    value[key]
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("{file}: `{key}` is not an address: {value}"))
}

// ---------------------------------------------------------------------------------------------
// Aggregator

/// Config knobs of a test aggregator; the rest is the shipped default.
#[derive(Debug, Clone)]
pub struct AggregatorOptions {
    /// `storage.synchronous`.
    pub synchronous: &'static str,
    /// `storage.flush_interval_ms`.
    pub flush_interval_ms: u64,
    /// `ingest.idle_timeout_ms`.
    pub idle_timeout_ms: u64,
    /// More lines for the `[query]` section (limits, `[[query.users]]` after them).
    pub query_extra: String,
    /// More lines for the `[storage]` section (retention, compaction).
    pub storage_extra: String,
    /// Top-level TOML appended at the end of the file (`[[federation]]` sections).
    pub extra_toml: String,
    /// Environment variables of the process (such as `RUNNEL_AGGREGATOR_PAUSE_AT`); change
    /// them between starts with [`AggregatorProcess::set_env`].
    pub env: Vec<(String, String)>,
}

impl Default for AggregatorOptions {
    fn default() -> Self {
        AggregatorOptions {
            synchronous: "normal",
            flush_interval_ms: 60_000,
            idle_timeout_ms: 3_000,
            query_extra: String::new(),
            storage_extra: String::new(),
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }
}

/// A `runnel-aggregator serve` process. After the first start its ingest port is pinned in the
/// config, so restarts come back where the agents reconnect.
pub struct AggregatorProcess {
    process: ManagedChild,
    config_path: PathBuf,
    data_dir: PathBuf,
    certs: Certs,
    options: AggregatorOptions,
    ingest_listen: SocketAddr,
    ingest: SocketAddr,
    query: SocketAddr,
    pgwire: SocketAddr,
}

impl AggregatorProcess {
    pub fn start(
        bins: &Binaries,
        dir: &TestDir,
        certs: &Certs,
        options: AggregatorOptions,
    ) -> Self {
        AggregatorProcess::start_named(bins, dir, "aggregator", certs, options)
    }

    /// [`AggregatorProcess::start`] with its files in `<test dir>/<label>/` and `label` in the
    /// report, so several aggregators of one fleet (same `certs`) run side by side.
    pub fn start_named(
        bins: &Binaries,
        dir: &TestDir,
        label: &str,
        certs: &Certs,
        options: AggregatorOptions,
    ) -> Self {
        let home = dir.join(label);
        std::fs::create_dir_all(&home).expect("create aggregator dir");
        let config_path = home.join("aggregator.toml");
        let process = ManagedChild::new(
            dir,
            label,
            &bins.aggregator,
            vec![
                "serve".into(),
                "--config".into(),
                config_path.display().to_string(),
            ],
            &home,
        );
        let unbound: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut aggregator = AggregatorProcess {
            process,
            config_path,
            data_dir: home.join("data"),
            certs: certs.clone(),
            options,
            ingest_listen: unbound,
            ingest: unbound,
            query: unbound,
            pgwire: unbound,
        };
        aggregator.spawn();
        aggregator
    }

    fn write_config(&self) {
        let text = format!(
            "[aggregator]\n\
             data_dir = {data_dir}\n\
             \n\
             [ingest]\n\
             listen = {ingest}\n\
             ca_cert = {ca}\n\
             cert = {cert}\n\
             key = {key}\n\
             idle_timeout_ms = {idle}\n\
             \n\
             [storage]\n\
             synchronous = {sync}\n\
             flush_interval_ms = {flush}\n\
             {storage_extra}\n\
             \n\
             [pgwire]\n\
             listen = \"127.0.0.1:0\"\n\
             \n\
             [query]\n\
             listen = \"127.0.0.1:0\"\n\
             {query_extra}\n\
             {extra_toml}\n",
            data_dir = toml_path(&self.data_dir),
            ingest = toml_string(&self.ingest_listen.to_string()),
            ca = toml_path(&self.certs.ca_cert),
            cert = toml_path(&self.certs.server_cert),
            key = toml_path(&self.certs.server_key),
            idle = self.options.idle_timeout_ms,
            sync = toml_string(self.options.synchronous),
            flush = self.options.flush_interval_ms,
            query_extra = self.options.query_extra,
            storage_extra = self.options.storage_extra,
            extra_toml = self.options.extra_toml,
        );
        std::fs::write(&self.config_path, text).expect("write aggregator config");
    }

    fn spawn(&mut self) {
        self.write_config();
        self.process.env.clone_from(&self.options.env);
        let runtime_path = self.data_dir.join("aggregator.runtime.json");
        match std::fs::remove_file(&runtime_path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("remove stale {}: {error}", runtime_path.display()),
        }
        self.process.spawn();
        let runtime = self.process.wait_runtime_file(&runtime_path);
        self.ingest = parse_addr(&runtime, "ingest", "aggregator.runtime.json");
        self.query = parse_addr(&runtime, "query", "aggregator.runtime.json");
        self.pgwire = parse_addr(&runtime, "pgwire", "aggregator.runtime.json");
        if self.ingest_listen.port() != 0 {
            assert_eq!(
                self.ingest, self.ingest_listen,
                "aggregator came back on another ingest port"
            );
        }
        // Pin the port: a restart must come back where the agents reconnect.
        self.ingest_listen = self.ingest;
    }

    /// The QUIC ingest address agents connect to.
    pub fn ingest_addr(&self) -> SocketAddr {
        self.ingest
    }

    /// The HTTP SQL API address of the current start.
    pub fn query_addr(&self) -> SocketAddr {
        self.query
    }

    /// The PostgreSQL protocol address of the current start.
    pub fn pgwire_addr(&self) -> SocketAddr {
        self.pgwire
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGKILL: no chance to flush, close or say goodbye.
    pub fn kill_hard(&mut self) {
        self.process.kill_hard();
    }

    /// SIGTERM and wait; panics unless it exits with status 0.
    pub fn stop(&mut self) {
        let status = self.process.stop();
        assert!(
            status.success(),
            "aggregator exited with {status} after SIGTERM"
        );
    }

    /// Starts again (after `stop` or `kill_hard`) on the same ingest port and data directory.
    pub fn restart(&mut self) {
        self.process.kill_hard();
        self.spawn();
    }

    /// Sets [`AggregatorOptions::env`] for the next [`AggregatorProcess::restart`].
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.options.env = env;
    }

    /// Panics with its stderr if it has exited.
    pub fn assert_running(&mut self) {
        self.process.assert_running("the test expected it to run");
    }

    /// Everything it wrote to stderr, over all starts.
    pub fn stderr(&self) -> String {
        self.process.stderr_text()
    }
}

// ---------------------------------------------------------------------------------------------
// Agent

/// Config knobs of a test agent; the rest is the shipped default.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `buffer.synchronous`.
    pub synchronous: &'static str,
    /// `uplink.max_batch_age_ms`.
    pub max_batch_age_ms: u64,
    /// `uplink.max_batch_events`.
    pub max_batch_events: u64,
    /// `sources.http.max_body_bytes` (None: default).
    pub max_body_bytes: Option<u64>,
    /// `sources.http.max_event_bytes` (None: default).
    pub max_event_bytes: Option<u64>,
    /// `uplink.keep_alive_interval_ms`.
    pub keep_alive_interval_ms: u64,
    /// `uplink.idle_timeout_ms`: how fast the agent notices a dead aggregator.
    pub idle_timeout_ms: u64,
    /// `uplink.reconnect_max_ms`.
    pub reconnect_max_ms: u64,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            synchronous: "normal",
            max_batch_age_ms: 20,
            max_batch_events: 1000,
            max_body_bytes: None,
            max_event_bytes: None,
            keep_alive_interval_ms: 300,
            idle_timeout_ms: 2_000,
            reconnect_max_ms: 500,
        }
    }
}

/// A `runnel-agent run` process with its own data directory.
pub struct AgentProcess {
    process: ManagedChild,
    config_path: PathBuf,
    data_dir: PathBuf,
    agent_id: String,
    http: SocketAddr,
}

/// Where an agent ships to and what it trusts.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub aggregator: SocketAddr,
    /// The CA the agent checks the aggregator's certificate against.
    pub ca_cert: PathBuf,
}

impl AgentProcess {
    /// Starts an agent whose files live in `<test dir>/<label>/`.
    pub fn start(
        bins: &Binaries,
        dir: &TestDir,
        label: &str,
        cert: &AgentCert,
        uplink: &Uplink,
        options: AgentOptions,
    ) -> Self {
        AgentProcess::start_with(
            bins,
            dir,
            label,
            cert,
            uplink,
            options,
            &AgentExtra::default(),
        )
    }

    /// [`AgentProcess::start`] with config beyond [`AgentOptions`]: other sources, buffer size.
    pub fn start_with(
        bins: &Binaries,
        dir: &TestDir,
        label: &str,
        cert: &AgentCert,
        uplink: &Uplink,
        options: AgentOptions,
        extra: &AgentExtra,
    ) -> Self {
        let home = dir.join(label);
        std::fs::create_dir_all(&home).expect("create agent dir");
        let config_path = home.join("agent.toml");
        let data_dir = home.join("data");
        let config = agent_config_with(&data_dir, cert, uplink, &options, extra);
        std::fs::write(&config_path, config).expect("write agent config");
        let process = ManagedChild::new(
            dir,
            label,
            &bins.agent,
            vec![
                "run".into(),
                "--config".into(),
                config_path.display().to_string(),
            ],
            &home,
        );
        let mut agent = AgentProcess {
            process,
            config_path,
            data_dir,
            agent_id: String::new(),
            http: ([127, 0, 0, 1], 0).into(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let runtime_path = self.data_dir.join("agent.runtime.json");
        match std::fs::remove_file(&runtime_path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("remove stale {}: {error}", runtime_path.display()),
        }
        self.process.spawn();
        let runtime = self.process.wait_runtime_file(&runtime_path);
        self.http = parse_addr(&runtime, "http", "agent.runtime.json");
        self.agent_id = runtime["agent_id"]
            .as_str()
            .unwrap_or_else(|| panic!("agent.runtime.json has no agent_id: {runtime}"))
            .to_owned();
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The HTTP source address of the current start (port 0: it changes on restart).
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The agent id it reported (the CN of its certificate).
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    pub fn kill_hard(&mut self) {
        self.process.kill_hard();
    }

    /// SIGTERM and wait; panics unless it exits with status 0.
    pub fn stop(&mut self) {
        let status = self.process.stop();
        assert!(status.success(), "agent exited with {status} after SIGTERM");
    }

    /// Starts again with the same config and data directory.
    pub fn restart(&mut self) {
        self.process.kill_hard();
        self.spawn();
    }

    pub fn assert_running(&mut self) {
        self.process.assert_running("the test expected it to run");
    }

    pub fn stderr(&self) -> String {
        self.process.stderr_text()
    }
}

/// Agent config beyond [`AgentOptions`], for tests of other sources and of a full buffer.
#[derive(Debug, Clone, Default)]
pub struct AgentExtra {
    /// `buffer.max_bytes` (None: default).
    pub buffer_max_bytes: Option<u64>,
    /// `agent.labels` as an inline table, such as `{ site = "berlin", role = "pos" }` (None: the
    /// harness's `{ test = "e2e" }`).
    pub labels: Option<String>,
    /// TOML appended to the config after every table the harness writes: whole tables such as
    /// `[[sources.mqtt]]` or `[sources.segment]` (not `[agent]`, `[sources.http]`, `[buffer]` or
    /// `[uplink]`, which the harness writes).
    pub toml: String,
}

/// [`agent_config`] plus `extra`.
pub fn agent_config_with(
    data_dir: &Path,
    cert: &AgentCert,
    uplink: &Uplink,
    options: &AgentOptions,
    extra: &AgentExtra,
) -> String {
    let mut config = agent_config(data_dir, cert, uplink, options);
    if let Some(n) = extra.buffer_max_bytes {
        let with_size = format!("[buffer]\nmax_bytes = {n}\n");
        assert!(
            config.contains("[buffer]\n"),
            "agent_config writes [buffer]"
        );
        config = config.replacen("[buffer]\n", &with_size, 1);
    }
    if let Some(labels) = &extra.labels {
        let default = "labels = { test = \"e2e\" }\n";
        assert!(config.contains(default), "agent_config writes agent.labels");
        config = config.replacen(default, &format!("labels = {labels}\n"), 1);
    }
    if !extra.toml.is_empty() {
        config.push('\n');
        config.push_str(&extra.toml);
        if !extra.toml.ends_with('\n') {
            config.push('\n');
        }
    }
    config
}

/// The text of a test agent's config file.
pub fn agent_config(
    data_dir: &Path,
    cert: &AgentCert,
    uplink: &Uplink,
    options: &AgentOptions,
) -> String {
    let mut http = String::from("listen = \"127.0.0.1:0\"\n");
    if let Some(n) = options.max_body_bytes {
        let _ = writeln!(http, "max_body_bytes = {n}");
    }
    if let Some(n) = options.max_event_bytes {
        let _ = writeln!(http, "max_event_bytes = {n}");
    }
    format!(
        "[agent]\n\
         data_dir = {data_dir}\n\
         labels = {{ test = \"e2e\" }}\n\
         \n\
         [sources.http]\n\
         {http}\
         \n\
         [buffer]\n\
         synchronous = {sync}\n\
         \n\
         [uplink]\n\
         aggregator = {aggregator}\n\
         server_name = \"localhost\"\n\
         ca_cert = {ca}\n\
         cert = {cert}\n\
         key = {key}\n\
         max_batch_events = {batch_events}\n\
         max_batch_age_ms = {batch_age}\n\
         reconnect_min_ms = 20\n\
         reconnect_max_ms = {reconnect_max}\n\
         keep_alive_interval_ms = {keep_alive}\n\
         idle_timeout_ms = {idle}\n",
        data_dir = toml_path(data_dir),
        sync = toml_string(options.synchronous),
        aggregator = toml_string(&uplink.aggregator.to_string()),
        ca = toml_path(&uplink.ca_cert),
        cert = toml_path(&cert.cert),
        key = toml_path(&cert.key),
        batch_events = options.max_batch_events,
        batch_age = options.max_batch_age_ms,
        reconnect_max = options.reconnect_max_ms,
        keep_alive = options.keep_alive_interval_ms,
        idle = options.idle_timeout_ms,
    )
}

// ---------------------------------------------------------------------------------------------
// HTTP: events in, SQL out

/// Per-request deadline of the harness's HTTP calls; a hung request is a bug worth a failure.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// Makes rustls on ring the process's TLS provider (reqwest is built without a default one);
/// every client the harness builds calls it first.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client that ignores proxy settings of the environment.
pub fn http_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(HTTP_TIMEOUT)
        .build()
        .expect("build HTTP client")
}

/// The answer of the agent's HTTP source.
#[derive(Debug, Clone)]
pub struct PostOutcome {
    pub status: u16,
    /// The body parsed as JSON, or `Value::String` with the raw text when it is not JSON.
    pub body: Value,
    pub retry_after: Option<String>,
}

/// POSTs `body` as it is to `/v1/events`.
pub async fn post_body(
    client: &reqwest::Client,
    http: SocketAddr,
    body: impl Into<reqwest::Body>,
) -> anyhow::Result<PostOutcome> {
    let url = format!("http://{http}{}", load::EVENTS_PATH);
    let response = client
        .post(&url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let text = response
        .text()
        .await
        .with_context(|| format!("read answer of POST {url}"))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(PostOutcome {
        status,
        body,
        retry_after,
    })
}

/// The parts of an HTTP answer a test looks at.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub bytes: Vec<u8>,
}

impl HttpReply {
    /// The body as JSON, or `Value::String` with the (lossy) text when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.bytes).into_owned()))
    }

    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .unwrap_or_default()
    }

    /// The `"error"` of a JSON error answer ("" when there is none).
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

/// Sends a request built on [`http_client`] and reads the whole answer.
pub async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<HttpReply> {
    let response = request.send().await.context("send request")?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.context("read answer")?.to_vec();
    Ok(HttpReply {
        status,
        headers,
        bytes,
    })
}

/// POSTs `body` with `content_type` to `path` (such as `/v1/track`) on the agent's HTTP source.
pub async fn post_path(
    client: &reqwest::Client,
    http: SocketAddr,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> anyhow::Result<HttpReply> {
    let url = format!("http://{http}{path}");
    send(
        client
            .post(&url)
            .header("content-type", content_type)
            .body(body),
    )
    .await
    .with_context(|| format!("POST {url}"))
}

/// GETs `path_and_query` (such as `/i?e=pv&...`) on the agent's HTTP source.
pub async fn get_path(
    client: &reqwest::Client,
    http: SocketAddr,
    path_and_query: &str,
) -> anyhow::Result<HttpReply> {
    let url = format!("http://{http}{path_and_query}");
    send(client.get(&url))
        .await
        .with_context(|| format!("GET {url}"))
}

/// Runs `sql` and returns its rows (fails when the answer was truncated).
pub async fn query_rows(addr: SocketAddr, sql: &str) -> anyhow::Result<Vec<Vec<Value>>> {
    let answer = query(addr, sql).await?;
    anyhow::ensure!(
        answer["truncated"] != Value::Bool(true),
        "{sql:?}: answer truncated"
    );
    let rows = answer["rows"]
        .as_array()
        .with_context(|| format!("{sql:?}: no rows array in {answer}"))?;
    rows.iter()
        .map(|row| {
            row.as_array()
                .cloned()
                .with_context(|| format!("{sql:?}: a row is not an array: {row}"))
        })
        .collect()
}

/// Waits until `sql` (a `SELECT count(*) ...`) answers exactly `n_expected`, failing at once when
/// it answers more (a duplicate or something that should not be stored).
pub async fn wait_count_of(dir: &TestDir, query_addr: SocketAddr, sql: &str, n_expected: u64) {
    let what = format!("{sql:?} answers {n_expected}");
    dir.wait_until(ARRIVAL_TIMEOUT, &what, || async move {
        let n = query_count(query_addr, sql).await?;
        assert!(
            n <= n_expected,
            "{sql:?} answers {n}, more than {n_expected}"
        );
        anyhow::ensure!(n == n_expected, "{sql:?} answers {n}");
        Ok(())
    })
    .await;
}

/// Parses the `attrs` column (JSON text) of a query row.
pub fn attrs_of(cell: &Value) -> Value {
    let text = cell
        .as_str()
        .unwrap_or_else(|| panic!("attrs is not text: {cell}"));
    serde_json::from_str(text).unwrap_or_else(|error| panic!("attrs is not JSON ({error}): {text}"))
}

/// One stored event as the aggregator answers it: the core columns, times as Unix ms, and `attrs`
/// parsed.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub agent_id: String,
    pub seq: u64,
    pub event_time_ms: i64,
    pub receive_time_ms: i64,
    pub source: String,
    pub stream: String,
    pub name: String,
    pub event_id: Option<String>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub attrs: Value,
}

/// Every stored event that matches `where_sql` (SQL after `WHERE`), in `seq` order.
pub async fn stored_events(
    query_addr: SocketAddr,
    where_sql: &str,
) -> anyhow::Result<Vec<StoredEvent>> {
    let sql = format!(
        "SELECT agent_id, seq, CAST(event_time AS BIGINT), CAST(receive_time AS BIGINT), source, \
         stream, name, event_id, user_id, session_id, attrs FROM events WHERE {where_sql} \
         ORDER BY agent_id, seq"
    );
    let text = |cell: &Value| -> anyhow::Result<String> {
        cell.as_str()
            .map(str::to_owned)
            .with_context(|| format!("{sql:?}: expected text, got {cell}"))
    };
    let optional = |cell: &Value| -> anyhow::Result<Option<String>> {
        if cell.is_null() {
            Ok(None)
        } else {
            text(cell).map(Some)
        }
    };
    let int = |cell: &Value| -> anyhow::Result<i64> {
        cell.as_i64()
            .with_context(|| format!("{sql:?}: expected an integer, got {cell}"))
    };
    let mut events = Vec::new();
    for row in query_rows(query_addr, &sql).await? {
        anyhow::ensure!(row.len() == 11, "{sql:?}: row of {} columns", row.len());
        events.push(StoredEvent {
            agent_id: text(&row[0])?,
            seq: u64::try_from(int(&row[1])?)?,
            event_time_ms: int(&row[2])?,
            receive_time_ms: int(&row[3])?,
            source: text(&row[4])?,
            stream: text(&row[5])?,
            name: text(&row[6])?,
            event_id: optional(&row[7])?,
            user_id: optional(&row[8])?,
            session_id: optional(&row[9])?,
            attrs: attrs_of(&row[10]),
        });
    }
    Ok(events)
}

/// The aggregator and one agent of a fresh fleet, for tests of the agent's sources.
pub struct Fleet {
    // Field order is drop order: processes go before the directory that holds their logs.
    pub agent: AgentProcess,
    pub aggregator: AggregatorProcess,
    pub certs: Certs,
    pub dir: TestDir,
}

/// Starts an aggregator and an agent with certificate `agent_name` and `extra` config.
pub fn start_fleet_with(
    bins: &Binaries,
    test_name: &str,
    agent_name: &str,
    aggregator_options: AggregatorOptions,
    agent_options: AgentOptions,
    extra: &AgentExtra,
) -> Fleet {
    let dir = TestDir::new(test_name);
    let certs = Certs::init(&dir.join("certs"));
    let aggregator = AggregatorProcess::start(bins, &dir, &certs, aggregator_options);
    let cert = certs.issue_agent(agent_name);
    let uplink = Uplink {
        aggregator: aggregator.ingest_addr(),
        ca_cert: certs.ca_cert.clone(),
    };
    let agent = AgentProcess::start_with(
        bins,
        &dir,
        &format!("agent-{agent_name}"),
        &cert,
        &uplink,
        agent_options,
        extra,
    );
    assert_eq!(agent.agent_id(), agent_name);
    Fleet {
        agent,
        aggregator,
        certs,
        dir,
    }
}

/// POSTs `events` as one JSON array.
pub async fn post_events(
    client: &reqwest::Client,
    http: SocketAddr,
    events: &[Value],
) -> anyhow::Result<PostOutcome> {
    post_body(client, http, Value::Array(events.to_vec()).to_string()).await
}

/// A test event with a unique `event_id` and a few fields that land in the core columns and in
/// `attrs`.
pub fn test_event(event_id: &str) -> Value {
    json!({
        "event_id": event_id,
        "name": "page_view",
        "user_id": format!("user-{}", event_id.len()),
        "session_id": "s-1",
        "url": format!("/products/{event_id}"),
        "tags": ["e2e"],
        "score": 0.5,
    })
}

/// Runs `sql` on the aggregator's HTTP API; non-200 answers are errors carrying the body.
pub async fn query(addr: SocketAddr, sql: &str) -> anyhow::Result<Value> {
    let url = format!("http://{addr}/api/v1/query");
    let response = http_client()
        .post(&url)
        .json(&json!({ "sql": sql }))
        .send()
        .await
        .with_context(|| format!("POST {url} {sql:?}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("read answer to {sql:?}"))?;
    anyhow::ensure!(status.is_success(), "{sql:?}: HTTP {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("{sql:?}: answer is not JSON: {text}"))
}

/// Runs a query whose answer is one number (`SELECT count(*) ...`).
pub async fn query_count(addr: SocketAddr, sql: &str) -> anyhow::Result<u64> {
    let answer = query(addr, sql).await?;
    answer["rows"][0][0]
        .as_u64()
        .with_context(|| format!("{sql:?}: expected one number, got {answer}"))
}

/// Runs a query and returns its first column as strings (JSON null: "NULL"); fails when the
/// answer was truncated.
pub async fn query_strings(addr: SocketAddr, sql: &str) -> anyhow::Result<Vec<String>> {
    let answer = query(addr, sql).await?;
    anyhow::ensure!(
        answer["truncated"] != Value::Bool(true),
        "{sql:?}: answer truncated"
    );
    let rows = answer["rows"]
        .as_array()
        .with_context(|| format!("{sql:?}: no rows array in {answer}"))?;
    Ok(rows
        .iter()
        .map(|row| match &row[0] {
            Value::String(text) => text.clone(),
            Value::Null => "NULL".to_owned(),
            other => other.to_string(),
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Refereeing by event id

/// Event ids stored more than once, as `id xN` (should always be empty).
pub async fn duplicate_event_ids(query_addr: SocketAddr) -> anyhow::Result<Vec<String>> {
    let answer = query(
        query_addr,
        "SELECT event_id, count(*) AS c FROM events GROUP BY event_id HAVING count(*) > 1 ORDER BY event_id LIMIT 20",
    )
    .await?;
    let rows = answer["rows"].as_array().context("rows")?;
    Ok(rows
        .iter()
        .map(|row| format!("{} x{}", row[0], row[1]))
        .collect())
}

/// Asserts storage holds no duplicate: every (agent_id, seq) and every event_id appears once.
pub async fn assert_no_duplicates(query_addr: SocketAddr) {
    let n_rows = query_count(query_addr, "SELECT count(*) FROM events")
        .await
        .expect("count rows");
    let n_distinct_seq = query_count(
        query_addr,
        "SELECT count(*) FROM (SELECT DISTINCT agent_id, seq FROM events)",
    )
    .await
    .expect("count distinct (agent_id, seq)");
    let n_distinct_ids = query_count(query_addr, "SELECT count(DISTINCT event_id) FROM events")
        .await
        .expect("count distinct event_id");
    let duplicates = duplicate_event_ids(query_addr)
        .await
        .expect("find duplicate event ids");
    assert!(
        n_rows == n_distinct_seq && n_rows == n_distinct_ids && duplicates.is_empty(),
        "duplicates in storage: {n_rows} rows, {n_distinct_seq} distinct (agent_id, seq), \
         {n_distinct_ids} distinct event_id; first duplicated ids: {duplicates:?}"
    );
}

/// Rows per page when listing stored event ids: below the API's default `max_result_rows`.
const EVENT_IDS_PAGE_ROWS: usize = 50_000;

/// Every stored event id that starts with `id_prefix`, page by page.
pub async fn stored_event_ids(
    query_addr: SocketAddr,
    id_prefix: &str,
) -> anyhow::Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    for page_idx in 0.. {
        let sql = format!(
            "SELECT event_id FROM events WHERE event_id LIKE '{id_prefix}%' ORDER BY event_id LIMIT {EVENT_IDS_PAGE_ROWS} OFFSET {}",
            page_idx * EVENT_IDS_PAGE_ROWS
        );
        let page = query_strings(query_addr, &sql).await?;
        let n_rows = page.len();
        ids.extend(page);
        if n_rows < EVENT_IDS_PAGE_ROWS {
            break;
        }
    }
    Ok(ids)
}

/// Waits until every id in `acked` is stored (among stored ids that start with `id_prefix`).
pub async fn wait_all_stored(
    dir: &TestDir,
    query_addr: SocketAddr,
    id_prefix: &str,
    acked: &BTreeSet<String>,
) {
    let what = format!("all {} acknowledged events are stored", acked.len());
    dir.wait_until(ARRIVAL_TIMEOUT, &what, || async move {
        let stored = stored_event_ids(query_addr, id_prefix).await?;
        let missing: Vec<&String> = acked.difference(&stored).collect();
        anyhow::ensure!(
            missing.is_empty(),
            "{} of {} acknowledged ids missing, such as {:?} ({} stored)",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)],
            stored.len()
        );
        Ok(())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Helpers for the reliability suite (`faults`, `tests/tests/reliability.rs`)

impl AgentProcess {
    /// [`AgentProcess::start_with`] with `edit` applied to the config text before it is written:
    /// for keys the harness does not write, such as `buffer.when_full` or `buffer.path`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_edited(
        bins: &Binaries,
        dir: &TestDir,
        label: &str,
        cert: &AgentCert,
        uplink: &Uplink,
        options: AgentOptions,
        extra: &AgentExtra,
        edit: impl FnOnce(String) -> String,
    ) -> Self {
        let home = dir.join(label);
        std::fs::create_dir_all(&home).expect("create agent dir");
        let config_path = home.join("agent.toml");
        let data_dir = home.join("data");
        let config = edit(agent_config_with(&data_dir, cert, uplink, &options, extra));
        std::fs::write(&config_path, config).expect("write agent config");
        let process = ManagedChild::new(
            dir,
            label,
            &bins.agent,
            vec![
                "run".into(),
                "--config".into(),
                config_path.display().to_string(),
            ],
            &home,
        );
        let mut agent = AgentProcess {
            process,
            config_path,
            data_dir,
            agent_id: String::new(),
            http: ([127, 0, 0, 1], 0).into(),
        };
        agent.spawn();
        agent
    }

    /// The runtime file of the current start: the addresses it bound (`http`, `mqtt_listener`).
    pub fn runtime(&self) -> Value {
        let path = self.data_dir.join("agent.runtime.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
        serde_json::from_str(&text)
            .unwrap_or_else(|error| panic!("{} is not JSON ({error}): {text}", path.display()))
    }
}

/// Inserts `lines` (`key = value` lines) at the top of `[table]` in a config text written by
/// [`agent_config_with`]; panics when the table is not there.
pub fn with_table_keys(config: String, table: &str, lines: &str) -> String {
    let header = format!("[{table}]\n");
    assert!(
        config.contains(&header),
        "config has no {header:?}:\n{config}"
    );
    let mut lines = lines.to_owned();
    if !lines.ends_with('\n') {
        lines.push('\n');
    }
    config.replacen(&header, &format!("{header}{lines}"), 1)
}

/// `unix_ms` as RFC 3339 with milliseconds, UTC (`2026-01-31T12:00:00.000Z`), as trackers send.
pub fn rfc3339(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms)
        .expect("a valid time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Now, in Unix milliseconds.
pub fn now_unix_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits i64")
}

/// Creates `bucket` on the S3-compatible `endpoint` (moto accepts an unsigned PUT).
pub async fn create_s3_bucket(endpoint: &str, bucket: &str) {
    let created = http_client()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("reach the S3 endpoint");
    assert!(
        created.status().is_success(),
        "create bucket {bucket}: {}",
        created.status()
    );
}
