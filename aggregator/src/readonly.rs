//! The read-only check every SQL door runs before planning: the HTTP API and the CLI (through the
//! query engine, a [`Door::Stateless`]) and the PostgreSQL protocol, simple and extended (a
//! [`Door::Session`]).
//!
//! [`check`] looks at one parsed statement and either lets it through or refuses it with a
//! [`Refusal`] that names the kind of statement the way PostgreSQL does ("CREATE TABLE AS",
//! "INSERT", "COPY", "DROP VIEW"), so a client sees what it sent, not a planner's internal name.
//! It owns no state and must not plan or run anything: DataFusion's own read-only
//! [`datafusion::prelude::SQLOptions`] stay behind it as a second line.
//!
//! Architecture invariant: there is one list of what runs; a door never keeps its own. This
//! module depends on no other module of the aggregator (DataFusion's parser only), so every door
//! can use it.

use datafusion::execution::context::SessionState;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{Set, Statement};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// What a door can keep between statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// A connection with a session (the PostgreSQL protocol): session settings, transactions
    /// and cursors are accepted besides reads.
    Session,
    /// One statement per request (the HTTP API and the CLI): reads only.
    Stateless,
}

/// Why a statement is not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It would change stored data, the catalog or the engine every client shares.
    ReadOnly { kind: String },
    /// A session command (`SET`, `BEGIN`, cursors) sent where there is no session.
    NoSession { kind: String },
}

