//! Agent config: defaults, path resolution and the wording of errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use runnel_config::{ConfigError, Synchronous, WhenFull, load_agent, parse_agent};

/// The smallest valid agent file: only the required keys.
const MINIMAL: &str = r#"
[uplink]
aggregator = "agg.example.com:9480"
ca_cert = "/etc/runnel/certs/ca.pem"
cert = "/etc/runnel/certs/agent.pem"
key = "/etc/runnel/certs/agent.key"
"#;

fn origin() -> &'static Path {
    Path::new("/etc/runnel/agent.toml")
}

/// The error text of `MINIMAL` plus `extra` (TOML appended; later tables may repeat none of
/// MINIMAL's).
fn error_with(extra: &str) -> String {
    let text = format!("{extra}\n{MINIMAL}");
    match parse_agent(&text, Path::new("agent.toml")) {
        Ok(config) => panic!("expected an error for {extra:?}, got {config:#?}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn defaults_are_applied() {
    let config = parse_agent(MINIMAL, origin()).unwrap();
    assert_eq!(config.data_dir, Path::new("/var/lib/runnel-agent"));
    assert!(config.labels.is_empty());
    assert_eq!(
        config.http.listen,
        "127.0.0.1:9470".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.http.max_body_bytes, 1 << 20);
    assert_eq!(config.http.max_event_bytes, 64 << 10);
    assert_eq!(
        config.buffer.path,
        Path::new("/var/lib/runnel-agent/buffer.sqlite")
    );
    assert_eq!(config.buffer.max_bytes, 1 << 30);
    assert_eq!(config.buffer.synchronous, Synchronous::Full);
    assert_eq!(config.buffer.when_full, WhenFull::Block);
    let uplink = &config.uplink;
    assert_eq!(uplink.aggregators, ["agg.example.com:9480"]);
    assert_eq!(uplink.failover_after_ms, 5_000);
    assert_eq!(uplink.failback_after_ms, 60_000);
    assert_eq!(uplink.server_name, "localhost");
    assert_eq!(uplink.ca_cert, Path::new("/etc/runnel/certs/ca.pem"));
    assert_eq!(uplink.cert, Path::new("/etc/runnel/certs/agent.pem"));
    assert_eq!(uplink.key, Path::new("/etc/runnel/certs/agent.key"));
    assert_eq!(uplink.max_batch_events, 1000);
    assert_eq!(uplink.max_batch_bytes, 1 << 20);
    assert_eq!(uplink.max_batch_age_ms, 200);
    assert_eq!(uplink.max_in_flight_batches, 8);
    assert_eq!(uplink.reconnect_min_ms, 100);
    assert_eq!(uplink.reconnect_max_ms, 10_000);
    assert_eq!(uplink.keep_alive_interval_ms, 2_000);
    assert_eq!(uplink.idle_timeout_ms, 10_000);
}

#[test]
fn explicit_values_are_kept() {
    let text = format!(
        r#"
[agent]
labels = {{ site = "berlin", "rack.id" = "r-12_b" }}
[sources.http]
listen = "[::1]:0"
max_event_bytes = 1048576
[buffer]
synchronous = "normal"
when_full = "block"
{MINIMAL}
max_batch_bytes = 1048576
server_name = "agg.example.com"
"#
    );
    let config = parse_agent(&text, origin()).unwrap();
    assert_eq!(config.labels["site"], "berlin");
    assert_eq!(config.labels["rack.id"], "r-12_b");
    assert_eq!(config.http.listen, "[::1]:0".parse::<SocketAddr>().unwrap());
    assert_eq!(config.http.max_event_bytes, 1 << 20);
    assert_eq!(config.buffer.synchronous, Synchronous::Normal);
    assert_eq!(config.buffer.synchronous.as_pragma(), "NORMAL");
    assert_eq!(config.uplink.server_name, "agg.example.com");
}

#[test]
fn relative_paths_resolve_against_the_file_directory() {
    let text = r#"
[agent]
data_dir = "state"
[uplink]
aggregator = "127.0.0.1:9480"
ca_cert = "certs/ca.pem"
cert = "./certs/agent.pem"
key = "../keys/agent.key"
"#;
    let config = parse_agent(text, Path::new("/etc/runnel/agent.toml")).unwrap();
    assert_eq!(config.data_dir, Path::new("/etc/runnel/state"));
    // Derived defaults are built from the resolved data_dir.
    assert_eq!(
        config.buffer.path,
        Path::new("/etc/runnel/state/buffer.sqlite")
    );
    assert_eq!(config.uplink.ca_cert, Path::new("/etc/runnel/certs/ca.pem"));
    assert_eq!(config.uplink.cert, Path::new("/etc/runnel/certs/agent.pem"));
    assert_eq!(
        config.uplink.key,
        Path::new("/etc/runnel/../keys/agent.key")
    );
}

#[test]
fn relative_paths_without_a_directory_use_the_current_directory() {
    let text = MINIMAL.replace("/etc/runnel/certs/ca.pem", "ca.pem");
    let config = parse_agent(&text, Path::new("agent.toml")).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(config.uplink.ca_cert, cwd.join("ca.pem"));
    assert!(config.uplink.ca_cert.is_absolute());
}

#[test]
fn load_agent_reads_the_file_and_resolves_against_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let text = MINIMAL.replace("/etc/runnel/certs/", "certs/") + "[buffer]\npath = \"b.sqlite\"\n";
    std::fs::write(&path, text).unwrap();
    let config = load_agent(&path).unwrap();
    assert_eq!(config.uplink.cert, dir.path().join("certs/agent.pem"));
    assert_eq!(config.buffer.path, dir.path().join("b.sqlite"));
}

#[test]
fn unreadable_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let error = load_agent(&path).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("read {}: ", path.display())),
        "{message}"
    );
}

