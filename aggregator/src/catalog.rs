//! `information_schema` with PostgreSQL's type names, the same ones `pg_catalog` shows.
//!
//! DataFusion's own `information_schema.columns` names Arrow types (`Utf8`, `UInt64`,
//! `Timestamp(ms, "UTC")`), while datafusion-postgres' `pg_catalog` (what psql's `\d` reads)
//! names PostgreSQL types. Grafana and BI tools read `information_schema` to find time and
//! numeric columns, so both must agree. [`install`] registers an `information_schema` schema in
//! the default catalog that serves DataFusion's tables (`tables`, `views`, `schemata`,
//! `df_settings`, `routines`, `parameters`) unchanged and its own `columns`, with PostgreSQL's
//! columns and the type [`pg_type`] gives, which is the mapping `pg_catalog.pg_attribute` uses.
//! DataFusion's built-in interception of the name must be off (`with_information_schema(false)`),
//! or it would answer instead.
//!
//! This module only describes the catalog; it creates, changes and scans no table.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, Int32Builder, RecordBatch, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::information_schema::{INFORMATION_SCHEMA, InformationSchemaProvider};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::catalog::{CatalogProviderList, SchemaProvider, TableProvider};
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::prelude::SessionContext;
use datafusion_postgres::pgwire::api::Type;

/// PostgreSQL's `character_octet_length` of `text`: the largest value it stores (1 GiB).
const TEXT_OCTET_LENGTH: i32 = 1 << 30;

/// Registers Runnel's `information_schema` in `ctx`'s default catalog. Call it after every table
/// function is registered: `information_schema.routines` lists the ones known at this point.
pub fn install(ctx: &SessionContext) -> anyhow::Result<()> {
    let state = ctx.state();
    anyhow::ensure!(
        !state.config().information_schema(),
        "DataFusion's information_schema is on and would hide Runnel's: build the session with \
         SessionConfig::with_information_schema(false)"
    );
    let catalog_name = state.config().options().catalog.default_catalog.clone();
    let catalog_list = Arc::clone(state.catalog_list());
    let catalog = catalog_list.catalog(&catalog_name).ok_or_else(|| {
        anyhow::anyhow!("default catalog {catalog_name:?} missing: register information_schema in an existing catalog")
    })?;
    let schema = InformationSchema {
        datafusion: InformationSchemaProvider::new(Arc::clone(&catalog_list))
            .with_table_functions(state.table_functions().clone()),
        columns: Arc::new(Columns::new(catalog_list)),
    };
    catalog.register_schema(INFORMATION_SCHEMA, Arc::new(schema))?;
    Ok(())
}

/// The PostgreSQL type a column of `data_type` has in `pg_catalog.pg_attribute` (and so in
/// `format_type(atttypid, atttypmod)` and psql's `\d`): arrow-pg's mapping (the one results are
/// sent with), narrowed to the types pg_attribute keeps and `text` otherwise, as
/// datafusion-pg-catalog 0.19's `PgAttributeTable::datafusion_to_pg_type` does. A test checks the
/// two agree, so a change there shows up here.
pub fn pg_type(data_type: &DataType) -> Type {
    const KEPT: [Type; 16] = [
        Type::BOOL,
        Type::CHAR,
        Type::INT2,
        Type::INT4,
        Type::INT8,
        Type::FLOAT4,
        Type::FLOAT8,
        Type::TEXT,
        Type::BYTEA,
        Type::DATE,
        Type::TIME,
        Type::TIMESTAMP,
        Type::TIMESTAMPTZ,
        Type::NUMERIC,
        Type::INT4_ARRAY,
        Type::TEXT_ARRAY,
    ];
    match datafusion_postgres::arrow_pg::datatypes::into_pg_type(data_type) {
        Ok(pg) if KEPT.contains(&pg) => pg,
        _ => Type::TEXT,
    }
}

