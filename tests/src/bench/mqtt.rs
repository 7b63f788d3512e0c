//! MQTT QoS 1 ingest: publishers, the bare counting subscriber (the limit), and the flow control
//! that keeps the broker from dropping messages.
//!
//! Mosquitto keeps at most `max_queued_messages` (default 1000) QoS 1 messages per subscriber
//! beyond its in-flight window (`max_inflight_messages`, default 20) and drops the rest. So the
//! publishers share one [`Window`]: a message is handed to a publisher only while fewer than
//! `limit` messages are published and not yet consumed (acknowledged by the bare subscriber, or
//! committed to the agent's buffer, after which the agent sends the PUBACK). Both subscribers run
//! under the same window, and the bench verifies that every message arrived exactly once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};

/// Environment variable naming the broker, `mqtt://host:port`, as for the MQTT tests.
pub const MQTT_URL_ENV: &str = "RUNNEL_TEST_MQTT_URL";
const DEFAULT_BROKER: (&str, u16) = ("127.0.0.1", 1883);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Outstanding QoS 1 publishes per publisher (rumqttc's in-flight limit towards the broker).
const PUBLISHER_INFLIGHT: u16 = 100;
/// A subscriber (or the agent's buffer) that has seen nothing new for this long has seen all it
/// will: the rest was dropped by the broker or is lost.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub what: String,
}

/// The broker from `RUNNEL_TEST_MQTT_URL`, else 127.0.0.1:1883, if it accepts TCP connections;
/// otherwise why not (the scenario is skipped with that reason).
pub fn broker() -> Result<Broker, String> {
    let (host, port, what) = match std::env::var(MQTT_URL_ENV) {
        Ok(url) => {
            let rest = url
                .strip_prefix("mqtt://")
                .ok_or_else(|| format!("{MQTT_URL_ENV}={url:?}: expected mqtt://host:port"))?
                .trim_end_matches('/');
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_owned(),
                    port.parse()
                        .map_err(|_| format!("{MQTT_URL_ENV}={url:?}: bad port"))?,
                ),
                None => (rest.to_owned(), 1883),
            };
            (host, port, format!("{url} (from {MQTT_URL_ENV})"))
        }
        Err(_) => (
            DEFAULT_BROKER.0.to_owned(),
            DEFAULT_BROKER.1,
            format!(
                "mqtt://{}:{} ({MQTT_URL_ENV} unset)",
                DEFAULT_BROKER.0, DEFAULT_BROKER.1
            ),
        ),
    };
    let addrs: Vec<std::net::SocketAddr> =
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .map_err(|error| format!("{what}: {error}"))?
            .collect();
    let reachable = addrs
        .iter()
        .any(|addr| std::net::TcpStream::connect_timeout(addr, Duration::from_secs(2)).is_ok());
    if !reachable {
        return Err(format!("no MQTT broker answers at {what}"));
    }
    Ok(Broker { host, port, what })
}

/// One telemetry message: its topic and JSON payload (~300 bytes). The payload starts with
/// `{"msg":<index>,` so the bare subscriber can check arrivals without parsing JSON.
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

const SITES: [&str; 4] = ["berlin", "lyon", "porto", "brno"];
const STATUSES: [(&str, u32); 3] = [("ok", 94), ("warn", 5), ("alarm", 1)];

