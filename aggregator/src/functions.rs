//! SQL functions the aggregator adds to DataFusion's, or replaces.
//!
//! - `date_trunc` (and its alias `datetrunc`): DataFusion's, with a fast path for UTC
//!   timestamps. Event times are `Timestamp(ms, "UTC")`; DataFusion 55 truncates those to the
//!   hour or day through a time-zone lookup per value (about 150 ns a row, most of
//!   `SELECT date_trunc('hour', event_time) ... GROUP BY 1` over ten million rows), while for
//!   timestamps without a zone it uses arithmetic. In UTC both give the same instants, so UTC
//!   arrays are truncated as zone-less ones and get their zone back. Every other call goes to
//!   DataFusion's function unchanged.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, make_array};
use datafusion::arrow::datatypes::{DataType, FieldRef};
use datafusion::common::ScalarValue;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature,
};
use datafusion::prelude::SessionContext;

/// Registers the functions of this module on `ctx`.
pub fn register(ctx: &SessionContext) {
    let inner = datafusion::functions::datetime::date_trunc();
    ctx.register_udf(ScalarUDF::new_from_impl(UtcDateTrunc { inner }));
}

/// `date_trunc` with arithmetic for UTC timestamps (see the module docs).
#[derive(Debug, PartialEq, Eq, Hash)]
struct UtcDateTrunc {
    inner: Arc<ScalarUDF>,
}

/// Zone names that mean UTC (offset zero, no daylight saving).
fn is_utc(zone: &str) -> bool {
    matches!(
        zone,
        "UTC" | "utc" | "Etc/UTC" | "Z" | "+00:00" | "+00" | "+0000"
    )
}

/// Granularities DataFusion truncates by arithmetic only without a zone.
fn granularity_is_hour_or_day(value: &ColumnarValue) -> bool {
    match value {
        ColumnarValue::Scalar(
            ScalarValue::Utf8(Some(text))
            | ScalarValue::Utf8View(Some(text))
            | ScalarValue::LargeUtf8(Some(text)),
        ) => text.eq_ignore_ascii_case("hour") || text.eq_ignore_ascii_case("day"),
        _ => false,
    }
}

/// The same timestamps with the zone `zone` (values are instants, so nothing is converted:
/// only the type changes, the buffers are shared).
fn with_zone(array: &ArrayRef, zone: Option<Arc<str>>) -> Option<ArrayRef> {
    let DataType::Timestamp(unit, _) = array.data_type() else {
        return None;
    };
    let data = array
        .to_data()
        .into_builder()
        .data_type(DataType::Timestamp(*unit, zone))
        .build()
        .ok()?;
    Some(make_array(data))
}

impl ScalarUDFImpl for UtcDateTrunc {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> DfResult<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, mut args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let utc_array = match args.args.as_slice() {
            [granularity, ColumnarValue::Array(array)]
                if granularity_is_hour_or_day(granularity) =>
            {
                match array.data_type() {
                    DataType::Timestamp(_, Some(zone)) if is_utc(zone) => {
                        Some((Arc::clone(zone), Arc::clone(array)))
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let Some((zone, array)) = utc_array else {
            return self.inner.invoke_with_args(args);
        };
        let Some(naive) = with_zone(&array, None) else {
            return self.inner.invoke_with_args(args);
        };
        let field = args.arg_fields[1]
            .as_ref()
            .clone()
            .with_data_type(naive.data_type().clone());
        args.arg_fields[1] = Arc::new(field);
        args.args[1] = ColumnarValue::Array(naive);
        args.return_field = Arc::new(
            args.return_field
                .as_ref()
                .clone()
                .with_data_type(args.arg_fields[1].data_type().clone()),
        );
        match self.inner.invoke_with_args(args)? {
            ColumnarValue::Array(truncated) => match with_zone(&truncated, Some(zone)) {
                Some(zoned) => Ok(ColumnarValue::Array(zoned)),
                None => Ok(ColumnarValue::Array(truncated)),
            },
            scalar => Ok(scalar),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::TimestampMillisecondArray;
    use datafusion::arrow::datatypes::TimeUnit;
    use datafusion::execution::FunctionRegistry;

    use super::*;

    /// The fast path gives exactly what DataFusion's own function gives, for every
    /// granularity, around the epoch, leap days and year ends, with nulls.
    #[tokio::test]
    async fn utc_date_trunc_matches_datafusion() {
        let values: Vec<Option<i64>> = vec![
            Some(0),
            Some(-1),
            Some(-3_600_001),
            Some(1_709_164_799_999), // 2024-02-28T23:59:59.999Z
            Some(1_709_251_200_000), // 2024-03-01T00:00:00Z
            Some(1_735_689_599_123), // 2024-12-31T23:59:59.123Z
            None,
            Some(1_764_000_000_000),
        ];
        let array = TimestampMillisecondArray::from(values.clone()).with_timezone("UTC");
        let batch = datafusion::arrow::array::RecordBatch::try_from_iter([(
            "t",
            Arc::new(array) as ArrayRef,
        )])
        .expect("batch");
        let plain = SessionContext::new();
        let ours = SessionContext::new();
        register(&ours);
        for name in ["date_trunc", "datetrunc"] {
            assert_ne!(
                ours.udf(name).expect("ours"),
                plain.udf(name).expect("DataFusion's"),
                "{name} is replaced"
            );
        }
        for ctx in [&plain, &ours] {
            ctx.register_batch("times", batch.clone())
                .expect("register");
        }
        for granularity in [
            "second", "minute", "hour", "HOUR", "day", "week", "month", "year",
        ] {
            let sql = format!(
                "SELECT date_trunc('{granularity}', t) AS a, datetrunc('{granularity}', t) AS b \
                 FROM times"
            );
            let expected = plain.sql(&sql).await.unwrap().collect().await.unwrap();
            let got = ours.sql(&sql).await.unwrap().collect().await.unwrap();
            assert_eq!(got, expected, "{granularity}");
            assert_eq!(
                got[0].schema().field(0).data_type(),
                &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
            );
        }
        // Scalars and other zones go to DataFusion's function.
        let sql = "SELECT date_trunc('hour', arrow_cast(t, 'Timestamp(Millisecond, Some(\"+05:45\"))')) \
                   FROM times";
        let expected = plain.sql(sql).await.unwrap().collect().await.unwrap();
        assert_eq!(
            ours.sql(sql).await.unwrap().collect().await.unwrap(),
            expected
        );
        let sql = "SELECT date_trunc('day', TIMESTAMP '2024-02-29 13:14:15')";
        let expected = plain.sql(sql).await.unwrap().collect().await.unwrap();
        assert_eq!(
            ours.sql(sql).await.unwrap().collect().await.unwrap(),
            expected
        );
    }
}
