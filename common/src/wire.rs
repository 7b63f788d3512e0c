//! Messages exchanged between agent and aggregator over QUIC (ALPN [`ALPN`]).
//!
//! One connection per agent. The first bidirectional stream the agent opens is the control
//! stream: `Hello` -> `Welcome`, then heartbeats and (later) config pushes. Every batch travels on
//! its own bidirectional stream: one [`BatchMessage`] frame from the agent, one [`AckMessage`]
//! frame back. Batches form a chain: each names the last sequence number of the batch before it
//! (`after_seq`), which lets the aggregator commit them in order and recognise replays.
//!
//! Compatibility: postcard is not self-describing. Never reorder or remove variants or fields;
//! append new enum variants at the end, and bump [`PROTOCOL_VERSION`] when a peer must know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// QUIC application protocol name.
pub const ALPN: &[u8] = b"runnel/1";

/// Highest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 4;
/// Lowest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The first protocol version with fleet configuration: [`AgentMessage::Status`] replaces
/// [`AgentMessage::Heartbeat`], and the control stream carries [`AggregatorMessage::ConfigPush`]
/// and [`AgentMessage::ConfigResult`]. On protocol 1 none of these may be sent.
pub const FLEET_PROTOCOL_VERSION: u16 = 2;

/// The first protocol version on which the agent names its delivered mark: right after a Welcome
/// naming this version or a later one, its first control-stream message is
/// [`AgentMessage::Resume`], sent before any batch, and both sides start the connection's batch
/// chain at the higher of the Welcome's mark and the agent's delivered mark. The agent cannot
/// send it in place of its Hello: an aggregator on an older protocol cannot decode a variant it
/// does not know, and the agent learns the version only from the Welcome.
pub const RESUME_PROTOCOL_VERSION: u16 = 4;

const _: () = assert!(MIN_PROTOCOL_VERSION <= PROTOCOL_VERSION);
const _: () = assert!(RESUME_PROTOCOL_VERSION <= PROTOCOL_VERSION);
const _: () = assert!(FLEET_PROTOCOL_VERSION > MIN_PROTOCOL_VERSION);

/// Agent -> aggregator on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Hello),
    /// Protocol 1 status. Agents on protocol 2 send [`AgentMessage::Status`] instead.
    Heartbeat(Heartbeat),
    /// Protocol 2: full status, sent every heartbeat interval and right after a config change.
    Status(Status),
    /// Protocol 2: the outcome of a [`ConfigPush`].
    ConfigResult(ConfigResult),
    /// Protocol 4: where this connection's batch chain may start, sent once, right after the
    /// Welcome and before any batch ([`RESUME_PROTOCOL_VERSION`]).
    Resume(Resume),
}

impl AgentMessage {
    /// The lowest protocol version on which this message may be sent.
    pub fn since_protocol(&self) -> u16 {
        match self {
            AgentMessage::Hello(_) | AgentMessage::Heartbeat(_) => 1,
            AgentMessage::Status(_) | AgentMessage::ConfigResult(_) => FLEET_PROTOCOL_VERSION,
            AgentMessage::Resume(_) => RESUME_PROTOCOL_VERSION,
        }
    }
}

/// Aggregator -> agent on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AggregatorMessage {
    Welcome(Welcome),
    /// The aggregator will not serve this agent; the connection closes after it.
    Refused {
        reason: String,
    },
    /// Protocol 2: a managed pipeline config the agent should apply.
    ConfigPush(ConfigPush),
}

