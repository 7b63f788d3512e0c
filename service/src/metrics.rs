//! The process's Prometheus recorder for the `metrics` facade. Each binary serves `/metrics`
//! itself: what this recorder renders, followed by the series it reads from its own state at
//! scrape time.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of every `_seconds` histogram, from 1 ms to 30 s: a batch round trip on a LAN or a
/// point query, up to a stalled uplink or a query at its time limit.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's metrics recorder (once; later calls return the same handle, so an
/// agent and an aggregator in one process, as in the demo, share it). `None` when some other
/// recorder was installed first (a binary embedded in a process that records elsewhere):
/// `/metrics` then shows only the scrape-time series.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("the buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
}
