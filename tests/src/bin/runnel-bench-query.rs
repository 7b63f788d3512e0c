//! The query benchmark (docs/BENCHMARKS.md, "Query: Runnel against DuckDB"): writes N realistic
//! events through the aggregator's real write path (the agent's JSON decoder, batches committed
//! to the SQLite WAL, flushed to the Delta table, small files compacted) and then runs five
//! queries on them with Runnel's query engine over the Delta table, with the same engine over
//! the same files as a plain list of Parquet files, and with DuckDB (the PyPI `duckdb` package,
//! run by `tests/bench/duckdb_queries.py`, globbing the files) in the same run, checks that the
//! engines agree, and prints each query's median time and the ratios.
//!
//! Both engines run in-process on the same machine with the same cores, warm (one unmeasured run
//! first), reading the same files: Runnel through `QueryEngine::run` (what the HTTP and
//! PostgreSQL front ends call), DuckDB through its Python API.

#[path = "../bench/events.rs"]
#[allow(dead_code)]
mod events;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use runnel_aggregator::{query, store, wal};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(about = "Runnel's query engine against DuckDB on the same Parquet files")]
struct Args {
    /// Events to write (spread over 24 hours of event time and `--agents` agents).
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Agents the events come from (each its own sequence chain and `agent_id`).
    #[arg(long, default_value_t = 8)]
    agents: u64,
    /// Measured runs per query and engine (after one warm-up run); the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Working directory (WAL, Parquet files, the dimension CSV). Reused when it already holds
    /// a complete data set of the same size, so the queries can be rerun without rewriting.
    #[arg(long, default_value = "target/bench-query")]
    dir: PathBuf,
    /// Python interpreter with the `duckdb` package.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Print Runnel's `EXPLAIN ANALYZE` of each query (before the timed runs).
    #[arg(long)]
    explain: bool,
}

/// One benchmark query in both dialects. `check` names the columns both engines must agree on.
struct Query {
    name: &'static str,
    runnel: &'static str,
    duckdb: &'static str,
    check: &'static [usize],
}

const QUERIES: [Query; 5] = [
    Query {
        name: "events per minute",
        runnel: "SELECT date_trunc('minute', event_time) AS minute, count(*) AS n \
                 FROM events GROUP BY 1 ORDER BY 1",
        // DuckDB reads the UTC timestamps as TIMESTAMP WITH TIME ZONE, whose date_trunc goes
        // through ICU calendars; as plain TIMESTAMP (the same instants, UTC) it is ~1.6x faster.
        duckdb: "SELECT date_trunc('minute', event_time::TIMESTAMP) AS minute, count(*) AS n \
                 FROM events GROUP BY 1 ORDER BY 1",
        check: &[1],
    },
    Query {
        name: "top 10 pages",
        runnel: "SELECT json_get_str(attrs, 'url') AS page, count(*) AS n FROM events \
                 WHERE name = 'page_view' GROUP BY 1 ORDER BY n DESC, page LIMIT 10",
        duckdb: "SELECT json_extract_string(attrs, '$.url') AS page, count(*) AS n FROM events \
                 WHERE name = 'page_view' GROUP BY 1 ORDER BY n DESC, page LIMIT 10",
        check: &[0, 1],
    },
    Query {
        name: "distinct users per hour",
        runnel: "SELECT date_trunc('hour', event_time) AS hour, count(DISTINCT user_id) AS users \
                 FROM events GROUP BY 1 ORDER BY 1",
        duckdb: "SELECT date_trunc('hour', event_time::TIMESTAMP) AS hour, \
                 count(DISTINCT user_id) AS users FROM events GROUP BY 1 ORDER BY 1",
        check: &[1],
    },
    Query {
        name: "p95 score per agent",
        runnel: "SELECT agent_id, approx_percentile_cont(score, 0.95) AS p95 FROM events \
                 GROUP BY agent_id ORDER BY agent_id",
        duckdb: "SELECT agent_id, approx_quantile(score, 0.95) AS p95 FROM events \
                 GROUP BY agent_id ORDER BY agent_id",
        // Both are approximations (t-digest); they agree on the agents, not to the last digit.
        check: &[0],
    },
    Query {
        name: "join with a dimension table",
        runnel: "SELECT p.category, count(*) AS n, sum(p.price_cents) AS revenue_cents \
                 FROM events e JOIN pages p ON json_get_str(e.attrs, 'url') = p.url \
                 WHERE e.name = 'product_view' GROUP BY 1 ORDER BY 1",
        duckdb: "SELECT p.category, count(*) AS n, sum(p.price_cents) AS revenue_cents \
                 FROM events e JOIN pages p ON json_extract_string(e.attrs, '$.url') = p.url \
                 WHERE e.name = 'product_view' GROUP BY 1 ORDER BY 1",
        check: &[0, 1, 2],
    },
];

