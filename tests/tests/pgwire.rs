//! The PostgreSQL wire protocol: psql (when installed; `.ci/run` installs it) and tokio-postgres
//! (the extended protocol with parameters, SCRAM) against a real aggregator fed by a real agent.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, Fleet, binaries, http_client, poll_until,
    post_events, start_fleet_with,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);

fn start(test: &str, query_extra: &str) -> Fleet {
    start_fleet_with(
        &binaries!(),
        test,
        "edge-pg",
        AggregatorOptions {
            query_extra: query_extra.to_owned(),
            ..AggregatorOptions::default()
        },
        AgentOptions::default(),
        &AgentExtra::default(),
    )
}

/// 15 page views and 5 purchases with scores 0.0, 0.1, ... 1.9.
fn sample() -> Vec<Value> {
    (0..20)
        .map(|idx| {
            json!({
                "event_id": format!("pg-{idx:02}"),
                "name": if idx % 4 == 3 { "purchase" } else { "page_view" },
                "user_id": format!("user-{}", idx % 7),
                "score": f64::from(idx) / 10.0,
                "url": format!("/p/{idx}"),
            })
        })
        .collect()
}

async fn connect(
    addr: SocketAddr,
    user: &str,
    password: Option<&str>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(user)
        .dbname("runnel")
        .connect_timeout(Duration::from_secs(10));
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn count(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let row = client.query_one("SELECT count(*) FROM events", &[]).await?;
    Ok(row.get(0))
}

/// Statements every door refuses, with the statement kind the message names.
const REFUSED: [(&str, &str); 12] = [
    ("CREATE TABLE t AS SELECT 1", "CREATE TABLE AS"),
    ("CREATE TABLE t (a INT)", "CREATE TABLE"),
    ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
    ("INSERT INTO events (name) VALUES ('x')", "INSERT"),
    ("UPDATE events SET name = 'x'", "UPDATE"),
    ("DELETE FROM events", "DELETE"),
    ("DROP VIEW dead_letters", "DROP VIEW"),
    ("DROP TABLE events", "DROP TABLE"),
    ("COPY events TO STDOUT", "COPY"),
    ("COPY (SELECT 1) TO STDOUT", "COPY"),
    ("COPY events TO '/tmp/runnel-copy-test.csv'", "COPY"),
    // The engine's settings are shared by every client (the memory limit among them).
    (
        "SET datafusion.runtime.memory_limit = '100G'",
        "SET datafusion.runtime.memory_limit",
    ),
];

/// The columns of `events` as PostgreSQL clients must see them: name, `format_type` (what
/// psql's `\d` shows), `information_schema.columns.data_type`, `udt_name` (pg_type.typname).
const EVENTS_COLUMNS: [(&str, &str, &str, &str); 14] = [
    ("agent_id", "text", "text", "text"),
    ("seq", "numeric", "numeric", "numeric"),
    (
        "event_time",
        "timestamp with time zone",
        "timestamp with time zone",
        "timestamptz",
    ),
    (
        "receive_time",
        "timestamp with time zone",
        "timestamp with time zone",
        "timestamptz",
    ),
    (
        "ingest_time",
        "timestamp with time zone",
        "timestamp with time zone",
        "timestamptz",
    ),
    ("source", "text", "text", "text"),
    ("stream", "text", "text", "text"),
    ("name", "text", "text", "text"),
    ("event_id", "text", "text", "text"),
    ("user_id", "text", "text", "text"),
    ("session_id", "text", "text", "text"),
    ("score", "double precision", "double precision", "float8"),
    ("tags", "text[]", "ARRAY", "_text"),
    ("attrs", "text", "text", "text"),
];

/// `information_schema.columns` and `pg_catalog` describe `events` alike, in PostgreSQL's names.
async fn check_catalogs_agree(client: &tokio_postgres::Client) {
    let information_schema: Vec<(String, String, String)> = client
        .query(
            "SELECT column_name, data_type, udt_name FROM information_schema.columns \
             WHERE table_name = 'events' ORDER BY ordinal_position",
            &[],
        )
        .await
        .expect("information_schema.columns")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let pg_catalog: Vec<(String, String, String)> = client
        .query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON a.attrelid = c.oid \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             WHERE c.relname = 'events' ORDER BY a.attnum",
            &[],
        )
        .await
        .expect("pg_catalog.pg_attribute")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let expected_information_schema: Vec<(String, String, String)> = EVENTS_COLUMNS
        .iter()
        .map(|(name, _, data_type, udt)| (name.to_string(), data_type.to_string(), udt.to_string()))
        .collect();
    let expected_pg_catalog: Vec<(String, String, String)> = EVENTS_COLUMNS
        .iter()
        .map(|(name, format_type, _, udt)| {
            (name.to_string(), format_type.to_string(), udt.to_string())
        })
        .collect();
    assert_eq!(information_schema, expected_information_schema);
    assert_eq!(pg_catalog, expected_pg_catalog);
}