impl AggregatorMessage {
    /// The lowest protocol version on which this message may be sent.
    pub fn since_protocol(&self) -> u16 {
        match self {
            AggregatorMessage::Welcome(_) | AggregatorMessage::Refused { .. } => 1,
            AggregatorMessage::ConfigPush(_) => FLEET_PROTOCOL_VERSION,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Lowest and highest protocol versions the agent speaks.
    pub min_protocol_version: u16,
    pub max_protocol_version: u16,
    /// The agent's software version (`CARGO_PKG_VERSION`).
    pub agent_version: String,
    /// Hash of the agent's effective configuration ("" when unknown).
    pub config_hash: String,
    pub labels: BTreeMap<String, String>,
    /// Highest sequence number the agent has ever assigned (0 if none). Lets the aggregator spot
    /// an agent whose buffer was reset.
    pub last_assigned_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides will speak.
    pub protocol_version: u16,
    /// Highest sequence number the aggregator has stored for this agent. Everything at or below
    /// it is durable: the agent may delete it and starts its next batch chain after it.
    pub high_water_mark: u64,
    /// Most batches the agent may have in flight on this connection.
    pub max_in_flight_batches: u32,
    /// How often the agent should send a heartbeat (0: never).
    pub heartbeat_interval_ms: u32,
    /// The agent id the aggregator read from the certificate, for the agent's logs.
    pub agent_id: String,
    pub aggregator_version: String,
}

/// The agent's delivered mark, on protocol 4: what it no longer holds because an aggregator
/// acknowledged it. With several aggregators an agent may have moved since this aggregator last
/// stored its events: the events the other one acknowledged are gone from the agent's buffer and
/// will never be sent here, so this connection's chain starts at
/// `max(Welcome.high_water_mark, delivered_seq)` on both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    /// Every sequence number at or below this was acknowledged by some aggregator (as part of an
    /// acknowledged batch's range or below a Welcome's mark): the agent will never send it again.
    /// 0 when the agent knows of none.
    pub delivered_seq: u64,
}

/// Agent status, sent periodically on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub n_buffered_events: u64,
    pub buffered_bytes: u64,
    /// Age of the oldest event not yet acknowledged by the aggregator.
    pub oldest_unshipped_age_ms: u64,
    pub n_dropped_events: u64,
}

/// Agent status on protocol 2: what the fleet registry shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Hash of the effective config the agent runs (bootstrap merged with the managed config).
    pub config_hash: String,
    /// Version of the managed config document it runs (0: none pushed yet, bootstrap only).
    pub config_version: u64,
    /// The agent's software version.
    pub agent_version: String,
    /// Health per component (sources, buffer, uplink, pipeline), in a stable order.
    pub components: Vec<ComponentHealth>,
    pub n_buffered_events: u64,
    pub buffered_bytes: u64,
    /// Age of the oldest event not yet acknowledged by the aggregator.
    pub oldest_unshipped_age_ms: u64,
    /// Events dropped since the agent started, by reason (`buffer_full_drop_newest`, ...).
    pub drops: BTreeMap<String, u64>,
    /// Other counters since start, by name (`events_received`, `action_errors`, ...).
    pub counters: BTreeMap<String, u64>,
}

/// One component's health in a [`Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentHealth {
    /// `http`, `mqtt:<name>`, `mqtt_listener`, `buffer`, `uplink`, `pipeline`.
    pub name: String,
    pub healthy: bool,
    /// Why it is unhealthy, or a short note ("" when there is nothing to say).
    pub detail: String,
}

/// A managed config for the agent: the pipeline part of its config (sources, rules, windows,
/// models, buffer policies), merged over the agent's local bootstrap file. The whole message must
/// fit in [`crate::limits::MAX_CONTROL_FRAME_BYTES`]; each file is at most
/// [`crate::limits::MAX_CONFIG_FILE_BYTES`] and document plus files at most
/// [`crate::limits::MAX_CONFIG_PUSH_BYTES`]. The agent answers every push with one
/// [`ConfigResult`] naming the same `version` and `hash`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigPush {
    /// Version of the config document at the aggregator (increasing).
    pub version: u64,
    /// Hash of the document and its files, as the aggregator computed it
    /// (`runnel_config::managed::document_hash`); echoed in the [`ConfigResult`].
    pub hash: String,
    /// The managed config, TOML text.
    pub document: String,
    /// Files the document refers to (models), by the name it uses.
    pub files: Vec<ConfigFile>,
}

/// A file travelling with a [`ConfigPush`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigFile {
    pub name: String,
    /// SHA-256 of `content`, lowercase hex; checked by the agent before use.
    pub sha256: String,
    pub content: Vec<u8>,
}

