//! Health and readiness: the `/healthz` and `/readyz` endpoints and the systemd supervision
//! loop (`Type=notify` readiness, watchdog pings while healthy, stopping), over what a binary
//! says of itself through [`Probes`]. Reads state, changes none but the stopping flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

/// Where a service is in its life: starting, ready, stopping. Part of every readiness answer.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Set once every component is up.
    ready: AtomicBool,
    /// Set when shutdown begins: a load balancer should stop sending traffic.
    stopping: AtomicBool,
}

impl Lifecycle {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// `Err("shutting down")` once stopping, `Err("starting")` before ready, else `Ok`.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("shutting down");
        }
        if !self.ready.load(Ordering::Relaxed) {
            return Err("starting");
        }
        Ok(())
    }
}

/// What a service says of itself.
pub trait Probes: Send + Sync + 'static {
    /// `Ok` while the process can do its work; the reason otherwise. Watchdog pings stop while
    /// it is not, so systemd restarts the service.
    fn health(&self) -> Result<(), &'static str>;
    /// Its starting / ready / stopping state.
    fn lifecycle(&self) -> &Lifecycle;
    /// `Ok` when the process takes traffic; the reason otherwise. By default: healthy, and
    /// the [`Lifecycle`] says ready and not stopping.
    fn readiness(&self) -> Result<(), &'static str> {
        self.health()?;
        self.lifecycle().check()
    }
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
    probes.lifecycle().set_stopping();
    notify(&[sd_notify::NotifyState::Stopping]);
}

/// Startup work that may outlast the unit's start timeout (converting a data directory): shows
/// `status` in `systemctl status` and asks systemd for `more` time before it gives up on the
/// start. A no-op outside systemd.
pub fn extend_startup(status: &str, more: Duration) {
    let usec = u32::try_from(more.as_micros()).unwrap_or(u32::MAX);
    notify(&[
        sd_notify::NotifyState::Status(status),
        sd_notify::NotifyState::ExtendTimeoutUsec(usec),
    ]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_starts_then_is_ready_then_stops() {
        let lifecycle = Lifecycle::default();
        assert_eq!(lifecycle.check(), Err("starting"));
        lifecycle.set_ready();
        assert_eq!(lifecycle.check(), Ok(()));
        lifecycle.set_stopping();
        assert_eq!(lifecycle.check(), Err("shutting down"));
    }
}