/// The SQLSTATE and message of a failed statement.
fn sql_error(error: &tokio_postgres::Error) -> (String, String) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("expected a server error, got {error:?}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

fn psql() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("psql"))
        .find(|candidate| candidate.is_file())
}

/// Runs psql with `input` on stdin: `(success, stdout, stderr)`.
fn run_psql(psql: &std::path::Path, addr: SocketAddr, input: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(psql)
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-U",
            "runnel",
            "-d",
            "runnel",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run psql");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to psql");
    let output = child.wait_with_output().expect("wait for psql");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_the_extended_protocol_query_events_read_only_within_limits() {
    let fleet = start("pgwire-queries", "max_result_rows = 12\n");
    let pg = fleet.aggregator.pgwire_addr();
    let http = fleet.agent.http_addr();
    let outcome = post_events(&http_client(), http, &sample()).await.unwrap();
    assert_eq!(outcome.status, 200, "{outcome:?}");

    let client = connect(pg, "runnel", None)
        .await
        .expect("connect without users configured");
    poll_until(TIMEOUT, || async {
        let n = count(&client).await?;
        anyhow::ensure!(n == 20, "{n} of 20 events");
        Ok(())
    })
    .await
    .unwrap_or_else(|error| {
        panic!(
            "20 events never queryable over pgwire: {error:#}\n{}",
            fleet.dir.report()
        )
    });

    // Extended protocol: Parse with $1, Bind a text parameter, Execute.
    let rows = client
        .query(
            "SELECT count(*) AS n FROM events WHERE name = $1",
            &[&"purchase"],
        )
        .await
        .expect("parameterised count");
    assert_eq!(rows[0].get::<_, i64>("n"), 5);
    // A prepared statement used twice with a float parameter, results typed.
    let statement = client
        .prepare("SELECT event_id, score FROM events WHERE score >= $1 ORDER BY event_id")
        .await
        .expect("prepare");
    let high = client
        .query(&statement, &[&1.5f64])
        .await
        .expect("execute 1");
    let ids: Vec<String> = high.iter().map(|row| row.get(0)).collect();
    assert_eq!(ids, ["pg-15", "pg-16", "pg-17", "pg-18", "pg-19"]);
    assert_eq!(high[0].get::<_, f64>(1), 1.5);
    let all_but_one = client.query(&statement, &[&0.05f64]).await;
    let (code, message) =
        sql_error(&all_but_one.expect_err("19 rows are over max_result_rows = 12"));
    assert_eq!(code, "54000", "{message}");
    assert!(message.contains("query.max_result_rows"), "{message}");
    // A limit under the cap works, and the connection is still good after the error.
    let limited = client
        .query(
            "SELECT event_id FROM events ORDER BY event_id LIMIT 12",
            &[],
        )
        .await
        .expect("12 rows are allowed");
    assert_eq!(limited.len(), 12);

    // Read-only, in both protocols, with a clear error that names what was sent.
    for (sql, kind) in REFUSED {
        let expected = format!("Runnel's SQL is read-only: {kind} is refused");
        let simple = client.simple_query(sql).await;
        let (code, message) = sql_error(&simple.expect_err(sql));
        assert!(
            code == "25006" && message.starts_with(&expected),
            "{sql}: {code} {message}"
        );
        let extended = client.query(sql, &[]).await;
        let (code, message) = sql_error(&extended.expect_err(sql));
        assert!(
            code == "25006" && message.starts_with(&expected),
            "{sql} (extended): {code} {message}"
        );
    }
    // Reads other than SELECT still run.
    for sql in [
        "EXPLAIN SELECT count(*) FROM events",
        // (SHOW TABLES has more rows than this test's max_result_rows.)
        "SHOW datafusion.execution.batch_size",
        "SHOW search_path",
        "SELECT count(*) FROM information_schema.tables",
    ] {
        client
            .simple_query(sql)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error:?}"));
    }
    assert_eq!(count(&client).await.unwrap(), 20, "nothing changed");

    // Session commands clients send at connect time.
    client
        .batch_execute("SET extra_float_digits = 3; SET application_name = 'test'")
        .await
        .expect("SET is accepted");
    let version = client
        .query_one("SELECT version()", &[])
        .await
        .expect("version()");
    let version: String = version.get(0);
    assert!(!version.is_empty(), "version() answers");

    match psql() {
        Some(psql) => {
            let (ok, stdout, stderr) = run_psql(
                &psql,
                pg,
                "SELECT count(*) FROM events WHERE name = 'page_view';\n",
            );
            assert!(ok, "psql failed: {stderr}");
            assert_eq!(stdout.trim(), "15", "{stderr}");
            // \gdesc describes a query through the extended protocol (Parse + Describe).
            let (ok, stdout, stderr) = run_psql(
                &psql,
                pg,
                "SELECT name, score FROM events LIMIT 1 \\gdesc\n",
            );
            assert!(ok, "psql \\gdesc failed: {stderr}");
            assert!(stdout.contains("name|text"), "{stdout}");
            let (ok, _, stderr) = run_psql(&psql, pg, "DELETE FROM events;\n");
            assert!(!ok, "DELETE must fail");
            assert!(
                stderr.contains("Runnel's SQL is read-only: DELETE is refused"),
                "{stderr}"
            );
            let (ok, _, stderr) = run_psql(&psql, pg, "COPY events TO STDOUT;\n");
            assert!(!ok, "COPY must fail");
            assert!(
                stderr.contains("Runnel's SQL is read-only: COPY is refused"),
                "{stderr}"
            );
        }
        None => println!(
            "psql not found on PATH: its part was not run (.ci/run installs postgresql-client)"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_must_log_in_with_their_password() {
    let fleet = start(
        "pgwire-users",
        "[[query.users]]\nname = \"grafana\"\npassword = \"correct horse battery\"\n",
    );
    let pg = fleet.aggregator.pgwire_addr();

    let wrong = connect(pg, "grafana", Some("wrong password")).await;
    let error = wrong.expect_err("a wrong password is refused");
    let text = format!("{error:#}");
    assert!(
        error
            .as_db_error()
            .is_some_and(|db| db.code().code() == "28P01"),
        "{text}"
    );
    assert!(
        connect(pg, "nobody", Some("correct horse battery"))
            .await
            .is_err(),
        "an unknown user is refused"
    );
    assert!(
        connect(pg, "grafana", None).await.is_err(),
        "no password is refused"
    );
    let client = connect(pg, "grafana", Some("correct horse battery"))
        .await
        .expect("the right password logs in (SCRAM-SHA-256)");
    let one = client
        .query_one("SELECT 1 + $1::BIGINT", &[&41i64])
        .await
        .unwrap();
    assert_eq!(one.get::<_, i64>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn information_schema_and_pg_catalog_name_the_same_postgresql_types() {
    let fleet = start("pgwire-catalogs", "");
    let pg = fleet.aggregator.pgwire_addr();
    let client = connect(pg, "runnel", None)
        .await
        .expect("connect without users configured");
    check_catalogs_agree(&client).await;
    match psql() {
        Some(psql) => {
            // psql's \d reads pg_catalog: the same names information_schema gives.
            let (ok, stdout, stderr) = run_psql(&psql, pg, "\\d events\n");
            assert!(ok, "psql \\d events failed: {stderr}");
            let described: Vec<(&str, &str)> = stdout
                .lines()
                .filter_map(|line| {
                    let mut cells = line.split('|');
                    Some((cells.next()?, cells.next()?))
                })
                .collect();
            let expected: Vec<(&str, &str)> = EVENTS_COLUMNS
                .iter()
                .map(|(name, format_type, _, _)| (*name, *format_type))
                .collect();
            assert_eq!(described, expected, "{stdout}");
        }
        None => println!(
            "psql not found on PATH: its part was not run (.ci/run installs postgresql-client)"
        ),
    }
}
