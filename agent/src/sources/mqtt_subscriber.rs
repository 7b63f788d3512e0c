//! MQTT subscriber source: one task per `[[sources.mqtt]]`, rumqttc with manual acks.
//!
//! The event loop task only polls the connection and hands publishes, in order, to a worker over
//! a bounded queue. The worker decodes them, commits the events to the buffer (several messages
//! per commit), and only then sends the PUBACKs, in the order the publishes arrived (MQTT 3.1.1
//! §4.6). A crash or a full buffer therefore leaves unacknowledged messages with the broker, which
//! redelivers them on the persistent session.
//!
//! A crash between our commit and the broker receiving the PUBACK makes the broker redeliver a
//! message we already stored, flagged DUP. Each commit records (subscriber, packet id, digest of
//! topic and payload) in the same transaction as the events; a DUP publish whose mark is found is
//! acknowledged without storing it again.
//!
//! The event loop never waits on the buffer. It must keep being polled while the buffer is full:
//! polling is what sends the PUBACKs the worker queues and the keep-alive pings, and a client
//! that sends nothing for 1.5 keep-alives is disconnected by the broker. So publishes go to the
//! worker over a queue the event loop never waits on: a message takes a permit first, out of as
//! many as the queue has slots (messages held: received, not yet acknowledged). With QoS 1 the
//! broker's own in-flight limit (MQTT 3.1.1 gives the client no say; Mosquitto's
//! `max_inflight_messages` defaults to 20) keeps that count small: a full buffer
//! stops the acknowledgements, and the broker stops sending. Only a QoS 0 flood into a full
//! buffer reaches the bound; then the event loop stops reading until the worker catches up.
//!
//! What waits at the broker can still be lost there, and MQTT 3.1.1 never tells the subscriber:
//! a broker drops queued messages beyond its per-client queue limit (Mosquitto's
//! `max_queued_messages`, default 1000), and forgets a whole session when it restarts without
//! persistence or expires it. Packet ids cannot show either (the broker assigns them to what it
//! sends, and reuses them), so no gap in the delivery marks reveals a drop. The one signal the
//! protocol gives is the CONNACK's session-present flag: `false` on a reconnect with a persistent
//! session that this process already had means the broker discarded the session and every
//! message it held. [`SourceHealth::connected`] counts that for the status and `/metrics`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, Packet, Publish, QoS, SubscribeFilter,
};
use runnel_config::MqttSourceConfig;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::buffer::{AppendError, Buffer, DeliveryMark, EncodedEvent};
use crate::decode::mqtt::TimeRule;
use crate::pipeline::PipelineHandle;

use super::mqtt_publish::{Intake, Pending, prepare};

/// Largest MQTT packet accepted from the broker: the wire format's event limit plus topic and
/// header room. Larger packets close the connection (rumqttc), so they stay at the broker.
const MAX_INCOMING_PACKET_BYTES: usize = runnel_common::limits::MAX_EVENT_BYTES + 64 * 1024;

/// Most publishes committed together.
const MAX_PUBLISHES_PER_COMMIT: usize = 512;

/// Most event bytes committed together: well below the smallest `buffer.max_bytes` (1 MiB), so a
/// batch always fits into a drained buffer and a full buffer cannot block it forever.
const MAX_COMMIT_BYTES: usize = 256 * 1024;

/// Wait before retrying a commit the buffer refused as full.
const FULL_RETRY_MS: u64 = 200;

/// A commit the buffer keeps refusing as full for this long is logged as a warning.
const FULL_WARN_AFTER: Duration = Duration::from_secs(10);

/// Least number of messages held between the event loop and the worker before the event loop
/// stops reading (see the module docs); the bound is the larger of this and 4 × `max_inflight`.
const MIN_HELD_MESSAGES: usize = 1024;

pub struct MqttSource {
    pub config: MqttSourceConfig,
    pub agent_id: String,
    pub buffer: Buffer,
    pub max_event_bytes: usize,
    /// Rules, windows and models every decoded message runs through before its commit.
    pub pipeline: PipelineHandle,
    /// Where this subscriber reports whether it reaches its broker.
    pub health: SourceHealth,
}

