//! The ingest server: QUIC with mutual TLS, one connection per agent.
//!
//! An agent's identity is the common name of the client certificate it proved it holds, checked
//! against the fleet CA during the handshake; nothing an agent sends can change it. A handshake
//! that fails (no certificate, another CA, expired) is logged with the reason and never reaches
//! this code's stream handling.
//!
//! Per connection: the first bidirectional stream is the control stream (Hello -> Welcome, then
//! heartbeats or statuses). Every further bidirectional stream carries one batch and gets one
//! ack. What the control stream may carry, whether a Hello is refused and what the Welcome says
//! are decided by [`IngestHandshake`] and [`IngestSession`] in `runnel_common::session`; this
//! module reads and writes the frames, looks up the high-water mark and enforces the timeouts.
//! Streams are read concurrently; a per-connection [`IngestSequencer`] hands batches to the WAL
//! writer in chain order; the ack is written after the WAL commit. A malformed frame or batch closes that
//! connection only. Each connection registers in [`crate::registry`] after its Welcome (who,
//! from where, what it stored and reports) and wakes the fleet driver, which decides on what the
//! registry holds; this module only writes it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use runnel_common::batch;
use runnel_common::frame;
use runnel_common::limits::{MAX_CONTROL_FRAME_BYTES, MAX_FRAME_BYTES};
use runnel_common::log_limit::{LogLimit, LogLimiter};
use runnel_common::session::{
    IngestHandshake, IngestSequencer, IngestSession, Report, WelcomeTerms,
};
use runnel_common::wire::{
    Ack, AckMessage, AckOutcome, AgentMessage, AggregatorMessage, BatchMessage,
};
use runnel_config::IngestConfig;
use runnel_service::tls;
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::registry::{AgentConnection, ConnectedAgents, FleetEvent, NewConnection};
use crate::wal::{CommitError, CommitOutcome, CommitRequest, Wal};

/// How long an agent has to send its Hello after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Messages waiting for the control stream's writer (config pushes): a push is large and rare.
const CONTROL_QUEUE: usize = 4;

/// QUIC application error codes we close connections with.
const CLOSE_PROTOCOL_ERROR: u32 = 1;
const CLOSE_SHUTDOWN: u32 = 2;

pub fn server_config(config: &IngestConfig) -> anyhow::Result<quinn::ServerConfig> {
    let roots = tls::root_store(&config.ca_cert, "ingest.ca_cert")?;
    let chain = tls::load_certs(&config.cert).context("ingest.cert")?;
    let key = tls::load_key(&config.key).context("ingest.key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .context("client certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| {
            format!(
                "ingest.cert {} and ingest.key {} do not match",
                config.cert.display(),
                config.key.display()
            )
        })?;
    tls.alpn_protocols = vec![runnel_common::wire::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("QUIC TLS configuration")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // One stream per in-flight batch plus the control stream.
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(
        config.max_in_flight_batches as u32 + 1,
    ));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms))
            .context("ingest.idle_timeout_ms")?,
    ));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Binds the ingest endpoint.
///
/// The stateless-reset key and the connection-id key are derived from the server's private key,
/// so they are the same after a restart: packets of a connection the previous process had are answered with a reset the agent
/// recognises, and agents reconnect at once instead of waiting out their idle timeout.
pub fn endpoint(config: &IngestConfig) -> anyhow::Result<quinn::Endpoint> {
    let server_config = server_config(config)?;
    let key_pem = std::fs::read(&config.key)
        .with_context(|| format!("read ingest.key {}", config.key.display()))?;
    let mut material = b"runnel stateless reset v1\0".to_vec();
    material.extend_from_slice(&key_pem);
    let secret = ring::digest::digest(&ring::digest::SHA256, &material);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref());
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // Connection ids are validated with a keyed hash; a random key per process would make the
    // restarted endpoint drop the old connections' packets as invalid instead of resetting them.
    let cid_key = u64::from_le_bytes(
        secret.as_ref()[..8]
            .try_into()
            .expect("SHA-256 is 32 bytes"),
    );
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = bind_udp(config.listen)
        .with_context(|| format!("bind ingest.listen = {} (UDP)", config.listen))?;
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
        .with_context(|| format!("start QUIC on {}", config.listen))
}

