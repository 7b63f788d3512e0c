//! The aggregator config file (`aggregator.toml`): its raw TOML shape, its defaults and limits, and
//! validation into `AggregatorConfig`. It owns every aggregator key and the reason for each limit.
//! It must not touch the file system beyond resolving paths (the aggregator creates its
//! directories and reads certificates) and must not depend on anything the aggregator runs.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::common::{Checker, MIB, Synchronous, Unit, quote};
use crate::error::ConfigError;

/// Where the aggregator keeps its state when `aggregator.data_dir` is not set.
const DEFAULT_DATA_DIR: &str = "/var/lib/runnel-aggregator";

/// A validated aggregator config. Paths are absolute.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Directory for the aggregator's state; created by the aggregator, not by config.
    pub data_dir: PathBuf,
    /// The QUIC ingest server.
    pub ingest: IngestConfig,
    /// WAL and event files.
    pub storage: StorageConfig,
    /// The SQL query API.
    pub query: QueryConfig,
    /// The PostgreSQL wire protocol server.
    pub pgwire: PgwireConfig,
}

/// `[ingest]`, validated.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// UDP address of the QUIC server.
    pub listen: SocketAddr,
    /// PEM of the CA that signs agent certificates.
    pub ca_cert: PathBuf,
    /// Server certificate PEM.
    pub cert: PathBuf,
    /// Server private key PEM.
    pub key: PathBuf,
    /// Most batches in flight per agent connection.
    pub max_in_flight_batches: usize,
    /// Most agent connections at once.
    pub max_connections: usize,
    /// A connection is closed after this long without a packet from the agent.
    pub idle_timeout_ms: u64,
}

/// `[storage]`, validated.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// SQLite WAL file holding acknowledged batches until they are in Parquet files.
    pub wal_path: PathBuf,
    /// SQLite `synchronous` level of the WAL.
    pub synchronous: Synchronous,
    /// Directory of hour-partitioned Parquet event files.
    pub events_dir: PathBuf,
    /// Interval between flushes of recent rows to Parquet.
    pub flush_interval_ms: u64,
    /// Rows kept in memory before a flush is forced.
    pub max_recent_rows: usize,
}

/// `[query]`, validated.
#[derive(Debug, Clone)]
pub struct QueryConfig {
    /// Address of the HTTP SQL API; a loopback address unless `users` is not empty.
    pub listen: SocketAddr,
    /// Who may query (HTTP basic auth, PostgreSQL password auth). Empty: no credentials asked,
    /// and every SQL listener is on a loopback address.
    pub users: Vec<QueryUser>,
    /// Memory one query may use.
    pub memory_limit_bytes: u64,
    /// Longest time one query may run.
    pub timeout_ms: u64,
    /// Most rows one query may return.
    pub max_result_rows: usize,
}

/// `[[query.users]]`, validated: a name and its password (read from the environment variable
/// `password_env` names, if that is how it was given).
#[derive(Clone, PartialEq, Eq)]
pub struct QueryUser {
    pub name: String,
    pub password: String,
}

impl std::fmt::Debug for QueryUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryUser")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `[pgwire]`, validated.
#[derive(Debug, Clone)]
pub struct PgwireConfig {
    /// TCP address of the PostgreSQL wire protocol server; `None` when disabled.
    pub listen: Option<SocketAddr>,
}

/// The aggregator config file as written. Every key is optional here; `validate` applies defaults
/// and reports missing required keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregatorFile {
    /// `[aggregator]`: state of this aggregator.
    #[serde(default)]
    aggregator: RawAggregator,
    /// `[ingest]`: the QUIC server agents send batches to.
    #[serde(default)]
    ingest: RawIngest,
    /// `[storage]`: the WAL and the event files.
    #[serde(default)]
    storage: RawStorage,
    /// `[query]`: the HTTP SQL API, its limits and its users.
    #[serde(default)]
    query: RawQuery,
    /// `[pgwire]`: the PostgreSQL wire protocol server (psql, Grafana, JDBC, psycopg).
    #[serde(default)]
    pgwire: RawPgwire,
}