/// `information_schema.columns.data_type` for `pg`: PostgreSQL's spelling (`format_type`'s
/// without modifiers), `ARRAY` for arrays (the element type is in `udt_name`, as `_text`).
pub fn pg_type_name(pg: &Type) -> &'static str {
    match *pg {
        Type::BOOL => "boolean",
        Type::CHAR => "\"char\"",
        Type::INT2 => "smallint",
        Type::INT4 => "integer",
        Type::INT8 => "bigint",
        Type::FLOAT4 => "real",
        Type::FLOAT8 => "double precision",
        Type::TEXT => "text",
        Type::BYTEA => "bytea",
        Type::DATE => "date",
        Type::TIME => "time without time zone",
        Type::TIMESTAMP => "timestamp without time zone",
        Type::TIMESTAMPTZ => "timestamp with time zone",
        Type::NUMERIC => "numeric",
        Type::INT4_ARRAY | Type::TEXT_ARRAY => "ARRAY",
        _ => "USER-DEFINED",
    }
}

/// DataFusion's `information_schema` tables, with `columns` replaced.
#[derive(Debug)]
struct InformationSchema {
    datafusion: InformationSchemaProvider,
    columns: Arc<Columns>,
}

#[async_trait]
impl SchemaProvider for InformationSchema {
    fn table_names(&self) -> Vec<String> {
        self.datafusion.table_names()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        if name.eq_ignore_ascii_case("columns") {
            let partition: Arc<dyn PartitionStream> = Arc::clone(&self.columns) as _;
            return Ok(Some(Arc::new(StreamingTable::try_new(
                Arc::clone(&self.columns.schema),
                vec![partition],
            )?)));
        }
        self.datafusion.table(name).await
    }

    fn table_exist(&self, name: &str) -> bool {
        self.datafusion.table_exist(name)
    }
}

/// `information_schema.columns`, computed from the catalog at each scan.
#[derive(Debug)]
struct Columns {
    schema: SchemaRef,
    catalog_list: Arc<dyn CatalogProviderList>,
}

impl Columns {
    fn new(catalog_list: Arc<dyn CatalogProviderList>) -> Columns {
        let text = |name: &str, nullable: bool| Field::new(name, DataType::Utf8, nullable);
        // PostgreSQL's `cardinal_number` is an integer.
        let number = |name: &str| Field::new(name, DataType::Int32, true);
        let schema = Arc::new(Schema::new(vec![
            text("table_catalog", false),
            text("table_schema", false),
            text("table_name", false),
            text("column_name", false),
            Field::new("ordinal_position", DataType::Int32, false),
            text("column_default", true),
            text("is_nullable", false),
            text("data_type", false),
            number("character_maximum_length"),
            number("character_octet_length"),
            number("numeric_precision"),
            number("numeric_precision_radix"),
            number("numeric_scale"),
            number("datetime_precision"),
            text("interval_type", true),
            text("udt_catalog", false),
            text("udt_schema", false),
            text("udt_name", false),
            text("dtd_identifier", false),
            text("is_identity", false),
            text("is_generated", false),
            text("is_updatable", false),
        ]));
        Columns {
            schema,
            catalog_list,
        }
    }

    async fn batch(
        schema: SchemaRef,
        catalog_list: Arc<dyn CatalogProviderList>,
    ) -> DfResult<RecordBatch> {
        let mut rows = Rows::default();
        for catalog_name in catalog_list.catalog_names() {
            let Some(catalog) = catalog_list.catalog(&catalog_name) else {
                continue;
            };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else {
                    continue;
                };
                for table_name in schema.table_names() {
                    // A source that cannot be reached (federation) fails the queries that
                    // name it, not the catalog.
                    let table = match schema.table(&table_name).await {
                        Ok(Some(table)) => table,
                        Ok(None) => continue,
                        Err(error) => {
                            tracing::debug!(
                                error = %error.strip_backtrace(),
                                catalog = %catalog_name,
                                schema = %schema_name,
                                table = %table_name,
                                "information_schema.columns skips a table it cannot open"
                            );
                            continue;
                        }
                    };
                    let names = [&catalog_name, &schema_name, &table_name];
                    for (column_idx, field) in table.schema().fields().iter().enumerate() {
                        rows.push(names, column_idx, field);
                    }
                }
            }
        }
        rows.finish(schema)
    }
}

