//! Filter pushdown: DataFusion filters as the `WHERE` of a remote `SELECT`, with the literals as
//! parameters. A translated condition keeps at least every row the filter keeps (DataFusion
//! checks every filter again), so a translation may widen but never narrow; what cannot be
//! translated that way is not sent.
//!
//! Pure: no I/O, no connection, no clock. It must not decide how a column is read (the source
//! modules set a column's [`Compare`] and [`NullTests`]) nor run the statement it builds.

use std::fmt;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::expr::{InList, Like};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

use super::RemoteColumn;

/// Which comparisons with a literal are pushed down on a column, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compare {
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
pub(super) enum NullTests {
    Both,
    NotNullOnly,
}

/// A parameter of a remote query.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ParamValue {
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
pub(super) struct RemoteQuery {
    pub(super) sql: String,
    pub(super) params: Vec<ParamValue>,
}

/// Translates filters on one remote table's columns into its source's SQL.
pub(super) struct Pushdown<'a> {
    columns: &'a [RemoteColumn],
    postgres: bool,
}

impl<'a> Pushdown<'a> {
    pub(super) fn new(columns: &'a [RemoteColumn], postgres: bool) -> Pushdown<'a> {
        Pushdown { columns, postgres }
    }

    /// Whether `filter` translates: DataFusion is told `Inexact` for those, `Unsupported` else.
    pub(super) fn supports(&self, filter: &Expr) -> bool {
        self.translate(filter, &mut Vec::new()).is_some()
    }

    /// The remote statement for a scan: projected columns, the filters that translate, LIMIT.
    pub(super) fn remote_query(
        &self,
        from_sql: &str,
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
        let mut sql = format!("SELECT {select} FROM {from_sql}");
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
        params.push(literal_param(column, value, self.postgres)?);
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
