//! Watching the in-process relay. Decision (issue 10): if the relay task ends while the service is
//! not shutting down, by error or by panic, the service does not go on committing events that
//! nobody delivers. It logs the cause, reports it (`/healthz` and `/readyz` answer 503, the gauge
//! `inventory_relay_up` drops to 0), stops the HTTP API gracefully and exits non-zero, so that
//! its supervisor (systemd, Kubernetes) restarts it with a fresh relay. Restarting the relay
//! inside the process was rejected: a relay that panicked on a row would panic again, and the
//! restart loop would hide the failure from the supervisor's restart counters and alerts.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Gauge: 1 while the in-process relay runs, 0 once it has ended.
pub const RELAY_UP: &str = "inventory_relay_up";

/// Whether the in-process relay has died; shared with the health endpoints.
#[derive(Debug, Default)]
pub struct RelayState {
    failed: AtomicBool,
}

impl RelayState {
    /// True once the relay task ended without being asked to stop.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// How the relay task ended when it should not have.
#[derive(Debug, thiserror::Error)]
pub enum RelayEnded {
    /// It returned an error.
    #[error("the in-process relay failed: {0}")]
    Failed(String),
    /// It panicked.
    #[error("the in-process relay panicked: {0}")]
    Panicked(String),
    /// It returned Ok although nobody asked it to stop.
    #[error("the in-process relay stopped on its own")]
    Returned,
}

/// Waits for the relay task. When it ends while `stop` is not cancelled, marks `state` failed,
/// sets the gauge to 0, logs, cancels `stop` (the service shuts down) and returns why; an end
/// after `stop` was cancelled is a normal shutdown, unless the task failed on the way.
pub async fn supervise_relay<E: Display>(
    handle: JoinHandle<Result<(), E>>,
    stop: CancellationToken,
    state: Arc<RelayState>,
) -> Result<(), RelayEnded> {
    metrics::gauge!(RELAY_UP).set(1.0);
    let ended = match handle.await {
        Ok(Ok(())) if stop.is_cancelled() => None,
        Ok(Ok(())) => Some(RelayEnded::Returned),
        Ok(Err(e)) => Some(RelayEnded::Failed(format!("{e:#}"))),
        Err(join) => Some(RelayEnded::Panicked(panic_message(join))),
    };
    metrics::gauge!(RELAY_UP).set(0.0);
    let Some(ended) = ended else { return Ok(()) };
    state.failed.store(true, Ordering::Relaxed);
    tracing::error!(error = %ended, "events are no longer delivered; shutting the service down so that its supervisor restarts it");
    stop.cancel();
    Err(ended)
}

fn panic_message(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_relay_stops_the_service_and_is_reported() {
        let stop = CancellationToken::new();
        let state = Arc::new(RelayState::default());
        let handle: JoinHandle<Result<(), String>> =
            tokio::spawn(async { panic!("header value contains a newline") });
        let got = supervise_relay(handle, stop.clone(), state.clone()).await;
        assert!(
            matches!(&got, Err(RelayEnded::Panicked(m)) if m.contains("newline")),
            "{got:?}"
        );
        assert!(stop.is_cancelled(), "the service is asked to stop");
        assert!(state.failed(), "health reports the failure");
    }

    #[tokio::test]
    async fn a_failing_relay_stops_the_service() {
        let stop = CancellationToken::new();
        let state = Arc::new(RelayState::default());
        let handle = tokio::spawn(async { Err::<(), _>("broker setup failed") });
        let got = supervise_relay(handle, stop.clone(), state.clone()).await;
        assert!(matches!(&got, Err(RelayEnded::Failed(m)) if m.contains("broker")));
        assert!(stop.is_cancelled() && state.failed());
    }

    #[tokio::test]
    async fn a_relay_stopped_by_shutdown_is_fine() {
        let stop = CancellationToken::new();
        let state = Arc::new(RelayState::default());
        let s = stop.clone();
        let handle = tokio::spawn(async move {
            s.cancelled().await;
            Ok::<(), String>(())
        });
        stop.cancel();
        assert!(supervise_relay(handle, stop, state.clone()).await.is_ok());
        assert!(!state.failed());
    }
}
