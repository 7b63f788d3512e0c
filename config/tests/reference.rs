//! `docs/CONFIGURATION.md` cannot drift from the configuration types: every key the parser
//! accepts is documented there, and every documented key parses with the example value the
//! document gives. The keys the parser accepts are read off the types themselves: the raw
//! tables reject unknown keys, and serde's "unknown field" error lists the fields a table has.
//! Also: the default configs the packages install parse and point where the units allow writes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use runnel_config::{ConfigError, load_agent, load_aggregator, parse_agent, parse_aggregator};

/// Which file a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum File {
    Agent,
    Aggregator,
}

impl File {
    fn parse(self, text: &str) -> Result<(), ConfigError> {
        let origin = Path::new("/etc/runnel/reference.toml");
        match self {
            File::Agent => parse_agent(text, origin).map(drop),
            File::Aggregator => parse_aggregator(text, origin).map(drop),
        }
    }

    /// The required keys, as top-level dotted keys, so any documented key can be added.
    fn required(self) -> &'static [(&'static str, &'static str)] {
        match self {
            File::Agent => &[
                ("uplink.aggregator", "\"agg.example.com:9480\""),
                ("uplink.ca_cert", "\"/etc/runnel/certs/ca.pem\""),
                ("uplink.cert", "\"/etc/runnel/certs/agent.pem\""),
                ("uplink.key", "\"/etc/runnel/certs/agent.key\""),
            ],
            File::Aggregator => &[
                ("ingest.ca_cert", "\"/etc/runnel/certs/ca.pem\""),
                ("ingest.cert", "\"/etc/runnel/certs/aggregator.pem\""),
                ("ingest.key", "\"/etc/runnel/certs/aggregator.key\""),
            ],
        }
    }

    /// Required keys of one entry of an array of tables, as inline-table fields.
    fn required_in_array(self, table: &str) -> &'static [(&'static str, &'static str)] {
        match table {
            "sources.mqtt" => &[
                ("name", "\"probe\""),
                ("url", "\"mqtt://127.0.0.1:1883\""),
                ("topics", "[\"probe/#\"]"),
            ],
            "query.users" => &[("name", "\"probe\"")],
            "federation" => &[("name", "\"probe\""), ("kind", "\"csv\"")],
            "windows" => &[
                ("name", "\"probe\""),
                ("size_ms", "1000"),
                ("aggregates", "{ n = \"count\" }"),
                ("having", "\"n > 0\""),
            ],
            "models" => &[
                ("name", "\"probe\""),
                ("path", "\"probe.onnx\""),
                ("inputs", "[{ field = \"score\" }]"),
            ],
            "rules" => &[("name", "\"probe\"")],
            _ => &[],
        }
    }
}

fn doc_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CONFIGURATION.md")
}

/// `(file, dotted key, example)` of every table row whose first cell is a backquoted key, under
/// the `## agent.toml` and `## aggregator.toml` headings.
fn documented_keys() -> Vec<(File, String, String)> {
    let path = doc_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    let mut file = None;
    let mut rows = Vec::new();
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            file = match heading.trim() {
                "agent.toml" => Some(File::Agent),
                "aggregator.toml" => Some(File::Aggregator),
                _ => None,
            };
            continue;
        }
        let Some(file) = file else { continue };
        let cells: Vec<&str> = line.split(" | ").collect();
        let Some(key) = cells
            .first()
            .and_then(|c| c.strip_prefix("| `"))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue;
        };
        let example = cells
            .get(1)
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
            .unwrap_or_else(|| {
                panic!(
                    "{}: row of `{key}` has no `example`: {line}",
                    path.display()
                )
            });
        rows.push((file, key.to_owned(), example.to_owned()));
    }
    rows
}

/// The fields of the table at `table` (dotted; "" for the file itself), or `None` when it is
/// not a table with named fields (a value, or a map such as `agent.labels`).
fn fields_of(file: File, table: &str) -> Option<(bool, Vec<String>)> {
    const PROBE: &str = "zz_probe_unknown_field";
    let attempts: Vec<(bool, String)> = if table.is_empty() {
        vec![(false, format!("{PROBE} = 1\n"))]
    } else {
        vec![
            (false, format!("[{table}]\n{PROBE} = 1\n")),
            (true, format!("[[{table}]]\n{PROBE} = 1\n")),
        ]
    };
    for (is_array, text) in attempts {
        let Err(ConfigError::Parse { message, .. }) = file.parse(&text) else {
            continue;
        };
        let Some(rest) = message
            .lines()
            .find_map(|line| line.split_once(&format!("unknown field `{PROBE}`, expected")))
            .map(|(_, rest)| rest.to_owned())
        else {
            continue;
        };
        let fields = rest
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        return Some((is_array, fields));
    }
    None
}

/// Every leaf key the parser accepts, with whether it sits in an array of tables.
fn real_keys(file: File) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut tables = vec![String::new()];
    while let Some(table) = tables.pop() {
        let (_, fields) = fields_of(file, &table)
            .unwrap_or_else(|| panic!("{file:?}: `{table}` should be a table"));
        for field in fields {
            let key = if table.is_empty() {
                field
            } else {
                format!("{table}.{field}")
            };
            if fields_of(file, &key).is_some() {
                tables.push(key);
            } else {
                keys.insert(key);
            }
        }
    }
    keys
}

/// Arrays of tables among the real tables (their keys take the inline-table form).
fn array_tables(file: File) -> BTreeSet<String> {
    let mut arrays = BTreeSet::new();
    let mut tables = vec![String::new()];
    while let Some(table) = tables.pop() {
        let Some((_, fields)) = fields_of(file, &table) else {
            continue;
        };
        for field in fields {
            let key = if table.is_empty() {
                field
            } else {
                format!("{table}.{field}")
            };
            if let Some((is_array, _)) = fields_of(file, &key) {
                if is_array {
                    arrays.insert(key.clone());
                }
                tables.push(key);
            }
        }
    }
    arrays
}

