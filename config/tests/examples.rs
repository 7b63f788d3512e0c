//! Every documented example file in `config/examples/` parses and validates, and holds the values
//! it documents.

use std::path::{Path, PathBuf};

use runnel_config::{Synchronous, WhenFull, load_agent, load_aggregator};

fn example_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("read {}: {error}", dir.display()))
        .map(|entry| entry.expect("list the examples directory").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_parses() {
    let files = example_files();
    assert!(files.len() >= 2, "expected example files, found {files:?}");
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("aggregator") {
            let config = load_aggregator(&path)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            assert_eq!(config.ingest.ca_cert, Path::new("/etc/runnel/certs/ca.pem"));
            assert!(config.query.listen.ip().is_loopback(), "{name}");
            assert_eq!(config.storage.synchronous, Synchronous::Full, "{name}");
            assert!(config.storage.flush_interval_ms >= 100, "{name}");
        } else if name.starts_with("agent") {
            let config =
                load_agent(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            assert_eq!(config.uplink.ca_cert, Path::new("/etc/runnel/certs/ca.pem"));
            assert!(!config.uplink.aggregators.is_empty(), "{name}");
            assert_eq!(config.buffer.when_full, WhenFull::Block, "{name}");
            assert!(config.data_dir.is_absolute(), "{name}");
        } else if name.starts_with("managed") {
            // A managed document, laid over the plain agent example with its model files.
            use runnel_config::managed::{Bootstrap, ManagedDocument, merge};
            let text = std::fs::read_to_string(&path).expect("read example");
            let document = ManagedDocument::parse(&text, &path)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            let bootstrap =
                Bootstrap::load(&path.with_file_name("agent.toml")).expect("agent.toml");
            let files = document
                .model_files()
                .into_iter()
                .map(|name| (name, "0".repeat(64)))
                .collect();
            let effective = merge(&bootstrap, &document, Path::new("/managed/1"), &files)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            assert_eq!(
                effective.config.buffer.when_full,
                WhenFull::DropOldest,
                "{name}"
            );
            assert!(effective.config.mqtt_listener.enabled, "{name}");
        } else {
            panic!("{name}: example names start with \"agent\", \"aggregator\" or \"managed\"");
        }
    }
}

#[test]
fn examples_show_the_defaults() {
    // The commented-out values in the examples are the defaults: uncommenting them changes nothing.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for name in ["agent.toml", "aggregator.toml"] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if looks_like_key_value(rest) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_ne!(text, uncommented, "{name}: no commented-out defaults found");
        if name.starts_with("agent") {
            let commented = format!("{:?}", runnel_config::parse_agent(&text, &path).unwrap());
            let explicit = format!(
                "{:?}",
                runnel_config::parse_agent(&uncommented, &path).unwrap()
            );
            assert_eq!(commented, explicit, "{name}");
        } else {
            let commented = format!(
                "{:?}",
                runnel_config::parse_aggregator(&text, &path).unwrap()
            );
            let explicit = format!(
                "{:?}",
                runnel_config::parse_aggregator(&uncommented, &path).unwrap()
            );
            assert_eq!(commented, explicit, "{name}");
        }
    }
}

/// `key = value` with a lowercase key: a commented-out setting, not prose.
fn looks_like_key_value(text: &str) -> bool {
    match text.split_once(" = ") {
        Some((key, _)) => {
            !key.is_empty()
                && key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
        }
        None => false,
    }
}
