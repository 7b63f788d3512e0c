//! The agent config file (`agent.toml`): its raw TOML shape, its defaults and limits, and
//! validation into `AgentConfig`. It owns every agent key and the reason for each limit. It must not
//! touch the file system beyond resolving paths (the agent creates `data_dir`, opens the buffer and
//! reads certificates) and must not depend on anything the agent runs.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::common::{Checker, GIB, KIB, MIB, Synchronous, Unit, quote};
use crate::error::ConfigError;
use crate::models::{ModelConfig, RawModels};
use crate::rules::{RawRules, RulesConfig};
use crate::sources::{
    MqttListenerConfig, MqttSourceConfig, RawMqtt, RawMqttListener, RawSegment, RawSnowplow,
    SegmentConfig, SnowplowConfig,
};
use crate::windows::{RawWindows, WindowConfig};

// Limits copied from runnel-common as literals, so this crate builds without it; the values must
// match `runnel_common::limits`.
/// `MAX_EVENT_BYTES` in runnel-common: the largest encoded event the wire format carries.
const MAX_EVENT_BYTES: u64 = MIB;
/// `MAX_BATCH_EVENTS` in runnel-common: the most events in one batch frame.
const MAX_BATCH_EVENTS: u64 = 10_000;
/// `MAX_BATCH_BYTES` in runnel-common: the largest uncompressed batch.
const MAX_BATCH_BYTES: u64 = 16 * MIB;
const _: () = assert!(MAX_EVENT_BYTES <= MAX_BATCH_BYTES);

/// Where the agent keeps its state when `agent.data_dir` is not set.
const DEFAULT_DATA_DIR: &str = "/var/lib/runnel-agent";
/// Longest label key or value: the DNS label limit, so labels fit in host names and metric labels.
const MAX_LABEL_CHARS: usize = 63;
/// Priority of streams not listed in `buffer.stream_priorities`.
pub const DEFAULT_STREAM_PRIORITY: u8 = 100;

/// What the agent does with a new event when its buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Backpressure: refuse new events (HTTP 503 with Retry-After, MQTT messages left
    /// unacknowledged) until the uplink drains the buffer. Nothing is lost.
    Block,
    /// Accept and discard the new events, counted per stream.
    DropNewest,
    /// Evict the oldest events not yet handed to the uplink, lowest stream priority first, to
    /// make room; counted per stream.
    DropOldest,
}

impl WhenFull {
    /// The spelling in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::Block => "block",
            WhenFull::DropNewest => "drop_newest",
            WhenFull::DropOldest => "drop_oldest",
        }
    }
}

/// A validated agent config. Paths are absolute.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Directory for the agent's state; created by the agent, not by config.
    pub data_dir: PathBuf,
    /// Labels that describe this agent to the fleet (used by rollout selectors).
    pub labels: BTreeMap<String, String>,
    /// The HTTP event source.
    pub http: HttpSourceConfig,
    /// The Snowplow collector on the HTTP source.
    pub snowplow: SnowplowConfig,
    /// The Segment collector on the HTTP source.
    pub segment: SegmentConfig,
    /// MQTT subscribers.
    pub mqtt: Vec<MqttSourceConfig>,
    /// The MQTT listener (an MQTT server devices publish to).
    pub mqtt_listener: MqttListenerConfig,
    /// The on-disk event buffer.
    pub buffer: BufferConfig,
    /// The QUIC connection to the aggregator.
    pub uplink: UplinkConfig,
    /// Stateless rules, in order (`[[rules]]`).
    pub rules: RulesConfig,
    /// Stateful rules: windows and their alerts (`[[windows]]`).
    pub windows: Vec<WindowConfig>,
    /// Models that score events before rules run (`[[models]]`).
    pub models: Vec<ModelConfig>,
}

/// `[sources.http]`, validated.
#[derive(Debug, Clone)]
pub struct HttpSourceConfig {
    /// Address the HTTP source listens on (port 0: the OS picks).
    pub listen: SocketAddr,
    /// Largest request body; larger bodies get HTTP 413.
    pub max_body_bytes: usize,
    /// Largest single event after decoding.
    pub max_event_bytes: usize,
    /// Stream for generic JSON events that do not name one.
    pub stream: String,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_allowed_origins: Vec<String>,
    /// Bearer tokens accepted on `/v1/events`; empty: no token needed.
    pub auth_tokens: Vec<String>,
}

