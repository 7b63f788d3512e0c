//! `runnel-bench scoring`: rows per second of model scoring for every fixture model
//! (tests/fixtures/models), three ways in the same run, on the same rows and batch size:
//!
//! - **pipeline**: events with `attrs.f0` .. `attrs.f7` through `Pipeline::process` of an agent
//!   pipeline built from a `[[models]]` config, one call per batch, as the sources do (input
//!   mapping, the blocking-thread hop, writing the score);
//! - **bare tract**: the loaded model's `infer` on ready f32 rows in a loop (no events);
//! - **onnxruntime**: `ort_bench.py` next to the fixtures, run with `--python` (which needs the
//!   `onnxruntime` package from PyPI), on the same rows written to a file, with
//!   `intra_op_num_threads = --ort-threads` (default 1, like the agent's one blocking thread
//!   per batch). It computes every model output, as `session.run(None, ...)` does.
//!
//! It measures, never asserts; the ratios are pipeline / onnxruntime and bare / onnxruntime.
//! The input mapping alone (rows built from the same events, `RowBuilder::push`) is shown too: it is
//! the part of the pipeline's cost that onnxruntime, fed ready arrays, does not pay.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use runnel_agent::pipeline::scoring::{OnnxModel, RowBuilder, Selection};
use runnel_agent::pipeline::{BuildContext, Pipeline};
use runnel_common::{Event, SourceKind, Value};

/// The agent config around the models: only the required keys (the files are not opened).
const BASE_TOML: &str = r#"
[uplink]
aggregator = "127.0.0.1:9480"
ca_cert = "/nonexistent/ca.pem"
cert = "/nonexistent/agent.pem"
key = "/nonexistent/agent.key"
"#;

/// The fixture models, in report order.
const MODELS: [&str; 10] = [
    "logistic",
    "scaler_logistic",
    "mlp_classifier",
    "mlp_regressor",
    "linear_regressor",
    "rf_classifier",
    "rf_regressor",
    "gb_classifier",
    "gb_regressor",
    "xgb_classifier",
];

/// Input columns of every fixture.
const COLUMNS: usize = 8;

