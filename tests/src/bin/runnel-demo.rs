//! `cargo build --workspace --all-targets && target/debug/runnel-demo`: Runnel on one machine,
//! with defaults.
//!
//! Generates a CA, a server and an agent certificate under the demo directory, starts an
//! aggregator and an agent in this process on loopback, sends sample clickstream events through
//! the agent's HTTP source, waits until the aggregator can query them, prints the answer to a
//! query, and keeps running (with copy-paste examples) until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

/// Run a local Runnel aggregator and agent with sample data.
#[derive(Debug, Parser)]
#[command(name = "runnel-demo")]
struct Args {
    /// Directory for certificates, configs, the agent buffer and the aggregator's data.
    #[arg(long, default_value = "runnel-demo")]
    dir: PathBuf,
    /// Sample events to send at start.
    #[arg(long, default_value_t = 1000)]
    events: usize,
    /// Send the sample events, print the query answer, and exit instead of running until Ctrl-C.
    #[arg(long)]
    once: bool,
}

/// Ports the demo prefers so the printed examples are stable; it falls back to any free port.
const AGENT_HTTP_PORT: u16 = 9470;
const QUERY_PORT: u16 = 9481;
const PGWIRE_PORT: u16 = 9482;

const SAMPLE_QUERY: &str = "SELECT name, count(*) AS events, count(DISTINCT user_id) AS users \
                            FROM events GROUP BY name ORDER BY events DESC";

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNNEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("runnel-demo: error: start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("runnel-demo: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("resolve {}", args.dir.display()))?;
    let certs = dir.join("certs");
    if !certs.join(runnel_aggregator::certs::CA_KEY).exists() {
        runnel_aggregator::certs::init(
            &certs,
            &["localhost".into(), "127.0.0.1".into()],
            825,
            false,
        )?;
        runnel_aggregator::certs::issue_agent(&certs, "demo-agent", &certs, 825)?;
        println!(
            "generated a CA, a server and an agent certificate in {}",
            certs.display()
        );
    }

    let query_listen = preferred_addr(QUERY_PORT);
    let pgwire_listen = preferred_addr(PGWIRE_PORT);
    let aggregator_toml = dir.join("aggregator.toml");
    write(
        &aggregator_toml,
        &format!(
            "# Written by runnel-demo. See config/examples/aggregator.toml for every key.\n\
             [aggregator]\ndata_dir = \"aggregator\"\n\n\
             [ingest]\nlisten = \"127.0.0.1:0\"\nca_cert = \"certs/ca.pem\"\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\n\n\
             [storage]\nflush_interval_ms = 10000\n\n\
             [query]\nlisten = \"{query_listen}\"\n\n\
             [pgwire]\nlisten = \"{pgwire_listen}\"\n"
        ),
    )?;
    let aggregator_config = runnel_config::load_aggregator(&aggregator_toml)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let aggregator = tokio::spawn(runnel_aggregator::run(
        aggregator_config.clone(),
        stop_rx.clone(),
    ));
    let aggregator_runtime = wait_for_runtime(
        &aggregator_config
            .data_dir
            .join(runnel_aggregator::RUNTIME_FILE),
    )
    .await?;
    let ingest = runtime_addr(&aggregator_runtime, "ingest")?;
    let query = runtime_addr(&aggregator_runtime, "query")?;
    let pgwire = runtime_addr(&aggregator_runtime, "pgwire")?;

    let agent_toml = dir.join("agent.toml");
    write(
        &agent_toml,
        &format!(
            "# Written by runnel-demo. See config/examples/agent.toml for every key.\n\
             [agent]\ndata_dir = \"agent\"\nlabels = {{ site = \"demo\" }}\n\n\
             [sources.http]\nlisten = \"{}\"\n\n\
             [uplink]\naggregator = \"{ingest}\"\nserver_name = \"localhost\"\n\
             ca_cert = \"certs/ca.pem\"\ncert = \"certs/demo-agent.pem\"\nkey = \"certs/demo-agent.key\"\n",
            preferred_addr(AGENT_HTTP_PORT)
        ),
    )?;
    let agent_config = runnel_config::load_agent(&agent_toml)?;
    let agent = tokio::spawn(runnel_agent::run(agent_config.clone(), stop_rx.clone()));
    let agent_runtime =
        wait_for_runtime(&agent_config.data_dir.join(runnel_agent::RUNTIME_FILE)).await?;
    let http = runtime_addr(&agent_runtime, "http")?;
    println!(
        "aggregator: QUIC ingest on {ingest}, SQL API on http://{query}, PostgreSQL protocol on {pgwire}"
    );
    println!("agent:      HTTP source on http://{http}, shipping to {ingest}");

    runnel_tests::install_crypto_provider();
    let client = reqwest::Client::new();
    let before = count_events(&client, query).await?;
    let started = Instant::now();
    send_sample_events(&client, http, args.events).await?;
    let target = before + args.events as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = count_events(&client, query).await?;
        if n >= target {
            println!(
                "sent {} sample events; all queryable at the aggregator after {} ms ({n} stored in total)",
                args.events,
                started.elapsed().as_millis()
            );
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {n} of {target} events arrived within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("\n$ runnel-aggregator query \"{SAMPLE_QUERY}\"");
    let answer = query_json(&client, query, SAMPLE_QUERY).await?;
    println!("{}\n", runnel_aggregator::render::render_table(&answer));

    if args.once {
        let _ = stop_tx.send(true);
    } else {
        println!("Runnel is running. Try, in another terminal:");
        println!(
            "  curl -s -X POST http://{http}/v1/events -d '{{\"name\":\"page_view\",\"user_id\":\"u42\",\"url\":\"/pricing\"}}'"
        );
        println!(
            "  {} query --url http://{query} \"SELECT event_time, name, user_id, attrs FROM events ORDER BY event_time DESC LIMIT 5\"",
            aggregator_command()
        );
        println!(
            "  curl -s http://{query}/api/v1/query -d '{{\"sql\":\"SELECT count(*) FROM events\"}}'"
        );
        println!(
            "  psql -h {} -p {} -c \"SELECT name, count(*) FROM events GROUP BY name\"",
            pgwire.ip(),
            pgwire.port()
        );
        println!(
            "Configs: {} and {}. Press Ctrl-C to stop.",
            aggregator_toml.display(),
            agent_toml.display()
        );
        println!("Live progress (a line when something moved):");
        let progress = tokio::spawn(print_progress(client.clone(), http, query));
        runnel_service::logging::wait_for_signal("demo").await;
        progress.abort();
        println!("stopping...");
        let _ = stop_tx.send(true);
    }
    agent.await.context("agent task")??;
    aggregator.await.context("aggregator task")??;
    Ok(())
}

