//! Named points where a test can stop the aggregator to SIGKILL it there (the crash tests in
//! `tests/tests/delta_crash.rs` and `delta_upgrade.rs`): with
//! `RUNNEL_AGGREGATOR_PAUSE_AT=flush.after_commit` (a comma-separated list), the task that
//! reaches the point prints `paused at <point>` to stderr and never goes on, while the rest of
//! the aggregator keeps ingesting and answering, until the process is killed. Unset (always,
//! outside tests) a point costs one look at an empty list.
//!
//! Points: `flush.before_commit`, `flush.after_commit` (committed to the table, WAL batches not
//! yet deleted), `compact.before_commit`, `compact.after_commit`, `expire.before_commit`,
//! `expire.after_commit`, `convert.after_commit` (one chunk of the previous layout converted).

use std::sync::LazyLock;

/// The environment variable that names the points.
pub const PAUSE_AT_VAR: &str = "RUNNEL_AGGREGATOR_PAUSE_AT";

static PAUSE_AT: LazyLock<Vec<String>> = LazyLock::new(|| {
    std::env::var(PAUSE_AT_VAR)
        .map(|v| {
            v.split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default()
});

/// Stops the calling task here for good if the environment names `name`.
pub async fn point(name: &str) {
    if PAUSE_AT.is_empty() || !PAUSE_AT.iter().any(|p| p == name) {
        return;
    }
    eprintln!("{PAUSE_AT_VAR}: paused at {name}");
    std::future::pending::<()>().await;
}
