//! The referee of the reliability suite: it compares, by event id, what the sources acknowledged
//! with what the aggregator stored (through SQL only): lost = acknowledged but neither stored nor
//! counted by a drop report, duplicated = stored more than once. It prints one summary line per
//! scenario and asserts the guarantees on the [`Verdict`].
//!
//! It never sends events nor injects faults, and it decides nothing by timing: it waits for
//! delivery by polling with a deadline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::load::Probe;
use crate::load::AckedEvent;
use crate::{TestDir, poll_until, query_count, query_rows};

/// Most time delivery may take to resume after a fault ended. Generous on purpose: the figure
/// is measured and printed; this only catches "never", not "slow".
pub const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// Environment variable: when set to a file path, every summary line is appended to that file
/// too (the long run's figures for docs/RELIABILITY.md).
pub const SUMMARY_FILE_ENV: &str = "RUNNEL_RELIABILITY_SUMMARY";

/// Rows per page when reading stored ids: below the query API's default `max_result_rows`, and
/// small enough that the aggregator's sort for one page stays within its query memory limit.
const STORED_PAGE_ROWS: usize = 20_000;

/// Counts, by event id, what sources acknowledged against what the aggregator stored.
#[derive(Debug)]
pub struct Referee {
    scenario: String,
    /// Event id -> (stream, the agent said it dropped it).
    acked: BTreeMap<String, (String, bool)>,
    recoveries: Vec<Duration>,
    notes: Vec<(String, String)>,
    started: Instant,
}

/// The referee's findings for one scenario.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub scenario: String,
    pub n_acked: u64,
    /// Distinct event ids stored (acknowledged or not: a request whose answer was lost to a kill
    /// may be stored without its acknowledgement).
    pub n_stored: u64,
    /// Stored but never acknowledged (allowed: the answer was lost).
    pub n_stored_unacked: u64,
    /// Acknowledged, not stored, and not announced as dropped in the 200 answer. Under
    /// `drop_oldest` this includes evicted events; [`Verdict::n_lost`] subtracts the drop
    /// reports.
    pub lost: Vec<String>,
    /// Acknowledged and not stored, per stream (announced drops included).
    pub missing_by_stream: BTreeMap<String, u64>,
    /// The aggregator's `agent_drops` view: events dropped by a buffer policy, per stream.
    pub dropped_by_stream: BTreeMap<String, u64>,
    /// Event ids stored more than once, with their count.
    pub duplicated: Vec<(String, u64)>,
    /// Rows beyond the distinct (agent_id, seq) pairs: a sequence number stored twice.
    pub n_seq_duplicates: u64,
    pub recoveries: Vec<Duration>,
    pub notes: Vec<(String, String)>,
    pub elapsed: Duration,
}

