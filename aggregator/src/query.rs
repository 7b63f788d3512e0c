//! SQL over the fleet's events with Apache DataFusion.
//!
//! Table `events` is [`EventsTable`]: each scan takes a [`Snapshot`] of the store (recent rows in
//! memory plus one version of the Delta table) and unions a memory scan with a table scan (with
//! partition pruning and file statistics, [`crate::store::table::scan`]), so a query sees every
//! stored event exactly once while flushes go on.
//!
//! Safety: every statement passes [`crate::readonly::check_sql`] before planning (the same check
//! the PostgreSQL protocol runs) and is then planned with DDL, DML and other statements disallowed,
//! under a memory pool of `query.memory_limit_bytes`, a timeout of `query.timeout_ms`, and at most
//! `query.max_result_rows` rows returned (the rest is cut and flagged `truncated`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::Result as DfResult;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use futures::StreamExt;
use runnel_common::streams::{AGENT_DROPS, ALERTS, DEAD_LETTERS};
use runnel_config::QueryConfig;

use crate::schema::EVENTS_SCHEMA;
use crate::store::EventStore;

/// The `events` table over the store.
#[derive(Debug)]
pub struct EventsTable {
    store: Arc<EventStore>,
}

impl std::fmt::Debug for EventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore").finish_non_exhaustive()
    }
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        EVENTS_SCHEMA.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Every filter reaches the table scan, which skips partitions and files by it; the rows
    /// are filtered again above the union (memory rows are not filtered in the scan).
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<datafusion::logical_expr::TableProviderFilterPushDown>> {
        Ok(vec![
            datafusion::logical_expr::TableProviderFilterPushDown::Inexact;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let snapshot = self.store.snapshot();
        let memory = MemTable::try_new(EVENTS_SCHEMA.clone(), vec![snapshot.recent])?;
        let mut plans = vec![memory.scan(state, projection, filters, limit).await?];
        if let Some(table) = &snapshot.table {
            plans.push(crate::store::table::scan(state, table, projection, filters, limit).await?);
        }
        UnionExec::try_new(plans)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement is not valid SQL or names unknown tables or columns.
    #[error("{0}")]
    Invalid(String),
    /// The statement is not a read ([`crate::readonly`]).
    #[error("{0}")]
    Refused(#[from] crate::readonly::Refusal),
    #[error("query exceeded the time limit of {timeout_ms} ms (query.timeout_ms)")]
    Timeout { timeout_ms: u64 },
    #[error("query failed: {0}")]
    Execution(String),
    #[error(
        "the result has more than {max_rows} rows (query.max_result_rows); add a LIMIT or aggregate"
    )]
    TooManyRows { max_rows: usize },
}

/// A finished query.
pub struct QueryResult {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub n_rows: usize,
    /// More rows existed than `query.max_result_rows`.
    pub truncated: bool,
    pub elapsed: Duration,
}

pub struct QueryEngine {
    ctx: SessionContext,
    timeout: Duration,
    max_result_rows: usize,
}

impl QueryEngine {
    pub fn new(
        config: &QueryConfig,
        store: Arc<EventStore>,
        files: &crate::store::Files,
    ) -> anyhow::Result<Self> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(
                usize::try_from(config.memory_limit_bytes).unwrap_or(usize::MAX),
                1.0,
            )
            .build_arc()?;
        // Off: DataFusion's would name Arrow types; `crate::catalog` installs one that names
        // PostgreSQL's, as pg_catalog does.
        let session = SessionConfig::new()
            .with_information_schema(false)
            .with_target_partitions(2);
        let mut ctx = SessionContext::new_with_config_rt(session, runtime);
        prepare_context(&ctx)?;
        datafusion_functions_json::register_all(&mut ctx)?;
        crate::functions::register(&ctx);
        if let Some((url, store)) = &files.register {
            let url = datafusion::execution::object_store::ObjectStoreUrl::parse(url)?;
            ctx.register_object_store(url.as_ref(), Arc::clone(store));
        }
        ctx.register_table("events", Arc::new(EventsTable { store }))?;
        crate::catalog::install(&ctx)?;
        Ok(QueryEngine {
            ctx,
            timeout: Duration::from_millis(config.timeout_ms),
            max_result_rows: config.max_result_rows,
        })
    }

    /// The DataFusion context every query runs in (the PostgreSQL server's too).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Creates the views over `events` (`dead_letters`, `agent_drops`, `alerts`, named as
    /// [`runnel_common::streams`] names the streams). Separate from `new` because planning SQL is
    /// async.
    pub async fn create_views(&self) -> anyhow::Result<()> {
        self.ctx.sql(&dead_letters_view()).await?;
        self.ctx.sql(&agent_drops_view()).await?;
        self.ctx.sql(&alerts_view()).await?;
        Ok(())
    }

    /// Registers the `[[federation]]` sources (read-only schemas and tables). Never fails: a
    /// source that cannot be read is logged and fails the queries that name it.
    pub async fn register_federation(&self, entries: &[runnel_config::FederationConfig]) {
        crate::federation::register(&self.ctx, entries, self.timeout).await;
    }
}