/// Receive buffer asked for on the ingest socket. Linux's default (208 KiB) overflows when
/// many agents' batches arrive at once: every datagram dropped there is a QUIC loss, which
/// halves a sender's congestion window. quic-go asks for about as much, for the same reason.
pub const UDP_RECEIVE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds the ingest UDP socket with a [`UDP_RECEIVE_BUFFER_BYTES`] receive buffer, or as much
/// as the kernel allows (`net.core.rmem_max`), and says so when it got less.
fn bind_udp(listen: std::net::SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Best effort: the kernel caps the size silently and the socket works either way.
    let _ = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER_BYTES);
    let reported = socket.recv_buffer_size().unwrap_or(0);
    // Linux reports twice the size it grants (the doubling covers its bookkeeping).
    let granted = if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    };
    if granted < UDP_RECEIVE_BUFFER_BYTES {
        tracing::info!(
            granted_bytes = granted,
            wanted_bytes = UDP_RECEIVE_BUFFER_BYTES,
            "the ingest UDP receive buffer is smaller than wanted; bursts from many agents may be \
             dropped (QUIC resends them, slower). Raise it with `sysctl -w net.core.rmem_max={}`",
            UDP_RECEIVE_BUFFER_BYTES
        );
    }
    socket.bind(&listen.into())?;
    Ok(socket.into())
}

/// Refused handshakes: one log line per peer address and reason every 10 seconds at most, with
/// the count held back, so an agent retrying a bad handshake cannot flood the log nor hide
/// another peer's refusal.
static REFUSALS: std::sync::LazyLock<LogLimiter> = std::sync::LazyLock::new(|| {
    LogLimiter::new(LogLimit {
        max_lines: 1,
        window: Duration::from_secs(10),
    })
});

/// Runs the accept loop until `shutdown`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    config: IngestConfig,
    wal: Wal,
    agents: Arc<ConnectedAgents>,
    mut shutdown: watch::Receiver<bool>,
) {
    let connections = Arc::new(Semaphore::new(config.max_connections));
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), max = config.max_connections, "refusing connection: ingest.max_connections reached");
            incoming.refuse();
            continue;
        };
        let wal = wal.clone();
        let agents = Arc::clone(&agents);
        let window = config.max_in_flight_batches;
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => {
                    if let Err(error) =
                        handle_connection(connection, remote, wal, agents, window).await
                    {
                        tracing::info!(%remote, error = format!("{error:#}"), "agent connection ended");
                    }
                }
                Err(error) => {
                    let key = format!("{} {error}", remote.ip());
                    if let Some(n_suppressed) = REFUSALS.allow_key(&key, Instant::now()) {
                        tracing::warn!(%remote, %error, n_suppressed, "agent connection refused during the TLS handshake");
                    }
                }
            }
            drop(permit);
        });
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"aggregator shutting down");
}

/// The agent id from the verified client certificate's common name.
fn agent_id(connection: &quinn::Connection) -> anyhow::Result<Arc<str>> {
    let identity = connection
        .peer_identity()
        .context("no peer identity after the handshake")?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("peer identity is not a certificate chain"))?;
    let cert = certs.first().context("peer sent no certificate")?;
    let cn = tls::common_name(cert).context("agent certificate")?;
    crate::certs::validate_agent_id(&cn)?;
    Ok(Arc::from(cn))
}

type Pending = (
    CommitRequest,
    oneshot::Sender<Result<CommitOutcome, CommitError>>,
);