/// `n` telemetry messages on `<root>/<site>/<device>/telemetry` (4 sites, 64 devices each).
pub fn telemetry(n: usize, seed: u64, root: &str, now_unix_ms: i64) -> Vec<Message> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|idx| {
            let site = SITES[rng.usize(0..SITES.len())];
            let device = rng.u32(0..64);
            let mut pick = rng.u32(0..100);
            let mut status = STATUSES[0].0;
            for (candidate, weight) in STATUSES {
                if pick < weight {
                    status = candidate;
                    break;
                }
                pick -= weight;
            }
            let payload = format!(
                "{{\"msg\":{idx},\"event_id\":\"{}\",\"name\":\"telemetry\",\"timestamp\":\"{}\",\
                 \"device_id\":\"press-{device:02}\",\"firmware\":\"4.{}.{}\",\"status\":\"{status}\",\
                 \"temperature_c\":{:.2},\"pressure_bar\":{:.3},\"vibration_mm_s\":{:.2},\
                 \"rpm\":{},\"power_kw\":{:.1},\"cycle_count\":{},\"uptime_s\":{}}}",
                uuid_v4(&mut rng),
                super::events::rfc3339_ms(now_unix_ms - rng.i64(0..2_000)),
                device % 3,
                device % 7,
                40.0 + rng.f64() * 45.0,
                180.0 + rng.f64() * 40.0,
                rng.f64() * 12.0,
                1400 + rng.u32(0..200),
                20.0 + rng.f64() * 60.0,
                rng.u64(100_000..9_000_000),
                rng.u64(1_000..3_000_000),
            );
            Message {
                topic: format!("{root}/{site}/press-{device:02}/telemetry"),
                payload: payload.into_bytes(),
            }
        })
        .collect()
}

fn uuid_v4(rng: &mut fastrand::Rng) -> String {
    let hex = format!("{:032x}", rng.u128(..));
    format!(
        "{}-{}-4{}-{}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        ["8", "9", "a", "b"][rng.usize(0..4)],
        &hex[17..20],
        &hex[20..32]
    )
}

/// The message index at the start of a payload (`{"msg":123,`).
fn message_index(payload: &[u8]) -> Option<usize> {
    let rest = payload.strip_prefix(b"{\"msg\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Published-but-not-consumed messages, shared by the publishers and the consumer side.
#[derive(Debug)]
pub struct Window {
    pub issued: AtomicU64,
    pub consumed: AtomicU64,
    pub limit: u64,
}

impl Window {
    pub fn new(limit: u64) -> Window {
        Window {
            issued: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            limit,
        }
    }

    /// Waits (1 ms steps) until another message may be published, then counts it as issued.
    /// False when `deadline` passed first.
    async fn acquire(&self, deadline: Instant) -> bool {
        loop {
            let issued = self.issued.load(Ordering::Acquire);
            if issued.saturating_sub(self.consumed.load(Ordering::Acquire)) < self.limit {
                if self
                    .issued
                    .compare_exchange(issued, issued + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn options(broker: &Broker, client_id: &str, clean_session: bool) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean_session)
        .set_max_packet_size(1 << 20, 1 << 20);
    options
}

/// Connects, waits for CONNACK, and returns the client with its event loop.
async fn connect(
    options: MqttOptions,
    cap: usize,
) -> anyhow::Result<(AsyncClient, rumqttc::EventLoop)> {
    let (client, mut eventloop) = AsyncClient::new(options, cap);
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(anyhow::anyhow!("MQTT connect: {error}")),
            }
        }
    })
    .await
    .context("MQTT CONNACK not within the timeout")??;
    Ok((client, eventloop))
}

/// Erases a persistent session left at the broker: connect with clean_session = true, then
/// disconnect.
pub async fn clear_session(broker: &Broker, client_id: &str) {
    if let Ok((client, mut eventloop)) = connect(options(broker, client_id, true), 10).await {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    }
}

/// Publishes one QoS 1 message from a short-lived client and waits for the PUBACK.
pub async fn publish_one(
    broker: &Broker,
    client_id: &str,
    topic: &str,
    payload: Vec<u8>,
) -> anyhow::Result<()> {
    let (client, mut eventloop) = connect(options(broker, client_id, true), 10).await?;
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .context("queue a publish")?;
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(anyhow::anyhow!("MQTT publish: {error}")),
            }
        }
    })
    .await
    .context("PUBACK not within the timeout")??;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

#[derive(Debug, Default)]
pub struct PublishResult {
    /// PUBACKs from the broker.
    pub n_acked: u64,
    /// When the last PUBACK arrived.
    pub last_puback: Option<Instant>,
    /// False when the deadline stopped publishing early.
    pub complete: bool,
    pub errors: Vec<String>,
}

