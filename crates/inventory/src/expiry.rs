//! The background task that releases expired reservations (`RESERVATION_EXPIRED`).
//!
//! It runs in every service instance: `FOR UPDATE SKIP LOCKED` in [`crate::ops::sweep_expired`]
//! lets instances share the work without waiting on each other, and bounded batches keep each
//! transaction (and the variant locks it holds) short.

use std::time::Duration;

use crate::AppState;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::ApiResult;

/// Releases every reservation expired by now, in transactions of at most `batch`; returns how
/// many were released. The correlation id of its events is one per call.
pub async fn sweep(state: &AppState, batch: i64) -> ApiResult<usize> {
    let correlation = Uuid::now_v7().to_string();
    let mut total = 0;
    loop {
        let mut tx = state.pool.begin().await?;
        let n =
            crate::ops::sweep_expired(&mut tx, &state.outbox, batch.max(1), &correlation).await?;
        tx.commit().await?;
        if n > 0 {
            state.notifier.committed();
        }
        total += n;
        if (n as i64) < batch.max(1) {
            return Ok(total);
        }
    }
}

/// Sweeps every `interval` until `stop` is cancelled, and removes idempotency keys older than
/// `idempotency_ttl` on the same schedule. Failures (database down) are logged and retried at the
/// next tick: expiry is late, never lost.
pub async fn run(
    state: AppState,
    interval: Duration,
    batch: i64,
    idempotency_ttl: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sweep(&state, batch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released expired reservations"),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed; retrying at the next tick"),
        }
        match crate::idempotency::purge_expired(&state.pool, idempotency_ttl, 1000).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "removed expired idempotency keys"),
            Err(e) => {
                tracing::warn!(error = %e, "idempotency key purge failed; retrying at the next tick")
            }
        }
    }
}
