//! Agent and aggregator as child processes (the release binaries next to the bench), with the
//! shipped defaults except addresses (loopback, port 0), data directories, certificates and the
//! `synchronous` level under test; plus what the bench reads about them from `/proc`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

/// How long a process may take to write its runtime file.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    pub aggregator: PathBuf,
}

impl Binaries {
    /// The test binaries of this package, next to the running bench executable.
    pub fn next_to_current_exe() -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe().context("find the bench executable")?;
        let dir = exe.parent().context("bench executable has no directory")?;
        let bins = Binaries {
            agent: dir.join("runnel-test-agent"),
            aggregator: dir.join("runnel-test-aggregator"),
        };
        for path in [&bins.agent, &bins.aggregator] {
            anyhow::ensure!(
                path.is_file(),
                "{} not found; build with `cargo build --release -p runnel-tests --bins`",
                path.display()
            );
        }
        Ok(bins)
    }
}

/// The fleet PKI for the bench, made by the aggregator's own certificate code.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
}

/// Validity of bench certificates in days.
const CERT_DAYS: u32 = 2;

impl Pki {
    pub fn init(dir: &Path) -> anyhow::Result<Pki> {
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let ca = runnel_aggregator::certs::init(dir, &names, CERT_DAYS, false)?;
        let agent = runnel_aggregator::certs::issue_agent(
            dir,
            "bench-agent",
            &dir.join("agents"),
            CERT_DAYS,
        )?;
        Ok(Pki {
            ca_cert: ca.ca_cert,
            server_cert: ca.server_cert,
            server_key: ca.server_key,
            agent_cert: agent.cert,
            agent_key: agent.key,
        })
    }
}

/// A child process, killed when dropped. Output goes to `<label>.stderr` / `.stdout` in its dir.
pub struct Process {
    pub label: &'static str,
    child: Child,
    stderr: PathBuf,
}

impl Process {
    fn spawn(
        label: &'static str,
        program: &Path,
        args: &[&str],
        dir: &Path,
    ) -> anyhow::Result<Process> {
        let stdout_path = dir.join(format!("{label}.stdout"));
        let stderr_path = dir.join(format!("{label}.stderr"));
        let stdout = std::fs::File::create(&stdout_path)
            .with_context(|| format!("create {}", stdout_path.display()))?;
        let stderr = std::fs::File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        let child = Command::new(program)
            .args(args)
            .env(
                "RUNNEL_LOG",
                std::env::var("RUNNEL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawn {} {}", program.display(), args.join(" ")))?;
        Ok(Process {
            label,
            child,
            stderr: stderr_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the tail of stderr when the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited with {status}; stderr tail:\n{}",
                self.label,
                tail(&self.stderr, 4000)
            );
        }
        Ok(())
    }

    fn wait_runtime_file(&mut self, path: &Path) -> anyhow::Result<Value> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.ensure_running()?;
            if let Ok(text) = std::fs::read_to_string(path)
                && let Ok(value) = serde_json::from_str::<Value>(&text)
                && value["pid"].as_u64() == Some(u64::from(self.pid()))
            {
                return Ok(value);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not write {} within {STARTUP_TIMEOUT:?}; stderr tail:\n{}",
                self.label,
                path.display(),
                tail(&self.stderr, 4000)
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Lines of stderr at WARN or ERROR level, for the report.
    pub fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, max_bytes: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(max_bytes)..]).into_owned()
}

