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
    /// External sources SQL can read next to `events`, in file order.
    pub federation: Vec<FederationConfig>,
    /// Fleet configuration: heartbeats and rollout defaults.
    pub fleet: FleetConfig,
}

/// `[fleet]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetConfig {
    /// How often agents send their status (announced in the Welcome).
    pub heartbeat_interval_ms: u64,
    /// Bake time of a rollout whose push does not say.
    pub default_bake_ms: u64,
    /// How long a pushed agent has to answer, when the push does not say.
    pub default_apply_timeout_ms: u64,
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
    /// SQLite WAL file holding acknowledged batches until they are in the events table.
    pub wal_path: PathBuf,
    /// SQLite `synchronous` level of the WAL.
    pub synchronous: Synchronous,
    /// Directory of the events table (Delta Lake), partitioned by event date and hour.
    pub events_dir: PathBuf,
    /// Interval between flushes of recent rows to the events table.
    pub flush_interval_ms: u64,
    /// Rows kept in memory before a flush is forced.
    pub max_recent_rows: usize,
    /// Event-time hours kept; older partitions are deleted. 0 keeps everything.
    pub retention_hours: u64,
    /// An hour partition with this many small files gets them merged into one. 0 turns
    /// compaction off.
    pub compact_min_files: usize,
    /// Minutes a file no table version references is kept before it is deleted (vacuum), so
    /// a reader that started on an older version of the table still finishes.
    pub vacuum_grace_minutes: u64,
    /// Where the Delta table goes when not in `events_dir`: an S3 bucket (`storage.url`).
    pub s3: Option<S3Config>,
}

/// `storage.url = "s3://..."` with `[storage.s3]`, validated: an S3 or S3-compatible bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` ("" for the bucket root).
    pub prefix: String,
    /// AWS region (S3-compatible stores accept any; `us-east-1` is the convention).
    pub region: String,
    /// Endpoint URL of an S3-compatible store (MinIO, Ceph, R2...); None: AWS.
    pub endpoint: Option<String>,
    /// Whether plain `http://` endpoints are allowed (a store on a trusted network).
    pub allow_http: bool,
    /// Access key id and secret from the environment variables the config names; None: the
    /// usual AWS sources (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, web identity, instance
    /// metadata), read by the aggregator at start.
    pub credentials: Option<(String, String)>,
}

impl S3Config {
    /// The URL DataFusion reads the files from: `s3://bucket/prefix`.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("allow_http", &self.allow_http)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(id, _)| (id, "<redacted>")),
            )
            .finish()
    }
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

/// `[[federation]]`, validated: an external source that SQL reads next to `events`, never
/// writes.
#[derive(Debug, Clone, PartialEq)]
pub struct FederationConfig {
    /// The SQL name: a schema (PostgreSQL, SQLite: `name.table`) or a table (files).
    pub name: String,
    /// Where the data is.
    pub source: FederationSource,
}

/// What a `[[federation]]` entry reads.
#[derive(Debug, Clone, PartialEq)]
pub enum FederationSource {
    /// A PostgreSQL database: the tables and views of one schema.
    Postgres(PostgresSource),
    /// A SQLite database file, opened read-only: its tables and views.
    Sqlite {
        /// The database file (absolute).
        path: PathBuf,
        /// Only these tables; `None`: every table and view.
        tables: Option<Vec<String>>,
    },
    /// A directory of files of one format (or a single file), read as one table.
    Files {
        format: FileFormat,
        /// Directory or file (absolute).
        path: PathBuf,
        /// Only files whose name ends with this are read; empty: every file.
        file_extension: String,
        /// CSV only: the first line of each file names the columns.
        has_header: bool,
    },
}

/// The format of a `[[federation]]` file source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Parquet,
    Csv,
    /// Newline-delimited JSON: one object per line.
    Json,
}

impl FileFormat {
    /// The spelling of `kind` in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            FileFormat::Parquet => "parquet",
            FileFormat::Csv => "csv",
            FileFormat::Json => "json",
        }
    }
}

