//! SQLite sources: a database file opened read-only, discovery of its tables and views with the
//! Arrow type each column is read as (by the affinity of its declared type), and one scan: the
//! statement with its parameters, the rows into record batches.
//!
//! Everything here blocks: callers run it on a blocking thread, never on an async worker. It
//! must not write (files are opened `SQLITE_OPEN_READ_ONLY`) and must not keep a handle between
//! scans.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::error::{DataFusionError, Result as DfResult};
use tokio::sync::mpsc;

use super::pushdown::{Compare, NullTests, ParamValue, RemoteQuery};
use super::rows::BatchBuilder;
use super::{
    BATCH_ROWS, RemoteColumn, RemoteTable, SchemaInner, Source, quote_ident, select_tables,
};

/// How long a SQLite scan waits for a writer's lock on the file.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A SQLite entry: the file, and which tables to read.
#[derive(Debug)]
pub(super) struct SqliteSource {
    pub(super) path: PathBuf,
    pub(super) tables: Option<Vec<String>>,
}

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

pub(super) fn discover_sqlite(
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
pub(super) fn sqlite_column(name: &str, declared: &str) -> RemoteColumn {
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

pub(super) fn scan_sqlite(
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

#[cfg(test)]
mod tests {
    use datafusion::prelude::{col, lit};

    use super::*;

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
        let table = RemoteTable::for_tests(source, columns);
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
}
