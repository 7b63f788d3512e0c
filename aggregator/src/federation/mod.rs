//! Federation: external sources that SQL reads next to `events` (`[[federation]]` in
//! `aggregator.toml`), so one query can join the fleet's events with a CRM in PostgreSQL, an
//! inventory in a SQLite file or an archive of Parquet, CSV or JSON files.
//!
//! - PostgreSQL and SQLite sources become schemas (`crm.customers`): one [`RemoteTable`] per
//!   remote table or view, found when the aggregator starts (or, when the source was unreachable
//!   then, at the first query that names it). A scan sends one `SELECT` of the columns the query
//!   needs, with the filters it can translate (`column <op> literal`, `IS [NOT] NULL`,
//!   `[NOT] IN (literals)`, `[NOT] LIKE 'pattern'`, `AND`, `OR`) as a parameterized `WHERE` and the query's `LIMIT`, and streams the rows back as Arrow
//!   record batches ([`RemoteScanExec`]). Filters are reported `Inexact`: DataFusion checks them
//!   again, so a remote that returns more rows than asked never changes an answer; the
//!   translation only ever makes the remote return a superset.
//! - File sources become one table each, DataFusion's own listing table, which prunes Parquet
//!   row groups and pushes projections and filters down by itself.
//!
//! Read-only: nothing here writes. The providers implement no `insert_into`, PostgreSQL sessions
//! are opened with `default_transaction_read_only`, SQLite files with `SQLITE_OPEN_READ_ONLY`;
//! the SQL front doors refuse DDL and DML before planning anyway.
//!
//! Bounded: a scan reads ahead at most [`READ_AHEAD_BATCHES`] batches of [`BATCH_ROWS`] rows
//! (what the query does not consume yet is not fetched), and at most [`MAX_CONCURRENT_SCANS`]
//! scans of one source run at once. A source that fails never stops the aggregator: it is
//! logged, and queries that name it fail with an error naming the federation entry.
//!
//! TLS to PostgreSQL is not supported yet (`NoTls`): rustls without OpenSSL is the plan.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, RecordBatch, RecordBatchOptions,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::expr::{InList, Like};
use datafusion::logical_expr::{
    BinaryExpr, Expr, Operator, TableProviderFilterPushDown, TableType,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream,
};
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};
use futures::StreamExt;
use runnel_config::{FederationConfig, FederationSource, FileFormat, PostgresSource};
use tokio::sync::{Semaphore, mpsc};
use tokio_postgres::types::{FromSql, Type};

/// Rows per record batch read from a remote database: DataFusion's default batch size.
pub const BATCH_ROWS: usize = 8192;

/// Batches a scan fetches ahead of the query consuming them. With [`BATCH_ROWS`] this bounds a
/// scan's memory to a few batches whatever the remote table's size.
pub const READ_AHEAD_BATCHES: usize = 2;

/// Most scans of one source at once; each holds a PostgreSQL connection or a SQLite handle on
/// a blocking thread. A query past it fails at once (waiting could deadlock a self-join).
pub const MAX_CONCURRENT_SCANS: usize = 16;

/// How long connecting to PostgreSQL may take: at startup this delays serving, per scan it
/// delays the query.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After a source could not be read, queries naming it get the same error for this long before
/// the next attempt, so a dead source costs one connect timeout per interval, not per query.
const RETRY_INTERVAL: Duration = Duration::from_secs(10);

/// How long a SQLite scan waits for a writer's lock on the file.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Days from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

/// Registers every entry in `ctx`. Never fails: an entry that cannot be read is logged with a
/// warning naming it and left in place to fail its queries with a clear error.
/// `statement_timeout` bounds each remote PostgreSQL statement (the query's own timeout).
pub async fn register(
    ctx: &SessionContext,
    entries: &[FederationConfig],
    statement_timeout: Duration,
) {
    let discoveries = entries.iter().map(|entry| async move {
        match &entry.source {
            FederationSource::Postgres(source) => {
                let schema = RemoteSchema::new(
                    &entry.name,
                    Source::postgres(&entry.name, source, statement_timeout),
                );
                schema.discover_at_startup().await;
                register_schema(ctx, &entry.name, schema);
            }
            FederationSource::Sqlite { path, tables } => {
                let source = Source::Sqlite(SqliteSource {
                    path: path.clone(),
                    tables: tables.clone(),
                });
                let schema = RemoteSchema::new(&entry.name, source);
                schema.discover_at_startup().await;
                register_schema(ctx, &entry.name, schema);
            }
            FederationSource::Files {
                format,
                path,
                file_extension,
                has_header,
            } => {
                register_files(ctx, &entry.name, *format, path, file_extension, *has_header).await;
            }
        }
    });
    futures::future::join_all(discoveries).await;
}

fn register_schema(ctx: &SessionContext, name: &str, schema: RemoteSchema) {
    let catalog_name = ctx.state().config_options().catalog.default_catalog.clone();
    let Some(catalog) = ctx.catalog(&catalog_name) else {
        tracing::warn!(
            federation = name,
            "no default catalog to register the source in"
        );
        return;
    };
    if let Err(error) = catalog.register_schema(name, Arc::new(schema)) {
        tracing::warn!(federation = name, error = %error.strip_backtrace(), "federated schema not registered");
    }
}

/// Registers a listing table over files; when that fails, a table that says why at every scan.
async fn register_files(
    ctx: &SessionContext,
    name: &str,
    format: FileFormat,
    path: &Path,
    file_extension: &str,
    has_header: bool,
) {
    // DataFusion reads a path ending in '/' as a directory (every file below it), else as one file.
    let mut location = path.display().to_string();
    if path.is_dir() && !location.ends_with('/') {
        location.push('/');
    }
    let registered = if !path.exists() {
        Err(format!("{} does not exist", path.display()))
    } else {
        let registered = match format {
            FileFormat::Parquet => {
                let options = ParquetReadOptions::new().file_extension(file_extension);
                ctx.register_parquet(name, &location, options).await
            }
            FileFormat::Csv => {
                let options = CsvReadOptions::new()
                    .has_header(has_header)
                    .file_extension(file_extension)
                    .file_compression_type(compression_of(file_extension));
                ctx.register_csv(name, &location, options).await
            }
            FileFormat::Json => {
                let options = JsonReadOptions::default()
                    .file_extension(file_extension)
                    .file_compression_type(compression_of(file_extension));
                ctx.register_json(name, &location, options).await
            }
        };
        registered.map_err(|error| error.strip_backtrace())
    };
    match registered {
        Ok(()) => tracing::info!(
            federation = name,
            kind = format.as_str(),
            path = %path.display(),
            "federated files registered"
        ),
        Err(error) => {
            tracing::warn!(
                federation = name,
                kind = format.as_str(),
                path = %path.display(),
                %error,
                "federated files cannot be read; the table fails its queries until a restart"
            );
            let unavailable = UnavailableTable {
                message: format!(
                    "federation entry `{name}` ({} files at {}) could not be read when the \
                     aggregator started: {error}; fix it and restart the aggregator",
                    format.as_str(),
                    path.display()
                ),
            };
            if let Err(error) = ctx.register_table(name, Arc::new(unavailable)) {
                tracing::warn!(federation = name, error = %error.strip_backtrace(), "table not registered");
            }
        }
    }
}

/// CSV and JSON files are decompressed by the extension they are selected by: `.csv.gz`.
fn compression_of(file_extension: &str) -> FileCompressionType {
    let lower = file_extension.to_ascii_lowercase();
    if lower.ends_with(".gz") {
        FileCompressionType::GZIP
    } else if lower.ends_with(".bz2") {
        FileCompressionType::BZIP2
    } else if lower.ends_with(".xz") {
        FileCompressionType::XZ
    } else if lower.ends_with(".zst") {
        FileCompressionType::ZSTD
    } else {
        FileCompressionType::UNCOMPRESSED
    }
}

/// A file source that could not be read at startup: no columns, and every scan fails saying why.
#[derive(Debug)]
struct UnavailableTable {
    message: String,
}

