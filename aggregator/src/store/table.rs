//! The Delta Lake table that holds flushed events: `_delta_log/` and Parquet files partitioned by
//! `date` (DATE) and `hour` (INTEGER, 0 to 23, UTC, by event time) under the storage location.
//! Spark, Trino, DuckDB and Python read it as any Delta table (docs/STORAGE.md).
//!
//! Every change is one Delta commit, which readers see whole or not at all:
//! - a flush appends its files and, in the same commit, one transaction identifier (`txn`
//!   action) per agent it stores events of: app id [`app_id`] (`runnel-agent-<agent id>`),
//!   version = the highest sequence number of that agent the table now holds. An agent's
//!   batches reach the table in sequence order, so the table holds every event of that agent
//!   up to that version, and the table alone says what it stores;
//! - compaction is a Delta optimize commit (the small files of one partition replaced by one);
//! - retention is a delete commit whose predicate names partition columns only, so whole files
//!   are removed and none is rewritten;
//! - vacuum deletes files that no version references once they are older than the grace period.
//!
//! The table's own types are Delta's: `seq` is a `long`, timestamps are microseconds. Runnel's
//! `events` keeps its types (UInt64, milliseconds); [`scan`] casts on the way out and rewrites
//! pushed-down filters on the way in, so pruning by file statistics and partitions still works.
//!
//! Checkpoints every [`CHECKPOINT_INTERVAL`] commits keep opening the table cheap however many
//! flushes it has seen: a reader reads the last checkpoint and fewer commits than that.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::sync::{Arc, LazyLock};

use anyhow::Context;
use datafusion::arrow::array::{Array, ArrayRef, Date32Array, Int32Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::Session;
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::physical_expr::expressions::{CastExpr, Column};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::prelude::{col, lit};
use deltalake_core::kernel::engine::arrow_conversion::{TryIntoArrow, TryIntoKernel};
use deltalake_core::kernel::{EagerSnapshot, StructType, Transaction};
use deltalake_core::logstore::LogStoreRef;
use deltalake_core::protocol::SaveMode;
use deltalake_core::{DeltaTable, DeltaTableBuilder, TableProperty};

use crate::schema::{EVENTS_SCHEMA, HOUR_MS};

/// The partition columns, in path order: `date=YYYY-MM-DD/hour=H/`.
pub const PARTITION_COLUMNS: [&str; 2] = ["date", "hour"];

/// A checkpoint every this many commits (Delta's `delta.checkpointInterval`).
pub const CHECKPOINT_INTERVAL: u32 = 10;

/// Data files are compressed with zstd at this level (the flush's and compaction's alike).
const ZSTD_LEVEL: i32 = 3;

/// The transaction identifier of an agent's high-water mark.
pub fn app_id(agent_id: &str) -> String {
    format!("runnel-agent-{agent_id}")
}

/// The table's schema in Arrow, as Delta's types read back: the `events` columns with `seq` as
/// Int64 and microsecond timestamps, then `date` and `hour`.
pub static TABLE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let kernel = delta_schema().expect("the events schema has a Delta form");
    let arrow: Schema = (&kernel)
        .try_into_arrow()
        .expect("a Delta schema has an Arrow form");
    Arc::new(arrow)
});

/// The events schema plus the partition columns, in Delta's types.
fn delta_schema() -> anyhow::Result<StructType> {
    let mut fields: Vec<Field> = EVENTS_SCHEMA
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("date", DataType::Date32, false));
    fields.push(Field::new("hour", DataType::Int32, false));
    let schema = Schema::new(fields);
    (&schema)
        .try_into_kernel()
        .context("convert the events schema to a Delta schema")
}

