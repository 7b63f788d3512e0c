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
#[path = "../bench/mqtt.rs"]
mod mqtt;
#[path = "../bench/raw_sqlite.rs"]
mod raw_sqlite;
#[path = "../bench/relay.rs"]
mod relay;
#[path = "../bench/rules.rs"]
mod rules;
#[path = "../bench/scoring.rs"]
mod scoring;
#[path = "../bench/snowplow.rs"]
mod snowplow;
#[path = "../bench/stack.rs"]
mod stack;
#[path = "../bench/wire.rs"]
mod wire;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// The scenario groups `--scenarios` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Raw SQLite limit, then generic JSON over HTTP at 1 and 100 events per request.
    Http,
    /// MQTT QoS 1 from Mosquitto: a bare counting subscriber (the limit), then the agent.
    Mqtt,
    /// Snowplow tp2 POSTs (`payload_data`, several events per request).
    Snowplow,
}

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
    /// Scenario groups to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Scenario::Http, Scenario::Mqtt, Scenario::Snowplow])]
    scenarios: Vec<Scenario>,
    /// Snowplow events per tp2 request (the scenario sends `--events` events).
    #[arg(long, default_value_t = 10)]
    snowplow_events_per_request: usize,
    /// MQTT messages per subscriber run (one event each).
    #[arg(long, default_value_t = 100_000)]
    mqtt_messages: usize,
    /// Concurrent MQTT publishers (QoS 1 rumqttc clients).
    #[arg(long, default_value_t = 8)]
    mqtt_publishers: usize,
    /// Most messages published and not yet received by the bare subscriber, over all
    /// publishers. Mosquitto 2.0.11 here dropped messages for the bare subscriber at 200 already
    /// (its default max_queued_messages is 1000); the bench verifies the counts either way.
    #[arg(long, default_value_t = 100)]
    mqtt_window: u64,
    /// The same for the agent run, counted against the agent's committed messages, which the
    /// bench learns by polling the agent's buffer every millisecond (so later than the bare
    /// subscriber's in-process count; a larger window makes up for that lag).
    #[arg(long, default_value_t = 400)]
    mqtt_agent_window: u64,
}