/// `[aggregator]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregator {
    /// Directory for the aggregator's state (WAL, event files). Created by the aggregator.
    /// Relative paths are resolved against the config file's directory.
    /// Default: "/var/lib/runnel-aggregator".
    data_dir: Option<PathBuf>,
}

/// `[ingest]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngest {
    /// UDP address and port of the QUIC server. Default: "0.0.0.0:9480".
    listen: Option<String>,
    /// Required. PEM file of the fleet CA; only agents with a certificate it signed get in.
    /// Relative paths are resolved against the config file's directory.
    ca_cert: Option<PathBuf>,
    /// Required. PEM file of the server certificate agents check (its name is the agents'
    /// `uplink.server_name`). Relative paths are resolved against the config file's directory.
    cert: Option<PathBuf>,
    /// Required. PEM file of the server's private key.
    /// Relative paths are resolved against the config file's directory.
    key: Option<PathBuf>,
    /// Most batches in flight per agent connection (QUIC streams the agent may open).
    /// Allowed: 1 to 1024. Default: 64.
    max_in_flight_batches: Option<u64>,
    /// Most agent connections at once; more are refused. Allowed: at least 1. Default: 10000.
    max_connections: Option<u64>,
    /// A connection is closed after this many milliseconds without a packet from the agent.
    /// Allowed: 1000 to 600000. Default: 10000.
    idle_timeout_ms: Option<u64>,
}

/// `[storage]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    /// SQLite WAL file: batches are committed here before they are acknowledged.
    /// Relative paths are resolved against the config file's directory.
    /// Default: "<data_dir>/wal.sqlite".
    wal_path: Option<PathBuf>,
    /// SQLite `synchronous` level of the WAL: "off", "normal", "full" or "extra". Only "full"
    /// and "extra" keep every acknowledged batch across power loss. Default: "full".
    synchronous: Option<String>,
    /// Directory of the Parquet event files, partitioned by date and hour.
    /// Relative paths are resolved against the config file's directory.
    /// Default: "<data_dir>/events".
    events_dir: Option<PathBuf>,
    /// Milliseconds between flushes of recent rows to Parquet files.
    /// Allowed: 100 to 86400000 (one day). Default: 60000.
    flush_interval_ms: Option<u64>,
    /// Rows kept in memory before a flush is forced, whatever the interval.
    /// Allowed: at least 1. Default: 1000000.
    max_recent_rows: Option<u64>,
}

/// `[query]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    /// Address and port of the HTTP SQL API. A non-loopback address needs `[[query.users]]`.
    /// Default: "127.0.0.1:9481".
    listen: Option<String>,
    /// Memory in bytes one query may use before it fails.
    /// Allowed: at least 16777216 (16 MiB). Default: 536870912 (512 MiB).
    memory_limit_bytes: Option<u64>,
    /// Milliseconds one query may run before it is cancelled.
    /// Allowed: 100 to 3600000 (one hour). Default: 30000.
    timeout_ms: Option<u64>,
    /// Most rows one query may return; larger results fail with a message.
    /// Allowed: at least 1. Default: 100000.
    max_result_rows: Option<u64>,
    /// `[[query.users]]`: who may query over HTTP (basic auth) and the PostgreSQL protocol
    /// (SCRAM-SHA-256). With at least one user, every connection must authenticate, loopback
    /// included. Default: none (only loopback listeners allowed).
    #[serde(default)]
    users: Vec<RawQueryUser>,
}

/// `[[query.users]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueryUser {
    /// Required. The user name clients log in with.
    name: Option<String>,
    /// The password, in the file. Exactly one of `password` and `password_env` is required.
    password: Option<String>,
    /// Name of an environment variable holding the password (keeps it out of the file).
    password_env: Option<String>,
}

/// `[pgwire]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPgwire {
    /// Serve the PostgreSQL wire protocol. Default: true.
    enabled: Option<bool>,
    /// TCP address and port. A non-loopback address needs `[[query.users]]`. Not 5432 by
    /// default, which a local PostgreSQL may hold. Default: "127.0.0.1:9482".
    listen: Option<String>,
}

