//! Row conversion: values as PostgreSQL sends them (binary format) and as SQLite returns them,
//! appended to Arrow builders of the column's type and cut into record batches of
//! [`BATCH_ROWS`] rows.
//!
//! Pure: no I/O. It must not choose a column's type (the source modules do, at discovery) and
//! must not panic on a surprising value: a value that does not fit its column becomes NULL, a
//! PostgreSQL value of the wrong length is a [`DecodeError`].

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, RecordBatch, RecordBatchOptions,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, SchemaRef};
use datafusion::error::Result as DfResult;

use super::{BATCH_ROWS, RemoteColumn};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Days from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_DAYS: i32 = 10_957;

/// Column builders for one batch.
pub(super) struct BatchBuilder {
    schema: SchemaRef,
    pub(super) builders: Vec<ColumnBuilder>,
    pub(super) n_rows: usize,
}

impl BatchBuilder {
    pub(super) fn new(schema: SchemaRef, columns: &[RemoteColumn]) -> BatchBuilder {
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
    pub(super) fn finish(&mut self) -> DfResult<RecordBatch> {
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
pub(super) enum ColumnBuilder {
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
pub(super) enum DecodeError {
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
    pub(super) fn push_pg(&mut self, raw: Option<&[u8]>) -> Result<(), DecodeError> {
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
    pub(super) fn push_sqlite(&mut self, value: rusqlite::types::ValueRef<'_>) {
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
    use super::*;

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

    #[test]
    fn postgres_epochs() {
        assert_eq!(pg_timestamp_to_unix_us(0), Some(946_684_800_000_000));
        assert_eq!(pg_timestamp_to_unix_us(i64::MAX), None);
        assert_eq!(pg_date_to_unix_days(0), Some(10_957));
        assert_eq!(pg_date_to_unix_days(i32::MIN), None);
    }
}
