//! `runnel-aggregator config push`, `rollout status|abort|history` and `agents`: clients of the
//! fleet HTTP API ([`super::api`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use base64::Engine as _;
use clap::{Args, Subcommand};
use runnel_config::managed::ManagedDocument;

use super::api::{PushBody, PushFile};

/// Where the aggregator's API is and who asks.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Base URL of the aggregator's query API (query.listen).
    #[arg(long, default_value = "http://127.0.0.1:9481")]
    pub url: String,
    /// User name when the aggregator has [[query.users]]; the password is read from the
    /// RUNNEL_QUERY_PASSWORD environment variable.
    #[arg(long, short)]
    pub user: Option<String>,
    /// Print the API's JSON answer instead.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a managed config document, store it and roll it out to the agents matching a
    /// label selector: canaries first, a bake time and health gate, then the rest in waves.
    Push {
        /// The managed document (TOML: rules, windows, models, sources.mqtt, buffer policies).
        /// Model files it names are read relative to it and sent along.
        file: std::path::PathBuf,
        /// Label selector: site=berlin,role=pos; key!=value; key in (a,b); key; !key.
        #[arg(long, default_value = "")]
        selector: String,
        /// Canary step: a count of agents or a percentage (default 10%).
        #[arg(long)]
        canary: Option<String>,
        /// Wave size after the gate: a count or a percentage of the rest (default 25%).
        #[arg(long)]
        wave: Option<String>,
        /// How long canaries run the new config before the gate (500ms, 30s, 2m; default 1m).
        #[arg(long)]
        bake: Option<String>,
        /// How long a pushed agent has to answer (default 1m).
        #[arg(long)]
        apply_timeout: Option<String>,
        /// A note kept with the document and the rollout.
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// A rollout's phase, targets and history (default: the newest).
    Status {
        id: Option<u64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stop a rollout where it is: agents it has not reached keep their config.
    Abort {
        id: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Every rollout, newest first.
    History {
        #[command(flatten)]
        remote: Remote,
    },
}

const PASSWORD_ENV: &str = "RUNNEL_QUERY_PASSWORD";

fn call(
    remote: &Remote,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", remote.url.trim_end_matches('/'));
    let password = match &remote.user {
        Some(user) => Some(std::env::var(PASSWORD_ENV).with_context(|| {
            format!("--user {user}: set {PASSWORD_ENV} to the user's password")
        })?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let (status, value) = runtime.block_on(async {
        let client = reqwest::Client::new();
        let mut request = client.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(user) = &remote.user {
            request = request.basic_auth(user, password);
        }
        let response = request.send().await.with_context(|| {
            format!("{method} {url} (is the aggregator running? see query.listen)")
        })?;
        let status = response.status();
        let value: serde_json::Value = response
            .json()
            .await
            .with_context(|| format!("read the answer of {url}"))?;
        anyhow::Ok((status, value))
    })?;
    if !status.is_success() {
        let message = value["error"].as_str().unwrap_or("(no error message)");
        anyhow::bail!("{message} ({status})");
    }
    Ok(value)
}

pub fn config(command: ConfigCommand) -> anyhow::Result<()> {
    let ConfigCommand::Push {
        file,
        selector,
        canary,
        wave,
        bake,
        apply_timeout,
        note,
        remote,
    } = command;
    let document =
        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    // Model files the document names, relative to it; the aggregator validates the rest.
    let parsed = ManagedDocument::parse(&document, &file)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    for name in parsed.model_files() {
        let path = dir.join(&name);
        let content = std::fs::read(&path)
            .with_context(|| format!("{}: read model file {}", file.display(), path.display()))?;
        files.push(PushFile {
            name,
            content_base64: base64::engine::general_purpose::STANDARD.encode(content),
        });
    }
    let body = PushBody {
        document,
        files,
        selector,
        canary,
        wave,
        bake: bake.map(super::api::DurationArg::Text),
        apply_timeout: apply_timeout.map(super::api::DurationArg::Text),
        note,
    };
    let body = serde_json::to_value(body).context("encode the push")?;
    let rollout = call(&remote, reqwest::Method::POST, "/api/v1/config", Some(body))
        .with_context(|| format!("push {}", file.display()))?;
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&rollout)?);
    } else {
        print!("{}", render_rollout(&rollout));
    }
    Ok(())
}

pub fn rollout(command: RolloutCommand) -> anyhow::Result<()> {
    let (value, remote, list) = match command {
        RolloutCommand::Status { id, remote } => {
            let value = match id {
                Some(id) => call(
                    &remote,
                    reqwest::Method::GET,
                    &format!("/api/v1/rollouts/{id}"),
                    None,
                )?,
                None => {
                    let all = call(&remote, reqwest::Method::GET, "/api/v1/rollouts", None)?;
                    all["rollouts"].get(0).cloned().context("no rollout yet")?
                }
            };
            (value, remote, false)
        }
        RolloutCommand::Abort { id, remote } => {
            let path = format!("/api/v1/rollouts/{id}/abort");
            (
                call(&remote, reqwest::Method::POST, &path, None)?,
                remote,
                false,
            )
        }
        RolloutCommand::History { remote } => (
            call(&remote, reqwest::Method::GET, "/api/v1/rollouts", None)?,
            remote,
            true,
        ),
    };
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if list {
        let rows: Vec<Vec<String>> = value["rollouts"]
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|r| {
                        vec![
                            r["id"].to_string(),
                            r["spec"]["version"].to_string(),
                            text(&r["spec"]["selector"]),
                            text(&r["phase"]),
                            counts(&r["counts"]),
                            ms_time(r["created_ms"].as_i64()),
                            text(&r["spec"]["note"]),
                            text(&r["reason"]),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print!(
            "{}",
            table(
                &[
                    "id", "version", "selector", "phase", "targets", "created", "note", "reason"
                ],
                &rows
            )
        );
    } else {
        print!("{}", render_rollout(&value));
    }
    Ok(())
}

pub fn agents(selector: Option<String>, remote: Remote) -> anyhow::Result<()> {
    let path = match &selector {
        Some(selector) => format!("/api/v1/agents?selector={}", url_encode(selector)),
        None => "/api/v1/agents".to_owned(),
    };
    let value = call(&remote, reqwest::Method::GET, &path, None)?;
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let now_ms = crate::wal::now_unix_ms();
    let rows: Vec<Vec<String>> = value["agents"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|a| {
                    let labels = a["labels"]
                        .as_object()
                        .map(|l| {
                            l.iter()
                                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let hash = text(&a["config_hash"]);
                    let health = match (a["connected"].as_bool(), a["healthy"].as_bool()) {
                        (Some(false), _) => "offline".to_owned(),
                        (_, Some(true)) => "ok".to_owned(),
                        (_, Some(false)) => {
                            let bad: Vec<String> = a["components"]
                                .as_array()
                                .map(|c| {
                                    c.iter()
                                        .filter(|c| c["healthy"].as_bool() == Some(false))
                                        .map(|c| text(&c["name"]))
                                        .collect()
                                })
                                .unwrap_or_default();
                            format!("unhealthy: {}", bad.join(","))
                        }
                        _ => "?".to_owned(),
                    };
                    let version =
                        match (a["config_version"].as_u64(), a["desired_version"].as_u64()) {
                            (Some(v), Some(d)) if v != d => format!("v{v} (-> v{d})"),
                            (Some(v), _) => format!("v{v}"),
                            (None, Some(d)) => format!("? (-> v{d})"),
                            (None, None) => String::new(),
                        };
                    vec![
                        text(&a["agent_id"]),
                        labels,
                        text(&a["agent_version"]),
                        version,
                        hash.chars().take(12).collect(),
                        a["last_seen_ms"]
                            .as_i64()
                            .filter(|ms| *ms > 0)
                            .map(|ms| format!("{}s ago", (now_ms - ms).max(0) / 1000))
                            .unwrap_or_default(),
                        opt(&a["n_buffered_events"]),
                        a["oldest_unshipped_age_ms"]
                            .as_u64()
                            .map(|ms| format!("{}ms", ms))
                            .unwrap_or_default(),
                        opt(&a["n_dropped_events"]),
                        health,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print!(
        "{}",
        table(
            &[
                "agent_id",
                "labels",
                "version",
                "config",
                "config_hash",
                "last_seen",
                "buffer",
                "lag",
                "drops",
                "health"
            ],
            &rows
        )
    );
    Ok(())
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn opt(value: &serde_json::Value) -> String {
    text(value)
}

fn counts(value: &serde_json::Value) -> String {
    value
        .as_object()
        .map(|c| {
            c.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn ms_time(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let body = serde_json::json!({
        "columns": header.iter().map(|h| serde_json::json!({"name": h})).collect::<Vec<_>>(),
        "rows": rows,
    });
    let mut out = crate::render::render_table(&body);
    out.push('\n');
    out
}

/// A rollout for people: what, where, phase, each target, history.
pub fn render_rollout(r: &serde_json::Value) -> String {
    let mut out = format!(
        "rollout {} of config version {} ({}) to {:?}: {}\n",
        r["id"],
        r["spec"]["version"],
        text(&r["spec"]["hash"])
            .chars()
            .take(12)
            .collect::<String>(),
        text(&r["spec"]["selector"]),
        text(&r["phase"]),
    );
    if let Some(reason) = r["reason"].as_str() {
        out.push_str(&format!("reason: {reason}\n"));
    }
    out.push_str(&format!(
        "canary {}, waves of {}, bake {} ms; targets: {}\n",
        text(&r["spec"]["canary"]),
        text(&r["spec"]["wave"]),
        r["spec"]["bake_ms"],
        counts(&r["counts"]),
    ));
    let mut groups: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for t in r["targets"].as_array().into_iter().flatten() {
        let error = t["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        groups
            .entry(t["group"].as_u64().unwrap_or(0))
            .or_default()
            .push(format!(
                "{} {}{error}",
                text(&t["agent_id"]),
                text(&t["state"])
            ));
    }
    for (group, targets) in groups {
        let name = if group == 0 {
            "canary".to_owned()
        } else {
            format!("wave {group}")
        };
        out.push_str(&format!("  {name}: {}\n", targets.join(", ")));
    }
    for h in r["history"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  {}  {}\n",
            ms_time(h["at_ms"].as_i64()),
            text(&h["message"])
        ));
    }
    out
}
