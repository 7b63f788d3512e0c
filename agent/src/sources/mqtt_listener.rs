//! MQTT listener source: an MQTT 3.1.1 server on the agent that devices publish to directly, so an
//! edge host needs no separate broker (`[sources.mqtt_listener]`).
//!
//! Built on rumqttc's packet codec (`rumqttc::mqttbytes::v4`), not on a broker such as rumqttd: a
//! broker acknowledges a QoS 1 publish when it has it in memory, and our contract is that a PUBACK
//! means the event is committed to the buffer (ARCHITECTURE.md, "Guarantees", 1). Each connection
//! is one task that reads every packet already received, decodes the publishes exactly like the
//! subscriber ([`super::mqtt_publish::prepare`]: same payload formats, topic templates, dead
//! letters and size limit), commits them in one `append_marked` call, and only then writes their
//! PUBACKs, in order.
//!
//! While the buffer is full the task stops reading from its socket and retries the commit: the
//! device sees no PUBACK and TCP pushes back on it. A device that reconnects resends unacknowledged
//! publishes flagged DUP; every commit records (`listener:{client_id}`, packet id, digest of topic
//! and payload) with the events, so a resend of something already stored is acknowledged without
//! storing it twice. A new connection with the client id of a live one takes over (MQTT-3.1.4-2):
//! the old one is closed after its current commit, before the new one gets its CONNACK, so the
//! two never commit the same message concurrently.
//!
//! Architecture invariant: this is an ingest endpoint, not a broker. It keeps no sessions (CONNACK
//! always says `session_present = false`), forwards nothing, refuses every SUBSCRIBE filter,
//! ignores the retain flag and the last will, and does not support QoS 2 (such a publish closes
//! the connection). A bad packet closes only its own connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode,
    UnsubAck,
};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use runnel_common::log_limit::{LogLimit, LogLimiter};
use runnel_config::MqttListenerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::mqtt_publish::{Intake, Pending, prepare};
use crate::buffer::{AppendError, Buffer, EncodedEvent};
use crate::decode::mqtt::digest;

/// Largest MQTT packet accepted from a device: the wire format's event limit plus topic and
/// header room (as for the subscriber). A larger packet closes its connection before its payload
/// is read, so a device cannot make us hold more than this per connection.
pub const MAX_PACKET_BYTES: usize = runnel_common::limits::MAX_EVENT_BYTES + 64 * 1024;

/// A connection must send its CONNECT within this time, or it is closed: half-open connections
/// would otherwise hold one of `max_connections` forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most publishes committed together (as for the subscriber). Bounds a transaction and the time
/// before the first PUBACK of a burst.
const MAX_PUBLISHES_PER_COMMIT: usize = 512;

/// Wait before retrying a commit the buffer refused as full.
const FULL_RETRY_MS: u64 = 200;

/// A device that does not read its acknowledgements for this long is closed: a stuck socket must
/// not hold a connection slot (and its unacknowledged publishes) forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// On shutdown, connections get this long to finish their current commit and write its PUBACKs.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Longest client id accepted. The id is part of every delivery mark stored with the events;
/// MQTT only promises 23 bytes, so 256 is generous and keeps the marks table small.
const MAX_CLIENT_ID_BYTES: usize = 256;

/// Smallest read from a socket.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// At most this many connection warnings per window; the rest are counted and reported with the
/// next warning that is logged, so a misbehaving fleet cannot flood the log.
const MAX_WARNINGS_PER_WINDOW: u32 = 20;
const WARNING_WINDOW: Duration = Duration::from_secs(10);

/// What the listener needs from the agent.
pub struct MqttListener {
    pub config: MqttListenerConfig,
    pub buffer: Buffer,
    /// Encoded events larger than this become dead letters (`sources.http.max_event_bytes`).
    pub max_event_bytes: usize,
    /// Rules, windows and models every decoded publish runs through before its commit.
    pub pipeline: crate::pipeline::PipelineHandle,
}

/// Binds `sources.mqtt_listener.listen`. Separate from [`serve`] so that `run` fails on a bind
/// error and can report the bound address (port 0 in tests).
pub async fn bind(config: &MqttListenerConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("bind sources.mqtt_listener.listen = {}", config.listen))
}

/// Accepts devices until `shutdown`, then stops accepting, gives connections
/// [`SHUTDOWN_GRACE`] to finish their current commit, and closes the rest.
pub async fn serve(
    listener: TcpListener,
    source: MqttListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(source.config.max_connections));
    let shared = Arc::new(Shared {
        config: source.config,
        buffer: source.buffer,
        max_event_bytes: source.max_event_bytes,
        pipeline: source.pipeline,
        sessions: Sessions::default(),
        n_connections: AtomicU64::new(0),
        warnings: warning_limiter(),
        refusals: warning_limiter(),
    });
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                log_join(joined);
                continue;
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    if let Some(n_suppressed) = shared.refusals.allow(std::time::Instant::now()) {
                        tracing::warn!(
                            %peer,
                            max_connections = shared.config.max_connections,
                            n_suppressed,
                            "MQTT listener at sources.mqtt_listener.max_connections; connection closed"
                        );
                    }
                    drop(stream);
                    continue;
                };
                // PUBACKs are small and latency-bound.
                let _ = stream.set_nodelay(true);
                connections.spawn(connection(
                    Arc::clone(&shared),
                    stream,
                    peer,
                    shutdown.clone(),
                    permit,
                ));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                if let Some(n_suppressed) = shared.refusals.allow(std::time::Instant::now()) {
                    tracing::warn!(%error, n_suppressed, "MQTT listener accept failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(joined) = connections.join_next().await {
            log_join(joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            n_connections = connections.len(),
            "MQTT listener connections did not finish in time; closing them without further acks"
        );
        connections.shutdown().await;
    }
    tracing::debug!("MQTT listener stopped");
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        tracing::error!(%error, "MQTT listener connection task panicked");
    }
}

struct Shared {
    config: MqttListenerConfig,
    buffer: Buffer,
    max_event_bytes: usize,
    pipeline: crate::pipeline::PipelineHandle,
    sessions: Sessions,
    /// Numbers connections, for session ownership and ids of anonymous clients.
    n_connections: AtomicU64,
    warnings: LogLimiter,
    refusals: LogLimiter,
}

/// Why a connection ended. Variants for which [`Close::is_problem`] holds are logged as warnings.
#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("client sent DISCONNECT")]
    Disconnected,
    #[error("client closed the connection")]
    Eof,
    #[error("agent is shutting down")]
    Shutdown,
    #[error(
        "agent is shutting down while the buffer is full; {n_publishes} publishes left unacknowledged"
    )]
    ShutdownWhileFull { n_publishes: usize },
    #[error("a new connection with the same client id took over")]
    TakenOver,
    #[error("nothing received for {idle_ms} ms (1.5 × keep-alive)")]
    KeepAliveExpired { idle_ms: u64 },
    #[error("no CONNECT within {} s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("CONNECT refused: {0}")]
    Refused(String),
    #[error("socket: {0}")]
    Io(std::io::Error),
    #[error("client did not read its acknowledgements for {} s", WRITE_TIMEOUT.as_secs())]
    WriteTimeout,
    #[error("packet of {0} bytes is over the limit of {MAX_PACKET_BYTES} bytes")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(mqttbytes::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("QoS 2 publish on {topic} (only QoS 0 and 1 are supported)")]
    QoS2Unsupported { topic: String },
    #[error("publishes not stored, not acknowledged: {0}")]
    Storage(AppendError),
    #[error("encoding a reply: {0}")]
    Encode(mqttbytes::Error),
}

