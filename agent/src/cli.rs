//! The `runnel-agent` command line. Parse, validate, act; errors print their whole chain and a
//! hint for the next step.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use runnel_service::logging::{self, LogFormat};

/// Runnel edge agent: captures events over HTTP, buffers them durably in SQLite, and ships them
/// to a runnel-aggregator over QUIC with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "runnel-agent", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM.
    Run {
        /// Agent config file (see config/examples/agent.toml).
        #[arg(long, short, default_value = "/etc/runnel/agent.toml")]
        config: PathBuf,
    },
    /// Validate a config file and the certificates it names, then exit (0: valid).
    Check {
        #[arg(long, short, default_value = "/etc/runnel/agent.toml")]
        config: PathBuf,
    },
    /// Print a summary of the running agent: buffer, uplink, sources (exit 0: ready).
    Status {
        /// Config of the agent to ask; its runtime file in agent.data_dir names the address.
        #[arg(long, short, default_value = "/etc/runnel/agent.toml")]
        config: PathBuf,
        /// Ask this address instead, such as http://127.0.0.1:9470 (no config needed).
        #[arg(long)]
        url: Option<String>,
        /// Print the status as JSON instead.
        #[arg(long)]
        json: bool,
    },
}

pub fn main() -> ExitCode {
    runnel_service::tls::install_ring_provider();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
        Command::Status { config, url, json } => status(&config, url, json),
    };
    logging::exit("runnel-agent", result)
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let bootstrap = runnel_config::managed::Bootstrap::load(&path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            logging::wait_for_signal("agent").await;
            tracing::info!("shutdown requested");
            let _ = stop_tx.send(true);
        });
        crate::run_bootstrap(bootstrap, stop_rx).await
    })
}

fn check(path: PathBuf) -> anyhow::Result<()> {
    let config = runnel_config::load_agent(&path)?;
    let identity =
        crate::tls::load_identity(&config.uplink).context("check uplink certificates")?;
    // Compiles every rule and loads every model, exactly as `run` would.
    crate::pipeline::Pipeline::build(
        &config,
        &crate::pipeline::BuildContext {
            data_dir: config.data_dir.clone(),
            agent_id: identity.agent_id.clone(),
        },
    )
    .context("check rules, windows and models")?;
    // What `run` would start with: the last good managed config, if it still fits this file.
    let bootstrap = runnel_config::managed::Bootstrap::load(&path)?;
    let managed = match crate::control::load_last_good(&bootstrap, &config.data_dir) {
        Ok(None) => format!(
            "none (bootstrap file only, hash {})",
            bootstrap.effective().hash
        ),
        Ok(Some(current)) => match crate::pipeline::Pipeline::build(
            &current.config,
            &crate::pipeline::BuildContext {
                data_dir: config.data_dir.clone(),
                agent_id: identity.agent_id.clone(),
            },
        ) {
            Ok(_) => format!(
                "last good v{} (effective hash {})",
                current.version, current.hash
            ),
            Err(error) => format!(
                "last good v{} does not build ({error:#}): the agent would start from this file alone",
                current.version
            ),
        },
        Err(error) => format!(
            "last good config does not validate ({error:#}): the agent would start from this file alone"
        ),
    };
    println!(
        "{}: OK\n  agent id    {}\n  http        {}\n  buffer      {} (max {} bytes, synchronous = {})\n  aggregator  {} (server name {})",
        path.display(),
        identity.agent_id,
        config.http.listen,
        config.buffer.path.display(),
        config.buffer.max_bytes,
        config.buffer.synchronous.as_str(),
        crate::uplink::rendezvous::order(&identity.agent_id, &config.uplink.aggregators).join(", "),
        config.uplink.server_name,
    );
    println!("  managed     {managed}");
    Ok(())
}

fn status(config_path: &std::path::Path, url: Option<String>, json: bool) -> anyhow::Result<()> {
    let url = match url {
        Some(url) => url,
        None => crate::ops::local_url(config_path)?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let status = runtime.block_on(crate::ops::fetch_status(&url))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).context("format JSON")?
        );
    } else {
        print!("{}", crate::ops::render_status(&status));
    }
    anyhow::ensure!(
        status.ready,
        "the agent at {url} is not ready: {}",
        status
            .not_ready_reason
            .as_deref()
            .unwrap_or("no reason given")
    );
    Ok(())
}
