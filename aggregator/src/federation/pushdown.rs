//! Filter pushdown: DataFusion filters as the `WHERE` of a remote `SELECT`, with the literals as
//! parameters. A translated condition keeps at least every row the filter keeps (DataFusion
//! checks every filter again), so a translation may widen but never narrow; what cannot be
//! translated that way is not sent.
//!
//! The remote's SQL is a [`Dialect`]: PostgreSQL gets every literal as a text parameter `$n` it
//! casts to the column's type, SQLite gets `?n` bound as an integer, a real or text. A column
//! whose [`Compare`] was chosen for the other dialect is never pushed.
//!
//! Pure: no I/O, no connection, no clock, so every translation is unit-tested without a
//! database. It must not decide how a column is read (the source modules set a column's
//! [`Compare`] and [`NullTests`]) nor run the statement it builds.

use std::fmt;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::expr::{InList, Like};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

use super::RemoteColumn;

/// The SQL dialect of a remote database, as far as filters need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    /// Parameters `$n`, sent as text and cast (`CAST($n AS int8)`); text cannot hold NUL;
    /// `LIKE` under the "C" collation matches as DataFusion's does.
    Postgres,
    /// Parameters `?n`, bound as integers, reals or text; `LIKE` ignores ASCII case, so only
    /// `LIKE` (a superset) goes, never `NOT LIKE`.
    Sqlite,
}

impl Dialect {
    /// Whether a text parameter may contain NUL (PostgreSQL's text cannot).
    fn text_holds_nul(self) -> bool {
        match self {
            Dialect::Postgres => false,
            Dialect::Sqlite => true,
        }
    }
}

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
    dialect: Dialect,
}