/// How to run `runnel-aggregator` from this build: the binary next to this one (the README's
/// demo command builds both with `--workspace --all-targets`). Not `cargo run -p
/// runnel-aggregator`: a `-p` selection resolves dependency features differently from the
/// workspace build and recompiles DataFusion for minutes (CONTRIBUTING.md).
fn aggregator_command() -> String {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("runnel-aggregator")))
        .filter(|path| path.is_file());
    match beside {
        Some(path) => {
            let path = std::env::current_dir()
                .ok()
                .and_then(|cwd| path.strip_prefix(cwd).ok().map(|p| p.to_path_buf()))
                .unwrap_or(path);
            path.display().to_string()
        }
        None => {
            "cargo build --workspace --all-targets && target/debug/runnel-aggregator".to_owned()
        }
    }
}

/// 127.0.0.1:`port` if it is free now, else port 0 (the OS picks).
fn preferred_addr(port: u16) -> SocketAddr {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match std::net::TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

async fn wait_for_runtime(path: &Path) -> anyhow::Result<serde_json::Value> {
    // A file from an earlier run would point at dead ports.
    let _ = std::fs::remove_file(path);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(value) = serde_json::from_str(&text)
        {
            return Ok(value);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} did not appear within 30 s",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn runtime_addr(runtime: &serde_json::Value, key: &str) -> anyhow::Result<SocketAddr> {
    runtime[key]
        .as_str()
        .with_context(|| format!("runtime file has no {key}"))?
        .parse()
        .context("runtime address")
}

async fn send_sample_events(
    client: &reqwest::Client,
    http: SocketAddr,
    n_events: usize,
) -> anyhow::Result<()> {
    const NAMES: [&str; 5] = [
        "page_view",
        "page_view",
        "add_to_cart",
        "search",
        "checkout",
    ];
    const PATHS: [&str; 4] = ["/", "/pricing", "/docs", "/blog/runnel"];
    let now_ms = runnel_agent::now_unix_ms();
    let events: Vec<serde_json::Value> = (0..n_events)
        .map(|i| {
            serde_json::json!({
                "name": NAMES[i % NAMES.len()],
                "event_id": format!("demo-{now_ms}-{i}"),
                "user_id": format!("user-{}", i % 97),
                "session_id": format!("session-{}", i % 211),
                "timestamp": now_ms - (n_events - i) as i64 * 10,
                "url": PATHS[i % PATHS.len()],
                "referrer": "https://example.com/",
            })
        })
        .collect();
    for chunk in events.chunks(100) {
        let response = client
            .post(format!("http://{http}/v1/events"))
            .json(&chunk)
            .send()
            .await
            .context("POST sample events to the agent")?;
        anyhow::ensure!(
            response.status().is_success(),
            "agent answered {}",
            response.status()
        );
    }
    Ok(())
}

async fn query_json(
    client: &reqwest::Client,
    query: SocketAddr,
    sql: &str,
) -> anyhow::Result<serde_json::Value> {
    let response = client
        .post(format!("http://{query}/api/v1/query"))
        .json(&serde_json::json!({ "sql": sql }))
        .send()
        .await
        .context("query the aggregator")?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("read the query answer")?;
    anyhow::ensure!(
        status.is_success(),
        "query failed ({status}): {}",
        body["error"]
    );
    Ok(body)
}

async fn count_events(client: &reqwest::Client, query: SocketAddr) -> anyhow::Result<u64> {
    let body = query_json(client, query, "SELECT count(*) FROM events").await?;
    body["rows"][0][0]
        .as_u64()
        .context("count(*) is not a number")
}

/// Every two seconds, when anything moved: events received by the agent (and the rate), held in
/// its buffer, delivered (acknowledged by the aggregator), and stored at the aggregator.
async fn print_progress(client: reqwest::Client, agent: SocketAddr, aggregator: SocketAddr) {
    let get = |url: String| {
        let client = client.clone();
        async move {
            let reply = client.get(url).send().await.ok()?;
            reply.json::<serde_json::Value>().await.ok()
        }
    };
    let mut last: Option<(u64, u64, u64, u64)> = None;
    let mut last_at = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        ticker.tick().await;
        let (Some(agent), Some(aggregator)) = (
            get(format!("http://{agent}/v1/status")).await,
            get(format!("http://{aggregator}/api/v1/status")).await,
        ) else {
            continue;
        };
        let now = (
            agent["buffer"]["n_appended"].as_u64().unwrap_or(0),
            agent["buffer"]["n_events"].as_u64().unwrap_or(0),
            agent["uplink"]["n_events_acked"].as_u64().unwrap_or(0),
            aggregator["ingest"]["n_events_stored"]
                .as_u64()
                .unwrap_or(0),
        );
        let elapsed = last_at.elapsed().as_secs_f64().max(0.001);
        let rate = last.map_or(0.0, |l| now.0.saturating_sub(l.0) as f64 / elapsed);
        if last != Some(now) {
            println!(
                "  agent: {} received ({rate:.0}/s), {} buffered, {} delivered | aggregator: {} stored since start",
                now.0, now.1, now.2, now.3
            );
        }
        last = Some(now);
        last_at = Instant::now();
    }
}