pub fn toml_str(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

fn toml_path(path: &Path) -> String {
    toml_str(&path.display().to_string())
}

pub struct Aggregator {
    pub process: Process,
    pub ingest: SocketAddr,
    pub query: SocketAddr,
}

impl Aggregator {
    pub fn start(
        bins: &Binaries,
        pki: &Pki,
        dir: &Path,
        synchronous: &str,
    ) -> anyhow::Result<Aggregator> {
        std::fs::create_dir_all(dir)?;
        let data_dir = dir.join("data");
        let config_path = dir.join("aggregator.toml");
        let config = format!(
            "[aggregator]\ndata_dir = {}\n\n[ingest]\nlisten = \"127.0.0.1:0\"\nca_cert = {}\ncert = {}\nkey = {}\n\n\
             [storage]\nsynchronous = {}\n\n[query]\nlisten = \"127.0.0.1:0\"\n\n[pgwire]\nlisten = \"127.0.0.1:0\"\n",
            toml_path(&data_dir),
            toml_path(&pki.ca_cert),
            toml_path(&pki.server_cert),
            toml_path(&pki.server_key),
            toml_str(synchronous),
        );
        std::fs::write(&config_path, config)?;
        let mut process = Process::spawn(
            "aggregator",
            &bins.aggregator,
            &["serve", "--config", &config_path.display().to_string()],
            dir,
        )?;
        let runtime = process.wait_runtime_file(&data_dir.join("aggregator.runtime.json"))?;
        Ok(Aggregator {
            process,
            ingest: addr(&runtime, "ingest")?,
            query: addr(&runtime, "query")?,
        })
    }
}

pub struct Agent {
    pub process: Process,
    pub http: SocketAddr,
    /// The agent's SQLite buffer (the default path under its data dir).
    pub buffer: PathBuf,
}

impl Agent {
    pub fn start(
        bins: &Binaries,
        pki: &Pki,
        dir: &Path,
        synchronous: &str,
        aggregator: SocketAddr,
    ) -> anyhow::Result<Agent> {
        Agent::start_with(bins, pki, dir, synchronous, aggregator, "")
    }

    /// As [`Agent::start`], with `extra` TOML (such as `[[sources.mqtt]]` tables) appended to
    /// the config.
    pub fn start_with(
        bins: &Binaries,
        pki: &Pki,
        dir: &Path,
        synchronous: &str,
        aggregator: SocketAddr,
        extra: &str,
    ) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(dir)?;
        let data_dir = dir.join("data");
        let config_path = dir.join("agent.toml");
        let config = format!(
            "[agent]\ndata_dir = {}\n\n[sources.http]\nlisten = \"127.0.0.1:0\"\n\n[buffer]\nsynchronous = {}\n\n\
             [uplink]\naggregator = {}\nserver_name = \"localhost\"\nca_cert = {}\ncert = {}\nkey = {}\n\n{extra}",
            toml_path(&data_dir),
            toml_str(synchronous),
            toml_str(&aggregator.to_string()),
            toml_path(&pki.ca_cert),
            toml_path(&pki.agent_cert),
            toml_path(&pki.agent_key),
        );
        std::fs::write(&config_path, config)?;
        let mut process = Process::spawn(
            "agent",
            &bins.agent,
            &["run", "--config", &config_path.display().to_string()],
            dir,
        )?;
        let runtime = process.wait_runtime_file(&data_dir.join("agent.runtime.json"))?;
        Ok(Agent {
            process,
            http: addr(&runtime, "http")?,
            buffer: data_dir.join("buffer.sqlite"),
        })
    }
}

fn addr(runtime: &Value, key: &str) -> anyhow::Result<SocketAddr> {
    runtime[key]
        .as_str()
        .and_then(|text| text.parse().ok())
        .with_context(|| format!("runtime file: `{key}` is not an address: {runtime}"))
}

// ---------------------------------------------------------------------------------------------
// /proc

/// `VmHWM` (peak resident set) of a process in bytes.
pub fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/<pid>/status")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("VmHWM is not a number")?;
    Ok(kib * 1024)
}

/// User + system CPU time of a process (`/proc/<pid>/stat`, clock ticks of 1/100 s: Linux's
/// USER_HZ on every architecture we run on).
pub fn cpu_time(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name, which may contain spaces.
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `after` starts at field 3.
    let ticks: u64 = fields
        .get(11..13)
        .context("short stat")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    Ok(Duration::from_millis(ticks * 10))
}

/// Bytes a process caused to be written to storage (`write_bytes` of `/proc/<pid>/io`).
pub fn disk_write_bytes(pid: u32) -> anyhow::Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .context("no write_bytes in /proc/<pid>/io")
}

/// `RcvbufErrors` of `Udp:` in /proc/net/snmp: datagrams dropped because a socket's receive
/// buffer was full (system-wide; a change during a scenario means the relay or a peer dropped).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let idx = names.iter().position(|n| *n == "RcvbufErrors")?;
    values.get(idx)?.parse().ok()
}

/// The pid of the first process whose `comm` is `name` (such as the MQTT broker), if any.
pub fn find_process(name: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == name).then_some(pid)
        })
}