impl Referee {
    pub fn new(scenario: &str) -> Referee {
        Referee {
            scenario: scenario.to_owned(),
            acked: BTreeMap::new(),
            recoveries: Vec::new(),
            notes: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Events a source acknowledged on `stream` (panics on an id acknowledged twice).
    pub fn add_acked(&mut self, stream: &str, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            self.insert(id, stream.to_owned(), false);
        }
    }

    /// Events an HTTP [`crate::Load`] or a probe saw acknowledged.
    pub fn add_acked_events(&mut self, events: impl IntoIterator<Item = AckedEvent>) {
        for event in events {
            self.insert(event.id, event.stream, event.dropped_in_answer);
        }
    }

    fn insert(&mut self, id: String, stream: String, dropped: bool) {
        if let Some(previous) = self.acked.insert(id.clone(), (stream, dropped)) {
            panic!("{id} was acknowledged twice ({previous:?}): the test is broken");
        }
    }

    /// Records a probe: its acknowledged ids and the recovery time.
    pub fn add_probe(&mut self, probe: Probe) {
        self.recoveries.push(probe.recovered_in);
        self.add_acked_events(probe.acked);
    }

    /// A `key=value` pair for the summary line.
    pub fn note(&mut self, key: &str, value: impl std::fmt::Display) {
        self.notes.push((key.to_owned(), value.to_string()));
    }

    pub fn n_acked(&self) -> usize {
        self.acked.len()
    }

    /// Waits (at most `timeout`) until every acknowledged event is stored or, per stream,
    /// accounted for by the drop reports in the aggregator's `agent_drops` view. Does not fail:
    /// the verdict says what is missing.
    pub async fn wait_stored(&self, query_addr: SocketAddr, timeout: Duration) {
        let _ = poll_until(timeout, || async {
            let verdict = self.verdict(query_addr).await?;
            anyhow::ensure!(verdict.n_lost() == 0, "{} missing", verdict.n_lost());
            Ok(())
        })
        .await;
    }

    /// Reads what the aggregator stored and compares.
    pub async fn verdict(&self, query_addr: SocketAddr) -> anyhow::Result<Verdict> {
        let stored = stored_id_counts(query_addr).await?;
        let mut lost = Vec::new();
        let mut missing_by_stream: BTreeMap<String, u64> = BTreeMap::new();
        for (id, (stream, dropped)) in &self.acked {
            if !stored.contains_key(id) {
                *missing_by_stream.entry(stream.clone()).or_default() += 1;
                if !dropped {
                    lost.push(id.clone());
                }
            }
        }
        let n_stored_unacked = stored
            .keys()
            .filter(|id| !self.acked.contains_key(*id))
            .count() as u64;
        let duplicated: Vec<(String, u64)> = stored
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        let n_rows = query_count(query_addr, "SELECT count(*) FROM events").await?;
        let n_distinct_seq = query_count(
            query_addr,
            "SELECT count(*) FROM (SELECT DISTINCT agent_id, seq FROM events)",
        )
        .await?;
        let mut dropped_by_stream = BTreeMap::new();
        for row in query_rows(
            query_addr,
            "SELECT stream, CAST(sum(n_events) AS BIGINT) FROM agent_drops GROUP BY stream",
        )
        .await?
        {
            let stream = row[0].as_str().unwrap_or("NULL").to_owned();
            let n = row[1]
                .as_u64()
                .with_context(|| format!("agent_drops sum is not a count: {row:?}"))?;
            dropped_by_stream.insert(stream, n);
        }
        Ok(Verdict {
            scenario: self.scenario.clone(),
            n_acked: self.acked.len() as u64,
            n_stored: stored.len() as u64,
            n_stored_unacked,
            lost,
            missing_by_stream,
            dropped_by_stream,
            duplicated,
            n_seq_duplicates: n_rows.saturating_sub(n_distinct_seq),
            recoveries: self.recoveries.clone(),
            notes: self.notes.clone(),
            elapsed: self.started.elapsed(),
        })
    }

    /// Waits for delivery, then returns the verdict after printing its summary line (also to
    /// [`SUMMARY_FILE_ENV`]'s file). Panics only when the aggregator cannot be queried.
    pub async fn settle(&self, dir: &TestDir, query_addr: SocketAddr) -> Verdict {
        self.wait_stored(query_addr, crate::ARRIVAL_TIMEOUT).await;
        let verdict = match self.verdict(query_addr).await {
            Ok(verdict) => verdict,
            Err(error) => panic!(
                "{}: cannot read the aggregator's answer: {error:#} (test dir {})",
                self.scenario,
                dir.path().display()
            ),
        };
        verdict.print();
        verdict
    }
}

/// Every stored event id with its number of rows (events without an id are left out).
async fn stored_id_counts(query_addr: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut counts = BTreeMap::new();
    // Keyset pages (ids after the last one seen): an OFFSET would make the aggregator sort
    // offset + limit rows per page, and run out of query memory on large runs.
    let mut after = String::new();
    loop {
        assert!(
            !after.contains('\''),
            "event ids of the suite never contain quotes: {after}"
        );
        let sql = format!(
            "SELECT event_id, count(*) FROM events WHERE event_id > '{after}' \
             GROUP BY event_id ORDER BY event_id LIMIT {STORED_PAGE_ROWS}"
        );
        let page = query_rows(query_addr, &sql).await?;
        let n_rows = page.len();
        for row in page {
            let id = row[0]
                .as_str()
                .with_context(|| format!("event_id is not text: {row:?}"))?
                .to_owned();
            let n = row[1]
                .as_u64()
                .with_context(|| format!("count is not a number: {row:?}"))?;
            after.clone_from(&id);
            counts.insert(id, n);
        }
        if n_rows < STORED_PAGE_ROWS {
            break;
        }
    }
    Ok(counts)
}

impl Verdict {
    /// Acknowledged events neither stored nor counted by a drop report: per stream, missing
    /// minus reported drops.
    pub fn n_lost(&self) -> u64 {
        self.missing_by_stream
            .iter()
            .map(|(stream, n_missing)| {
                n_missing.saturating_sub(self.dropped_by_stream.get(stream).copied().unwrap_or(0))
            })
            .sum()
    }

    /// Events stored more than once (by id or by sequence number).
    pub fn n_duplicated(&self) -> u64 {
        let by_id: u64 = self.duplicated.iter().map(|(_, n)| n - 1).sum();
        by_id.max(self.n_seq_duplicates)
    }