/// Opens the table at `url` on `root_store` (whose root is the file system's or the bucket's),
/// creating it if there is none yet.
pub async fn open(
    root_store: Arc<dyn deltalake_core::ObjectStore>,
    url: &url::Url,
) -> anyhow::Result<DeltaTable> {
    register_scheme(url);
    let builder = || {
        DeltaTableBuilder::from_url(url.clone())
            .map(|b| b.with_storage_backend(Arc::clone(&root_store), url.clone()))
    };
    let mut table = builder()?.build().context("open the events table")?;
    // Load only when there is a log: loading an empty location logs an error in the kernel.
    let log = deltalake_core::Path::from("_delta_log");
    let has_log =
        futures::StreamExt::next(&mut table.log_store().object_store(None).list(Some(&log)))
            .await
            .transpose()
            .with_context(|| format!("list {url}_delta_log"))?
            .is_some();
    if has_log {
        table
            .load()
            .await
            .with_context(|| format!("load the events table {url}"))?;
        return Ok(table);
    }
    let schema = delta_schema()?;
    let created = table
        .create()
        .with_table_name("events")
        .with_comment("Runnel events (docs/STORAGE.md)")
        .with_columns(schema.fields().cloned())
        .with_partition_columns(PARTITION_COLUMNS)
        .with_configuration_property(
            TableProperty::CheckpointInterval,
            Some(CHECKPOINT_INTERVAL.to_string()),
        )
        .with_save_mode(SaveMode::ErrorIfExists)
        .await;
    match created {
        Ok(table) => {
            tracing::info!(%url, "created the events table (Delta Lake)");
            Ok(table)
        }
        // Created by someone else in between (another aggregator starting): use theirs.
        Err(_) => {
            let mut table = builder()?.build()?;
            table
                .load()
                .await
                .with_context(|| format!("create the events table {url}"))?;
            Ok(table)
        }
    }
}

/// Delta needs a log store for every URL scheme it opens; it knows `file://` and `memory://`.
/// S3 (and compatible stores) use the default one too: commits are `PUT`s with `If-None-Match`,
/// which S3 has supported since 2024, so two writers can never both write version N.
fn register_scheme(url: &url::Url) {
    #[derive(Debug)]
    struct ConditionalPut;
    impl deltalake_core::logstore::LogStoreFactory for ConditionalPut {
        fn with_options(
            &self,
            prefixed_store: deltalake_core::logstore::ObjectStoreRef,
            root_store: deltalake_core::logstore::ObjectStoreRef,
            location: &url::Url,
            options: &deltalake_core::logstore::StorageConfig,
        ) -> deltalake_core::DeltaResult<Arc<dyn deltalake_core::logstore::LogStore>> {
            Ok(deltalake_core::logstore::default_logstore(
                prefixed_store,
                root_store,
                location,
                options,
            ))
        }
    }
    if url.scheme() == "file" || url.scheme() == "memory" {
        return;
    }
    if let Ok(scheme) = url::Url::parse(&format!("{}://", url.scheme())) {
        deltalake_core::logstore::logstore_factories()
            .entry(scheme)
            .or_insert_with(|| Arc::new(ConditionalPut));
    }
}

/// The highest sequence number of `agent_id` the table holds, if any.
pub async fn committed_seq(table: &DeltaTable, agent_id: &str) -> anyhow::Result<Option<u64>> {
    let version = txn_version(table, &app_id(agent_id))
        .await
        .with_context(|| format!("read the high-water mark of agent {agent_id}"))?;
    Ok(version.and_then(|v| u64::try_from(v).ok()))
}

/// The version of transaction identifier `app_id` in the loaded version of the table, if any.
pub async fn txn_version(table: &DeltaTable, app_id: &str) -> anyhow::Result<Option<i64>> {
    let state = table.snapshot().context("the events table is not loaded")?;
    state
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
        .with_context(|| format!("read transaction identifier {app_id}"))
}

