//! `runnel-bench`: the end-to-end benchmark of agent and aggregator, run as real processes.
//!
//! It measures, never asserts: events per second acknowledged and queryable, acknowledgement
//! and edge-to-queryable latency, the agent's peak memory, and bytes on the wire per event,
//! against the physical limit of the same events inserted straight into SQLite on the same disk
//! in the same run. Results go to stdout (and `--out`) as markdown; docs/BENCHMARKS.md records
//! them with the machine they came from.
//!
//! Everything listens on loopback only; every wait has a deadline. Run it from a release build:
//! `cargo build --release -p runnel-tests --bins && target/release/runnel-bench`.

#[path = "../bench/events.rs"]
mod events;
#[path = "../bench/load.rs"]
mod load;
#[path = "../bench/raw_sqlite.rs"]
mod raw_sqlite;
#[path = "../bench/relay.rs"]
mod relay;
#[path = "../bench/stack.rs"]
mod stack;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

/// Time for the aggregator to answer the first warm-up event (connection set up, first batch).
const WARMUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after the load ends every acknowledged event must be queryable.
const QUERYABLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval of `SELECT count(*)` polls; the resolution of "time until queryable".
const COUNT_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// After the last event is queryable, the final acks and QUIC acks still cross the relay; the
/// byte counts are read after this pause so they are in.
const WIRE_SETTLE: Duration = Duration::from_millis(300);
/// Most rows fetched for the edge-to-queryable sample (the API returns at most 100 000).
const MAX_LATENCY_SAMPLE_ROWS: u64 = 50_000;
/// Events per request of the two scenarios.
const SCENARIOS: [usize; 2] = [1, 100];
/// Rows per transaction of the raw SQLite runs (plus `--clients`, see `main`).
const RAW_ROWS_PER_TX: [usize; 2] = [100, 1000];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Synchronous {
    Full,
    Normal,
}

impl Synchronous {
    fn as_str(self) -> &'static str {
        match self {
            Synchronous::Full => "full",
            Synchronous::Normal => "normal",
        }
    }
}

