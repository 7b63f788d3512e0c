//! runnel-agent: captures events on an edge host, commits them to a durable SQLite buffer, and
//! ships them over QUIC to the aggregator.
//!
//! Pipeline: sources ([`http`], [`mqtt`], [`mqtt_listener`]) decode ([`decode`]) and append to the
//! [`buffer`]; the [`uplink`] reads the buffer, sends batches, and deletes what the aggregator
//! acknowledged.
//! `main.rs` only parses the command line; everything else lives here so tests can run it.

pub mod buffer;
pub mod cli;
pub mod decode;
pub mod fuzzing;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod mqtt_listener;
pub mod ops;
pub mod pipeline;
pub mod tls;
pub mod uplink;

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

/// Runs the agent until `shutdown` becomes true: opens the buffer, starts the HTTP source and
/// the uplink, and on shutdown stops taking requests, lets in-flight batches finish, and closes
/// the buffer after its last commit.
pub async fn run(config: AgentConfig, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    // Before anything records: the facade drops what arrives with no recorder installed.
    crate::metrics::install();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("create agent.data_dir {}", config.data_dir.display()))?;
    let identity = tls::load_identity(&config.uplink)?;
    let pipeline = pipeline::Pipeline::build(
        &config,
        &pipeline::BuildContext {
            data_dir: config.data_dir.clone(),
            agent_id: identity.agent_id.clone(),
        },
    )?;
    let pipeline = pipeline::PipelineHandle::new(pipeline);
    let (buffer, buffer_thread) = buffer::Buffer::open(&config.buffer)?;

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("bind sources.http.listen = {}", config.http.listen))?;
    let http_addr = listener.local_addr().context("read HTTP listen address")?;
    let mqtt_listener = if config.mqtt_listener.enabled {
        let mqtt_listener = mqtt_listener::bind(&config.mqtt_listener).await?;
        let addr = mqtt_listener
            .local_addr()
            .context("read MQTT listener address")?;
        Some((mqtt_listener, addr))
    } else {
        None
    };
    let mqtt_listener_addr = mqtt_listener.as_ref().map(|(_, addr)| *addr);
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
        aggregator = %config.uplink.aggregator,
        "agent started"
    );

    let mqtt_sources: Vec<_> = config
        .mqtt
        .iter()
        .map(|mqtt_config| {
            tokio::spawn(mqtt::run(
                mqtt::MqttSource {
                    config: mqtt_config.clone(),
                    agent_id: identity.agent_id.clone(),
                    buffer: buffer.clone(),
                    max_event_bytes: config.http.max_event_bytes,
                    pipeline: pipeline.clone(),
                },
                shutdown.clone(),
            ))
        })
        .collect();
    let mqtt_listener = mqtt_listener.map(|(listener, _)| {
        tokio::spawn(mqtt_listener::serve(
            listener,
            mqtt_listener::MqttListener {
                config: config.mqtt_listener.clone(),
                buffer: buffer.clone(),
                max_event_bytes: config.http.max_event_bytes,
                pipeline: pipeline.clone(),
            },
            shutdown.clone(),
        ))
    });
    let uplink_state = Arc::new(uplink::UplinkState::default());
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
    let uplink = tokio::spawn(uplink::run(
        uplink::Uplink {
            config: config.uplink.clone(),
            identity,
            buffer: buffer.clone(),
            labels: config.labels.clone(),
            state: uplink_state,
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
        config.buffer.block_timeout_ms,
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
    for source in mqtt_sources {
        if let Err(error) = source.await {
            tracing::error!(%error, "MQTT source task failed");
        }
    }
    if let Some(listener) = mqtt_listener
        && let Err(error) = listener.await
    {
        tracing::error!(%error, "MQTT listener task failed");
    }
    // After the sources: the last alerts are committed and window state saved.
    if let Err(error) = timers.await {
        tracing::error!(%error, "pipeline timer task failed");
    }
    if let Err(error) = uplink.await {
        tracing::error!(%error, "uplink task failed");
    }
    // The last buffer handles besides `buffer`: the writer thread ends when all are gone.
    drop(ops);
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

fn write_runtime_file(
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
