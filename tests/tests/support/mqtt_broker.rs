//! The MQTT broker the tests use, shared by the test files that include it
//! (`#[path = "support/mqtt_broker.rs"] mod mqtt_broker;`): the one `RUNNEL_TEST_MQTT_URL` names
//! (`mqtt://host:port`, `.ci/run` sets it), else an in-process rumqttd on a free loopback port,
//! started once per test process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Environment variable naming the broker, such as `mqtt://127.0.0.1:1883`.
pub const MQTT_URL_ENV: &str = "RUNNEL_TEST_MQTT_URL";

/// The broker the tests use.
#[derive(Debug, Clone)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    /// What it is, for messages.
    pub what: String,
}

impl Broker {
    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.port)
    }
}

pub fn broker() -> Broker {
    match std::env::var(MQTT_URL_ENV) {
        Ok(url) => {
            let rest = url
                .strip_prefix("mqtt://")
                .unwrap_or_else(|| panic!("{MQTT_URL_ENV}={url:?}: expected mqtt://host:port"));
            let rest = rest.trim_end_matches('/');
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, port)) => (
                    host.to_owned(),
                    port.parse()
                        .unwrap_or_else(|_| panic!("{MQTT_URL_ENV}={url:?}: bad port")),
                ),
                None => (rest.to_owned(), 1883),
            };
            Broker {
                host,
                port,
                what: format!("{url} (from {MQTT_URL_ENV})"),
            }
        }
        Err(_) => {
            let port = in_process_broker_port();
            Broker {
                host: "127.0.0.1".to_owned(),
                port,
                what: format!("in-process rumqttd on 127.0.0.1:{port} ({MQTT_URL_ENV} unset)"),
            }
        }
    }
}

/// Starts rumqttd once per test process on a free loopback port; returns the port once it
/// accepts connections.
pub fn in_process_broker_port() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("find a free port")
            .port();
        let listen: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = rumqttd::ServerSettings {
            name: "v4-test".to_owned(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 1 << 20,
                max_inflight_count: 500,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = rumqttd::Config {
            id: 0,
            router: rumqttd::RouterConfig {
                max_connections: 1000,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 << 20,
                max_segment_count: 10,
                ..rumqttd::RouterConfig::default()
            },
            v4: Some(HashMap::from([("1".to_owned(), server)])),
            ..rumqttd::Config::default()
        };
        std::thread::Builder::new()
            .name("rumqttd".to_owned())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(error) = broker.start() {
                    eprintln!("in-process rumqttd stopped: {error}");
                }
            })
            .expect("spawn the broker thread");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(
                Instant::now() < deadline,
                "the in-process rumqttd did not listen on {listen} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        port
    })
}

/// A QoS 1 subscriber whose SUBACK has arrived: messages published from now on reach
/// `messages` as (topic, payload). Its connection task ends when it is dropped.
pub struct Subscription {
    pub messages: tokio::sync::mpsc::Receiver<(String, Vec<u8>)>,
    _client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Broker {
    /// Subscribes `client_id` to `filter` and waits (30 s at most) for the SUBACK: the broker
    /// drops a QoS 1 message to a topic nobody has subscribed to yet.
    pub async fn subscribe(&self, client_id: &str, filter: &str) -> Subscription {
        use rumqttc::{Event, Packet};
        let mut options = rumqttc::MqttOptions::new(client_id, self.host.clone(), self.port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let (messages_tx, messages) = tokio::sync::mpsc::channel(64);
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel::<()>();
        let what = self.what.clone();
        let task = tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = messages_tx
                            .send((publish.topic.clone(), publish.payload.to_vec()))
                            .await;
                    }
                    Ok(_) => {}
                    Err(error) => {
                        eprintln!("subscriber on {what}: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), subscribed)
            .await
            .expect("SUBACK within 30 s")
            .expect("subscriber running");
        Subscription {
            messages,
            _client: client,
            task,
        }
    }
}
