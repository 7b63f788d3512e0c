//! The reliability suite's sources, each remembering exactly what was acknowledged: the HTTP load
//! preset on the shared generator ([`crate::load`]) that takes every refusal in its stride, an
//! MQTT QoS 1 publisher that records PUBACKs, a paced MQTT stream, and the probes that measure
//! how long delivery took to resume after a fault.
//!
//! Nothing here decides a verdict (that is the [`super::Referee`]'s job), and no outcome hangs on
//! timing: waits poll with a deadline; the only sleeps are a source's pauses and pacing.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::load::{
    AckedEvent, GeneratedEvents, LoadConfig, OnTransportError, OtherAnswers, Requests,
};
use crate::{http_client, poll_until, post_events, query_count, test_event};

/// The suite's HTTP load ([`crate::load`]): `n_clients` clients posting 1 to 20 events per request
/// with ids `<prefix>-<client>-<n>`, each event on the next of `streams`. Unlike
/// [`LoadConfig::events`] it takes any refusal (503, 500 from a failed commit, a dead agent) as
/// "not acknowledged", pauses 100 ms and carries on; only an answer that is neither 2xx nor 5xx
/// fails the test.
pub fn http_load(n_clients: usize, prefix: &str, streams: &[&str]) -> LoadConfig {
    assert!(!streams.is_empty(), "an HTTP load needs a stream");
    let pause_after_refusal = Duration::from_millis(100);
    LoadConfig {
        requests: Requests::Events(GeneratedEvents {
            prefix: prefix.to_owned(),
            streams: streams.iter().map(|s| (*s).to_owned()).collect(),
            events_per_request: 1..=20,
        }),
        pause_after_busy: pause_after_refusal,
        pause_after_failure: pause_after_refusal,
        on_transport_error: OnTransportError::Continue,
        other_answers: OtherAnswers::CountServerErrors,
        ..LoadConfig::events(n_clients, prefix)
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT QoS 1 publisher that remembers what was acknowledged

#[derive(Debug, Default)]
struct PublisherState {
    /// Message ids handed to the client, not yet sent (the event loop sends them in order).
    queued: VecDeque<String>,
    /// Packet id -> message id, sent and not yet acknowledged.
    in_flight: HashMap<u16, String>,
    /// Message ids the peer acknowledged (PUBACK), in order.
    acked: Vec<String>,
    n_published: usize,
    connected: bool,
    /// The event loop's error: the connection is gone and this publisher is finished.
    error: Option<String>,
}

/// An MQTT 3.1.1 QoS 1 publisher (clean session) that records which messages the peer
/// acknowledged with a PUBACK. The peer is the agent's own listener (a PUBACK there means
/// committed to the buffer) or a broker. It does not reconnect: when the connection fails it is
/// finished, and what it had not seen acknowledged was never acknowledged.
pub struct MqttPublisher {
    client: rumqttc::AsyncClient,
    state: Arc<Mutex<PublisherState>>,
    task: JoinHandle<()>,
}

impl MqttPublisher {
    /// Connects and waits for the CONNACK (at most `timeout`).
    pub async fn connect(
        host: &str,
        port: u16,
        client_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<MqttPublisher> {
        use rumqttc::{Event, Outgoing, Packet};
        let mut options = rumqttc::MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(100)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
        let state = Arc::new(Mutex::new(PublisherState::default()));
        let loop_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let mut state = loop_state.lock().expect("publisher lock");
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => state.connected = true,
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        let id = state
                            .queued
                            .pop_front()
                            .expect("a publish was sent that the test did not queue");
                        state.in_flight.insert(pkid, id);
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(id) = state.in_flight.remove(&ack.pkid) {
                            state.acked.push(id);
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        state.error = Some(error.to_string());
                        return;
                    }
                }
            }
        });
        let publisher = MqttPublisher {
            client,
            state,
            task,
        };
        poll_until(timeout, || async {
            let state = publisher.state.lock().expect("publisher lock");
            if let Some(error) = &state.error {
                anyhow::bail!("connection failed: {error}");
            }
            anyhow::ensure!(state.connected, "no CONNACK yet");
            Ok(())
        })
        .await
        .with_context(|| format!("MQTT publisher {client_id} to {host}:{port}"))?;
        Ok(publisher)
    }

    /// Hands one QoS 1 message to the client without waiting. Returns false when the client's
    /// queue is full (try again later) or the connection is gone (see [`MqttPublisher::failed`]).
    /// Call from one task at a time: ids are matched to packets in order.
    pub fn try_publish(&self, topic: &str, id: &str, payload: Vec<u8>) -> bool {
        let mut state = self.state.lock().expect("publisher lock");
        if state.error.is_some() {
            return false;
        }
        // Queue the id first: the event loop may send the packet before try_publish returns.
        state.queued.push_back(id.to_owned());
        match self
            .client
            .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => {
                state.n_published += 1;
                true
            }
            Err(_) => {
                state.queued.pop_back();
                false
            }
        }
    }

    pub fn failed(&self) -> Option<String> {
        self.state.lock().expect("publisher lock").error.clone()
    }

    pub fn n_acked(&self) -> usize {
        self.state.lock().expect("publisher lock").acked.len()
    }

    pub fn n_published(&self) -> usize {
        self.state.lock().expect("publisher lock").n_published
    }

    /// Message ids acknowledged so far (each once).
    pub fn acked(&self) -> Vec<String> {
        let state = self.state.lock().expect("publisher lock");
        let distinct: BTreeSet<&String> = state.acked.iter().collect();
        assert_eq!(
            distinct.len(),
            state.acked.len(),
            "a message id was acknowledged twice: the publisher is broken"
        );
        state.acked.clone()
    }

    /// Waits until every message handed over was acknowledged, or the connection failed.
    pub async fn wait_all_acked(&self, timeout: Duration) -> anyhow::Result<()> {
        poll_until(timeout, || async {
            let state = self.state.lock().expect("publisher lock");
            if let Some(error) = &state.error {
                anyhow::bail!("publisher failed: {error}");
            }
            anyhow::ensure!(
                state.acked.len() == state.n_published,
                "{} of {} acknowledged",
                state.acked.len(),
                state.n_published
            );
            Ok(())
        })
        .await
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A telemetry payload whose `event_id` is the message id.
pub fn telemetry_payload(id: &str, n: usize) -> Vec<u8> {
    json!({"event_id": id, "msg_id": id, "temp": 20.0 + (n % 10) as f64 / 2.0})
        .to_string()
        .into_bytes()
}

/// Publishes `<prefix><n>` messages to `<topic_root>/d-<n % 4>/telemetry` at about
/// `n_per_s`, until stopped or the publisher fails. Returns how many it handed over.
pub struct MqttStream {
    stop: Arc<AtomicBool>,
    task: JoinHandle<usize>,
}

impl MqttStream {
    pub fn start(
        publisher: Arc<MqttPublisher>,
        topic_root: &str,
        prefix: &str,
        first_idx: usize,
        n_per_s: u64,
    ) -> MqttStream {
        /// Messages per tick; the tick interval follows from the rate.
        const PER_TICK: u64 = 4;
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            let topic_root = topic_root.to_owned();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut msg_idx = first_idx;
                let mut tick = tokio::time::interval(Duration::from_micros(
                    1_000_000 * PER_TICK / n_per_s.max(1),
                ));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                'ticks: while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    for _ in 0..PER_TICK {
                        let id = format!("{prefix}{msg_idx:07}");
                        let topic = format!("{topic_root}/d-{}/telemetry", msg_idx % 4);
                        if !publisher.try_publish(&topic, &id, telemetry_payload(&id, msg_idx)) {
                            if publisher.failed().is_some() {
                                break 'ticks;
                            }
                            // The client's queue is full: skip to the next tick.
                            continue 'ticks;
                        }
                        msg_idx += 1;
                    }
                }
                msg_idx - first_idx
            })
        };
        MqttStream { stop, task }
    }

    /// Stops publishing; returns the number of messages handed over.
    pub async fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("MQTT stream task panicked")
    }
}

