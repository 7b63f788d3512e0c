//! Entry point for fuzzing config parsing: the `cargo fuzz` target in `fuzz/` and the corpus
//! replay test (`config/tests/corpus.rs`) call it. Parsing may fail, but must never panic.

use std::path::Path;

/// Parses `data` (if UTF-8) as both an agent and an aggregator config.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::parse_agent(text, Path::new("/etc/runnel/agent.toml"));
    let _ = crate::parse_aggregator(text, Path::new("/etc/runnel/aggregator.toml"));
}
