//! Aggregator config: defaults, path resolution and the wording of errors.

use std::net::SocketAddr;
use std::path::Path;

use runnel_config::{
    ConfigError, FederationConfig, FederationSource, FileFormat, PostgresSource, Synchronous,
    load_aggregator, parse_aggregator,
};

/// The smallest valid aggregator file: only the required keys.
const MINIMAL: &str = r#"
[ingest]
ca_cert = "/etc/runnel/certs/ca.pem"
cert = "/etc/runnel/certs/aggregator.pem"
key = "/etc/runnel/certs/aggregator.key"
"#;

fn error_with(extra: &str) -> String {
    let text = format!("{extra}\n{MINIMAL}");
    match parse_aggregator(&text, Path::new("aggregator.toml")) {
        Ok(config) => panic!("expected an error for {extra:?}, got {config:#?}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn defaults_are_applied() {
    let config = parse_aggregator(MINIMAL, Path::new("/etc/runnel/aggregator.toml")).unwrap();
    assert_eq!(config.data_dir, Path::new("/var/lib/runnel-aggregator"));
    let ingest = &config.ingest;
    assert_eq!(ingest.listen, "0.0.0.0:9480".parse::<SocketAddr>().unwrap());
    assert_eq!(ingest.ca_cert, Path::new("/etc/runnel/certs/ca.pem"));
    assert_eq!(ingest.max_in_flight_batches, 64);
    assert_eq!(ingest.max_connections, 10_000);
    assert_eq!(ingest.idle_timeout_ms, 10_000);
    let storage = &config.storage;
    assert_eq!(
        storage.wal_path,
        Path::new("/var/lib/runnel-aggregator/wal.sqlite")
    );
    assert_eq!(storage.synchronous, Synchronous::Full);
    assert_eq!(
        storage.events_dir,
        Path::new("/var/lib/runnel-aggregator/events")
    );
    assert_eq!(storage.flush_interval_ms, 60_000);
    assert_eq!(storage.max_recent_rows, 1_000_000);
    let query = &config.query;
    assert_eq!(
        query.listen,
        "127.0.0.1:9481".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(query.memory_limit_bytes, 512 << 20);
    assert_eq!(query.timeout_ms, 30_000);
    assert_eq!(query.max_result_rows, 100_000);
}

#[test]
fn relative_paths_resolve_against_the_file_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aggregator.toml");
    let text = format!(
        "[aggregator]\ndata_dir = \"data\"\n[storage]\nevents_dir = \"/srv/events\"\n{}",
        MINIMAL.replace("/etc/runnel/certs/", "certs/")
    );
    std::fs::write(&path, text).unwrap();
    let config = load_aggregator(&path).unwrap();
    assert_eq!(config.data_dir, dir.path().join("data"));
    assert_eq!(config.storage.wal_path, dir.path().join("data/wal.sqlite"));
    assert_eq!(config.storage.events_dir, Path::new("/srv/events"));
    assert_eq!(config.ingest.key, dir.path().join("certs/aggregator.key"));
}

#[test]
fn unknown_key_is_rejected_with_its_name() {
    let message = error_with("[query]\nmemory_limit = 5");
    assert!(message.starts_with("aggregator.toml: "), "{message}");
    assert!(
        message.contains("unknown field `memory_limit`"),
        "{message}"
    );
    assert!(message.contains("`memory_limit_bytes`"), "{message}");
}

#[test]
fn invalid_values_name_file_key_value_and_what_is_allowed() {
    let cases = [
        (
            "[query]\nmemory_limit_bytes = 1024",
            "aggregator.toml: query.memory_limit_bytes = 1024: must be at least 16 MiB (16777216)",
        ),
        (
            "[storage]\nflush_interval_ms = 99",
            "aggregator.toml: storage.flush_interval_ms = 99: must be between 100 and 86400000",
        ),
        (
            "[storage]\nsynchronous = \"fast\"",
            "aggregator.toml: storage.synchronous = \"fast\": must be one of \"off\", \"normal\", \
             \"full\", \"extra\" (\"full\" keeps every acknowledged commit across power loss)",
        ),
        (
            "[storage]\nmax_recent_rows = 0",
            "aggregator.toml: storage.max_recent_rows = 0: must be at least 1",
        ),
        (
            "[query]\ntimeout_ms = 3600001",
            "aggregator.toml: query.timeout_ms = 3600001: must be between 100 and 3600000",
        ),
        (
            "[query]\nmax_result_rows = 0",
            "aggregator.toml: query.max_result_rows = 0: must be at least 1",
        ),
    ];
    for (extra, expected) in cases {
        assert_eq!(error_with(extra), expected, "for {extra:?}");
    }
}

#[test]
fn ingest_limits() {
    for (line, expected) in [
        (
            "max_in_flight_batches = 0",
            "ingest.max_in_flight_batches = 0: must be between 1 and 1024",
        ),
        (
            "max_connections = 0",
            "ingest.max_connections = 0: must be at least 1",
        ),
        (
            "idle_timeout_ms = 999",
            "ingest.idle_timeout_ms = 999: must be between 1000 and 600000",
        ),
        (
            "listen = \"0.0.0.0\"",
            "ingest.listen = \"0.0.0.0\": must be an IP address and port, such as \
             \"127.0.0.1:9470\" or \"[::1]:9470\" (host names are not resolved here)",
        ),
    ] {
        let text = format!("{MINIMAL}{line}\n");
        let error = parse_aggregator(&text, Path::new("aggregator.toml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("aggregator.toml: {expected}"),
            "for {line:?}"
        );
    }
}

#[test]
fn non_loopback_query_listen_is_refused() {
    for listen in ["0.0.0.0:9481", "192.168.1.10:9481", "[::]:9481"] {
        let message = error_with(&format!("[query]\nlisten = \"{listen}\""));
        assert!(
            message.starts_with(&format!(
                "aggregator.toml: query.listen = \"{listen}\": must be a loopback address"
            )),
            "{message}"
        );
        assert!(message.contains("[[query.users]]"), "{message}");
        assert!(message.contains("127.0.0.1"), "{message}");
        assert!(message.contains("SSH tunnel"), "{message}");
        let message = error_with(&format!("[pgwire]\nlisten = \"{listen}\""));
        assert!(
            message.starts_with(&format!(
                "aggregator.toml: pgwire.listen = \"{listen}\": must be a loopback address"
            )),
            "{message}"
        );
    }
    for listen in ["127.0.0.1:0", "127.0.0.2:9481", "[::1]:9481"] {
        let text = format!("[query]\nlisten = \"{listen}\"\n{MINIMAL}");
        let config = parse_aggregator(&text, Path::new("aggregator.toml")).unwrap();
        assert_eq!(config.query.listen, listen.parse::<SocketAddr>().unwrap());
    }
}

#[test]
fn users_allow_exposed_listeners_and_are_checked() {
    let text = format!(
        "[query]\nlisten = \"0.0.0.0:9481\"\n[[query.users]]\nname = \"grafana\"\n\
         password = \"correct horse\"\n[pgwire]\nlisten = \"0.0.0.0:9482\"\n{MINIMAL}"
    );
    let config = parse_aggregator(&text, Path::new("aggregator.toml")).unwrap();
    assert_eq!(config.query.users.len(), 1);
    assert_eq!(config.query.users[0].name, "grafana");
    assert_eq!(config.query.users[0].password, "correct horse");
    assert!(
        !format!("{config:?}").contains("correct horse"),
        "passwords are not logged"
    );
    assert_eq!(
        config.pgwire.listen,
        Some("0.0.0.0:9482".parse::<SocketAddr>().unwrap())
    );

    let default = parse_aggregator(MINIMAL, Path::new("aggregator.toml")).unwrap();
    assert_eq!(
        default.pgwire.listen,
        Some("127.0.0.1:9482".parse::<SocketAddr>().unwrap())
    );
    let off = format!("[pgwire]\nenabled = false\nlisten = \"0.0.0.0:5432\"\n{MINIMAL}");
    let off = parse_aggregator(&off, Path::new("aggregator.toml")).unwrap();
    assert_eq!(off.pgwire.listen, None);

    let cases = [
        (
            "[[query.users]]\npassword = \"12345678\"",
            "query.users[0].name is required",
        ),
        (
            "[[query.users]]\nname = \"a\"",
            "query.users[0].password is required",
        ),
        (
            "[[query.users]]\nname = \"a\"\npassword = \"short\"",
            "query.users[0].password = (hidden): must be at least 8 characters long",
        ),
        (
            "[[query.users]]\nname = \"a\"\npassword_env = \"RUNNEL_TEST_UNSET_VARIABLE_42\"",
            "query.users[0].password_env = \"RUNNEL_TEST_UNSET_VARIABLE_42\": names an environment",
        ),
        (
            "[[query.users]]\nname = \"a\"\npassword = \"12345678\"\n\
             [[query.users]]\nname = \"a\"\npassword = \"12345678\"",
            "query.users[1].name = \"a\": is already a user above",
        ),
    ];
    for (extra, expected) in cases {
        let text = format!("[query]\n{extra}\n{MINIMAL}");
        let message = match parse_aggregator(&text, Path::new("aggregator.toml")) {
            Ok(_) => panic!("expected an error for {extra:?}"),
            Err(error) => error.to_string(),
        };
        assert!(
            message.starts_with(&format!("aggregator.toml: {expected}")),
            "{extra:?}: {message}"
        );
    }
}

#[test]
fn missing_certificates_say_what_to_put() {
    let error = parse_aggregator("", Path::new("aggregator.toml")).unwrap_err();
    assert!(matches!(error, ConfigError::Missing { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "aggregator.toml: ingest.ca_cert is required: the fleet CA certificate (PEM) that signs \
         agent certificates, made by `runnel-aggregator certs init`"
    );
}

#[test]
fn federation_entries_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aggregator.toml");
    let text = format!(
        "{MINIMAL}\n\
         [[federation]]\nname = \"crm\"\nkind = \"postgres\"\n\
         url = \"postgresql://runnel:secret-one@db.example.com:5432/crm\"\n\
         tables = [\"customers\", \"plans\"]\n\
         [[federation]]\nname = \"inventory\"\nkind = \"sqlite\"\npath = \"inv.sqlite\"\n\
         [[federation]]\nname = \"archive\"\nkind = \"csv\"\npath = \"/srv/orders\"\n\
         has_header = false\n\
         [[federation]]\nname = \"_raw_2024\"\nkind = \"json\"\npath = \"raw\"\n\
         file_extension = \".ndjson\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let config = load_aggregator(&path).unwrap();
    assert_eq!(
        config.federation,
        vec![
            FederationConfig {
                name: "crm".into(),
                source: FederationSource::Postgres(PostgresSource {
                    url: "postgresql://runnel:secret-one@db.example.com:5432/crm".into(),
                    password: None,
                    schema: "public".into(),
                    tables: Some(vec!["customers".into(), "plans".into()]),
                }),
            },
            FederationConfig {
                name: "inventory".into(),
                source: FederationSource::Sqlite {
                    path: dir.path().join("inv.sqlite"),
                    tables: None,
                },
            },
            FederationConfig {
                name: "archive".into(),
                source: FederationSource::Files {
                    format: FileFormat::Csv,
                    path: "/srv/orders".into(),
                    file_extension: ".csv".into(),
                    has_header: false,
                },
            },
            FederationConfig {
                name: "_raw_2024".into(),
                source: FederationSource::Files {
                    format: FileFormat::Json,
                    path: dir.path().join("raw"),
                    file_extension: ".ndjson".into(),
                    has_header: true,
                },
            },
        ]
    );
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("secret-one"),
        "passwords are not logged: {shown}"
    );
    assert!(
        shown.contains("postgresql://runnel:<redacted>@db.example.com:5432/crm"),
        "{shown}"
    );
    let none = parse_aggregator(MINIMAL, Path::new("aggregator.toml")).unwrap();
    assert!(none.federation.is_empty());
}

#[test]
fn federation_password_env_is_read() {
    // PATH is set wherever tests run; setting a variable of our own would need unsafe code.
    let var = "PATH";
    let expected = std::env::var(var).expect("PATH is set");
    let text = format!(
        "{MINIMAL}[[federation]]\nname = \"crm\"\nkind = \"postgres\"\n\
         url = \"postgres://runnel@127.0.0.1/crm?password=inline\"\npassword_env = \"{var}\"\n\
         schema = \"sales\"\n"
    );
    let config = parse_aggregator(&text, Path::new("aggregator.toml")).unwrap();
    let FederationSource::Postgres(source) = &config.federation[0].source else {
        panic!("expected a postgres source: {config:?}");
    };
    assert_eq!(source.password.as_deref(), Some(expected.as_str()));
    assert_eq!(source.schema, "sales");
    assert_eq!(
        source.redacted_url(),
        "postgres://runnel@127.0.0.1/crm?password=<redacted>"
    );
    let shown = format!("{config:?}");
    assert!(
        !shown.contains(&expected) && !shown.contains("inline"),
        "{shown}"
    );
}

#[test]
fn federation_errors_name_the_entry_and_key() {
    let pg = "kind = \"postgres\"\nurl = \"postgresql://h/db\"";
    let cases = [
        (
            "kind = \"csv\"\npath = \"/d\"".to_owned(),
            "federation[0].name is required".to_owned(),
        ),
        (
            format!("name = \"Crm\"\n{pg}"),
            "federation[0].name = \"Crm\": must be a SQL identifier".to_owned(),
        ),
        (
            format!("name = \"1crm\"\n{pg}"),
            "federation[0].name = \"1crm\": must be a SQL identifier".to_owned(),
        ),
        (
            format!("name = \"my-crm\"\n{pg}"),
            "federation[0].name = \"my-crm\": must be a SQL identifier".to_owned(),
        ),
        (
            format!("name = \"{}\"\n{pg}", "a".repeat(64)),
            format!(
                "federation[0].name = \"{}\": must be a SQL identifier",
                "a".repeat(64)
            ),
        ),
        (
            format!("name = \"pg_stuff\"\n{pg}"),
            "federation[0].name = \"pg_stuff\": is a name Runnel or SQL clients use".to_owned(),
        ),
        (
            "name = \"x\"\npath = \"/d\"".to_owned(),
            "federation[0].kind is required".to_owned(),
        ),
        (
            "name = \"x\"\nkind = \"mysql\"".to_owned(),
            "federation[0].kind = \"mysql\": must be one of \"postgres\", \"sqlite\", \
             \"parquet\", \"csv\", \"json\""
                .to_owned(),
        ),
        (
            "name = \"x\"\nkind = \"postgres\"".to_owned(),
            "federation[0].url is required".to_owned(),
        ),
        (
            "name = \"x\"\nkind = \"postgres\"\nurl = \"mysql://u:pw@h/db\"".to_owned(),
            "federation[0].url = \"mysql://u:<redacted>@h/db\": must be a URL starting with \
             \"postgresql://\""
                .to_owned(),
        ),
        (
            "name = \"x\"\nkind = \"postgres\"\nurl = \"postgresql://u@/db\"".to_owned(),
            "federation[0].url = \"postgresql://u@/db\": must name a host".to_owned(),
        ),
        (
            format!("name = \"x\"\n{pg}\npath = \"/d\""),
            "federation[0].path = (set): is only for kind = \"sqlite\", \"parquet\", \"csv\" \
             or \"json\", not \"postgres\""
                .to_owned(),
        ),
        (
            format!("name = \"x\"\n{pg}\ntables = []"),
            "federation[0].tables = []: must name at least one table".to_owned(),
        ),
        (
            format!("name = \"x\"\n{pg}\ntables = [\"a\", \"a\"]"),
            "federation[0].tables[1] = \"a\": is already in the list".to_owned(),
        ),
        (
            format!("name = \"x\"\n{pg}\npassword_env = \"RUNNEL_TEST_UNSET_VARIABLE_43\""),
            "federation[0].password_env = \"RUNNEL_TEST_UNSET_VARIABLE_43\": names an \
             environment variable that is not set"
                .to_owned(),
        ),
        (
            "name = \"x\"\nkind = \"parquet\"\npath = \"/d\"\ntables = [\"t\"]".to_owned(),
            "federation[0].tables = (set): is only for kind = \"postgres\" or \"sqlite\", not \
             \"parquet\""
                .to_owned(),
        ),
        (
            "name = \"x\"\nkind = \"json\"\npath = \"/d\"\nhas_header = true".to_owned(),
            "federation[0].has_header = (set): is only for kind = \"csv\", not \"json\"".to_owned(),
        ),
        (
            "name = \"x\"\nkind = \"sqlite\"".to_owned(),
            "federation[0].path is required".to_owned(),
        ),
    ];
    for (entry, expected) in cases {
        let text = format!("{MINIMAL}[[federation]]\n{entry}\n");
        let message = match parse_aggregator(&text, Path::new("aggregator.toml")) {
            Ok(config) => panic!("expected an error for {entry:?}, got {config:?}"),
            Err(error) => error.to_string(),
        };
        assert!(
            message.starts_with(&format!("aggregator.toml: {expected}")),
            "{entry:?}: {message}"
        );
    }
    for reserved in [
        "events",
        "dead_letters",
        "agent_drops",
        "alerts",
        "agents",
        "public",
        "pg_catalog",
        "information_schema",
    ] {
        let text = format!("{MINIMAL}[[federation]]\nname = \"{reserved}\"\n{pg}\n");
        let message = parse_aggregator(&text, Path::new("aggregator.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with(&format!(
                "aggregator.toml: federation[0].name = \"{reserved}\": is a name Runnel"
            )),
            "{message}"
        );
    }
    let twice = format!(
        "{MINIMAL}[[federation]]\nname = \"crm\"\n{pg}\n[[federation]]\nname = \"crm\"\n\
         kind = \"sqlite\"\npath = \"/c.sqlite\"\n"
    );
    let message = parse_aggregator(&twice, Path::new("aggregator.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        message.starts_with(
            "aggregator.toml: federation[1].name = \"crm\": is already the name of a \
             [[federation]] entry above"
        ),
        "{message}"
    );
    let unknown = format!("{MINIMAL}[[federation]]\nname = \"crm\"\n{pg}\nuser = \"x\"\n");
    let message = parse_aggregator(&unknown, Path::new("aggregator.toml"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("unknown field `user`"), "{message}");
}

#[test]
fn federation_examples_in_the_example_file_parse() {
    // The commented-out [[federation]] sections of the example file, uncommented, are valid.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/aggregator.toml");
    let example = std::fs::read_to_string(&path).unwrap();
    let start = example
        .find("# [[federation]]")
        .expect("the example documents [[federation]]");
    let sections: String = example[start..]
        .lines()
        .filter_map(|line| {
            if line == "# [[federation]]" {
                Some("[[federation]]")
            } else {
                line.strip_prefix("#   ")
                    .filter(|rest| rest.contains(" = "))
            }
        })
        // The variable it names is not set here.
        .filter(|line| !line.starts_with("password_env"))
        .collect::<Vec<_>>()
        .join("\n");
    let config = parse_aggregator(&format!("{MINIMAL}{sections}\n"), &path).unwrap();
    let names: Vec<&str> = config.federation.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["crm", "inventory", "archive"]);
}