/// Rows of `events` (the query schema) of one event hour, in the table's types.
pub fn to_table_batch(batch: &RecordBatch, hour_ms: i64) -> anyhow::Result<RecordBatch> {
    let n = batch.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(TABLE_SCHEMA.fields().len());
    for (idx, field) in EVENTS_SCHEMA.fields().iter().enumerate() {
        let target = TABLE_SCHEMA.field(idx).data_type();
        let column = batch.column(idx);
        columns.push(if column.data_type() == target {
            Arc::clone(column)
        } else {
            cast(column, target).with_context(|| format!("cast column {}", field.name()))?
        });
    }
    let hour = chrono::DateTime::from_timestamp_millis(hour_ms).context("event hour")?;
    let days = i32::try_from(hour_ms.div_euclid(86_400_000)).context("event date")?;
    let hour_of_day = i32::try_from(hour.timestamp().div_euclid(3600).rem_euclid(24))
        .context("event hour of day")?;
    columns.push(Arc::new(Date32Array::from(vec![days; n])));
    columns.push(Arc::new(Int32Array::from(vec![hour_of_day; n])));
    RecordBatch::try_new(TABLE_SCHEMA.clone(), columns).context("build a table batch")
}

fn writer_properties() -> anyhow::Result<WriterProperties> {
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(ZSTD_LEVEL).context("zstd level")?,
        ))
        .build())
}

/// Appends `batches` (in [`TABLE_SCHEMA`]) and records `marks` (agent id, highest sequence
/// number stored) in the same commit, plus `extra` transaction identifiers of Runnel's own.
pub async fn append(
    table: DeltaTable,
    batches: Vec<RecordBatch>,
    marks: &BTreeMap<Arc<str>, u64>,
    extra: Vec<Transaction>,
) -> anyhow::Result<DeltaTable> {
    let mut txns: Vec<Transaction> = marks
        .iter()
        .map(|(agent, seq)| {
            Transaction::new(app_id(agent), i64::try_from(*seq).unwrap_or(i64::MAX))
        })
        .collect();
    txns.extend(extra);
    let properties = deltalake_core::kernel::transaction::CommitProperties::default()
        .with_application_transactions(txns);
    let table = table
        .write(batches)
        .with_save_mode(SaveMode::Append)
        .with_partition_columns(PARTITION_COLUMNS)
        .with_writer_properties(writer_properties()?)
        .with_commit_properties(properties)
        .await
        .context("commit to the events table")?;
    Ok(table)
}

/// A data file the current version of the table references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFile {
    /// Path relative to the table root.
    pub path: String,
    /// Start of the event hour (Unix ms) its partition holds.
    pub hour_ms: i64,
    pub n_rows: u64,
    pub n_bytes: u64,
}

/// The files of the table's current version.
pub fn files(snapshot: &EagerSnapshot) -> Vec<TableFile> {
    snapshot
        .log_data()
        .iter()
        .map(|file| {
            let partition = file.partition_values_map();
            let date = partition
                .get("date")
                .cloned()
                .flatten()
                .and_then(|d| chrono::NaiveDate::parse_from_str(&d, "%Y-%m-%d").ok());
            let hour = partition
                .get("hour")
                .cloned()
                .flatten()
                .and_then(|h| h.parse::<i64>().ok());
            let hour_ms = match (date, hour) {
                (Some(date), Some(hour)) => {
                    date.and_hms_opt(0, 0, 0)
                        .map_or(0, |d| d.and_utc().timestamp_millis())
                        + hour * HOUR_MS
                }
                _ => 0,
            };
            let n_rows = file
                .stats()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|s| s["numRecords"].as_u64())
                .unwrap_or(0);
            TableFile {
                path: file.path().into_owned(),
                hour_ms,
                n_rows,
                n_bytes: u64::try_from(file.size()).unwrap_or(0),
            }
        })
        .collect()
}

/// `date=YYYY-MM-DD`, `hour=H` of an event hour, as partition values are written in the log.
fn partition_values(hour_ms: i64) -> (String, String) {
    let hour = chrono::DateTime::from_timestamp_millis(hour_ms).unwrap_or_default();
    (
        hour.format("%Y-%m-%d").to_string(),
        hour.format("%-H").to_string(),
    )
}