/// A PostgreSQL `[[federation]]` source. Its `Debug` hides passwords.
#[derive(Clone, PartialEq)]
pub struct PostgresSource {
    /// `postgresql://user[:password]@host[:port]/database[?parameters]`, as written.
    pub url: String,
    /// The password from the environment variable `password_env` names; overrides the URL's.
    pub password: Option<String>,
    /// The remote schema whose tables and views are read.
    pub schema: String,
    /// Only these tables; `None`: every table and view of `schema`.
    pub tables: Option<Vec<String>>,
}

impl PostgresSource {
    /// The URL with any password replaced by `<redacted>`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl std::fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSource")
            .field("url", &self.redacted_url())
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("schema", &self.schema)
            .field("tables", &self.tables)
            .finish()
    }
}

/// `url` with the password of its user part and any `password=` parameter replaced by
/// `<redacted>`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(idx) => rest.split_at(idx),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((user_info, hosts)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{user}:<redacted>@{hosts}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let parameters: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key == "password" => format!("{key}=<redacted>"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", parameters.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
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
    /// `[[federation]]`: external sources SQL can read, read-only.
    #[serde(default)]
    federation: Vec<RawFederation>,
    /// `[fleet]`: agent heartbeats and config rollout defaults.
    #[serde(default)]
    fleet: RawFleet,
}

/// `[fleet]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    /// Status interval announced to agents, 1 s to 10 min. Default: 5000.
    heartbeat_interval_ms: Option<u64>,
    /// Rollout bake time when a push does not say, up to 1 day. Default: 60000.
    default_bake_ms: Option<u64>,
    /// Time a pushed agent has to answer when a push does not say, 1 s to 1 h. Default: 60000.
    default_apply_timeout_ms: Option<u64>,
}

impl RawFleet {
    fn validate(self, checker: &Checker<'_>) -> Result<FleetConfig, ConfigError> {
        Ok(FleetConfig {
            heartbeat_interval_ms: checker.int(
                "fleet.heartbeat_interval_ms",
                self.heartbeat_interval_ms,
                5_000,
                1_000,
                Some(600_000),
                Unit::Plain,
            )?,
            default_bake_ms: checker.int(
                "fleet.default_bake_ms",
                self.default_bake_ms,
                60_000,
                0,
                Some(86_400_000),
                Unit::Plain,
            )?,
            default_apply_timeout_ms: checker.int(
                "fleet.default_apply_timeout_ms",
                self.default_apply_timeout_ms,
                60_000,
                1_000,
                Some(3_600_000),
                Unit::Plain,
            )?,
        })
    }
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
    /// Directory of the events table (Delta Lake: `_delta_log/` and Parquet data files,
    /// partitioned by event date and hour).
    /// Relative paths are resolved against the config file's directory.
    /// Default: "<data_dir>/events".
    events_dir: Option<PathBuf>,
    /// Milliseconds between flushes of recent rows to the events table (one commit each).
    /// Allowed: 100 to 86400000 (one day). Default: 60000.
    flush_interval_ms: Option<u64>,
    /// Rows kept in memory before a flush is forced, whatever the interval.
    /// Allowed: at least 1. Default: 1000000.
    max_recent_rows: Option<u64>,
    /// Hours of events kept, by event time: partitions whose hour ended longer ago are removed
    /// from the table in one commit (checked after every flush). 0 keeps everything. Default: 0.
    retention_hours: Option<u64>,
    /// Merge the small data files (under 32 MiB) of an hour partition once it has this many, in
    /// one optimize commit (checked after every flush). 0 turns compaction off; otherwise at least 2. Default: 8.
    compact_min_files: Option<u64>,
    /// Minutes a data file that no table version references any more (replaced by compaction,
    /// removed by retention, or left by an interrupted flush) is kept before it is deleted, so
    /// that a reader that started on an older version still finishes (checked every few
    /// minutes). Allowed: 1 to 43200 (30 days). Default: 60.
    vacuum_grace_minutes: Option<u64>,
    /// Object store URL of the events table instead of `events_dir`: "s3://bucket/prefix"
    /// (S3 or an S3-compatible store; see `[storage.s3]`). Default: none (`events_dir`).
    url: Option<String>,
    /// `[storage.s3]`: region, endpoint and credentials for an `s3://` `url`.
    s3: Option<RawS3>,
}