#[test]
fn unknown_key_is_rejected_with_its_name() {
    let message = error_with("[buffer]\nmax_byte = 5");
    assert!(message.starts_with("agent.toml: "), "{message}");
    assert!(message.contains("unknown field `max_byte`"), "{message}");
    // The toml crate lists the keys it expected and where the bad one is.
    assert!(message.contains("`max_bytes`"), "{message}");
    assert!(message.contains("line 2"), "{message}");
}

#[test]
fn unknown_section_is_rejected() {
    let message = error_with("[sources.kafka]\nbrokers = \"localhost\"");
    assert!(message.contains("unknown field `kafka`"), "{message}");
}

#[test]
fn wrong_type_is_a_parse_error() {
    let message = error_with("[buffer]\nmax_bytes = \"1MiB\"");
    assert!(message.starts_with("agent.toml: "), "{message}");
    assert!(message.contains("line 2"), "{message}");
}

#[test]
fn invalid_values_name_file_key_value_and_what_is_allowed() {
    let cases = [
        (
            "[buffer]\nmax_bytes = 0",
            "agent.toml: buffer.max_bytes = 0: must be at least 1 MiB (1048576)",
        ),
        (
            "[sources.http]\nmax_body_bytes = 100",
            "agent.toml: sources.http.max_body_bytes = 100: must be between 1 KiB (1024) and \
             64 MiB (67108864)",
        ),
        (
            "[sources.http]\nlisten = \"localhost:9470\"",
            "agent.toml: sources.http.listen = \"localhost:9470\": must be an IP address and \
             port, such as \"127.0.0.1:9470\" or \"[::1]:9470\" (host names are not resolved here)",
        ),
        (
            "[buffer]\nsynchronous = \"FULL\"",
            "agent.toml: buffer.synchronous = \"FULL\": must be one of \"off\", \"normal\", \
             \"full\", \"extra\" (\"full\" keeps every acknowledged commit across power loss)",
        ),
        (
            "[agent]\nlabels = { site = \"san francisco\" }",
            "agent.toml: agent.labels.site = \"san francisco\": label values must be 1 to 63 \
             characters of a-z, A-Z, 0-9, '_', '.' and '-'",
        ),
    ];
    for (extra, expected) in cases {
        assert_eq!(error_with(extra), expected, "for {extra:?}");
    }
}