/// Events per WAL batch, as the agent ships them by default.
const BATCH_EVENTS: usize = 1000;
/// Rows in memory before a flush: the aggregator's default `storage.max_recent_rows`.
const FLUSH_ROWS: usize = 1_000_000;
/// The aggregator's default `storage.compact_min_files`.
const COMPACT_MIN_FILES: usize = 8;
const DAY_MS: i64 = 86_400_000;
/// Products in the dimension table: the event generator's catalogue.
const N_PRODUCTS: u64 = 5_000;
const CATEGORIES: [&str; 8] = [
    "shoes", "jackets", "shirts", "bags", "watches", "outdoor", "kids", "sale",
];

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("runnel-bench-query: error: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("runnel-bench-query: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let config_text = aggregator_toml(&dir);
    let config = runnel_config::parse_aggregator(&config_text, &dir.join("aggregator.toml"))?;
    write_dimension(&dir.join("pages"))?;

    let files = store::open_files(&config.storage)?;
    let event_store = Arc::new(store::EventStore::new(config.storage.max_recent_rows));
    event_store.open_table(&files).await?;
    let (wal, wal_thread, recovered) = wal::Wal::open(
        &config.storage.wal_path,
        config.storage.synchronous.as_pragma(),
        Arc::clone(&event_store) as Arc<dyn wal::CommittedBatches>,
    )?;
    event_store.reconcile(&wal).await?;
    let marker = dir.join(format!("complete-{}-{}", args.events, args.agents));
    if marker.exists() && recovered.n_events == 0 {
        println!(
            "data set: {} events from {} agents, reused from {}",
            args.events,
            args.agents,
            dir.display()
        );
    } else {
        anyhow::ensure!(
            recovered.n_events == 0 && event_store.summary().n_files == 0,
            "{} holds another or an unfinished data set: remove it or pick another --dir",
            dir.display()
        );
        write_events(&args, &wal, &event_store).await?;
        // DuckDB globs the Parquet files: only the current version's may be there.
        event_store.vacuum(Duration::ZERO).await?;
        std::fs::write(&marker, b"")?;
    }
    let summary = event_store.summary();
    println!(
        "parquet: {} files, {} rows, {:.1} MiB",
        summary.n_files,
        summary.n_file_rows,
        summary.n_file_bytes as f64 / (1 << 20) as f64
    );

    let engine = query::QueryEngine::new(&config.query, Arc::clone(&event_store), &files)?;
    engine.create_views().await?;
    engine.register_federation(&config.federation).await;
    let mut runnel = Vec::new();
    for q in &QUERIES {
        if args.explain {
            let sql = format!("EXPLAIN ANALYZE {}", q.runnel);
            let plan = engine.run(&sql).await.with_context(|| sql.clone())?;
            let json = query::to_json(&plan);
            println!("\n{}:", q.name);
            for row in json["rows"].as_array().into_iter().flatten() {
                println!("{}", row[1].as_str().unwrap_or_default());
            }
        }
        let (median, rows) = time_runnel(&engine, q.runnel, args.runs).await?;
        runnel.push((median, rows));
    }

    // The same engine and files without Delta: `events` as a plain list of the table's live
    // Parquet files (what the release before the Delta table read), cast to `events`' types.
    let plain = plain_parquet_table(&event_store, &files)?;
    let ctx = engine.context();
    ctx.deregister_table("events")?;
    ctx.register_table("events", plain)?;
    let mut plain_runs = Vec::new();
    for q in &QUERIES {
        let (median, rows) = time_runnel(&engine, q.runnel, args.runs).await?;
        plain_runs.push((median, rows));
    }

    let duck = run_duckdb(&args, &dir)?;
    println!();
    println!("Runnel over the Delta table against Runnel over the same files as plain Parquet:");
    println!("| query | Delta table | plain Parquet files | Delta ÷ plain | same rows |");
    println!("|---|---|---|---|---|");
    for (idx, q) in QUERIES.iter().enumerate() {
        let (delta_ms, delta_rows) = &runnel[idx];
        let (plain_ms, plain_rows) = &plain_runs[idx];
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.2} | {} |",
            q.name,
            delta_ms,
            plain_ms,
            delta_ms / plain_ms,
            delta_rows == plain_rows
        );
    }
    println!();
    println!("| query | Runnel median | DuckDB median | Runnel ÷ DuckDB (target ≤ 1.2) | rows |");
    println!("|---|---|---|---|---|");
    let mut all_agree = true;
    for (idx, q) in QUERIES.iter().enumerate() {
        let (runnel_ms, runnel_rows) = &runnel[idx];
        let theirs = &duck[q.name];
        let duck_ms = theirs["median_ms"].as_f64().unwrap_or(f64::NAN);
        let duck_rows = theirs["rows"].as_array().cloned().unwrap_or_default();
        let agree = same_rows(runnel_rows, &duck_rows, q.check);
        all_agree &= agree;
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.2} | {}{} |",
            q.name,
            runnel_ms,
            duck_ms,
            runnel_ms / duck_ms,
            runnel_rows.len(),
            if agree { "" } else { " (DISAGREE)" }
        );
    }
    drop(engine);
    drop(event_store);
    drop(wal);
    tokio::task::spawn_blocking(move || wal_thread.join()).await?;
    anyhow::ensure!(all_agree, "the engines disagree on a result (see above)");
    Ok(())
}

