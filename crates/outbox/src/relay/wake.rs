//! Waking the relay when a producer commits (PostgreSQL `LISTEN`), with polling as the fallback.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::enqueue::NOTIFY_CHANNEL;

/// Listens on the outbox channel and wakes `notify` for every notification. Runs until `stop`;
/// on a lost connection it reconnects and wakes the relay once, since notifications sent while
/// disconnected are gone (the relay's poll would find them later anyway).
pub async fn listen(pool: PgPool, notify: Arc<Notify>, stop: CancellationToken) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "LISTEN connection failed; relying on polling");
                if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
            tracing::debug!(error = %e, "LISTEN failed; relying on polling");
            if sleep_or_stop(&stop, Duration::from_secs(1)).await {
                return;
            }
            continue;
        }
        notify.notify_one();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => notify.notify_one(),
                    // The connection dropped; reconnect on the next turn of the outer loop.
                    Ok(None) | Err(_) => break,
                },
            }
        }
    }
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