/// Runnel end-to-end benchmark: agent ingest, wire size and edge-to-queryable latency against
/// the raw SQLite limit of this machine.
#[derive(Debug, Parser)]
#[command(name = "runnel-bench")]
struct Args {
    /// Events per scenario.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Concurrent HTTP clients (keep-alive connections).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// SQLite `synchronous` level of the agent's buffer, the aggregator's WAL and the raw run.
    #[arg(long, value_enum, default_value_t = Synchronous::Full)]
    synchronous: Synchronous,
    /// Also write the markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Longest time the load of one scenario may run; then it stops and the report says so.
    #[arg(long, default_value_t = 60)]
    scenario_time_limit_s: u64,
    /// Longest time one raw SQLite run may take.
    #[arg(long, default_value_t = 30)]
    raw_time_limit_s: u64,
    /// Keep the temporary directory (configs, logs, databases) and print its path.
    #[arg(long)]
    keep_dir: bool,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("runnel-bench: error: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("runnel-bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

struct ScenarioResult {
    events_per_request: usize,
    load: load::LoadResult,
    /// From the start of the load until `count(*)` showed every acknowledged event.
    queryable_after: Result<Duration, u64>,
    edge_latencies_ms: Result<Vec<u64>, String>,
    handshake: relay::Traffic,
    traffic: relay::Traffic,
    agent_peak_rss_bytes: Option<u64>,
    agent_cpu: Option<Duration>,
    aggregator_cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
    agent_disk_write_bytes: Option<u64>,
    udp_rcvbuf_errors: Option<u64>,
    warnings: Vec<String>,
}

impl ScenarioResult {
    fn acked_per_s(&self) -> f64 {
        self.load.n_events_acked as f64 / self.load.elapsed.as_secs_f64().max(1e-9)
    }

    fn queryable_per_s(&self) -> Option<f64> {
        let after = self.queryable_after.as_ref().ok()?;
        Some(self.load.n_events_acked as f64 / after.as_secs_f64().max(1e-9))
    }

    fn json_bytes_per_event(&self) -> f64 {
        self.load.json_bytes_acked as f64 / self.load.n_events_acked.max(1) as f64
    }

    fn wire_bytes_per_event(&self) -> f64 {
        (self.traffic.up_bytes + self.traffic.down_bytes) as f64
            / self.load.n_events_acked.max(1) as f64
    }

    fn up_bytes_per_event(&self) -> f64 {
        self.traffic.up_bytes as f64 / self.load.n_events_acked.max(1) as f64
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.events >= 100, "--events {}: at least 100", args.events);
    anyhow::ensure!(args.clients >= 1, "--clients {}: at least 1", args.clients);
    let bins = stack::Binaries::next_to_current_exe()?;
    let exe = std::env::current_exe()?;
    if exe.components().any(|c| c.as_os_str() == "debug") {
        eprintln!(
            "runnel-bench: warning: this is a debug build; figures are meaningless. Use --release."
        );
    }
    let root = tempfile::Builder::new()
        .prefix("runnel-bench-")
        .tempdir()
        .context("create a temp dir")?;
    let root_path = root.path().to_owned();
    let started_unix_ms = unix_ms();
    let machine = machine_description(&root_path);
    eprintln!("runnel-bench: {machine}");
    eprintln!("runnel-bench: working in {}", root_path.display());

    let generated = Instant::now();
    let events = events::generate(args.events, args.seed, started_unix_ms);
    eprintln!(
        "runnel-bench: generated {} events, {:.0} JSON bytes on average, in {:.1?}",
        events.len(),
        events.iter().map(String::len).sum::<usize>() as f64 / events.len() as f64,
        generated.elapsed()
    );

    // The physical limit, first: nothing else of ours runs yet.
    let blobs = stored_blobs(&events)?;
    let avg_blob = blobs.iter().map(Vec::len).sum::<usize>() as f64 / blobs.len() as f64;
    let mut raw_sizes: Vec<usize> = std::iter::once(args.clients)
        .chain(RAW_ROWS_PER_TX)
        .collect();
    raw_sizes.sort_unstable();
    raw_sizes.dedup();
    let mut raw_results = Vec::new();
    for rows_per_tx in raw_sizes {
        let path = root_path.join(format!("raw-{rows_per_tx}.sqlite"));
        let sync = args.synchronous.as_str();
        let limit = Duration::from_secs(args.raw_time_limit_s);
        let blobs_ref = &blobs;
        let result = tokio::task::block_in_place(|| {
            raw_sqlite::run(&path, sync, blobs_ref, rows_per_tx, limit)
        })?;
        eprintln!(
            "runnel-bench: raw SQLite, {rows_per_tx} rows/tx: {:.0} events/s",
            result.events_per_s()
        );
        raw_results.push(result);
    }

    let pki = stack::Pki::init(&root_path.join("certs"))?;
    let mut scenarios = Vec::new();
    for events_per_request in SCENARIOS {
        let dir = root_path.join(format!("scenario-{events_per_request}"));
        let result = run_scenario(&args, &bins, &pki, &dir, &events, events_per_request).await?;
        eprintln!(
            "runnel-bench: {events_per_request} event(s)/request: {:.0} events/s acknowledged",
            result.acked_per_s()
        );
        scenarios.push(result);
    }

    let report = report(
        &args,
        &machine,
        started_unix_ms,
        avg_blob,
        &raw_results,
        &scenarios,
    );
    println!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("write {}", out.display()))?;
    }
    if args.keep_dir {
        let kept = root.keep();
        eprintln!("runnel-bench: kept {}", kept.display());
    }
    Ok(())
}

/// The events as the agent stores them: decoded by the agent's own JSON decoder and encoded by
/// its buffer codec (postcard), so the raw run writes rows of the same size.
fn stored_blobs(events: &[String]) -> anyhow::Result<Vec<Vec<u8>>> {
    let now = unix_ms();
    let mut blobs = Vec::with_capacity(events.len());
    for json in events {
        let decoded = runnel_agent::decode::json::decode(
            json.as_bytes(),
            now,
            runnel_agent::http::DEFAULT_STREAM,
        )
        .context("the agent's decoder rejects a generated event")?;
        for event in &decoded {
            blobs.push(runnel_agent::buffer::EncodedEvent::encode(event)?.0);
        }
    }
    Ok(blobs)
}