fn main() -> ExitCode {
    // `runnel-bench rules ...`: the decision pipeline in process (bench/rules.rs).
    if std::env::args().nth(1).as_deref() == Some("rules") {
        return rules::main(std::env::args().skip(1));
    }
    // `runnel-bench scoring ...`: fixture models against onnxruntime (bench/scoring.rs).
    if std::env::args().nth(1).as_deref() == Some("scoring") {
        return scoring::main(std::env::args().skip(1));
    }
    // `runnel-bench wire ...`: where a column-wise batch's bytes go (bench/wire.rs).
    if std::env::args().nth(1).as_deref() == Some("wire") {
        return wire::main(std::env::args().skip(1));
    }
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
    /// Column header, such as "1 event/request".
    label: String,
    load: load::LoadReport,
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
        self.load.counts.n_events_acked as f64 / self.load.elapsed.as_secs_f64().max(1e-9)
    }

    fn queryable_per_s(&self) -> Option<f64> {
        let after = self.queryable_after.as_ref().ok()?;
        Some(self.load.counts.n_events_acked as f64 / after.as_secs_f64().max(1e-9))
    }

    fn json_bytes_per_event(&self) -> f64 {
        self.load.counts.json_bytes_acked as f64 / self.load.counts.n_events_acked.max(1) as f64
    }

    fn wire_bytes_per_event(&self) -> f64 {
        (self.traffic.up_bytes + self.traffic.down_bytes) as f64
            / self.load.counts.n_events_acked.max(1) as f64
    }

    fn up_bytes_per_event(&self) -> f64 {
        self.traffic.up_bytes as f64 / self.load.counts.n_events_acked.max(1) as f64
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

    let run_http = args.scenarios.contains(&Scenario::Http);
    let run_mqtt = args.scenarios.contains(&Scenario::Mqtt);
    let run_snowplow = args.scenarios.contains(&Scenario::Snowplow);
    let generated = Instant::now();
    let events = events::generate(args.events, args.seed, started_unix_ms);
    eprintln!(
        "runnel-bench: generated {} events, {:.0} JSON bytes on average, in {:.1?}",
        events.len(),
        events.iter().map(String::len).sum::<usize>() as f64 / events.len() as f64,
        generated.elapsed()
    );

    // The physical limit, first: nothing else of ours runs yet.
    let blobs = if run_http {
        stored_blobs(&events)?
    } else {
        Vec::new()
    };
    let avg_blob = blobs.iter().map(Vec::len).sum::<usize>() as f64 / blobs.len().max(1) as f64;
    let mut raw_sizes: Vec<usize> = std::iter::once(args.clients)
        .chain(RAW_ROWS_PER_TX)
        .filter(|_| run_http)
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
    for events_per_request in SCENARIOS.into_iter().filter(|_| run_http) {
        let dir = root_path.join(format!("scenario-{events_per_request}"));
        let label = format!(
            "{events_per_request} event{}/request",
            if events_per_request == 1 { "" } else { "s" }
        );
        let bodies = load::bodies(&events, events_per_request);
        let result = run_scenario(
            &args,
            &bins,
            &pki,
            &dir,
            &events,
            label,
            load::EVENTS_PATH,
            bodies,
        )
        .await?;
        eprintln!(
            "runnel-bench: {}: {:.0} events/s acknowledged",
            result.label,
            result.acked_per_s()
        );
        scenarios.push(result);
    }
    if run_snowplow {
        let dir = root_path.join("scenario-snowplow");
        let per_request = args.snowplow_events_per_request.max(1);
        let bodies = snowplow::bodies(args.events, per_request, args.seed, unix_ms());
        let label = format!("Snowplow tp2, {per_request} events/request");
        let result = run_scenario(
            &args,
            &bins,
            &pki,
            &dir,
            &events,
            label,
            snowplow::TP2_PATH,
            bodies,
        )
        .await?;
        eprintln!(
            "runnel-bench: {}: {:.0} events/s acknowledged",
            result.label,
            result.acked_per_s()
        );
        scenarios.push(result);
    }
    let mqtt_result = if run_mqtt {
        let outcome = match mqtt::broker() {
            Ok(broker) => run_mqtt_scenarios(
                &args,
                &bins,
                &pki,
                &root_path.join("scenario-mqtt"),
                &broker,
            )
            .await
            .map_err(|error| format!("failed: {error:#}")),
            Err(reason) => Err(format!("skipped: {reason}")),
        };
        if let Err(reason) = &outcome {
            eprintln!("runnel-bench: MQTT scenario {reason}");
        }
        Some(outcome)
    } else {
        None
    };

    let mut report = report(
        &args,
        &machine,
        started_unix_ms,
        avg_blob,
        &raw_results,
        &scenarios,
    );
    if let Some(outcome) = &mqtt_result {
        report.push_str(&mqtt_report(&args, outcome));
    }
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
            blobs.push(runnel_agent::buffer::EncodedEvent::encode(event)?.bytes);
        }
    }
    Ok(blobs)
}