impl PartitionStream for Columns {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        let catalog_list = Arc::clone(&self.catalog_list);
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&schema),
            futures::stream::once(Columns::batch(schema, catalog_list)),
        ))
    }
}

/// The columns of `information_schema.columns`, filled row by row.
#[derive(Default)]
struct Rows {
    table_catalog: StringBuilder,
    table_schema: StringBuilder,
    table_name: StringBuilder,
    column_name: StringBuilder,
    ordinal_position: Int32Builder,
    column_default: StringBuilder,
    is_nullable: StringBuilder,
    data_type: StringBuilder,
    character_maximum_length: Int32Builder,
    character_octet_length: Int32Builder,
    numeric_precision: Int32Builder,
    numeric_precision_radix: Int32Builder,
    numeric_scale: Int32Builder,
    datetime_precision: Int32Builder,
    interval_type: StringBuilder,
    udt_catalog: StringBuilder,
    udt_schema: StringBuilder,
    udt_name: StringBuilder,
    dtd_identifier: StringBuilder,
    is_identity: StringBuilder,
    is_generated: StringBuilder,
    is_updatable: StringBuilder,
}

/// `(precision, radix, scale)` as PostgreSQL reports them for a numeric column.
fn numeric_facts(pg: &Type, data_type: &DataType) -> (Option<i32>, Option<i32>, Option<i32>) {
    match (pg, data_type) {
        (&Type::INT2, _) => (Some(16), Some(2), Some(0)),
        (&Type::INT4, _) => (Some(32), Some(2), Some(0)),
        (&Type::INT8, _) => (Some(64), Some(2), Some(0)),
        (&Type::FLOAT4, _) => (Some(24), Some(2), None),
        (&Type::FLOAT8, _) => (Some(53), Some(2), None),
        // `numeric` without a declared precision in pg_attribute; the Arrow type knows it.
        (&Type::NUMERIC, DataType::UInt64) => (Some(20), Some(10), Some(0)),
        (&Type::NUMERIC, DataType::Decimal128(precision, scale)) => (
            Some(i32::from(*precision)),
            Some(10),
            Some(i32::from(*scale)),
        ),
        (&Type::NUMERIC, _) => (None, Some(10), None),
        _ => (None, None, None),
    }
}

/// Fractional digits of seconds, as PostgreSQL reports them (at most 6: microseconds).
fn datetime_precision(pg: &Type, data_type: &DataType) -> Option<i32> {
    let digits = |unit: &TimeUnit| match unit {
        TimeUnit::Second => 0,
        TimeUnit::Millisecond => 3,
        TimeUnit::Microsecond | TimeUnit::Nanosecond => 6,
    };
    match (pg, data_type) {
        (&Type::DATE, _) => Some(0),
        (_, DataType::Timestamp(unit, _) | DataType::Time32(unit) | DataType::Time64(unit)) => {
            Some(digits(unit))
        }
        (&Type::TIME | &Type::TIMESTAMP | &Type::TIMESTAMPTZ, _) => Some(6),
        _ => None,
    }
}

impl Rows {
    fn push(&mut self, [catalog, schema, table]: [&String; 3], column_idx: usize, field: &Field) {
        let pg = pg_type(field.data_type());
        let ordinal = i32::try_from(column_idx + 1).unwrap_or(i32::MAX);
        self.table_catalog.append_value(catalog);
        self.table_schema.append_value(schema);
        self.table_name.append_value(table);
        self.column_name.append_value(field.name());
        self.ordinal_position.append_value(ordinal);
        self.column_default.append_null();
        self.is_nullable
            .append_value(if field.is_nullable() { "YES" } else { "NO" });
        self.data_type.append_value(pg_type_name(&pg));
        self.character_maximum_length.append_null();
        self.character_octet_length
            .append_option((pg == Type::TEXT).then_some(TEXT_OCTET_LENGTH));
        let (precision, radix, scale) = numeric_facts(&pg, field.data_type());
        self.numeric_precision.append_option(precision);
        self.numeric_precision_radix.append_option(radix);
        self.numeric_scale.append_option(scale);
        self.datetime_precision
            .append_option(datetime_precision(&pg, field.data_type()));
        self.interval_type.append_null();
        self.udt_catalog.append_value(catalog);
        self.udt_schema.append_value("pg_catalog");
        self.udt_name.append_value(pg.name());
        self.dtd_identifier.append_value(ordinal.to_string());
        self.is_identity.append_value("NO");
        self.is_generated.append_value("NEVER");
        // Runnel's SQL is read-only (crate::readonly).
        self.is_updatable.append_value("NO");
    }