async fn run_scenario(
    args: &Args,
    bins: &stack::Binaries,
    pki: &stack::Pki,
    dir: &Path,
    events: &[String],
    events_per_request: usize,
) -> anyhow::Result<ScenarioResult> {
    let sync = args.synchronous.as_str();
    let mut aggregator = stack::Aggregator::start(bins, pki, &dir.join("aggregator"), sync)?;
    let relay = relay::Relay::start(aggregator.ingest)?;
    let mut agent = stack::Agent::start(bins, pki, &dir.join("agent"), sync, relay.listen)?;
    let client = load::http_client(args.clients);
    let query_client = load::http_client(1);

    // Warm-up: one event all the way through, so the QUIC connection is up before the clock runs.
    let warmup = load::bodies(&events[..1], 1);
    let warmed = load::run(&client, agent.http, Arc::new(warmup), 1, WARMUP_TIMEOUT).await;
    anyhow::ensure!(
        warmed.n_events_acked == 1,
        "warm-up event not acknowledged: {:?}",
        warmed.last_error
    );
    load::wait_queryable(
        &query_client,
        aggregator.query,
        1,
        COUNT_POLL_INTERVAL,
        Instant::now() + WARMUP_TIMEOUT,
    )
    .await
    .map_err(|n| {
        anyhow::anyhow!("warm-up event not queryable within {WARMUP_TIMEOUT:?} (count {n})")
    })?;
    agent.process.ensure_running()?;
    aggregator.process.ensure_running()?;

    let bodies = Arc::new(load::bodies(events, events_per_request));
    let handshake = relay.traffic();
    let agent_pid = agent.process.pid();
    let aggregator_pid = aggregator.process.pid().to_string();
    let cpu_before = (
        stack::cpu_time(&agent_pid.to_string()).ok(),
        stack::cpu_time(&aggregator_pid).ok(),
        stack::cpu_time("self").ok(),
    );
    let disk_before = stack::disk_write_bytes(agent_pid).ok();
    let rcvbuf_before = stack::udp_rcvbuf_errors();

    let load_started = Instant::now();
    let load = load::run(
        &client,
        agent.http,
        bodies,
        args.clients,
        Duration::from_secs(args.scenario_time_limit_s),
    )
    .await;
    let queryable = load::wait_queryable(
        &query_client,
        aggregator.query,
        1 + load.n_events_acked,
        COUNT_POLL_INTERVAL,
        Instant::now() + QUERYABLE_TIMEOUT,
    )
    .await;
    let queryable_after = queryable
        .map(|at| at - load_started)
        .map_err(|n| n.saturating_sub(1));
    // Measurement window, not synchronisation: the last acks cross the relay after this point.
    tokio::time::sleep(WIRE_SETTLE).await;
    let traffic = relay.traffic().since(handshake);
    let cpu_since = |after: Option<Duration>, before: Option<Duration>| Some(after? - before?);
    let agent_cpu = cpu_since(stack::cpu_time(&agent_pid.to_string()).ok(), cpu_before.0);
    let aggregator_cpu = cpu_since(stack::cpu_time(&aggregator_pid).ok(), cpu_before.1);
    let bench_cpu = cpu_since(stack::cpu_time("self").ok(), cpu_before.2);
    let agent_disk_write_bytes = stack::disk_write_bytes(agent_pid)
        .ok()
        .and_then(|after| Some(after - disk_before?));
    let udp_rcvbuf_errors =
        stack::udp_rcvbuf_errors().and_then(|after| Some(after - rcvbuf_before?));
    let agent_peak_rss_bytes = stack::peak_rss_bytes(agent_pid).ok();
    let edge_latencies_ms = load::edge_latencies_ms(
        &query_client,
        aggregator.query,
        1 + load.n_events_acked,
        MAX_LATENCY_SAMPLE_ROWS,
    )
    .await
    .map_err(|error| format!("{error:#}"));
    agent.process.ensure_running()?;
    aggregator.process.ensure_running()?;
    let mut warnings = agent.process.warnings();
    warnings.extend(aggregator.process.warnings());
    drop(agent);
    drop(relay);
    drop(aggregator);
    Ok(ScenarioResult {
        events_per_request,
        load,
        queryable_after,
        edge_latencies_ms,
        handshake,
        traffic,
        agent_peak_rss_bytes,
        agent_cpu,
        aggregator_cpu,
        bench_cpu,
        agent_disk_write_bytes,
        udp_rcvbuf_errors,
        warnings,
    })
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn machine_description(work_dir: &Path) -> String {
    let n_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg: Vec<&str> = loadavg.split_whitespace().take(3).collect();
    format!(
        "{n_cpus} CPUs ({model}), {mem_gib:.1} GiB RAM, Linux {}, load average at start {}, data in {}",
        kernel.trim(),
        loadavg.join(" "),
        work_dir.display()
    )
}

// ---------------------------------------------------------------------------------------------
// Report

fn int(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (idx, ch) in digits.chars().enumerate() {
        if idx > 0 && (digits.len() - idx) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn ms(micros: Option<u64>) -> String {
    micros.map_or("n/a".into(), |us| format!("{:.1} ms", us as f64 / 1000.0))
}

fn opt<T>(value: Option<T>, show: impl Fn(T) -> String) -> String {
    value.map_or("n/a".into(), show)
}

fn report(
    args: &Args,
    machine: &str,
    started_unix_ms: i64,
    avg_blob_bytes: f64,
    raw: &[raw_sqlite::RawResult],
    scenarios: &[ScenarioResult],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## runnel-bench, {}\n",
        events::rfc3339_ms(started_unix_ms)
    );
    let _ = writeln!(
        out,
        "`--events {} --clients {} --synchronous {}`; {machine}\n",
        args.events,
        args.clients,
        args.synchronous.as_str()
    );

    let _ = writeln!(
        out,
        "### Physical limit: raw SQLite inserts (WAL, synchronous = {})\n",
        args.synchronous.as_str()
    );
    let _ = writeln!(out, "| rows per transaction | events | events/s |");
    let _ = writeln!(out, "|---:|---:|---:|");
    for r in raw {
        let _ = writeln!(
            out,
            "| {} | {}{} | {} |",
            r.rows_per_tx,
            int(r.n_events as f64),
            if r.complete { "" } else { " (time limit)" },
            int(r.events_per_s())
        );
    }
    let _ = writeln!(
        out,
        "\nRows are the agent's own encoding of the same events, {avg_blob_bytes:.0} bytes on average.\n"
    );

    let _ = writeln!(out, "### Agent -> relay -> aggregator\n");
    let mut header = String::from("| |");
    let mut rule = String::from("|---|");
    for s in scenarios {
        let _ = write!(
            header,
            " {} event{}/request |",
            s.events_per_request,
            if s.events_per_request == 1 { "" } else { "s" }
        );
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    let mut row = |name: &str, cell: &dyn Fn(&ScenarioResult) -> String| {
        let mut line = format!("| {name} |");
        for s in scenarios {
            let _ = write!(line, " {} |", cell(s));
        }
        let _ = writeln!(out, "{line}");
    };
    row("events acknowledged (2xx)", &|s| {
        format!(
            "{}{}",
            int(s.load.n_events_acked as f64),
            if s.load.complete { "" } else { " (time limit)" }
        )
    });
    row("requests acknowledged", &|s| {
        int(s.load.n_requests_acked as f64)
    });
    row("**events/s acknowledged**", &|s| {
        format!("**{}**", int(s.acked_per_s()))
    });
    row("ack latency p50 (per request)", &|s| {
        ms(load::percentile(&s.load.ack_latencies_us, 50.0))
    });
    row("ack latency p99 (per request)", &|s| {
        ms(load::percentile(&s.load.ack_latencies_us, 99.0))
    });
    row("**events/s queryable**", &|s| {
        format!("**{}**", opt(s.queryable_per_s(), int))
    });
    row(
        "all queryable after (from load start)",
        &|s| match &s.queryable_after {
            Ok(d) => format!("{:.2} s", d.as_secs_f64()),
            Err(n) => format!("not within {QUERYABLE_TIMEOUT:?} ({n} seen)"),
        },
    );
    row("edge-to-queryable p50", &|s| match &s.edge_latencies_ms {
        Ok(v) => opt(load::percentile(v, 50.0), |ms| format!("{ms} ms")),
        Err(_) => "n/a".into(),
    });
    row("edge-to-queryable p99", &|s| match &s.edge_latencies_ms {
        Ok(v) => opt(load::percentile(v, 99.0), |ms| format!("{ms} ms")),
        Err(_) => "n/a".into(),
    });
    row(
        "edge-to-queryable max (sample)",
        &|s| match &s.edge_latencies_ms {
            Ok(v) => opt(v.last().copied(), |ms| {
                format!("{ms} ms ({} sampled)", int(v.len() as f64))
            }),
            Err(e) => format!("query failed: {e}"),
        },
    );
    row("agent peak RSS (VmHWM)", &|s| {
        opt(s.agent_peak_rss_bytes, |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    });
    row("JSON bytes/event (HTTP body)", &|s| {
        format!("{:.1}", s.json_bytes_per_event())
    });
    row("wire bytes/event, agent -> aggregator", &|s| {
        format!("{:.1}", s.up_bytes_per_event())
    });
    row("wire bytes/event, both ways", &|s| {
        format!("{:.1}", s.wire_bytes_per_event())
    });
    row("UDP datagrams up / down", &|s| {
        format!(
            "{} / {}",
            int(s.traffic.up_datagrams as f64),
            int(s.traffic.down_datagrams as f64)
        )
    });
    row("connection setup bytes (excluded)", &|s| {
        int((s.handshake.up_bytes + s.handshake.down_bytes) as f64)
    });
    row("agent CPU per event", &|s| {
        opt(s.agent_cpu, |d| {
            format!(
                "{:.1} µs",
                d.as_secs_f64() * 1e6 / s.load.n_events_acked.max(1) as f64
            )
        })
    });
    row("CPU s: agent / aggregator / bench", &|s| {
        format!(
            "{} / {} / {}",
            opt(s.agent_cpu, |d| format!("{:.1}", d.as_secs_f64())),
            opt(s.aggregator_cpu, |d| format!("{:.1}", d.as_secs_f64())),
            opt(s.bench_cpu, |d| format!("{:.1}", d.as_secs_f64()))
        )
    });
    row("agent disk writes/event", &|s| {
        opt(s.agent_disk_write_bytes, |b| {
            format!(
                "{:.0} bytes",
                b as f64 / s.load.n_events_acked.max(1) as f64
            )
        })
    });
    row("HTTP 503 / other errors", &|s| {
        format!(
            "{} / {}",
            s.load.n_busy,
            s.load.n_transport_errors + s.load.n_other_status
        )
    });
    row("UDP receive-buffer drops (system)", &|s| {
        opt(s.udp_rcvbuf_errors, |n| n.to_string())
    });

    let best_raw = raw
        .iter()
        .max_by(|a, b| a.events_per_s().total_cmp(&b.events_per_s()));
    let _ = writeln!(out, "\n### Ratios against the targets\n");
    let _ = writeln!(
        out,
        "| scenario | agent ingest ÷ raw SQLite limit (target ≥ 50%) | wire ÷ JSON bytes, both ways (target ≤ 10%) | agent -> aggregator only |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for s in scenarios {
        let ingest = best_raw.map_or("n/a".into(), |r| {
            format!(
                "{:.1}% (of {} events/s at {} rows/tx)",
                100.0 * s.acked_per_s() / r.events_per_s(),
                int(r.events_per_s()),
                r.rows_per_tx
            )
        });
        let _ = writeln!(
            out,
            "| {} event(s)/request | {ingest} | {:.1}% | {:.1}% |",
            s.events_per_request,
            100.0 * s.wire_bytes_per_event() / s.json_bytes_per_event(),
            100.0 * s.up_bytes_per_event() / s.json_bytes_per_event(),
        );
    }
    for s in scenarios {
        if let Some(error) = &s.load.last_error {
            let _ = writeln!(
                out,
                "\n{} event(s)/request, last client error: {error}",
                s.events_per_request
            );
        }
        if !s.warnings.is_empty() {
            let _ = writeln!(
                out,
                "\n{} event(s)/request, warnings logged by agent/aggregator ({}):",
                s.events_per_request,
                s.warnings.len()
            );
            for line in s.warnings.iter().take(5) {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    out
}