    /// The longest recovery, in milliseconds.
    pub fn recovered_in_ms(&self) -> Option<u128> {
        self.recoveries.iter().max().map(Duration::as_millis)
    }

    pub fn n_dropped(&self) -> u64 {
        self.dropped_by_stream.values().sum()
    }

    /// `scenario=... acked=... stored=... lost=0 duplicated=0 recovered_in_ms=...` and the
    /// scenario's notes.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "scenario={} acked={} stored={} lost={} duplicated={} recovered_in_ms={}",
            self.scenario,
            self.n_acked,
            self.n_stored,
            self.n_lost(),
            self.n_duplicated(),
            self.recovered_in_ms()
                .map_or_else(|| "n/a".to_owned(), |ms| ms.to_string()),
        );
        if self.recoveries.len() > 1 {
            let mut sorted = self.recoveries.clone();
            sorted.sort();
            let _ = write!(
                line,
                " recoveries={} recovered_median_ms={}",
                sorted.len(),
                sorted[sorted.len() / 2].as_millis()
            );
        }
        let _ = write!(line, " stored_unacked={}", self.n_stored_unacked);
        if !self.dropped_by_stream.is_empty() || !self.missing_by_stream.is_empty() {
            let _ = write!(
                line,
                " dropped={} missing_by_stream={} dropped_by_stream={}",
                self.n_dropped(),
                format_map(&self.missing_by_stream),
                format_map(&self.dropped_by_stream)
            );
        }
        for (key, value) in &self.notes {
            let _ = write!(line, " {key}={value}");
        }
        let _ = write!(line, " elapsed_s={:.1}", self.elapsed.as_secs_f64());
        line
    }

    /// Prints the summary line (and appends it to [`SUMMARY_FILE_ENV`]'s file when set).
    pub fn print(&self) {
        let line = self.summary();
        println!("{line}");
        if let Some(path) = std::env::var_os(SUMMARY_FILE_ENV) {
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut file| {
                    std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes())
                });
            if let Err(error) = appended {
                eprintln!("cannot append to {}: {error}", path.to_string_lossy());
            }
        }
    }

    /// The guarantees for a lossless scenario: nothing lost, nothing twice, nothing dropped by a
    /// policy, and delivery resumed within [`RECOVERY_BOUND`] after every fault.
    pub fn assert_lossless(&self) {
        self.assert_no_duplicates();
        assert!(
            self.lost.is_empty(),
            "{}: {} acknowledged events lost, such as {:?}\n{}",
            self.scenario,
            self.lost.len(),
            &self.lost[..self.lost.len().min(10)],
            self.summary()
        );
        assert!(
            self.dropped_by_stream.is_empty(),
            "{}: a lossless scenario reported drops\n{}",
            self.scenario,
            self.summary()
        );
        self.assert_recovered();
    }

    /// The guarantees under a drop policy: nothing twice, and per stream exactly the reported
    /// drops are missing; delivery resumed within [`RECOVERY_BOUND`].
    pub fn assert_drops_explain_missing(&self) {
        self.assert_no_duplicates();
        let missing_by_stream: BTreeMap<&String, u64> = self
            .missing_by_stream
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(stream, n)| (stream, *n))
            .collect();
        let dropped_by_stream: BTreeMap<&String, u64> = self
            .dropped_by_stream
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(stream, n)| (stream, *n))
            .collect();
        assert_eq!(
            missing_by_stream,
            dropped_by_stream,
            "{}: per stream, acknowledged-but-missing events (left) differ from the drops the \
             aggregator's agent_drops view reports (right)\n{}",
            self.scenario,
            self.summary()
        );
        self.assert_recovered();
    }

    pub fn assert_no_duplicates(&self) {
        assert!(
            self.duplicated.is_empty() && self.n_seq_duplicates == 0,
            "{}: stored more than once: {:?} ({} rows beyond distinct (agent_id, seq))\n{}",
            self.scenario,
            &self.duplicated[..self.duplicated.len().min(10)],
            self.n_seq_duplicates,
            self.summary()
        );
    }

    pub fn assert_recovered(&self) {
        for (fault_idx, recovered) in self.recoveries.iter().enumerate() {
            assert!(
                *recovered <= RECOVERY_BOUND,
                "{}: delivery took {recovered:?} to resume after fault {fault_idx}, over \
                 {RECOVERY_BOUND:?}\n{}",
                self.scenario,
                self.summary()
            );
        }
    }
}

fn format_map(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "{}".to_owned();
    }
    let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    parts.join(",")
}
