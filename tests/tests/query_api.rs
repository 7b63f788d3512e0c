//! The HTTP query API: credentials when `[[query.users]]` exist, and the formats `Accept` picks
//! (JSON, CSV and Arrow IPC streamed, with the row limit aborting a stream instead of cutting it).

use std::net::SocketAddr;
use std::time::Duration;

use runnel_tests::{
    AgentExtra, AgentOptions, AggregatorOptions, binaries, http_client, poll_until, post_events,
    send, start_fleet_with,
};
use serde_json::{Value, json};

const USER: &str = "analyst";
const PASSWORD: &str = "correct horse battery";

fn request(addr: SocketAddr, sql: &str) -> reqwest::RequestBuilder {
    http_client()
        .post(format!("http://{addr}/api/v1/query"))
        .json(&json!({ "sql": sql }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_formats() {
    let fleet = start_fleet_with(
        &binaries!(),
        "query-api",
        "edge-api",
        AggregatorOptions {
            query_extra: format!(
                "max_result_rows = 12\nmemory_limit_bytes = 16777216\n[[query.users]]\nname = \"{USER}\"\npassword = \"{PASSWORD}\"\n"
            ),
            ..AggregatorOptions::default()
        },
        AgentOptions::default(),
        &AgentExtra::default(),
    );
    let query = fleet.aggregator.query_addr();
    let events: Vec<Value> = (0..20)
        .map(|idx| json!({"event_id": format!("api-{idx:02}"), "name": "page_view", "score": f64::from(idx)}))
        .collect();
    let posted = post_events(&http_client(), fleet.agent.http_addr(), &events)
        .await
        .unwrap();
    assert_eq!(posted.status, 200, "{posted:?}");

    // No credentials, wrong ones: 401 with a challenge, no data.
    let anonymous = send(request(query, "SELECT count(*) FROM events"))
        .await
        .unwrap();
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        anonymous.header("www-authenticate"),
        "Basic realm=\"runnel\""
    );
    assert!(
        anonymous.error().contains("[[query.users]]"),
        "{}",
        anonymous.error()
    );
    let wrong = send(request(query, "SELECT 1").basic_auth(USER, Some("correct horse")))
        .await
        .unwrap();
    assert_eq!(wrong.status, 401);
    let stranger = send(request(query, "SELECT 1").basic_auth("nobody", Some(PASSWORD)))
        .await
        .unwrap();
    assert_eq!(stranger.status, 401);

    let authed = |sql: &str| request(query, sql).basic_auth(USER, Some(PASSWORD));
    poll_until(Duration::from_secs(60), || async {
        let reply = send(authed("SELECT count(*) AS n FROM events")).await?;
        anyhow::ensure!(reply.status == 200, "status {}", reply.status);
        let n = reply.json()["rows"][0][0].as_i64().unwrap_or(0);
        anyhow::ensure!(n == 20, "{n} of 20");
        Ok(())
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}\n{}", fleet.dir.report()));

    // Prometheus metrics on both, without credentials (like /healthz).
    let metrics = |addr: SocketAddr| async move {
        let reply = send(http_client().get(format!("http://{addr}/metrics"))).await?;
        anyhow::ensure!(reply.status == 200, "status {}", reply.status);
        Ok::<_, anyhow::Error>(String::from_utf8(reply.bytes)?)
    };
    let agent_http = fleet.agent.http_addr();
    poll_until(Duration::from_secs(30), || async {
        let agent = metrics(agent_http).await?;
        for line in [
            "runnel_agent_events_received_total{source=\"http\"} 20",
            "runnel_agent_buffered_events_total 20",
            "runnel_agent_shipped_events_total 20",
            "runnel_agent_buffer_events 0",
            "runnel_agent_uplink_connected 1",
        ] {
            anyhow::ensure!(
                agent.lines().any(|l| l == line),
                "agent: no {line:?} in\n{agent}"
            );
        }
        anyhow::ensure!(agent.contains("runnel_agent_batch_round_trip_seconds_bucket"));
        let aggregator = metrics(query).await?;
        for line in [
            "runnel_aggregator_stored_events_total{agent_id=\"edge-api\"} 20",
            "runnel_aggregator_connected_agents 1",
        ] {
            anyhow::ensure!(
                aggregator.lines().any(|l| l == line),
                "aggregator: no {line:?} in\n{aggregator}"
            );
        }
        anyhow::ensure!(aggregator.contains("runnel_aggregator_query_duration_seconds_bucket"));
        Ok(())
    })
    .await
    .unwrap_or_else(|error| panic!("{error:#}"));

    // The fleet tables: the agent that stored these events, and no alerts yet.
    let agents = send(authed(
        "SELECT agent_id, connected, last_seq, last_stored IS NOT NULL AS seen FROM agents",
    ))
    .await
    .unwrap();
    assert_eq!(
        agents.json()["rows"],
        json!([["edge-api", true, 20, true]]),
        "{:?}",
        agents.json()
    );
    let alerts = send(authed("SELECT count(*) FROM alerts")).await.unwrap();
    assert_eq!(alerts.json()["rows"], json!([[0]]));

    // CSV, with a header line.
    let sql = "SELECT event_id, score FROM events ORDER BY event_id LIMIT 3";
    let csv = send(authed(sql).header("accept", "text/csv"))
        .await
        .unwrap();
    assert_eq!(csv.status, 200);
    assert!(csv.header("content-type").starts_with("text/csv"));
    assert_eq!(
        String::from_utf8(csv.bytes.clone()).unwrap(),
        "event_id,score\napi-00,0.0\napi-01,1.0\napi-02,2.0\n"
    );
    // An empty result still has its header.
    let empty =
        send(authed("SELECT event_id FROM events WHERE score < 0").header("accept", "text/csv"))
            .await
            .unwrap();
    assert_eq!(String::from_utf8(empty.bytes).unwrap(), "event_id\n");

    // Arrow IPC stream: typed columns.
    let arrow = send(authed(sql).header("accept", "application/vnd.apache.arrow.stream"))
        .await
        .unwrap();
    assert_eq!(arrow.status, 200);
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(arrow.bytes), None)
        .expect("an Arrow IPC stream");
    let batches: Vec<_> = reader.collect::<Result<_, _>>().expect("batches");
    let n_rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(n_rows, 3);
    let scores = batches[0]
        .column_by_name("score")
        .expect("score column")
        .as_any()
        .downcast_ref::<arrow_array::Float64Array>()
        .expect("score is Float64");
    assert_eq!(scores.value(2), 2.0);

    // Over max_result_rows: JSON is cut and flagged, a stream is aborted (never a short file).
    let json_cut = send(authed("SELECT event_id FROM events")).await.unwrap();
    assert_eq!(json_cut.json()["truncated"], json!(true));
    assert_eq!(json_cut.json()["n_rows"], json!(12));
    // The first batch already holds all 20 rows: refused before the first byte.
    let over = send(authed("SELECT event_id FROM events").header("accept", "text/csv"))
        .await
        .unwrap();
    assert_eq!(over.status, 400);
    assert!(
        over.error().contains("query.max_result_rows"),
        "{}",
        over.error()
    );
    // Rows arriving in many batches: the limit is hit mid-stream and the transfer is aborted.
    let many_batches = "SELECT e.event_id FROM events e CROSS JOIN (SELECT * FROM unnest(make_array(1, 2))) t \
                        ORDER BY e.event_id";
    let streamed = authed(many_batches)
        .header("accept", "text/csv")
        .send()
        .await
        .expect("the answer starts");
    if streamed.status() == 200 {
        assert!(
            streamed.bytes().await.is_err(),
            "a CSV over max_result_rows must end in a transfer error"
        );
    } else {
        assert_eq!(streamed.status(), 400);
    }

    // Over the memory limit (16 MiB here): a clean error, and the server keeps serving.
    let greedy = "SELECT count(DISTINCT concat(CAST(value AS VARCHAR), repeat('x', 200))) \
                  FROM generate_series(1, 2000000)";
    let over_memory = send(authed(greedy)).await.unwrap();
    assert_eq!(over_memory.status, 500, "{}", over_memory.error());
    assert!(
        over_memory
            .error()
            .to_lowercase()
            .contains("resources exhausted"),
        "{}",
        over_memory.error()
    );
    let after = send(authed("SELECT count(*) FROM events")).await.unwrap();
    assert_eq!(after.json()["rows"], json!([[20]]));

    // Formats we do not serve, and errors before the first row, keep their status.
    let xml = send(authed("SELECT 1").header("accept", "application/xml"))
        .await
        .unwrap();
    assert_eq!(xml.status, 406);
    assert!(xml.error().contains("text/csv"), "{}", xml.error());
    let invalid = send(authed("SELECT nope FROM events").header("accept", "text/csv"))
        .await
        .unwrap();
    assert_eq!(invalid.status, 400);
    let write = send(authed("DROP VIEW dead_letters").header("accept", "text/csv"))
        .await
        .unwrap();
    assert_eq!(write.status, 400);
    assert!(
        write
            .error()
            .starts_with("Runnel's SQL is read-only: DROP VIEW is refused"),
        "{}",
        write.error()
    );

    // Every write is refused before planning with the message the PostgreSQL protocol gives,
    // naming what was sent; reads other than SELECT still run.
    for (sql, kind) in [
        ("CREATE TABLE t AS SELECT 1", "CREATE TABLE AS"),
        ("INSERT INTO events (name) VALUES ('x')", "INSERT"),
        ("UPDATE events SET name = 'x'", "UPDATE"),
        ("DELETE FROM events", "DELETE"),
        ("DROP TABLE events", "DROP TABLE"),
        ("COPY events TO STDOUT", "COPY"),
        ("COPY (SELECT 1) TO STDOUT", "COPY"),
        ("COPY events TO '/tmp/runnel-copy-test.csv'", "COPY"),
        (
            "SET datafusion.runtime.memory_limit = '100G'",
            "SET datafusion.runtime.memory_limit",
        ),
    ] {
        let refused = send(authed(sql)).await.unwrap();
        assert_eq!(refused.status, 400, "{sql}: {}", refused.error());
        let expected = format!("Runnel's SQL is read-only: {kind} is refused");
        assert!(
            refused.error().starts_with(&expected),
            "{sql}: {}",
            refused.error()
        );
    }
    let begin = send(authed("BEGIN")).await.unwrap();
    assert_eq!(begin.status, 400);
    assert!(
        begin.error().contains("needs a session"),
        "{}",
        begin.error()
    );
    for sql in [
        "EXPLAIN SELECT count(*) FROM events",
        "SHOW TABLES",
        "SHOW datafusion.execution.batch_size",
    ] {
        let read = send(authed(sql)).await.unwrap();
        assert_eq!(read.status, 200, "{sql}: {}", read.error());
    }
    let after = send(authed("SELECT count(*) FROM events")).await.unwrap();
    assert_eq!(after.json()["rows"], json!([[20]]), "nothing changed");

    // information_schema names PostgreSQL types, the ones pg_catalog names (in two pages: this
    // test's max_result_rows is 12).
    let mut information_schema = Vec::new();
    let mut pg_catalog = Vec::new();
    for (first, last) in [(1, 7), (8, 14)] {
        let page = send(authed(&format!(
            "SELECT column_name, data_type, udt_name FROM information_schema.columns \
             WHERE table_name = 'events' AND ordinal_position BETWEEN {first} AND {last} \
             ORDER BY ordinal_position"
        )))
        .await
        .unwrap();
        information_schema.extend(page.json()["rows"].as_array().cloned().unwrap_or_default());
        let page = send(authed(&format!(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON a.attrelid = c.oid \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             WHERE c.relname = 'events' AND a.attnum BETWEEN {first} AND {last} \
             ORDER BY a.attnum"
        )))
        .await
        .unwrap();
        pg_catalog.extend(page.json()["rows"].as_array().cloned().unwrap_or_default());
    }
    let n_columns = send(authed(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'events'",
    ))
    .await
    .unwrap();
    assert_eq!(n_columns.json()["rows"], json!([[14]]));
    let information_schema = Value::Array(information_schema);
    let pg_catalog = Value::Array(pg_catalog);
    let (Some(ours), Some(theirs)) = (information_schema.as_array(), pg_catalog.as_array()) else {
        panic!("no rows: {information_schema} / {pg_catalog}");
    };
    assert_eq!(ours.len(), 14, "{information_schema}");
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{information_schema} / {pg_catalog}"
    );
    for (ours, theirs) in ours.iter().zip(theirs) {
        let format_type = theirs[1].as_str().unwrap_or_default();
        let expected_data_type = if format_type.ends_with("[]") {
            "ARRAY"
        } else {
            format_type
        };
        assert_eq!(ours[0], theirs[0], "same column order");
        assert_eq!(ours[1], json!(expected_data_type), "{ours} / {theirs}");
        assert_eq!(
            ours[2], theirs[2],
            "udt_name = pg_type.typname: {ours} / {theirs}"
        );
    }
    assert_eq!(
        information_schema[2],
        json!(["event_time", "timestamp with time zone", "timestamptz"])
    );
    assert_eq!(information_schema[1], json!(["seq", "numeric", "numeric"]));
    assert_eq!(information_schema[12], json!(["tags", "ARRAY", "_text"]));
}
