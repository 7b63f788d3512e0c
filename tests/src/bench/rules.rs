//! `runnel-bench rules`: events per second through the agent's decision pipeline (scoring,
//! rules, windows, actions), in process. The events are the benchmark's clickstream events
//! (`events.rs`) decoded by the agent's own JSON decoder; the pipeline is built from an agent
//! config: by default the 50 rules of [`default_rules_toml`], plus whatever `--extra-toml` adds
//! (windows, models), or a whole config file given with `--config`.
//!
//! It measures, never asserts. Each run feeds the same events in batches through
//! `Pipeline::process`, as the sources do, on 1 thread and on every core; a passthrough pipeline
//! on the same events is the baseline (the cost of moving the batches alone).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use runnel_agent::pipeline::{BuildContext, Pipeline};
use runnel_common::Event;

/// Batch sizes measured: one event per request, and a typical tracker batch.
const BATCH_SIZES: [usize; 2] = [1, 100];

/// The agent config around the rules: only the required keys (the files are not opened).
const BASE_TOML: &str = r#"
[uplink]
aggregator = "127.0.0.1:9480"
ca_cert = "/nonexistent/ca.pem"
cert = "/nonexistent/agent.pem"
key = "/nonexistent/agent.key"
"#;

/// `runnel-bench rules`: rule evaluation throughput of the agent pipeline.
#[derive(Debug, Parser)]
#[command(name = "runnel-bench rules")]
struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// An agent config whose [[rules]], [[windows]] and [[models]] make the pipeline (instead of
    /// the built-in 50 rules).
    #[arg(long)]
    config: Option<PathBuf>,
    /// TOML appended to the built-in rules, such as five [[windows]].
    #[arg(long)]
    extra_toml: Option<PathBuf>,
    /// Also append the five built-in [[windows]] of [`default_windows_toml`].
    #[arg(long)]
    windows: bool,
    /// Threads of the parallel run (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Entry point: `args` starts with "rules".
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args = Args::parse_from(args);
    match run(&args) {
        Ok(report) => {
            print!("{report}");
            if let Some(out) = &args.out
                && let Err(error) = std::fs::write(out, &report)
            {
                eprintln!(
                    "runnel-bench rules: error: write {}: {error}",
                    out.display()
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("runnel-bench rules: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The built-in rule set: 50 rules of every kind over the clickstream events' fields, with the
/// selectivity real rules have (most conditions are false for most events).
pub fn default_rules_toml() -> String {
    const NAMES: [&str; 6] = [
        "page_view",
        "product_view",
        "add_to_cart",
        "search",
        "begin_checkout",
        "purchase",
    ];
    const CATEGORIES: [&str; 8] = [
        "shoes", "jackets", "shirts", "bags", "watches", "outdoor", "kids", "sale",
    ];
    let mut toml = String::new();
    // 10 tag rules: a name and a URL category; the first also logs (rate-limited, debug).
    for i in 0..10 {
        let _ = writeln!(
            toml,
            "[[rules]]\nname = \"tag-{i}\"\nwhen = 'name == \"{}\" && attrs.url.contains(\"/{}/\")'\ntag = [\"cat-{i}\"]",
            NAMES[i % NAMES.len()],
            CATEGORIES[i % CATEGORIES.len()]
        );
        if i == 0 {
            toml.push_str(
                "actions = [{ kind = \"log\", level = \"debug\", message = \"{{ name }} {{ attrs.url }}\" }]\n",
            );
        }
        toml.push('\n');
    }
    // 10 drop rules that never match: bot filters.
    for i in 0..10 {
        let _ = writeln!(
            toml,
            "[[rules]]\nname = \"drop-bot-{i}\"\nwhen = 'has(attrs.user_agent) && attrs.user_agent.contains(\"bot-{i}/\")'\ndrop = true\n"
        );
    }
    // 10 computed fields on events with a price.
    for i in 0..10 {
        let _ = writeln!(
            toml,
            "[[rules]]\nname = \"band-{i}\"\nwhen = 'has(attrs.price) && double(attrs.price) > {}.0'\nset = {{ \"attrs.band_{i}\" = 'double(attrs.price) * double(attrs.quantity) > 100.0 ? \"high\" : \"low\"' }}\n",
            i * 10
        );
    }
    // 5 renames and removals.
    toml.push_str(
        "[[rules]]\nname = \"empty-referrer\"\nwhen = 'has(attrs.referrer) && attrs.referrer == \"\"'\nremove = [\"attrs.referrer\"]\n\n\
         [[rules]]\nname = \"search-query\"\nwhen = 'name == \"search\"'\nrename = { \"attrs.query\" = \"attrs.search_query\" }\n\n\
         [[rules]]\nname = \"currency\"\nwhen = 'has(attrs.currency)'\nrename = { \"attrs.currency\" = \"attrs.ccy\" }\n\n\
         [[rules]]\nname = \"no-session\"\nwhen = 'session_id == null'\ntag = [\"no-session\"]\n\n\
         [[rules]]\nname = \"scrub-ua\"\nwhen = 'name == \"purchase\"'\nremove = [\"attrs.user_agent\"]\n\n",
    );
    // 5 routes.
    for (i, name) in [
        "purchase",
        "begin_checkout",
        "add_to_cart",
        "search",
        "product_view",
    ]
    .iter()
    .enumerate()
    {
        let _ = writeln!(
            toml,
            "[[rules]]\nname = \"route-{i}\"\nwhen = 'name == \"{name}\" && user_id.endsWith(\"{i}\")'\nroute = \"routed-{i}\"\n"
        );
    }
    // 5 samples of page views by URL ending.
    for i in 0..5 {
        let _ = writeln!(
            toml,
            "[[rules]]\nname = \"sample-{i}\"\nwhen = 'name == \"page_view\" && attrs.url.endsWith(\"{i}\")'\nsample = 0.5\n"
        );
    }
    // A first-match set of 5 rules: device class from the user agent.
    toml.push_str(
        "[[rules]]\nname = \"device-class\"\nmatch = \"first\"\nwhen = 'has(attrs.user_agent)'\n",
    );
    for (class, needle) in [
        ("tablet", "iPad"),
        ("android", "Android"),
        ("mac", "Macintosh"),
        ("linux", "Linux"),
        ("windows", "Windows"),
    ] {
        let _ = writeln!(
            toml,
            "[[rules.rules]]\nname = \"device-{class}\"\nwhen = 'attrs.user_agent.contains(\"{needle}\")'\nset = {{ \"attrs.device\" = '\"{class}\"' }}\n"
        );
    }
    toml
}

/// Five windows over the clickstream events, of every kind and aggregate: per user and per
/// session, tumbling and sliding, with CEL filters, inputs and `having`.
pub fn default_windows_toml() -> String {
    r#"
[[windows]]
name = "cart-burst"
when = 'name == "add_to_cart"'
key = ["user_id"]
size_ms = 60000
allowed_lateness_ms = 5000
aggregates = { n = "count", items = "sum(attrs.quantity)" }
having = "n >= 5"

[[windows]]
name = "big-spender"
when = 'name == "purchase"'
key = ["user_id"]
kind = "sliding"
size_ms = 300000
slide_ms = 60000
allowed_lateness_ms = 5000
aggregates = { spend = "sum(double(attrs.price) * double(attrs.quantity))", orders = "count" }
having = "spend > 1000.0"

[[windows]]
name = "session-depth"
key = ["session_id"]
size_ms = 60000
allowed_lateness_ms = 5000
aggregates = { views = "count", pages = "distinct(attrs.url)" }
having = "views > 50"

[[windows]]
name = "price-range"
when = "has(attrs.price)"
key = ["name"]
size_ms = 10000
allowed_lateness_ms = 5000
aggregates = { low = "min(attrs.price)", high = "max(attrs.price)", mean = "avg(attrs.price)" }
having = "high > 10.0 * low"

[[windows]]
name = "shared-sessions"
key = ["session_id"]
kind = "sliding"
size_ms = 60000
slide_ms = 10000
allowed_lateness_ms = 5000
aggregates = { users = "distinct(user_id)" }
having = "users > 1"
"#
    .to_owned()
}

fn run(args: &Args) -> anyhow::Result<String> {
    anyhow::ensure!(args.events >= 100, "--events {}: at least 100", args.events);
    let (toml, origin) = match &args.config {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
            path.clone(),
        ),
        None => {
            let mut toml = format!("{BASE_TOML}\n{}", default_rules_toml());
            if args.windows {
                toml.push('\n');
                toml.push_str(&default_windows_toml());
            }
            if let Some(extra) = &args.extra_toml {
                toml.push('\n');
                toml.push_str(
                    &std::fs::read_to_string(extra)
                        .with_context(|| format!("read {}", extra.display()))?,
                );
            }
            (toml, PathBuf::from("bench-rules.toml"))
        }
    };
    let config = runnel_config::parse_agent(&toml, &origin).context("the pipeline config")?;
    let n_rules = config.rules.all_rules().count();
    let n_windows = config.windows.len();
    let n_models = config.models.len();
    let state_dir = tempfile::Builder::new()
        .prefix("runnel-bench-rules-")
        .tempdir()
        .context("create a temp dir")?;
    let build = || {
        Pipeline::build(
            &config,
            &BuildContext {
                data_dir: state_dir.path().to_owned(),
                agent_id: "bench".to_owned(),
            },
        )
    };
    let pipeline = Arc::new(build()?);
    let passthrough = Arc::new(Pipeline::passthrough());

    let now_ms = unix_ms();
    let events: Vec<Event> = {
        let mut body = String::from("[");
        for (idx, json) in super::events::generate(args.events, args.seed, now_ms)
            .iter()
            .enumerate()
        {
            if idx > 0 {
                body.push(',');
            }
            body.push_str(json);
        }
        body.push(']');
        runnel_agent::decode::json::decode(body.as_bytes(), now_ms, "clickstream")
            .map_err(|error| anyhow::anyhow!("decode the generated events: {error}"))?
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let events = Arc::new(events);

    let mut report = String::new();
    let _ = writeln!(
        report,
        "### Rule evaluation: {n_rules} rules, {n_windows} windows, {n_models} models\n"
    );
    let _ = writeln!(
        report,
        "{} clickstream events per run, decoded by the agent's JSON decoder, fed to \
         `Pipeline::process` in batches. Baseline: a passthrough pipeline on the same batches.\n",
        events.len()
    );
    let _ = writeln!(
        report,
        "| batch | threads | pipeline events/s | µs/event/thread | kept | passthrough events/s |\n|---|---|---|---|---|---|"
    );
    for batch in BATCH_SIZES {
        for n_threads in [1, threads] {
            let base = measure(&passthrough, &events, batch, n_threads, now_ms)?;
            let run = measure(&pipeline, &events, batch, n_threads, now_ms)?;
            let per_s = run.n_in as f64 / run.elapsed.as_secs_f64();
            let base_per_s = base.n_in as f64 / base.elapsed.as_secs_f64();
            let us_per_event = run.elapsed.as_secs_f64() * 1e6 * n_threads as f64 / run.n_in as f64;
            let _ = writeln!(
                report,
                "| {batch} | {n_threads} | {} | {us_per_event:.1} | {:.1}% | {} |",
                thousands(per_s),
                100.0 * run.n_out as f64 / run.n_in as f64,
                thousands(base_per_s),
            );
            eprintln!(
                "runnel-bench rules: batch {batch}, {n_threads} thread(s): {} events/s",
                thousands(per_s)
            );
            if threads == 1 {
                break;
            }
        }
    }
    drop(pipeline);
    Ok(report)
}

struct Measured {
    n_in: usize,
    n_out: usize,
    elapsed: Duration,
}

/// Runs every event through `pipeline` once, split over `n_threads` threads (each with its own
/// current-thread runtime, as contention-free as the sources' tasks are).
fn measure(
    pipeline: &Arc<Pipeline>,
    events: &Arc<Vec<Event>>,
    batch: usize,
    n_threads: usize,
    now_ms: i64,
) -> anyhow::Result<Measured> {
    let per_thread = events.len().div_ceil(n_threads);
    let barrier = Arc::new(std::sync::Barrier::new(n_threads + 1));
    let handles: Vec<_> = (0..n_threads)
        .map(|thread_idx| {
            let (pipeline, events, barrier) = (
                Arc::clone(pipeline),
                Arc::clone(events),
                Arc::clone(&barrier),
            );
            std::thread::spawn(move || -> anyhow::Result<(usize, Instant, Instant)> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("runtime")?;
                let start = (thread_idx * per_thread).min(events.len());
                let end = ((thread_idx + 1) * per_thread).min(events.len());
                let mine = &events[start..end];
                barrier.wait();
                let started = Instant::now();
                let mut n_out = 0;
                runtime.block_on(async {
                    for chunk in mine.chunks(batch) {
                        n_out += pipeline.process(chunk.to_vec(), now_ms).await.len();
                    }
                });
                Ok((n_out, started, Instant::now()))
            })
        })
        .collect();
    barrier.wait();
    // From the first thread's start to the last one's end.
    let mut n_out = 0;
    let mut first_start: Option<Instant> = None;
    let mut last_end: Option<Instant> = None;
    for handle in handles {
        let (n, started, ended) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        n_out += n;
        first_start = Some(first_start.map_or(started, |s| s.min(started)));
        last_end = Some(last_end.map_or(ended, |e| e.max(ended)));
    }
    let elapsed = match (first_start, last_end) {
        (Some(start), Some(end)) => end.saturating_duration_since(start),
        _ => Duration::ZERO,
    };
    Ok(Measured {
        n_in: events.len(),
        n_out,
        elapsed: elapsed.max(Duration::from_nanos(1)),
    })
}

fn thousands(n: f64) -> String {
    let digits = format!("{:.0}", n);
    let mut out = String::new();
    for (idx, c) in digits.chars().enumerate() {
        if idx > 0 && (digits.len() - idx).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
