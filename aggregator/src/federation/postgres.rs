//! PostgreSQL sources: the connection settings of an entry (read-only sessions, a statement
//! timeout, a connect timeout), discovery of a schema's tables and views with the Arrow type
//! each column is read as, and one scan: a connection, the statement with its parameters, the
//! rows in binary format into record batches.
//!
//! It must not write (every session is `default_transaction_read_only`), must not keep a
//! connection between scans, and must not trust that a column still has the type it had at
//! discovery (the first row's types are checked).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::error::{DataFusionError, Result as DfResult};
use futures::StreamExt;
use runnel_config::PostgresSource;
use tokio::sync::mpsc;
use tokio_postgres::types::{FromSql, Type};

use super::pushdown::{Compare, NullTests, ParamValue, RemoteQuery};
use super::rows::BatchBuilder;
use super::{
    BATCH_ROWS, RemoteColumn, RemoteTable, SchemaInner, Source, quote_ident, select_tables,
};

/// How long connecting to PostgreSQL may take: at startup this delays serving, per scan it
/// delays the query.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL entry: how to connect, and which schema and tables to read.
pub(super) struct PgSource {
    /// Connection settings; `Err` when the URL did not parse (every query says so).
    config: Result<tokio_postgres::Config, String>,
    /// The URL without its password, for messages.
    pub(super) shown_url: String,
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

impl PgSource {
    pub(super) fn new(
        name: &str,
        source: &PostgresSource,
        statement_timeout: Duration,
    ) -> PgSource {
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
        PgSource {
            config,
            shown_url: source.redacted_url(),
            schema: source.schema.clone(),
            tables: source.tables.clone(),
        }
    }
}

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

pub(super) async fn discover_postgres(
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
pub(super) fn pg_column(
    name: &str,
    declared: &str,
    base_type: &str,
    type_modifier: i32,
) -> RemoteColumn {
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

pub(super) async fn scan_postgres(
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
            check_pg_types(&table, &columns, &row)?;
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

/// The server must send the types the table had when it was found.
fn check_pg_types(
    table: &RemoteTable,
    columns: &[RemoteColumn],
    row: &tokio_postgres::Row,
) -> DfResult<()> {
    for (column, sent) in columns.iter().zip(row.columns()) {
        if let Some(wire) = &column.wire
            && sent.type_() != wire
        {
            return Err(table.error(&format!(
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

#[cfg(test)]
mod tests {
    use datafusion::catalog::TableProvider;
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::TableProviderFilterPushDown;
    use datafusion::prelude::{col, lit};

    use super::*;

    fn pg_table() -> RemoteTable {
        let source = Source::Postgres(Box::new(PgSource {
            config: Err("unused".into()),
            shown_url: "postgresql://h/db".into(),
            schema: "public".into(),
            tables: None,
        }));
        RemoteTable::for_tests(
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
    fn numeric_type_modifiers() {
        assert_eq!(numeric_precision_scale(-1), None);
        assert_eq!(numeric_precision_scale((12 << 16 | 2) + 4), Some((12, 2)));
        assert_eq!(numeric_precision_scale((60 << 16) + 4), None);
    }
}