/// `[buffer]`, validated.
#[derive(Debug, Clone)]
pub struct BufferConfig {
    /// SQLite buffer file.
    pub path: PathBuf,
    /// Most bytes the buffer may hold on disk.
    pub max_bytes: u64,
    /// SQLite `synchronous` level of the buffer.
    pub synchronous: Synchronous,
    /// Policy when the buffer is full.
    pub when_full: WhenFull,
    /// With `block`: how long an HTTP request waits for room before it gets 503.
    pub block_timeout_ms: u64,
    /// Priority per stream for `drop_oldest` (lower is evicted first); unlisted streams have
    /// [`DEFAULT_STREAM_PRIORITY`].
    pub stream_priorities: BTreeMap<String, u8>,
}

/// `[uplink]`, validated.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Aggregator ingest addresses, `host:port`, as written: the one of `uplink.aggregator` or
    /// the list of `uplink.aggregators`. Never empty, no duplicates. The uplink orders them per
    /// agent (rendezvous hashing on the agent id); the order here means nothing.
    pub aggregators: Vec<String>,
    /// How long the aggregator in use may be unreachable before the uplink moves to the next in
    /// its order.
    pub failover_after_ms: u64,
    /// How long the first choice must have been reachable again before the uplink returns to it.
    pub failback_after_ms: u64,
    /// TLS name expected in the aggregator certificate.
    pub server_name: String,
    /// PEM of the fleet CA.
    pub ca_cert: PathBuf,
    /// This agent's certificate PEM; its common name is the agent id.
    pub cert: PathBuf,
    /// This agent's private key PEM.
    pub key: PathBuf,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Most uncompressed bytes in one batch.
    pub max_batch_bytes: usize,
    /// Longest time an event waits for its batch to fill.
    pub max_batch_age_ms: u64,
    /// Most batches sent and not yet acknowledged.
    pub max_in_flight_batches: usize,
    /// First reconnect delay.
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay (the backoff doubles up to it, with jitter).
    pub reconnect_max_ms: u64,
    /// Interval of QUIC keep-alive packets.
    pub keep_alive_interval_ms: u64,
    /// Connection closes after this long without any packet from the aggregator.
    pub idle_timeout_ms: u64,
}

/// The agent config file as written. Every key is optional here; `validate` applies defaults and
/// reports missing required keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentFile {
    /// `[agent]`: identity and state of this agent.
    #[serde(default)]
    agent: RawAgent,
    /// `[sources.*]`: where events come from.
    #[serde(default)]
    sources: RawSources,
    /// `[buffer]`: the on-disk SQLite buffer between sources and uplink.
    #[serde(default)]
    buffer: RawBuffer,
    /// `[uplink]`: the QUIC connection to the aggregator.
    #[serde(default)]
    uplink: RawUplink,
    /// `[[rules]]`: stateless rules, applied in order to every event.
    #[serde(default)]
    rules: RawRules,
    /// `[[windows]]`: stateful rules over tumbling or sliding windows.
    #[serde(default)]
    windows: RawWindows,
    /// `[[models]]`: ONNX models that score events before rules run.
    #[serde(default)]
    models: RawModels,
}

/// `[agent]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    /// Directory for the agent's state (buffer, last good config). Created by the agent.
    /// Relative paths are resolved against the config file's directory.
    /// Default: "/var/lib/runnel-agent".
    data_dir: Option<PathBuf>,
    /// Labels that describe this agent to the fleet, such as `{ site = "berlin", role = "pos" }`;
    /// rollouts select agents by them. Keys and values: 1 to 63 characters of `a-z A-Z 0-9 _ . -`.
    /// Default: no labels.
    labels: Option<BTreeMap<String, String>>,
}

/// `[sources]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSources {
    /// `[sources.http]`: the HTTP source (generic JSON, Snowplow, Segment).
    #[serde(default)]
    http: RawHttpSource,
    /// `[sources.snowplow]`: the Snowplow tracker protocol on the HTTP source.
    #[serde(default)]
    snowplow: RawSnowplow,
    /// `[sources.segment]`: the Segment HTTP tracking API on the HTTP source.
    #[serde(default)]
    segment: RawSegment,
    /// `[[sources.mqtt]]`: subscribers to MQTT brokers, one table each.
    #[serde(default)]
    mqtt: Vec<RawMqtt>,
    /// `[sources.mqtt_listener]`: an MQTT server on the agent that devices publish to directly.
    #[serde(default)]
    mqtt_listener: RawMqttListener,
}