// ---------------------------------------------------------------------------------------------
// Probes: how long until delivery resumed

/// A probe's outcome: the probe ids the agent acknowledged (all belong to the referee) and the
/// time from the fault's end until one acknowledged after it was stored.
#[derive(Debug, Clone)]
pub struct Probe {
    pub acked: Vec<AckedEvent>,
    pub recovered_in: Duration,
}

/// Stream of probe events.
pub const PROBE_STREAM: &str = "probe";

/// Measures recovery: posts a probe event (stream [`PROBE_STREAM`], id `<id_prefix>-<n>`) until
/// the agent acknowledges one without dropping it, then waits until it is stored. The agent ships
/// in sequence order, so a stored probe also means everything acknowledged before it was shipped.
/// Fails after `timeout`.
pub async fn probe_recovery(
    http: SocketAddr,
    query_addr: SocketAddr,
    id_prefix: &str,
    fault_ended: Instant,
    timeout: Duration,
) -> anyhow::Result<Probe> {
    let client = http_client();
    let deadline = fault_ended + timeout;
    let mut acked = Vec::new();
    let mut last = String::new();
    let mut probe_idx = 0usize;
    let stored_id = loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no probe acknowledged within {timeout:?} after the fault ended; last answer: {last}"
        );
        let id = format!("{id_prefix}-{probe_idx}");
        probe_idx += 1;
        let mut event = test_event(&id);
        event["stream"] = Value::String(PROBE_STREAM.to_owned());
        match post_events(&client, http, &[event]).await {
            Ok(outcome) if outcome.status == 200 => {
                let dropped = outcome.body["dropped"].as_u64().unwrap_or(0) > 0;
                acked.push(AckedEvent {
                    id: id.clone(),
                    stream: PROBE_STREAM.to_owned(),
                    dropped_in_answer: dropped,
                });
                if !dropped {
                    break id;
                }
                last = format!("200 but dropped: {}", outcome.body);
            }
            Ok(outcome) => last = format!("HTTP {}: {}", outcome.status, outcome.body),
            Err(error) => last = format!("{error:#}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sql = format!("SELECT count(*) FROM events WHERE event_id = '{stored_id}'");
    let remaining = deadline.saturating_duration_since(Instant::now());
    poll_until(remaining, || async {
        let n = query_count(query_addr, &sql).await?;
        anyhow::ensure!(n > 0, "probe {stored_id} not stored yet");
        Ok(())
    })
    .await
    .with_context(|| format!("probe {stored_id} acknowledged but not stored within {timeout:?}"))?;
    Ok(Probe {
        acked,
        recovered_in: fault_ended.elapsed(),
    })
}
