//! Runnel configuration, shared by both binaries (the aggregator also validates agent configs
//! before it rolls them out). This crate owns the config file formats: raw TOML types with every key
//! optional and unknown keys rejected, then `validate()` into plain validated structs with defaults
//! applied and relative paths resolved. Parse, then validate, then act: it must not act. It does no
//! I/O beyond reading the one config file, creates no directories, opens no sockets or databases
//! and reads no certificates.
//!
//! Architecture invariant: no dependency on runnel-common, tokio, or anything a binary runs; the
//! few wire limits it checks are copied as literals with a comment.

mod actions;
mod agent;
mod aggregator;
mod common;
mod error;
mod expr;
pub mod fuzzing;
pub mod managed;
mod models;
mod rules;
mod sources;
mod windows;

pub use actions::{
    ActionConfig, LocalActions, LogActionConfig, LogLevel, MqttActionConfig, RateLimit,
    WebhookActionConfig,
};
pub use agent::{
    AgentConfig, BufferConfig, DEFAULT_STREAM_PRIORITY, HttpSourceConfig, UplinkConfig, WhenFull,
    load_agent, parse_agent,
};
pub use aggregator::{
    AggregatorConfig, FederationConfig, FederationSource, FileFormat, FleetConfig, IngestConfig,
    PgwireConfig, PostgresSource, QueryConfig, QueryUser, S3Config, StorageConfig, load_aggregator,
    parse_aggregator,
};
pub use common::Synchronous;
pub use error::ConfigError;
pub use expr::{CelError, MAX_EXPR_BYTES, TemplatePart, check_cel, parse_template};
pub use models::{ClassLabel, EventField, ModelConfig, ModelInput, OutputField, Transform};
pub use rules::{FieldPath, MatchMode, RuleConfig, RuleEntry, RuleSetConfig, RulesConfig};
pub use sources::{
    MqttListenerConfig, MqttPayload, MqttSourceConfig, SegmentConfig, SnowplowConfig,
};
pub use windows::{
    AggregateConfig, AggregateFunction, WindowConfig, WindowKind, is_field_path, is_identifier,
};