#[async_trait]
impl TableProvider for UnavailableTable {
    fn schema(&self) -> SchemaRef {
        Arc::new(Schema::empty())
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::Plan(self.message.clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Sources and their schemas

/// A remote database: where it is and how to reach it.
#[derive(Debug)]
enum Source {
    Postgres(Box<PgSource>),
    Sqlite(SqliteSource),
}

struct PgSource {
    /// Connection settings; `Err` when the URL did not parse (every query says so).
    config: Result<tokio_postgres::Config, String>,
    /// The URL without its password, for messages.
    shown_url: String,
    schema: String,
    tables: Option<Vec<String>>,
}

impl fmt::Debug for PgSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSource")
            .field("url", &self.shown_url)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct SqliteSource {
    path: PathBuf,
    tables: Option<Vec<String>>,
}

impl Source {
    fn postgres(name: &str, source: &PostgresSource, statement_timeout: Duration) -> Source {
        let config = source
            .url
            .parse::<tokio_postgres::Config>()
            .map_err(|error| format!("the url does not parse: {error}"))
            .map(|mut config| {
                if let Some(password) = &source.password {
                    config.password(password.as_str());
                }
                config.connect_timeout(CONNECT_TIMEOUT);
                if config.get_application_name().is_none() {
                    config.application_name("runnel-aggregator");
                }
                // Read-only on the server too, and no statement outlives the query it serves.
                let ours = format!(
                    "-c default_transaction_read_only=on -c statement_timeout={}",
                    statement_timeout.as_millis()
                );
                let options = match config.get_options() {
                    Some(theirs) if !theirs.is_empty() => format!("{theirs} {ours}"),
                    _ => ours,
                };
                config.options(options);
                config
            });
        if let Err(error) = &config {
            tracing::warn!(federation = name, url = %source.redacted_url(), %error, "federated PostgreSQL source unusable");
        }
        Source::Postgres(Box::new(PgSource {
            config,
            shown_url: source.redacted_url(),
            schema: source.schema.clone(),
            tables: source.tables.clone(),
        }))
    }

    /// What the source is, for messages: `PostgreSQL postgresql://u@h/db` or `SQLite file ...`.
    fn describe(&self) -> String {
        match self {
            Source::Postgres(pg) => format!("PostgreSQL {}", pg.shown_url),
            Source::Sqlite(sqlite) => format!("SQLite file {}", sqlite.path.display()),
        }
    }
}

/// A federated database as a DataFusion schema. Its tables are found once; until that succeeds
/// every query naming the schema tries again (at most once per [`RETRY_INTERVAL`]) or fails
/// with the last error.
#[derive(Debug)]
struct RemoteSchema {
    inner: Arc<SchemaInner>,
    /// Serializes discovery attempts.
    discovering: tokio::sync::Mutex<()>,
}

struct SchemaInner {
    entry: String,
    source: Source,
    state: Mutex<Discovery>,
    scans: Arc<Semaphore>,
}

// Debug by hand: a table refers back to its schema, so derived Debug would never end.
impl fmt::Debug for SchemaInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaInner")
            .field("entry", &self.entry)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Discovery {
    /// The tables, once found.
    tables: Option<BTreeMap<String, Arc<RemoteTable>>>,
    /// When the last attempt failed, and why.
    failed: Option<(Instant, String)>,
}

impl RemoteSchema {
    fn new(entry: &str, source: Source) -> RemoteSchema {
        RemoteSchema {
            inner: Arc::new(SchemaInner {
                entry: entry.to_owned(),
                source,
                state: Mutex::new(Discovery::default()),
                scans: Arc::new(Semaphore::new(MAX_CONCURRENT_SCANS)),
            }),
            discovering: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Discovery> {
        // A panic while holding this lock leaves plain data behind; keep using it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn discover_at_startup(&self) {
        let entry = &self.inner.entry;
        match self.discover().await {
            Ok(n_tables) => tracing::info!(
                federation = %entry,
                source = %self.inner.source.describe(),
                n_tables,
                "federated source registered"
            ),
            Err(error) => tracing::warn!(
                federation = %entry,
                source = %self.inner.source.describe(),
                %error,
                "federated source unavailable; serving without it, queries naming it retry"
            ),
        }
    }

    /// One discovery attempt; records the outcome.
    async fn discover(&self) -> Result<usize, String> {
        let inner = Arc::clone(&self.inner);
        let found = match &inner.source {
            Source::Postgres(pg) => discover_postgres(&inner, pg).await,
            Source::Sqlite(_) => {
                let blocking = Arc::clone(&inner);
                tokio::task::spawn_blocking(move || match &blocking.source {
                    Source::Sqlite(sqlite) => discover_sqlite(&blocking, sqlite),
                    Source::Postgres(_) => Err("not a SQLite source".to_owned()),
                })
                .await
                .map_err(|error| format!("discovery task failed: {error}"))
                .and_then(|found| found)
            }
        };
        let mut state = self.state();
        match found {
            Ok(tables) => {
                let n_tables = tables.len();
                state.tables = Some(
                    tables
                        .into_iter()
                        .map(|table| (table.name.clone(), Arc::new(table)))
                        .collect(),
                );
                state.failed = None;
                Ok(n_tables)
            }
            Err(error) => {
                state.failed = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    fn unavailable(&self, error: &str) -> DataFusionError {
        DataFusionError::Plan(format!(
            "federation entry `{}` ({}) is unavailable: {error}",
            self.inner.entry,
            self.inner.source.describe()
        ))
    }
}

#[async_trait]
impl SchemaProvider for RemoteSchema {
    fn table_names(&self) -> Vec<String> {
        self.state()
            .tables
            .as_ref()
            .map(|tables| tables.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if let Some(tables) = &self.state().tables {
            return Ok(tables
                .get(name)
                .map(|table| Arc::clone(table) as Arc<dyn TableProvider>));
        }
        let _attempt = self.discovering.lock().await;
        {
            let state = self.state();
            if let Some(tables) = &state.tables {
                return Ok(tables
                    .get(name)
                    .map(|table| Arc::clone(table) as Arc<dyn TableProvider>));
            }
            if let Some((at, error)) = &state.failed
                && at.elapsed() < RETRY_INTERVAL
            {
                return Err(self.unavailable(error));
            }
        }
        match self.discover().await {
            Ok(n_tables) => {
                tracing::info!(federation = %self.inner.entry, n_tables, "federated source reachable again");
                Ok(self.state().tables.as_ref().and_then(|tables| {
                    tables
                        .get(name)
                        .map(|table| Arc::clone(table) as Arc<dyn TableProvider>)
                }))
            }
            Err(error) => Err(self.unavailable(&error)),
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.state()
            .tables
            .as_ref()
            .is_some_and(|tables| tables.contains_key(name))
    }
}

/// `"name"` with inner quotes doubled: an identifier in PostgreSQL and SQLite.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Keeps the tables an entry's `tables` list names (warning about those missing), or all.
fn select_tables(
    entry: &str,
    found: BTreeMap<String, Vec<RemoteColumn>>,
    wanted: Option<&[String]>,
) -> BTreeMap<String, Vec<RemoteColumn>> {
    let Some(wanted) = wanted else {
        return found;
    };
    let mut found = found;
    let mut kept = BTreeMap::new();
    for name in wanted {
        match found.remove(name) {
            Some(columns) => {
                kept.insert(name.clone(), columns);
            }
            None => tracing::warn!(
                federation = entry,
                table = %name,
                "a table named in `tables` does not exist in the source (or cannot be read); skipped"
            ),
        }
    }
    kept
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// Every column of every table and view (plain, partitioned, materialized, foreign) in a schema.
/// Domains, enums, arrays and other types are read as text (`typtype` other than base).
const PG_COLUMNS_SQL: &str = "SELECT c.relname::text, a.attname::text, \
     format_type(a.atttypid, a.atttypmod), t.typname::text, t.typtype::text, a.atttypmod \
     FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
     JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
     WHERE n.nspname = $1 AND c.relkind IN ('r', 'v', 'm', 'p', 'f') \
     ORDER BY c.relname, a.attnum";

async fn connect_postgres(entry: &str, pg: &PgSource) -> Result<tokio_postgres::Client, String> {
    let config = pg.config.as_ref().map_err(Clone::clone)?;
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|error| format!("connect: {}", pg_error_text(&error)))?;
    let entry = entry.to_owned();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(federation = %entry, %error, "PostgreSQL connection ended with an error");
        }
    });
    Ok(client)
}

/// The server's message when there is one (tokio-postgres' Display says only "db error").
fn pg_error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            text
        }
    }
}

async fn discover_postgres(
    inner: &Arc<SchemaInner>,
    pg: &PgSource,
) -> Result<Vec<RemoteTable>, String> {
    let client = connect_postgres(&inner.entry, pg).await?;
    let rows = client
        .query(PG_COLUMNS_SQL, &[&pg.schema])
        .await
        .map_err(|error| {
            format!(
                "list the tables of schema {:?}: {}",
                pg.schema,
                pg_error_text(&error)
            )
        })?;
    let mut found: BTreeMap<String, Vec<RemoteColumn>> = BTreeMap::new();
    for row in rows {
        let table: String = row.get(0);
        let column: String = row.get(1);
        let declared: String = row.get(2);
        let type_name: String = row.get(3);
        let type_kind: String = row.get(4);
        let type_modifier: i32 = row.get(5);
        let base_type = if type_kind == "b" {
            type_name.as_str()
        } else {
            ""
        };
        found.entry(table).or_default().push(pg_column(
            &column,
            &declared,
            base_type,
            type_modifier,
        ));
    }
    let selected = select_tables(&inner.entry, found, pg.tables.as_deref());
    Ok(selected
        .into_iter()
        .map(|(name, columns)| {
            let from_sql = format!("{}.{}", quote_ident(&pg.schema), quote_ident(&name));
            RemoteTable::new(inner, name, from_sql, columns)
        })
        .collect())
}

/// How a PostgreSQL column is read: its Arrow type, the expression selected, the type the
/// server sends, and the filters that can be pushed down on it.
fn pg_column(name: &str, declared: &str, base_type: &str, type_modifier: i32) -> RemoteColumn {
    let quoted = quote_ident(name);
    let native = |data_type: DataType, wire: Type, compare: Compare| RemoteColumn {
        name: name.to_owned(),
        declared: declared.to_owned(),
        data_type,
        select: quoted.clone(),
        wire: Some(wire),
        compare,
        null_tests: NullTests::Both,
    };
    let as_text = || RemoteColumn {
        name: name.to_owned(),
        declared: declared.to_owned(),
        data_type: DataType::Utf8,
        select: format!("{quoted}::text"),
        wire: Some(Type::TEXT),
        compare: Compare::PgText,
        null_tests: NullTests::Both,
    };
    match base_type {
        "int2" => native(DataType::Int16, Type::INT2, Compare::PgCast("int8")),
        "int4" => native(DataType::Int32, Type::INT4, Compare::PgCast("int8")),
        "int8" => native(DataType::Int64, Type::INT8, Compare::PgCast("int8")),
        "float4" => native(DataType::Float32, Type::FLOAT4, Compare::PgCast("float8")),
        "float8" => native(DataType::Float64, Type::FLOAT8, Compare::PgCast("float8")),
        "bool" => native(DataType::Boolean, Type::BOOL, Compare::PgCast("bool")),
        "text" => native(DataType::Utf8, Type::TEXT, Compare::PgText),
        "varchar" => native(DataType::Utf8, Type::VARCHAR, Compare::PgText),
        "name" => native(DataType::Utf8, Type::NAME, Compare::PgText),
        // Padded as stored; comparisons in PostgreSQL ignore the padding, so none are pushed.
        "bpchar" => native(DataType::Utf8, Type::BPCHAR, Compare::No),
        "bytea" => native(DataType::Binary, Type::BYTEA, Compare::No),
        "timestamp" => native(
            DataType::Timestamp(TimeUnit::Microsecond, None),
            Type::TIMESTAMP,
            Compare::PgCast("timestamp"),
        ),
        "timestamptz" => native(
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            Type::TIMESTAMPTZ,
            Compare::PgCast("timestamptz"),
        ),
        "date" => native(DataType::Date32, Type::DATE, Compare::PgCast("date")),
        "numeric" => match numeric_precision_scale(type_modifier) {
            // numeric(p, s) that fits: exact, as a decimal (sent as text, parsed here).
            Some((precision, scale)) => RemoteColumn {
                data_type: DataType::Decimal128(precision, scale),
                compare: Compare::No,
                ..as_text()
            },
            // Unconstrained numeric: as float8, as DuckDB's PostgreSQL scanner does.
            None => RemoteColumn {
                data_type: DataType::Float64,
                select: format!("{quoted}::float8"),
                wire: Some(Type::FLOAT8),
                compare: Compare::PgCast("float8"),
                ..as_text()
            },
        },
        // json, jsonb, uuid, time, interval, inet, arrays, enums, domains...: their text form.
        _ => as_text(),
    }
}

/// `numeric(p, s)` from its type modifier, when it fits a 128-bit decimal.
fn numeric_precision_scale(type_modifier: i32) -> Option<(u8, i8)> {
    // PostgreSQL stores ((precision << 16) | scale) + 4; -1 means unconstrained.
    let packed = type_modifier.checked_sub(4)?;
    if packed < 0 {
        return None;
    }
    let precision = (packed >> 16) & 0xffff;
    let scale = packed & 0xffff;
    let precision = u8::try_from(precision).ok()?;
    let scale = i8::try_from(scale).ok()?;
    let fits = (1..=38).contains(&precision) && scale >= 0 && scale.unsigned_abs() <= precision;
    fits.then_some((precision, scale))
}

/// A raw PostgreSQL value in binary format, decoded here by the column's expected type.
struct RawValue<'a>(&'a [u8]);

impl<'a> FromSql<'a> for RawValue<'a> {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawValue(raw))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

async fn scan_postgres(
    table: Arc<RemoteTable>,
    columns: Vec<RemoteColumn>,
    query: RemoteQuery,
    schema: SchemaRef,
    tx: mpsc::Sender<DfResult<RecordBatch>>,
) -> DfResult<()> {
    let Source::Postgres(pg) = &table.inner.source else {
        return Err(DataFusionError::Internal("not a PostgreSQL source".into()));
    };
    let _permit = table.scan_permit()?;
    let client = connect_postgres(&table.inner.entry, pg)
        .await
        .map_err(|error| table.error(&error))?;
    let params = query.params.iter().map(|param| match param {
        ParamValue::Text(text) => (text.clone(), Type::TEXT),
        ParamValue::Integer(value) => (value.to_string(), Type::TEXT),
        ParamValue::Real(value) => (value.to_string(), Type::TEXT),
    });
    let rows = client
        .query_typed_raw(&query.sql, params)
        .await
        .map_err(|error| table.error(&pg_error_text(&error)))?;
    let mut rows = std::pin::pin!(rows);
    let mut batch = BatchBuilder::new(schema, &columns);
    let mut checked = false;
    while let Some(row) = rows.next().await {
        let row = row.map_err(|error| table.error(&pg_error_text(&error)))?;
        if !checked {
            table.check_pg_types(&columns, &row)?;
            checked = true;
        }
        for (idx, builder) in batch.builders.iter_mut().enumerate() {
            let raw: Option<RawValue<'_>> = row
                .try_get(idx)
                .map_err(|error| table.error(&pg_error_text(&error)))?;
            builder.push_pg(raw.map(|raw| raw.0)).map_err(|error| {
                table.error(&format!("column {:?}: {error}", columns[idx].name))
            })?;
        }
        batch.n_rows += 1;
        if batch.n_rows == BATCH_ROWS && tx.send(batch.finish()).await.is_err() {
            // The query stopped reading (LIMIT reached, cancelled): so do we.
            return Ok(());
        }
    }
    if batch.n_rows > 0 {
        let _ = tx.send(batch.finish()).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SQLite

fn open_sqlite(path: &Path) -> Result<rusqlite::Connection, String> {
    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = rusqlite::Connection::open_with_flags(path, flags)
        .map_err(|error| format!("open read-only: {error}"))?;
    connection
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .map_err(|error| format!("set busy timeout: {error}"))?;
    Ok(connection)
}

fn discover_sqlite(
    inner: &Arc<SchemaInner>,
    sqlite: &SqliteSource,
) -> Result<Vec<RemoteTable>, String> {
    if !sqlite.path.is_file() {
        return Err(format!("{} is not a file", sqlite.path.display()));
    }
    let connection = open_sqlite(&sqlite.path)?;
    let list = |sql: &str, param: Option<&str>| -> rusqlite::Result<Vec<(String, String)>> {
        let mut statement = connection.prepare(sql)?;
        let rows = statement.query_map(rusqlite::params_from_iter(param), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
        rows.collect()
    };
    let tables = list(
        "SELECT name, type FROM sqlite_schema WHERE type IN ('table', 'view') \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
        None,
    )
    .map_err(|error| format!("list tables: {error}"))?;
    let mut found = BTreeMap::new();
    for (table, _kind) in tables {
        let columns = list(
            "SELECT name, type FROM pragma_table_info(?1) ORDER BY cid",
            Some(&table),
        )
        .map_err(|error| format!("list the columns of {table:?}: {error}"))?;
        let columns = columns
            .into_iter()
            .map(|(name, declared)| sqlite_column(&name, &declared))
            .collect();
        found.insert(table, columns);
    }
    let selected = select_tables(&inner.entry, found, sqlite.tables.as_deref());
    Ok(selected
        .into_iter()
        .map(|(name, columns)| {
            let from_sql = quote_ident(&name);
            RemoteTable::new(inner, name, from_sql, columns)
        })
        .collect())
}

/// A SQLite column by the affinity of its declared type (sqlite.org/datatype3.html, 3.1).
fn sqlite_column(name: &str, declared: &str) -> RemoteColumn {
    let upper = declared.to_ascii_uppercase();
    let (data_type, compare) = if upper.contains("INT") {
        (DataType::Int64, Compare::Sqlite)
    } else if upper.contains("CHAR") || upper.contains("CLOB") || upper.contains("TEXT") {
        (DataType::Utf8, Compare::SqliteText)
    } else if upper.contains("BLOB") {
        (DataType::Binary, Compare::No)
    } else if upper.is_empty() {
        // No declared type: any value; numbers are shown as text, comparisons stay here.
        (DataType::Utf8, Compare::No)
    } else if upper.contains("REAL") || upper.contains("FLOA") || upper.contains("DOUB") {
        (DataType::Float64, Compare::Sqlite)
    } else if upper.contains("BOOL") {
        (DataType::Boolean, Compare::No)
    } else if upper.contains("DATE") || upper.contains("TIME") {
        // SQLite has no date type: dates are text (or numbers) as the writer chose.
        (DataType::Utf8, Compare::No)
    } else {
        // NUMERIC affinity (NUMERIC, DECIMAL(10,2), ...).
        (DataType::Float64, Compare::Sqlite)
    };
    RemoteColumn {
        name: name.to_owned(),
        declared: declared.to_owned(),
        data_type,
        select: quote_ident(name),
        wire: None,
        compare,
        // A value that does not fit the column's type is NULL here but not in SQLite, so
        // `IS NULL` stays here; `IS NOT NULL` in SQLite keeps a superset.
        null_tests: NullTests::NotNullOnly,
    }
}

fn scan_sqlite(
    table: &RemoteTable,
    columns: &[RemoteColumn],
    query: &RemoteQuery,
    schema: SchemaRef,
    tx: &mpsc::Sender<DfResult<RecordBatch>>,
) -> DfResult<()> {
    let Source::Sqlite(sqlite) = &table.inner.source else {
        return Err(DataFusionError::Internal("not a SQLite source".into()));
    };
    let _permit = table.scan_permit()?;
    let connection = open_sqlite(&sqlite.path).map_err(|error| table.error(&error))?;
    let mut statement = connection
        .prepare(&query.sql)
        .map_err(|error| table.error(&error.to_string()))?;
    let params = query.params.iter().map(|param| match param {
        ParamValue::Text(text) => rusqlite::types::Value::Text(text.clone()),
        ParamValue::Integer(value) => rusqlite::types::Value::Integer(*value),
        ParamValue::Real(value) => rusqlite::types::Value::Real(*value),
    });
    let mut rows = statement
        .query(rusqlite::params_from_iter(params))
        .map_err(|error| table.error(&error.to_string()))?;
    let mut batch = BatchBuilder::new(schema, columns);
    while let Some(row) = rows
        .next()
        .map_err(|error| table.error(&error.to_string()))?
    {
        for (idx, builder) in batch.builders.iter_mut().enumerate() {
            let value = row
                .get_ref(idx)
                .map_err(|error| table.error(&error.to_string()))?;
            builder.push_sqlite(value);
        }
        batch.n_rows += 1;
        if batch.n_rows == BATCH_ROWS && tx.blocking_send(batch.finish()).is_err() {
            return Ok(());
        }
    }
    if batch.n_rows > 0 {
        let _ = tx.blocking_send(batch.finish());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Remote tables

/// One remote table or view.
#[derive(Clone)]
struct RemoteTable {
    inner: Arc<SchemaInner>,
    /// The remote name.
    name: String,
    /// The quoted remote name for `FROM`.
    from_sql: String,
    columns: Vec<RemoteColumn>,
    schema: SchemaRef,
}

impl fmt::Debug for RemoteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteTable")
            .field("entry", &self.inner.entry)
            .field("name", &self.name)
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

/// How one remote column is read and filtered.
#[derive(Debug, Clone)]
struct RemoteColumn {
    name: String,
    /// The type as the source declares it, for messages.
    declared: String,
    data_type: DataType,
    /// The SQL expression selected (and compared) for this column.
    select: String,
    /// PostgreSQL: the type the server sends for `select`.
    wire: Option<Type>,
    compare: Compare,
    null_tests: NullTests,
}

/// Which comparisons with a literal are pushed down on a column, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// None: DataFusion compares.
    No,
    /// PostgreSQL: `select <op> CAST($n AS type)`, the literal sent as text.
    PgCast(&'static str),
    /// PostgreSQL text in byte order, as Arrow compares: `(select) COLLATE "C" <op> $n`.
    PgText,
    /// SQLite: `select <op> ?n`, the literal bound as an integer or a real.
    Sqlite,
    /// SQLite text in byte order: `select COLLATE BINARY <op> ?n`.
    SqliteText,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NullTests {
    Both,
    NotNullOnly,
}

/// A parameter of a remote query.
#[derive(Debug, Clone, PartialEq)]
enum ParamValue {
    Text(String),
    Integer(i64),
    Real(f64),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Text(text) => write!(f, "{text:?}"),
            ParamValue::Integer(value) => write!(f, "{value}"),
            ParamValue::Real(value) => write!(f, "{value}"),
        }
    }
}

/// The statement a scan sends.
#[derive(Debug, Clone, PartialEq)]
struct RemoteQuery {
    sql: String,
    params: Vec<ParamValue>,
}

impl RemoteTable {
    fn new(
        inner: &Arc<SchemaInner>,
        name: String,
        from_sql: String,
        columns: Vec<RemoteColumn>,
    ) -> RemoteTable {
        let fields: Vec<Field> = columns
            .iter()
            .map(|column| Field::new(&column.name, column.data_type.clone(), true))
            .collect();
        RemoteTable {
            inner: Arc::clone(inner),
            name,
            from_sql,
            columns,
            schema: Arc::new(Schema::new(fields)),
        }
    }

    fn is_postgres(&self) -> bool {
        matches!(self.inner.source, Source::Postgres(_))
    }

    /// An execution error naming the entry and the table.
    fn error(&self, detail: &str) -> DataFusionError {
        DataFusionError::Execution(format!(
            "federation entry `{}`, table {:?} ({}): {detail}",
            self.inner.entry,
            self.name,
            self.inner.source.describe()
        ))
    }

    fn scan_permit(&self) -> DfResult<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.inner.scans)
            .try_acquire_owned()
            .map_err(|_| {
                self.error(&format!(
                    "more than {MAX_CONCURRENT_SCANS} scans of this source at once; try again"
                ))
            })
    }

    /// The server must send the types the table had when it was found.
    fn check_pg_types(&self, columns: &[RemoteColumn], row: &tokio_postgres::Row) -> DfResult<()> {
        for (column, sent) in columns.iter().zip(row.columns()) {
            if let Some(wire) = &column.wire
                && sent.type_() != wire
            {
                return Err(self.error(&format!(
                    "column {:?} is now of type {}, was {} when the source was registered; \
                     restart the aggregator to read the new definition",
                    column.name,
                    sent.type_(),
                    column.declared
                )));
            }
        }
        Ok(())
    }

    /// The remote statement for a scan: projected columns, the filters that translate, LIMIT.
    fn remote_query(
        &self,
        projection: &[usize],
        filters: &[Expr],
        limit: Option<usize>,
    ) -> RemoteQuery {
        let select = if projection.is_empty() {
            // Only the row count is needed (`count(*)`).
            "1".to_owned()
        } else {
            projection
                .iter()
                .map(|&idx| self.columns[idx].select.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut sql = format!("SELECT {select} FROM {}", self.from_sql);
        let mut params = Vec::new();
        let mut conditions = Vec::new();
        for filter in filters {
            let mark = params.len();
            match self.translate(filter, &mut params) {
                Some(condition) => conditions.push(condition),
                None => params.truncate(mark),
            }
        }
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        if let Some(limit) = limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        RemoteQuery { sql, params }
    }

    /// A remote condition that keeps at least every row `expr` keeps, or `None`.
    fn translate(&self, expr: &Expr, params: &mut Vec<ParamValue>) -> Option<String> {
        match expr {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) if *op == Operator::And => {
                // A superset of `a AND b` is a superset of either side: keep what translates.
                let mark = params.len();
                let left = self.translate(left, params);
                match (left, self.translate(right, params)) {
                    (Some(left), Some(right)) => Some(format!("({left} AND {right})")),
                    (Some(side), None) | (None, Some(side)) => Some(side),
                    (None, None) => {
                        params.truncate(mark);
                        None
                    }
                }
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) if *op == Operator::Or => {
                // A superset of `a OR b` needs a superset of both sides.
                let mark = params.len();
                let both = self
                    .translate(left, params)
                    .and_then(|left| Some((left, self.translate(right, params)?)));
                match both {
                    Some((left, right)) => Some(format!("({left} OR {right})")),
                    None => {
                        params.truncate(mark);
                        None
                    }
                }
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (column, op, value) = match (left.as_ref(), right.as_ref()) {
                    (Expr::Column(column), Expr::Literal(value, _)) => (column, *op, value),
                    (Expr::Literal(value, _), Expr::Column(column)) => (column, op.swap()?, value),
                    _ => return None,
                };
                let sql_op = match op {
                    Operator::Eq => "=",
                    Operator::NotEq => "<>",
                    Operator::Lt => "<",
                    Operator::LtEq => "<=",
                    Operator::Gt => ">",
                    Operator::GtEq => ">=",
                    _ => return None,
                };
                let column = self.column(&column.name)?;
                let param = self.compared(column, value, params)?;
                Some(format!("{} {sql_op} {param}", comparable(column)))
            }
            // `IN` and `NOT IN` with non-null literals are exact on both sides; a NULL in the
            // list changes the three-valued result, so such lists stay with DataFusion.
            Expr::InList(InList {
                expr,
                list,
                negated,
            }) => {
                let Expr::Column(column) = expr.as_ref() else {
                    return None;
                };
                let column = self.column(&column.name)?;
                if list.is_empty() {
                    return None;
                }
                let mark = params.len();
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let param = match item {
                        Expr::Literal(value, _) if !value.is_null() => {
                            self.compared(column, value, params)
                        }
                        _ => None,
                    };
                    let Some(param) = param else {
                        params.truncate(mark);
                        return None;
                    };
                    items.push(param);
                }
                let not = if *negated { "NOT " } else { "" };
                Some(format!(
                    "{} {not}IN ({})",
                    comparable(column),
                    items.join(", ")
                ))
            }
            Expr::Like(like) => self.translate_like(like, params),
            Expr::IsNull(inner) => match inner.as_ref() {
                Expr::Column(column) => {
                    let column = self.column(&column.name)?;
                    (column.null_tests == NullTests::Both)
                        .then(|| format!("{} IS NULL", column.select))
                }
                _ => None,
            },
            Expr::IsNotNull(inner) => match inner.as_ref() {
                Expr::Column(column) => {
                    let column = self.column(&column.name)?;
                    Some(format!("{} IS NOT NULL", column.select))
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Pushes `value` as the parameter a comparison with `column` uses and returns its SQL
    /// (`CAST($n AS type)` or `?n`), when the comparison means the same on both sides.
    fn compared(
        &self,
        column: &RemoteColumn,
        value: &ScalarValue,
        params: &mut Vec<ParamValue>,
    ) -> Option<String> {
        // PostgreSQL casts the text parameter to the column's type; SQLite binds it as is.
        let cast = match column.compare {
            Compare::No => return None,
            Compare::PgCast(ty) => Some(ty),
            Compare::PgText => Some("text"),
            Compare::Sqlite | Compare::SqliteText => None,
        };
        params.push(literal_param(column, value, self.is_postgres())?);
        let n = params.len();
        Some(match cast {
            Some(ty) => format!("CAST(${n} AS {ty})"),
            None => format!("?{n}"),
        })
    }

    /// `LIKE` on a text column with a literal pattern. PostgreSQL's `LIKE` under the "C"
    /// collation matches exactly as DataFusion's does (`%`, `_`, backslash as the escape), so
    /// both `LIKE` and `NOT LIKE` go. SQLite's `LIKE` ignores ASCII case, which
    /// only widens the match: `LIKE` goes (with the escape spelled out), `NOT LIKE` does not.
    /// `ILIKE` stays with DataFusion: its case folding differs between the engines.
    fn translate_like(&self, like: &Like, params: &mut Vec<ParamValue>) -> Option<String> {
        if like.case_insensitive {
            return None;
        }
        let (Expr::Column(column), Expr::Literal(pattern, _)) =
            (like.expr.as_ref(), like.pattern.as_ref())
        else {
            return None;
        };
        let column = self.column(&column.name)?;
        if column.data_type != DataType::Utf8 {
            return None;
        }
        // DataFusion only runs LIKE with the backslash escape. A pattern ending in a lone
        // escape is a literal backslash to DataFusion and an error to PostgreSQL.
        if like.escape_char.unwrap_or('\\') != '\\' {
            return None;
        }
        let text = match pattern {
            ScalarValue::Utf8(Some(text))
            | ScalarValue::LargeUtf8(Some(text))
            | ScalarValue::Utf8View(Some(text)) => text,
            _ => return None,
        };
        if text.chars().rev().take_while(|&c| c == '\\').count() % 2 == 1 {
            return None;
        }
        let escape = '\\';
        let not = if like.negated { "NOT " } else { "" };
        match column.compare {
            Compare::PgText => {
                let param = self.compared(column, pattern, params)?;
                Some(format!(
                    "{} {not}LIKE {param} ESCAPE '{escape}'",
                    comparable(column)
                ))
            }
            Compare::SqliteText if !like.negated => {
                let param = self.compared(column, pattern, params)?;
                Some(format!("{} LIKE {param} ESCAPE '{escape}'", column.select))
            }
            _ => None,
        }
    }

    fn column(&self, name: &str) -> Option<&RemoteColumn> {
        self.columns.iter().find(|column| column.name == name)
    }
}

/// The column as the left side of a comparison: text compares byte-wise on both remotes, as
/// DataFusion compares strings.
fn comparable(column: &RemoteColumn) -> String {
    match column.compare {
        Compare::PgText => format!("({}) COLLATE \"C\"", column.select),
        Compare::SqliteText => format!("{} COLLATE BINARY", column.select),
        Compare::PgCast(_) | Compare::Sqlite | Compare::No => column.select.clone(),
    }
}

/// The literal as a parameter for a comparison with `column`, when its meaning is the same on
/// both sides (PostgreSQL gets text it casts; SQLite integers, reals and text).
fn literal_param(column: &RemoteColumn, value: &ScalarValue, postgres: bool) -> Option<ParamValue> {
    let integer = match value {
        ScalarValue::Int8(Some(v)) => Some(i64::from(*v)),
        ScalarValue::Int16(Some(v)) => Some(i64::from(*v)),
        ScalarValue::Int32(Some(v)) => Some(i64::from(*v)),
        ScalarValue::Int64(Some(v)) => Some(*v),
        ScalarValue::UInt8(Some(v)) => Some(i64::from(*v)),
        ScalarValue::UInt16(Some(v)) => Some(i64::from(*v)),
        ScalarValue::UInt32(Some(v)) => Some(i64::from(*v)),
        ScalarValue::UInt64(Some(v)) => i64::try_from(*v).ok(),
        _ => None,
    };
    let param = match &column.data_type {
        DataType::Int16 | DataType::Int32 | DataType::Int64 => ParamValue::Integer(integer?),
        DataType::Float32 | DataType::Float64 => {
            let real = match value {
                ScalarValue::Float32(Some(v)) => f64::from(*v),
                ScalarValue::Float64(Some(v)) => *v,
                // Integers beyond 2^53 have no exact float: leave those to DataFusion.
                _ => {
                    let integer = integer?;
                    if integer.unsigned_abs() > 1 << 53 {
                        return None;
                    }
                    integer as f64
                }
            };
            if !real.is_finite() {
                return None;
            }
            ParamValue::Real(real)
        }
        DataType::Boolean => match value {
            ScalarValue::Boolean(Some(v)) => ParamValue::Text(v.to_string()),
            _ => return None,
        },
        DataType::Utf8 => match value {
            ScalarValue::Utf8(Some(text))
            | ScalarValue::LargeUtf8(Some(text))
            | ScalarValue::Utf8View(Some(text)) => {
                // PostgreSQL text cannot hold NUL.
                if postgres && text.contains('\0') {
                    return None;
                }
                ParamValue::Text(text.clone())
            }
            _ => return None,
        },
        DataType::Timestamp(TimeUnit::Microsecond, zone) => {
            let micros = match value {
                ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000)?,
                ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000)?,
                ScalarValue::TimestampMicrosecond(Some(v), _) => *v,
                ScalarValue::TimestampNanosecond(Some(v), _) if v % 1_000 == 0 => v / 1_000,
                _ => return None,
            };
            let time = chrono::DateTime::from_timestamp_micros(micros)?;
            if !(1..=9999).contains(&chrono::Datelike::year(&time)) {
                return None;
            }
            let mut text = time.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
            if zone.is_some() {
                text.push_str("+00");
            }
            ParamValue::Text(text)
        }
        DataType::Date32 => match value {
            ScalarValue::Date32(Some(days)) => {
                let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?
                    .checked_add_signed(chrono::TimeDelta::try_days(i64::from(*days))?)?;
                if !(1..=9999).contains(&chrono::Datelike::year(&date)) {
                    return None;
                }
                ParamValue::Text(date.format("%Y-%m-%d").to_string())
            }
            _ => return None,
        },
        _ => return None,
    };
    Some(param)
}

#[async_trait]
impl TableProvider for RemoteTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|filter| {
                if self.translate(filter, &mut Vec::new()).is_some() {
                    // The remote keeps a superset; DataFusion checks again.
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let projection: Vec<usize> = match projection {
            Some(projection) => projection.clone(),
            None => (0..self.columns.len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&projection)?);
        let query = self.remote_query(&projection, filters, limit);
        let columns = projection
            .iter()
            .map(|&idx| self.columns[idx].clone())
            .collect();
        let table = Arc::new(self.clone());
        Ok(Arc::new(RemoteScanExec::new(table, columns, query, schema)))
    }
}

// ---------------------------------------------------------------------------------------------
// The scan

/// Reads one remote query as a stream of record batches. `EXPLAIN` shows the statement sent.
#[derive(Debug)]
struct RemoteScanExec {
    table: Arc<RemoteTable>,
    columns: Vec<RemoteColumn>,
    query: RemoteQuery,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl RemoteScanExec {
    fn new(
        table: Arc<RemoteTable>,
        columns: Vec<RemoteColumn>,
        query: RemoteQuery,
        schema: SchemaRef,
    ) -> RemoteScanExec {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        RemoteScanExec {
            table,
            columns,
            query,
            schema,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for RemoteScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let params: Vec<String> = self.query.params.iter().map(ToString::to_string).collect();
        write!(
            f,
            "RemoteScanExec: federation={}, sql={}, params=[{}]",
            self.table.inner.entry,
            self.query.sql,
            params.join(", ")
        )
    }
}

impl ExecutionPlan for RemoteScanExec {
    fn name(&self) -> &'static str {
        "RemoteScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "RemoteScanExec has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "RemoteScanExec has one partition, not {partition}"
            )));
        }
        let mut builder =
            RecordBatchReceiverStreamBuilder::new(Arc::clone(&self.schema), READ_AHEAD_BATCHES);
        let tx = builder.tx();
        let table = Arc::clone(&self.table);
        let columns = self.columns.clone();
        let query = self.query.clone();
        let schema = Arc::clone(&self.schema);
        match &self.table.inner.source {
            Source::Postgres(_) => {
                builder.spawn(scan_postgres(table, columns, query, schema, tx));
            }
            Source::Sqlite(_) => {
                builder.spawn_blocking(move || scan_sqlite(&table, &columns, &query, schema, &tx));
            }
        }
        Ok(builder.build())
    }
}

// ---------------------------------------------------------------------------------------------
// Rows to Arrow

/// Column builders for one batch.
struct BatchBuilder {
    schema: SchemaRef,
    builders: Vec<ColumnBuilder>,
    n_rows: usize,
}

impl BatchBuilder {
    fn new(schema: SchemaRef, columns: &[RemoteColumn]) -> BatchBuilder {
        let builders = columns
            .iter()
            .map(|column| ColumnBuilder::new(&column.data_type))
            .collect();
        BatchBuilder {
            schema,
            builders,
            n_rows: 0,
        }
    }

    /// The rows so far as a batch; the builders start over.
    fn finish(&mut self) -> DfResult<RecordBatch> {
        let arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .map(ColumnBuilder::finish)
            .collect();
        let options = RecordBatchOptions::new().with_row_count(Some(self.n_rows));
        self.n_rows = 0;
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            arrays,
            &options,
        )?)
    }
}

/// One column of a batch, by its Arrow type.
enum ColumnBuilder {
    Int16(Int16Builder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float32(Float32Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Utf8(StringBuilder),
    Binary(BinaryBuilder),
    Timestamp(TimestampMicrosecondBuilder),
    Date32(Date32Builder),
    Decimal128(Decimal128Builder, u8, i8),
}

/// Why a PostgreSQL value could not be read (a protocol surprise, not a type mismatch).
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("malformed {what} value of {n_bytes} bytes")]
    Length { what: &'static str, n_bytes: usize },
    #[error("text is not UTF-8")]
    Utf8,
}

fn fixed<const N: usize>(raw: &[u8], what: &'static str) -> Result<[u8; N], DecodeError> {
    raw.try_into().map_err(|_| DecodeError::Length {
        what,
        n_bytes: raw.len(),
    })
}

impl ColumnBuilder {
    fn new(data_type: &DataType) -> ColumnBuilder {
        let n = BATCH_ROWS;
        match data_type {
            DataType::Int16 => ColumnBuilder::Int16(Int16Builder::with_capacity(n)),
            DataType::Int32 => ColumnBuilder::Int32(Int32Builder::with_capacity(n)),
            DataType::Int64 => ColumnBuilder::Int64(Int64Builder::with_capacity(n)),
            DataType::Float32 => ColumnBuilder::Float32(Float32Builder::with_capacity(n)),
            DataType::Float64 => ColumnBuilder::Float64(Float64Builder::with_capacity(n)),
            DataType::Boolean => ColumnBuilder::Boolean(BooleanBuilder::with_capacity(n)),
            DataType::Binary => ColumnBuilder::Binary(BinaryBuilder::new()),
            DataType::Timestamp(..) => ColumnBuilder::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(n).with_data_type(data_type.clone()),
            ),
            DataType::Date32 => ColumnBuilder::Date32(Date32Builder::with_capacity(n)),
            DataType::Decimal128(precision, scale) => ColumnBuilder::Decimal128(
                Decimal128Builder::with_capacity(n).with_data_type(data_type.clone()),
                *precision,
                *scale,
            ),
            // Utf8, and anything unforeseen, as text.
            _ => ColumnBuilder::Utf8(StringBuilder::new()),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::Int16(b) => Arc::new(b.finish()),
            ColumnBuilder::Int32(b) => Arc::new(b.finish()),
            ColumnBuilder::Int64(b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(b) => Arc::new(b.finish()),
            ColumnBuilder::Boolean(b) => Arc::new(b.finish()),
            ColumnBuilder::Utf8(b) => Arc::new(b.finish()),
            ColumnBuilder::Binary(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b) => Arc::new(b.finish()),
            ColumnBuilder::Date32(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal128(b, _, _) => Arc::new(b.finish()),
        }
    }

    fn append_null(&mut self) {
        match self {
            ColumnBuilder::Int16(b) => b.append_null(),
            ColumnBuilder::Int32(b) => b.append_null(),
            ColumnBuilder::Int64(b) => b.append_null(),
            ColumnBuilder::Float32(b) => b.append_null(),
            ColumnBuilder::Float64(b) => b.append_null(),
            ColumnBuilder::Boolean(b) => b.append_null(),
            ColumnBuilder::Utf8(b) => b.append_null(),
            ColumnBuilder::Binary(b) => b.append_null(),
            ColumnBuilder::Timestamp(b) => b.append_null(),
            ColumnBuilder::Date32(b) => b.append_null(),
            ColumnBuilder::Decimal128(b, _, _) => b.append_null(),
        }
    }

    /// Appends a PostgreSQL value in binary format. The server's type was checked against the
    /// column's on the first row, so the builder's type says how to read the bytes.
    fn push_pg(&mut self, raw: Option<&[u8]>) -> Result<(), DecodeError> {
        let Some(raw) = raw else {
            self.append_null();
            return Ok(());
        };
        match self {
            ColumnBuilder::Int16(b) => b.append_value(i16::from_be_bytes(fixed(raw, "int2")?)),
            ColumnBuilder::Int32(b) => b.append_value(i32::from_be_bytes(fixed(raw, "int4")?)),
            ColumnBuilder::Int64(b) => b.append_value(i64::from_be_bytes(fixed(raw, "int8")?)),
            ColumnBuilder::Float32(b) => b.append_value(f32::from_be_bytes(fixed(raw, "float4")?)),
            ColumnBuilder::Float64(b) => b.append_value(f64::from_be_bytes(fixed(raw, "float8")?)),
            ColumnBuilder::Boolean(b) => b.append_value(fixed::<1>(raw, "bool")?[0] != 0),
            ColumnBuilder::Utf8(b) => {
                b.append_value(std::str::from_utf8(raw).map_err(|_| DecodeError::Utf8)?);
            }
            ColumnBuilder::Binary(b) => b.append_value(raw),
            ColumnBuilder::Timestamp(b) => {
                // Microseconds since 2000-01-01; ±infinity do not fit and become NULL.
                let pg = i64::from_be_bytes(fixed(raw, "timestamp")?);
                match pg_timestamp_to_unix_us(pg) {
                    Some(micros) => b.append_value(micros),
                    None => b.append_null(),
                }
            }
            ColumnBuilder::Date32(b) => {
                let pg = i32::from_be_bytes(fixed(raw, "date")?);
                match pg_date_to_unix_days(pg) {
                    Some(days) => b.append_value(days),
                    None => b.append_null(),
                }
            }
            ColumnBuilder::Decimal128(b, precision, scale) => {
                // Sent as text; NaN and ±Infinity do not fit a decimal and become NULL.
                let text = std::str::from_utf8(raw).map_err(|_| DecodeError::Utf8)?;
                match datafusion::arrow::compute::kernels::cast_utils::parse_decimal::<Decimal128Type>(
                    text, *precision, *scale,
                ) {
                    Ok(value) => b.append_value(value),
                    Err(_) => b.append_null(),
                }
            }
        }
        Ok(())
    }

    /// Appends a SQLite value; a value that does not fit the column's type becomes NULL.
    fn push_sqlite(&mut self, value: rusqlite::types::ValueRef<'_>) {
        use rusqlite::types::ValueRef;
        match (self, value) {
            (builder, ValueRef::Null) => builder.append_null(),
            (ColumnBuilder::Int64(b), ValueRef::Integer(v)) => b.append_value(v),
            (ColumnBuilder::Float64(b), ValueRef::Integer(v)) => b.append_value(v as f64),
            (ColumnBuilder::Float64(b), ValueRef::Real(v)) => b.append_value(v),
            (ColumnBuilder::Boolean(b), ValueRef::Integer(v)) => b.append_value(v != 0),
            (ColumnBuilder::Utf8(b), ValueRef::Text(text)) => match std::str::from_utf8(text) {
                Ok(text) => b.append_value(text),
                Err(_) => b.append_null(),
            },
            (ColumnBuilder::Utf8(b), ValueRef::Integer(v)) => b.append_value(v.to_string()),
            (ColumnBuilder::Utf8(b), ValueRef::Real(v)) => b.append_value(v.to_string()),
            (ColumnBuilder::Binary(b), ValueRef::Blob(bytes) | ValueRef::Text(bytes)) => {
                b.append_value(bytes);
            }
            (builder, _) => builder.append_null(),
        }
    }
}

fn pg_timestamp_to_unix_us(pg: i64) -> Option<i64> {
    if pg == i64::MAX || pg == i64::MIN {
        return None;
    }
    pg.checked_add(PG_EPOCH_OFFSET_US)
}

fn pg_date_to_unix_days(pg: i32) -> Option<i32> {
    if pg == i32::MAX || pg == i32::MIN {
        return None;
    }
    pg.checked_add(PG_EPOCH_OFFSET_DAYS)
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::{col, lit};

    use super::*;

    fn table(source: Source, columns: Vec<RemoteColumn>) -> RemoteTable {
        let inner = Arc::new(SchemaInner {
            entry: "crm".into(),
            source,
            state: Mutex::new(Discovery::default()),
            scans: Arc::new(Semaphore::new(1)),
        });
        RemoteTable::new(
            &inner,
            "customers".into(),
            "\"public\".\"customers\"".into(),
            columns,
        )
    }

    fn pg_table() -> RemoteTable {
        let source = Source::Postgres(Box::new(PgSource {
            config: Err("unused".into()),
            shown_url: "postgresql://h/db".into(),
            schema: "public".into(),
            tables: None,
        }));
        table(
            source,
            vec![
                pg_column("id", "integer", "int4", -1),
                pg_column("name", "text", "text", -1),
                pg_column("code", "character(3)", "bpchar", 7),
                pg_column("balance", "numeric(12,2)", "numeric", (12 << 16 | 2) + 4),
                pg_column("score", "numeric", "numeric", -1),
                pg_column("seen", "timestamp with time zone", "timestamptz", -1),
                pg_column("tags", "text[]", "", -1),
            ],
        )
    }

    #[test]
    fn postgres_types_map_to_arrow() {
        let table = pg_table();
        let types: Vec<String> = table
            .schema
            .fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect();
        assert_eq!(
            types,
            [
                "id Int32",
                "name Utf8",
                "code Utf8",
                "balance Decimal128(12, 2)",
                "score Float64",
                "seen Timestamp(µs, \"UTC\")",
                "tags Utf8",
            ]
        );
    }

    #[test]
    fn postgres_pushdown_projection_filters_and_limit() {
        let table = pg_table();
        let filters = [
            col("id").gt_eq(lit(10i32)),
            lit("b").lt(col("name")),
            col("tags").is_null(),
            // Not translated: stays with DataFusion only.
            col("code").eq(lit("abc")),
            col("score").lt(lit(0.5f64)).and(col("seen").is_not_null()),
            col("id").eq(lit(1i32)).or(col("id").eq(lit(2i32))),
            col("id").in_list(vec![lit(3i32), lit(4i64)], false),
            col("name").like(lit("a\\%%")),
            col("name").not_like(lit("x_")),
            // Partly translated: a superset of the AND, none of the OR.
            col("id").lt(lit(100i32)).and(col("code").eq(lit("abc"))),
            col("id").eq(lit(1i32)).or(col("code").eq(lit("abc"))),
            // Not translated: a NULL in the list, ILIKE, a pattern that is not a literal.
            col("id").in_list(vec![lit(3i32), lit(ScalarValue::Int32(None))], true),
            col("name").ilike(lit("a%")),
            col("name").like(col("code")),
            col("name").like(lit("ends in a lone escape \\")),
        ];
        let query = table.remote_query(&[1, 0], &filters, Some(5));
        assert_eq!(
            query.sql,
            "SELECT \"name\", \"id\" FROM \"public\".\"customers\" WHERE \"id\" >= CAST($1 AS int8) \
             AND (\"name\") COLLATE \"C\" > CAST($2 AS text) AND \"tags\"::text IS NULL \
             AND (\"score\"::float8 < CAST($3 AS float8) AND \"seen\" IS NOT NULL) \
             AND (\"id\" = CAST($4 AS int8) OR \"id\" = CAST($5 AS int8)) \
             AND \"id\" IN (CAST($6 AS int8), CAST($7 AS int8)) \
             AND (\"name\") COLLATE \"C\" LIKE CAST($8 AS text) ESCAPE '\\' \
             AND (\"name\") COLLATE \"C\" NOT LIKE CAST($9 AS text) ESCAPE '\\' \
             AND \"id\" < CAST($10 AS int8) LIMIT 5"
        );
        assert_eq!(
            query.params,
            [
                ParamValue::Integer(10),
                ParamValue::Text("b".into()),
                ParamValue::Real(0.5),
                ParamValue::Integer(1),
                ParamValue::Integer(2),
                ParamValue::Integer(3),
                ParamValue::Integer(4),
                ParamValue::Text("a\\%%".into()),
                ParamValue::Text("x_".into()),
                ParamValue::Integer(100),
            ]
        );
        let verdicts = table
            .supports_filters_pushdown(&filters.iter().collect::<Vec<_>>())
            .unwrap();
        use TableProviderFilterPushDown::{Inexact, Unsupported};
        assert_eq!(
            verdicts,
            [
                Inexact,
                Inexact,
                Inexact,
                Unsupported,
                Inexact,
                Inexact,
                Inexact,
                Inexact,
                Inexact,
                Inexact,
                Unsupported,
                Unsupported,
                Unsupported,
                Unsupported,
                Unsupported
            ]
        );
        let count = table.remote_query(&[], &[], None);
        assert_eq!(count.sql, "SELECT 1 FROM \"public\".\"customers\"");
    }

    #[test]
    fn timestamp_literals_are_sent_as_text() {
        let table = pg_table();
        let at = ScalarValue::TimestampMicrosecond(Some(1_700_000_000_123_456), Some("UTC".into()));
        let query = table.remote_query(&[5], &[col("seen").lt(lit(at))], None);
        assert_eq!(
            query.params,
            [ParamValue::Text("2023-11-14 22:13:20.123456+00".into())]
        );
    }

    #[test]
    fn sqlite_affinity_and_pushdown() {
        let source = Source::Sqlite(SqliteSource {
            path: "/nonexistent".into(),
            tables: None,
        });
        let columns = [
            "INTEGER",
            "VARCHAR(20)",
            "",
            "DOUBLE",
            "BOOLEAN",
            "DATETIME",
            "DECIMAL(10,2)",
            "BLOB",
        ]
        .iter()
        .enumerate()
        .map(|(idx, declared)| sqlite_column(&format!("c{idx}"), declared))
        .collect();
        let table = table(source, columns);
        let types: Vec<String> = table
            .schema
            .fields()
            .iter()
            .map(|f| f.data_type().to_string())
            .collect();
        assert_eq!(
            types,
            [
                "Int64", "Utf8", "Utf8", "Float64", "Boolean", "Utf8", "Float64", "Binary"
            ]
        );
        let filters = [
            col("c0").eq(lit(3i64)),
            col("c1").lt_eq(lit("x")),
            col("c2").eq(lit("5")),
            col("c0").is_null(),
            col("c7").is_not_null(),
        ];
        let query = table.remote_query(&[0], &filters, None);
        assert_eq!(
            query.sql,
            "SELECT \"c0\" FROM \"public\".\"customers\" WHERE \"c0\" = ?1 AND \"c1\" COLLATE BINARY <= ?2 \
             AND \"c7\" IS NOT NULL"
        );
        assert_eq!(
            query.params,
            [ParamValue::Integer(3), ParamValue::Text("x".into())]
        );
    }

    #[test]
    fn sqlite_values_that_do_not_fit_become_null() {
        use rusqlite::types::ValueRef;
        let mut ints = ColumnBuilder::new(&DataType::Int64);
        ints.push_sqlite(ValueRef::Integer(7));
        ints.push_sqlite(ValueRef::Text(b"seven"));
        ints.push_sqlite(ValueRef::Real(7.5));
        let array = ints.finish();
        assert_eq!(
            format!("{array:?}").split_whitespace().collect::<String>(),
            "PrimitiveArray<Int64>[7,null,null,]"
        );
    }

    #[tokio::test]
    async fn file_sources_register_and_missing_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let regions = dir.path().join("regions");
        std::fs::create_dir_all(&regions).unwrap();
        std::fs::write(regions.join("a.csv"), "user_id,region\nu1,north\n").unwrap();
        std::fs::write(regions.join("b.csv"), "user_id,region\nu2,south\n").unwrap();
        std::fs::write(regions.join("c.txt"), "not,this\n").unwrap();
        let ctx = SessionContext::new();
        let entry = |name: &str, path: PathBuf| FederationConfig {
            name: name.into(),
            source: FederationSource::Files {
                format: FileFormat::Csv,
                path,
                file_extension: ".csv".into(),
                has_header: true,
            },
        };
        let entries = [
            entry("regions", regions),
            entry("gone", dir.path().join("missing")),
        ];
        register(&ctx, &entries, Duration::from_secs(30)).await;
        let batches = ctx
            .sql("SELECT user_id, region FROM regions ORDER BY user_id")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string();
        assert!(text.contains("| u1      | north  |"), "{text}");
        assert!(text.contains("| u2      | south  |"), "{text}");
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 2);
        let error = match ctx.sql("SELECT * FROM gone").await {
            Ok(frame) => frame.collect().await.unwrap_err(),
            Err(error) => error,
        };
        let message = error.strip_backtrace();
        assert!(message.contains("federation entry `gone`"), "{message}");
        assert!(message.contains("does not exist"), "{message}");
    }

    #[test]
    fn debug_output_ends() {
        // A table refers back to its schema, which lists its tables: Debug must not recurse.
        let table = Arc::new(pg_table());
        let mut state = table.inner.state.lock().unwrap();
        state.tables = Some(BTreeMap::from([(
            "customers".to_owned(),
            Arc::clone(&table),
        )]));
        drop(state);
        let shown = format!("{table:?} {:?}", table.inner);
        assert!(shown.contains("customers"), "{shown}");
    }

    #[test]
    fn postgres_epochs() {
        assert_eq!(pg_timestamp_to_unix_us(0), Some(946_684_800_000_000));
        assert_eq!(pg_timestamp_to_unix_us(i64::MAX), None);
        assert_eq!(pg_date_to_unix_days(0), Some(10_957));
        assert_eq!(pg_date_to_unix_days(i32::MIN), None);
        assert_eq!(numeric_precision_scale(-1), None);
        assert_eq!(numeric_precision_scale((12 << 16 | 2) + 4), Some((12, 2)));
        assert_eq!(numeric_precision_scale((60 << 16) + 4), None);
    }
}