/// Merges the files of the partition of `hour_ms` that are smaller than `target_bytes` into
/// files of about that size: one optimize commit. Returns the table and (files removed, files
/// added).
pub async fn compact_partition(
    table: DeltaTable,
    hour_ms: i64,
    target_bytes: u64,
) -> anyhow::Result<(DeltaTable, (u64, u64))> {
    let (date, hour) = partition_values(hour_ms);
    let filters = [
        (
            "date",
            deltalake_core::FilterOp::Eq,
            deltalake_core::FilterValue::Scalar(date.as_str()),
        ),
        (
            "hour",
            deltalake_core::FilterOp::Eq,
            deltalake_core::FilterValue::Scalar(hour.as_str()),
        ),
    ];
    let (table, metrics) = table
        .optimize()
        .with_filters(&filters)
        .with_target_size(NonZeroU64::new(target_bytes).unwrap_or(NonZeroU64::MIN))
        .with_writer_properties(writer_properties()?)
        .await
        .with_context(|| format!("compact partition date={date}/hour={hour}"))?;
    Ok((table, (metrics.num_files_removed, metrics.num_files_added)))
}

/// Removes every file of an event hour that ended at or before `cutoff_ms`: one delete commit
/// whose predicate names only partition columns (whole files go, none is rewritten).
pub async fn expire(table: DeltaTable, cutoff_ms: i64) -> anyhow::Result<DeltaTable> {
    // The last expired hour starts one hour before the cutoff (floored).
    let last_ms = (cutoff_ms - HOUR_MS).div_euclid(HOUR_MS) * HOUR_MS;
    let days = i32::try_from(last_ms.div_euclid(86_400_000)).context("retention cutoff")?;
    let hour = i32::try_from(last_ms.rem_euclid(86_400_000) / HOUR_MS).context("cutoff hour")?;
    let date = |d: i32| lit(ScalarValue::Date32(Some(d)));
    let predicate = col("date")
        .lt(date(days))
        .or(col("date").eq(date(days)).and(col("hour").lt_eq(lit(hour))));
    let (table, _) = table
        .delete()
        .with_predicate(predicate)
        .await
        .context("remove expired partitions")?;
    Ok(table)
}

/// Deletes the files no version references any more (replaced, expired, or left by an
/// interrupted flush) that are older than `grace`. Returns the table and how many went.
pub async fn vacuum(
    table: DeltaTable,
    grace: chrono::Duration,
) -> anyhow::Result<(DeltaTable, usize)> {
    let (table, metrics) = table
        .vacuum()
        .with_retention_period(grace)
        .with_enforce_retention_duration(false)
        .with_mode(deltalake_core::operations::vacuum::VacuumMode::Full)
        .await
        .context("vacuum the events table")?;
    Ok((table, metrics.files_deleted.len()))
}

/// What a query reads of the table: one version, and the store it lives in.
#[derive(Clone)]
pub struct TableView {
    pub snapshot: Arc<EagerSnapshot>,
    pub log_store: LogStoreRef,
}

impl TableView {
    pub fn of(table: &DeltaTable) -> anyhow::Result<TableView> {
        Ok(TableView {
            snapshot: Arc::new(
                table
                    .snapshot()
                    .context("the events table is not loaded")?
                    .snapshot()
                    .clone(),
            ),
            log_store: table.log_store(),
        })
    }

    pub fn version(&self) -> i64 {
        i64::try_from(self.snapshot.version()).unwrap_or(i64::MAX)
    }
}

