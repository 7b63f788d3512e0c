//! CI's replay of the fuzz corpora (`fuzz/corpus/`, seeded by `fuzz/seed.py`, grown by
//! `cargo fuzz run`) through the same entry points as the fuzz targets: no nightly needed.

/// Feeds every input of `fuzz/corpus/<target>/` (and up to 64 of its prefixes: truncation is
/// the commonest malformation) to `entry`, as the fuzzer would.
fn replay(target: &str, entry: fn(&[u8])) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut n_inputs = 0;
    for file in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = file.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("read a corpus input");
        let step = (data.len() / 64).max(1);
        for cut in (0..data.len()).step_by(step) {
            entry(&data[..cut]);
        }
        entry(&data);
        n_inputs += 1;
    }
    assert!(
        n_inputs > 0,
        "{} holds no inputs (run fuzz/seed.py)",
        dir.display()
    );
}

#[test]
fn config_corpus_decodes_without_panicking() {
    replay("config", runnel_config::fuzzing::config);
}