impl Refusal {
    /// The statement kind named in the message, such as `CREATE TABLE AS`.
    pub fn kind(&self) -> &str {
        match self {
            Refusal::ReadOnly { kind } | Refusal::NoSession { kind } => kind,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::ReadOnly { kind } => write!(
                f,
                "Runnel's SQL is read-only: {kind} is refused (only SELECT, EXPLAIN, SHOW, SET, \
                 transactions and cursors are allowed)"
            ),
            Refusal::NoSession { kind } => write!(
                f,
                "{kind} needs a session, which the HTTP API does not keep: send it over the \
                 PostgreSQL protocol (over HTTP only SELECT, EXPLAIN and SHOW run)"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// Whether `statement` may run at `door`.
pub fn check(statement: &Statement, door: Door) -> Result<(), Refusal> {
    match statement {
        Statement::Query(_)
        | Statement::ExplainTable { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowViews { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowStatus { .. } => Ok(()),
        // `EXPLAIN ANALYZE` runs its statement: what it explains must be a read.
        Statement::Explain { statement, .. } => check(statement, door),
        // Engine settings (`datafusion.*`, the memory limit among them) are shared by every
        // client of the one context; PostgreSQL's session settings are kept per connection.
        Statement::Set(set) if sets_engine_setting(set) => Err(Refusal::ReadOnly {
            kind: format!("SET {}", engine_setting_names(set).join(", ")),
        }),
        Statement::Declare { stmts } if stmts.iter().any(|d| d.for_query.is_none()) => {
            Err(Refusal::ReadOnly {
                kind: kind_of(statement),
            })
        }
        Statement::Set(_)
        | Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::Close { .. }
        | Statement::Discard { .. }
        | Statement::Deallocate { .. } => match door {
            Door::Session => Ok(()),
            Door::Stateless => Err(Refusal::NoSession {
                kind: kind_of(statement),
            }),
        },
        _ => Err(Refusal::ReadOnly {
            kind: kind_of(statement),
        }),
    }
}

/// [`check`] over SQL text, for doors that hand text to DataFusion: parsed as DataFusion will
/// parse it (the session's dialect, DataFusion's own statements such as `CREATE EXTERNAL
/// TABLE`), and where that fails as PostgreSQL would (`COPY ... TO STDOUT`), so a write is named
/// even when DataFusion cannot parse it. Text that neither parses is let through: planning
/// reports the syntax error, and nothing unparsed runs.
pub fn check_sql(state: &SessionState, sql: &str, door: Door) -> Result<(), Refusal> {
    let dialect = state.config().options().sql_parser.dialect;
    if let Ok(statement) = state.sql_to_statement(sql, &dialect) {
        return check_datafusion(&statement, door);
    }
    match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(statements) => statements
            .iter()
            .try_for_each(|statement| check(statement, door)),
        Err(_) => Ok(()),
    }
}

fn check_datafusion(statement: &DfStatement, door: Door) -> Result<(), Refusal> {
    match statement {
        DfStatement::Statement(statement) => check(statement, door),
        DfStatement::Explain(explain) => check_datafusion(&explain.statement, door),
        DfStatement::CreateExternalTable(_) => Err(Refusal::ReadOnly {
            kind: "CREATE EXTERNAL TABLE".to_owned(),
        }),
        DfStatement::CopyTo(_) => Err(Refusal::ReadOnly {
            kind: "COPY".to_owned(),
        }),
        DfStatement::Reset(_) => Err(Refusal::ReadOnly {
            kind: "RESET".to_owned(),
        }),
    }
}

fn sets_engine_setting(set: &Set) -> bool {
    !engine_setting_names(set).is_empty()
}

/// The `datafusion.*` names a `SET` assigns.
fn engine_setting_names(set: &Set) -> Vec<String> {
    let names: Vec<String> = match set {
        Set::SingleAssignment { variable, .. } => vec![variable.to_string()],
        Set::ParenthesizedAssignments { variables, .. } => {
            variables.iter().map(ToString::to_string).collect()
        }
        Set::MultipleAssignments { assignments } => assignments
            .iter()
            .map(|assignment| assignment.name.to_string())
            .collect(),
        _ => Vec::new(),
    };
    names
        .into_iter()
        .filter(|name| {
            name.trim_matches('"')
                .to_ascii_lowercase()
                .starts_with("datafusion.")
        })
        .collect()
}

/// The statement kind as PostgreSQL names it in its messages: `INSERT`, `CREATE TABLE AS`,
/// `DROP VIEW`. Kinds without a special case come from the parser's variant name
/// (`CreateSequence` -> `CREATE SEQUENCE`), never from the statement's text, which would mix in
/// the names of the user's tables.
pub fn kind_of(statement: &Statement) -> String {
    match statement {
        Statement::CreateTable(create) if create.query.is_some() => "CREATE TABLE AS".to_owned(),
        Statement::CreateView(create) if create.materialized => {
            "CREATE MATERIALIZED VIEW".to_owned()
        }
        Statement::Drop { object_type, .. } => format!("DROP {object_type}"),
        Statement::Copy { .. } => "COPY".to_owned(),
        Statement::Insert(_) => "INSERT".to_owned(),
        Statement::Explain { statement, .. } => kind_of(statement),
        Statement::Declare { .. } => "DECLARE".to_owned(),
        Statement::Set(_) => "SET".to_owned(),
        Statement::StartTransaction { .. } => "BEGIN".to_owned(),
        _ => words_of_variant(&format!("{statement:?}")),
    }
}

/// `CreateVirtualTable { .. }` -> `CREATE VIRTUAL TABLE`: the leading identifier of a Debug
/// rendering, split at its lower-to-upper case changes.
fn words_of_variant(debug: &str) -> String {
    let variant: String = debug
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let mut words = String::with_capacity(variant.len() + 4);
    let mut previous_lower = false;
    for c in variant.chars() {
        if c.is_ascii_uppercase() && previous_lower {
            words.push(' ');
        }
        previous_lower = c.is_ascii_lowercase();
        words.push(c.to_ascii_uppercase());
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> Statement {
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).expect(sql);
        assert_eq!(statements.len(), 1, "{sql}");
        statements.remove(0)
    }

    fn refused_kind(sql: &str, door: Door) -> Option<String> {
        check(&parse(sql), door)
            .err()
            .map(|refusal| refusal.kind().to_owned())
    }

    #[test]
    fn writes_are_refused_with_their_statement_kind() {
        for (sql, kind) in [
            ("CREATE TABLE t AS SELECT 1", "CREATE TABLE AS"),
            ("CREATE TABLE t (a INT)", "CREATE TABLE"),
            ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
            (
                "CREATE MATERIALIZED VIEW v AS SELECT 1",
                "CREATE MATERIALIZED VIEW",
            ),
            ("INSERT INTO events (name) VALUES ('x')", "INSERT"),
            ("UPDATE events SET name = 'x'", "UPDATE"),
            ("DELETE FROM events", "DELETE"),
            ("DROP TABLE events", "DROP TABLE"),
            ("DROP VIEW dead_letters", "DROP VIEW"),
            ("COPY events TO STDOUT", "COPY"),
            ("COPY (SELECT 1) TO STDOUT", "COPY"),
            ("COPY events FROM STDIN", "COPY"),
            ("TRUNCATE events", "TRUNCATE"),
            ("ALTER TABLE events ADD COLUMN x INT", "ALTER TABLE"),
            ("CREATE SEQUENCE s", "CREATE SEQUENCE"),
            (
                "EXPLAIN ANALYZE INSERT INTO events SELECT * FROM events",
                "INSERT",
            ),
            (
                "SET datafusion.runtime.memory_limit = '100G'",
                "SET datafusion.runtime.memory_limit",
            ),
            ("DECLARE c CURSOR FOR SELECT 1", "NONE"),
        ] {
            let got = refused_kind(sql, Door::Session);
            if kind == "NONE" {
                assert_eq!(got, None, "{sql} is a cursor over a query");
                continue;
            }
            assert_eq!(got.as_deref(), Some(kind), "{sql}");
            let message = check(&parse(sql), Door::Stateless)
                .expect_err(sql)
                .to_string();
            assert!(
                message.starts_with(&format!("Runnel's SQL is read-only: {kind} is refused")),
                "{sql}: {message}"
            );
        }
    }

    #[test]
    fn reads_run_at_every_door_and_session_commands_only_with_a_session() {
        for sql in [
            "SELECT 1",
            "WITH t AS (SELECT 1) SELECT * FROM t",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
            "SHOW datafusion.execution.batch_size",
        ] {
            assert_eq!(refused_kind(sql, Door::Stateless), None, "{sql}");
            assert_eq!(refused_kind(sql, Door::Session), None, "{sql}");
        }
        for (sql, kind) in [
            ("SET extra_float_digits = 3", "SET"),
            ("BEGIN", "BEGIN"),
            ("COMMIT", "COMMIT"),
            ("FETCH 10 FROM c", "FETCH"),
        ] {
            assert_eq!(refused_kind(sql, Door::Session), None, "{sql}");
            let refusal = check(&parse(sql), Door::Stateless).expect_err(sql);
            assert!(matches!(refusal, Refusal::NoSession { .. }), "{sql}");
            assert_eq!(refusal.kind(), kind, "{sql}");
        }
    }

    #[test]
    fn sql_text_is_checked_as_datafusion_parses_it_or_else_as_postgresql_does() {
        let state = datafusion::prelude::SessionContext::new().state();
        for (sql, kind) in [
            ("COPY events TO STDOUT", "COPY"),
            ("COPY (SELECT 1) TO STDOUT", "COPY"),
            ("COPY events TO '/tmp/x.csv'", "COPY"),
            (
                "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/tmp/x.csv'",
                "CREATE EXTERNAL TABLE",
            ),
            ("SELECT 1; DROP TABLE events", "DROP TABLE"),
            ("RESET datafusion.execution.batch_size", "RESET"),
        ] {
            let refusal = check_sql(&state, sql, Door::Stateless).expect_err(sql);
            assert_eq!(refusal.kind(), kind, "{sql}");
        }
        assert_eq!(check_sql(&state, "SELECT 1", Door::Stateless), Ok(()));
        assert_eq!(
            check_sql(&state, "SELEC nonsense", Door::Stateless),
            Ok(()),
            "planning reports the syntax error"
        );
    }

    #[test]
    fn variant_names_become_words() {
        assert_eq!(
            words_of_variant("CreateVirtualTable { x }"),
            "CREATE VIRTUAL TABLE"
        );
        assert_eq!(words_of_variant("Update(Update { .. })"), "UPDATE");
        assert_eq!(words_of_variant("LISTEN { .. }"), "LISTEN");
    }
}