async fn handle_connection(
    connection: quinn::Connection,
    remote: SocketAddr,
    wal: Wal,
    agents: Arc<ConnectedAgents>,
    window: usize,
) -> anyhow::Result<()> {
    let agent_id = match agent_id(&connection) {
        Ok(id) => id,
        Err(error) => {
            tracing::warn!(%remote, error = format!("{error:#}"), "agent refused: bad identity");
            connection.close(CLOSE_PROTOCOL_ERROR.into(), b"bad identity");
            return Ok(());
        }
    };
    let (mut control_send, mut control_recv) =
        tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
            .await
            .context("no control stream in time")?
            .context("accept control stream")?;
    let first = tokio::time::timeout(
        HELLO_TIMEOUT,
        read_frame::<AgentMessage>(&mut control_recv, MAX_CONTROL_FRAME_BYTES),
    )
    .await
    .context("no hello in time")??;
    let accepted = match IngestHandshake::new(&*agent_id).on_hello(first) {
        Ok(accepted) => accepted,
        Err(refusal) => {
            if let Some(reply) = refusal.reply() {
                let _ = write_frame(&mut control_send, &reply, MAX_CONTROL_FRAME_BYTES).await;
                let _ = control_send.finish();
                // Time for the reason to leave before the close discards unsent stream data.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            connection.close(
                CLOSE_PROTOCOL_ERROR.into(),
                refusal.close_reason().as_bytes(),
            );
            anyhow::bail!("agent {agent_id}: {}", refusal.error);
        }
    };
    let high_water_mark = wal.high_water_mark(Arc::clone(&agent_id)).await?;
    let terms = WelcomeTerms {
        max_in_flight_batches: window as u32,
        heartbeat_interval_ms: agents.heartbeat_interval_ms(),
        aggregator_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let (welcome, mut session) = accepted.welcome(high_water_mark, &terms);
    write_frame(
        &mut control_send,
        &AggregatorMessage::Welcome(welcome),
        MAX_CONTROL_FRAME_BYTES,
    )
    .await?;
    // Protocol 4: the agent names its delivered mark before any batch; batch streams are not
    // accepted before it is read, so none reaches the sequencer first.
    if session.awaiting_resume() {
        let message = tokio::time::timeout(
            HELLO_TIMEOUT,
            read_frame::<AgentMessage>(&mut control_recv, MAX_CONTROL_FRAME_BYTES),
        )
        .await
        .context("no resume in time")??;
        let chain_start = match session.on_resume(message) {
            Ok(chain_start) => chain_start,
            Err(error) => {
                connection.close(CLOSE_PROTOCOL_ERROR.into(), b"expected resume");
                anyhow::bail!("agent {agent_id}: {error}");
            }
        };
        if chain_start > high_water_mark {
            // Another aggregator acknowledged everything up to the chain start: the agent will
            // never send it here. The WAL's mark moves there so that the first batch, which
            // follows it, is not a gap; its rows wait in the WAL until the table's mark reaches
            // the chain start (the store's flush), so nothing is skipped or doubled.
            wal.raise_marks(vec![(Arc::clone(&agent_id), chain_start)])
                .await
                .context("raise the WAL's mark to the agent's chain start")?;
            tracing::info!(
                agent_id = %agent_id,
                %remote,
                high_water_mark,
                chain_start,
                "agent resumes above what this aggregator stored (another aggregator acknowledged the rest); its rows wait for the table to reach the chain start"
            );
        }
    }
    let chain_start = session.chain_start();
    let hello = session.hello();
    tracing::info!(
        agent_id = %agent_id,
        %remote,
        agent_version = %hello.agent_version,
        protocol_version = session.protocol_version(),
        high_water_mark,
        chain_start,
        last_assigned_seq = hello.last_assigned_seq,
        "agent connected"
    );
    // From here on the control stream has one writer: this task, fed by a bounded queue.
    let (control_tx, control_rx) = mpsc::channel::<AggregatorMessage>(CONTROL_QUEUE);
    let mut control_writer = tokio::spawn(write_control(control_send, control_rx));
    let registered = agents.register(
        NewConnection {
            agent_id: Arc::clone(&agent_id),
            remote,
            agent_version: hello.agent_version.clone(),
            labels: hello.labels.clone(),
            hello_config_hash: hello.config_hash.clone(),
            protocol_version: session.protocol_version(),
            control: control_tx,
        },
        connection.stable_id(),
    );
    agents.notify_fleet(FleetEvent::Connected {
        agent_id: Arc::clone(&agent_id),
    });

    // Batches go through the sequencer task, which forwards them to the WAL in chain order.
    let (to_sequencer, from_streams) = mpsc::channel::<(u64, u64, Pending)>(window.max(1));
    let sequencer = tokio::spawn(sequence(
        session.sequencer(),
        from_streams,
        wal.clone(),
        connection.clone(),
    ));

    // The control stream is read by its own task: a read cut short by `select!` would lose part
    // of a frame and desynchronise the stream.
    let mut control = tokio::spawn(read_control(
        control_recv,
        session,
        Arc::clone(&agent_id),
        Arc::clone(registered.connection()),
        Arc::clone(&agents),
    ));
    let result = loop {
        tokio::select! {
            stream = connection.accept_bi() => {
                let (send, recv) = match stream {
                    Ok(stream) => stream,
                    Err(error) => break Err(anyhow::Error::new(error).context("connection closed")),
                };
                tokio::spawn(handle_batch_stream(connection.clone(), Arc::clone(&agent_id), send, recv, to_sequencer.clone(), Stored { agents: Arc::clone(&agents), connection: Arc::clone(registered.connection()) }));
            }
            ended = &mut control => {
                let error = match ended {
                    Ok(error) => error,
                    Err(join_error) => anyhow::Error::new(join_error),
                };
                connection.close(CLOSE_PROTOCOL_ERROR.into(), b"control stream");
                break Err(error.context("control stream"));
            }
            ended = &mut control_writer => {
                let error = match ended {
                    Ok(error) => error,
                    Err(join_error) => anyhow::Error::new(join_error),
                };
                connection.close(CLOSE_PROTOCOL_ERROR.into(), b"control stream");
                break Err(error.context("control stream writer"));
            }
        }
    };
    control.abort();
    control_writer.abort();
    drop(to_sequencer);
    sequencer.abort();
    drop(registered);
    result
}

/// Where a batch stream counts what it stored.
struct Stored {
    agents: Arc<ConnectedAgents>,
    connection: Arc<AgentConnection>,
}

/// Writes queued messages on the control stream until it fails or the queue closes.
async fn write_control(
    mut control_send: quinn::SendStream,
    mut queue: mpsc::Receiver<AggregatorMessage>,
) -> anyhow::Error {
    while let Some(message) = queue.recv().await {
        if let Err(error) = write_frame(&mut control_send, &message, MAX_CONTROL_FRAME_BYTES).await
        {
            return error;
        }
    }
    anyhow::anyhow!("control queue closed")
}

/// Reads heartbeats, statuses and config results until the control stream fails; returns why.
async fn read_control(
    mut control_recv: quinn::RecvStream,
    session: IngestSession,
    agent_id: Arc<str>,
    connection: Arc<AgentConnection>,
    agents: Arc<ConnectedAgents>,
) -> anyhow::Error {
    loop {
        let message =
            match read_frame::<AgentMessage>(&mut control_recv, MAX_CONTROL_FRAME_BYTES).await {
                Ok(message) => message,
                Err(error) => return error,
            };
        let report = match session.on_control(message) {
            Ok(report) => report,
            Err(error) => return anyhow::Error::new(error),
        };
        match report {
            Report::Heartbeat(beat) => {
                tracing::debug!(agent_id = %agent_id, n_buffered = beat.n_buffered_events, buffered_bytes = beat.buffered_bytes, "heartbeat");
                connection.on_buffer(
                    beat.n_buffered_events,
                    beat.buffered_bytes,
                    beat.oldest_unshipped_age_ms,
                    beat.n_dropped_events,
                );
            }
            Report::Status(status) => {
                tracing::debug!(agent_id = %agent_id, config_hash = %status.config_hash, config_version = status.config_version, n_buffered = status.n_buffered_events, "status");
                connection.on_status(status);
                agents.notify_fleet(FleetEvent::Status {
                    agent_id: Arc::clone(&agent_id),
                });
            }
            Report::ConfigResult(result) => {
                tracing::info!(agent_id = %agent_id, version = result.version, hash = %result.hash, outcome = ?result.outcome, "config result");
                // Not a wake-up: a result must reach the fleet driver, so this waits for room.
                if !agents
                    .send_config_result(Arc::clone(&agent_id), result)
                    .await
                {
                    tracing::debug!(agent_id = %agent_id, "fleet driver stopped or not running; config result dropped");
                }
            }
        }
    }
}

/// Receives decoded batches from stream tasks and commits them in chain order. Any failure
/// closes the connection: the agent reconnects and resends from the stored high-water mark.
async fn sequence(
    mut sequencer: IngestSequencer<Pending>,
    mut from_streams: mpsc::Receiver<(u64, u64, Pending)>,
    wal: Wal,
    connection: quinn::Connection,
) {
    while let Some((after_seq, last_seq, pending)) = from_streams.recv().await {
        let ready = match sequencer.offer(after_seq, last_seq, pending) {
            Ok(ready) => ready,
            Err(error) => {
                tracing::warn!(%error, "batch out of sequence; closing the connection");
                connection.close(CLOSE_PROTOCOL_ERROR.into(), b"out of sequence");
                return;
            }
        };
        // Submitted in chain order without waiting: the writer commits them in this order and
        // checks each against the mark the previous one left, so after a failed commit every
        // later batch of this agent fails its chain check too; nothing is stored out of order.
        // The stream task that sees a failure closes the connection.
        for (request, reply) in ready {
            if wal.submit(request, reply).await.is_err() {
                connection.close(CLOSE_PROTOCOL_ERROR.into(), b"aggregator shutting down");
                return;
            }
        }
    }
}

async fn handle_batch_stream(
    connection: quinn::Connection,
    agent_id: Arc<str>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    to_sequencer: mpsc::Sender<(u64, u64, Pending)>,
    stored: Stored,
) {
    let batch = match read_frame::<BatchMessage>(&mut recv, MAX_FRAME_BYTES).await {
        Ok(BatchMessage::Batch(batch)) => batch,
        Err(error) => {
            tracing::warn!(agent_id = %agent_id, error = format!("{error:#}"), "bad batch frame; closing the connection");
            connection.close(CLOSE_PROTOCOL_ERROR.into(), b"bad frame");
            return;
        }
    };
    let decoded = {
        let batch = batch.clone();
        tokio::task::spawn_blocking(move || batch::decode(&batch)).await
    };
    let events = match decoded {
        Ok(Ok(events)) => events,
        Ok(Err(error)) => {
            tracing::warn!(agent_id = %agent_id, %error, "invalid batch; closing the connection");
            connection.close(CLOSE_PROTOCOL_ERROR.into(), b"invalid batch");
            return;
        }
        Err(error) => {
            tracing::error!(%error, "batch decoder task failed");
            return;
        }
    };
    let last_seq = batch.last_seq;
    let request = CommitRequest {
        agent_id: Arc::clone(&agent_id),
        after_seq: batch.after_seq,
        last_seq,
        events,
        batch,
    };
    let (reply, outcome) = oneshot::channel();
    if to_sequencer
        .send((request.after_seq, last_seq, (request, reply)))
        .await
        .is_err()
    {
        return;
    }
    let outcome = match outcome.await {
        Ok(Ok(CommitOutcome::Stored { n_new })) => {
            stored.connection.on_stored(&stored.agents, n_new);
            AckOutcome::Stored { n_new }
        }
        Ok(Ok(CommitOutcome::Duplicate)) => AckOutcome::Duplicate,
        Ok(Err(error)) => {
            tracing::warn!(agent_id = %agent_id, last_seq, %error, "batch not stored; closing the connection");
            let outcome = AckOutcome::Rejected {
                reason: error.to_string(),
            };
            let _ = write_frame(
                &mut send,
                &AckMessage::Ack(Ack { last_seq, outcome }),
                MAX_CONTROL_FRAME_BYTES,
            )
            .await;
            let _ = send.finish();
            connection.close(CLOSE_PROTOCOL_ERROR.into(), b"batch not stored");
            return;
        }
        Err(_) => AckOutcome::Rejected {
            reason: "batch out of sequence".into(),
        },
    };
    let ack = AckMessage::Ack(Ack { last_seq, outcome });
    if let Err(error) = write_frame(&mut send, &ack, MAX_CONTROL_FRAME_BYTES).await {
        tracing::debug!(agent_id = %agent_id, error = format!("{error:#}"), "ack not delivered (the agent will resend)");
        return;
    }
    let _ = send.finish();
}

async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    message: &T,
    max_bytes: usize,
) -> anyhow::Result<()> {
    let bytes = frame::encode(message, max_bytes)?;
    send.write_all(&bytes).await.context("write frame")?;
    Ok(())
}