/// `runnel-bench scoring`: model scoring throughput against onnxruntime.
#[derive(Debug, Parser)]
#[command(name = "runnel-bench scoring")]
struct Args {
    /// Rows scored per run (the fixtures' reference rows, repeated).
    #[arg(long, default_value_t = 50_000)]
    rows: usize,
    /// Rows per inference call (and events per pipeline batch).
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Directory of the fixture models, references.json and ort_bench.py.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/models"))]
    fixtures: PathBuf,
    /// Python with onnxruntime and numpy installed.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// onnxruntime intra-op threads.
    #[arg(long, default_value_t = 1)]
    ort_threads: usize,
    /// Models to run, comma-separated (default: all fixtures).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Least time each measurement runs (repeating the rows).
    #[arg(long, default_value_t = 1.0)]
    min_seconds: f64,
    /// Also write the markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Entry point: `args` starts with "scoring".
pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args = Args::parse_from(args);
    match run(&args) {
        Ok(report) => {
            print!("{report}");
            if let Some(out) = &args.out
                && let Err(error) = std::fs::write(out, &report)
            {
                eprintln!(
                    "runnel-bench scoring: error: write {}: {error}",
                    out.display()
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("runnel-bench scoring: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

struct Row {
    model: String,
    mapping: f64,
    pipeline: f64,
    bare: f64,
    ort: Result<f64, String>,
}

fn run(args: &Args) -> anyhow::Result<String> {
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    anyhow::ensure!(
        args.rows >= args.batch_size,
        "--rows must be at least --batch-size"
    );
    if std::env::current_exe()?
        .components()
        .any(|c| c.as_os_str() == "debug")
    {
        eprintln!("runnel-bench scoring: warning: debug build; figures are meaningless");
    }
    let references: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(args.fixtures.join("references.json"))
            .context("read references.json")?,
    )?;
    let tmp = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let names: Vec<String> = if args.models.is_empty() {
        MODELS.iter().map(|m| (*m).to_owned()).collect()
    } else {
        args.models.clone()
    };
    let mut results = Vec::new();
    for name in &names {
        let reference = &references["models"][name];
        let path = args.fixtures.join(
            reference["file"]
                .as_str()
                .with_context(|| format!("{name} is not in references.json"))?,
        );
        let rows = repeat_rows(reference, args.rows)?;

        // Bare tract: ready rows in a loop.
        let model = OnnxModel::load(&path, COLUMNS, &Selection::default())?;
        let bare = measure(args.min_seconds, args.rows, || {
            for batch in rows.chunks(args.batch_size * COLUMNS) {
                let values = model.infer(batch)?;
                std::hint::black_box(values);
            }
            Ok(())
        })?;

        // The agent pipeline: events in, events with a score out.
        let mut toml = format!(
            "{BASE_TOML}\n[[models]]\nname = \"{name}\"\npath = \"{}\"\nbatch_size = {}\n",
            path.display(),
            args.batch_size
        );
        for i in 0..COLUMNS {
            let _ = writeln!(toml, "[[models.inputs]]\nfield = \"attrs.f{i}\"");
        }
        let config_path = tmp.path().join(format!("{name}.toml"));
        let config = runnel_config::parse_agent(&toml, &config_path)?;
        let context = BuildContext {
            data_dir: tmp.path().join("data"),
            agent_id: "bench".into(),
        };
        let pipeline = Pipeline::build(&config, &context)?;
        let events = events_of(&rows);
        let pipeline = measure_pipeline(&runtime, &pipeline, &events, args)?;
        // The input mapping alone: rows built from the events, no inference.
        let row_builder = RowBuilder::new(&config.models[0].inputs);
        let mut scratch = Vec::with_capacity(args.batch_size * COLUMNS);
        let mapping = measure(args.min_seconds, args.rows, || {
            for batch in events.chunks(args.batch_size) {
                scratch.clear();
                for event in batch {
                    row_builder.push(event, &mut scratch);
                }
                std::hint::black_box(&scratch);
            }
            Ok(())
        })?;

        // onnxruntime on the same rows.
        let rows_file = tmp.path().join(format!("{name}.f32"));
        let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&rows_file, bytes)?;
        let ort = onnxruntime(args, &path, &rows_file);
        eprintln!(
            "runnel-bench scoring: {name}: pipeline {pipeline:.0} rows/s, bare tract {bare:.0} \
             rows/s, onnxruntime {}",
            match &ort {
                Ok(rate) => format!("{rate:.0} rows/s"),
                Err(error) => error.clone(),
            }
        );
        results.push(Row {
            model: name.clone(),
            mapping,
            pipeline,
            bare,
            ort,
        });
    }
    Ok(report(args, &results))
}

/// The reference rows of a fixture (missing values as NaN), repeated to `n` rows.
fn repeat_rows(reference: &serde_json::Value, n: usize) -> anyhow::Result<Vec<f32>> {
    let inputs = reference["inputs"].as_array().context("inputs")?;
    let mut rows = Vec::with_capacity(n * COLUMNS);
    for row in inputs.iter().cycle().take(n) {
        let row = row.as_array().context("row")?;
        anyhow::ensure!(row.len() == COLUMNS, "{} columns", row.len());
        rows.extend(
            row.iter()
                .map(|v| v.as_f64().map_or(f32::NAN, |v| v as f32)),
        );
    }
    Ok(rows)
}

/// One event per row, `attrs.f<i>` holding the columns. A NaN column is left out: the input's
/// default (0) is used, the same work as for any other value.
fn events_of(rows: &[f32]) -> Vec<Event> {
    rows.chunks(COLUMNS)
        .map(|row| {
            let mut event = Event::new(SourceKind::Http, "payments", "payment", 1_700_000_000_000);
            for (i, v) in row.iter().enumerate() {
                if !v.is_nan() {
                    event
                        .attrs
                        .insert(format!("f{i}"), Value::Float(f64::from(*v)));
                }
            }
            event
        })
        .collect()
}

/// Rows per second of `pass` (which handles `rows` rows), repeated for at least `min_seconds`
/// after one warm-up pass.
fn measure(
    min_seconds: f64,
    rows: usize,
    mut pass: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    pass()?;
    let started = Instant::now();
    let mut n = 0usize;
    loop {
        pass()?;
        n += rows;
        let elapsed = started.elapsed();
        if elapsed >= Duration::from_secs_f64(min_seconds) {
            return Ok(n as f64 / elapsed.as_secs_f64());
        }
    }
}

/// Rows per second of `Pipeline::process` over `events` in batches of `--batch-size`. The
/// batches are cloned before the clock starts (`process` takes them by value, as a source hands
/// over the events it decoded); only the `process` calls are timed. Fails if an event comes out
/// without a score.
fn measure_pipeline(
    runtime: &tokio::runtime::Runtime,
    pipeline: &Pipeline,
    events: &[Event],
    args: &Args,
) -> anyhow::Result<f64> {
    let mut timed = Duration::ZERO;
    let mut n = 0usize;
    let mut warm_up = true;
    while timed < Duration::from_secs_f64(args.min_seconds) {
        let batches: Vec<Vec<Event>> = events
            .chunks(args.batch_size)
            .map(<[Event]>::to_vec)
            .collect();
        let started = Instant::now();
        let mut scored = Vec::with_capacity(batches.len());
        for batch in batches {
            scored.push(runtime.block_on(pipeline.process(batch, 0)));
        }
        let elapsed = started.elapsed();
        let unscored = scored
            .iter()
            .flatten()
            .filter(|e| e.score.is_none())
            .count();
        anyhow::ensure!(
            unscored == 0,
            "{unscored} events came out of the pipeline unscored"
        );
        drop(scored);
        if warm_up {
            warm_up = false;
            continue;
        }
        timed += elapsed;
        n += events.len();
    }
    Ok(n as f64 / timed.as_secs_f64())
}

fn onnxruntime(args: &Args, model: &Path, rows_file: &Path) -> Result<f64, String> {
    let script = args.fixtures.join("ort_bench.py");
    let output = Command::new(&args.python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--rows")
        .arg(rows_file)
        .args(["--columns", &COLUMNS.to_string()])
        .args(["--batch-size", &args.batch_size.to_string()])
        .args(["--threads", &args.ort_threads.to_string()])
        .args(["--min-seconds", &args.min_seconds.to_string()])
        .output()
        .map_err(|error| format!("run {}: {error}", args.python.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("").to_owned();
        return Err(format!("ort_bench.py failed: {last}"));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answer: serde_json::Value = serde_json::from_str(stdout.trim())
        .map_err(|error| format!("ort_bench.py printed {stdout:?}: {error}"))?;
    answer["rows_per_s"]
        .as_f64()
        .ok_or_else(|| format!("ort_bench.py printed {stdout:?}"))
}

fn report(args: &Args, results: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### Scoring: {} rows per run, batch size {}, onnxruntime with {} intra-op thread(s)\n",
        args.rows, args.batch_size, args.ort_threads
    );
    let _ = writeln!(
        out,
        "| Model | Agent pipeline rows/s | Bare tract rows/s | onnxruntime rows/s | Pipeline / ort | Bare / ort | Input mapping alone rows/s |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for row in results {
        let (ort, pipeline_ratio, bare_ratio) = match &row.ort {
            Ok(ort) => (
                format!("{ort:.0}"),
                format!("{:.2}x", row.pipeline / ort),
                format!("{:.2}x", row.bare / ort),
            ),
            Err(error) => (error.clone(), "-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {ort} | {pipeline_ratio} | {bare_ratio} | {:.0} |",
            row.model, row.pipeline, row.bare, row.mapping
        );
    }
    out
}