/// The connection state of every MQTT subscriber, by source name, for the agent's status (and
/// through it the fleet's health gate: a canary whose new broker cannot be reached fails).
///
/// A subscriber counts as healthy until its first attempt ends and while connected; it is
/// unhealthy from a failed attempt until the next `CONNACK`. When a config change restarts a
/// source, the newer run's reports win over what the stopping one still says.
#[derive(Debug, Clone, Default)]
pub struct SourceHealth(Arc<std::sync::Mutex<SourceHealthInner>>);

#[derive(Debug, Default)]
struct SourceHealthInner {
    next_run: u64,
    /// Source name -> (the run that reported, its state).
    sources: BTreeMap<String, (u64, SourceState)>,
    /// Source name -> what its CONNACKs said since the agent started (across config restarts).
    sessions: BTreeMap<String, SessionRecord>,
}

/// What one subscriber's CONNACKs told since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionRecord {
    /// The client id of the persistent session the broker created or resumed for this source in
    /// this process: a later CONNACK with this id must say session-present.
    persistent_client_id: Option<String>,
    /// CONNACKs received.
    pub n_connects: u64,
    /// The session-present flag of the last CONNACK.
    pub session_present: Option<bool>,
    /// Reconnects on which the broker had lost the persistent session (and the messages it
    /// queued for us).
    pub n_sessions_lost: u64,
    /// When the last such loss was seen, Unix epoch milliseconds.
    pub last_session_lost_unix_ms: Option<i64>,
}

/// What a CONNACK says about the broker's session for a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOutcome {
    /// `clean_session = true`: no session was asked for; nothing waits at the broker.
    Clean,
    /// A persistent session was resumed: what the broker queued comes now.
    Resumed,
    /// No session, and none was expected: this client id's first connection in this process.
    /// (After an agent restart this cannot tell a new client id from a broker that lost the
    /// session while the agent was stopped.)
    New,
    /// No session where this process had one: the broker discarded it, with every message it
    /// held for the subscriber.
    Lost,
}

/// The outcome of a CONNACK: `expected` is whether this process already had a persistent
/// session for the client id.
pub fn session_outcome(
    clean_session: bool,
    expected: bool,
    session_present: bool,
) -> SessionOutcome {
    match (clean_session, session_present, expected) {
        (true, _, _) => SessionOutcome::Clean,
        (false, true, _) => SessionOutcome::Resumed,
        (false, false, true) => SessionOutcome::Lost,
        (false, false, false) => SessionOutcome::New,
    }
}

/// One subscriber's connection state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceState {
    pub healthy: bool,
    /// Why it is unhealthy, or what it is doing.
    pub detail: String,
}

impl SourceHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, SourceHealthInner> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a new run of source `name` (state: connecting) and returns its run id.
    pub fn start(&self, name: &str, broker: &str) -> u64 {
        let mut inner = self.lock();
        inner.next_run += 1;
        let run = inner.next_run;
        let state = SourceState {
            healthy: true,
            detail: format!("connecting to {broker}"),
        };
        inner.sources.insert(name.to_owned(), (run, state));
        run
    }

    /// Records the state of run `run` of source `name`, unless a newer run has started.
    pub fn report(&self, name: &str, run: u64, healthy: bool, detail: String) {
        let mut inner = self.lock();
        let newer = inner
            .sources
            .get(name)
            .is_some_and(|(latest, _)| *latest > run);
        if !newer {
            inner
                .sources
                .insert(name.to_owned(), (run, SourceState { healthy, detail }));
        }
    }

    /// The state of source `name`, if it has run.
    pub fn get(&self, name: &str) -> Option<SourceState> {
        self.lock()
            .sources
            .get(name)
            .map(|(_, state)| state.clone())
    }

    /// Records a CONNACK of source `name` (connected as `client_id`) and says what it means for
    /// the messages the broker held.
    pub fn connected(
        &self,
        name: &str,
        client_id: &str,
        clean_session: bool,
        session_present: bool,
        now_unix_ms: i64,
    ) -> SessionOutcome {
        let mut inner = self.lock();
        let record = inner.sessions.entry(name.to_owned()).or_default();
        let expected = record.persistent_client_id.as_deref() == Some(client_id);
        let outcome = session_outcome(clean_session, expected, session_present);
        record.n_connects += 1;
        record.session_present = Some(session_present);
        record.persistent_client_id = (!clean_session).then(|| client_id.to_owned());
        if outcome == SessionOutcome::Lost {
            record.n_sessions_lost += 1;
            record.last_session_lost_unix_ms = Some(now_unix_ms);
        }
        outcome
    }

    /// What the CONNACKs of source `name` said, if it ever connected.
    pub fn session(&self, name: &str) -> Option<SessionRecord> {
        self.lock().sessions.get(name).cloned()
    }
}