async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max_bytes: usize,
) -> anyhow::Result<T> {
    let mut prefix = [0u8; frame::LENGTH_PREFIX_BYTES];
    recv.read_exact(&mut prefix)
        .await
        .context("read frame length")?;
    let n_bytes = frame::payload_len(prefix, max_bytes)?;
    let mut payload = vec![0u8; n_bytes];
    recv.read_exact(&mut payload)
        .await
        .context("read frame payload")?;
    Ok(frame::decode_payload(&payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ingest socket gets the receive buffer asked for, or the kernel's cap.
    #[test]
    fn the_ingest_socket_asks_for_a_large_receive_buffer() {
        let socket = bind_udp("127.0.0.1:0".parse().expect("an address")).expect("bind");
        let reported = socket2::SockRef::from(&socket)
            .recv_buffer_size()
            .expect("SO_RCVBUF");
        match std::fs::read_to_string("/proc/sys/net/core/rmem_max") {
            // Linux: the requested size capped at rmem_max, reported doubled.
            Ok(max) => {
                let max: usize = max.trim().parse().expect("rmem_max is a number");
                assert_eq!(reported, 2 * max.min(UDP_RECEIVE_BUFFER_BYTES));
            }
            Err(_) => assert!(reported > 0),
        }
    }
}