impl Close {
    fn is_problem(&self) -> bool {
        match self {
            Close::Disconnected
            | Close::Eof
            | Close::Shutdown
            | Close::TakenOver
            | Close::KeepAliveExpired { .. }
            | Close::ConnectTimeout
            | Close::Io(_) => false,
            Close::ShutdownWhileFull { .. }
            | Close::Refused(_)
            | Close::WriteTimeout
            | Close::TooLarge(_)
            | Close::Malformed(_)
            | Close::Protocol(_)
            | Close::QoS2Unsupported { .. }
            | Close::Storage(_)
            | Close::Encode(_) => true,
        }
    }
}

/// Turns a codec error into the reason a connection closes.
fn read_error(error: mqttbytes::Error) -> Close {
    match error {
        mqttbytes::Error::PayloadSizeLimitExceeded(n_bytes) => Close::TooLarge(n_bytes),
        other => Close::Malformed(other),
    }
}

/// One device connection: its socket and buffers.
struct Conn {
    stream: TcpStream,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

impl Conn {
    /// Reads at least one more byte. `Ok(0)` is end of stream. Cancel safe.
    async fn read_more(&mut self, n_needed: usize) -> std::io::Result<usize> {
        self.read_buf
            .reserve(n_needed.clamp(READ_CHUNK_BYTES, MAX_PACKET_BYTES + 8));
        self.stream.read_buf(&mut self.read_buf).await
    }

    fn queue(&mut self, packet: Packet) -> Result<(), Close> {
        packet
            .write(&mut self.write_buf, MAX_PACKET_BYTES)
            .map(|_| ())
            .map_err(Close::Encode)
    }

    async fn flush(&mut self) -> Result<(), Close> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&self.write_buf)).await {
            Ok(Ok(())) => {
                self.write_buf.clear();
                Ok(())
            }
            Ok(Err(error)) => Err(Close::Io(error)),
            Err(_) => Err(Close::WriteTimeout),
        }
    }
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let mut conn = Conn {
        stream,
        read_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
        write_buf: BytesMut::new(),
    };
    let connection_no = shared.n_connections.fetch_add(1, Ordering::Relaxed);
    let mut client_id = String::new();
    let close = serve_connection(
        &shared,
        &mut conn,
        connection_no,
        &mut client_id,
        &mut shutdown,
    )
    .await;
    // Best effort: whatever is queued (a refusing CONNACK) goes out before the socket closes.
    let _ = conn.flush().await;
    let _ = conn.stream.shutdown().await;
    if close.is_problem() {
        if let Some(n_suppressed) = shared.warnings.allow(std::time::Instant::now()) {
            tracing::warn!(
                client_id,
                %peer,
                error = %close,
                n_suppressed,
                "MQTT listener closed a connection"
            );
        }
    } else {
        tracing::debug!(client_id, %peer, reason = %close, "MQTT connection closed");
    }
}

/// Runs one connection from CONNECT to its end, which it returns.
async fn serve_connection(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    connection_no: u64,
    client_id_out: &mut String,
    shutdown: &mut watch::Receiver<bool>,
) -> Close {
    let first = tokio::select! {
        first = tokio::time::timeout(CONNECT_TIMEOUT, read_connect(conn)) => match first {
            Ok(Ok(first)) => first,
            Ok(Err(close)) => return close,
            Err(_) => return Close::ConnectTimeout,
        },
        _ = shutdown.wait_for(|stop| *stop) => return Close::Shutdown,
    };
    let connect = match first {
        FirstPacket::Connect(connect) if connect.protocol == Protocol::V4 => connect,
        FirstPacket::Connect(_) => {
            return refuse(
                conn,
                ConnectReturnCode::RefusedProtocolVersion,
                "protocol level 5; only MQTT 3.1.1 (level 4) is supported",
            );
        }
        FirstPacket::OtherProtocolLevel(level) => {
            return refuse(
                conn,
                ConnectReturnCode::RefusedProtocolVersion,
                &format!("protocol level {level}; only MQTT 3.1.1 (level 4) is supported"),
            );
        }
    };
    let anonymous = connect.client_id.is_empty();
    *client_id_out = if anonymous {
        format!("anonymous-{connection_no}")
    } else {
        connect.client_id.clone()
    };
    let client_id = client_id_out.as_str();
    if anonymous && !connect.clean_session {
        // MQTT-3.1.3-8: a session cannot be resumed without a client id.
        return refuse(
            conn,
            ConnectReturnCode::BadClientId,
            "an empty client id needs clean_session",
        );
    }
    if connect.client_id.len() > MAX_CLIENT_ID_BYTES {
        return refuse(
            conn,
            ConnectReturnCode::BadClientId,
            "client id is longer than 256 bytes",
        );
    }
    if let Some((code, reason)) = check_login(&shared.config, &connect) {
        return refuse(conn, code, reason);
    }

    // A live connection with this client id is closed first (after its current commit), so the
    // two never commit the same resent message at the same time. Anonymous clients have an id of
    // their own per connection: nothing to take over, and their delivery marks would be useless.
    let _registration;
    let _session_guard;
    let (_never_kicked, mut kicked) = watch::channel(false);
    if !anonymous {
        let (session_kicked, session_lock) = shared.sessions.register(client_id, connection_no);
        _registration = Registration {
            shared: Arc::clone(shared),
            client_id: client_id.to_owned(),
            owner: connection_no,
        };
        kicked = session_kicked;
        _session_guard = tokio::select! {
            guard = session_lock.lock_owned() => guard,
            _ = kicked.wait_for(|kick| *kick) => return Close::TakenOver,
            _ = shutdown.wait_for(|stop| *stop) => return Close::Shutdown,
        };
    }

    if let Err(close) = conn.queue(Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    ))) {
        return close;
    }
    if let Err(close) = conn.flush().await {
        return close;
    }
    tracing::debug!(
        client_id,
        keep_alive_s = connect.keep_alive,
        "MQTT client connected"
    );

    let state = Intake {
        name: format!("listener:{client_id}"),
        stream: shared.config.stream.clone(),
        payload: shared.config.payload,
        template: shared.config.topic_template.clone(),
        time: crate::decode::mqtt::TimeRule::from_config(
            shared.config.time_field.as_deref(),
            shared.config.time_unit,
        ),
        buffer: shared.buffer.clone(),
        max_event_bytes: shared.max_event_bytes,
        pipeline: shared.pipeline.clone(),
    };
    let mut session = Session {
        state,
        anonymous,
        idle_limit: (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
        subscribe_logged: false,
        full_logged: false,
    };
    session.run(conn, shutdown, &mut kicked).await
}

enum FirstPacket {
    Connect(Connect),
    /// A CONNECT of another MQTT version, answered with "unacceptable protocol version".
    OtherProtocolLevel(u8),
}