    fn finish(mut self, schema: SchemaRef) -> DfResult<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.table_catalog.finish()),
            Arc::new(self.table_schema.finish()),
            Arc::new(self.table_name.finish()),
            Arc::new(self.column_name.finish()),
            Arc::new(self.ordinal_position.finish()),
            Arc::new(self.column_default.finish()),
            Arc::new(self.is_nullable.finish()),
            Arc::new(self.data_type.finish()),
            Arc::new(self.character_maximum_length.finish()),
            Arc::new(self.character_octet_length.finish()),
            Arc::new(self.numeric_precision.finish()),
            Arc::new(self.numeric_precision_radix.finish()),
            Arc::new(self.numeric_scale.finish()),
            Arc::new(self.datetime_precision.finish()),
            Arc::new(self.interval_type.finish()),
            Arc::new(self.udt_catalog.finish()),
            Arc::new(self.udt_schema.finish()),
            Arc::new(self.udt_name.finish()),
            Arc::new(self.dtd_identifier.finish()),
            Arc::new(self.is_identity.finish()),
            Arc::new(self.is_generated.finish()),
            Arc::new(self.is_updatable.finish()),
        ];
        Ok(RecordBatch::try_new(schema, columns)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use datafusion::arrow::array::AsArray;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionConfig;

    use super::*;

    /// A context set up as the aggregator's is, with a table of every Arrow type Runnel's
    /// tables and federation sources produce (and a few more).
    async fn context() -> SessionContext {
        let ctx = SessionContext::new_with_config(SessionConfig::new());
        crate::query::prepare_context(&ctx).unwrap();
        let list = |item: DataType| DataType::List(Arc::new(Field::new_list_field(item, true)));
        let fields = vec![
            Field::new("a_utf8", DataType::Utf8, false),
            Field::new("a_large_utf8", DataType::LargeUtf8, true),
            Field::new("a_utf8_view", DataType::Utf8View, true),
            Field::new("a_bool", DataType::Boolean, true),
            Field::new("an_int8", DataType::Int8, true),
            Field::new("an_int16", DataType::Int16, true),
            Field::new("an_int32", DataType::Int32, true),
            Field::new("an_int64", DataType::Int64, true),
            Field::new("a_uint8", DataType::UInt8, true),
            Field::new("a_uint32", DataType::UInt32, true),
            Field::new("a_uint64", DataType::UInt64, false),
            Field::new("a_float32", DataType::Float32, true),
            Field::new("a_float64", DataType::Float64, true),
            Field::new("a_decimal", DataType::Decimal128(10, 2), true),
            Field::new(
                "a_timestamp_ms_utc",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new(
                "a_timestamp_us",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ),
            Field::new("a_date", DataType::Date32, true),
            Field::new("a_time", DataType::Time64(TimeUnit::Microsecond), true),
            Field::new("a_binary", DataType::Binary, true),
            Field::new(
                "an_interval",
                DataType::Interval(datafusion::arrow::datatypes::IntervalUnit::MonthDayNano),
                true,
            ),
            Field::new("a_text_list", list(DataType::Utf8), false),
            Field::new("an_int_list", list(DataType::Int32), true),
            Field::new("a_float_list", list(DataType::Float64), true),
        ];
        let table = MemTable::try_new(Arc::new(Schema::new(fields)), vec![vec![]]).unwrap();
        ctx.register_table("every_type", Arc::new(table)).unwrap();
        ctx.register_table(
            "events",
            Arc::new(
                MemTable::try_new(crate::schema::EVENTS_SCHEMA.clone(), vec![vec![]]).unwrap(),
            ),
        )
        .unwrap();
        install(&ctx).unwrap();
        ctx
    }

    /// `(column, strings...)` rows of a query whose columns are all text.
    async fn rows(ctx: &SessionContext, sql: &str) -> BTreeMap<String, Vec<String>> {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut out = BTreeMap::new();
        for batch in batches {
            let cast: Vec<ArrayRef> = batch
                .columns()
                .iter()
                .map(|c| datafusion::arrow::compute::cast(c, &DataType::Utf8).unwrap())
                .collect();
            for row in 0..batch.num_rows() {
                let cells: Vec<String> = cast
                    .iter()
                    .map(|c| c.as_string::<i32>().value(row).to_owned())
                    .collect();
                out.insert(cells[0].clone(), cells[1..].to_vec());
            }
        }
        out
    }

    #[tokio::test]
    async fn columns_name_the_types_pg_catalog_names() {
        let ctx = context().await;
        for table in ["every_type", "events"] {
            let ours = rows(
                &ctx,
                &format!(
                    "SELECT column_name, data_type, udt_name FROM information_schema.columns \
                     WHERE table_schema = 'public' AND table_name = '{table}'"
                ),
            )
            .await;
            let pg_catalog = rows(
                &ctx,
                &format!(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname \
                     FROM pg_catalog.pg_attribute a \
                     JOIN pg_catalog.pg_class c ON a.attrelid = c.oid \
                     JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                     WHERE c.relname = '{table}'"
                ),
            )
            .await;
            assert_eq!(
                ours.keys().collect::<Vec<_>>(),
                pg_catalog.keys().collect::<Vec<_>>(),
                "{table}: the same columns"
            );
            for (column, theirs) in &pg_catalog {
                let ours = &ours[column];
                assert_eq!(ours[1], theirs[1], "{table}.{column}: udt_name = typname");
                let expected = if theirs[0].ends_with("[]") {
                    "ARRAY"
                } else {
                    theirs[0].as_str()
                };
                assert_eq!(
                    ours[0], expected,
                    "{table}.{column}: data_type = format_type"
                );
            }
        }
    }

    #[tokio::test]
    async fn events_columns_read_as_postgresql_has_them() {
        let ctx = context().await;
        let columns = rows(
            &ctx,
            "SELECT column_name, data_type, udt_name, is_nullable, ordinal_position, \
             numeric_precision, datetime_precision FROM information_schema.columns \
             WHERE table_name = 'events'",
        )
        .await;
        let row = |column: &str| {
            columns[column]
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        };
        assert_eq!(row("agent_id")[..4], ["text", "text", "NO", "1"]);
        assert_eq!(row("seq")[..5], ["numeric", "numeric", "NO", "2", "20"]);
        assert_eq!(
            row("event_time")[..4],
            ["timestamp with time zone", "timestamptz", "NO", "3"]
        );
        assert_eq!(row("event_time")[5], "3", "milliseconds");
        assert_eq!(row("score")[..3], ["double precision", "float8", "YES"]);
        assert_eq!(row("tags")[..2], ["ARRAY", "_text"]);
    }

    #[tokio::test]
    async fn the_other_information_schema_tables_and_show_still_answer() {
        let ctx = context().await;
        let tables = rows(
            &ctx,
            "SELECT table_name, table_type FROM information_schema.tables \
             WHERE table_schema = 'public'",
        )
        .await;
        assert_eq!(tables["events"], ["BASE TABLE"]);
        for sql in [
            "SHOW TABLES",
            "SHOW COLUMNS FROM events",
            "SHOW datafusion.execution.batch_size",
            "SELECT * FROM information_schema.schemata",
            "SELECT * FROM information_schema.views",
            "SELECT count(*) FROM information_schema.routines",
        ] {
            ctx.sql(sql)
                .await
                .unwrap_or_else(|error| panic!("{sql}: {error}"))
                .collect()
                .await
                .unwrap_or_else(|error| panic!("{sql}: {error}"));
        }
    }
}
