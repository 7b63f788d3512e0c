//! The sources: where events enter the agent. [`http`] serves trackers (generic JSON, Snowplow,
//! Segment), [`mqtt_subscriber`] subscribes to brokers, [`mqtt_listener`] is an MQTT server that
//! devices publish to directly. Each decodes with [`crate::decode`], runs the pipeline and
//! acknowledges only what the buffer committed.
//!
//! This module owns the lifecycle of the sources a managed config may change (the MQTT
//! subscribers and the MQTT listener): [`Sources`] starts them, and changes them in generations
//! that stop on their own signal or the agent's shutdown: [`Sources::stage`] starts what a new
//! config needs next to what runs, then [`Sources::commit`] swaps and stops the old ones, or
//! [`Sources::abandon`] leaves everything as it was. Deciding whether a config applies is
//! [`crate::control`]'s job, not this module's.
//!
//! Sources never read or change the buffer's contents beyond appending (and looking up delivery
//! marks), and never talk to the uplink.

use std::net::SocketAddr;

use anyhow::Context;
use runnel_config::AgentConfig;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::buffer::Buffer;
use crate::pipeline::PipelineHandle;

pub mod http;
pub mod mqtt_listener;
mod mqtt_publish;
pub mod mqtt_subscriber;

/// Everything a source needs besides its config.
#[derive(Clone)]
pub struct SourceDeps {
    pub agent_id: String,
    pub buffer: Buffer,
    pub pipeline: PipelineHandle,
    /// The agent's shutdown: every source generation stops on it too.
    pub shutdown: watch::Receiver<bool>,
    /// Connection state of the MQTT subscribers, for the status.
    pub health: mqtt_subscriber::SourceHealth,
}

/// One generation of a source kind (the MQTT subscribers, or the MQTT listener), stoppable on
/// its own.
struct Generation {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Generation {
    fn new() -> (Generation, watch::Receiver<bool>) {
        let (stop, stop_rx) = watch::channel(false);
        (
            Generation {
                stop,
                tasks: Vec::new(),
            },
            stop_rx,
        )
    }

    /// Stops its tasks and waits for them (they finish their current commit first).
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.join().await;
    }

    async fn join(self) {
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(%error, "source task failed");
            }
        }
    }
}

/// The sources a managed config may change: MQTT subscribers and the MQTT listener. The HTTP
/// source is the bootstrap file's (it also serves the operator endpoints).
pub struct Sources {
    mqtt: Vec<runnel_config::MqttSourceConfig>,
    mqtt_generation: Generation,
    listener: runnel_config::MqttListenerConfig,
    listener_generation: Option<Generation>,
    listener_addr: Option<SocketAddr>,
}

impl Sources {
    /// Starts the sources of `config`. Fails (and starts nothing) when the MQTT listener cannot
    /// bind.
    pub async fn start(config: &AgentConfig, deps: &SourceDeps) -> anyhow::Result<Sources> {
        let listener = start_listener(config, deps).await?;
        let (listener_generation, listener_addr) = match listener {
            Some((generation, addr)) => (Some(generation), Some(addr)),
            None => (None, None),
        };
        Ok(Sources {
            mqtt: config.mqtt.clone(),
            mqtt_generation: start_mqtt(config, deps),
            listener: config.mqtt_listener.clone(),
            listener_generation,
            listener_addr,
        })
    }

    pub fn mqtt_listener_addr(&self) -> Option<SocketAddr> {
        self.listener_addr
    }

    /// Waits for every source to end (after the agent's shutdown).
    pub async fn join(self) {
        self.mqtt_generation.join().await;
        if let Some(generation) = self.listener_generation {
            generation.join().await;
        }
    }

    /// Starts what a change to `config` needs before it can take effect: a changed MQTT
    /// listener. Nothing stops yet, except an old listener that holds the port the new one
    /// binds; if the new one then cannot start, the old one (of `running`) comes back and the
    /// change fails. `publish` learns every new listener address.
    pub async fn stage(
        &mut self,
        config: &AgentConfig,
        running: &AgentConfig,
        deps: &SourceDeps,
        publish: &(dyn Fn(Option<SocketAddr>) + Sync),
    ) -> anyhow::Result<Staged> {
        let listener_changed = self.listener != config.mqtt_listener;
        let same_listen_addr = config.mqtt_listener.enabled
            && self.listener_generation.is_some()
            && self.listener.listen == config.mqtt_listener.listen
            && config.mqtt_listener.listen.port() != 0;
        let mut staged = Staged {
            mqtt_changed: self.mqtt != config.mqtt,
            new_listener: None,
            stopped_old_listener: false,
        };
        if listener_changed {
            if same_listen_addr {
                // The old listener holds the port: it has to go first. If the new one then
                // cannot bind, the old one comes back.
                if let Some(old) = self.listener_generation.take() {
                    old.stop().await;
                }
                staged.stopped_old_listener = true;
            }
            match start_listener(config, deps).await {
                Ok(started) => staged.new_listener = Some(started),
                Err(error) => {
                    if staged.stopped_old_listener {
                        self.restore_listener(running, deps, publish).await;
                    }
                    return Err(error.context("start the new MQTT listener"));
                }
            }
        }
        Ok(staged)
    }