/// `[sources.http]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpSource {
    /// Address and port to listen on, such as "127.0.0.1:9470"; port 0 lets the OS pick.
    /// Default: "127.0.0.1:9470".
    listen: Option<String>,
    /// Largest request body in bytes; larger bodies are refused with HTTP 413.
    /// Allowed: 1024 (1 KiB) to 67108864 (64 MiB). Default: 1048576 (1 MiB).
    max_body_bytes: Option<u64>,
    /// Largest single event in bytes after decoding; larger events are rejected with a reason.
    /// Allowed: 256 to 1048576 (1 MiB, the wire format's limit). Default: 65536 (64 KiB).
    max_event_bytes: Option<u64>,
    /// Stream for generic JSON events (`POST /v1/events`) that do not name one. Default: "default".
    stream: Option<String>,
    /// Browser origins allowed to post events (CORS), such as ["https://shop.example"], or ["*"]
    /// for any. Default: empty (no CORS headers; browsers on other origins are refused).
    cors_allowed_origins: Option<Vec<String>>,
    /// Bearer tokens accepted on `POST /v1/events` (`Authorization: Bearer <token>`).
    /// Default: empty (no token needed).
    auth_tokens: Option<Vec<String>>,
}

/// `[buffer]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    /// SQLite buffer file. Relative paths are resolved against the config file's directory.
    /// Default: "<data_dir>/buffer.sqlite".
    path: Option<PathBuf>,
    /// Most bytes the buffer may hold on disk; when reached, `when_full` applies.
    /// Allowed: at least 1048576 (1 MiB). Default: 1073741824 (1 GiB).
    max_bytes: Option<u64>,
    /// SQLite `synchronous` level: "off", "normal", "full" or "extra". Only "full" and "extra"
    /// keep every acknowledged event across power loss. Default: "full".
    synchronous: Option<String>,
    /// What happens when the buffer is full. "block": sources get backpressure (HTTP waits up to
    /// `block_timeout_ms`, then 503 with Retry-After; MQTT messages stay unacknowledged) and
    /// nothing is lost. "drop_newest": new events are accepted and discarded. "drop_oldest": the
    /// oldest events not yet being shipped are evicted, lowest `stream_priorities` first. Every
    /// drop is counted per stream and reason and reaches the aggregator (table `agent_drops`).
    /// Default: "block".
    when_full: Option<String>,
    /// With "block": milliseconds an HTTP request waits for room before it gets 503.
    /// Allowed: 0 to 60000. Default: 500.
    block_timeout_ms: Option<u64>,
    /// Stream priorities for "drop_oldest", 0 to 255: lower is evicted first, and an event never
    /// evicts one of a higher priority. Unlisted streams: 100. Example:
    /// { page_pings = 10, purchases = 200 }. Default: none listed.
    stream_priorities: Option<BTreeMap<String, u8>>,
}