/// Adds the `pg_catalog` schema clients expect (psql's `\d`, Grafana) and the functions it comes
/// with to `ctx`. Every door queries this one context, so it is set up here with the tables, not
/// by the PostgreSQL protocol's module.
pub fn prepare_context(ctx: &SessionContext) -> anyhow::Result<()> {
    datafusion_postgres::datafusion_pg_catalog::pg_catalog::setup_pg_catalog(
        ctx,
        "datafusion",
        datafusion_postgres::datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider,
    )
    .map_err(|error| anyhow::anyhow!("set up pg_catalog: {error}"))?;
    Ok(())
}

/// Registers the `agents` table: the fleet as the WAL and the open connections know it.
impl QueryEngine {
    pub fn register_agents(
        &self,
        agents: Arc<crate::registry::ConnectedAgents>,
        wal: crate::wal::Wal,
    ) -> anyhow::Result<()> {
        self.ctx.register_table(
            "agents",
            Arc::new(crate::agents_table::AgentsTable {
                agents,
                wal: wal.downgrade(),
                fleet: None,
            }),
        )?;
        Ok(())
    }

    /// The `agents` table with what the fleet knows (labels, config versions, health), and the
    /// `rollouts` table (see `crate::fleet`).
    pub fn register_fleet(
        &self,
        fleet: Arc<crate::fleet::Fleet>,
        agents: Arc<crate::registry::ConnectedAgents>,
        wal: crate::wal::Wal,
    ) -> anyhow::Result<()> {
        self.ctx.deregister_table("agents")?;
        self.ctx.register_table(
            "agents",
            Arc::new(crate::agents_table::AgentsTable {
                agents,
                wal: wal.downgrade(),
                fleet: Some(Arc::clone(&fleet)),
            }),
        )?;
        self.ctx.register_table(
            "rollouts",
            Arc::new(crate::agents_table::RolloutsTable { fleet }),
        )?;
        Ok(())
    }
}

/// Alerts: events the agents' stateful rules emit on stream `alerts`, with their window values
/// in `attrs`.
pub fn alerts_view() -> String {
    format!(
        "CREATE VIEW {ALERTS} AS SELECT agent_id, seq, event_time, receive_time, \
         name, event_id, score, attrs FROM events WHERE stream = '{ALERTS}'"
    )
}

/// Dead letters: input a source could not decode, kept with the reason and (capped) raw bytes.
/// They are events on stream `dead_letters`; this view puts their attributes in columns.
pub fn dead_letters_view() -> String {
    format!(
        "CREATE VIEW {DEAD_LETTERS} AS SELECT agent_id, seq, receive_time, source, \
         json_get_str(attrs, 'reason') AS reason, json_get_str(attrs, 'topic') AS topic, \
         json_get_int(attrs, 'raw_bytes') AS raw_bytes, json_get_bool(attrs, 'raw_truncated') AS raw_truncated, \
         json_get_str(attrs, 'raw') AS raw \
         FROM events WHERE stream = '{DEAD_LETTERS}'"
    )
}