    /// Gives up a staged change: the new listener stops and the sources of `running` run as
    /// before.
    pub async fn abandon(
        &mut self,
        staged: Staged,
        running: &AgentConfig,
        deps: &SourceDeps,
        publish: &(dyn Fn(Option<SocketAddr>) + Sync),
    ) {
        if let Some(Some((generation, _))) = staged.new_listener {
            generation.stop().await;
        }
        if staged.stopped_old_listener {
            self.restore_listener(running, deps, publish).await;
        }
    }

    /// Completes a staged change to `config`: the new listener takes over from the old one,
    /// and changed MQTT subscribers are replaced (the old ones stop after their current commit).
    pub async fn commit(
        &mut self,
        staged: Staged,
        config: &AgentConfig,
        deps: &SourceDeps,
        publish: &(dyn Fn(Option<SocketAddr>) + Sync),
    ) {
        if let Some(started) = staged.new_listener {
            let old = self.listener_generation.take();
            match started {
                Some((generation, addr)) => {
                    self.listener_generation = Some(generation);
                    self.listener_addr = Some(addr);
                }
                None => self.listener_addr = None,
            }
            self.listener = config.mqtt_listener.clone();
            if let Some(old) = old {
                old.stop().await;
            }
            publish(self.listener_addr);
        }
        if staged.mqtt_changed {
            let new_generation = start_mqtt(config, deps);
            let old = std::mem::replace(&mut self.mqtt_generation, new_generation);
            self.mqtt = config.mqtt.clone();
            old.stop().await;
        }
    }

    /// Starts the listener of the running config again after it was stopped for a new one
    /// that did not start.
    async fn restore_listener(
        &mut self,
        running: &AgentConfig,
        deps: &SourceDeps,
        publish: &(dyn Fn(Option<SocketAddr>) + Sync),
    ) {
        match start_listener(running, deps).await {
            Ok(Some((generation, addr))) => {
                self.listener_generation = Some(generation);
                self.listener_addr = Some(addr);
                publish(Some(addr));
            }
            Ok(None) => {}
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "the previous MQTT listener could not be restarted"
            ),
        }
    }

    /// Tasks of the running MQTT subscribers.
    #[cfg(test)]
    pub(crate) fn n_mqtt_tasks(&self) -> usize {
        self.mqtt_generation.tasks.len()
    }
}

/// A change of the sources begun by [`Sources::stage`]; [`Sources::commit`] or
/// [`Sources::abandon`] ends it.
#[must_use = "a staged change is committed or abandoned"]
pub struct Staged {
    mqtt_changed: bool,
    /// The listener changed: the new one, already serving (`None`: the new config has none).
    new_listener: Option<Option<(Generation, SocketAddr)>>,
    /// The old listener was stopped first, to free its port for the new one.
    stopped_old_listener: bool,
}

fn start_mqtt(config: &AgentConfig, deps: &SourceDeps) -> Generation {
    let (mut generation, stop_rx) = Generation::new();
    for mqtt_config in &config.mqtt {
        let shutdown = either(deps.shutdown.clone(), stop_rx.clone());
        generation.tasks.push(tokio::spawn(mqtt_subscriber::run(
            mqtt_subscriber::MqttSource {
                config: mqtt_config.clone(),
                agent_id: deps.agent_id.clone(),
                buffer: deps.buffer.clone(),
                max_event_bytes: config.http.max_event_bytes,
                pipeline: deps.pipeline.clone(),
                health: deps.health.clone(),
            },
            shutdown,
        )));
    }
    generation
}

async fn start_listener(
    config: &AgentConfig,
    deps: &SourceDeps,
) -> anyhow::Result<Option<(Generation, SocketAddr)>> {
    if !config.mqtt_listener.enabled {
        return Ok(None);
    }
    let listener = mqtt_listener::bind(&config.mqtt_listener).await?;
    let addr = listener
        .local_addr()
        .context("read MQTT listener address")?;
    let (mut generation, stop_rx) = Generation::new();
    generation.tasks.push(tokio::spawn(mqtt_listener::serve(
        listener,
        mqtt_listener::MqttListener {
            config: config.mqtt_listener.clone(),
            buffer: deps.buffer.clone(),
            max_event_bytes: config.http.max_event_bytes,
            pipeline: deps.pipeline.clone(),
        },
        either(deps.shutdown.clone(), stop_rx),
    )));
    Ok(Some((generation, addr)))
}

/// A receiver that turns true when either `a` or `b` does.
fn either(mut a: watch::Receiver<bool>, mut b: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow() || *b.borrow());
    tokio::spawn(async move {
        tokio::select! {
            _ = a.wait_for(|stop| *stop) => {}
            _ = b.wait_for(|stop| *stop) => {}
            _ = tx.closed() => return,
        }
        let _ = tx.send(true);
    });
    rx
}
