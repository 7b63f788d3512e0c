//! Federation: external sources that SQL reads next to `events` (`[[federation]]` in
//! `aggregator.toml`), so one query can join the fleet's events with a CRM in PostgreSQL, an
//! inventory in a SQLite file or an archive of Parquet, CSV or JSON files.
//!
//! - PostgreSQL and SQLite sources become schemas (`crm.customers`): one [`RemoteTable`] per
//!   remote table or view, found when the aggregator starts (or, when the source was unreachable
//!   then, at the first query that names it). A scan sends one `SELECT` of the columns the query
//!   needs, with the filters it can translate (`column <op> literal`, `IS [NOT] NULL`,
//!   `[NOT] IN (literals)`, `[NOT] LIKE 'pattern'`, `AND`, `OR`) as a parameterized `WHERE` and
//!   the query's `LIMIT`, and streams the rows back as Arrow record batches
//!   ([`scan::RemoteScanExec`]). Filters are reported `Inexact`: DataFusion checks them again,
//!   so a remote that returns more rows than asked never changes an answer; the translation
//!   only ever makes the remote return a superset.
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
//!
//! This module owns registration ([`register`]), the schema of a remote database with its
//! discovery and retry ([`RemoteSchema`]) and the types its children share ([`Source`],
//! [`RemoteTable`], [`RemoteColumn`]). The children, each depending only on this module and on
//! siblings listed before it:
//! - `files`: file sources (listing tables, and a table that says why when the files are gone);
//! - `pushdown`: filters as remote SQL per [`pushdown::Dialect`], pure, no I/O;
//! - `rows`: PostgreSQL binary values and SQLite values into Arrow builders, pure, no I/O;
//! - `postgres`, `sqlite`: connecting, discovering tables and columns, running one scan;
//! - `scan`: the `TableProvider` of a remote table and its `ExecutionPlan`.
//!
//! It must not write to a source, nor block an async worker on SQLite (discovery and scans of a
//! SQLite file run on blocking threads).

mod files;
mod postgres;
mod pushdown;
mod rows;
mod scan;
mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{SchemaProvider, TableProvider};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::Expr;
use datafusion::prelude::SessionContext;
use runnel_config::{FederationConfig, FederationSource};
use tokio::sync::Semaphore;
use tokio_postgres::types::Type;

use postgres::PgSource;
use pushdown::{Compare, Dialect, NullTests, Pushdown, RemoteQuery};
use sqlite::SqliteSource;

/// Rows per record batch read from a remote database: DataFusion's default batch size.
pub const BATCH_ROWS: usize = 8192;

/// Batches a scan fetches ahead of the query consuming them. With [`BATCH_ROWS`] this bounds a
/// scan's memory to a few batches whatever the remote table's size.
pub const READ_AHEAD_BATCHES: usize = 2;

/// Most scans of one source at once; each holds a PostgreSQL connection or a SQLite handle on
/// a blocking thread. A query past it fails at once (waiting could deadlock a self-join).
pub const MAX_CONCURRENT_SCANS: usize = 16;

/// After a source could not be read, queries naming it get the same error for this long before
/// the next attempt, so a dead source costs one connect timeout per interval, not per query.
const RETRY_INTERVAL: Duration = Duration::from_secs(10);

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
                    Source::Postgres(Box::new(PgSource::new(
                        &entry.name,
                        source,
                        statement_timeout,
                    ))),
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
                files::register_files(ctx, &entry.name, *format, path, file_extension, *has_header)
                    .await;
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

// ---------------------------------------------------------------------------------------------
// Sources and their schemas

/// A remote database: where it is and how to reach it.
#[derive(Debug)]
enum Source {
    Postgres(Box<PgSource>),
    Sqlite(SqliteSource),
}

impl Source {
    /// What the source is, for messages: `PostgreSQL postgresql://u@h/db` or `SQLite file ...`.
    fn describe(&self) -> String {
        match self {
            Source::Postgres(pg) => format!("PostgreSQL {}", pg.shown_url),
            Source::Sqlite(sqlite) => format!("SQLite file {}", sqlite.path.display()),
        }
    }

    /// The SQL filters are translated into for this source.
    fn dialect(&self) -> Dialect {
        match self {
            Source::Postgres(_) => Dialect::Postgres,
            Source::Sqlite(_) => Dialect::Sqlite,
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
            Source::Postgres(pg) => postgres::discover_postgres(&inner, pg).await,
            Source::Sqlite(_) => {
                let blocking = Arc::clone(&inner);
                tokio::task::spawn_blocking(move || match &blocking.source {
                    Source::Sqlite(sqlite) => sqlite::discover_sqlite(&blocking, sqlite),
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
// Remote tables

/// One remote table or view. Its `TableProvider` is in `scan`.
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

    /// The filter translation for this table's columns in its source's SQL.
    fn pushdown(&self) -> Pushdown<'_> {
        Pushdown::new(&self.columns, self.inner.source.dialect())
    }

    /// The remote statement for a scan: projected columns, the filters that translate, LIMIT.
    fn remote_query(
        &self,
        projection: &[usize],
        filters: &[Expr],
        limit: Option<usize>,
    ) -> RemoteQuery {
        self.pushdown()
            .remote_query(&self.from_sql, projection, filters, limit)
    }

    /// A table of `source` named `customers` in schema `public`, for tests of the column
    /// mappings.
    #[cfg(test)]
    fn for_tests(source: Source, columns: Vec<RemoteColumn>) -> RemoteTable {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_ends() {
        // A table refers back to its schema, which lists its tables: Debug must not recurse.
        let source = Source::Sqlite(SqliteSource {
            path: "/nonexistent".into(),
            tables: None,
        });
        let columns = vec![sqlite::sqlite_column("id", "INTEGER")];
        let table = Arc::new(RemoteTable::for_tests(source, columns));
        let mut state = table.inner.state.lock().unwrap();
        state.tables = Some(BTreeMap::from([(
            "customers".to_owned(),
            Arc::clone(&table),
        )]));
        drop(state);
        let shown = format!("{table:?} {:?}", table.inner);
        assert!(shown.contains("customers"), "{shown}");
    }
}