/// `[uplink]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    /// Required unless `aggregators` is set. The aggregator's QUIC ingest address as
    /// "host:port", such as "aggregator.example.com:9480".
    aggregator: Option<String>,
    /// Instead of `aggregator` when several aggregators serve the fleet: their QUIC ingest
    /// addresses as "host:port", such as ["agg-a.example.com:9480", "agg-b.example.com:9480"].
    /// Each agent orders them by rendezvous hashing on its agent id, uses the first it can
    /// reach, moves to the next after `failover_after_ms` and returns after
    /// `failback_after_ms`. The order in the file does not matter; the spelling does (list the
    /// same strings on every agent). 1 to 64 entries, no duplicates. Default: not set.
    aggregators: Option<Vec<String>>,
    /// Milliseconds the aggregator in use may be unreachable (connection lost and every attempt
    /// since failed) before the agent moves to the next in its order. Only with several
    /// aggregators. Allowed: 100 to 3600000. Default: 5000.
    failover_after_ms: Option<u64>,
    /// Milliseconds the agent's first choice must have been reachable again (the agent probes it
    /// with a QUIC handshake about every `reconnect_max_ms` while it uses another) before the
    /// agent returns to it. Only with several aggregators. Allowed: 0 to 86400000.
    /// Default: 60000.
    failback_after_ms: Option<u64>,
    /// TLS server name expected in the aggregator's certificate. Default: "localhost".
    server_name: Option<String>,
    /// Required. PEM file of the fleet CA that signed the aggregator's certificate.
    /// Relative paths are resolved against the config file's directory.
    ca_cert: Option<PathBuf>,
    /// Required. PEM file of this agent's certificate; its common name is the agent id.
    /// Relative paths are resolved against the config file's directory.
    cert: Option<PathBuf>,
    /// Required. PEM file of this agent's private key.
    /// Relative paths are resolved against the config file's directory.
    key: Option<PathBuf>,
    /// Most events in one batch. Allowed: 1 to 10000. Default: 1000.
    max_batch_events: Option<u64>,
    /// Most uncompressed bytes in one batch. Allowed: at least `sources.http.max_event_bytes`
    /// (so every accepted event fits), at most 16777216 (16 MiB). Default: 1048576 (1 MiB).
    max_batch_bytes: Option<u64>,
    /// Longest time in milliseconds an event waits for its batch to fill before the batch is
    /// sent anyway. Allowed: 1 to 60000. Default: 200.
    max_batch_age_ms: Option<u64>,
    /// Most batches sent and not yet acknowledged by the aggregator. Allowed: 1 to 64. Default: 8.
    max_in_flight_batches: Option<u64>,
    /// First delay in milliseconds before reconnecting after a lost connection; it doubles on
    /// every failure, with jitter. Allowed: at least 10. Default: 100.
    reconnect_min_ms: Option<u64>,
    /// Largest delay in milliseconds between reconnect attempts. Allowed: `reconnect_min_ms` to
    /// 600000. Default: 10000.
    reconnect_max_ms: Option<u64>,
    /// Interval in milliseconds of QUIC keep-alive packets. Allowed: at least 100 and less than
    /// `idle_timeout_ms`. Default: 2000.
    keep_alive_interval_ms: Option<u64>,
    /// The connection is closed after this many milliseconds without a packet from the
    /// aggregator. Allowed: at most 600000. Default: 10000.
    idle_timeout_ms: Option<u64>,
}

/// Reads, parses and validates an agent config file. Relative paths in it are resolved against the
/// file's directory.
pub fn load_agent(path: &Path) -> Result<AgentConfig, ConfigError> {
    let text = crate::common::read_file(path)?;
    parse_agent(&text, path)
}

/// Parses and validates agent config text; `origin` is the file name used in errors and whose
/// parent directory resolves relative paths.
pub fn parse_agent(text: &str, origin: &Path) -> Result<AgentConfig, ConfigError> {
    let raw: RawAgentFile = crate::common::parse_toml(text, origin)?;
    raw.validate(&mut Checker::new(origin))
}

/// Validates a parsed TOML table as an agent config file, with the same code as [`parse_agent`]:
/// the merge of a bootstrap file and a managed document (`crate::managed`).
pub(crate) fn validate_agent_table(
    table: toml::Table,
    origin: &Path,
) -> Result<AgentConfig, ConfigError> {
    let raw: RawAgentFile =
        toml::Value::Table(table)
            .try_into()
            .map_err(|error: toml::de::Error| ConfigError::Parse {
                file: origin.to_path_buf(),
                message: error.to_string().trim_end().to_owned(),
            })?;
    raw.validate(&mut Checker::new(origin))
}

/// Checks that `text` has the shape of an agent config file (known keys, right types) without
/// validating values or requiring keys: a managed document is only part of a config.
pub(crate) fn check_agent_shape(text: &str, origin: &Path) -> Result<(), ConfigError> {
    crate::common::parse_toml::<RawAgentFile>(text, origin).map(drop)
}

impl RawAgentFile {
    /// Applies defaults and checks every key; returns the first problem found, in file order.
    fn validate(self, checker: &mut Checker<'_>) -> Result<AgentConfig, ConfigError> {
        let data_dir = checker.path("agent.data_dir", self.agent.data_dir.as_deref(), || {
            PathBuf::from(DEFAULT_DATA_DIR)
        })?;
        let labels = validate_labels(checker, self.agent.labels.unwrap_or_default())?;
        let http = self.sources.http.validate(checker)?;
        let snowplow = self.sources.snowplow.validate(checker)?;
        let segment = self.sources.segment.validate(checker)?;
        let mqtt = crate::sources::validate_mqtt(checker, self.sources.mqtt)?;
        let mqtt_listener = self.sources.mqtt_listener.validate(checker)?;
        let buffer = self.buffer.validate(checker, &data_dir)?;
        let uplink = self.uplink.validate(checker, &http)?;
        let models = self.models.validate(checker)?;
        let rules = self.rules.validate(checker)?;
        let windows = self.windows.validate(checker)?;
        Ok(AgentConfig {
            data_dir,
            labels,
            http,
            snowplow,
            segment,
            mqtt,
            mqtt_listener,
            buffer,
            uplink,
            rules,
            windows,
            models,
        })
    }
}