/// The agent's answer to a [`ConfigPush`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigResult {
    /// `version` of the push this answers.
    pub version: u64,
    /// `hash` of the push this answers (the document hash, not the effective config hash: that
    /// one is in the [`Status`] that follows an apply).
    pub hash: String,
    pub outcome: ConfigOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ConfigOutcome {
    /// Validated, built, swapped in and saved as last-good.
    Applied,
    /// Not applied; the agent keeps running its previous config.
    Failed { error: String },
}

/// Agent -> aggregator, the only frame on a batch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BatchMessage {
    Batch(Batch),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Last sequence number of the previous batch in the chain (the `Welcome` high-water mark for
    /// the first batch on a connection). Sequence numbers in this batch are all above it.
    pub after_seq: u64,
    /// Sequence number of the last event in this batch.
    pub last_seq: u64,
    pub n_events: u32,
    /// Size of the payload once decompressed: checked against limits before decompressing.
    pub uncompressed_bytes: u32,
    pub compression: Compression,
    /// The events, postcard-encoded as `Vec<Event>`, then compressed.
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// Row-wise postcard `Vec<Event>`, uncompressed.
    None,
    /// Row-wise postcard `Vec<Event>`, zstd-compressed.
    Zstd,
    /// Column-wise ([`crate::columnar`]), zstd-compressed. Sent only to aggregators that speak
    /// protocol 2 ([`BATCH_COLUMNS_PROTOCOL_VERSION`]).
    ZstdColumns,
    /// Column-wise, second layout ([`crate::columnar::Layout::V2`]), zstd-compressed. Sent only
    /// to aggregators that speak protocol 3 ([`BATCH_COLUMNS_2_PROTOCOL_VERSION`]).
    ZstdColumns2,
}

/// The first protocol version whose aggregators accept [`Compression::ZstdColumns`] batches.
pub const BATCH_COLUMNS_PROTOCOL_VERSION: u16 = 2;
/// The first protocol version whose aggregators accept [`Compression::ZstdColumns2`] batches.
pub const BATCH_COLUMNS_2_PROTOCOL_VERSION: u16 = 3;

impl Compression {
    /// The column-wise layout of this compression, if it is one.
    pub fn columns_layout(self) -> Option<crate::columnar::Layout> {
        match self {
            Compression::None | Compression::Zstd => None,
            Compression::ZstdColumns => Some(crate::columnar::Layout::V1),
            Compression::ZstdColumns2 => Some(crate::columnar::Layout::V2),
        }
    }

    /// The best batch compression a peer on protocol `version` accepts.
    pub fn for_protocol(version: u16) -> Compression {
        if version >= BATCH_COLUMNS_2_PROTOCOL_VERSION {
            Compression::ZstdColumns2
        } else if version >= BATCH_COLUMNS_PROTOCOL_VERSION {
            Compression::ZstdColumns
        } else {
            Compression::Zstd
        }
    }
}

/// Aggregator -> agent, the only frame back on a batch stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AckMessage {
    Ack(Ack),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    /// `last_seq` of the batch this answers.
    pub last_seq: u64,
    pub outcome: AckOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AckOutcome {
    /// Committed to the aggregator's WAL. `n_new` events were new; the rest were replays.
    Stored { n_new: u32 },
    /// Every event was at or below the high-water mark: already stored, nothing written.
    Duplicate,
    /// Not stored. The agent keeps the events and resends them on a new connection.
    Rejected { reason: String },
}

impl AckOutcome {
    /// True when the events of the batch are durable at the aggregator.
    pub fn is_durable(&self) -> bool {
        matches!(self, AckOutcome::Stored { .. } | AckOutcome::Duplicate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::columnar::Layout;

    /// Each peer gets the best layout its protocol version accepts, and never a newer one.
    #[test]
    fn batch_compression_follows_the_negotiated_version() {
        let expected = [
            (1, Compression::Zstd, None),
            (2, Compression::ZstdColumns, Some(Layout::V1)),
            (3, Compression::ZstdColumns2, Some(Layout::V2)),
        ];
        for (version, compression, layout) in expected {
            assert_eq!(Compression::for_protocol(version), compression, "{version}");
            assert_eq!(compression.columns_layout(), layout, "{version}");
        }
        assert_eq!(
            Compression::for_protocol(PROTOCOL_VERSION),
            Compression::ZstdColumns2
        );
    }
}
