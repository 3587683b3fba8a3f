//! The inbox in the consumer's database: which events were applied (per-aggregate position, or a
//! time-bounded event-id set for events without a sequence), the retry budget, and parked events.
//! Every statement here runs in the caller's transaction when it must commit with the handler.

use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::event::{InboundEvent, Position};
use crate::error::Result;

/// What the inbox says about an event before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Next in its aggregate (or unseen, without a sequence): the position is advanced in the
    /// transaction, run the handler and commit.
    Apply,
    /// Applied before: acknowledge without running the handler.
    Duplicate,
    /// An earlier event of the aggregate is not applied yet.
    Gap,
    /// An earlier event of the aggregate is parked: park this one behind it (a *later* parked
    /// event does not block an earlier one, which waits for its own predecessor as a gap).
    Blocked,
}

/// Claims `e` for `consumer` in `tx`: on [`Verdict::Apply`] the position (or seen id) is written
/// and the aggregate's position row stays locked until the transaction ends, so two deliveries of
/// one event can never both apply. `replaying`: the event is a parked row being replayed, which
/// must not count itself as the reason to park.
pub(crate) async fn claim(
    tx: &mut PgConnection,
    consumer: &str,
    e: &InboundEvent,
    replaying: bool,
) -> Result<Verdict> {
    let (Some(agg), Some(pos)) = (&e.aggregate, e.position) else {
        let fresh = sqlx::query(
            "INSERT INTO outbox_consumer_seen (consumer, event_id) VALUES ($1, $2)
             ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(e.event_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        return Ok(if fresh == 1 {
            Verdict::Apply
        } else {
            Verdict::Duplicate
        });
    };
    // One statement on the happy path: advance the position only if this event follows it.
    // The conflict branch locks the row even when its WHERE is false, which serialises deliveries
    // of one aggregate across consumer processes.
    let advanced = sqlx::query(
        "INSERT INTO outbox_consumer_position AS p
             (consumer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq)
         SELECT $1, $2, $3, $4, $5, $6
          WHERE $6 = 1 OR EXISTS (SELECT 1 FROM outbox_consumer_position
                                   WHERE consumer = $1 AND tenant_id = $2
                                     AND aggregate_type = $3 AND aggregate_id = $4)
         ON CONFLICT (consumer, tenant_id, aggregate_type, aggregate_id) DO UPDATE
            SET seq_epoch = EXCLUDED.seq_epoch, seq = EXCLUDED.seq, applied_at = now()
          WHERE (p.seq_epoch = EXCLUDED.seq_epoch AND p.seq + 1 = EXCLUDED.seq)
             OR (p.seq_epoch < EXCLUDED.seq_epoch AND EXCLUDED.seq = 1)",
    )
    .bind(consumer)
    .bind(&agg.tenant_id)
    .bind(&agg.aggregate_type)
    .bind(&agg.aggregate_id)
    .bind(pos.epoch)
    .bind(pos.seq)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if advanced == 1 {
        return Ok(Verdict::Apply);
    }
    let row = sqlx::query(
        "SELECT (SELECT seq_epoch FROM outbox_consumer_position
                  WHERE consumer = $1 AND tenant_id = $2 AND aggregate_type = $3 AND aggregate_id = $4) AS epoch,
                (SELECT seq FROM outbox_consumer_position
                  WHERE consumer = $1 AND tenant_id = $2 AND aggregate_type = $3 AND aggregate_id = $4) AS seq,
                EXISTS (SELECT 1 FROM outbox_consumer_dead_letter
                  WHERE consumer = $1 AND tenant_id = $2 AND aggregate_type = $3 AND aggregate_id = $4
                    AND (seq_epoch, seq) < ($5, $6)) AS blocked",
    )
    .bind(consumer)
    .bind(&agg.tenant_id)
    .bind(&agg.aggregate_type)
    .bind(&agg.aggregate_id)
    .bind(pos.epoch)
    .bind(pos.seq)
    .fetch_one(&mut *tx)
    .await?;
    let applied = match (
        row.try_get::<Option<i64>, _>("epoch")?,
        row.try_get::<Option<i64>, _>("seq")?,
    ) {
        (Some(epoch), Some(seq)) => Some(Position { epoch, seq }),
        _ => None,
    };
    if applied.is_some_and(|a| pos <= a) {
        return Ok(Verdict::Duplicate);
    }
    if !replaying && row.try_get::<bool, _>("blocked")? {
        return Ok(Verdict::Blocked);
    }
    Ok(Verdict::Gap)
}

/// Counts a handler failure of `event_id`; returns the attempts so far.
pub(crate) async fn record_failure(
    pool: &PgPool,
    consumer: &str,
    event_id: Uuid,
    error: &str,
) -> Result<i32> {
    let n: i32 = sqlx::query_scalar(
        "INSERT INTO outbox_consumer_attempt (consumer, event_id, attempts, last_error)
         VALUES ($1, $2, 1, $3)
         ON CONFLICT (consumer, event_id) DO UPDATE
            SET attempts = outbox_consumer_attempt.attempts + 1, last_error = $3, failed_at = now()
         RETURNING attempts",
    )
    .bind(consumer)
    .bind(event_id)
    .bind(error)
    .fetch_one(pool)
    .await?;
    Ok(n)
}

/// Forgets the failures of an event that has now been applied (in its transaction).
pub(crate) async fn clear_failures(
    tx: &mut PgConnection,
    consumer: &str,
    event_id: Uuid,
) -> Result<()> {
    sqlx::query("DELETE FROM outbox_consumer_attempt WHERE consumer = $1 AND event_id = $2")
        .bind(consumer)
        .bind(event_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Parks `e` with `reason` (and the last error); a second park of the same event is a no-op.
pub(crate) async fn park(
    pool: &PgPool,
    consumer: &str,
    e: &InboundEvent,
    reason: &str,
    last_error: Option<&str>,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    let agg = e.aggregate.as_ref();
    sqlx::query(
        "INSERT INTO outbox_consumer_dead_letter
             (consumer, event_id, event_type, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq,
              subject, headers, payload, reason, attempts, last_error)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                 COALESCE((SELECT attempts FROM outbox_consumer_attempt
                            WHERE consumer = $1 AND event_id = $2), 0), $13)
         ON CONFLICT (consumer, event_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(e.event_id)
    .bind(&e.event_type)
    .bind(agg.map(|a| &a.tenant_id))
    .bind(agg.map(|a| &a.aggregate_type))
    .bind(agg.map(|a| &a.aggregate_id))
    .bind(e.position.map(|p| p.epoch))
    .bind(e.position.map(|p| p.seq))
    .bind(&e.subject)
    .bind(serde_json::to_value(&e.headers)?)
    .bind(e.payload.as_ref())
    .bind(reason)
    .bind(last_error)
    .execute(&mut *tx)
    .await?;
    clear_failures(&mut tx, consumer, e.event_id).await?;
    tx.commit().await?;
    Ok(())
}

/// Deletes, in bounded batches, seen ids older than `retention` and attempt rows of events that
/// were never seen again; returns the rows deleted.
pub(crate) async fn cleanup(
    pool: &PgPool,
    consumer: &str,
    retention: std::time::Duration,
) -> Result<u64> {
    let secs = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM outbox_consumer_seen WHERE ctid IN (
                 SELECT ctid FROM outbox_consumer_seen
                  WHERE consumer = $1 AND seen_at < now() - make_interval(secs => $2)
                  LIMIT 1000 FOR UPDATE SKIP LOCKED)",
        )
        .bind(consumer)
        .bind(secs)
        .execute(pool)
        .await?
        .rows_affected();
        total += n;
        if n < 1000 {
            break;
        }
    }
    total += sqlx::query(
        "DELETE FROM outbox_consumer_attempt
          WHERE consumer = $1 AND failed_at < now() - make_interval(secs => $2)",
    )
    .bind(consumer)
    .bind(secs)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(total)
}