/// Reads, parses and validates an aggregator config file. Relative paths in it are resolved
/// against the file's directory.
pub fn load_aggregator(path: &Path) -> Result<AggregatorConfig, ConfigError> {
    let text = crate::common::read_file(path)?;
    parse_aggregator(&text, path)
}

/// Parses and validates aggregator config text; `origin` is the file name used in errors and
/// whose parent directory resolves relative paths.
pub fn parse_aggregator(text: &str, origin: &Path) -> Result<AggregatorConfig, ConfigError> {
    let raw: RawAggregatorFile = crate::common::parse_toml(text, origin)?;
    raw.validate(&mut Checker::new(origin))
}

impl RawAggregatorFile {
    /// Applies defaults and checks every key; returns the first problem found, in file order.
    fn validate(self, checker: &mut Checker<'_>) -> Result<AggregatorConfig, ConfigError> {
        let data_dir = checker.path(
            "aggregator.data_dir",
            self.aggregator.data_dir.as_deref(),
            || PathBuf::from(DEFAULT_DATA_DIR),
        )?;
        let ingest = self.ingest.validate(checker)?;
        let storage = self.storage.validate(checker, &data_dir)?;
        let query = self.query.validate(checker)?;
        let pgwire = self.pgwire.validate(checker, !query.users.is_empty())?;
        Ok(AggregatorConfig {
            data_dir,
            ingest,
            storage,
            query,
            pgwire,
        })
    }
}

impl RawIngest {
    fn validate(self, checker: &mut Checker<'_>) -> Result<IngestConfig, ConfigError> {
        let listen = checker.socket_addr(
            "ingest.listen",
            self.listen.as_deref(),
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9480)),
        )?;
        let ca_cert = checker.required_path(
            "ingest.ca_cert",
            self.ca_cert.as_deref(),
            "the fleet CA certificate (PEM) that signs agent certificates, made by \
             `runnel-aggregator certs init`",
        )?;
        let cert = checker.required_path(
            "ingest.cert",
            self.cert.as_deref(),
            "the aggregator's server certificate (PEM), made by `runnel-aggregator certs init`",
        )?;
        let key = checker.required_path(
            "ingest.key",
            self.key.as_deref(),
            "the aggregator's server private key (PEM), made by `runnel-aggregator certs init`",
        )?;
        let max_in_flight_batches = checker.int_usize(
            "ingest.max_in_flight_batches",
            self.max_in_flight_batches,
            64,
            1,
            Some(1024),
            Unit::Plain,
        )?;
        let max_connections = checker.int_usize(
            "ingest.max_connections",
            self.max_connections,
            10_000,
            1,
            None,
            Unit::Plain,
        )?;
        let idle_timeout_ms = checker.int(
            "ingest.idle_timeout_ms",
            self.idle_timeout_ms,
            10_000,
            1_000,
            Some(600_000),
            Unit::Plain,
        )?;
        Ok(IngestConfig {
            listen,
            ca_cert,
            cert,
            key,
            max_in_flight_batches,
            max_connections,
            idle_timeout_ms,
        })
    }
}

impl RawStorage {
    fn validate(
        self,
        checker: &mut Checker<'_>,
        data_dir: &Path,
    ) -> Result<StorageConfig, ConfigError> {
        let wal_path = checker.path("storage.wal_path", self.wal_path.as_deref(), || {
            data_dir.join("wal.sqlite")
        })?;
        let synchronous = checker.synchronous(
            "storage.synchronous",
            self.synchronous.as_deref(),
            Synchronous::Full,
        )?;
        let events_dir = checker.path("storage.events_dir", self.events_dir.as_deref(), || {
            data_dir.join("events")
        })?;
        let flush_interval_ms = checker.int(
            "storage.flush_interval_ms",
            self.flush_interval_ms,
            60_000,
            100,
            Some(86_400_000),
            Unit::Plain,
        )?;
        let max_recent_rows = checker.int_usize(
            "storage.max_recent_rows",
            self.max_recent_rows,
            1_000_000,
            1,
            None,
            Unit::Plain,
        )?;
        Ok(StorageConfig {
            wal_path,
            synchronous,
            events_dir,
            flush_interval_ms,
            max_recent_rows,
        })
    }
}

