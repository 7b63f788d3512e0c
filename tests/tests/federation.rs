//! Federation: one SQL query joins `events` with a PostgreSQL table, a SQLite file, a directory
//! of CSV files, a newline-delimited JSON file and a directory of Parquet files, all read-only, against a real
//! aggregator fed by a real agent.
//!
//! PostgreSQL comes from `RUNNEL_TEST_POSTGRES_URL` (`.ci/run` finds or starts one); the test
//! creates its own uniquely named table and drops it at the end. Without the variable the
//! PostgreSQL part is skipped, saying so, and everything else still runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::FutureExt;
use runnel_tests::{
    ARRIVAL_TIMEOUT, AgentExtra, AgentOptions, AggregatorOptions, Fleet, binaries, http_client,
    post_events, query, query_rows, start_fleet_with, wait_count_of,
};
use serde_json::{Value, json};

/// The environment variable naming the PostgreSQL server the test may use.
const POSTGRES_URL_ENV: &str = "RUNNEL_TEST_POSTGRES_URL";

/// A port nothing listens on (TCP port 1 is never served on test machines).
const DEAD_POSTGRES_URL: &str = "postgresql://postgres@127.0.0.1:1/postgres";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_join_postgres_sqlite_csv_json_and_parquet_read_only() {
    let sources = tempfile::tempdir().expect("create the sources directory");
    let archive = write_parquet_archive(sources.path()).await;
    let sqlite_path = write_sqlite(sources.path());
    let regions_dir = write_csv_dir(sources.path());
    let segments_path = sources.path().join("segments.json");
    std::fs::write(
        &segments_path,
        "{\"user_id\": \"u1\", \"segment\": \"vip\"}\n{\"user_id\": \"u3\", \"segment\": \"new\"}\n",
    )
    .expect("write segments.json");

    let postgres = match std::env::var(POSTGRES_URL_ENV) {
        Ok(url) if !url.is_empty() => Some(PostgresFixture::create(&url).await),
        _ => {
            eprintln!(
                "federation: the PostgreSQL part is SKIPPED: {POSTGRES_URL_ENV} is not set \
                 (`.ci/run` sets it; or export it, e.g. \
                 postgresql://postgres@127.0.0.1:5432/postgres)"
            );
            None
        }
    };
    let table = postgres.as_ref().map(|pg| pg.table.clone());
    let outcome = std::panic::AssertUnwindSafe(run_checks(
        sources.path(),
        &archive,
        &sqlite_path,
        &regions_dir,
        &segments_path,
        postgres.as_ref(),
    ))
    .catch_unwind()
    .await;
    if let Some(postgres) = postgres {
        postgres.drop_table().await;
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    if let Some(table) = table {
        eprintln!("federation: PostgreSQL part ran (table {table}, dropped)");
    }
}

#[allow(clippy::too_many_lines)]
async fn run_checks(
    sources: &Path,
    archive: &Path,
    sqlite_path: &Path,
    regions_dir: &Path,
    segments_path: &Path,
    postgres: Option<&PostgresFixture>,
) {
    let mut extra_toml = format!(
        "[[federation]]\nname = \"inventory\"\nkind = \"sqlite\"\npath = {sqlite}\n\
         [[federation]]\nname = \"regions\"\nkind = \"csv\"\npath = {regions}\n\
         [[federation]]\nname = \"segments\"\nkind = \"json\"\npath = {segments}\n\
         [[federation]]\nname = \"archive\"\nkind = \"parquet\"\npath = {archive}\n\
         [[federation]]\nname = \"down\"\nkind = \"postgres\"\nurl = \"{DEAD_POSTGRES_URL}\"\n\
         [[federation]]\nname = \"gone\"\nkind = \"csv\"\npath = {gone}\n",
        sqlite = toml_path(sqlite_path),
        regions = toml_path(regions_dir),
        segments = toml_path(segments_path),
        archive = toml_path(archive),
        gone = toml_path(&sources.join("no-such-dir")),
    );
    if let Some(pg) = postgres {
        extra_toml.push_str(&format!(
            "[[federation]]\nname = \"crm\"\nkind = \"postgres\"\nurl = \"{}\"\ntables = [\"{}\"]\n",
            pg.url, pg.table
        ));
    }
    let fleet = start_fleet_with(
        &binaries!(),
        "federation-join",
        "edge-fed",
        AggregatorOptions {
            extra_toml,
            ..AggregatorOptions::default()
        },
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let addr = fleet.aggregator.query_addr();
    let events = [
        json!({"event_id": "e1", "name": "purchase", "user_id": "u1", "sku": "sku-1"}),
        json!({"event_id": "e2", "name": "purchase", "user_id": "u2", "sku": "sku-2"}),
        json!({"event_id": "e3", "name": "page_view", "user_id": "u1", "sku": "sku-3"}),
        json!({"event_id": "e4", "name": "purchase", "user_id": "u3", "sku": "sku-1"}),
    ];
    let outcome = post_events(&http_client(), fleet.agent.http_addr(), &events)
        .await
        .expect("post events");
    assert_eq!(outcome.status, 200, "{outcome:?}");
    wait_count_of(&fleet.dir, addr, "SELECT count(*) FROM events", 4).await;

    // SQLite: declared types give the columns; 'many' in an INTEGER column does not fit: NULL.
    assert_rows(
        &fleet,
        "SELECT e.event_id, p.title, p.price, p.stock FROM events e \
         JOIN inventory.products p ON p.sku = json_get_str(e.attrs, 'sku') ORDER BY e.event_id",
        json!([
            ["e1", "Kettle", 19.5, 3],
            ["e2", "Mug", 4.25, null],
            ["e4", "Kettle", 19.5, 3],
        ]),
    )
    .await;
    // Pushed down to SQLite: the projection and the comparison (EXPLAIN shows the statement).
    let scan = remote_scan(
        &fleet,
        "inventory",
        "SELECT title FROM inventory.products WHERE price < 10 AND sku IS NOT NULL",
        &[
            "\"title\"",
            "\"price\"",
            "\"sku\"",
            " FROM \"products\" WHERE ",
            "\"price\" < ?1",
            "\"sku\" IS NOT NULL",
            "params=[10]",
        ],
    )
    .await;
    assert!(!scan.contains("stock"), "only the needed columns: {scan}");
    assert_rows(
        &fleet,
        "SELECT title FROM inventory.products WHERE price < 10 AND sku IS NOT NULL",
        json!([["Mug"]]),
    )
    .await;

    // A CSV directory (two files; the .txt beside them is not read) and an NDJSON file.
    assert_rows(
        &fleet,
        "SELECT e.event_id, r.region, s.segment FROM events e \
         JOIN regions r ON r.user_id = e.user_id \
         LEFT JOIN segments s ON s.user_id = e.user_id ORDER BY e.event_id",
        json!([
            ["e1", "north", "vip"],
            ["e2", "south", null],
            ["e3", "north", "vip"],
            ["e4", "east", "new"],
        ]),
    )
    .await;

    // Parquet files: another aggregator's events, written through its real write path.
    assert_rows(
        &fleet,
        "SELECT e.event_id, a.event_id, a.name FROM events e \
         JOIN archive a ON a.user_id = e.user_id ORDER BY e.event_id",
        json!([
            ["e1", "a1", "signup"],
            ["e2", "a2", "signup"],
            ["e3", "a1", "signup"],
        ]),
    )
    .await;

    // Sources that could not be read at startup: the aggregator serves, and says which entry.
    for (sql, entry) in [
        ("SELECT * FROM down.customers", "federation entry `down`"),
        ("SELECT * FROM gone", "federation entry `gone`"),
    ] {
        let error = query(addr, sql).await.expect_err(sql).to_string();
        assert!(error.contains(entry), "{sql}: {error}");
    }

    // Read-only: writes to a federated table are refused, and the source is unchanged.
    let error = query(
        addr,
        "INSERT INTO inventory.products VALUES ('sku-9', 'Pan', 1.0, 1)",
    )
    .await
    .expect_err("INSERT into SQLite through the API")
    .to_string();
    assert!(error.contains("HTTP 400"), "{error}");
    let n_products: i64 = rusqlite::Connection::open(sqlite_path)
        .expect("open the SQLite file")
        .query_row("SELECT count(*) FROM products", [], |row| row.get(0))
        .expect("count products");
    assert_eq!(n_products, 4, "the SQLite file is unchanged");

    if let Some(pg) = postgres {
        check_postgres(&fleet, pg).await;
    }
}

async fn check_postgres(fleet: &Fleet, pg: &PostgresFixture) {
    let addr = fleet.aggregator.query_addr();
    let table = &pg.table;
    // Every mapped type, as information_schema shows it (PostgreSQL's names, as pg_catalog).
    assert_rows(
        fleet,
        &format!(
            "SELECT column_name, data_type FROM information_schema.columns \
             WHERE table_schema = 'crm' AND table_name = '{table}' ORDER BY ordinal_position"
        ),
        json!([
            ["id", "integer"],
            ["user_id", "text"],
            ["plan", "text"],
            ["mrr", "numeric"],
            ["active", "boolean"],
            ["signed_up", "timestamp with time zone"],
            ["local_time", "timestamp without time zone"],
            ["born", "date"],
            ["seats", "bigint"],
            ["small", "smallint"],
            ["ratio", "double precision"],
            ["ratio4", "real"],
            ["code", "text"],
            ["ref", "text"],
            ["profile", "text"],
            ["doc", "text"],
            ["tags", "text"],
            ["note", "double precision"],
            ["raw", "bytea"],
        ]),
    )
    .await;
    assert_rows(
        fleet,
        &format!(
            "SELECT id, user_id, plan, mrr, active, signed_up, local_time, born, seats, small, \
             ratio, ratio4, code, ref, profile, doc, tags, note, raw FROM crm.{table} WHERE id = 1"
        ),
        json!([[
            1,
            "u1",
            "pro",
            "49.90",
            true,
            "2024-01-02T03:04:05.123456Z",
            "2024-01-02T03:04:05",
            "1990-05-06",
            5,
            -2,
            0.25,
            0.5,
            "ab ",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{\"tier\": 2}",
            "{\"a\": [1, 2]}",
            "{a,b}",
            1.5,
            "cafe"
        ]]),
    )
    .await;
    assert_rows(
        fleet,
        &format!(
            "SELECT id, plan, mrr, active, signed_up, born, code, ref, note, raw \
             FROM crm.{table} WHERE id = 2"
        ),
        json!([[2, "free", "0.00", false, null, null, null, null, null, null]]),
    )
    .await;

    // The join: events with the CRM, the SQLite inventory and the CSV regions in one query.
    assert_rows(
        fleet,
        &format!(
            "SELECT e.event_id, c.plan, c.mrr, p.title, r.region FROM events e \
             JOIN crm.{table} c ON c.user_id = e.user_id \
             LEFT JOIN inventory.products p ON p.sku = json_get_str(e.attrs, 'sku') \
             JOIN regions r ON r.user_id = e.user_id \
             WHERE e.name = 'purchase' ORDER BY e.event_id"
        ),
        json!([
            ["e1", "pro", "49.90", "Kettle", "north"],
            ["e2", "free", "0.00", "Mug", "south"],
        ]),
    )
    .await;

    // Pushed down: the projection, the filters (as parameters), and a LIMIT without filters.
    let sql =
        format!("SELECT plan FROM crm.{table} WHERE id >= 2 AND plan > 'f' AND signed_up IS NULL");
    let scan = remote_scan(
        fleet,
        "crm",
        &sql,
        &[
            "\"plan\"",
            "\"id\"",
            "\"signed_up\"",
            &format!(" FROM \"public\".\"{table}\" WHERE "),
            "\"id\" >= CAST($",
            " AS int8)",
            "(\"plan\") COLLATE \"C\" > CAST($",
            " AS text)",
            "\"signed_up\" IS NULL",
        ],
    )
    .await;
    assert!(!scan.contains("mrr"), "only the needed columns: {scan}");
    assert_rows(fleet, &format!("{sql} ORDER BY plan"), json!([["free"]])).await;
    // OR, IN and LIKE reach PostgreSQL too, with the same answers as DataFusion's (which
    // turns lists of up to three items into `=` and `<>` itself).
    let sql = format!(
        "SELECT id FROM crm.{table} WHERE (plan LIKE 'p%' OR plan IN ('team', 'x', 'y', 'z')) \
         AND user_id NOT LIKE 'u\\_%' AND plan NOT IN ('free', 'a', 'b', 'c')"
    );
    remote_scan(
        fleet,
        "crm",
        &sql,
        &[
            "COLLATE \"C\" LIKE CAST($",
            " OR ",
            "COLLATE \"C\" IN (CAST($",
            "COLLATE \"C\" NOT LIKE CAST($",
            "COLLATE \"C\" NOT IN (CAST($",
        ],
    )
    .await;
    assert_rows(fleet, &format!("{sql} ORDER BY id"), json!([[1], [3]])).await;
    assert_rows(
        fleet,
        &format!("SELECT id FROM crm.{table} WHERE plan LIKE 'fr_e' OR id IN (3) ORDER BY id"),
        json!([[2], [3]]),
    )
    .await;
    let plan = explain(fleet, &format!("SELECT user_id FROM crm.{table} LIMIT 1")).await;
    assert!(
        plan.contains(&format!(
            "sql=SELECT \"user_id\" FROM \"public\".\"{table}\" LIMIT 1, params=[]"
        )),
        "{plan}"
    );
    assert_rows(
        fleet,
        &format!("SELECT count(*) FROM crm.{table}"),
        json!([[3]]),
    )
    .await;

    // Read-only: INSERT through the HTTP API is refused; the remote table is unchanged.
    let error = query(
        addr,
        &format!("INSERT INTO crm.{table} (id, user_id) VALUES (9, 'u9')"),
    )
    .await
    .expect_err("INSERT into PostgreSQL through the API")
    .to_string();
    assert!(error.contains("HTTP 400"), "{error}");
    let client = pg.connect().await;
    let n_rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
        .await
        .expect("count the remote rows")
        .get(0);
    assert_eq!(n_rows, 3, "the PostgreSQL table is unchanged");

    // The PostgreSQL protocol reads the same sources (a parameter through the extended
    // protocol) and refuses the same writes.
    let pgwire = fleet.aggregator.pgwire_addr();
    let (wire, connection) = tokio_postgres::Config::new()
        .host(pgwire.ip().to_string())
        .port(pgwire.port())
        .user("runnel")
        .dbname("runnel")
        .connect_timeout(Duration::from_secs(10))
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the aggregator's PostgreSQL protocol");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let rows = wire
        .query(
            &format!(
                "SELECT e.event_id, c.plan FROM events e JOIN crm.{table} c \
                 ON c.user_id = e.user_id WHERE c.id = $1 ORDER BY e.event_id"
            ),
            &[&1i32],
        )
        .await
        .expect("join over the PostgreSQL protocol");
    let rows: Vec<(String, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(
        rows,
        [
            ("e1".to_owned(), "pro".to_owned()),
            ("e3".to_owned(), "pro".to_owned())
        ]
    );
    let error = wire
        .simple_query(&format!(
            "INSERT INTO crm.{table} (id, user_id) VALUES (9, 'u9')"
        ))
        .await
        .expect_err("INSERT into PostgreSQL through pgwire");
    let code = error.as_db_error().map(|db| db.code().code().to_owned());
    assert_eq!(code.as_deref(), Some("25006"), "{error:?}");
    let n_rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
        .await
        .expect("count the remote rows")
        .get(0);
    assert_eq!(n_rows, 3, "the PostgreSQL table is unchanged");
}

/// Runs `sql` and compares its rows with `expected` exactly.
async fn assert_rows(fleet: &Fleet, sql: &str, expected: Value) {
    let rows = query_rows(fleet.aggregator.query_addr(), sql)
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error:#}\n{}", fleet.dir.report()));
    assert_eq!(Value::from(rows), expected, "{sql}");
}

/// The physical plan of `sql`, as one string.
/// The `RemoteScanExec` line of `sql`'s plan for `federation`, checked to contain each of
/// `parts`.
async fn remote_scan(fleet: &Fleet, federation: &str, sql: &str, parts: &[&str]) -> String {
    let plan = explain(fleet, sql).await;
    let prefix = format!("RemoteScanExec: federation={federation}, sql=SELECT ");
    let scan = plan
        .lines()
        .find(|line| line.contains(&prefix))
        .unwrap_or_else(|| panic!("no scan of {federation} in {plan}"))
        .to_owned();
    for part in parts {
        assert!(scan.contains(part), "{part:?} not in {scan}");
    }
    scan
}

async fn explain(fleet: &Fleet, sql: &str) -> String {
    let rows = query_rows(fleet.aggregator.query_addr(), &format!("EXPLAIN {sql}"))
        .await
        .unwrap_or_else(|error| panic!("EXPLAIN {sql}: {error:#}\n{}", fleet.dir.report()));
    rows.iter()
        .map(|row| {
            row.iter()
                .map(|cell| cell.as_str().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(": ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn toml_path(path: &Path) -> String {
    serde_json::to_string(&path.display().to_string()).expect("a path as a TOML string")
}

fn write_sqlite(dir: &Path) -> PathBuf {
    let path = dir.join("inventory.sqlite");
    let connection = rusqlite::Connection::open(&path).expect("create the SQLite file");
    connection
        .execute_batch(
            "CREATE TABLE products (sku TEXT PRIMARY KEY, title VARCHAR(40), price REAL, \
                 stock INTEGER);
             INSERT INTO products VALUES ('sku-1', 'Kettle', 19.5, 3), ('sku-2', 'Mug', 4.25, 'many'),
                 ('sku-4', 'Pan', 30, 0), (NULL, 'Lid', 2, 1);",
        )
        .expect("fill the SQLite file");
    path
}

fn write_csv_dir(dir: &Path) -> PathBuf {
    let regions = dir.join("regions");
    std::fs::create_dir_all(&regions).expect("create the CSV directory");
    std::fs::write(regions.join("a.csv"), "user_id,region\nu1,north\n").expect("write a.csv");
    std::fs::write(regions.join("b.csv"), "user_id,region\nu2,south\nu3,east\n")
        .expect("write b.csv");
    std::fs::write(regions.join("notes.txt"), "not,a\ncsv,file\n").expect("write notes.txt");
    regions
}

/// Runs a first aggregator and agent, stores two events, waits until its flush wrote them to
/// Parquet, and copies the files it wrote into `dir/archive/`.
async fn write_parquet_archive(dir: &Path) -> PathBuf {
    let fleet = start_fleet_with(
        &binaries!(),
        "federation-archive",
        "edge-archive",
        AggregatorOptions {
            flush_interval_ms: 100,
            ..AggregatorOptions::default()
        },
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    // One request: one buffer commit, one batch, so one flush writes both rows to one file.
    let events = [
        json!({"event_id": "a1", "name": "signup", "user_id": "u1"}),
        json!({"event_id": "a2", "name": "signup", "user_id": "u2"}),
    ];
    let outcome = post_events(&http_client(), fleet.agent.http_addr(), &events)
        .await
        .expect("post archive events");
    assert_eq!(outcome.status, 200, "{outcome:?}");
    let events_dir = fleet.dir.path().join("aggregator");
    fleet
        .dir
        .wait_until(
            ARRIVAL_TIMEOUT,
            "a Parquet file of the archive events",
            || {
                let events_dir = events_dir.clone();
                async move {
                    anyhow::ensure!(
                        !parquet_files(&events_dir).is_empty(),
                        "no Parquet file yet"
                    );
                    Ok(())
                }
            },
        )
        .await;
    let archive = dir.join("archive");
    std::fs::create_dir_all(&archive).expect("create the archive directory");
    for (idx, file) in parquet_files(&events_dir).iter().enumerate() {
        std::fs::copy(file, archive.join(format!("part-{idx}.parquet")))
            .expect("copy a Parquet file");
    }
    archive
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("list a directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|ext| ext == "parquet") {
                found.push(path);
            }
        }
    }
    found
}

/// A table of this test in the PostgreSQL server `RUNNEL_TEST_POSTGRES_URL` names.
struct PostgresFixture {
    url: String,
    table: String,
}

impl PostgresFixture {
    async fn create(url: &str) -> PostgresFixture {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let fixture = PostgresFixture {
            url: url.to_owned(),
            table: format!("runnel_fed_{}_{nanos}", std::process::id()),
        };
        let client = fixture.connect().await;
        let table = &fixture.table;
        client
            .batch_execute(&format!(
                "CREATE TABLE \"{table}\" (
                     id int4 PRIMARY KEY, user_id text NOT NULL, plan varchar(20),
                     mrr numeric(10, 2), active bool, signed_up timestamptz,
                     local_time timestamp, born date, seats int8, small int2, ratio float8,
                     ratio4 float4, code char(3), ref uuid, profile jsonb, doc json,
                     tags text[], note numeric, raw bytea);
                 INSERT INTO \"{table}\" VALUES
                     (1, 'u1', 'pro', 49.90, true, '2024-01-02 03:04:05.123456+00',
                      '2024-01-02 03:04:05', '1990-05-06', 5, -2, 0.25, 0.5, 'ab',
                      'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{\"tier\": 2}}',
                      '{{\"a\": [1, 2]}}', '{{a,b}}', 1.5, '\\xcafe'),
                     (2, 'u2', 'free', 0, false, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                      NULL, NULL, NULL, NULL, NULL, NULL, NULL),
                     (3, 'u9', 'team', 99, true, '2023-06-01 00:00:00+00', NULL, NULL, 12, 1,
                      NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'NaN', NULL);"
            ))
            .await
            .unwrap_or_else(|error| panic!("create {table}: {error:?}"));
        fixture
    }

    async fn connect(&self) -> tokio_postgres::Client {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .unwrap_or_else(|error| panic!("{POSTGRES_URL_ENV} does not parse: {error}"));
        config.connect_timeout(Duration::from_secs(10));
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|error| panic!("connect to {POSTGRES_URL_ENV}: {error:?}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    async fn drop_table(&self) {
        let client = self.connect().await;
        if let Err(error) = client
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{}\"", self.table))
            .await
        {
            eprintln!("federation: drop {}: {error:?}", self.table);
        }
    }
}
