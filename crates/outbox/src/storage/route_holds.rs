//! The routes relays hold back (table `outbox_route_hold`, issue 19): written by the relay when the
//! broker refuses a route or the route recovers, read by `outbox status`. A relay's in-memory
//! holds decide what it claims; this table only shows them, so a failed write costs nothing but a
//! stale line in `status` (the relay logs it and writes again at the next change).

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::error::Result;
use crate::store::RouteHoldRow;

/// Replaces `relay_id`'s rows with `holds`, in one transaction.
pub async fn record(pool: &PgPool, relay_id: &str, holds: &[RouteHoldRow]) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM outbox_route_hold WHERE relay_id = $1")
        .bind(relay_id)
        .execute(&mut *tx)
        .await?;
    if !holds.is_empty() {
        let col = |f: fn(&RouteHoldRow) -> String| holds.iter().map(f).collect::<Vec<_>>();
        let routes = col(|h| h.route.clone());
        let errors = col(|h| h.last_error.clone());
        let refusals: Vec<i32> = holds.iter().map(|h| h.refusals).collect();
        let times = |f: fn(&RouteHoldRow) -> DateTime<Utc>| holds.iter().map(f).collect::<Vec<_>>();
        // Only while the relay's heartbeat row exists (the foreign key): a relay whose row was
        // reaped as dead writes nothing until its next lease round recreates it.
        sqlx::query(
            "INSERT INTO outbox_route_hold (relay_id, route, refusals, since, until, oldest_event_at, last_error)
             SELECT $1, u.* FROM unnest($2::text[], $3::int[], $4::timestamptz[], $5::timestamptz[],
                                        $6::timestamptz[], $7::text[]) AS u
             WHERE EXISTS (SELECT 1 FROM outbox_relay WHERE relay_id = $1)",
        )
        .bind(relay_id)
        .bind(&routes)
        .bind(&refusals)
        .bind(times(|h| h.since))
        .bind(times(|h| h.until))
        .bind(times(|h| h.oldest_event_at))
        .bind(&errors)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A route held back by a relay, for `outbox status`.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct RouteHold {
    /// The relay holding it back.
    pub relay_id: String,
    /// The routing key / subject.
    pub route: String,
    /// Refusals in a row.
    pub refusals: i32,
    /// First refusal in a row.
    pub since: DateTime<Utc>,
    /// When the relay tries the route again.
    pub until: DateTime<Utc>,
    /// Creation time of the oldest event it holds back.
    pub oldest_event_at: DateTime<Utc>,
    /// The broker's last refusal.
    pub last_error: String,
}

/// Every route a live relay holds back, oldest held event first.
pub async fn list(pool: &PgPool) -> Result<Vec<RouteHold>> {
    Ok(sqlx::query_as(
        "SELECT relay_id, route, refusals, since, until, oldest_event_at, last_error
         FROM outbox_route_hold ORDER BY oldest_event_at, route, relay_id",
    )
    .fetch_all(pool)
    .await?)
}