/// Runs the subscriber until `shutdown`. Connection failures are logged and retried.
pub async fn run(source: MqttSource, mut shutdown: watch::Receiver<bool>) {
    let config = &source.config;
    let client_id = config
        .client_id
        .clone()
        .unwrap_or_else(|| format!("runnel-{}-{}", source.agent_id, config.name));
    let options = match options(config, &client_id) {
        Ok(options) => options,
        Err(error) => {
            tracing::error!(source = %config.name, error = format!("{error:#}"), "MQTT source not started");
            let run = source.health.start(&config.name, &config.host);
            source
                .health
                .report(&config.name, run, false, format!("not started: {error:#}"));
            return;
        }
    };
    // Acks go through this queue; the event loop drains it whenever it is polled, which is always.
    let request_capacity = usize::from(config.max_inflight) + 64;
    let (client, mut eventloop) = AsyncClient::new(options, request_capacity);
    let held_max = (4 * usize::from(config.max_inflight)).max(MIN_HELD_MESSAGES);
    let held = Arc::new(Semaphore::new(held_max));
    // Never full: a message needs a permit first, and there are as many permits as slots.
    let (to_worker, from_loop) = mpsc::channel::<(Publish, OwnedSemaphorePermit)>(held_max);
    let worker = tokio::spawn(worker(
        Arc::new(Intake {
            name: config.name.clone(),
            stream: config.stream.clone(),
            payload: config.payload,
            template: config.topic_template.clone(),
            time: TimeRule::from_config(config.time_field.as_deref(), config.time_unit),
            buffer: source.buffer.clone(),
            max_event_bytes: source.max_event_bytes,
            pipeline: source.pipeline.clone(),
        }),
        client.clone(),
        from_loop,
    ));
    let filters: Vec<SubscribeFilter> = config
        .topics
        .iter()
        .map(|topic| SubscribeFilter::new(topic.clone(), qos(config.qos)))
        .collect();
    let broker = format!("{}:{}", config.host, config.port);
    let run = source.health.start(&config.name, &broker);
    let mut delay_ms = config.reconnect_min_ms;
    let mut n_failures = 0u64;
    loop {
        let event = tokio::select! {
            event = eventloop.poll() => event,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        match event {
            Ok(MqttEvent::Incoming(Packet::ConnAck(connack))) => {
                tracing::info!(
                    source = %config.name,
                    broker = %broker,
                    client_id,
                    session_present = connack.session_present,
                    "MQTT connected"
                );
                delay_ms = config.reconnect_min_ms;
                n_failures = 0;
                let outcome = source.health.connected(
                    &config.name,
                    &client_id,
                    config.clean_session,
                    connack.session_present,
                    crate::now_unix_ms(),
                );
                match outcome {
                    SessionOutcome::Lost => tracing::warn!(
                        source = %config.name,
                        broker = %broker,
                        client_id,
                        "the broker lost this subscriber's persistent session (CONNACK without \
                         session-present): the messages it held for the agent are gone; check the \
                         broker's persistence and session expiry"
                    ),
                    SessionOutcome::New => tracing::info!(
                        source = %config.name,
                        client_id,
                        "the broker has no session for this client id yet (first connection, or \
                         lost while the agent was stopped); it keeps one from now on"
                    ),
                    SessionOutcome::Clean | SessionOutcome::Resumed => {}
                }
                source
                    .health
                    .report(&config.name, run, true, format!("connected to {broker}"));
                // Subscribing again on a persistent session is harmless and covers a broker that
                // lost the session.
                if let Err(error) = client.try_subscribe_many(filters.clone()) {
                    tracing::warn!(source = %config.name, %error, "MQTT subscribe not queued");
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(publish))) => {
                let permit = match Arc::clone(&held).try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        tracing::warn!(
                            source = %config.name,
                            held_max,
                            "MQTT source holds as many messages as it may while the buffer does \
                             not take them; not reading from the broker until it does"
                        );
                        tokio::select! {
                            permit = Arc::clone(&held).acquire_owned() => {
                                permit.expect("the semaphore is never closed")
                            }
                            _ = shutdown.wait_for(|stop| *stop) => break,
                        }
                    }
                };
                if to_worker.try_send((publish, permit)).is_err() {
                    // Closed (the worker ended); full cannot happen (see the channel's size).
                    break;
                }
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(suback))) => {
                let refused = suback
                    .return_codes
                    .iter()
                    .filter(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                    .count();
                if refused > 0 {
                    tracing::warn!(source = %config.name, refused, "broker refused topic filters");
                }
            }
            Ok(_) => {}
            Err(error) => {
                n_failures += 1;
                let jittered = delay_ms / 2 + fastrand::u64(0..=(delay_ms / 2).max(1));
                source.health.report(
                    &config.name,
                    run,
                    false,
                    format!("cannot reach {broker}: {error} ({n_failures} failed attempts)"),
                );
                if n_failures == 1 || n_failures.is_multiple_of(10) {
                    tracing::warn!(
                        source = %config.name,
                        broker = %broker,
                        %error,
                        n_failures,
                        retry_in_ms = jittered,
                        "MQTT connection failed"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(jittered)) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
                delay_ms = (delay_ms * 2).min(config.reconnect_max_ms);
            }
        }
    }
    drop(to_worker);
    // The worker finishes what it holds (commits, acks) before we disconnect.
    let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

fn qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn options(config: &MqttSourceConfig, client_id: &str) -> anyhow::Result<MqttOptions> {
    let mut options = MqttOptions::new(client_id, config.host.clone(), config.port);
    options
        .set_keep_alive(Duration::from_secs(config.keep_alive_s))
        .set_clean_session(config.clean_session)
        .set_manual_acks(true)
        .set_inflight(config.max_inflight)
        .set_max_packet_size(MAX_INCOMING_PACKET_BYTES, 64 * 1024);
    if let Some(username) = &config.username {
        options.set_credentials(
            username.clone(),
            config.password.clone().unwrap_or_default(),
        );
    }
    if config.tls {
        let ca = config.ca_cert.as_ref().context("mqtts:// needs ca_cert")?;
        options.set_transport(crate::tls::mqtt_tls_transport(ca)?);
    }
    Ok(options)
}

async fn worker(
    state: Arc<Intake>,
    client: AsyncClient,
    mut from_loop: mpsc::Receiver<(Publish, OwnedSemaphorePermit)>,
) {
    let mut batch: Vec<Pending> = Vec::new();
    let mut permits: Vec<OwnedSemaphorePermit> = Vec::new();
    while let Some(first) = from_loop.recv().await {
        let mut next = Some(first);
        let mut n_batch_bytes = 0usize;
        while let Some((publish, permit)) = next.take() {
            let pending = prepare(&state, publish).await;
            n_batch_bytes += pending.events.iter().map(|e| e.bytes.len()).sum::<usize>();
            batch.push(pending);
            permits.push(permit);
            if batch.len() < MAX_PUBLISHES_PER_COMMIT && n_batch_bytes < MAX_COMMIT_BYTES {
                next = from_loop.try_recv().ok();
            }
        }
        commit_and_ack(&state, &client, &mut batch).await;
        // The acks are queued: the event loop may read as many messages again.
        permits.clear();
    }
}

/// Commits the events of every pending publish in one transaction, then acks them in order.
/// Retries while the buffer is full: nothing is acknowledged that is not stored.
async fn commit_and_ack(state: &Intake, client: &AsyncClient, batch: &mut Vec<Pending>) {
    let mut events: Vec<EncodedEvent> = batch
        .iter_mut()
        .flat_map(|p| std::mem::take(&mut p.events))
        .collect();
    let marks: Vec<DeliveryMark> = batch.iter().filter_map(|p| p.mark.clone()).collect();
    if !events.is_empty() || !marks.is_empty() {
        let started = std::time::Instant::now();
        let mut warned = false;
        let events_len = events.len();
        loop {
            match state.buffer.append_marked(events, marks.clone()).await {
                Ok(_) => {
                    metrics::counter!("runnel_agent_events_received_total", "source" => "mqtt")
                        .increment(events_len as u64);
                    if warned {
                        tracing::info!(source = %state.name, waited_ms = started.elapsed().as_millis() as u64, "buffer has room again; MQTT messages stored and acknowledged");
                    }
                    break;
                }
                Err(AppendError::Full {
                    events: returned, ..
                }) => {
                    events = returned;
                    if !warned && started.elapsed() >= FULL_WARN_AFTER {
                        warned = true;
                        tracing::warn!(source = %state.name, n_messages = batch.len(), "buffer full for {FULL_WARN_AFTER:?}; MQTT messages stay unacknowledged at the broker until it has room");
                    } else {
                        tracing::debug!(source = %state.name, "buffer full; MQTT messages stay unacknowledged");
                    }
                    tokio::time::sleep(Duration::from_millis(FULL_RETRY_MS)).await;
                }
                Err(error) => {
                    // Not stored: do not ack. The broker redelivers on the next session.
                    tracing::warn!(source = %state.name, %error, n_messages = batch.len(), "MQTT messages not stored");
                    batch.clear();
                    return;
                }
            }
        }
    }
    for pending in batch.drain(..) {
        if pending.publish.qos != QoS::AtMostOnce
            && let Err(error) = client.ack(&pending.publish).await
        {
            tracing::debug!(source = %state.name, %error, "PUBACK not sent (the broker will redeliver; the mark prevents a duplicate)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_outcomes() {
        use SessionOutcome::*;
        assert_eq!(session_outcome(true, true, false), Clean);
        assert_eq!(session_outcome(true, false, true), Clean);
        assert_eq!(session_outcome(false, false, true), Resumed);
        assert_eq!(session_outcome(false, true, true), Resumed);
        assert_eq!(session_outcome(false, false, false), New);
        assert_eq!(session_outcome(false, true, false), Lost);
    }

    #[test]
    fn a_reconnect_without_the_session_counts_as_lost() {
        let health = SourceHealth::default();
        assert_eq!(health.session("plant"), None);
        // First connection in this process: no session is not a loss.
        assert_eq!(
            health.connected("plant", "c1", false, false, 10),
            SessionOutcome::New
        );
        assert_eq!(
            health.connected("plant", "c1", false, true, 20),
            SessionOutcome::Resumed
        );
        assert_eq!(health.session("plant").expect("record").n_sessions_lost, 0);
        // The broker restarted without persistence (or expired the session).
        assert_eq!(
            health.connected("plant", "c1", false, false, 30),
            SessionOutcome::Lost
        );
        let record = health.session("plant").expect("record");
        assert_eq!(
            (
                record.n_connects,
                record.n_sessions_lost,
                record.last_session_lost_unix_ms,
                record.session_present
            ),
            (3, 1, Some(30), Some(false))
        );
        // From then on the new session is the expected one.
        assert_eq!(
            health.connected("plant", "c1", false, true, 40),
            SessionOutcome::Resumed
        );
        // A config change to another client id starts a new session: not a loss.
        assert_eq!(
            health.connected("plant", "c2", false, false, 50),
            SessionOutcome::New
        );
        // A clean session expects nothing, and after it the persistent one is new again.
        assert_eq!(
            health.connected("plant", "c2", true, false, 60),
            SessionOutcome::Clean
        );
        assert_eq!(
            health.connected("plant", "c2", false, false, 70),
            SessionOutcome::New
        );
        assert_eq!(health.session("plant").expect("record").n_sessions_lost, 1);
        // Sources are counted apart.
        assert_eq!(health.session("yard"), None);
    }

    #[test]
    fn source_health_follows_the_newest_run() {
        let health = SourceHealth::default();
        assert_eq!(health.get("plant"), None);
        let old = health.start("plant", "10.0.0.1:1883");
        assert!(
            health.get("plant").expect("state").healthy,
            "connecting counts as healthy"
        );
        health.report("plant", old, false, "cannot reach 10.0.0.1:1883".into());
        assert!(!health.get("plant").expect("state").healthy);
        // A config change restarts the source: the new run reports; the old one, stopping,
        // cannot overwrite it.
        let new = health.start("plant", "10.0.0.2:1883");
        health.report("plant", old, false, "stale".into());
        let state = health.get("plant").expect("state");
        assert!(state.healthy);
        assert_eq!(state.detail, "connecting to 10.0.0.2:1883");
        health.report("plant", new, true, "connected to 10.0.0.2:1883".into());
        assert_eq!(
            health.get("plant").expect("state").detail,
            "connected to 10.0.0.2:1883"
        );
        // Another source is independent.
        let other = health.start("yard", "10.0.0.3:1883");
        health.report("yard", other, false, "down".into());
        assert!(health.get("plant").expect("state").healthy);
        assert!(!health.get("yard").expect("state").healthy);
    }
}