/// Whether `text` is 1..=63 characters of `[a-zA-Z0-9_.-]`.
fn is_label_text(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_LABEL_CHARS
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn validate_labels(
    checker: &Checker<'_>,
    labels: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    const ALLOWED: &str = "1 to 63 characters of a-z, A-Z, 0-9, '_', '.' and '-'";
    for (name, value) in &labels {
        if !is_label_text(name) {
            return Err(checker.invalid(
                "agent.labels",
                format!("{{ {} = {} }}", quote(name), quote(value)),
                format!("label names must be {ALLOWED}"),
            ));
        }
        if !is_label_text(value) {
            return Err(checker.invalid(
                &format!("agent.labels.{name}"),
                quote(value),
                format!("label values must be {ALLOWED}"),
            ));
        }
    }
    Ok(labels)
}

impl RawHttpSource {
    fn validate(self, checker: &Checker<'_>) -> Result<HttpSourceConfig, ConfigError> {
        let listen = checker.socket_addr(
            "sources.http.listen",
            self.listen.as_deref(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, 9470)),
        )?;
        let max_body_bytes = checker.int_usize(
            "sources.http.max_body_bytes",
            self.max_body_bytes,
            MIB,
            KIB,
            Some(64 * MIB),
            Unit::Bytes,
        )?;
        let max_event_bytes = checker.int_usize(
            "sources.http.max_event_bytes",
            self.max_event_bytes,
            64 * KIB,
            256,
            Some(MAX_EVENT_BYTES),
            Unit::Bytes,
        )?;
        let stream =
            crate::sources::stream_name(checker, "sources.http.stream", self.stream, "default")?;
        let cors_allowed_origins = self.cors_allowed_origins.unwrap_or_default();
        for (idx, origin) in cors_allowed_origins.iter().enumerate() {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && !origin.contains(' '));
            if !ok {
                return Err(checker.invalid(
                    &format!("sources.http.cors_allowed_origins[{idx}]"),
                    quote(origin),
                    "must be \"*\" or an origin such as \"https://shop.example\" (scheme and host, no path or trailing /)",
                ));
            }
        }
        let auth_tokens = self.auth_tokens.unwrap_or_default();
        if let Some(idx) = auth_tokens.iter().position(|t| t.len() < 16) {
            return Err(checker.invalid(
                &format!("sources.http.auth_tokens[{idx}]"),
                "\"...\"",
                "must be at least 16 characters (a token short enough to guess protects nothing)",
            ));
        }
        Ok(HttpSourceConfig {
            listen,
            max_body_bytes,
            max_event_bytes,
            stream,
            cors_allowed_origins,
            auth_tokens,
        })
    }
}

impl RawBuffer {
    fn validate(
        self,
        checker: &mut Checker<'_>,
        data_dir: &Path,
    ) -> Result<BufferConfig, ConfigError> {
        let path = checker.path("buffer.path", self.path.as_deref(), || {
            data_dir.join("buffer.sqlite")
        })?;
        let max_bytes = checker.int(
            "buffer.max_bytes",
            self.max_bytes,
            GIB,
            MIB,
            None,
            Unit::Bytes,
        )?;
        let synchronous = checker.synchronous(
            "buffer.synchronous",
            self.synchronous.as_deref(),
            Synchronous::Full,
        )?;
        let when_full = match self.when_full.as_deref() {
            None | Some("block") => WhenFull::Block,
            Some("drop_newest") => WhenFull::DropNewest,
            Some("drop_oldest") => WhenFull::DropOldest,
            Some(other) => {
                return Err(checker.invalid(
                    "buffer.when_full",
                    quote(other),
                    "must be \"block\" (backpressure, loses nothing), \"drop_newest\" or \"drop_oldest\"",
                ));
            }
        };
        let block_timeout_ms = checker.int(
            "buffer.block_timeout_ms",
            self.block_timeout_ms,
            500,
            0,
            Some(60_000),
            Unit::Plain,
        )?;
        let stream_priorities = self.stream_priorities.unwrap_or_default();
        for stream in stream_priorities.keys() {
            crate::sources::stream_name(
                checker,
                "buffer.stream_priorities",
                Some(stream.clone()),
                "",
            )?;
        }
        Ok(BufferConfig {
            path,
            max_bytes,
            synchronous,
            when_full,
            block_timeout_ms,
            stream_priorities,
        })
    }
}