/// Reads the first packet, which must be a CONNECT.
async fn read_connect(conn: &mut Conn) -> Result<FirstPacket, Close> {
    loop {
        match mqttbytes::check(conn.read_buf.iter(), MAX_PACKET_BYTES) {
            Ok(_) => break,
            Err(mqttbytes::Error::InsufficientBytes(n_needed)) => {
                match conn.read_more(n_needed).await {
                    Ok(0) => return Err(Close::Eof),
                    Ok(_) => {}
                    Err(error) => return Err(Close::Io(error)),
                }
            }
            Err(error) => return Err(read_error(error)),
        }
    }
    // The v4 codec cannot parse the CONNECT of other versions (v5 adds properties), so the level
    // is read from the raw frame to answer them properly.
    if let Some(level) = connect_protocol_level(&conn.read_buf)
        && level != 4
    {
        return Ok(FirstPacket::OtherProtocolLevel(level));
    }
    match Packet::read(&mut conn.read_buf, MAX_PACKET_BYTES) {
        Ok(Packet::Connect(connect)) => Ok(FirstPacket::Connect(connect)),
        Ok(other) => Err(Close::Protocol(format!(
            "first packet is {} instead of CONNECT",
            packet_name(&other)
        ))),
        Err(error) => Err(read_error(error)),
    }
}

/// Queues a refusing CONNACK; the caller closes the connection after flushing it.
fn refuse(conn: &mut Conn, code: ConnectReturnCode, reason: &str) -> Close {
    match conn.queue(Packet::ConnAck(ConnAck::new(code, false))) {
        Ok(()) => Close::Refused(reason.to_owned()),
        Err(close) => close,
    }
}

/// The protocol level of a CONNECT frame whose protocol name is MQTT's ("MQTT", or "MQIsdp" for
/// 3.1), or `None` if `frame` does not start with one.
fn connect_protocol_level(frame: &[u8]) -> Option<u8> {
    if frame.first()? >> 4 != 1 {
        return None;
    }
    // Remaining length: 1 to 4 bytes, the high bit says another follows.
    let mut name_at = None;
    for idx in 1..=4 {
        if frame.get(idx)? & 0x80 == 0 {
            name_at = Some(idx + 1);
            break;
        }
    }
    let name_at = name_at?;
    let name_len = usize::from(u16::from_be_bytes([
        *frame.get(name_at)?,
        *frame.get(name_at + 1)?,
    ]));
    let name = frame.get(name_at + 2..name_at + 2 + name_len)?;
    if name != b"MQTT" && name != b"MQIsdp" {
        return None;
    }
    frame.get(name_at + 2 + name_len).copied()
}

/// Checks the credentials of a CONNECT against the configured ones; `Some` refuses it.
fn check_login(
    config: &MqttListenerConfig,
    connect: &Connect,
) -> Option<(ConnectReturnCode, &'static str)> {
    let (Some(username), Some(password)) = (&config.username, &config.password) else {
        return None;
    };
    let Some(login) = &connect.login else {
        return Some((
            ConnectReturnCode::NotAuthorized,
            "no user name and password (sources.mqtt_listener requires them)",
        ));
    };
    // Evaluate both comparisons: which of the two was wrong must not show in the timing.
    let username_ok = secrets_equal(username.as_bytes(), login.username.as_bytes());
    let password_ok = secrets_equal(password.as_bytes(), login.password.as_bytes());
    if username_ok & password_ok {
        None
    } else {
        Some((
            ConnectReturnCode::BadUserNamePassword,
            "wrong user name or password",
        ))
    }
}