/// Connected publishers, ready to start: connecting is not part of the measurement.
pub struct Publishers {
    clients: Vec<(AsyncClient, rumqttc::EventLoop)>,
}

impl Publishers {
    pub async fn connect(broker: &Broker, n: usize, id_prefix: &str) -> anyhow::Result<Publishers> {
        let mut clients = Vec::with_capacity(n);
        for idx in 0..n {
            let mut options = options(broker, &format!("{id_prefix}-pub-{idx}"), true);
            options.set_inflight(PUBLISHER_INFLIGHT);
            clients.push(connect(options, usize::from(PUBLISHER_INFLIGHT)).await?);
        }
        Ok(Publishers { clients })
    }

    /// Publishes every message (publisher `i` takes messages `i`, `i + n`, ...) under `window`,
    /// and waits for all PUBACKs or `deadline`.
    pub async fn run(
        self,
        messages: Arc<Vec<Message>>,
        window: Arc<Window>,
        deadline: Instant,
    ) -> PublishResult {
        let n_publishers = self.clients.len();
        let last_puback = Arc::new(Mutex::new(None::<Instant>));
        let mut tasks = Vec::new();
        for (idx, (client, mut eventloop)) in self.clients.into_iter().enumerate() {
            let share = messages.len().saturating_sub(idx).div_ceil(n_publishers) as u64;
            let last_puback = Arc::clone(&last_puback);
            // The event loop: counts PUBACKs until the share is in.
            let acks = tokio::spawn(async move {
                let mut n_acked = 0u64;
                while n_acked < share {
                    let event = tokio::time::timeout_at(deadline.into(), eventloop.poll()).await;
                    match event {
                        Ok(Ok(MqttEvent::Incoming(Packet::PubAck(_)))) => {
                            n_acked += 1;
                            if n_acked == share {
                                let now = Instant::now();
                                let mut last = last_puback.lock().expect("lock");
                                *last = Some(last.map_or(now, |l: Instant| l.max(now)));
                            }
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => {
                            return (n_acked, Some(format!("publisher {idx}: {error}")));
                        }
                        Err(_) => return (n_acked, Some(format!("publisher {idx}: deadline"))),
                    }
                }
                let _ = eventloop; // keep the connection until here
                (n_acked, None)
            });
            let messages = Arc::clone(&messages);
            let window = Arc::clone(&window);
            let sender = tokio::spawn(async move {
                for message in messages.iter().skip(idx).step_by(n_publishers) {
                    if !window.acquire(deadline).await {
                        return false;
                    }
                    if client
                        .publish(
                            message.topic.as_str(),
                            QoS::AtLeastOnce,
                            false,
                            message.payload.clone(),
                        )
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                true
            });
            tasks.push((sender, acks));
        }
        let mut result = PublishResult {
            complete: true,
            ..PublishResult::default()
        };
        for (sender, acks) in tasks {
            result.complete &= sender.await.unwrap_or(false);
            match acks.await {
                Ok((n, error)) => {
                    result.n_acked += n;
                    result.errors.extend(error);
                }
                Err(error) => result.errors.push(format!("publisher task: {error}")),
            }
        }
        result.last_puback = *last_puback.lock().expect("lock");
        result.complete &= result.n_acked == messages.len() as u64;
        result
    }
}

#[derive(Debug, Default)]
pub struct SubscriberResult {
    pub n_received: u64,
    pub n_distinct: u64,
    pub n_dup_flag: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    pub error: Option<String>,
}

/// The limit: a bare rumqttc subscriber (QoS 1, manual acks) that acknowledges each publish as
/// soon as it arrives and only counts. Subscribed and ready when this returns.
pub struct BareSubscriber {
    task: tokio::task::JoinHandle<SubscriberResult>,
}

impl BareSubscriber {
    pub async fn start(
        broker: &Broker,
        client_id: &str,
        filter: &str,
        n_expected: usize,
        window: Arc<Window>,
        deadline: Instant,
    ) -> anyhow::Result<BareSubscriber> {
        let mut options = options(broker, client_id, false);
        options.set_manual_acks(true);
        let (client, mut eventloop) = connect(options, 1000).await?;
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .context("queue SUBSCRIBE")?;
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(error) => return Err(anyhow::anyhow!("MQTT subscribe: {error}")),
                }
            }
        })
        .await
        .context("SUBACK not within the timeout")??;
        let task = tokio::spawn(async move {
            let mut seen = vec![false; n_expected];
            let mut result = SubscriberResult::default();
            while (result.n_received as usize) < n_expected {
                let until = deadline.min(Instant::now() + IDLE_TIMEOUT);
                match tokio::time::timeout_at(until.into(), eventloop.poll()).await {
                    Ok(Ok(MqttEvent::Incoming(Packet::Publish(publish)))) => {
                        let now = Instant::now();
                        if client.try_ack(&publish).is_err() {
                            result.error = Some("PUBACK not queued".into());
                        }
                        result.first.get_or_insert(now);
                        result.last = Some(now);
                        result.n_received += 1;
                        result.n_dup_flag += u64::from(publish.dup);
                        if let Some(idx) = message_index(&publish.payload)
                            && let Some(slot) = seen.get_mut(idx)
                            && !*slot
                        {
                            *slot = true;
                            result.n_distinct += 1;
                        }
                        window.consumed.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        result.error = Some(error.to_string());
                        return result;
                    }
                    Err(_) => {
                        result.error = Some(format!(
                            "stopped waiting: {} of {n_expected} received, nothing for {IDLE_TIMEOUT:?} or past the deadline",
                            result.n_received
                        ));
                        return result;
                    }
                }
            }
            // Let the last PUBACKs out before disconnecting.
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while eventloop.poll().await.is_ok() {}
            })
            .await;
            result
        });
        Ok(BareSubscriber { task })
    }

    pub async fn finish(self) -> SubscriberResult {
        self.task.await.unwrap_or_else(|error| SubscriberResult {
            error: Some(format!("subscriber task: {error}")),
            ..SubscriberResult::default()
        })
    }
}