#[test]
fn the_probe_finds_the_keys_it_should() {
    // Guards the probe itself: if the error wording of serde or toml changed, the other tests
    // would compare empty sets.
    let agent = real_keys(File::Agent);
    for key in [
        "agent.data_dir",
        "buffer.max_bytes",
        "sources.mqtt.topics",
        "uplink.key",
    ] {
        assert!(agent.contains(key), "{key} not found in {agent:?}");
    }
    assert!(!agent.contains("agent.labels.site"), "maps are leaves");
    let aggregator = real_keys(File::Aggregator);
    for key in ["ingest.listen", "storage.wal_path", "query.timeout_ms"] {
        assert!(
            aggregator.contains(key),
            "{key} not found in {aggregator:?}"
        );
    }
    assert!(array_tables(File::Agent).contains("sources.mqtt"));
}

#[test]
fn every_key_is_documented() {
    let documented: BTreeSet<(File, String)> = documented_keys()
        .into_iter()
        .map(|(file, key, _)| (file, key))
        .collect();
    let mut missing = Vec::new();
    for file in [File::Agent, File::Aggregator] {
        for key in real_keys(file) {
            if !documented.contains(&(file, key.clone())) {
                missing.push(format!("{file:?}: {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys the config accepts but {} does not document (add a table row with an example): {missing:#?}",
        doc_path().display()
    );
}

#[test]
fn every_documented_key_is_real_and_its_example_parses() {
    let rows = documented_keys();
    assert!(rows.len() > 50, "only {} documented keys found", rows.len());
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for (file, key, example) in rows {
        assert!(
            seen.insert((file, key.clone())),
            "{key} is documented twice"
        );
        let arrays = array_tables(file);
        let array = arrays
            .iter()
            .find(|table| key.starts_with(&format!("{table}.")));
        let mut text = String::new();
        for (required, value) in file.required() {
            if *required != key {
                text.push_str(&format!("{required} = {value}\n"));
            }
        }
        match array {
            Some(table) => {
                let field = &key[table.len() + 1..];
                let mut entries: Vec<String> = file
                    .required_in_array(table)
                    .iter()
                    .filter(|(name, _)| name != &field)
                    .map(|(name, value)| format!("{name} = {value}"))
                    .collect();
                entries.push(format!("{field} = {example}"));
                text.push_str(&format!("{table} = [{{ {} }}]\n", entries.join(", ")));
            }
            None => text.push_str(&format!("{key} = {example}\n")),
        }
        // Unknown keys and wrong types are parse errors. Validation errors are not: an example
        // may need a partner key (username needs password) or an environment variable.
        if let Err(error @ ConfigError::Parse { .. }) = file.parse(&text) {
            problems.push(format!("{key} = {example}: {error}\n{text}"));
        }
    }
    assert!(
        problems.is_empty(),
        "documented keys that do not parse:\n{}",
        problems.join("\n")
    );
}

#[test]
fn packaged_default_configs_are_valid_and_write_only_where_the_units_allow() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config");
    let agent = load_agent(&dir.join("agent.toml")).unwrap();
    assert_eq!(agent.data_dir, Path::new("/var/lib/runnel-agent"));
    assert!(agent.buffer.path.starts_with("/var/lib/runnel-agent"));
    assert!(agent.uplink.cert.starts_with("/etc/runnel/certs"));
    assert!(agent.uplink.key.starts_with("/etc/runnel/certs"));
    assert!(agent.uplink.ca_cert.starts_with("/etc/runnel/certs"));
    assert!(agent.http.listen.port() >= 1024, "no capability needed");
    let aggregator = load_aggregator(&dir.join("aggregator.toml")).unwrap();
    assert_eq!(aggregator.data_dir, Path::new("/var/lib/runnel-aggregator"));
    assert!(
        aggregator
            .storage
            .wal_path
            .starts_with("/var/lib/runnel-aggregator")
    );
    assert!(
        aggregator
            .storage
            .events_dir
            .starts_with("/var/lib/runnel-aggregator")
    );
    assert!(aggregator.ingest.cert.starts_with("/etc/runnel/certs"));
    assert!(aggregator.ingest.key.starts_with("/etc/runnel/certs"));
    assert!(
        aggregator.ingest.listen.port() >= 1024,
        "no capability needed"
    );
    assert!(aggregator.query.listen.ip().is_loopback());
}

/// The keys an example file sets or shows commented out (`# key = value` under a `[table]`).
fn keys_shown(text: &str) -> BTreeSet<String> {
    let mut table = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start_matches("# ").trim_start_matches('#').trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            table = name.to_owned();
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name.to_owned();
        } else if let Some((key, _)) = line.split_once(" = ")
            && !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
        {
            keys.insert(format!("{table}.{key}"));
        }
    }
    keys
}

#[test]
fn packaged_default_configs_show_every_key_of_the_examples() {
    // The packaged files are the examples with install paths and a header; when an example
    // gains a key, the packaged file must show it too.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for name in ["agent.toml", "aggregator.toml"] {
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path)
                .unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
        };
        let example = keys_shown(&read(root.join("config/examples").join(name)));
        let packaged = keys_shown(&read(root.join("packaging/config").join(name)));
        let missing: Vec<_> = example.difference(&packaged).collect();
        assert!(
            missing.is_empty(),
            "packaging/config/{name} lacks keys config/examples/{name} shows: {missing:?}"
        );
    }
}