#[allow(clippy::too_many_arguments)]
async fn run_scenario(
    args: &Args,
    bins: &stack::Binaries,
    pki: &stack::Pki,
    dir: &Path,
    events: &[String],
    label: String,
    path: &str,
    bodies: Vec<load::Body>,
) -> anyhow::Result<ScenarioResult> {
    let sync = args.synchronous.as_str();
    let mut aggregator = stack::Aggregator::start(bins, pki, &dir.join("aggregator"), sync)?;
    let relay = relay::Relay::start(aggregator.ingest)?;
    let mut agent = stack::Agent::start(bins, pki, &dir.join("agent"), sync, relay.listen)?;
    let client = load::http_client(args.clients);
    let query_client = load::http_client(1);

    // Warm-up: one event all the way through, so the QUIC connection is up before the clock runs.
    let warmup = load::bodies(&events[..1], 1);
    let warmed = load::run(
        &client,
        agent.http,
        load::EVENTS_PATH,
        Arc::new(warmup),
        1,
        WARMUP_TIMEOUT,
    )
    .await;
    anyhow::ensure!(
        warmed.counts.n_events_acked == 1,
        "warm-up event not acknowledged: {:?}",
        warmed.counts.last_failure
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

    let bodies = Arc::new(bodies);
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
        path,
        bodies,
        args.clients,
        Duration::from_secs(args.scenario_time_limit_s),
    )
    .await;
    let queryable = load::wait_queryable(
        &query_client,
        aggregator.query,
        1 + load.counts.n_events_acked,
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
        1 + load.counts.n_events_acked,
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
        label,
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

    if !raw.is_empty() {
        raw_report(&mut out, args, avg_blob_bytes, raw);
    }
    if scenarios.is_empty() {
        return out;
    }
    http_report(&mut out, raw, scenarios);
    out
}

fn raw_report(out: &mut String, args: &Args, avg_blob_bytes: f64, raw: &[raw_sqlite::RawResult]) {
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
}

fn http_report(out: &mut String, raw: &[raw_sqlite::RawResult], scenarios: &[ScenarioResult]) {
    let _ = writeln!(out, "### Agent -> relay -> aggregator\n");
    let mut header = String::from("| |");
    let mut rule = String::from("|---|");
    for s in scenarios {
        let _ = write!(header, " {} |", s.label);
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
            int(s.load.counts.n_events_acked as f64),
            if s.load.complete { "" } else { " (time limit)" }
        )
    });
    row("requests acknowledged", &|s| {
        int(s.load.counts.n_requests_acked as f64)
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
                d.as_secs_f64() * 1e6 / s.load.counts.n_events_acked.max(1) as f64
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
                b as f64 / s.load.counts.n_events_acked.max(1) as f64
            )
        })
    });
    row("HTTP 503 / other errors", &|s| {
        format!(
            "{} / {}",
            s.load.counts.n_busy,
            s.load.counts.n_transport_errors + s.load.counts.n_failed
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
            "| {} | {ingest} | {:.1}% | {:.1}% |",
            s.label,
            100.0 * s.wire_bytes_per_event() / s.json_bytes_per_event(),
            100.0 * s.up_bytes_per_event() / s.json_bytes_per_event(),
        );
    }
    for s in scenarios {
        if let Some(error) = &s.load.counts.last_failure {
            let _ = writeln!(out, "\n{}, last client error: {error}", s.label);
        }
        if !s.warnings.is_empty() {
            let _ = writeln!(
                out,
                "\n{}, warnings logged by agent/aggregator ({}):",
                s.label,
                s.warnings.len()
            );
            for line in s.warnings.iter().take(5) {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT

/// Interval of the agent-buffer polls: the resolution of "committed by the agent", and how
/// late the publishers' window learns that the agent consumed messages.
const BUFFER_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Pause between MQTT warm-up messages while the agent's subscription is not up yet.
const MQTT_WARMUP_INTERVAL: Duration = Duration::from_millis(500);

struct MqttRuns {
    broker: String,
    n_messages: usize,
    payload_bytes: f64,
    bare: BareRun,
    agent: AgentMqttRun,
}

struct BareRun {
    started: Instant,
    publish: mqtt::PublishResult,
    sub: mqtt::SubscriberResult,
    broker_cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
}

impl BareRun {
    /// Messages/s from the first to the last message received.
    fn first_to_last_per_s(&self) -> Option<f64> {
        let span = self.sub.last? - self.sub.first?;
        Some(self.sub.n_received as f64 / span.as_secs_f64().max(1e-9))
    }

    /// Messages/s from the start of publishing to the last message received.
    fn since_start_per_s(&self) -> Option<f64> {
        let span = self.sub.last? - self.started;
        Some(self.sub.n_received as f64 / span.as_secs_f64().max(1e-9))
    }
}

struct AgentMqttRun {
    started: Instant,
    publish: mqtt::PublishResult,
    first_committed: Option<Instant>,
    all_committed: Option<Instant>,
    n_committed: u64,
    queryable: Result<Instant, u64>,
    /// `count(*)` and `count(DISTINCT event_id)` of the messages at the aggregator.
    stored: Result<(u64, u64), String>,
    agent_cpu: Option<Duration>,
    aggregator_cpu: Option<Duration>,
    broker_cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
    agent_peak_rss_bytes: Option<u64>,
    agent_disk_write_bytes: Option<u64>,
    traffic: relay::Traffic,
    warnings: Vec<String>,
}

impl AgentMqttRun {
    fn first_to_last_per_s(&self) -> Option<f64> {
        let span = self.all_committed? - self.first_committed?;
        Some(self.n_committed as f64 / span.as_secs_f64().max(1e-9))
    }

    fn since_start_per_s(&self) -> Option<f64> {
        let span = self.all_committed? - self.started;
        Some(self.n_committed as f64 / span.as_secs_f64().max(1e-9))
    }

    fn queryable_per_s(&self, n: usize) -> Option<f64> {
        let at = self.queryable.as_ref().ok()?;
        Some(n as f64 / (*at - self.started).as_secs_f64().max(1e-9))
    }
}

fn cpu_of(pid: Option<u32>) -> Option<Duration> {
    stack::cpu_time(&pid?.to_string()).ok()
}

fn cpu_delta(after: Option<Duration>, before: Option<Duration>) -> Option<Duration> {
    after?.checked_sub(before?)
}

async fn run_mqtt_scenarios(
    args: &Args,
    bins: &stack::Binaries,
    pki: &stack::Pki,
    dir: &Path,
    broker: &mqtt::Broker,
) -> anyhow::Result<MqttRuns> {
    anyhow::ensure!(args.mqtt_messages >= 1, "--mqtt-messages: at least 1");
    anyhow::ensure!(args.mqtt_publishers >= 1, "--mqtt-publishers: at least 1");
    anyhow::ensure!(
        args.mqtt_window >= 1 && args.mqtt_agent_window >= 1,
        "--mqtt-window, --mqtt-agent-window: at least 1"
    );
    eprintln!("runnel-bench: MQTT broker {}", broker.what);
    // A random topic root and client ids per run: no messages or sessions of earlier runs.
    let tag = format!("runnel-bench-{:012x}", fastrand::u64(..) >> 16);
    let root = format!("runnel-bench/{tag}");
    let filter = format!("{root}/+/+/telemetry");
    let n = args.mqtt_messages;
    let messages = Arc::new(mqtt::telemetry(n, args.seed, &root, unix_ms()));
    let payload_bytes = messages.iter().map(|m| m.payload.len()).sum::<usize>() as f64 / n as f64;
    let time_limit = Duration::from_secs(args.scenario_time_limit_s);
    let broker_pid = stack::find_process("mosquitto");

    // The limit: the bare subscriber.
    let bare = {
        let window = Arc::new(mqtt::Window::new(args.mqtt_window));
        let sub_id = format!("{tag}-bare");
        let subscriber = mqtt::BareSubscriber::start(
            broker,
            &sub_id,
            &filter,
            n,
            Arc::clone(&window),
            Instant::now() + time_limit + QUERYABLE_TIMEOUT,
        )
        .await?;
        let publishers =
            mqtt::Publishers::connect(broker, args.mqtt_publishers, &format!("{tag}-a")).await?;
        let before = (cpu_of(broker_pid), stack::cpu_time("self").ok());
        let started = Instant::now();
        let publish = publishers
            .run(Arc::clone(&messages), window, started + time_limit)
            .await;
        let sub = subscriber.finish().await;
        let broker_cpu = cpu_delta(cpu_of(broker_pid), before.0);
        let bench_cpu = cpu_delta(stack::cpu_time("self").ok(), before.1);
        mqtt::clear_session(broker, &sub_id).await;
        BareRun {
            started,
            publish,
            sub,
            broker_cpu,
            bench_cpu,
        }
    };
    eprintln!(
        "runnel-bench: MQTT bare subscriber: {} of {n} received, {:.0} messages/s",
        bare.sub.n_received,
        bare.first_to_last_per_s().unwrap_or(0.0)
    );

    // The agent, subscribed to the same topics, shipping to a fresh aggregator.
    let sync = args.synchronous.as_str();
    let agent_client_id = format!("{tag}-agent");
    let source = format!(
        "[[sources.mqtt]]\nname = \"bench\"\nurl = {}\ntopics = [{}]\nqos = 1\nclient_id = {}\n\
         clean_session = false\nstream = \"telemetry\"\ntopic_template = {}\n",
        stack::toml_str(&format!("mqtt://{}:{}", broker.host, broker.port)),
        stack::toml_str(&filter),
        stack::toml_str(&agent_client_id),
        stack::toml_str(&format!("{root}/{{site}}/{{device}}/telemetry")),
    );
    let mut aggregator = stack::Aggregator::start(bins, pki, &dir.join("aggregator"), sync)?;
    let relay = relay::Relay::start(aggregator.ingest)?;
    let mut agent =
        stack::Agent::start_with(bins, pki, &dir.join("agent"), sync, relay.listen, &source)?;
    let outcome = agent_mqtt_run(
        args,
        broker,
        &tag,
        &root,
        Arc::clone(&messages),
        &mut aggregator,
        &relay,
        &mut agent,
        broker_pid,
    )
    .await;
    drop(agent);
    drop(relay);
    drop(aggregator);
    mqtt::clear_session(broker, &agent_client_id).await;
    let agent_run = outcome?;
    Ok(MqttRuns {
        broker: broker.what.clone(),
        n_messages: n,
        payload_bytes,
        bare,
        agent: agent_run,
    })
}

#[allow(clippy::too_many_arguments)]
async fn agent_mqtt_run(
    args: &Args,
    broker: &mqtt::Broker,
    tag: &str,
    root: &str,
    messages: Arc<Vec<mqtt::Message>>,
    aggregator: &mut stack::Aggregator,
    relay: &relay::Relay,
    agent: &mut stack::Agent,
    broker_pid: Option<u32>,
) -> anyhow::Result<AgentMqttRun> {
    let n = messages.len();
    let time_limit = Duration::from_secs(args.scenario_time_limit_s);
    let query_client = load::http_client(1);
    // Warm-up over MQTT: the subscription is up and the QUIC connection too once one message
    // is queryable. Messages published before the agent subscribed are not delivered to it, so
    // publish one every half second until one arrives.
    let warmup_deadline = Instant::now() + WARMUP_TIMEOUT;
    let mut n_warmups = 0;
    loop {
        agent.process.ensure_running()?;
        n_warmups += 1;
        mqtt::publish_one(
            broker,
            &format!("{tag}-warmup"),
            &format!("{root}/warmup/dev-0/telemetry"),
            format!("{{\"name\":\"warmup\",\"event_id\":\"warmup-{n_warmups}\"}}").into_bytes(),
        )
        .await?;
        let seen = load::wait_queryable(
            &query_client,
            aggregator.query,
            1,
            COUNT_POLL_INTERVAL,
            Instant::now() + MQTT_WARMUP_INTERVAL,
        )
        .await;
        if seen.is_ok() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < warmup_deadline,
            "no MQTT warm-up message queryable within {WARMUP_TIMEOUT:?}"
        );
    }
    // Let a warm-up still on its way land before the baselines are read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline_count = load::count_events(&query_client, aggregator.query).await?;
    let buffer_conn = rusqlite::Connection::open_with_flags(
        &agent.buffer,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let baseline_seq = mqtt::last_seq(&buffer_conn)?;
    drop(buffer_conn);

    let window = Arc::new(mqtt::Window::new(args.mqtt_agent_window));
    let publishers =
        mqtt::Publishers::connect(broker, args.mqtt_publishers, &format!("{tag}-b")).await?;
    let handshake = relay.traffic();
    let agent_pid = agent.process.pid();
    let aggregator_pid = aggregator.process.pid();
    let before = (
        cpu_of(Some(agent_pid)),
        cpu_of(Some(aggregator_pid)),
        cpu_of(broker_pid),
        stack::cpu_time("self").ok(),
    );
    let disk_before = stack::disk_write_bytes(agent_pid).ok();
    let started = Instant::now();
    // Queryable is watched from the start, so its time does not depend on when the buffer
    // poller gives up on messages the broker dropped.
    let target = Arc::new(AtomicU64::new(n as u64));
    let watcher = tokio::spawn(watch_queryable(
        query_client.clone(),
        aggregator.query,
        baseline_count,
        Arc::clone(&target),
        started + time_limit + QUERYABLE_TIMEOUT,
    ));
    let poller = mqtt::poll_buffer(
        agent.buffer.clone(),
        baseline_seq,
        n as u64,
        Arc::clone(&window),
        BUFFER_POLL_INTERVAL,
        started + time_limit + QUERYABLE_TIMEOUT,
    );
    let publish = publishers
        .run(Arc::clone(&messages), window, started + time_limit)
        .await;
    let mqtt::Committed {
        first: first_committed,
        all: all_committed,
        n: n_committed,
    } = tokio::task::spawn_blocking(move || poller.join())
        .await?
        .map_err(|_| anyhow::anyhow!("buffer poller panicked"))??;
    target.store(n_committed, Ordering::SeqCst);
    let queryable = watcher.await?;
    tokio::time::sleep(WIRE_SETTLE).await;
    let traffic = relay.traffic().since(handshake);
    let agent_cpu = cpu_delta(cpu_of(Some(agent_pid)), before.0);
    let aggregator_cpu = cpu_delta(cpu_of(Some(aggregator_pid)), before.1);
    let broker_cpu = cpu_delta(cpu_of(broker_pid), before.2);
    let bench_cpu = cpu_delta(stack::cpu_time("self").ok(), before.3);
    let agent_disk_write_bytes = stack::disk_write_bytes(agent_pid)
        .ok()
        .and_then(|after| after.checked_sub(disk_before?));
    let agent_peak_rss_bytes = stack::peak_rss_bytes(agent_pid).ok();
    let stored = load::query_u64s(
        &query_client,
        aggregator.query,
        "SELECT count(*), count(DISTINCT event_id) FROM events \
         WHERE stream = 'telemetry' AND name = 'telemetry'",
        2,
    )
    .await
    .map(|row| (row[0], row[1]))
    .map_err(|error| format!("{error:#}"));
    agent.process.ensure_running()?;
    aggregator.process.ensure_running()?;
    let mut warnings = agent.process.warnings();
    warnings.extend(aggregator.process.warnings());
    Ok(AgentMqttRun {
        started,
        publish,
        first_committed,
        all_committed,
        n_committed,
        queryable,
        stored,
        agent_cpu,
        aggregator_cpu,
        broker_cpu,
        bench_cpu,
        agent_peak_rss_bytes,
        agent_disk_write_bytes,
        traffic,
        warnings,
    })
}

/// Polls `count(*)` (minus `baseline`) every [`COUNT_POLL_INTERVAL`] until it reaches `target`,
/// which the caller may lower meanwhile; returns when the count first reached the target, or the
/// last count seen at `deadline`.
async fn watch_queryable(
    client: reqwest::Client,
    addr: std::net::SocketAddr,
    baseline: u64,
    target: Arc<AtomicU64>,
    deadline: Instant,
) -> Result<Instant, u64> {
    let mut changes: Vec<(u64, Instant)> = Vec::new();
    loop {
        if let Ok(count) = load::count_events(&client, addr).await {
            let seen = count.saturating_sub(baseline);
            if changes.last().is_none_or(|(last, _)| *last != seen) {
                changes.push((seen, Instant::now()));
            }
        }
        let wanted = target.load(Ordering::SeqCst);
        if let Some((_, at)) = changes.iter().find(|(seen, _)| *seen >= wanted) {
            return Ok(*at);
        }
        if Instant::now() >= deadline {
            return Err(changes.last().map_or(0, |(seen, _)| *seen));
        }
        tokio::time::sleep(COUNT_POLL_INTERVAL).await;
    }
}

fn secs(from: Instant, to: Option<Instant>) -> String {
    to.map_or("n/a".into(), |to| {
        format!("{:.2} s", (to - from).as_secs_f64())
    })
}

fn cpu_s(value: Option<Duration>) -> String {
    opt(value, |d| format!("{:.1}", d.as_secs_f64()))
}

fn mqtt_report(args: &Args, outcome: &Result<MqttRuns, String>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### MQTT QoS 1 ingest: agent against a bare subscriber\n"
    );
    let runs = match outcome {
        Ok(runs) => runs,
        Err(reason) => {
            let _ = writeln!(out, "Not measured: {reason}");
            return out;
        }
    };
    let n = runs.n_messages;
    let _ = writeln!(
        out,
        "Broker {}; {} messages of {:.0} JSON bytes on average, {} QoS 1 publishers, at most {} \
         (bare run) / {} (agent run) messages published and not yet consumed.\n",
        runs.broker,
        int(n as f64),
        runs.payload_bytes,
        args.mqtt_publishers,
        args.mqtt_window,
        args.mqtt_agent_window
    );
    let bare = &runs.bare;
    let agent = &runs.agent;
    let _ = writeln!(out, "| | bare rumqttc subscriber (limit) | agent |");
    let _ = writeln!(out, "|---|---:|---:|");
    let _ = writeln!(
        out,
        "| publishes acknowledged by the broker | {}{} | {}{} |",
        int(bare.publish.n_acked as f64),
        if bare.publish.complete {
            ""
        } else {
            " (incomplete)"
        },
        int(agent.publish.n_acked as f64),
        if agent.publish.complete {
            ""
        } else {
            " (incomplete)"
        },
    );
    let _ = writeln!(
        out,
        "| last PUBACK to the publishers after | {} | {} |",
        secs(bare.started, bare.publish.last_puback),
        secs(agent.started, agent.publish.last_puback)
    );
    let _ = writeln!(
        out,
        "| messages consumed (bare: received and acked; agent: committed to its buffer) | {} | {} |",
        int(bare.sub.n_received as f64),
        int(agent.n_committed as f64)
    );
    let _ = writeln!(
        out,
        "| all consumed after (from publishing start) | {} | {} |",
        secs(bare.started, bare.sub.last),
        secs(agent.started, agent.all_committed)
    );
    let _ = writeln!(
        out,
        "| **messages/s consumed, first to last** | **{}** | **{}** |",
        opt(bare.first_to_last_per_s(), int),
        opt(agent.first_to_last_per_s(), int)
    );
    let _ = writeln!(
        out,
        "| messages/s consumed, from publishing start | {} | {} |",
        opt(bare.since_start_per_s(), int),
        opt(agent.since_start_per_s(), int)
    );
    let _ = writeln!(
        out,
        "| **events/s queryable** (from publishing start) | - | **{}** |",
        opt(agent.queryable_per_s(agent.n_committed as usize), int)
    );
    let _ = writeln!(
        out,
        "| all queryable after | - | {} |",
        match &agent.queryable {
            Ok(at) => format!("{:.2} s", (*at - agent.started).as_secs_f64()),
            Err(seen) => format!("not within {QUERYABLE_TIMEOUT:?} ({seen} seen)"),
        }
    );
    let _ = writeln!(
        out,
        "| arrived: count / distinct / expected | {} / {} / {} | {} |",
        int(bare.sub.n_received as f64),
        int(bare.sub.n_distinct as f64),
        int(n as f64),
        match &agent.stored {
            Ok((count, distinct)) => format!(
                "{} / {} / {} (`count(*)`, `count(DISTINCT event_id)`)",
                int(*count as f64),
                int(*distinct as f64),
                int(n as f64)
            ),
            Err(error) => format!("query failed: {error}"),
        }
    );
    let _ = writeln!(
        out,
        "| exactly once | {} | {} |",
        if bare.sub.n_received == n as u64 && bare.sub.n_distinct == n as u64 {
            "yes"
        } else {
            "**no**"
        },
        match &agent.stored {
            Ok((count, distinct)) if *count == n as u64 && *distinct == n as u64 => "yes",
            _ => "**no**",
        }
    );
    let _ = writeln!(
        out,
        "| redeliveries (DUP flag) seen | {} | - |",
        bare.sub.n_dup_flag
    );
    let _ = writeln!(
        out,
        "| CPU s: broker / bench | {} / {} | {} / {} |",
        cpu_s(bare.broker_cpu),
        cpu_s(bare.bench_cpu),
        cpu_s(agent.broker_cpu),
        cpu_s(agent.bench_cpu)
    );
    let _ = writeln!(
        out,
        "| CPU s: agent / aggregator | - | {} / {} |",
        cpu_s(agent.agent_cpu),
        cpu_s(agent.aggregator_cpu)
    );
    let _ = writeln!(
        out,
        "| agent CPU per message | - | {} |",
        opt(agent.agent_cpu, |d| format!(
            "{:.1} µs",
            d.as_secs_f64() * 1e6 / n.max(1) as f64
        ))
    );
    let _ = writeln!(
        out,
        "| agent peak RSS (VmHWM) | - | {} |",
        opt(agent.agent_peak_rss_bytes, |b| format!(
            "{:.1} MiB",
            b as f64 / 1048576.0
        ))
    );
    let _ = writeln!(
        out,
        "| agent disk writes/message | - | {} |",
        opt(agent.agent_disk_write_bytes, |b| format!(
            "{:.0} bytes",
            b as f64 / n.max(1) as f64
        ))
    );
    let _ = writeln!(
        out,
        "| wire bytes/event, both ways (agent -> aggregator) | - | {:.1} ({:.1}) |",
        (agent.traffic.up_bytes + agent.traffic.down_bytes) as f64 / n.max(1) as f64,
        agent.traffic.up_bytes as f64 / n.max(1) as f64
    );
    let ratio = |a: Option<f64>, b: Option<f64>| -> String {
        match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.1}%", 100.0 * a / b),
            _ => "n/a".into(),
        }
    };
    let _ = writeln!(
        out,
        "\n**Agent ÷ bare subscriber (target ≥ 90%): {}** first to last consumed; {} from \
         publishing start; queryable ÷ bare (from start) {}.",
        ratio(agent.first_to_last_per_s(), bare.first_to_last_per_s()),
        ratio(agent.since_start_per_s(), bare.since_start_per_s()),
        ratio(
            agent.queryable_per_s(agent.n_committed as usize),
            bare.since_start_per_s()
        ),
    );
    for (who, errors) in [
        ("bare run publishers", &bare.publish.errors),
        ("agent run publishers", &agent.publish.errors),
    ] {
        for error in errors.iter().take(3) {
            let _ = writeln!(out, "\n{who}: {error}");
        }
    }
    if let Some(error) = &bare.sub.error {
        let _ = writeln!(out, "\nbare subscriber: {error}");
    }
    if !agent.warnings.is_empty() {
        let _ = writeln!(
            out,
            "\nMQTT run, warnings logged by agent/aggregator ({}):",
            agent.warnings.len()
        );
        for line in agent.warnings.iter().take(5) {
            let _ = writeln!(out, "    {line}");
        }
    }
    out
}