impl RawQuery {
    fn validate(self, checker: &mut Checker<'_>) -> Result<QueryConfig, ConfigError> {
        let listen = checker.socket_addr(
            "query.listen",
            self.listen.as_deref(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, 9481)),
        )?;
        let users = validate_users(checker, self.users)?;
        // Architecture invariant: the SQL API is never reachable beyond this host without
        // credentials.
        if !listen.ip().is_loopback() && users.is_empty() {
            return Err(checker.invalid(
                "query.listen",
                quote(self.listen.as_deref().unwrap_or_default()),
                NEEDS_USERS,
            ));
        }
        let memory_limit_bytes = checker.int(
            "query.memory_limit_bytes",
            self.memory_limit_bytes,
            512 * MIB,
            16 * MIB,
            None,
            Unit::Bytes,
        )?;
        let timeout_ms = checker.int(
            "query.timeout_ms",
            self.timeout_ms,
            30_000,
            100,
            Some(3_600_000),
            Unit::Plain,
        )?;
        let max_result_rows = checker.int_usize(
            "query.max_result_rows",
            self.max_result_rows,
            100_000,
            1,
            None,
            Unit::Plain,
        )?;
        Ok(QueryConfig {
            listen,
            users,
            memory_limit_bytes,
            timeout_ms,
            max_result_rows,
        })
    }
}

/// Why a non-loopback SQL listener is refused without users.
const NEEDS_USERS: &str = "must be a loopback address (such as \"127.0.0.1:9481\" or \"[::1]:9481\") \
     while no [[query.users]] are configured: the SQL API is never exposed without credentials. \
     Add a [[query.users]] entry (name and password or password_env), or keep 127.0.0.1 and use \
     an SSH tunnel";

fn validate_users(
    checker: &Checker<'_>,
    raw: Vec<RawQueryUser>,
) -> Result<Vec<QueryUser>, ConfigError> {
    let mut users: Vec<QueryUser> = Vec::with_capacity(raw.len());
    for (idx, user) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("query.users[{idx}].{field}");
        let name = user
            .name
            .ok_or_else(|| checker.missing(&key("name"), "the user name clients log in with"))?;
        if name.is_empty() || name.chars().any(|c| c.is_control() || c == ':') {
            return Err(checker.invalid(
                &key("name"),
                quote(&name),
                "must be non-empty, without control characters or ':'",
            ));
        }
        if users.iter().any(|u| u.name == name) {
            return Err(checker.invalid(&key("name"), quote(&name), "is already a user above"));
        }
        let password = match (user.password, user.password_env) {
            (Some(password), None) => password,
            (None, Some(var)) => std::env::var(&var).map_err(|_| {
                checker.invalid(
                    &key("password_env"),
                    quote(&var),
                    "names an environment variable that is not set (or not UTF-8) in the \
                     aggregator's environment",
                )
            })?,
            (Some(_), Some(_)) => {
                return Err(checker.invalid(
                    &key("password_env"),
                    "(set)",
                    "give either password or password_env, not both",
                ));
            }
            (None, None) => {
                return Err(checker.missing(
                    &key("password"),
                    "a password, or password_env naming an environment variable that holds it",
                ));
            }
        };
        if password.len() < 8 {
            return Err(checker.invalid(
                &key("password"),
                "(hidden)",
                "must be at least 8 characters long",
            ));
        }
        users.push(QueryUser { name, password });
    }
    Ok(users)
}

impl RawPgwire {
    fn validate(self, checker: &Checker<'_>, has_users: bool) -> Result<PgwireConfig, ConfigError> {
        let listen = checker.socket_addr(
            "pgwire.listen",
            self.listen.as_deref(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, 9482)),
        )?;
        if !self.enabled.unwrap_or(true) {
            return Ok(PgwireConfig { listen: None });
        }
        if !listen.ip().is_loopback() && !has_users {
            return Err(checker.invalid(
                "pgwire.listen",
                quote(self.listen.as_deref().unwrap_or_default()),
                NEEDS_USERS,
            ));
        }
        Ok(PgwireConfig {
            listen: Some(listen),
        })
    }
}
