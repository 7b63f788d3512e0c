//! Aggregator config: defaults, path resolution and the wording of errors.

use std::net::SocketAddr;
use std::path::Path;

use runnel_config::{ConfigError, Synchronous, load_aggregator, parse_aggregator};

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