/// Scans the table for `events`: `projection` and `filters` are in `events`' terms, and so is
/// the plan's output (cast back from the table's types).
pub async fn scan(
    state: &dyn Session,
    view: &TableView,
    projection: Option<&Vec<usize>>,
    filters: &[Expr],
    limit: Option<usize>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    let provider = deltalake_core::delta_datafusion::TableProviderBuilder::default()
        .with_log_store(Arc::clone(&view.log_store))
        .with_eager_snapshot(Arc::clone(&view.snapshot))
        .build()
        .await?;
    let provider_schema = datafusion::catalog::TableProvider::schema(&provider);
    let wanted: Vec<usize> = match projection {
        Some(p) => p.clone(),
        None => (0..EVENTS_SCHEMA.fields().len()).collect(),
    };
    let mapped: Vec<usize> = wanted
        .iter()
        .map(|idx| provider_schema.index_of(EVENTS_SCHEMA.field(*idx).name()))
        .collect::<Result<_, _>>()?;
    let mut pushed: Vec<Expr> = Vec::with_capacity(filters.len());
    for filter in filters {
        pushed.push(to_table_filter(filter.clone())?);
        pushed.extend(partition_filters(filter));
    }
    let plan =
        datafusion::catalog::TableProvider::scan(&provider, state, Some(&mapped), &pushed, limit)
            .await?;
    let scanned = plan.schema();
    let mut exprs: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> =
        Vec::with_capacity(wanted.len());
    for (out_idx, idx) in wanted.iter().enumerate() {
        let field = EVENTS_SCHEMA.field(*idx);
        let column: Arc<dyn datafusion::physical_expr::PhysicalExpr> =
            Arc::new(Column::new(scanned.field(out_idx).name(), out_idx));
        let expr: Arc<dyn datafusion::physical_expr::PhysicalExpr> =
            if scanned.field(out_idx).data_type() == field.data_type() {
                column
            } else {
                Arc::new(CastExpr::new(column, field.data_type().clone(), None))
            };
        exprs.push((expr, field.name().clone()));
    }
    Ok(Arc::new(ProjectionExec::try_new(exprs, plan)?))
}

/// The `events` columns whose table type differs, and that type.
fn table_type(column: &str) -> Option<DataType> {
    match column {
        "seq" => Some(DataType::Int64),
        "event_time" | "receive_time" | "ingest_time" => Some(DataType::Timestamp(
            TimeUnit::Microsecond,
            Some("UTC".into()),
        )),
        _ => None,
    }
}

/// A filter over `events` rewritten over the table's types. A comparison of a retyped column
/// with a constant keeps the column bare and converts the constant, so file statistics and
/// pruning still apply; any other use of a retyped column reads it cast back to `events`' type.
fn to_table_filter(filter: Expr) -> datafusion::error::Result<Expr> {
    filter
        .transform_down(|expr| {
            if let Expr::BinaryExpr(BinaryExpr { left, op, right }) = &expr
                && is_comparison(*op)
            {
                for (column_side, other, column_first) in
                    [(left, right, true), (right, left, false)]
                {
                    let Expr::Column(column) = column_side.as_ref() else {
                        continue;
                    };
                    let Some(target) = table_type(&column.name) else {
                        continue;
                    };
                    let Some(converted) = convert_constant(other, &target) else {
                        continue;
                    };
                    let (l, r) = if column_first {
                        (column_side.clone(), Box::new(converted))
                    } else {
                        (Box::new(converted), column_side.clone())
                    };
                    return Ok(Transformed::new(
                        Expr::BinaryExpr(BinaryExpr::new(l, *op, r)),
                        true,
                        TreeNodeRecursion::Jump,
                    ));
                }
            }
            if let Expr::Column(column) = &expr
                && table_type(&column.name).is_some()
                && let Ok(field) = EVENTS_SCHEMA.field_with_name(&column.name)
            {
                let cast = Expr::Cast(datafusion::logical_expr::Cast::new(
                    Box::new(expr.clone()),
                    field.data_type().clone(),
                ));
                return Ok(Transformed::new(cast, true, TreeNodeRecursion::Jump));
            }
            Ok(Transformed::no(expr))
        })
        .map(|t| t.data)
}

fn is_comparison(op: Operator) -> bool {
    matches!(
        op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
    )
}

/// A constant of `events`' type for a retyped column, in the table's type.
fn convert_constant(expr: &Expr, target: &DataType) -> Option<Expr> {
    let Expr::Literal(value, _) = expr else {
        return None;
    };
    let converted = match (value, target) {
        (
            ScalarValue::TimestampMillisecond(v, tz),
            DataType::Timestamp(TimeUnit::Microsecond, _),
        ) => ScalarValue::TimestampMicrosecond(v.and_then(|v| v.checked_mul(1000)), tz.clone()),
        (ScalarValue::UInt64(v), DataType::Int64) => ScalarValue::Int64(match v {
            Some(v) => Some(i64::try_from(*v).ok()?),
            None => None,
        }),
        _ => return None,
    };
    Some(lit(converted))
}