/// What the buffer poller saw: when the first and the last message was committed, and how
/// many were (fewer than expected when the broker dropped some).
#[derive(Debug)]
pub struct Committed {
    pub first: Option<Instant>,
    pub all: Option<Instant>,
    pub n: u64,
}

/// Polls the agent buffer's `sqlite_sequence` (events ever appended; the agent sends a PUBACK
/// right after the commit) every `interval` on a thread of its own, feeding `window.consumed`
/// with the events appended beyond `baseline`, until `n_expected` or `deadline`.
/// Returns the times the first and the last of them were seen committed, and how many.
pub fn poll_buffer(
    path: std::path::PathBuf,
    baseline: u64,
    n_expected: u64,
    window: Arc<Window>,
    interval: Duration,
    deadline: Instant,
) -> std::thread::JoinHandle<anyhow::Result<Committed>> {
    std::thread::spawn(move || {
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("open {}", path.display()))?;
        let mut first = None;
        let mut last_n = 0;
        let mut last_change = Instant::now();
        loop {
            let seq = last_seq(&conn)?;
            let n = seq.saturating_sub(baseline);
            let now = Instant::now();
            if n > 0 {
                first.get_or_insert(now);
            }
            if n != last_n {
                last_n = n;
                last_change = now;
            }
            window.consumed.store(n, Ordering::Release);
            if n >= n_expected {
                return Ok(Committed {
                    first,
                    all: Some(now),
                    n,
                });
            }
            if now >= deadline || now - last_change >= IDLE_TIMEOUT {
                // Not all arrived: the last commit seen, for a rate over what did.
                return Ok(Committed {
                    first,
                    all: (n > 0).then_some(last_change),
                    n,
                });
            }
            std::thread::sleep(interval);
        }
    })
}

/// Events ever appended to an agent buffer.
pub fn last_seq(conn: &rusqlite::Connection) -> anyhow::Result<u64> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            [],
            |row| row.get(0),
        )
        .or_else(|error| match error {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            other => Err(other),
        })?;
    Ok(seq.unwrap_or(0).max(0) as u64)
}
