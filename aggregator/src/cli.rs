//! The `runnel-aggregator` command line: `serve`, `certs`, `query`, `status`, and the fleet's
//! `config`, `rollout` and `agents` (in `fleet::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use runnel_service::logging::{self, LogFormat};

/// Runnel aggregator: stores what the fleet of runnel-agents sends, without loss or duplicates,
/// and answers SQL over it.
#[derive(Debug, Parser)]
#[command(name = "runnel-aggregator", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the aggregator until SIGINT or SIGTERM.
    Serve {
        /// Aggregator config file (see config/examples/aggregator.toml).
        #[arg(long, short, default_value = "/etc/runnel/aggregator.toml")]
        config: PathBuf,
    },
    /// Create the fleet CA and certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Print a summary of the running aggregator: agents, WAL, events table (exit 0: ready).
    Status {
        /// Config of the aggregator to ask; its runtime file in aggregator.data_dir names the
        /// address.
        #[arg(long, short, default_value = "/etc/runnel/aggregator.toml")]
        config: PathBuf,
        /// Ask this address instead, such as http://127.0.0.1:9481 (no config needed).
        #[arg(long)]
        url: Option<String>,
        /// Print the status as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Run a SQL query against a running aggregator and print the result.
    Query {
        /// Base URL of the aggregator's query API (query.listen).
        #[arg(long, default_value = "http://127.0.0.1:9481")]
        url: String,
        #[arg(long, short, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// User name when the aggregator has [[query.users]]; the password is read from the
        /// RUNNEL_QUERY_PASSWORD environment variable.
        #[arg(long, short)]
        user: Option<String>,
        /// The SQL statement (read-only), e.g. "SELECT count(*) FROM events".
        sql: String,
    },
    /// Fleet config documents: `config push FILE --selector ...`.
    #[command(subcommand)]
    Config(crate::fleet::cli::ConfigCommand),
    /// Fleet rollouts: status, abort, history.
    #[command(subcommand)]
    Rollout(crate::fleet::cli::RolloutCommand),
    /// The fleet's agents: id, labels, version, config, last seen, buffer, lag, drops, health.
    Agents {
        /// Only agents matching this label selector, such as site=berlin,role=pos.
        #[arg(long)]
        selector: Option<String>,
        #[command(flatten)]
        remote: crate::fleet::cli::Remote,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a CA (ca.pem, ca.key) and the aggregator's server certificate (server.pem, server.key).
    Init {
        /// Directory for the files (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address agents use to reach the aggregator (repeatable); agents set
        /// `uplink.server_name` to one of them. Default: localhost and 127.0.0.1.
        #[arg(long = "san")]
        server_names: Vec<String>,
        /// Validity of the server certificate in days.
        #[arg(long, default_value_t = crate::certs::DEFAULT_VALIDITY_DAYS)]
        days: u32,
        /// Replace an existing CA (every enrolled agent then needs a new certificate).
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate for one agent, signed by the CA in --dir. Its common name is
    /// the agent id.
    IssueAgent {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The agent id (letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        /// Where to write NAME.pem and NAME.key (default: --dir).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = crate::certs::DEFAULT_VALIDITY_DAYS)]
        days: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

pub fn main() -> ExitCode {
    runnel_service::tls::install_ring_provider();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Certs(command) => certs(command),
        Command::Query {
            url,
            format,
            user,
            sql,
        } => query(&url, format, user.as_deref(), &sql),
        Command::Status { config, url, json } => status(&config, url, json),
        Command::Config(command) => crate::fleet::cli::config(command),
        Command::Rollout(command) => crate::fleet::cli::rollout(command),
        Command::Agents { selector, remote } => crate::fleet::cli::agents(selector, remote),
    };
    logging::exit("runnel-aggregator", result)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = runnel_config::load_aggregator(&path)?;
    let runtime = runtime()?;
    let result = runtime.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            logging::wait_for_signal("aggregator").await;
            tracing::info!("shutdown requested");
            let _ = stop_tx.send(true);
        });
        crate::run(config, stop_rx).await
    });
    // Connection tasks and blocking work still running are abandoned: every commit is durable
    // already, and a stuck one must not keep the process (and systemd's stop) waiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init {
            dir,
            mut server_names,
            days,
            force,
        } => {
            if server_names.is_empty() {
                server_names = vec!["localhost".into(), "127.0.0.1".into()];
            }
            let files = crate::certs::init(&dir, &server_names, days, force)?;
            println!(
                "created CA {} (keep {} secret)\ncreated server certificate {} for {}\nnext: runnel-aggregator certs issue-agent --dir {} --name <agent-id>",
                files.ca_cert.display(),
                files.ca_key.display(),
                files.server_cert.display(),
                server_names.join(", "),
                dir.display()
            );
            Ok(())
        }
        CertsCommand::IssueAgent {
            dir,
            name,
            out,
            days,
        } => {
            let out = out.unwrap_or_else(|| dir.clone());
            let files = crate::certs::issue_agent(&dir, &name, &out, days)?;
            println!(
                "issued agent certificate {} and key {} (agent id {name}, valid {days} days)\ncopy them and {} to the agent host; set uplink.cert, uplink.key and uplink.ca_cert",
                files.cert.display(),
                files.key.display(),
                dir.join(crate::certs::CA_CERT).display()
            );
            Ok(())
        }
    }
}

