//! Health and readiness: the `/healthz` and `/readyz` endpoints and the systemd supervision
//! loop (`Type=notify` readiness, watchdog pings while healthy, stopping), over what a binary
//! says of itself through [`Probes`]. Reads state, changes none but the stopping flag.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

/// What a service says of itself.
pub trait Probes: Send + Sync + 'static {
    /// `Ok` while the process can do its work; the reason otherwise. Watchdog pings stop while
    /// it is not, so systemd restarts the service.
    fn health(&self) -> Result<(), &'static str>;
    /// `Ok` when the process takes traffic (started, not stopping); the reason otherwise.
    fn readiness(&self) -> Result<(), &'static str>;
    /// Marks the process stopping: readiness fails from now on.
    fn set_stopping(&self);
}

/// `GET /healthz` and `GET /readyz`: 200 `ok`, or 503 with the reason.
pub fn router<P: Probes>(probes: Arc<P>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz::<P>))
        .route("/readyz", get(readyz::<P>))
        .with_state(probes)
}

async fn healthz<P: Probes>(State(probes): State<Arc<P>>) -> Response {
    answer(probes.health())
}

async fn readyz<P: Probes>(State(probes): State<Arc<P>>) -> Response {
    answer(probes.readiness())
}

fn answer(outcome: Result<(), &'static str>) -> Response {
    match outcome {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

/// Runs from readiness to shutdown: tells systemd (`Type=notify`) the service is ready, with
/// `status` as its status line; when the unit has `WatchdogSec=`, pings the watchdog while
/// [`Probes::health`] is `Ok` (when it is not, or the async runtime stalls, the pings stop and
/// systemd restarts the service); on shutdown marks the service stopping (`/readyz` answers
/// 503) and tells systemd. Without `NOTIFY_SOCKET` (not under systemd) only the stopping flag
/// changes. `what` names the service in logs ("agent", "aggregator").
pub async fn supervise<P: Probes>(
    probes: Arc<P>,
    what: &str,
    status: &str,
    mut shutdown: watch::Receiver<bool>,
) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    let mut watchdog = sd_notify::watchdog_enabled().map(|timeout| {
        let mut ticker = tokio::time::interval((timeout / 2).max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    });
    let mut logged = false;
    loop {
        tokio::select! {
            _ = tick(&mut watchdog) => match probes.health() {
                Ok(()) => notify(&[sd_notify::NotifyState::Watchdog]),
                Err(reason) if !logged => {
                    tracing::error!(reason, "unhealthy: no more watchdog pings, systemd will restart the {what}");
                    logged = true;
                }
                Err(_) => {}
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    probes.set_stopping();
    notify(&[sd_notify::NotifyState::Stopping]);
}

/// The next watchdog tick; never, without a watchdog.
async fn tick(watchdog: &mut Option<tokio::time::Interval>) {
    match watchdog {
        Some(ticker) => {
            ticker.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