impl<'a> Pushdown<'a> {
    pub(super) fn new(columns: &'a [RemoteColumn], dialect: Dialect) -> Pushdown<'a> {
        Pushdown { columns, dialect }
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
        let cast = match (self.dialect, column.compare) {
            (Dialect::Postgres, Compare::PgCast(ty)) => Some(ty),
            (Dialect::Postgres, Compare::PgText) => Some("text"),
            (Dialect::Sqlite, Compare::Sqlite | Compare::SqliteText) => None,
            // Not comparable remotely, or a column read for the other dialect.
            (_, Compare::No) | (Dialect::Sqlite, Compare::PgCast(_) | Compare::PgText) => {
                return None;
            }
            (Dialect::Postgres, Compare::Sqlite | Compare::SqliteText) => return None,
        };
        params.push(literal_param(column, value, self.dialect)?);
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
fn literal_param(
    column: &RemoteColumn,
    value: &ScalarValue,
    dialect: Dialect,
) -> Option<ParamValue> {
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
                if !dialect.text_holds_nul() && text.contains('\0') {
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

#[cfg(test)]
mod tests {
    //! Every translation checked as text and parameters per dialect, without a database. The
    //! columns are built here as the source modules would build them, so these tests pin the
    //! translation, not the type mapping (`postgres` and `sqlite` test that).

    use datafusion::logical_expr::expr::Like;
    use datafusion::prelude::{col, lit};

    use super::super::quote_ident;
    use super::*;

    fn column(name: &str, data_type: DataType, compare: Compare, nulls: NullTests) -> RemoteColumn {
        RemoteColumn {
            name: name.to_owned(),
            declared: String::new(),
            data_type,
            select: quote_ident(name),
            wire: None,
            compare,
            null_tests: nulls,
        }
    }

    /// Columns as `postgres::pg_column` reads them.
    fn pg_columns() -> Vec<RemoteColumn> {
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let local = DataType::Timestamp(TimeUnit::Microsecond, None);
        vec![
            column(
                "id",
                DataType::Int64,
                Compare::PgCast("int8"),
                NullTests::Both,
            ),
            column("name", DataType::Utf8, Compare::PgText, NullTests::Both),
            column(
                "ratio",
                DataType::Float64,
                Compare::PgCast("float8"),
                NullTests::Both,
            ),
            column(
                "active",
                DataType::Boolean,
                Compare::PgCast("bool"),
                NullTests::Both,
            ),
            column("seen", utc, Compare::PgCast("timestamptz"), NullTests::Both),
            column(
                "local",
                local,
                Compare::PgCast("timestamp"),
                NullTests::Both,
            ),
            column(
                "day",
                DataType::Date32,
                Compare::PgCast("date"),
                NullTests::Both,
            ),
            column("code", DataType::Utf8, Compare::No, NullTests::Both),
            column(
                "we\"ird",
                DataType::Int64,
                Compare::PgCast("int8"),
                NullTests::Both,
            ),
        ]
    }

    /// Columns as `sqlite::sqlite_column` reads them.
    fn sqlite_columns() -> Vec<RemoteColumn> {
        let nulls = NullTests::NotNullOnly;
        vec![
            column("id", DataType::Int64, Compare::Sqlite, nulls),
            column("name", DataType::Utf8, Compare::SqliteText, nulls),
            column("ratio", DataType::Float64, Compare::Sqlite, nulls),
            column("code", DataType::Utf8, Compare::No, nulls),
        ]
    }

    /// The remote condition for `filter` and its parameters, or `None` when it is not pushed.
    /// Checks that `supports` agrees, and that a filter not pushed leaves no parameter behind.
    fn render(dialect: Dialect, filter: Expr) -> Option<(String, Vec<ParamValue>)> {
        let columns = match dialect {
            Dialect::Postgres => pg_columns(),
            Dialect::Sqlite => sqlite_columns(),
        };
        let pushdown = Pushdown::new(&columns, dialect);
        let mut params = Vec::new();
        let condition = pushdown.translate(&filter, &mut params);
        assert_eq!(pushdown.supports(&filter), condition.is_some(), "{filter}");
        if condition.is_none() {
            assert_eq!(params, [], "{filter} left parameters behind");
        }
        condition.map(|condition| (condition, params))
    }

    fn pg(filter: Expr) -> Option<(String, Vec<ParamValue>)> {
        render(Dialect::Postgres, filter)
    }

    fn sqlite(filter: Expr) -> Option<(String, Vec<ParamValue>)> {
        render(Dialect::Sqlite, filter)
    }

    fn pushed(sql: &str, params: &[ParamValue]) -> Option<(String, Vec<ParamValue>)> {
        Some((sql.to_owned(), params.to_vec()))
    }

    fn text(value: &str) -> ParamValue {
        ParamValue::Text(value.to_owned())
    }

    #[test]
    fn equality_renders_per_dialect() {
        let filter = col("id").eq(lit(1i32));
        assert_eq!(
            pg(filter.clone()),
            pushed("\"id\" = CAST($1 AS int8)", &[ParamValue::Integer(1)])
        );
        assert_eq!(
            sqlite(filter),
            pushed("\"id\" = ?1", &[ParamValue::Integer(1)])
        );
    }

    #[test]
    fn every_comparison_operator_and_a_literal_on_the_left() {
        let cases = [
            (col("id").eq(lit(7i64)), "="),
            (col("id").not_eq(lit(7i64)), "<>"),
            (col("id").lt(lit(7i64)), "<"),
            (col("id").lt_eq(lit(7i64)), "<="),
            (col("id").gt(lit(7i64)), ">"),
            (col("id").gt_eq(lit(7i64)), ">="),
            // The literal on the left: the operator turns around.
            (lit(7i64).lt(col("id")), ">"),
            (lit(7i64).gt_eq(col("id")), "<="),
        ];
        for (filter, op) in cases {
            let seven = [ParamValue::Integer(7)];
            assert_eq!(
                pg(filter.clone()),
                pushed(&format!("\"id\" {op} CAST($1 AS int8)"), &seven)
            );
            assert_eq!(sqlite(filter), pushed(&format!("\"id\" {op} ?1"), &seven));
        }
    }

    #[test]
    fn strings_with_quotes_travel_as_parameters_and_names_are_quoted() {
        let hostile = "O'Brien\"; DROP TABLE customers; --";
        let filter = col("name").eq(lit(hostile));
        assert_eq!(
            pg(filter.clone()),
            pushed(
                "(\"name\") COLLATE \"C\" = CAST($1 AS text)",
                &[text(hostile)]
            )
        );
        assert_eq!(
            sqlite(filter),
            pushed("\"name\" COLLATE BINARY = ?1", &[text(hostile)])
        );
        // A quote in a column name is doubled inside the quoted identifier.
        assert_eq!(
            pg(col("we\"ird").gt(lit(0i64))),
            pushed(
                "\"we\"\"ird\" > CAST($1 AS int8)",
                &[ParamValue::Integer(0)]
            )
        );
        // PostgreSQL text cannot hold NUL: such a literal stays with DataFusion.
        let nul = col("name").eq(lit("a\0b"));
        assert_eq!(pg(nul.clone()), None);
        assert_eq!(
            sqlite(nul),
            pushed("\"name\" COLLATE BINARY = ?1", &[text("a\0b")])
        );
    }

    #[test]
    fn or_needs_both_sides_and_keeps_the_numbering() {
        let both = col("id").eq(lit(1i32)).or(col("name").eq(lit("x")));
        assert_eq!(
            pg(both.clone()),
            pushed(
                "(\"id\" = CAST($1 AS int8) OR (\"name\") COLLATE \"C\" = CAST($2 AS text))",
                &[ParamValue::Integer(1), text("x")]
            )
        );
        assert_eq!(
            sqlite(both),
            pushed(
                "(\"id\" = ?1 OR \"name\" COLLATE BINARY = ?2)",
                &[ParamValue::Integer(1), text("x")]
            )
        );
        // One side that does not translate: a superset of the OR cannot be sent.
        let half = col("id").eq(lit(1i32)).or(col("code").eq(lit("x")));
        assert_eq!(pg(half.clone()), None);
        assert_eq!(sqlite(half), None);
    }

    #[test]
    fn and_keeps_the_sides_that_translate() {
        let half = col("id").lt(lit(100i32)).and(col("code").eq(lit("x")));
        assert_eq!(
            pg(half.clone()),
            pushed("\"id\" < CAST($1 AS int8)", &[ParamValue::Integer(100)])
        );
        assert_eq!(
            sqlite(half),
            pushed("\"id\" < ?1", &[ParamValue::Integer(100)])
        );
        // The untranslated left side's parameter does not stay behind in the numbering.
        let nested = col("id")
            .eq(lit(1i32))
            .or(col("code").eq(lit("x")))
            .and(col("id").gt(lit(2i32)));
        assert_eq!(
            sqlite(nested),
            pushed("\"id\" > ?1", &[ParamValue::Integer(2)])
        );
        let neither = col("code").eq(lit("x")).and(col("code").eq(lit("y")));
        assert_eq!(pg(neither), None);
    }

    #[test]
    fn in_lists_of_non_null_literals() {
        let in_list = col("id").in_list(vec![lit(3i32), lit(4i64)], false);
        assert_eq!(
            pg(in_list.clone()),
            pushed(
                "\"id\" IN (CAST($1 AS int8), CAST($2 AS int8))",
                &[ParamValue::Integer(3), ParamValue::Integer(4)]
            )
        );
        assert_eq!(
            sqlite(in_list),
            pushed(
                "\"id\" IN (?1, ?2)",
                &[ParamValue::Integer(3), ParamValue::Integer(4)]
            )
        );
        let not_in = col("name").in_list(vec![lit("a'b")], true);
        assert_eq!(
            pg(not_in.clone()),
            pushed(
                "(\"name\") COLLATE \"C\" NOT IN (CAST($1 AS text))",
                &[text("a'b")]
            )
        );
        assert_eq!(
            sqlite(not_in),
            pushed("\"name\" COLLATE BINARY NOT IN (?1)", &[text("a'b")])
        );
        // A NULL in the list changes three-valued logic; a column in the list is not a literal.
        let with_null = col("id").in_list(vec![lit(3i32), lit(ScalarValue::Int32(None))], true);
        let with_column = col("id").in_list(vec![lit(3i32), col("id")], false);
        let empty = col("id").in_list(vec![], false);
        let on_code = col("code").in_list(vec![lit("a")], false);
        for filter in [with_null, with_column, empty, on_code] {
            assert_eq!(pg(filter.clone()), None, "{filter}");
            assert_eq!(sqlite(filter.clone()), None, "{filter}");
        }
    }

    #[test]
    fn like_per_dialect() {
        assert_eq!(
            pg(col("name").like(lit("a\\%%"))),
            pushed(
                "(\"name\") COLLATE \"C\" LIKE CAST($1 AS text) ESCAPE '\\'",
                &[text("a\\%%")]
            )
        );
        assert_eq!(
            pg(col("name").not_like(lit("x_"))),
            pushed(
                "(\"name\") COLLATE \"C\" NOT LIKE CAST($1 AS text) ESCAPE '\\'",
                &[text("x_")]
            )
        );
        assert_eq!(
            sqlite(col("name").like(lit("a%"))),
            pushed("\"name\" LIKE ?1 ESCAPE '\\'", &[text("a%")])
        );
        // SQLite's LIKE ignores ASCII case: NOT LIKE there would drop rows DataFusion keeps.
        assert_eq!(sqlite(col("name").not_like(lit("a%"))), None);
        // Two backslashes at the end are one literal backslash: fine.
        assert_eq!(
            sqlite(col("name").like(lit("a\\\\"))),
            pushed("\"name\" LIKE ?1 ESCAPE '\\'", &[text("a\\\\")])
        );
        let other_escape = Expr::Like(Like::new(
            false,
            Box::new(col("name")),
            Box::new(lit("a!%")),
            Some('!'),
            false,
        ));
        let not_pushed = [
            col("name").ilike(lit("a%")),
            col("name").like(col("code")),
            col("name").like(lit("ends in a lone escape \\")),
            col("code").like(lit("a%")),
            col("id").like(lit("1%")),
            other_escape,
        ];
        for filter in not_pushed {
            assert_eq!(pg(filter.clone()), None, "{filter}");
            assert_eq!(sqlite(filter.clone()), None, "{filter}");
        }
    }

    #[test]
    fn null_tests_per_column() {
        assert_eq!(pg(col("code").is_null()), pushed("\"code\" IS NULL", &[]));
        assert_eq!(
            pg(col("id").is_not_null()),
            pushed("\"id\" IS NOT NULL", &[])
        );
        // SQLite keeps values that do not fit the column's type, which read as NULL here.
        assert_eq!(sqlite(col("id").is_null()), None);
        assert_eq!(
            sqlite(col("code").is_not_null()),
            pushed("\"code\" IS NOT NULL", &[])
        );
        assert_eq!(pg(col("missing").is_null()), None);
    }

    #[test]
    fn unsupported_expressions_are_not_pushed() {
        let not_pushed = [
            !col("id").eq(lit(1i32)),
            col("id").between(lit(1i32), lit(5i32)),
            (col("id") + lit(1i32)).eq(lit(2i32)),
            col("id").eq(col("id")),
            col("active").is_true(),
            col("id").eq(lit(1i32)).is_null(),
            col("missing").eq(lit(1i32)),
            col("code").eq(lit("abc")),
            lit(true),
        ];
        for filter in not_pushed {
            assert_eq!(pg(filter.clone()), None, "{filter}");
            assert_eq!(sqlite(filter.clone()), None, "{filter}");
        }
    }

    #[test]
    fn timestamps_and_dates_are_text_for_postgres() {
        let at_us = 1_700_000_000_123_456;
        let utc = Some("UTC".into());
        assert_eq!(
            pg(col("seen").lt(lit(ScalarValue::TimestampMicrosecond(
                Some(at_us),
                utc.clone()
            )))),
            pushed(
                "\"seen\" < CAST($1 AS timestamptz)",
                &[text("2023-11-14 22:13:20.123456+00")]
            )
        );
        assert_eq!(
            pg(col("local").gt_eq(lit(ScalarValue::TimestampSecond(Some(1_700_000_000), None)))),
            pushed(
                "\"local\" >= CAST($1 AS timestamp)",
                &[text("2023-11-14 22:13:20.000000")]
            )
        );
        assert_eq!(
            pg(col("seen").eq(lit(ScalarValue::TimestampNanosecond(
                Some(at_us * 1_000),
                None
            )))),
            pushed(
                "\"seen\" = CAST($1 AS timestamptz)",
                &[text("2023-11-14 22:13:20.123456+00")]
            )
        );
        assert_eq!(
            pg(col("day").eq(lit(ScalarValue::Date32(Some(19_675))))),
            pushed("\"day\" = CAST($1 AS date)", &[text("2023-11-14")])
        );
        let not_pushed = [
            // Finer than a microsecond: the remote would compare a rounded value.
            col("seen").eq(lit(ScalarValue::TimestampNanosecond(Some(1), None))),
            // Before year 1: PostgreSQL's text form differs (BC).
            col("seen").gt(lit(ScalarValue::TimestampSecond(
                Some(-62_200_000_000),
                None,
            ))),
            col("day").eq(lit(ScalarValue::Date32(Some(-800_000)))),
            // A timestamp against text, a string against a timestamp.
            col("name").eq(lit(ScalarValue::TimestampSecond(Some(0), None))),
            col("seen").eq(lit("2023-11-14")),
        ];
        for filter in not_pushed {
            assert_eq!(pg(filter.clone()), None, "{filter}");
        }
    }

    #[test]
    fn numbers_only_when_exact() {
        assert_eq!(
            pg(col("ratio").lt(lit(3i32))),
            pushed("\"ratio\" < CAST($1 AS float8)", &[ParamValue::Real(3.0)])
        );
        assert_eq!(
            sqlite(col("ratio").lt(lit(0.5f64))),
            pushed("\"ratio\" < ?1", &[ParamValue::Real(0.5)])
        );
        assert_eq!(
            pg(col("active").eq(lit(true))),
            pushed("\"active\" = CAST($1 AS bool)", &[text("true")])
        );
        let not_pushed = [
            // Beyond 2^53 an integer has no exact float.
            col("ratio").eq(lit((1i64 << 53) + 1)),
            col("ratio").eq(lit(f64::NAN)),
            // A float against an integer column, an integer beyond i64.
            col("id").eq(lit(0.5f64)),
            col("id").eq(lit(u64::MAX)),
            col("id").eq(lit("1")),
        ];
        for filter in not_pushed {
            assert_eq!(pg(filter.clone()), None, "{filter}");
            assert_eq!(sqlite(filter.clone()), None, "{filter}");
        }
    }

    #[test]
    fn a_column_read_for_the_other_dialect_is_not_pushed() {
        let pg_columns = pg_columns();
        let sqlite_columns = sqlite_columns();
        let filter = col("id").eq(lit(1i32));
        let mut params = Vec::new();
        let crossed = Pushdown::new(&pg_columns, Dialect::Sqlite).translate(&filter, &mut params);
        assert_eq!(crossed, None);
        let crossed =
            Pushdown::new(&sqlite_columns, Dialect::Postgres).translate(&filter, &mut params);
        assert_eq!(crossed, None);
        assert_eq!(params, []);
    }

    #[test]
    fn remote_query_projects_filters_and_limits() {
        let columns = sqlite_columns();
        let pushdown = Pushdown::new(&columns, Dialect::Sqlite);
        let filters = [
            col("code").eq(lit("x")),
            col("id").eq(lit(1i32)).or(col("code").eq(lit("y"))),
            col("id").gt(lit(2i32)),
            col("name").like(lit("a%")),
        ];
        let query = pushdown.remote_query("\"t\"", &[1, 0], &filters, Some(10));
        assert_eq!(
            query.sql,
            "SELECT \"name\", \"id\" FROM \"t\" WHERE \"id\" > ?1 AND \"name\" LIKE ?2 \
             ESCAPE '\\' LIMIT 10"
        );
        assert_eq!(query.params, [ParamValue::Integer(2), text("a%")]);
        let count = pushdown.remote_query("\"t\"", &[], &[], None);
        assert_eq!(count.sql, "SELECT 1 FROM \"t\"");
        assert_eq!(count.params, []);
        assert_eq!(
            ParamValue::Text("it's".into()).to_string()
                + &ParamValue::Integer(-1).to_string()
                + &ParamValue::Real(0.5).to_string(),
            "\"it's\"-10.5"
        );
    }
}