/// Compares two secrets in time that depends on neither their contents nor their lengths: the
/// SHA-256 digests of both are compared with a fold instead of an early-exit `==`.
fn secrets_equal(expected: &[u8], given: &[u8]) -> bool {
    let expected = ring::digest::digest(&ring::digest::SHA256, expected);
    let given = ring::digest::digest(&ring::digest::SHA256, given);
    let difference = expected
        .as_ref()
        .iter()
        .zip(given.as_ref())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    difference == 0
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// A connected client, after its CONNACK.
struct Session {
    /// Decoding settings, and the delivery-mark source `listener:{client_id}`.
    state: Intake,
    anonymous: bool,
    /// 1.5 × the client's keep-alive; `None` when it asked for none.
    idle_limit: Option<Duration>,
    subscribe_logged: bool,
    full_logged: bool,
}

impl Session {
    async fn run(
        &mut self,
        conn: &mut Conn,
        shutdown: &mut watch::Receiver<bool>,
        kicked: &mut watch::Receiver<bool>,
    ) -> Close {
        let mut batch: Vec<Publish> = Vec::new();
        let mut last_heard = Instant::now();
        loop {
            // Take every complete packet already read: publishes are committed together.
            let mut control = None;
            let mut stop = None;
            let mut n_needed = 0;
            let mut n_packets = 0usize;
            while batch.len() < MAX_PUBLISHES_PER_COMMIT {
                match Packet::read(&mut conn.read_buf, MAX_PACKET_BYTES) {
                    Ok(Packet::Publish(publish)) => {
                        n_packets += 1;
                        match check_publish(&publish) {
                            Ok(()) => batch.push(publish),
                            Err(close) => {
                                stop = Some(close);
                                break;
                            }
                        }
                    }
                    Ok(packet) => {
                        n_packets += 1;
                        control = Some(packet);
                        break;
                    }
                    Err(mqttbytes::Error::InsufficientBytes(n)) => {
                        n_needed = n;
                        break;
                    }
                    Err(error) => {
                        stop = Some(read_error(error));
                        break;
                    }
                }
            }
            if n_packets > 0 {
                last_heard = Instant::now();
            }
            // Valid publishes read before a bad packet are still stored and acknowledged.
            if !batch.is_empty() {
                if let Err(close) = self
                    .commit_and_ack(conn, &mut batch, shutdown, kicked)
                    .await
                {
                    return close;
                }
                // We did not read while committing (perhaps for long, with a full buffer).
                last_heard = Instant::now();
            }
            if let Some(close) = stop {
                return close;
            }
            if let Some(packet) = control {
                if let Err(close) = self.answer(conn, packet).await {
                    return close;
                }
                continue;
            }
            if n_needed == 0 {
                // The batch was full; more packets are waiting in the read buffer.
                continue;
            }
            let idle_deadline = self.idle_limit.map(|limit| last_heard + limit);
            tokio::select! {
                read = conn.read_more(n_needed) => match read {
                    Ok(0) => return Close::Eof,
                    Ok(_) => {}
                    Err(error) => return Close::Io(error),
                },
                _ = sleep_until(idle_deadline) => {
                    let idle_ms = u64::try_from(last_heard.elapsed().as_millis()).unwrap_or(u64::MAX);
                    return Close::KeepAliveExpired { idle_ms };
                }
                _ = shutdown.wait_for(|stop| *stop) => return Close::Shutdown,
                _ = kicked.wait_for(|kick| *kick) => return Close::TakenOver,
            }
        }
    }

    /// Answers a packet other than PUBLISH, or ends the connection.
    async fn answer(&mut self, conn: &mut Conn, packet: Packet) -> Result<(), Close> {
        match packet {
            Packet::PingReq => conn.queue(Packet::PingResp)?,
            Packet::Subscribe(subscribe) => {
                if !self.subscribe_logged {
                    self.subscribe_logged = true;
                    tracing::debug!(
                        source = %self.state.name,
                        n_filters = subscribe.filters.len(),
                        "SUBSCRIBE refused: the MQTT listener only takes publishes"
                    );
                }
                let codes = vec![SubscribeReasonCode::Failure; subscribe.filters.len()];
                conn.queue(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))?;
            }
            Packet::Unsubscribe(unsubscribe) => {
                conn.queue(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)))?
            }
            Packet::Disconnect => return Err(Close::Disconnected),
            // QoS 2 flow and server-to-client packets have no place here.
            other => {
                return Err(Close::Protocol(format!(
                    "unexpected {} from a client",
                    packet_name(&other)
                )));
            }
        }
        conn.flush().await
    }

    /// Decodes and commits `batch` (emptying it), then acknowledges its QoS 1 publishes in order.
    /// While the buffer is full it retries and does not return: the connection is not read, so
    /// the device is pushed back on.
    async fn commit_and_ack(
        &mut self,
        conn: &mut Conn,
        batch: &mut Vec<Publish>,
        shutdown: &mut watch::Receiver<bool>,
        kicked: &mut watch::Receiver<bool>,
    ) -> Result<(), Close> {
        let mut pendings: Vec<Pending> = Vec::with_capacity(batch.len());
        for mut publish in batch.drain(..) {
            if self.anonymous {
                // Its id is new with every connection: no mark can match, none is worth keeping.
                publish.dup = false;
            }
            // A resend of a publish earlier in this batch: the buffer does not know it yet.
            if publish.dup && resent_within(&pendings, &publish) {
                pendings.push(Pending {
                    publish,
                    events: Vec::new(),
                    mark: None,
                });
                continue;
            }
            let mut pending = prepare(&self.state, publish).await;
            if self.anonymous {
                pending.mark = None;
            }
            pendings.push(pending);
        }

        // Commit the whole batch at once if it fits; when the buffer refuses, commit a smaller
        // front part (a batch may be larger than the free space, or than the whole buffer), and
        // wait while not even one publish fits.
        let mut start = 0;
        while start < pendings.len() {
            let mut end = pendings.len();
            loop {
                let chunk = &pendings[start..end];
                let events: Vec<EncodedEvent> = chunk
                    .iter()
                    .flat_map(|p| p.events.iter().cloned())
                    .collect();
                let marks: Vec<_> = chunk.iter().filter_map(|p| p.mark.clone()).collect();
                let n_events = events.len() as u64;
                let result = if events.is_empty() && marks.is_empty() {
                    Ok(())
                } else {
                    self.state
                        .buffer
                        .append_marked(events, marks)
                        .await
                        .map(|_| {
                            metrics::counter!(
                                "runnel_agent_events_received_total",
                                "source" => "mqtt_listener"
                            )
                            .increment(n_events);
                        })
                };
                match result {
                    Ok(()) => break,
                    Err(AppendError::Full { .. }) if end - start > 1 => {
                        end = start + (end - start) / 2;
                    }
                    Err(AppendError::Full { .. }) => {
                        if !self.full_logged {
                            self.full_logged = true;
                            tracing::debug!(source = %self.state.name, "buffer full; MQTT publishes stay unacknowledged");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(FULL_RETRY_MS)) => {}
                            _ = shutdown.wait_for(|stop| *stop) => {
                                return Err(Close::ShutdownWhileFull { n_publishes: pendings.len() - start });
                            }
                            _ = kicked.wait_for(|kick| *kick) => return Err(Close::TakenOver),
                        }
                    }
                    Err(error) => return Err(Close::Storage(error)),
                }
            }
            for pending in &pendings[start..end] {
                if pending.publish.qos == QoS::AtLeastOnce {
                    conn.queue(Packet::PubAck(PubAck::new(pending.publish.pkid)))?;
                }
            }
            conn.flush().await?;
            start = end;
        }
        Ok(())
    }
}

/// Whether `publish` (flagged DUP) repeats one already in `pendings`, same packet id and content.
fn resent_within(pendings: &[Pending], publish: &Publish) -> bool {
    if publish.qos != QoS::AtLeastOnce {
        return false;
    }
    let mut publish_digest = None;
    pendings.iter().any(|pending| {
        pending.publish.qos == QoS::AtLeastOnce
            && pending.publish.pkid == publish.pkid
            && pending.publish.topic == publish.topic
            && *publish_digest.get_or_insert_with(|| digest(&publish.topic, &publish.payload))
                == digest(&pending.publish.topic, &pending.publish.payload)
    })
}