/// Partition filters implied by a bound on `event_time` (`date` of the bound), so whole
/// partitions are skipped before any file statistics are read.
fn partition_filters(filter: &Expr) -> Vec<Expr> {
    let mut out = Vec::new();
    let _ = filter.apply(|expr| {
        if let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr
            && let (
                Expr::Column(column),
                Expr::Literal(ScalarValue::TimestampMillisecond(Some(ms), _), _),
            ) = (left.as_ref(), right.as_ref())
            && column.name == "event_time"
        {
            let days = i32::try_from(ms.div_euclid(86_400_000)).ok();
            let date = |d: i32| lit(ScalarValue::Date32(Some(d)));
            if let Some(days) = days {
                match op {
                    Operator::Gt | Operator::GtEq => out.push(col("date").gt_eq(date(days))),
                    Operator::Lt | Operator::LtEq => out.push(col("date").lt_eq(date(days))),
                    Operator::Eq => out.push(col("date").eq(date(days))),
                    _ => {}
                }
            }
        }
        // Only conjunctions imply a bound for the whole filter.
        Ok(match expr {
            Expr::BinaryExpr(BinaryExpr {
                op: Operator::And, ..
            }) => TreeNodeRecursion::Continue,
            Expr::BinaryExpr(_) => TreeNodeRecursion::Jump,
            _ => TreeNodeRecursion::Jump,
        })
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_schema_has_delta_types_and_partitions() {
        let schema = TABLE_SCHEMA.clone();
        assert_eq!(
            schema.field_with_name("seq").unwrap().data_type(),
            &DataType::Int64
        );
        assert_eq!(
            schema.field_with_name("event_time").unwrap().data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
        );
        assert_eq!(
            schema.field_with_name("date").unwrap().data_type(),
            &DataType::Date32
        );
        assert_eq!(
            schema.field_with_name("hour").unwrap().data_type(),
            &DataType::Int32
        );
        for (idx, field) in EVENTS_SCHEMA.fields().iter().enumerate() {
            assert_eq!(schema.field(idx).name(), field.name(), "same order");
        }
    }

    #[test]
    fn partition_values_are_the_event_hour() {
        assert_eq!(
            partition_values(1_769_860_800_000),
            ("2026-01-31".to_owned(), "12".to_owned())
        );
        assert_eq!(
            partition_values(1_769_817_600_000),
            ("2026-01-31".to_owned(), "0".to_owned())
        );
    }

    #[test]
    fn filters_compare_bare_columns_with_converted_constants() {
        let ms = lit(ScalarValue::TimestampMillisecond(
            Some(1_500),
            Some("UTC".into()),
        ));
        let rewritten = to_table_filter(col("event_time").gt_eq(ms.clone())).unwrap();
        assert_eq!(
            rewritten,
            col("event_time").gt_eq(lit(ScalarValue::TimestampMicrosecond(
                Some(1_500_000),
                Some("UTC".into())
            )))
        );
        let rewritten = to_table_filter(lit(ScalarValue::UInt64(Some(7))).lt(col("seq"))).unwrap();
        assert_eq!(rewritten, lit(ScalarValue::Int64(Some(7))).lt(col("seq")));
        // Anything else reads the column cast back.
        let other = to_table_filter(col("seq").eq(col("seq"))).unwrap();
        assert!(matches!(other, Expr::BinaryExpr(_)));
        assert!(format!("{other}").contains("CAST"), "{other}");
        assert_eq!(
            partition_filters(&col("event_time").gt_eq(ms).and(col("name").eq(lit("x")))),
            vec![col("date").gt_eq(lit(ScalarValue::Date32(Some(0))))]
        );
    }
}