/// `[storage.s3]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    /// AWS region. Default: "us-east-1".
    region: Option<String>,
    /// Endpoint URL of an S3-compatible store, such as "https://minio.example.com:9000".
    /// Default: none (AWS S3).
    endpoint: Option<String>,
    /// Allow a plain "http://" endpoint. Default: false.
    allow_http: Option<bool>,
    /// Name of the environment variable that holds the access key id. Give it together with
    /// `secret_access_key_env`. Default: none (the usual AWS credential sources).
    access_key_id_env: Option<String>,
    /// Name of the environment variable that holds the secret access key.
    secret_access_key_env: Option<String>,
    /// The access key id, in the file (prefer `access_key_id_env`). Give it together with
    /// `secret_access_key`.
    access_key_id: Option<String>,
    /// The secret access key, in the file (prefer `secret_access_key_env`; keep the file
    /// readable by the aggregator only).
    secret_access_key: Option<String>,
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

/// `[[federation]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    /// Required. The SQL name of the source: lowercase letters, digits and `_`, not starting
    /// with a digit or `pg_`, unique, and not a name Runnel uses (`events`, `dead_letters`,
    /// `agent_drops`, `alerts`, `agents`, `public`, `pg_catalog`, `information_schema`).
    /// PostgreSQL and SQLite sources are schemas (`name.table`), file sources a table.
    name: Option<String>,
    /// Required. "postgres", "sqlite", "parquet", "csv" or "json" (newline-delimited).
    kind: Option<String>,
    /// postgres only, required: `postgresql://user[:password]@host[:port]/database`. No TLS yet.
    url: Option<String>,
    /// postgres only: name of an environment variable holding the password (keeps it out of
    /// the file); overrides a password in `url`.
    password_env: Option<String>,
    /// postgres only: the remote schema whose tables and views are read. Default: "public".
    schema: Option<String>,
    /// postgres and sqlite only: the remote tables to read. Default: every table and view.
    tables: Option<Vec<String>>,
    /// sqlite, parquet, csv, json, required: the database file, or a directory of data files (or
    /// one file). Relative paths are resolved against the config file's directory.
    path: Option<PathBuf>,
    /// parquet, csv, json only: only files whose name ends with this are read; "" reads every
    /// file. Default: ".parquet", ".csv" or ".json".
    file_extension: Option<String>,
    /// csv only: the first line of each file names the columns. Default: true.
    has_header: Option<bool>,
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
        let federation = validate_federation(checker, self.federation)?;
        let fleet = self.fleet.validate(checker)?;
        Ok(AggregatorConfig {
            data_dir,
            ingest,
            storage,
            query,
            pgwire,
            federation,
            fleet,
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
        let retention_hours = checker.int(
            "storage.retention_hours",
            self.retention_hours,
            0,
            0,
            Some(24 * 366 * 100),
            Unit::Plain,
        )?;
        let compact_min_files = checker.int_usize(
            "storage.compact_min_files",
            self.compact_min_files,
            8,
            0,
            Some(10_000),
            Unit::Plain,
        )?;
        if compact_min_files == 1 {
            return Err(checker.invalid(
                "storage.compact_min_files",
                "1",
                "must be 0 (compaction off) or at least 2: one file has nothing to merge with",
            ));
        }
        let vacuum_grace_minutes = checker.int(
            "storage.vacuum_grace_minutes",
            self.vacuum_grace_minutes,
            60,
            1,
            Some(43_200),
            Unit::Plain,
        )?;
        let s3 = validate_object_store(checker, self.url, self.s3, self.events_dir.is_some())?;
        Ok(StorageConfig {
            wal_path,
            synchronous,
            events_dir,
            flush_interval_ms,
            max_recent_rows,
            retention_hours,
            compact_min_files,
            vacuum_grace_minutes,
            s3,
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

/// `storage.url` and `[storage.s3]`.
fn validate_object_store(
    checker: &Checker<'_>,
    url: Option<String>,
    raw: Option<RawS3>,
    has_events_dir: bool,
) -> Result<Option<S3Config>, ConfigError> {
    let Some(url) = url else {
        if raw.is_some() {
            return Err(checker.missing(
                "storage.url",
                "[storage.s3] only applies with storage.url = \"s3://bucket/prefix\"",
            ));
        }
        return Ok(None);
    };
    if has_events_dir {
        return Err(checker.invalid(
            "storage.url",
            quote(&url),
            "give either storage.url or storage.events_dir, not both",
        ));
    }
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err(checker.invalid(
            "storage.url",
            quote(&url),
            "must start with s3:// (S3 or an S3-compatible store); for a local directory use \
             storage.events_dir",
        ));
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let prefix = prefix.trim_matches('/');
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    if !bucket_ok {
        return Err(checker.invalid(
            "storage.url",
            quote(&url),
            "the bucket name must be 3 to 63 characters of a-z, 0-9, '-' and '.'",
        ));
    }
    if prefix.contains("//") || prefix.chars().any(char::is_control) {
        return Err(checker.invalid(
            "storage.url",
            quote(&url),
            "the prefix must not contain empty path segments or control characters",
        ));
    }
    let raw = raw.unwrap_or_default();
    let region = raw.region.unwrap_or_else(|| "us-east-1".to_owned());
    if region.is_empty() {
        return Err(checker.invalid("storage.s3.region", "\"\"", "must not be empty"));
    }
    let allow_http = raw.allow_http.unwrap_or(false);
    if let Some(endpoint) = &raw.endpoint {
        let http = endpoint.starts_with("http://");
        if !http && !endpoint.starts_with("https://") {
            return Err(checker.invalid(
                "storage.s3.endpoint",
                quote(endpoint),
                "must be an http:// or https:// URL",
            ));
        }
        if http && !allow_http {
            return Err(checker.invalid(
                "storage.s3.endpoint",
                quote(endpoint),
                "is plain http: set storage.s3.allow_http = true if the network is trusted",
            ));
        }
    }
    let env = |key: &str, var: &str| {
        std::env::var(var).map_err(|_| {
            checker.invalid(
                key,
                quote(var),
                "names an environment variable that is not set (or not UTF-8) in the \
                 aggregator's environment",
            )
        })
    };
    let in_file = match (raw.access_key_id, raw.secret_access_key) {
        (None, None) => None,
        (Some(id), Some(secret)) => Some((id, secret)),
        (Some(_), None) => {
            return Err(checker.missing(
                "storage.s3.secret_access_key",
                "access_key_id and secret_access_key go together",
            ));
        }
        (None, Some(_)) => {
            return Err(checker.missing(
                "storage.s3.access_key_id",
                "access_key_id and secret_access_key go together",
            ));
        }
    };
    let credentials = match (raw.access_key_id_env, raw.secret_access_key_env) {
        (None, None) => in_file,
        (Some(_), Some(_)) if in_file.is_some() => {
            return Err(checker.invalid(
                "storage.s3.access_key_id_env",
                "(set)",
                "give the credentials either in the file or by environment variables, not both",
            ));
        }
        (Some(id_var), Some(secret_var)) => Some((
            env("storage.s3.access_key_id_env", &id_var)?,
            env("storage.s3.secret_access_key_env", &secret_var)?,
        )),
        (Some(_), None) => {
            return Err(checker.missing(
                "storage.s3.secret_access_key_env",
                "access_key_id_env and secret_access_key_env go together",
            ));
        }
        (None, Some(_)) => {
            return Err(checker.missing(
                "storage.s3.access_key_id_env",
                "access_key_id_env and secret_access_key_env go together",
            ));
        }
    };
    Ok(Some(S3Config {
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        region,
        endpoint: raw.endpoint,
        allow_http,
        credentials,
    }))
}

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

/// Names a `[[federation]]` entry cannot take: Runnel's own tables and views, and the schemas
/// SQL clients rely on.
const RESERVED_NAMES: [&str; 9] = [
    "events",
    "dead_letters",
    "agent_drops",
    "alerts",
    "agents",
    "rollouts",
    "public",
    "pg_catalog",
    "information_schema",
];

/// Longest federation name: PostgreSQL's identifier limit, so clients can show it unchanged.
const MAX_NAME_CHARS: usize = 63;

const KINDS: &str = "must be one of \"postgres\", \"sqlite\", \"parquet\", \"csv\", \"json\"";

fn validate_federation(
    checker: &mut Checker<'_>,
    raw: Vec<RawFederation>,
) -> Result<Vec<FederationConfig>, ConfigError> {
    let mut entries: Vec<FederationConfig> = Vec::with_capacity(raw.len());
    for (idx, entry) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("federation[{idx}].{field}");
        let name = entry.name.ok_or_else(|| {
            checker.missing(
                &key("name"),
                "the SQL name of the source (a schema for postgres and sqlite, a table for files)",
            )
        })?;
        check_name(checker, &key("name"), &name)?;
        if entries.iter().any(|e| e.name == name) {
            return Err(checker.invalid(
                &key("name"),
                quote(&name),
                "is already the name of a [[federation]] entry above",
            ));
        }
        let kind = entry.kind.ok_or_else(|| {
            checker.missing(
                &key("kind"),
                "one of \"postgres\", \"sqlite\", \"parquet\", \"csv\", \"json\"",
            )
        })?;
        // Keys that only some kinds take: each is refused with the kinds it is for.
        let only_for = |field: &str, given: bool, kinds: &[&str], allowed: &str| {
            if given && !kinds.contains(&kind.as_str()) {
                return Err(checker.invalid(
                    &key(field),
                    "(set)",
                    format!("is only for kind = {allowed}, not {}", quote(&kind)),
                ));
            }
            Ok(())
        };
        only_for("url", entry.url.is_some(), &["postgres"], "\"postgres\"")?;
        only_for(
            "password_env",
            entry.password_env.is_some(),
            &["postgres"],
            "\"postgres\"",
        )?;
        only_for(
            "schema",
            entry.schema.is_some(),
            &["postgres"],
            "\"postgres\"",
        )?;
        only_for(
            "tables",
            entry.tables.is_some(),
            &["postgres", "sqlite"],
            "\"postgres\" or \"sqlite\"",
        )?;
        only_for(
            "path",
            entry.path.is_some(),
            &["sqlite", "parquet", "csv", "json"],
            "\"sqlite\", \"parquet\", \"csv\" or \"json\"",
        )?;
        only_for(
            "file_extension",
            entry.file_extension.is_some(),
            &["parquet", "csv", "json"],
            "\"parquet\", \"csv\" or \"json\"",
        )?;
        only_for(
            "has_header",
            entry.has_header.is_some(),
            &["csv"],
            "\"csv\"",
        )?;
        let tables = match entry.tables {
            Some(tables) => Some(check_tables(checker, &key("tables"), tables)?),
            None => None,
        };
        let file_format = match kind.as_str() {
            "postgres" | "sqlite" => None,
            "parquet" => Some(FileFormat::Parquet),
            "csv" => Some(FileFormat::Csv),
            "json" => Some(FileFormat::Json),
            _ => return Err(checker.invalid(&key("kind"), quote(&kind), KINDS)),
        };
        let source = if kind == "postgres" {
            let url = entry.url.ok_or_else(|| {
                checker.missing(
                    &key("url"),
                    "the database URL, such as \"postgresql://runnel@db.example.com:5432/crm\"",
                )
            })?;
            check_postgres_url(checker, &key("url"), &url)?;
            let password = match entry.password_env {
                Some(var) => Some(std::env::var(&var).map_err(|_| {
                    checker.invalid(
                        &key("password_env"),
                        quote(&var),
                        "names an environment variable that is not set (or not UTF-8) in the \
                         aggregator's environment",
                    )
                })?),
                None => None,
            };
            let schema = entry.schema.unwrap_or_else(|| "public".to_owned());
            if schema.is_empty() {
                return Err(checker.invalid(&key("schema"), "\"\"", "must not be empty"));
            }
            FederationSource::Postgres(PostgresSource {
                url,
                password,
                schema,
                tables,
            })
        } else {
            let path = checker.required_path(
                &key("path"),
                entry.path.as_deref(),
                "the database file, or the directory of data files (or one file)",
            )?;
            match file_format {
                None => FederationSource::Sqlite { path, tables },
                Some(format) => FederationSource::Files {
                    format,
                    path,
                    file_extension: entry
                        .file_extension
                        .unwrap_or_else(|| format!(".{}", format.as_str())),
                    has_header: entry.has_header.unwrap_or(true),
                },
            }
        };
        entries.push(FederationConfig { name, source });
    }
    Ok(entries)
}

/// A federation name is a lowercase SQL identifier that needs no quoting and names nothing else.
fn check_name(checker: &Checker<'_>, key: &str, name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || name.chars().count() > MAX_NAME_CHARS {
        return Err(checker.invalid(
            key,
            quote(name),
            format!(
                "must be a SQL identifier: lowercase letters a-z, digits and '_', not starting \
                 with a digit, at most {MAX_NAME_CHARS} characters"
            ),
        ));
    }
    if RESERVED_NAMES.contains(&name) || name.starts_with("pg_") {
        return Err(checker.invalid(
            key,
            quote(name),
            format!(
                "is a name Runnel or SQL clients use: choose a name other than {} and not \
                 starting with \"pg_\"",
                RESERVED_NAMES.map(quote).join(", ")
            ),
        ));
    }
    Ok(())
}

fn check_tables(
    checker: &Checker<'_>,
    key: &str,
    tables: Vec<String>,
) -> Result<Vec<String>, ConfigError> {
    if tables.is_empty() {
        return Err(checker.invalid(
            key,
            "[]",
            "must name at least one table; leave it out to read every table and view",
        ));
    }
    for (idx, table) in tables.iter().enumerate() {
        if table.is_empty() || table.chars().any(char::is_control) {
            return Err(checker.invalid(
                &format!("{key}[{idx}]"),
                quote(table),
                "must be a non-empty table name without control characters",
            ));
        }
        if tables[..idx].contains(table) {
            return Err(checker.invalid(
                &format!("{key}[{idx}]"),
                quote(table),
                "is already in the list",
            ));
        }
    }
    Ok(tables)
}

/// Checks the shape of a PostgreSQL URL; the aggregator's client parses it in full.
fn check_postgres_url(checker: &Checker<'_>, key: &str, url: &str) -> Result<(), ConfigError> {
    let shown = quote(&redact_url(url));
    let Some(rest) = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
    else {
        return Err(checker.invalid(
            key,
            shown,
            "must be a URL starting with \"postgresql://\", such as \
             \"postgresql://runnel@db.example.com:5432/crm\"",
        ));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let hosts = authority
        .rsplit_once('@')
        .map_or(authority, |(_, hosts)| hosts);
    if hosts.is_empty() {
        return Err(checker.invalid(
            key,
            shown,
            "must name a host, such as \"postgresql://runnel@db.example.com:5432/crm\"",
        ));
    }
    if url.contains(char::is_whitespace) {
        return Err(checker.invalid(
            key,
            shown,
            "must not contain spaces (percent-encode them as %20)",
        ));
    }
    Ok(())
}
