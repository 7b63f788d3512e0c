//! runnel-agent: captures events on an edge host, commits them to a durable SQLite buffer, and
//! ships them over QUIC to the aggregator.
//!
//! Pipeline: [`sources`] (HTTP, MQTT subscriber, MQTT listener) decode ([`decode`]) and append to
//! the [`buffer`]; the [`uplink`] reads the buffer, sends batches, and deletes what the aggregator
//! acknowledged.
//! `main.rs` only parses the command line; everything else lives here so tests can run it.

pub mod buffer;
pub mod cli;
pub mod control;
pub mod decode;
pub mod fuzzing;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod sources;
pub mod tls;
pub mod uplink;

/// The HTTP source, also at its path before the sources moved together (benches and tests use
/// [`http::DEFAULT_STREAM`]).
pub use sources::http;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use runnel_config::AgentConfig;
use tokio::sync::watch;

/// Name of the file in `data_dir` where a running agent writes the addresses it bound (useful
/// with port 0, and for `runnel-agent status`).
pub const RUNTIME_FILE: &str = "agent.runtime.json";

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_unix_ms() -> i64 {
    let now = std::time::SystemTime::now();
    match now.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Runs the agent on an already validated config, without fleet configuration: config pushes
/// are answered `failed` (there is no bootstrap file to lay them over). Used by tests and the
/// demo; `runnel-agent run` uses [`run_bootstrap`].
pub async fn run(config: AgentConfig, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    run_agent(None, config, shutdown).await
}

/// Runs the agent until `shutdown` becomes true: starts from the last good managed config in
/// `data_dir` if it still validates over `bootstrap` (else from the bootstrap file alone), opens
/// the buffer, starts the sources and the uplink, and on shutdown stops taking requests, lets
/// in-flight batches finish, and closes the buffer after its last commit.
pub async fn run_bootstrap(
    bootstrap: runnel_config::managed::Bootstrap,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // The data dir holds the last good config: create it before looking there.
    std::fs::create_dir_all(&bootstrap.config().data_dir).with_context(|| {
        format!(
            "create agent.data_dir {}",
            bootstrap.config().data_dir.display()
        )
    })?;
    let current = control::startup_config(&bootstrap);
    let config = current.config.clone();
    run_agent(Some((bootstrap, current)), config, shutdown).await
}

async fn run_agent(
    managed: Option<(runnel_config::managed::Bootstrap, control::Current)>,
    mut config: AgentConfig,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Before anything records: the facade drops what arrives with no recorder installed.
    crate::metrics::install();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create agent.data_dir {}", config.data_dir.display()))?;
    let identity = tls::load_identity(&config.uplink)?;
    let context = pipeline::BuildContext {
        data_dir: config.data_dir.clone(),
        agent_id: identity.agent_id.clone(),
    };
    let (mut bootstrap, mut current) = match managed {
        Some((bootstrap, current)) => (Some(bootstrap), Some(current)),
        None => (None, None),
    };
    let pipeline = match pipeline::Pipeline::build(&config, &context) {
        Ok(pipeline) => pipeline,
        Err(error) if current.as_ref().is_some_and(|c| c.version > 0) => {
            // The last good managed config validated but does not build any more (a model
            // file gone bad): the bootstrap file alone must still start the agent.
            let fallback = control::startup_bootstrap_only(
                bootstrap.as_ref().expect("managed implies a bootstrap"),
            );
            tracing::error!(
                error = format!("{error:#}"),
                "THE LAST GOOD MANAGED CONFIG NO LONGER BUILDS: starting with the bootstrap \
                 file alone until the aggregator pushes a config again"
            );
            config = fallback.config.clone();
            current = Some(fallback);
            pipeline::Pipeline::build(&config, &context)?
        }
        Err(error) => return Err(error),
    };
    let pipeline = pipeline::PipelineHandle::new(pipeline);
    let (buffer, buffer_thread) = buffer::Buffer::open(&config.buffer)?;

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("bind sources.http.listen = {}", config.http.listen))?;
    let http_addr = listener.local_addr().context("read HTTP listen address")?;
    let source_deps = sources::SourceDeps {
        agent_id: identity.agent_id.clone(),
        buffer: buffer.clone(),
        pipeline: pipeline.clone(),
        shutdown: shutdown.clone(),
        health: sources::mqtt_subscriber::SourceHealth::default(),
    };
    let sources = match sources::Sources::start(&config, &source_deps).await {
        Ok(sources) => sources,
        Err(error) if current.as_ref().is_some_and(|c| c.version > 0) => {
            // The last good managed config's sources do not start (its port is taken now):
            // back to the bootstrap file alone, pipeline and buffer policy included.
            let fallback = control::startup_bootstrap_only(
                bootstrap.as_ref().expect("managed implies a bootstrap"),
            );
            tracing::error!(
                error = format!("{error:#}"),
                "THE LAST GOOD MANAGED CONFIG NO LONGER STARTS: starting with the bootstrap \
                 file alone until the aggregator pushes a config again"
            );
            config = fallback.config.clone();
            current = Some(fallback);
            pipeline.replace(pipeline::Pipeline::build(&config, &context)?);
            buffer
                .set_policy(buffer::Policy {
                    when_full: config.buffer.when_full,
                    stream_priorities: config.buffer.stream_priorities.clone(),
                })
                .await?;
            sources::Sources::start(&config, &source_deps).await?
        }
        Err(error) => return Err(error),
    };
    let mqtt_listener_addr = sources.mqtt_listener_addr();
    write_runtime_file(
        &config.data_dir,
        http_addr,
        mqtt_listener_addr,
        &identity.agent_id,
    )?;
    tracing::info!(
        agent_id = %identity.agent_id,
        http = %http_addr,
        mqtt_listener = ?mqtt_listener_addr,
        aggregators = config.uplink.aggregators.join(", "),
        config_version = current.as_ref().map_or(0, |c| c.version),
        config_hash = current.as_ref().map_or("", |c| c.hash.as_str()),
        "agent started"
    );

    let block_timeout_ms = Arc::new(std::sync::atomic::AtomicU64::new(
        config.buffer.block_timeout_ms,
    ));
    let control = match (bootstrap.take(), current.take()) {
        (Some(bootstrap), Some(current)) => {
            Arc::new(control::Control::new(control::ControlParts {
                bootstrap,
                current,
                context: context.clone(),
                pipeline: pipeline.clone(),
                buffer: buffer.clone(),
                block_timeout_ms: Arc::clone(&block_timeout_ms),
                deps: source_deps,
                sources,
            }))
        }
        _ => Arc::new(control::Control::unmanaged(
            config.clone(),
            source_deps,
            sources,
        )),
    };
    let uplink_state = Arc::new(uplink::UplinkState::new(uplink::rendezvous::order(
        &identity.agent_id,
        &config.uplink.aggregators,
    )));
    let ops = Arc::new(ops::Ops::new(
        &config,
        &identity.agent_id,
        ops::Listen {
            http: http_addr.to_string(),
            mqtt_listener: mqtt_listener_addr.map(|addr| addr.to_string()),
        },
        buffer.clone(),
        Arc::clone(&uplink_state),
    ));
    ops.set_control(Arc::clone(&control));
    control.keep_runtime_file(http_addr);
    let uplink = tokio::spawn(uplink::run(
        uplink::Uplink {
            config: config.uplink.clone(),
            identity,
            buffer: buffer.clone(),
            labels: config.labels.clone(),
            state: uplink_state,
            control: Arc::clone(&control),
        },
        shutdown.clone(),
    ));
    let timers = tokio::spawn(pipeline::run_timers(
        pipeline.clone(),
        buffer.clone(),
        shutdown.clone(),
    ));
    let mut http_shutdown = shutdown.clone();
    let router = http::router(
        &config.http,
        &config.snowplow,
        &config.segment,
        block_timeout_ms,
        buffer.clone(),
        pipeline.clone(),
    )
    .merge(ops::router(Arc::clone(&ops)))
    .merge(crate::metrics::router(Arc::clone(&ops)));
    // Every source is started and the listener is bound: ready (systemd, `/readyz`).
    ops.set_ready();
    let supervisor = tokio::spawn(ops::supervise(Arc::clone(&ops), shutdown.clone()));
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = http_shutdown.wait_for(|stop| *stop).await;
    })
    .await
    .context("HTTP source")?;
    // MQTT subscribers and listener, whichever generation runs now.
    control.join_sources().await;
    // After the sources: the last alerts are committed and window state saved.
    if let Err(error) = timers.await {
        tracing::error!(%error, "pipeline timer task failed");
    }
    // The timer saved window state when shutdown began; requests the sources finished after
    // that changed it again, so save once more now that no source can.
    let last = pipeline.current();
    match tokio::task::spawn_blocking(move || last.persist()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(error = format!("{error:#}"), "save window state"),
        Err(error) => tracing::warn!(%error, "save window state task failed"),
    }
    if let Err(error) = uplink.await {
        tracing::error!(%error, "uplink task failed");
    }
    // The last buffer handles besides `buffer`: the writer thread ends when all are gone.
    drop(ops);
    drop(control);
    if let Err(error) = supervisor.await {
        tracing::error!(%error, "supervisor task failed");
    }
    drop(buffer);
    tokio::task::spawn_blocking(move || buffer_thread.join())
        .await
        .context("join buffer thread")?;
    tracing::info!("agent stopped");
    Ok(())
}

pub(crate) fn write_runtime_file(
    data_dir: &Path,
    http: SocketAddr,
    mqtt_listener: Option<SocketAddr>,
    agent_id: &str,
) -> anyhow::Result<()> {
    let path = data_dir.join(RUNTIME_FILE);
    let mut text = serde_json::json!({ "pid": std::process::id(), "agent_id": agent_id, "http": http.to_string() });
    if let Some(addr) = mqtt_listener {
        text["mqtt_listener"] = serde_json::Value::String(addr.to_string());
    }
    std::fs::write(&path, text.to_string()).with_context(|| format!("write {}", path.display()))
}