#[test]
fn uplink_limits() {
    let cases = [
        (
            "max_batch_events = 0",
            "uplink.max_batch_events = 0: must be between 1 and 10000",
        ),
        (
            "max_batch_events = 10001",
            "uplink.max_batch_events = 10001: must be between 1 and 10000",
        ),
        (
            "max_batch_age_ms = 60001",
            "uplink.max_batch_age_ms = 60001: must be between 1 and 60000",
        ),
        (
            "max_in_flight_batches = 65",
            "uplink.max_in_flight_batches = 65: must be between 1 and 64",
        ),
        (
            "reconnect_min_ms = 5",
            "uplink.reconnect_min_ms = 5: must be at least 10",
        ),
        (
            "reconnect_max_ms = 600001",
            "uplink.reconnect_max_ms = 600001: must be at most 600000",
        ),
        (
            "max_batch_bytes = 16777217",
            "uplink.max_batch_bytes = 16777217: must be between 64 KiB (65536) and 16 MiB (16777216)",
        ),
        (
            "max_batch_bytes = 1000",
            "uplink.max_batch_bytes = 1000: must be at least sources.http.max_event_bytes (65536) \
             so that every accepted event fits in a batch",
        ),
        // The error blames the key that was written, not the default it conflicts with.
        (
            "reconnect_min_ms = 20000",
            "uplink.reconnect_min_ms = 20000: must be at most uplink.reconnect_max_ms (10000)",
        ),
        (
            "reconnect_min_ms = 500\nreconnect_max_ms = 400",
            "uplink.reconnect_max_ms = 400: must be at least uplink.reconnect_min_ms (500)",
        ),
        (
            "idle_timeout_ms = 1000",
            "uplink.idle_timeout_ms = 1000: must be greater than uplink.keep_alive_interval_ms (2000)",
        ),
        (
            "keep_alive_interval_ms = 10000",
            "uplink.keep_alive_interval_ms = 10000: must be less than uplink.idle_timeout_ms (10000)",
        ),
        (
            "keep_alive_interval_ms = 99",
            "uplink.keep_alive_interval_ms = 99: must be at least 100",
        ),
        (
            "aggregator = \"agg.example.com\"",
            "uplink.aggregator = \"agg.example.com\": must be \"host:port\" with a non-empty host \
             and a port from 1 to 65535, such as \"aggregator.example.com:9480\" or \
             \"[2001:db8::1]:9480\"",
        ),
    ];
    for (line, expected) in cases {
        // A later duplicate key is a TOML error, so replace the line or add it.
        let key = line.split(" = ").next().unwrap();
        let text: String = MINIMAL
            .lines()
            .filter(|existing| !existing.starts_with(&format!("{key} = ")))
            .chain(std::iter::once(line))
            .collect::<Vec<_>>()
            .join("\n");
        let error = parse_agent(&text, Path::new("agent.toml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("agent.toml: {expected}"),
            "for {line:?}"
        );
    }
}

#[test]
fn host_port_forms() {
    for good in [
        "agg:1",
        "10.0.0.1:9480",
        "[::1]:9480",
        "agg.example.com:65535",
    ] {
        let text = MINIMAL.replace("agg.example.com:9480", good);
        parse_agent(&text, origin()).unwrap_or_else(|error| panic!("{good}: {error}"));
    }
    for bad in [":9480", "agg:", "agg:65536", "agg:0", "agg:x", "agg host:1"] {
        let text = MINIMAL.replace("agg.example.com:9480", bad);
        let error = parse_agent(&text, origin()).unwrap_err();
        assert!(
            matches!(error, ConfigError::Invalid { ref key, .. } if key == "uplink.aggregator"),
            "{bad}: {error}"
        );
    }
}

#[test]
fn bad_label_name_is_refused() {
    let message = error_with("[agent]\nlabels = { \"\" = \"x\" }");
    assert_eq!(
        message,
        "agent.toml: agent.labels = { \"\" = \"x\" }: label names must be 1 to 63 characters of \
         a-z, A-Z, 0-9, '_', '.' and '-'"
    );
    let long = "a".repeat(64);
    let message = error_with(&format!("[agent]\nlabels = {{ {long} = \"x\" }}"));
    assert!(message.contains("label names must be"), "{message}");
    let ok = "b".repeat(63);
    let text = format!("[agent]\nlabels = {{ {ok} = \"{ok}\" }}\n{MINIMAL}");
    parse_agent(&text, origin()).unwrap();
}

#[test]
fn missing_required_keys_say_what_to_put() {
    let error = parse_agent("", Path::new("agent.toml")).unwrap_err();
    assert_eq!(
        error.to_string(),
        "agent.toml: uplink.aggregator is required: the aggregator's QUIC ingest address as \
         \"host:port\", such as \"aggregator.example.com:9480\"; or uplink.aggregators = \
         [\"host:port\", ...] to list several aggregators"
    );
    let text: String = MINIMAL
        .lines()
        .filter(|line| !line.starts_with("ca_cert"))
        .collect::<Vec<_>>()
        .join("\n");
    let error = parse_agent(&text, Path::new("agent.toml")).unwrap_err();
    assert!(matches!(error, ConfigError::Missing { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "agent.toml: uplink.ca_cert is required: the fleet CA certificate (PEM), made by \
         `runnel-aggregator certs init`"
    );
}

#[test]
fn empty_path_is_refused() {
    let text = MINIMAL.replace("/etc/runnel/certs/agent.key", "");
    let error = parse_agent(&text, Path::new("agent.toml")).unwrap_err();
    assert_eq!(
        error.to_string(),
        "agent.toml: uplink.key = \"\": must not be empty"
    );
}

#[test]
fn buffer_policies_priorities_and_unknown_policy() {
    let config = parse_with(
        "[buffer]\nwhen_full = \"drop_oldest\"\nstream_priorities = { page_pings = 10, purchases = 200 }",
    )
    .unwrap();
    assert_eq!(config.buffer.when_full, runnel_config::WhenFull::DropOldest);
    assert_eq!(config.buffer.stream_priorities["page_pings"], 10);
    assert_eq!(config.buffer.block_timeout_ms, 500);
    let config = parse_with("[buffer]\nwhen_full = \"drop_newest\"").unwrap();
    assert_eq!(config.buffer.when_full, runnel_config::WhenFull::DropNewest);
    let message = error_with("[buffer]\nwhen_full = \"spill\"");
    assert_eq!(
        message,
        "agent.toml: buffer.when_full = \"spill\": must be \"block\" (backpressure, loses nothing), \
         \"drop_newest\" or \"drop_oldest\""
    );
    let message = parse_with("[buffer]\nstream_priorities = { purchases = 300 }").unwrap_err();
    assert!(message.contains("stream_priorities"), "{message}");
}

#[test]
fn errors_show_the_origin_as_given() {
    let error = parse_agent("[buffer]\nmax_bytes = 0", Path::new("conf/edge.toml")).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("conf/edge.toml: buffer.max_bytes = 0"),
        "{error}"
    );
    let ConfigError::Invalid {
        file,
        key,
        value,
        problem,
    } = error
    else {
        panic!("expected Invalid");
    };
    assert_eq!(file, PathBuf::from("conf/edge.toml"));
    assert_eq!(key, "buffer.max_bytes");
    assert_eq!(value, "0");
    assert_eq!(problem, "must be at least 1 MiB (1048576)");
}

#[test]
fn idle_timeout_upper_bound() {
    let text = format!("{MINIMAL}idle_timeout_ms = 600001\n");
    let error = parse_agent(&text, Path::new("agent.toml")).unwrap_err();
    assert_eq!(
        error.to_string(),
        "agent.toml: uplink.idle_timeout_ms = 600001: must be at most 600000"
    );
}

const UPLINK: &str = "[uplink]\naggregator = \"127.0.0.1:9480\"\nca_cert = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n";

fn parse_with(sources: &str) -> Result<runnel_config::AgentConfig, String> {
    runnel_config::parse_agent(
        &format!("{sources}\n{UPLINK}"),
        std::path::Path::new("agent.toml"),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn mqtt_subscriber_defaults_and_url_forms() {
    let config = parse_with(
        "[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtt://127.0.0.1\"\ntopics = [\"a/#\"]",
    )
    .unwrap();
    let mqtt = &config.mqtt[0];
    assert_eq!(
        (mqtt.host.as_str(), mqtt.port, mqtt.tls, mqtt.qos),
        ("127.0.0.1", 1883, false, 1)
    );
    assert_eq!(
        (mqtt.clean_session, mqtt.keep_alive_s, mqtt.stream.as_str()),
        (false, 30, "telemetry")
    );
    assert_eq!(mqtt.payload, runnel_config::MqttPayload::Json);
    let config = parse_with(
        "[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtts://broker:9999\"\nca_cert = \"ca.pem\"\ntopics = [\"a\"]",
    )
    .unwrap();
    assert_eq!((config.mqtt[0].port, config.mqtt[0].tls), (9999, true));
}

#[test]
fn mqtt_errors_name_the_entry_and_key() {
    let cases = [
        (
            "[[sources.mqtt]]\nurl = \"mqtt://h\"\ntopics = [\"a\"]",
            "agent.toml: sources.mqtt[0].name is required",
        ),
        (
            "[[sources.mqtt]]\nname = \"b\"\nurl = \"tcp://h\"\ntopics = [\"a\"]",
            "agent.toml: sources.mqtt[0].url = \"tcp://h\": must start with mqtt:// or mqtts://",
        ),
        (
            "[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtt://h\"\ntopics = [\"a/#/b\"]",
            "agent.toml: sources.mqtt[0].topics[0] = \"a/#/b\": `#` must be a whole level and the last one",
        ),
        (
            "[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\nqos = 2",
            "agent.toml: sources.mqtt[0].qos = 2: must be 0 or 1",
        ),
        (
            "[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtts://h\"\ntopics = [\"a\"]",
            "agent.toml: sources.mqtt[0].ca_cert is required",
        ),
        (
            "[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\n[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]",
            "agent.toml: sources.mqtt[1].name = \"b\": must be unique",
        ),
        (
            "[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\ntopic_template = \"plant/site\"",
            "agent.toml: sources.mqtt[0].topic_template = \"plant/site\": names no level",
        ),
        (
            "[sources.http]\ncors_allowed_origins = [\"https://shop.example/\"]",
            "agent.toml: sources.http.cors_allowed_origins[0] = \"https://shop.example/\": must be \"*\" or an origin",
        ),
        (
            "[sources.http]\nauth_tokens = [\"short\"]",
            "agent.toml: sources.http.auth_tokens[0] = \"...\": must be at least 16 characters",
        ),
        (
            "[sources.segment]\nstream = \"a b\"",
            "agent.toml: sources.segment.stream = \"a b\": must be 1 to 63 characters",
        ),
    ];
    for (text, expected) in cases {
        let message = parse_with(text).unwrap_err();
        assert!(
            message.starts_with(expected),
            "{text}\n  got: {message}\n  want prefix: {expected}"
        );
    }
}

#[test]
fn mqtt_time_field_and_unit() {
    const SUB: &str = "[[sources.mqtt]]\nname = \"b\"\nurl = \"mqtt://h\"\ntopics = [\"a\"]\n";
    let config = parse_with(SUB).unwrap();
    assert_eq!(
        (
            config.mqtt[0].time_field.as_deref(),
            config.mqtt[0].time_unit
        ),
        (None, "auto")
    );
    assert_eq!(
        (
            config.mqtt_listener.time_field.as_deref(),
            config.mqtt_listener.time_unit
        ),
        (None, "auto")
    );
    for unit in ["auto", "s", "ms", "us", "ns", "rfc3339"] {
        let config =
            parse_with(&format!("{SUB}time_field = \"t\"\ntime_unit = \"{unit}\"")).unwrap();
        assert_eq!(
            (
                config.mqtt[0].time_field.as_deref(),
                config.mqtt[0].time_unit
            ),
            (Some("t"), unit)
        );
    }
    let config = parse_with(
        "[sources.mqtt_listener]\nenabled = true\ntime_field = \"ts\"\ntime_unit = \"ms\"",
    )
    .unwrap();
    assert_eq!(
        (
            config.mqtt_listener.time_field.as_deref(),
            config.mqtt_listener.time_unit
        ),
        (Some("ts"), "ms")
    );

    let cases = [
        (
            format!("{SUB}time_unit = \"sec\""),
            "agent.toml: sources.mqtt[0].time_unit = \"sec\": must be \"auto\", \"s\", \"ms\", \"us\", \"ns\" or \"rfc3339\"",
        ),
        (
            format!("{SUB}time_field = \"\""),
            "agent.toml: sources.mqtt[0].time_field = \"\": must be a top-level JSON key of 1 to 128 bytes",
        ),
        (
            format!("{SUB}payload = \"text\"\ntime_field = \"t\""),
            "agent.toml: sources.mqtt[0].time_field = \"t\": only JSON payloads carry a time field",
        ),
        (
            format!("{SUB}payload = \"bytes\"\ntime_unit = \"s\""),
            "agent.toml: sources.mqtt[0].time_unit = \"s\": only JSON payloads carry a time field",
        ),
        (
            "[sources.mqtt_listener]\ntime_unit = \"seconds\"".to_owned(),
            "agent.toml: sources.mqtt_listener.time_unit = \"seconds\": must be \"auto\", \"s\"",
        ),
        (
            format!("{SUB}timestamp_field = \"t\""),
            "unknown field `timestamp_field`",
        ),
    ];
    for (text, expected) in cases {
        let message = parse_with(&text).unwrap_err();
        assert!(
            message.contains(expected),
            "{text}\n  got: {message}\n  want: {expected}"
        );
    }
}

#[test]
fn collectors_default_on_with_clickstream() {
    let config = parse_with("").unwrap();
    assert!(config.snowplow.enabled && config.segment.enabled);
    assert_eq!(
        (config.snowplow.stream.as_str(), config.http.stream.as_str()),
        ("clickstream", "default")
    );
    assert!(config.segment.write_keys.is_empty() && config.http.cors_allowed_origins.is_empty());
}

/// `MINIMAL` with its `aggregator = ...` line replaced by `lines`.
fn with_aggregator_lines(lines: &str) -> String {
    MINIMAL.replace("aggregator = \"agg.example.com:9480\"", lines)
}

#[test]
fn several_aggregators_are_listed_with_their_failover_times() {
    let text = with_aggregator_lines(
        "aggregators = [\"agg-a:9480\", \"agg-b:9480\", \"[::1]:9480\"]\n\
         failover_after_ms = 2000\n\
         failback_after_ms = 0",
    );
    let uplink = parse_agent(&text, origin()).unwrap().uplink;
    assert_eq!(
        uplink.aggregators,
        ["agg-a:9480", "agg-b:9480", "[::1]:9480"]
    );
    assert_eq!(uplink.failover_after_ms, 2_000);
    assert_eq!(uplink.failback_after_ms, 0);
}

#[test]
fn aggregator_and_aggregators_are_one_or_the_other() {
    let both = format!("{MINIMAL}aggregators = [\"agg-b:9480\"]\n");
    assert_eq!(
        parse_agent(&both, Path::new("agent.toml"))
            .unwrap_err()
            .to_string(),
        "agent.toml: uplink.aggregators = [\"agg-b:9480\"]: uplink.aggregator is set too: set \
         only one of them, uplink.aggregator for a single aggregator or uplink.aggregators to \
         list several"
    );
    let neither = with_aggregator_lines("");
    let error = parse_agent(&neither, Path::new("agent.toml")).unwrap_err();
    assert!(matches!(error, ConfigError::Missing { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("uplink.aggregator is required") && message.contains("uplink.aggregators"),
        "{message}"
    );
}

#[test]
fn every_listed_aggregator_is_checked() {
    let cases = [
        (
            "aggregators = []",
            "uplink.aggregators = []: must list 1 to 64 aggregators as \"host:port\", such as \
             [\"agg-a.example.com:9480\", \"agg-b.example.com:9480\"]",
        ),
        (
            "aggregators = [\"agg-a:9480\", \"agg-b\"]",
            "uplink.aggregators[1] = \"agg-b\": must be \"host:port\" with a non-empty host and a \
             port from 1 to 65535, such as \"aggregator.example.com:9480\" or \
             \"[2001:db8::1]:9480\"",
        ),
        (
            "aggregators = [\"agg-a:9480\", \"agg-b:9480\", \"agg-a:9480\"]",
            "uplink.aggregators[2] = \"agg-a:9480\": is listed twice (also \
             uplink.aggregators[0]): list each aggregator once",
        ),
        (
            "aggregators = [\"agg-a:9480\"]\nfailover_after_ms = 99",
            "uplink.failover_after_ms = 99: must be between 100 and 3600000",
        ),
        (
            "aggregators = [\"agg-a:9480\"]\nfailback_after_ms = 86400001",
            "uplink.failback_after_ms = 86400001: must be at most 86400000",
        ),
    ];
    for (lines, expected) in cases {
        let error = parse_agent(&with_aggregator_lines(lines), Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(error, format!("agent.toml: {expected}"), "for {lines:?}");
    }
    let many: Vec<String> = (0..65).map(|idx| format!("\"agg-{idx}:9480\"")).collect();
    let error = parse_agent(
        &with_aggregator_lines(&format!("aggregators = [{}]", many.join(", "))),
        Path::new("agent.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("must list 1 to 64 aggregators"), "{error}");
}