impl RawUplink {
    fn validate(
        self,
        checker: &mut Checker<'_>,
        http: &HttpSourceConfig,
    ) -> Result<UplinkConfig, ConfigError> {
        let aggregators = validate_aggregators(checker, self.aggregator, self.aggregators)?;
        let failover_after_ms = checker.int(
            "uplink.failover_after_ms",
            self.failover_after_ms,
            5_000,
            100,
            Some(3_600_000),
            Unit::Plain,
        )?;
        let failback_after_ms = checker.int(
            "uplink.failback_after_ms",
            self.failback_after_ms,
            60_000,
            0,
            Some(86_400_000),
            Unit::Plain,
        )?;
        let server_name = match self.server_name {
            None => "localhost".to_owned(),
            Some(name) if name.is_empty() || name.contains(char::is_whitespace) => {
                return Err(checker.invalid(
                    "uplink.server_name",
                    quote(&name),
                    "must be a non-empty DNS name or IP address without spaces, as written in \
                     the aggregator's certificate",
                ));
            }
            Some(name) => name,
        };
        let ca_cert = checker.required_path(
            "uplink.ca_cert",
            self.ca_cert.as_deref(),
            "the fleet CA certificate (PEM), made by `runnel-aggregator certs init`",
        )?;
        let cert = checker.required_path(
            "uplink.cert",
            self.cert.as_deref(),
            "this agent's certificate (PEM) signed by the fleet CA, made by \
             `runnel-aggregator certs`; its common name is the agent id",
        )?;
        let key = checker.required_path(
            "uplink.key",
            self.key.as_deref(),
            "this agent's private key (PEM), made together with its certificate by \
             `runnel-aggregator certs`",
        )?;
        let max_batch_events = checker.int_usize(
            "uplink.max_batch_events",
            self.max_batch_events,
            1000,
            1,
            Some(MAX_BATCH_EVENTS),
            Unit::Plain,
        )?;
        let max_batch_bytes = validate_max_batch_bytes(checker, self.max_batch_bytes, http)?;
        let max_batch_age_ms = checker.int(
            "uplink.max_batch_age_ms",
            self.max_batch_age_ms,
            200,
            1,
            Some(60_000),
            Unit::Plain,
        )?;
        let max_in_flight_batches = checker.int_usize(
            "uplink.max_in_flight_batches",
            self.max_in_flight_batches,
            8,
            1,
            Some(64),
            Unit::Plain,
        )?;
        let reconnect_min_ms = checker.int(
            "uplink.reconnect_min_ms",
            self.reconnect_min_ms,
            100,
            10,
            None,
            Unit::Plain,
        )?;
        let reconnect_max_ms = checker.int(
            "uplink.reconnect_max_ms",
            self.reconnect_max_ms,
            10_000,
            0,
            Some(600_000),
            Unit::Plain,
        )?;
        checker.ordered(
            (
                "uplink.reconnect_min_ms",
                reconnect_min_ms,
                self.reconnect_min_ms.is_some(),
            ),
            (
                "uplink.reconnect_max_ms",
                reconnect_max_ms,
                self.reconnect_max_ms.is_some(),
            ),
            false,
        )?;
        let keep_alive_interval_ms = checker.int(
            "uplink.keep_alive_interval_ms",
            self.keep_alive_interval_ms,
            2_000,
            100,
            None,
            Unit::Plain,
        )?;
        let idle_timeout_ms = checker.int(
            "uplink.idle_timeout_ms",
            self.idle_timeout_ms,
            10_000,
            0,
            Some(600_000),
            Unit::Plain,
        )?;
        checker.ordered(
            (
                "uplink.keep_alive_interval_ms",
                keep_alive_interval_ms,
                self.keep_alive_interval_ms.is_some(),
            ),
            (
                "uplink.idle_timeout_ms",
                idle_timeout_ms,
                self.idle_timeout_ms.is_some(),
            ),
            true,
        )?;
        Ok(UplinkConfig {
            aggregators,
            failover_after_ms,
            failback_after_ms,
            server_name,
            ca_cert,
            cert,
            key,
            max_batch_events,
            max_batch_bytes,
            max_batch_age_ms,
            max_in_flight_batches,
            reconnect_min_ms,
            reconnect_max_ms,
            keep_alive_interval_ms,
            idle_timeout_ms,
        })
    }
}

