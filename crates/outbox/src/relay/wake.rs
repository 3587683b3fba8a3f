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

/// Wakes the relays after producers' commits, from outside their transactions, at most once per
/// window: the alternative to the commit-time `pg_notify` of [`crate::Outbox::enqueue`] for
/// services with many concurrent writers.
///
/// Why: a transaction that notifies holds PostgreSQL's notification lock from its commit until
/// its commit record is flushed, so concurrent notifying commits are flushed one at a time
/// instead of together (`docs/benchmarks.md`, "notify on/off"). Here producers build their
/// [`crate::Outbox`] with `with_notify(false)` and call [`CommitNotifier::committed`] after each
/// commit that wrote events; one background task sends `pg_notify` on its own connection, at once
/// for the first commit and then at most once per window, always once more after the last
/// commit signalled. Every signalled commit is followed by a notification sent after it, so a
/// relay woken by it sees the commit's events. A failed notification is logged and dropped: the
/// relays' polling finds the events.
#[derive(Debug, Clone)]
pub struct CommitNotifier {
    signal: tokio::sync::mpsc::Sender<()>,
}

impl CommitNotifier {
    /// Starts the notifying task on `pool` (it ends when the last clone of the notifier is
    /// dropped). Must be called within a Tokio runtime.
    pub fn spawn(pool: PgPool, window: Duration) -> Self {
        // Capacity one: a signal that finds one pending is already covered by it.
        let (signal, mut pending) = tokio::sync::mpsc::channel::<()>(1);
        tokio::spawn(async move {
            while pending.recv().await.is_some() {
                if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
                    .bind(NOTIFY_CHANNEL)
                    .execute(&pool)
                    .await
                {
                    tracing::debug!(error = %e, "wake-up notification failed; relays will poll");
                }
                tokio::time::sleep(window).await;
            }
        });
        Self { signal }
    }

    /// Signals that a transaction which wrote events has committed. Never waits.
    pub fn committed(&self) {
        let _ = self.signal.try_send(());
    }
}