/// `events` as the live Parquet files of the table's current version, read by DataFusion's
/// listing table with `events`' schema (it casts the table's Int64 and microsecond columns).
fn plain_parquet_table(
    event_store: &store::EventStore,
    files: &store::Files,
) -> anyhow::Result<Arc<dyn datafusion::catalog::TableProvider>> {
    use datafusion::datasource::file_format::parquet::ParquetFormat;
    use datafusion::datasource::listing::{
        ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
    };
    let view = event_store
        .snapshot()
        .table
        .context("the events table is not open")?;
    let urls = store::table::files(&view.snapshot)
        .iter()
        .map(|file| -> anyhow::Result<ListingTableUrl> {
            Ok(ListingTableUrl::parse(
                files.table_url.join(&file.path)?.as_str(),
            )?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(runnel_aggregator::schema::EVENTS_SCHEMA.clone());
    Ok(Arc::new(ListingTable::try_new(config)?))
}

fn aggregator_toml(dir: &Path) -> String {
    let quoted = |path: PathBuf| format!("{:?}", path.display().to_string());
    format!(
        "[aggregator]\n\
         data_dir = {data}\n\
         [ingest]\n\
         ca_cert = \"unused-ca.pem\"\n\
         cert = \"unused.pem\"\n\
         key = \"unused.key\"\n\
         [storage]\n\
         synchronous = \"normal\"\n\
         [query]\n\
         timeout_ms = 3600000\n\
         memory_limit_bytes = 4294967296\n\
         [[federation]]\n\
         name = \"pages\"\n\
         kind = \"csv\"\n\
         path = {pages}\n",
        data = quoted(dir.join("data")),
        pages = quoted(dir.join("pages")),
    )
}

/// The dimension table: one row per product page (URL as the event generator builds it).
fn write_dimension(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut csv = String::from("url,product_id,category,price_cents\n");
    for product in 0..N_PRODUCTS {
        let category = CATEGORIES[(product % CATEGORIES.len() as u64) as usize];
        csv.push_str(&format!(
            "https://shop.example.com/{category}/p-{product:05},p-{product:05},{category},{}\n",
            500 + (product * 7919) % 40_000
        ));
    }
    std::fs::write(dir.join("products.csv"), csv)?;
    Ok(())
}

/// Decodes generated JSON with the agent's decoder and commits it, batch by batch and agent by
/// agent, flushing and compacting as the aggregator does.
async fn write_events(
    args: &Args,
    wal: &wal::Wal,
    event_store: &store::EventStore,
) -> anyhow::Result<()> {
    let n_batches = args.events.div_ceil(BATCH_EVENTS as u64);
    let end_ms = runnel_agent::now_unix_ms() / 3_600_000 * 3_600_000;
    let start_ms = end_ms - DAY_MS;
    let mut seqs = vec![0u64; args.agents as usize];
    let agent_ids: Vec<Arc<str>> = (0..args.agents)
        .map(|idx| Arc::from(format!("edge-{idx:03}")))
        .collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut n_written = 0u64;
    for batch_idx in 0..n_batches {
        let n = (args.events - n_written).min(BATCH_EVENTS as u64) as usize;
        let anchor = start_ms + (DAY_MS as u128 * batch_idx as u128 / n_batches as u128) as i64;
        let body = format!("[{}]", events::generate(n, batch_idx, anchor).join(","));
        let mut events = runnel_agent::decode::json::decode(body.as_bytes(), anchor, "clickstream")
            .map_err(|error| anyhow::anyhow!("decode generated events: {error}"))?;
        let agent = (batch_idx % args.agents) as usize;
        let after_seq = seqs[agent];
        for event in &mut events {
            seqs[agent] += 1;
            event.seq = seqs[agent];
            event.score = Some(rng.f64());
        }
        let batch = runnel_common::batch::encode(after_seq, &events)?;
        wal.commit(wal::CommitRequest {
            agent_id: Arc::clone(&agent_ids[agent]),
            after_seq,
            last_seq: seqs[agent],
            events,
            batch,
        })
        .await
        .map_err(|error| anyhow::anyhow!("commit batch {batch_idx}: {error}"))?;
        n_written += n as u64;
        if event_store.n_recent_rows() >= FLUSH_ROWS || n_written == args.events {
            event_store.flush(wal).await?;
            event_store.compact(COMPACT_MIN_FILES).await?;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "  written {n_written} of {} events ({:.0}/s)",
                args.events,
                n_written as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = started.elapsed();
    println!(
        "write path: {} events in {:.1} s, {:.0} events/s (decode, WAL commit, Parquet flush, compaction)",
        args.events,
        elapsed.as_secs_f64(),
        args.events as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// Median milliseconds over `runs` runs after a warm-up, and the result rows as JSON.
async fn time_runnel(
    engine: &query::QueryEngine,
    sql: &str,
    runs: usize,
) -> anyhow::Result<(f64, Vec<Value>)> {
    let warm = engine.run(sql).await.with_context(|| sql.to_owned())?;
    let rows = query::to_json(&warm)["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let result = engine.run(sql).await.with_context(|| sql.to_owned())?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        drop(result);
    }
    Ok((median(&mut times), rows))
}

fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Runs the DuckDB side; returns `{query name: {median_ms, rows}}`.
fn run_duckdb(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/duckdb_queries.py");
    let queries: Vec<Value> = QUERIES
        .iter()
        .map(|q| serde_json::json!({ "name": q.name, "sql": q.duckdb }))
        .collect();
    let spec = serde_json::json!({
        "events": dir.join("data/events").display().to_string(),
        "products": dir.join("pages/products.csv").display().to_string(),
        "runs": args.runs,
        "queries": queries,
    });
    let output = std::process::Command::new(&args.python)
        .arg(&script)
        .arg(spec.to_string())
        .output()
        .with_context(|| format!("run {} {}", args.python, script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{} failed ({}): {}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).context("parse the DuckDB script's output")
}

/// Whether both engines return the same rows in the `check` columns (numbers compared as
/// numbers, everything else as text).
fn same_rows(ours: &[Value], theirs: &[Value], check: &[usize]) -> bool {
    ours.len() == theirs.len()
        && ours.iter().zip(theirs).all(|(a, b)| {
            check.iter().all(|&col| {
                let (x, y) = (&a[col], &b[col]);
                match (as_number(x), as_number(y)) {
                    (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(1.0),
                    _ => {
                        x.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| x.to_string())
                            == y.as_str()
                                .map(str::to_owned)
                                .unwrap_or_else(|| y.to_string())
                    }
                }
            })
        })
}

fn as_number(value: &Value) -> Option<f64> {
    value
        .as_f64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}