fn status(config_path: &std::path::Path, url: Option<String>, json: bool) -> anyhow::Result<()> {
    let url = match url {
        Some(url) => url,
        None => crate::ops::local_url(config_path)?,
    };
    let status = runtime()?.block_on(crate::ops::fetch_status(&url))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).context("format JSON")?
        );
    } else {
        print!(
            "{}",
            crate::ops::render_status(&status, crate::wal::now_unix_ms())
        );
    }
    anyhow::ensure!(
        status.ready,
        "the aggregator at {url} is not ready: {}",
        status
            .not_ready_reason
            .as_deref()
            .unwrap_or("no reason given")
    );
    Ok(())
}

/// Environment variable holding the password for `query --user`.
const PASSWORD_ENV: &str = "RUNNEL_QUERY_PASSWORD";

fn query(url: &str, format: Format, user: Option<&str>, sql: &str) -> anyhow::Result<()> {
    let endpoint = format!("{}/api/v1/query", url.trim_end_matches('/'));
    let password = match user {
        Some(user) => Some(std::env::var(PASSWORD_ENV).with_context(|| {
            format!("--user {user}: set {PASSWORD_ENV} to the user's password")
        })?),
        None => None,
    };
    let response = runtime()?.block_on(async {
        let client = reqwest::Client::new();
        let mut request = client
            .post(&endpoint)
            .json(&serde_json::json!({ "sql": sql }));
        if let Some(user) = user {
            request = request.basic_auth(user, password);
        }
        let response = request.send().await.with_context(|| {
            format!("POST {endpoint} (is the aggregator running? see query.listen)")
        })?;
        let status = response.status();
        let body: serde_json::Value = response
            .json()
            .await
            .with_context(|| format!("read response from {endpoint}"))?;
        anyhow::Ok((status, body))
    })?;
    let (status, body) = response;
    if !status.is_success() {
        let message = body
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("(no error message)");
        if status == reqwest::StatusCode::UNAUTHORIZED && user.is_none() {
            anyhow::bail!(
                "query failed ({status}): {message}; pass --user NAME and set {PASSWORD_ENV}"
            );
        }
        anyhow::bail!("query failed ({status}): {message}");
    }
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&body).context("format JSON")?,
        Format::Csv => crate::render::render_csv(&body),
        Format::Table => crate::render::render_table(&body),
    };
    println!("{text}");
    Ok(())
}