/// Events agents dropped under a `drop_newest` / `drop_oldest` buffer policy: one row per agent
/// commit, stream and reason. `SELECT stream, sum(n_events) FROM agent_drops GROUP BY stream` is
/// exact: each report was committed in the same transaction as the drop it counts.
pub fn agent_drops_view() -> String {
    format!(
        "CREATE VIEW {AGENT_DROPS} AS SELECT agent_id, seq, receive_time AS time, \
         json_get_str(attrs, 'stream') AS stream, json_get_str(attrs, 'reason') AS reason, \
         json_get_int(attrs, 'n_events') AS n_events \
         FROM events WHERE stream = '{AGENT_DROPS}'"
    )
}

/// A query whose rows are still coming: for results sent as they are produced.
pub struct QueryStream {
    pub schema: SchemaRef,
    /// Yields at most `query.max_result_rows` rows; past them, or past the deadline, one error
    /// and the end.
    pub batches: futures::stream::BoxStream<'static, Result<RecordBatch, QueryError>>,
}

/// Read-only planning: no DDL, no DML, no other statements. The second line behind
/// [`QueryEngine::refuse_writes`].
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

impl QueryEngine {
    /// The read-only check every door runs, here for the HTTP API and the CLI (no session).
    fn refuse_writes(&self, sql: &str) -> Result<(), QueryError> {
        crate::readonly::check_sql(&self.ctx.state(), sql, crate::readonly::Door::Stateless)?;
        Ok(())
    }

    /// Plans `sql` and starts it, under the same limits as [`QueryEngine::run`]; a result over
    /// `query.max_result_rows` ends with an error instead of being cut silently.
    pub async fn stream(&self, sql: &str) -> Result<QueryStream, QueryError> {
        self.refuse_writes(sql)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timeout = QueryError::Timeout {
            timeout_ms: self.timeout.as_millis() as u64,
        };
        let started = async {
            let frame = self
                .ctx
                .sql_with_options(sql, read_only())
                .await
                .map_err(|error| QueryError::Invalid(error.strip_backtrace()))?;
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let stream = frame
                .execute_stream()
                .await
                .map_err(|error| QueryError::Execution(error.strip_backtrace()))?;
            Ok::<_, QueryError>((schema, stream))
        };
        let (schema, stream) =
            tokio::time::timeout_at(deadline, started)
                .await
                .map_err(|_| QueryError::Timeout {
                    timeout_ms: self.timeout.as_millis() as u64,
                })??;
        let max_rows = self.max_result_rows;
        let batches = futures::stream::unfold(
            (stream, 0usize, Some(timeout)),
            move |(mut stream, n_rows, timeout)| async move {
                let timeout = timeout?;
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Err(_) => Some((Err(timeout), (stream, n_rows, None))),
                    Ok(None) => None,
                    Ok(Some(Err(error))) => Some((
                        Err(QueryError::Execution(error.strip_backtrace())),
                        (stream, n_rows, None),
                    )),
                    Ok(Some(Ok(batch))) if n_rows + batch.num_rows() > max_rows => Some((
                        Err(QueryError::TooManyRows { max_rows }),
                        (stream, n_rows, None),
                    )),
                    Ok(Some(Ok(batch))) => {
                        let n_rows = n_rows + batch.num_rows();
                        Some((Ok(batch), (stream, n_rows, Some(timeout))))
                    }
                }
            },
        )
        .fuse()
        .boxed();
        Ok(QueryStream { schema, batches })
    }

    pub async fn run(&self, sql: &str) -> Result<QueryResult, QueryError> {
        self.refuse_writes(sql)?;
        let started = Instant::now();
        let work = async {
            let frame = self
                .ctx
                .sql_with_options(sql, read_only())
                .await
                .map_err(|error| QueryError::Invalid(error.strip_backtrace()))?;
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let mut stream = frame
                .execute_stream()
                .await
                .map_err(|error| QueryError::Execution(error.strip_backtrace()))?;
            let mut batches = Vec::new();
            let mut n_rows = 0usize;
            let mut truncated = false;
            while let Some(batch) = stream.next().await {
                let batch =
                    batch.map_err(|error| QueryError::Execution(error.strip_backtrace()))?;
                let room = self.max_result_rows - n_rows;
                if batch.num_rows() > room {
                    batches.push(batch.slice(0, room));
                    n_rows += room;
                    truncated = true;
                    break;
                }
                n_rows += batch.num_rows();
                batches.push(batch);
            }
            Ok::<_, QueryError>((schema, batches, n_rows, truncated))
        };
        let (schema, batches, n_rows, truncated) = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| QueryError::Timeout {
                timeout_ms: self.timeout.as_millis() as u64,
            })??;
        Ok(QueryResult {
            schema,
            batches,
            n_rows,
            truncated,
            elapsed: started.elapsed(),
        })
    }
}