/// Most entries of `uplink.aggregators`: a bound like every list's. Every connect orders all of
/// them and the status lists them all; a fleet behind more aggregators than this is a different
/// design.
const MAX_AGGREGATORS: usize = 64;

/// Exactly one of `uplink.aggregator` and `uplink.aggregators`, as the list of addresses.
fn validate_aggregators(
    checker: &Checker<'_>,
    one: Option<String>,
    several: Option<Vec<String>>,
) -> Result<Vec<String>, ConfigError> {
    const KEY: &str = "uplink.aggregators";
    match (one, several) {
        (Some(_), Some(list)) => Err(checker.invalid(
            KEY,
            quote_list(&list),
            "uplink.aggregator is set too: set only one of them, uplink.aggregator for a single \
             aggregator or uplink.aggregators to list several",
        )),
        (None, None) => Err(checker.missing(
            "uplink.aggregator",
            "the aggregator's QUIC ingest address as \"host:port\", such as \
             \"aggregator.example.com:9480\"; or uplink.aggregators = [\"host:port\", ...] to list \
             several aggregators",
        )),
        (Some(text), None) => Ok(vec![validate_host_port(
            checker,
            "uplink.aggregator",
            text,
        )?]),
        (None, Some(list)) => {
            if list.is_empty() || list.len() > MAX_AGGREGATORS {
                return Err(checker.invalid(
                    KEY,
                    quote_list(&list),
                    format!(
                        "must list 1 to {MAX_AGGREGATORS} aggregators as \"host:port\", such as \
                         [\"agg-a.example.com:9480\", \"agg-b.example.com:9480\"]"
                    ),
                ));
            }
            for (idx, text) in list.iter().enumerate() {
                let key = format!("{KEY}[{idx}]");
                validate_host_port(checker, &key, text.clone())?;
                if let Some(first_idx) = list[..idx].iter().position(|other| other == text) {
                    return Err(checker.invalid(
                        &key,
                        quote(text),
                        format!(
                            "is listed twice (also {KEY}[{first_idx}]): list each aggregator once"
                        ),
                    ));
                }
            }
            Ok(list)
        }
    }
}

/// A list of strings as written in TOML.
fn quote_list(list: &[String]) -> String {
    let quoted: Vec<String> = list.iter().map(|text| quote(text)).collect();
    format!("[{}]", quoted.join(", "))
}

/// `host:port` with a non-empty host and a port in 1..=65535 after the last ':'. The host is not
/// resolved here: DNS may change while the agent runs, so the uplink resolves on every connect.
fn validate_host_port(
    checker: &Checker<'_>,
    key: &str,
    text: String,
) -> Result<String, ConfigError> {
    let valid = match text.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|port| port != 0)
        }
        None => false,
    };
    if !valid {
        return Err(checker.invalid(
            key,
            quote(&text),
            "must be \"host:port\" with a non-empty host and a port from 1 to 65535, such as \
             \"aggregator.example.com:9480\" or \"[2001:db8::1]:9480\"",
        ));
    }
    Ok(text)
}

/// A batch must hold at least one event of the largest accepted size, and no more than the wire
/// format's batch limit.
fn validate_max_batch_bytes(
    checker: &Checker<'_>,
    raw: Option<u64>,
    http: &HttpSourceConfig,
) -> Result<usize, ConfigError> {
    const KEY: &str = "uplink.max_batch_bytes";
    let max_event_bytes = http.max_event_bytes as u64;
    let value = raw.unwrap_or(MIB);
    if value < max_event_bytes {
        return Err(checker.invalid(
            KEY,
            value.to_string(),
            format!(
                "must be at least sources.http.max_event_bytes ({max_event_bytes}) so that every \
                 accepted event fits in a batch"
            ),
        ));
    }
    checker.int_usize(
        KEY,
        Some(value),
        MIB,
        max_event_bytes,
        Some(MAX_BATCH_BYTES),
        Unit::Bytes,
    )
}
