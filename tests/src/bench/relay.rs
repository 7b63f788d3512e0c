//! A UDP relay between the agent and the aggregator that counts what crosses it: every QUIC
//! datagram, so the counts include QUIC framing, TLS record protection, acks, keep-alives and
//! retransmissions (not the IP and UDP headers; the datagram count gives those).
//!
//! It runs on its own thread with its own single-threaded runtime, so the load generator's tasks
//! do not delay forwarding. Loopback only. One agent at a time: datagrams from the aggregator go
//! to the address the last datagram towards it came from.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// A loopback UDP socket with the receive buffer the aggregator asks for on its own socket: the
/// relay stands for a network path, and a path that drops bursts at its first hop is not what
/// the bench measures.
fn bind_loopback() -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(runnel_aggregator::ingest::UDP_RECEIVE_BUFFER_BYTES);
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    Ok(socket.into())
}

/// Largest UDP payload; QUIC datagrams on loopback are far smaller.
const MAX_DATAGRAM_BYTES: usize = 65_535;

#[derive(Debug, Default)]
pub struct Counters {
    pub up_bytes: AtomicU64,
    pub up_datagrams: AtomicU64,
    pub down_bytes: AtomicU64,
    pub down_datagrams: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    /// Agent -> aggregator.
    pub up_bytes: u64,
    pub up_datagrams: u64,
    /// Aggregator -> agent.
    pub down_bytes: u64,
    pub down_datagrams: u64,
}

impl Traffic {
    pub fn since(self, before: Traffic) -> Traffic {
        Traffic {
            up_bytes: self.up_bytes - before.up_bytes,
            up_datagrams: self.up_datagrams - before.up_datagrams,
            down_bytes: self.down_bytes - before.down_bytes,
            down_datagrams: self.down_datagrams - before.down_datagrams,
        }
    }
}

pub struct Relay {
    pub listen: SocketAddr,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Binds `127.0.0.1:0` and forwards to `target`.
    pub fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let front = bind_loopback().context("bind relay socket")?;
        let back = bind_loopback().context("bind relay socket")?;
        back.connect(target)
            .context("connect relay to the aggregator")?;
        front.set_nonblocking(true)?;
        back.set_nonblocking(true)?;
        let listen = front.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("relay runtime")?;
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = watch::channel(false);
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("udp-relay".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match (UdpSocket::from_std(front), UdpSocket::from_std(back)) {
                        (Ok(front), Ok(back)) => {
                            forward(front, back, thread_counters, stop_rx).await
                        }
                        (Err(error), _) | (_, Err(error)) => {
                            eprintln!("runnel-bench: relay sockets unusable: {error}");
                        }
                    }
                });
            })
            .context("spawn relay thread")?;
        Ok(Relay {
            listen,
            counters,
            stop,
            thread: Some(thread),
        })
    }

    pub fn traffic(&self) -> Traffic {
        let c = &self.counters;
        Traffic {
            up_bytes: c.up_bytes.load(Ordering::Relaxed),
            up_datagrams: c.up_datagrams.load(Ordering::Relaxed),
            down_bytes: c.down_bytes.load(Ordering::Relaxed),
            down_datagrams: c.down_datagrams.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn forward(
    front: UdpSocket,
    back: UdpSocket,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut up = vec![0u8; MAX_DATAGRAM_BYTES];
    let mut down = vec![0u8; MAX_DATAGRAM_BYTES];
    let mut agent: Option<SocketAddr> = None;
    loop {
        tokio::select! {
            received = front.recv_from(&mut up) => {
                let Ok((n, from)) = received else { continue };
                agent = Some(from);
                counters.up_bytes.fetch_add(n as u64, Ordering::Relaxed);
                counters.up_datagrams.fetch_add(1, Ordering::Relaxed);
                // A failed send is a lost datagram, which QUIC recovers from like any other loss.
                let _ = back.send(&up[..n]).await;
            }
            received = back.recv(&mut down) => {
                // Errors here are ICMP "port unreachable" echoes while the aggregator is down.
                let Ok(n) = received else { continue };
                counters.down_bytes.fetch_add(n as u64, Ordering::Relaxed);
                counters.down_datagrams.fetch_add(1, Ordering::Relaxed);
                if let Some(agent) = agent {
                    let _ = front.send_to(&down[..n], agent).await;
                }
            }
            _ = stop.changed() => return,
        }
    }
}