/// Renders a result as `{"columns":[{"name","type"}],"rows":[[...]],"n_rows","truncated","elapsed_ms"}`.
pub fn to_json(result: &QueryResult) -> serde_json::Value {
    let columns: Vec<serde_json::Value> = result
        .schema
        .fields()
        .iter()
        .map(|f| serde_json::json!({ "name": f.name(), "type": f.data_type().to_string() }))
        .collect();
    let mut rows = Vec::with_capacity(result.n_rows);
    let options = FormatOptions::default().with_null("null");
    for batch in &result.batches {
        let formatters: Vec<Option<ArrayFormatter<'_>>> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok())
            .collect();
        for row in 0..batch.num_rows() {
            let cells = batch
                .columns()
                .iter()
                .zip(&formatters)
                .map(|(column, formatter)| cell(column, formatter.as_ref(), row))
                .collect::<Vec<_>>();
            rows.push(serde_json::Value::Array(cells));
        }
    }
    serde_json::json!({
        "columns": columns,
        "rows": rows,
        "n_rows": result.n_rows,
        "truncated": result.truncated,
        "elapsed_ms": result.elapsed.as_secs_f64() * 1000.0,
    })
}

fn cell(
    column: &ArrayRef,
    formatter: Option<&ArrayFormatter<'_>>,
    row: usize,
) -> serde_json::Value {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes as dt;
    use serde_json::Value as J;
    if column.is_null(row) {
        return J::Null;
    }
    match column.data_type() {
        DataType::Boolean => J::Bool(column.as_boolean().value(row)),
        DataType::Int8 => J::from(column.as_primitive::<dt::Int8Type>().value(row)),
        DataType::Int16 => J::from(column.as_primitive::<dt::Int16Type>().value(row)),
        DataType::Int32 => J::from(column.as_primitive::<dt::Int32Type>().value(row)),
        DataType::Int64 => J::from(column.as_primitive::<dt::Int64Type>().value(row)),
        DataType::UInt8 => J::from(column.as_primitive::<dt::UInt8Type>().value(row)),
        DataType::UInt16 => J::from(column.as_primitive::<dt::UInt16Type>().value(row)),
        DataType::UInt32 => J::from(column.as_primitive::<dt::UInt32Type>().value(row)),
        DataType::UInt64 => J::from(column.as_primitive::<dt::UInt64Type>().value(row)),
        DataType::Float32 => J::from(f64::from(
            column.as_primitive::<dt::Float32Type>().value(row),
        )),
        DataType::Float64 => J::from(column.as_primitive::<dt::Float64Type>().value(row)),
        DataType::Utf8 => J::String(column.as_string::<i32>().value(row).to_owned()),
        DataType::LargeUtf8 => J::String(column.as_string::<i64>().value(row).to_owned()),
        DataType::Utf8View => J::String(column.as_string_view().value(row).to_owned()),
        DataType::List(_) => {
            let list = column.as_list::<i32>().value(row);
            let options = FormatOptions::default().with_null("null");
            let formatter = ArrayFormatter::try_new(list.as_ref(), &options).ok();
            J::Array(
                (0..list.len())
                    .map(|i| cell(&list, formatter.as_ref(), i))
                    .collect(),
            )
        }
        _ => match formatter {
            Some(formatter) => J::String(formatter.value(row).to_string()),
            None => J::Null,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use runnel_common::{Event, SourceKind, Value};

    use super::*;

    fn event(seq: u64, stream: &str, attrs: &[(&str, Value)]) -> Event {
        Event {
            seq,
            event_time_ms: 1_700_000_000_000,
            receive_time_ms: 1_700_000_000_000,
            source: SourceKind::Http,
            stream: stream.into(),
            name: "n".into(),
            event_id: None,
            user_id: None,
            session_id: None,
            score: None,
            tags: vec![],
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    async fn engine() -> QueryEngine {
        let store = Arc::new(EventStore::new(1000));
        let events = vec![
            event(1, "web", &[("url", Value::String("/a".into()))]),
            event(2, "web", &[("url", Value::String("/b".into()))]),
            event(
                3,
                "dead_letters",
                &[
                    ("reason", Value::String("bad base64".into())),
                    ("raw_bytes", Value::Int(4)),
                ],
            ),
            event(
                4,
                "agent_drops",
                &[
                    ("stream", Value::String("web".into())),
                    ("reason", Value::String("buffer_full_evicted".into())),
                    ("n_events", Value::Int(7)),
                ],
            ),
        ];
        store.insert(
            1,
            "edge-1",
            (0, 4),
            crate::schema::to_record_batches("edge-1", 0, &events),
        );
        let config = runnel_config::parse_aggregator(
            "[ingest]\nca_cert = \"c\"\ncert = \"c\"\nkey = \"k\"",
            std::path::Path::new("aggregator.toml"),
        )
        .unwrap()
        .query;
        let engine =
            QueryEngine::new(&config, store, &crate::store::Files::local_for_tests()).unwrap();
        engine.create_views().await.unwrap();
        engine
    }

    #[tokio::test]
    async fn json_functions_and_dead_letters_view() {
        let engine = engine().await;
        let result = engine
            .run("SELECT json_get_str(attrs, 'url') AS url FROM events WHERE stream = 'web' ORDER BY seq")
            .await
            .unwrap();
        assert_eq!(
            to_json(&result)["rows"],
            serde_json::json!([["/a"], ["/b"]])
        );
        let result = engine
            .run("SELECT agent_id, seq, reason, raw_bytes FROM dead_letters")
            .await
            .unwrap();
        assert_eq!(
            to_json(&result)["rows"],
            serde_json::json!([["edge-1", 3, "bad base64", 4]])
        );
        let result = engine
            .run("SELECT stream, reason, sum(n_events) FROM agent_drops GROUP BY stream, reason")
            .await
            .unwrap();
        assert_eq!(
            to_json(&result)["rows"],
            serde_json::json!([["web", "buffer_full_evicted", 7]])
        );
    }

    #[tokio::test]
    async fn only_reads_are_allowed() {
        let engine = engine().await;
        for (sql, kind) in [
            ("CREATE TABLE t AS SELECT 1", "CREATE TABLE AS"),
            ("DROP VIEW dead_letters", "DROP VIEW"),
            ("INSERT INTO events SELECT * FROM events", "INSERT"),
            ("COPY events TO STDOUT", "COPY"),
            ("COPY (SELECT 1) TO STDOUT", "COPY"),
            (
                "SET datafusion.execution.batch_size = 1",
                "SET datafusion.execution.batch_size",
            ),
        ] {
            let error = engine
                .run(sql)
                .await
                .err()
                .unwrap_or_else(|| panic!("{sql} was allowed"));
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("Runnel's SQL is read-only: {kind} is refused")),
                "{sql}: {error}"
            );
            assert!(matches!(error, QueryError::Refused(_)), "{sql}: {error:?}");
            let streamed = engine.stream(sql).await.err().expect(sql);
            assert!(
                matches!(streamed, QueryError::Refused(_)),
                "{sql}: {streamed:?}"
            );
        }
        let error = engine.run("BEGIN").await.err().expect("BEGIN over HTTP");
        assert!(error.to_string().contains("needs a session"), "{error}");
        for sql in [
            "SELECT count(*) FROM dead_letters",
            "EXPLAIN SELECT count(*) FROM events",
            "SHOW datafusion.execution.batch_size",
            "SHOW TABLES",
        ] {
            engine
                .run(sql)
                .await
                .unwrap_or_else(|error| panic!("{sql}: {error}"));
        }
    }

    #[tokio::test]
    async fn results_are_cut_at_max_rows() {
        let engine = engine().await;
        let engine = QueryEngine {
            max_result_rows: 2,
            ..engine
        };
        let result = engine.run("SELECT seq FROM events").await.unwrap();
        assert_eq!((result.n_rows, result.truncated), (2, true));
    }
}