/// Refuses what this endpoint does not take: QoS 2, and topics a client may not publish to.
fn check_publish(publish: &Publish) -> Result<(), Close> {
    if publish.qos == QoS::ExactlyOnce {
        return Err(Close::QoS2Unsupported {
            topic: publish.topic.clone(),
        });
    }
    if publish.topic.is_empty() || publish.topic.contains(['+', '#', '\0']) {
        // MQTT-3.3.2-2 and MQTT-4.7.3-1.
        return Err(Close::Protocol(format!(
            "PUBLISH topic {:?} is empty or has a wildcard",
            publish.topic
        )));
    }
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Live connections by client id, so a new connection can take over from an old one.
#[derive(Default)]
struct Sessions {
    by_client_id: std::sync::Mutex<HashMap<String, SessionSlot>>,
}

struct SessionSlot {
    /// The connection that owns the slot now.
    owner: u64,
    /// Set to true to close the owner.
    kick: watch::Sender<bool>,
    /// Held by the connection serving this client id; the next one waits for it.
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Sessions {
    /// Makes `owner` the connection of `client_id`, telling the one before it to close. Returns
    /// the receiver that tells `owner` to close in turn, and the lock to hold while serving.
    fn register(
        &self,
        client_id: &str,
        owner: u64,
    ) -> (watch::Receiver<bool>, Arc<tokio::sync::Mutex<()>>) {
        let (kick, kicked) = watch::channel(false);
        let mut slots = self
            .by_client_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let lock = match slots.get_mut(client_id) {
            Some(slot) => {
                slot.kick.send_replace(true);
                slot.owner = owner;
                slot.kick = kick;
                Arc::clone(&slot.lock)
            }
            None => {
                let lock = Arc::new(tokio::sync::Mutex::new(()));
                slots.insert(
                    client_id.to_owned(),
                    SessionSlot {
                        owner,
                        kick,
                        lock: Arc::clone(&lock),
                    },
                );
                lock
            }
        };
        (kicked, lock)
    }

    fn unregister(&self, client_id: &str, owner: u64) {
        let mut slots = self
            .by_client_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slots.get(client_id).is_some_and(|slot| slot.owner == owner) {
            slots.remove(client_id);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_client_id
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Removes a connection's slot when the connection ends, however it ends.
struct Registration {
    shared: Arc<Shared>,
    client_id: String,
    owner: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.sessions.unregister(&self.client_id, self.owner);
    }
}

/// Lets through [`MAX_WARNINGS_PER_WINDOW`] log lines per [`WARNING_WINDOW`] and counts the rest.
fn warning_limiter() -> LogLimiter {
    LogLimiter::new(LogLimit {
        max_lines: MAX_WARNINGS_PER_WINDOW,
        window: WARNING_WINDOW,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::{BufferThread, EncodedEvent};
    use proptest::prelude::*;
    use rumqttc::mqttbytes::v4::{Subscribe, Unsubscribe};
    use rumqttc::{AsyncClient, ConnectionError, MqttOptions};
    use runnel_common::{Event, SourceKind, Value};
    use runnel_config::{BufferConfig, MqttPayload, Synchronous, WhenFull};
    use tokio::sync::mpsc;

    /// How long a test waits for something that should happen.
    const DEADLINE: Duration = Duration::from_secs(10);

    fn listener_config() -> MqttListenerConfig {
        MqttListenerConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            username: None,
            password: None,
            stream: "telemetry".into(),
            payload: MqttPayload::Json,
            topic_template: Some("plant/{site}/{device}".into()),
            time_field: None,
            time_unit: "auto",
            max_connections: 16,
        }
    }

    fn buffer_config(dir: &std::path::Path, max_bytes: u64) -> BufferConfig {
        BufferConfig {
            path: dir.join("buffer.sqlite"),
            max_bytes,
            synchronous: Synchronous::Normal,
            when_full: WhenFull::Block,
            block_timeout_ms: 0,
            stream_priorities: Default::default(),
        }
    }

    /// A listener on a free port with a buffer in a temp dir.
    struct Harness {
        addr: SocketAddr,
        buffer: Buffer,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        _thread: BufferThread,
        _dir: tempfile::TempDir,
    }

    async fn start(config: MqttListenerConfig, max_bytes: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (buffer, thread) = Buffer::open(&buffer_config(dir.path(), max_bytes)).unwrap();
        let listener = bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            MqttListener {
                config,
                buffer: buffer.clone(),
                max_event_bytes: 64 * 1024,
                pipeline: crate::pipeline::PipelineHandle::new(
                    crate::pipeline::Pipeline::passthrough(),
                ),
            },
            shutdown,
        ));
        Harness {
            addr,
            buffer,
            stop,
            task,
            _thread: thread,
            _dir: dir,
        }
    }

    impl Harness {
        async fn events(&self) -> Vec<Event> {
            self.buffer
                .read_after(0, 100_000, usize::MAX)
                .await
                .unwrap()
        }

        /// Waits until the buffer holds `n` events and returns them.
        async fn wait_for_events(&self, n: usize) -> Vec<Event> {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let events = self.events().await;
                if events.len() >= n {
                    return events;
                }
                assert!(
                    Instant::now() < deadline,
                    "buffer has {} events, expected {n}: {events:?}",
                    events.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    type DeviceEvents = mpsc::Receiver<Result<rumqttc::Event, ConnectionError>>;

    /// A rumqttc client whose event loop runs in a task and reports into a channel.
    fn device(
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> (AsyncClient, DeviceEvents) {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        if let Some((username, password)) = login {
            options.set_credentials(username, password);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event).await.is_err() || failed {
                    break;
                }
            }
        });
        (client, rx)
    }

    /// The packet ids of the next `n` PUBACKs the device receives.
    async fn pubacks(events: &mut DeviceEvents, n: usize) -> Vec<u16> {
        let mut pkids = Vec::new();
        while pkids.len() < n {
            let event = tokio::time::timeout(DEADLINE, events.recv())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} PUBACKs: {pkids:?}", pkids.len()))
                .expect("event loop stopped");
            match event {
                Ok(rumqttc::Event::Incoming(Packet::PubAck(ack))) => pkids.push(ack.pkid),
                Ok(_) => {}
                Err(error) => panic!("device connection failed: {error}"),
            }
        }
        pkids
    }

    /// Whether the device receives a PUBACK within `window`.
    async fn puback_within(events: &mut DeviceEvents, window: Duration) -> bool {
        let until = Instant::now() + window;
        while let Ok(Some(event)) = tokio::time::timeout_at(until, events.recv()).await {
            match event {
                Ok(rumqttc::Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(error) => panic!("device connection failed: {error}"),
            }
        }
        false
    }

    /// An MQTT client on a raw socket, for packets rumqttc would not send (DUP, garbage).
    struct RawClient {
        stream: TcpStream,
        buf: BytesMut,
    }

    impl RawClient {
        async fn open(addr: SocketAddr) -> RawClient {
            RawClient {
                stream: TcpStream::connect(addr).await.unwrap(),
                buf: BytesMut::new(),
            }
        }

        async fn connected(addr: SocketAddr, client_id: &str) -> RawClient {
            let mut client = RawClient::open(addr).await;
            client
                .send(&[Packet::Connect(Connect::new(client_id))])
                .await;
            match client.recv().await {
                Some(Packet::ConnAck(ack)) => {
                    assert_eq!(ack.code, ConnectReturnCode::Success);
                    assert!(!ack.session_present);
                }
                other => panic!("expected CONNACK, got {other:?}"),
            }
            client
        }

        async fn send(&mut self, packets: &[Packet]) {
            let mut out = BytesMut::new();
            for packet in packets {
                packet.write(&mut out, usize::MAX).unwrap();
            }
            self.send_bytes(&out).await;
        }

        async fn send_bytes(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        /// The next packet, or `None` when the server closed the connection.
        async fn recv(&mut self) -> Option<Packet> {
            let deadline = Instant::now() + DEADLINE;
            loop {
                match Packet::read(&mut self.buf, usize::MAX) {
                    Ok(packet) => return Some(packet),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(error) => panic!("server sent a malformed packet: {error}"),
                }
                let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("no packet from the server in time");
                match read {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        }

        async fn expect_closed(&mut self) {
            if let Some(packet) = self.recv().await {
                panic!("expected the server to close the connection, got {packet:?}");
            }
        }
    }

    fn publish(topic: &str, payload: &[u8], pkid: u16, dup: bool) -> Packet {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        publish.pkid = pkid;
        publish.dup = dup;
        Packet::Publish(publish)
    }

    fn attr<'a>(event: &'a Event, key: &str) -> &'a Value {
        event
            .attrs
            .get(key)
            .unwrap_or_else(|| panic!("no attr {key} in {event:?}"))
    }

    #[tokio::test]
    async fn qos1_publishes_are_committed_then_acknowledged_in_order() {
        let harness = start(listener_config(), 1 << 20).await;
        let (client, mut events) = device(harness.addr, "press-line", None);
        for n in 0..5 {
            client
                .publish(
                    format!("plant/berlin/press-{n}"),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"n":{n},"temp":21.5}}"#),
                )
                .await
                .unwrap();
        }
        assert_eq!(pubacks(&mut events, 5).await, vec![1, 2, 3, 4, 5]);
        // Committed before acknowledged: no waiting here.
        let stored = harness.events().await;
        assert_eq!(stored.len(), 5, "{stored:?}");
        for (n, event) in stored.iter().enumerate() {
            assert_eq!(event.stream, "telemetry");
            assert_eq!(event.source, SourceKind::Mqtt);
            assert_eq!(event.name, format!("press-{n}"));
            assert_eq!(*attr(event, "n"), Value::Int(n as i64));
            assert_eq!(
                *attr(event, "topic"),
                Value::String(format!("plant/berlin/press-{n}"))
            );
            assert_eq!(*attr(event, "site"), Value::String("berlin".into()));
            assert_eq!(*attr(event, "device"), Value::String(format!("press-{n}")));
        }
        harness.stop.send_replace(true);
        tokio::time::timeout(DEADLINE, harness.task)
            .await
            .expect("listener stops on shutdown")
            .unwrap();
    }

    #[tokio::test]
    async fn qos0_is_stored_and_undecodable_payloads_become_dead_letters() {
        let harness = start(listener_config(), 1 << 20).await;
        let (client, _events) = device(harness.addr, "sensor", None);
        client
            .publish(
                "plant/hamburg/oven",
                rumqttc::QoS::AtMostOnce,
                false,
                r#"{"temp":180}"#,
            )
            .await
            .unwrap();
        client
            .publish(
                "plant/hamburg/oven",
                rumqttc::QoS::AtMostOnce,
                false,
                "not json",
            )
            .await
            .unwrap();
        let stored = harness.wait_for_events(2).await;
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[0].stream, "telemetry");
        assert_eq!(*attr(&stored[0], "temp"), Value::Int(180));
        assert_eq!(*attr(&stored[0], "site"), Value::String("hamburg".into()));
        assert_eq!(stored[1].stream, runnel_common::streams::DEAD_LETTERS);
        assert_eq!(stored[1].source, SourceKind::Mqtt);
        assert_eq!(
            *attr(&stored[1], "topic"),
            Value::String("plant/hamburg/oven".into())
        );
        let Value::String(reason) = attr(&stored[1], "reason") else {
            panic!("reason is a string")
        };
        assert!(reason.contains("plant/hamburg/oven"), "{reason}");
    }

    #[tokio::test]
    async fn the_configured_time_field_and_unit_give_the_event_time() {
        let config = MqttListenerConfig {
            time_field: Some("t".into()),
            time_unit: "s",
            ..listener_config()
        };
        let harness = start(config, 1 << 20).await;
        let (client, mut events) = device(harness.addr, "meter", None);
        for payload in [
            r#"{"t":1700000000,"ts":5,"kwh":3}"#,
            r#"{"kwh":4}"#,
            r#"{"t":"noon"}"#,
        ] {
            client
                .publish(
                    "plant/kiel/meter",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .unwrap();
        }
        assert_eq!(pubacks(&mut events, 3).await, vec![1, 2, 3]);
        let stored = harness.events().await;
        assert_eq!(stored.len(), 3, "{stored:?}");
        assert_eq!(stored[0].event_time_ms, 1_700_000_000_000, "t in seconds");
        assert_eq!(*attr(&stored[0], "ts"), Value::Int(5), "only `t` is read");
        assert!(!stored[0].attrs.contains_key("t"));
        assert_eq!(
            stored[1].event_time_ms, stored[1].receive_time_ms,
            "no time field: the receive time"
        );
        assert_eq!(stored[2].stream, runnel_common::streams::DEAD_LETTERS);
        let Value::String(reason) = attr(&stored[2], "reason") else {
            panic!("reason is a string")
        };
        assert!(
            reason.contains("field `t` must be a number of Unix seconds"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn credentials_are_checked() {
        let config = MqttListenerConfig {
            username: Some("device".into()),
            password: Some("s3cret".into()),
            ..listener_config()
        };
        let harness = start(config, 1 << 20).await;
        for (login, expected) in [
            (
                Some(("device", "wrong")),
                ConnectReturnCode::BadUserNamePassword,
            ),
            (
                Some(("other", "s3cret")),
                ConnectReturnCode::BadUserNamePassword,
            ),
            (None, ConnectReturnCode::NotAuthorized),
        ] {
            let (_client, mut events) = device(harness.addr, "intruder", login);
            let event = tokio::time::timeout(DEADLINE, events.recv())
                .await
                .unwrap()
                .unwrap();
            match event {
                Err(ConnectionError::ConnectionRefused(code)) => assert_eq!(code, expected),
                other => panic!("expected a refused connection, got {other:?}"),
            }
        }
        assert!(harness.events().await.is_empty());

        let (client, mut events) = device(harness.addr, "legit", Some(("device", "s3cret")));
        client
            .publish("plant/a/b", rumqttc::QoS::AtLeastOnce, false, "{}")
            .await
            .unwrap();
        assert_eq!(pubacks(&mut events, 1).await, vec![1]);
        assert_eq!(harness.events().await.len(), 1);
    }

    fn filler(n: i64) -> EncodedEvent {
        let mut attrs = std::collections::BTreeMap::new();
        attrs.insert("n".to_owned(), Value::Int(n));
        EncodedEvent::encode(&Event {
            seq: 0,
            event_time_ms: 1,
            receive_time_ms: 1,
            source: SourceKind::Http,
            stream: "filler".into(),
            name: "filler".into(),
            event_id: None,
            user_id: None,
            session_id: None,
            score: None,
            tags: Vec::new(),
            attrs,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn full_buffer_withholds_pubacks_until_stored_and_stores_once() {
        let harness = start(listener_config(), 4096).await;
        let mut n_fillers = 0;
        let mut last_filler_seq = 0;
        loop {
            match harness.buffer.append(vec![filler(n_fillers)]).await {
                Ok(appended) => {
                    last_filler_seq = appended.last_seq;
                    n_fillers += 1;
                }
                Err(AppendError::Full { .. }) => break,
                Err(error) => panic!("{error}"),
            }
        }
        assert!(n_fillers > 0);

        let (client, mut events) = device(harness.addr, "backpressured", None);
        // Each event is larger than a filler, so none fits in what is left.
        let padding = "x".repeat(200);
        for n in 0..3 {
            client
                .publish(
                    "plant/a/b",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"n":{n},"padding":"{padding}"}}"#),
                )
                .await
                .unwrap();
        }
        assert!(
            !puback_within(&mut events, Duration::from_millis(800)).await,
            "PUBACK while the buffer is full"
        );
        assert_eq!(harness.events().await.len() as i64, n_fillers);

        harness
            .buffer
            .delete_range(0, last_filler_seq)
            .await
            .unwrap();
        assert_eq!(pubacks(&mut events, 3).await, vec![1, 2, 3]);
        let stored = harness.events().await;
        let ns: Vec<&Value> = stored.iter().map(|e| attr(e, "n")).collect();
        assert_eq!(ns, vec![&Value::Int(0), &Value::Int(1), &Value::Int(2)]);
        // And nothing more arrives later.
        assert!(!puback_within(&mut events, Duration::from_millis(300)).await);
        assert_eq!(harness.events().await.len(), 3);
    }

    #[tokio::test]
    async fn batches_larger_than_the_free_space_are_committed_in_parts() {
        let harness = start(listener_config(), 2048).await;
        let mut client = RawClient::connected(harness.addr, "bulk").await;
        let padding = "y".repeat(300);
        // About 3.5 KB of events in one write: never fits in one commit of a 2 KB buffer.
        let packets: Vec<Packet> = (1..=10)
            .map(|n| {
                publish(
                    "plant/a/b",
                    format!(r#"{{"n":{n},"p":"{padding}"}}"#).as_bytes(),
                    n,
                    false,
                )
            })
            .collect();
        client.send(&packets).await;
        let mut acked = Vec::new();
        let mut last_deleted = 0;
        while acked.len() < 10 {
            // Acks come as room is made; drain what is stored like the uplink would.
            match tokio::time::timeout(Duration::from_millis(300), client.recv()).await {
                Ok(Some(Packet::PubAck(ack))) => acked.push(ack.pkid),
                Ok(other) => panic!("expected PUBACK, got {other:?}"),
                Err(_) => {
                    let head = harness.buffer.contents().borrow().last_seq;
                    harness
                        .buffer
                        .delete_range(last_deleted, head)
                        .await
                        .unwrap();
                    last_deleted = head;
                }
            }
        }
        assert_eq!(acked, (1..=10).collect::<Vec<u16>>());
    }

    #[tokio::test]
    async fn dup_redelivery_of_a_stored_publish_is_acknowledged_not_stored_again() {
        let harness = start(listener_config(), 1 << 20).await;
        let mut client = RawClient::connected(harness.addr, "dup-device").await;
        client
            .send(&[publish("plant/a/b", br#"{"v":1}"#, 7, false)])
            .await;
        assert_eq!(client.recv().await, Some(Packet::PubAck(PubAck::new(7))));
        assert_eq!(harness.events().await.len(), 1);

        // The PUBACK was "lost": the device resends on the same connection...
        client
            .send(&[publish("plant/a/b", br#"{"v":1}"#, 7, true)])
            .await;
        assert_eq!(client.recv().await, Some(Packet::PubAck(PubAck::new(7))));
        assert_eq!(harness.events().await.len(), 1);

        // ...and after reconnecting.
        drop(client);
        let mut client = RawClient::connected(harness.addr, "dup-device").await;
        client
            .send(&[publish("plant/a/b", br#"{"v":1}"#, 7, true)])
            .await;
        assert_eq!(client.recv().await, Some(Packet::PubAck(PubAck::new(7))));
        assert_eq!(harness.events().await.len(), 1);

        // Same packet id, other content: a new message.
        client
            .send(&[publish("plant/a/b", br#"{"v":2}"#, 7, true)])
            .await;
        assert_eq!(client.recv().await, Some(Packet::PubAck(PubAck::new(7))));
        assert_eq!(harness.events().await.len(), 2);

        // A resend in the same read as the original (one commit): stored once, acked twice.
        client
            .send(&[
                publish("plant/a/b", br#"{"v":3}"#, 9, false),
                publish("plant/a/b", br#"{"v":3}"#, 9, true),
            ])
            .await;
        assert_eq!(client.recv().await, Some(Packet::PubAck(PubAck::new(9))));
        assert_eq!(client.recv().await, Some(Packet::PubAck(PubAck::new(9))));
        let stored = harness.events().await;
        let vs: Vec<&Value> = stored.iter().map(|e| attr(e, "v")).collect();
        assert_eq!(vs, vec![&Value::Int(1), &Value::Int(2), &Value::Int(3)]);

        // Another client's marks are its own.
        let mut other = RawClient::connected(harness.addr, "other-device").await;
        other
            .send(&[publish("plant/a/b", br#"{"v":1}"#, 7, true)])
            .await;
        assert_eq!(other.recv().await, Some(Packet::PubAck(PubAck::new(7))));
        assert_eq!(harness.events().await.len(), 4);
    }

    #[tokio::test]
    async fn garbage_closes_only_its_own_connection() {
        let harness = start(listener_config(), 1 << 20).await;
        let (client, mut events) = device(harness.addr, "good", None);
        client
            .publish("plant/a/b", rumqttc::QoS::AtLeastOnce, false, r#"{"k":1}"#)
            .await
            .unwrap();
        assert_eq!(pubacks(&mut events, 1).await, vec![1]);

        // Garbage instead of CONNECT.
        let mut raw = RawClient::open(harness.addr).await;
        raw.send_bytes(&[0xff; 16]).await;
        raw.expect_closed().await;
        // Garbage after a good CONNECT, behind a valid publish that is still stored.
        let mut raw = RawClient::connected(harness.addr, "bad").await;
        let mut bytes = BytesMut::new();
        publish("plant/x/y", br#"{"k":2}"#, 1, false)
            .write(&mut bytes, usize::MAX)
            .unwrap();
        bytes.extend_from_slice(&[0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff]);
        raw.send_bytes(&bytes).await;
        assert_eq!(raw.recv().await, Some(Packet::PubAck(PubAck::new(1))));
        raw.expect_closed().await;
        // A packet over the size limit is refused from its header alone.
        let mut raw = RawClient::connected(harness.addr, "huge").await;
        let mut header = vec![0x32];
        let mut len = MAX_PACKET_BYTES + 1;
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            header.push(byte);
            if len == 0 {
                break;
            }
        }
        raw.send_bytes(&header).await;
        raw.expect_closed().await;

        // The good client was not disturbed.
        client
            .publish("plant/a/b", rumqttc::QoS::AtLeastOnce, false, r#"{"k":3}"#)
            .await
            .unwrap();
        assert_eq!(pubacks(&mut events, 1).await, vec![2]);
        let stored = harness.events().await;
        let ks: Vec<&Value> = stored.iter().map(|e| attr(e, "k")).collect();
        assert_eq!(ks, vec![&Value::Int(1), &Value::Int(2), &Value::Int(3)]);
    }

    #[tokio::test]
    async fn unsupported_requests_get_their_answers() {
        let harness = start(listener_config(), 1 << 20).await;
        let mut client = RawClient::connected(harness.addr, "curious").await;
        client.send(&[Packet::PingReq]).await;
        assert_eq!(client.recv().await, Some(Packet::PingResp));
        let mut subscribe = Subscribe::new("plant/#", QoS::AtLeastOnce);
        subscribe.add("other".into(), QoS::AtMostOnce);
        subscribe.pkid = 3;
        client.send(&[Packet::Subscribe(subscribe)]).await;
        assert_eq!(
            client.recv().await,
            Some(Packet::SubAck(SubAck::new(
                3,
                vec![SubscribeReasonCode::Failure; 2]
            )))
        );
        let mut unsubscribe = Unsubscribe::new("plant/#");
        unsubscribe.pkid = 4;
        client.send(&[Packet::Unsubscribe(unsubscribe)]).await;
        assert_eq!(
            client.recv().await,
            Some(Packet::UnsubAck(UnsubAck::new(4)))
        );
        client.send(&[Packet::Disconnect]).await;
        client.expect_closed().await;

        // QoS 2 is refused by closing the connection; nothing is stored.
        let mut client = RawClient::connected(harness.addr, "qos2").await;
        let mut qos2 = Publish::new("plant/a/b", QoS::ExactlyOnce, b"{}".to_vec());
        qos2.pkid = 1;
        client.send(&[Packet::Publish(qos2)]).await;
        client.expect_closed().await;
        // So are wildcards in a topic.
        let mut client = RawClient::connected(harness.addr, "wild").await;
        client.send(&[publish("plant/+/b", b"{}", 1, false)]).await;
        client.expect_closed().await;
        assert!(harness.events().await.is_empty());

        // MQTT 5 (and 3.1) CONNECTs are answered "unacceptable protocol version".
        let mut client = RawClient::open(harness.addr).await;
        let connect = Connect {
            protocol: Protocol::V5,
            ..Connect::new("v5")
        };
        client.send(&[Packet::Connect(connect)]).await;
        assert_eq!(
            client.recv().await,
            Some(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::RefusedProtocolVersion,
                false
            )))
        );
        client.expect_closed().await;

        // An empty client id needs a clean session.
        let mut client = RawClient::open(harness.addr).await;
        let connect = Connect {
            clean_session: false,
            ..Connect::new("")
        };
        client.send(&[Packet::Connect(connect)]).await;
        assert_eq!(
            client.recv().await,
            Some(Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::BadClientId,
                false
            )))
        );
        // With one, it is served (without delivery marks).
        let mut client = RawClient::connected(harness.addr, "").await;
        client.send(&[publish("plant/a/b", b"{}", 1, true)]).await;
        assert_eq!(client.recv().await, Some(Packet::PubAck(PubAck::new(1))));
        assert_eq!(harness.events().await.len(), 1);
    }

    #[tokio::test]
    async fn a_new_connection_with_the_same_client_id_takes_over() {
        let harness = start(listener_config(), 1 << 20).await;
        let mut old = RawClient::connected(harness.addr, "twin").await;
        let mut new = RawClient::connected(harness.addr, "twin").await;
        old.expect_closed().await;
        new.send(&[publish("plant/a/b", b"{}", 1, false)]).await;
        assert_eq!(new.recv().await, Some(Packet::PubAck(PubAck::new(1))));
        // The new owner's slot survives the old connection's end: a third connection still takes
        // over cleanly.
        let mut third = RawClient::connected(harness.addr, "twin").await;
        new.expect_closed().await;
        third.send(&[Packet::PingReq]).await;
        assert_eq!(third.recv().await, Some(Packet::PingResp));
    }

    #[tokio::test]
    async fn silent_clients_are_closed_after_one_and_a_half_keep_alives() {
        let harness = start(listener_config(), 1 << 20).await;
        let mut client = RawClient::open(harness.addr).await;
        let connect = Connect {
            keep_alive: 1,
            ..Connect::new("sleepy")
        };
        client.send(&[Packet::Connect(connect)]).await;
        assert!(matches!(client.recv().await, Some(Packet::ConnAck(_))));
        let started = Instant::now();
        client.expect_closed().await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1400),
            "closed after {waited:?}"
        );
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed() {
        let config = MqttListenerConfig {
            max_connections: 2,
            ..listener_config()
        };
        let harness = start(config, 1 << 20).await;
        let _first = RawClient::connected(harness.addr, "one").await;
        let mut second = RawClient::connected(harness.addr, "two").await;
        let mut third = RawClient::open(harness.addr).await;
        third.send(&[Packet::Connect(Connect::new("three"))]).await;
        third.expect_closed().await;
        // A freed slot is usable again.
        second.send(&[Packet::Disconnect]).await;
        second.expect_closed().await;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let mut fourth = RawClient::open(harness.addr).await;
            fourth.send(&[Packet::Connect(Connect::new("four"))]).await;
            if let Some(Packet::ConnAck(ack)) = fourth.recv().await {
                assert_eq!(ack.code, ConnectReturnCode::Success);
                break;
            }
            assert!(Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn shutdown_closes_connections() {
        let harness = start(listener_config(), 1 << 20).await;
        let mut client = RawClient::connected(harness.addr, "stay").await;
        harness.stop.send_replace(true);
        client.expect_closed().await;
        tokio::time::timeout(DEADLINE, harness.task)
            .await
            .expect("listener stops")
            .unwrap();
        assert!(TcpStream::connect(harness.addr).await.is_err());
    }

    #[tokio::test]
    async fn bind_errors_name_the_key() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = MqttListenerConfig {
            listen: taken.local_addr().unwrap(),
            ..listener_config()
        };
        let error = bind(&config).await.unwrap_err();
        assert!(
            format!("{error:#}").starts_with("bind sources.mqtt_listener.listen = 127.0.0.1:"),
            "{error:#}"
        );
    }

    #[test]
    fn protocol_levels_are_read_from_raw_connects() {
        let mut bytes = BytesMut::new();
        Packet::Connect(Connect::new("x"))
            .write(&mut bytes, usize::MAX)
            .unwrap();
        assert_eq!(connect_protocol_level(&bytes), Some(4));
        let mut bytes = BytesMut::new();
        Packet::Connect(Connect {
            protocol: Protocol::V5,
            ..Connect::new("x")
        })
        .write(&mut bytes, usize::MAX)
        .unwrap();
        assert_eq!(connect_protocol_level(&bytes), Some(5));
        // MQTT 3.1.
        let v31 = [
            0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 10, 0, 0,
        ];
        assert_eq!(connect_protocol_level(&v31), Some(3));
        assert_eq!(
            connect_protocol_level(&[0x10, 0x80, 0x80, 0x80, 0x80, 0]),
            None
        );
        assert_eq!(connect_protocol_level(&[0x30, 2, 0, 0]), None);
        assert_eq!(connect_protocol_level(&[]), None);
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(secrets_equal(b"s3cret", b"s3cret"));
        assert!(!secrets_equal(b"s3cret", b"s3creT"));
        assert!(!secrets_equal(b"s3cret", b"s3cre"));
        assert!(!secrets_equal(b"", b"x"));
        assert!(secrets_equal(b"", b""));
    }

    #[test]
    fn log_limiter_counts_what_it_suppresses() {
        let limiter = warning_limiter();
        let t0 = std::time::Instant::now();
        for _ in 0..MAX_WARNINGS_PER_WINDOW {
            assert_eq!(limiter.allow(t0), Some(0));
        }
        assert_eq!(limiter.allow(t0), None);
        assert_eq!(limiter.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.allow(t0 + WARNING_WINDOW), Some(2));
        assert_eq!(limiter.allow(t0 + WARNING_WINDOW), Some(0));
    }

    #[tokio::test]
    async fn sessions_kick_the_previous_owner_and_forget_ended_ones() {
        let sessions = Sessions::default();
        let (mut first_kicked, lock) = sessions.register("dev", 1);
        let guard = Arc::clone(&lock).lock_owned().await;
        let (second_kicked, second_lock) = sessions.register("dev", 2);
        assert!(*first_kicked.borrow_and_update());
        assert!(!*second_kicked.borrow());
        assert!(Arc::ptr_eq(&lock, &second_lock));
        assert!(second_lock.try_lock().is_err(), "the first still holds it");
        drop(guard);
        assert!(second_lock.try_lock().is_ok());
        // The first ending does not remove the second's slot.
        sessions.unregister("dev", 1);
        assert_eq!(sessions.len(), 1);
        sessions.unregister("dev", 2);
        assert_eq!(sessions.len(), 0);
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = connect_protocol_level(&bytes);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                match Packet::read(&mut buf, MAX_PACKET_BYTES) {
                    Ok(Packet::Publish(publish)) => { let _ = check_publish(&publish); }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
}
