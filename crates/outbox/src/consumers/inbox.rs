//! The inbox in the consumer's database: which events were applied (per producer and aggregate a
//! position, or a time-bounded event-id set for events without a sequence), the retry budget,
//! events waiting for their predecessor, skips, and parked events. Every statement here runs in
//! the caller's transaction when it must commit with the handler.

use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::event::{AggregateKey, InboundEvent, Position};
use crate::error::Result;

/// What the inbox says about an event before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Next in its aggregate (or unseen, without a sequence): the position is advanced in the
    /// transaction, run the handler and commit.
    Apply,
    /// A producer's skip marker that is next in its aggregate: the position is advanced and the
    /// skip recorded in the transaction; commit without running the handler.
    Skip,
    /// Applied before: acknowledge without running the handler.
    Duplicate,
    /// At or below the position, but inside a range the position skipped (a start past the
    /// beginning, a purge) or below where the consumer started the aggregate (an old epoch of
    /// a compacted aggregate arriving after the new one): never applied here. Parked as `late`,
    /// never dropped as a duplicate.
    Late,
    /// An earlier event of the aggregate is not applied yet (or the event starts a new epoch,
    /// whose predecessor the consumer cannot know).
    Gap,
    /// An earlier event of the aggregate is parked: park this one behind it (a *later* parked
    /// event does not block an earlier one, which waits for its own predecessor as a gap).
    Blocked,
}

/// How [`claim`] may move a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Only to the next event.
    Next,
    /// A parked row being replayed: it must not count itself as the reason to park.
    Replay,
    /// Past a gap (the start policy, after the gap timeout, or an operator's `--accept-gap`),
    /// provided nothing earlier of the aggregate is still waiting, failing or parked; the skip is
    /// recorded with this reason.
    Start(&'static str),
}

/// Claims `e` for `consumer` in `tx`: on [`Verdict::Apply`] and [`Verdict::Skip`] the position
/// (or seen id) is written and the aggregate's position row stays locked until the transaction
/// ends, so two deliveries of one event can never both apply. `replaying`: `e` is its own parked
/// row being replayed; otherwise a delivery of an event that is parked (a consumer killed
/// between the park's commit and the acknowledgement gets it redelivered) is a
/// [`Verdict::Duplicate`]: the parked row is what an operator replays or purges.
pub(crate) async fn claim(
    tx: &mut PgConnection,
    consumer: &str,
    e: &InboundEvent,
    mode: Mode,
    replaying: bool,
) -> Result<Verdict> {
    let Some((agg, pos)) = e.sequenced() else {
        let fresh = sqlx::query(
            "INSERT INTO outbox_consumer_seen (consumer, event_id)
             SELECT $1, $2
              WHERE $3 OR NOT EXISTS (SELECT 1 FROM outbox_consumer_dead_letter
                                       WHERE consumer = $1 AND event_id = $2)
             ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(e.event_id)
        .bind(replaying)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        return Ok(if fresh == 1 {
            Verdict::Apply
        } else {
            Verdict::Duplicate
        });
    };
    let key = Key {
        consumer,
        producer: &e.producer,
        agg,
        event_id: e.event_id,
        replaying,
    };
    let next = if e.skip.is_some() {
        Verdict::Skip
    } else {
        Verdict::Apply
    };
    if advance(tx, &key, pos).await? {
        if let Some(reason) = &e.skip {
            let from = (pos.seq > 1).then_some(Position {
                epoch: pos.epoch,
                seq: pos.seq - 1,
            });
            record_skip(tx, &key, from, pos, reason, Some(e.event_id)).await?;
        }
        return Ok(next);
    }
    // Off the happy path: an aggregate whose position a relay older than `Outbox-Producer-Id`
    // wrote (producer '') becomes this producer's, once, and the event is tried again.
    if !e.producer.is_empty() && adopt_legacy(tx, &key).await? && advance(tx, &key, pos).await? {
        return Ok(next);
    }
    let q = sqlx::query(
        "SELECT p.seq_epoch, p.seq,
                (NOT $9 AND EXISTS (SELECT 1 FROM outbox_consumer_dead_letter s
                                     WHERE s.consumer = $1 AND s.event_id = $8)) AS parked_self,
                (p.start_seq IS NOT NULL AND ($6, $7) < (p.start_epoch, p.start_seq)) AS before_start,
                EXISTS (SELECT 1 FROM outbox_consumer_dead_letter d
                  WHERE d.consumer = $1 AND d.producer = $2 AND d.tenant_id = $3
                    AND d.aggregate_type = $4 AND d.aggregate_id = $5
                    AND (d.seq_epoch, d.seq) < ($6, $7) AND d.reason <> 'late') AS blocked,
                EXISTS (SELECT 1 FROM outbox_consumer_skip s
                  WHERE s.consumer = $1 AND s.producer = $2 AND s.tenant_id = $3
                    AND s.aggregate_type = $4 AND s.aggregate_id = $5
                    AND (s.from_epoch IS NULL OR (s.from_epoch, s.from_seq) < ($6, $7))
                    AND ($6, $7) < (s.to_epoch, s.to_seq)) AS skipped,
                EXISTS (SELECT 1 FROM outbox_consumer_gap g
                  WHERE g.consumer = $1 AND g.producer = $2 AND g.tenant_id = $3
                    AND g.aggregate_type = $4 AND g.aggregate_id = $5
                    AND (g.seq_epoch, g.seq) < ($6, $7)
                    AND (p.seq IS NULL OR (g.seq_epoch, g.seq) > (p.seq_epoch, p.seq)))
                OR EXISTS (SELECT 1 FROM outbox_consumer_attempt a
                  WHERE a.consumer = $1 AND a.producer = $2 AND a.tenant_id = $3
                    AND a.aggregate_type = $4 AND a.aggregate_id = $5
                    AND (a.seq_epoch, a.seq) < ($6, $7)
                    AND (p.seq IS NULL OR (a.seq_epoch, a.seq) > (p.seq_epoch, p.seq))) AS earlier
           FROM (SELECT 1) one
           LEFT JOIN outbox_consumer_position p
             ON p.consumer = $1 AND p.producer = $2 AND p.tenant_id = $3
            AND p.aggregate_type = $4 AND p.aggregate_id = $5",
    );
    let row = key.bind_at(q, pos).fetch_one(&mut *tx).await?;
    let applied = match (
        row.try_get::<Option<i64>, _>("seq_epoch")?,
        row.try_get::<Option<i64>, _>("seq")?,
    ) {
        (Some(epoch), Some(seq)) => Some(Position { epoch, seq }),
        _ => None,
    };
    if row.try_get::<bool, _>("parked_self")? {
        return Ok(Verdict::Duplicate);
    }
    if applied.is_some_and(|a| pos <= a) {
        return Ok(
            if row.try_get::<bool, _>("skipped")?
                || row
                    .try_get::<Option<bool>, _>("before_start")?
                    .unwrap_or(false)
            {
                Verdict::Late
            } else {
                Verdict::Duplicate
            },
        );
    }
    let blocked = row.try_get::<bool, _>("blocked")?;
    if blocked && mode != Mode::Replay {
        return Ok(Verdict::Blocked);
    }
    let Mode::Start(reason) = mode else {
        return Ok(Verdict::Gap);
    };
    // A start past a gap may not overtake anything earlier of the aggregate that is still
    // coming: a parked event, one being retried, one waiting for its own predecessor.
    if blocked || row.try_get::<bool, _>("earlier")? {
        return Ok(Verdict::Gap);
    }
    force(tx, &key, pos).await?;
    record_skip(tx, &key, applied, pos, reason, Some(e.event_id)).await?;
    if let Some(skip) = &e.skip {
        record_skip(tx, &key, applied, pos, skip, Some(e.event_id)).await?;
    }
    Ok(next)
}

/// An aggregate of one producer, as one consumer keeps it.
struct Key<'a> {
    consumer: &'a str,
    producer: &'a str,
    agg: &'a AggregateKey,
    /// The event claimed (`$8`), and whether it is its own parked row being replayed (`$9`).
    event_id: Uuid,
    replaying: bool,
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl<'a> Key<'a> {
    /// Binds `$1`..`$5` to the key, `$6`, `$7` to `pos`, `$8`, `$9` to the event and whether
    /// it is being replayed.
    fn bind_at<'q>(&self, q: PgQuery<'q>, pos: Position) -> PgQuery<'q>
    where
        'a: 'q,
    {
        q.bind(self.consumer)
            .bind(self.producer)
            .bind(&self.agg.tenant_id)
            .bind(&self.agg.aggregate_type)
            .bind(&self.agg.aggregate_id)
            .bind(pos.epoch)
            .bind(pos.seq)
            .bind(self.event_id)
            .bind(self.replaying)
    }
}

/// The happy path, one statement: advances the position if `pos` follows it (the next seq of its
/// epoch, or seq 1 of an aggregate never seen). The conflict branch locks the row even when its
/// WHERE is false, which serialises deliveries of one aggregate across consumer processes. A new
/// epoch is never taken here: its predecessor's last seq is unknown to the consumer, so it is a
/// gap (see the start policy).
async fn advance(tx: &mut PgConnection, k: &Key<'_>, pos: Position) -> Result<bool> {
    let q = sqlx::query(
        "INSERT INTO outbox_consumer_position AS p
             (consumer, producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq,
              start_epoch, start_seq)
         SELECT $1, $2, $3, $4, $5, $6, $7, $6, $7
          -- Not a redelivery of an event parked meanwhile (one probe of a unique index).
          WHERE ($9 OR NOT EXISTS (SELECT 1 FROM outbox_consumer_dead_letter
                                    WHERE consumer = $1 AND event_id = $8))
            AND (($7 = 1
                 -- An aggregate unknown here starts at seq 1 only if nothing of it is parked or
                 -- failing (seq 1 of a later epoch must not pass an earlier epoch's event).
                 AND NOT EXISTS (SELECT 1 FROM outbox_consumer_dead_letter d
                      WHERE d.consumer = $1 AND d.producer = $2 AND d.tenant_id = $3
                        AND d.aggregate_type = $4 AND d.aggregate_id = $5
                        AND (d.seq_epoch, d.seq) < ($6, $7) AND d.reason <> 'late')
                 AND NOT EXISTS (SELECT 1 FROM outbox_consumer_attempt a
                      WHERE a.consumer = $1 AND a.producer = $2 AND a.tenant_id = $3
                        AND a.aggregate_type = $4 AND a.aggregate_id = $5
                        AND (a.seq_epoch, a.seq) < ($6, $7)))
             OR EXISTS (SELECT 1 FROM outbox_consumer_position
                         WHERE consumer = $1 AND producer = $2 AND tenant_id = $3
                           AND aggregate_type = $4 AND aggregate_id = $5))
         ON CONFLICT (consumer, producer, tenant_id, aggregate_type, aggregate_id) DO UPDATE
            SET seq = EXCLUDED.seq, applied_at = now()
          WHERE p.seq_epoch = EXCLUDED.seq_epoch AND p.seq + 1 = EXCLUDED.seq",
    );
    let n = k.bind_at(q, pos).execute(&mut *tx).await?.rows_affected();
    Ok(n == 1)
}

/// Moves the position to `pos` (a start past a gap; the caller checked it is ahead).
async fn force(tx: &mut PgConnection, k: &Key<'_>, pos: Position) -> Result<()> {
    let q = sqlx::query(
        "INSERT INTO outbox_consumer_position AS p
             (consumer, producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq,
              start_epoch, start_seq)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $7)
         ON CONFLICT (consumer, producer, tenant_id, aggregate_type, aggregate_id) DO UPDATE
            SET seq_epoch = EXCLUDED.seq_epoch, seq = EXCLUDED.seq, applied_at = now()
          WHERE (p.seq_epoch, p.seq) < (EXCLUDED.seq_epoch, EXCLUDED.seq)",
    );
    k.bind_at(q, pos).execute(&mut *tx).await?;
    Ok(())
}

/// Gives an aggregate's legacy position (producer '') to `k.producer`, unless that producer has
/// one already. Returns whether a row was adopted.
async fn adopt_legacy(tx: &mut PgConnection, k: &Key<'_>) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE outbox_consumer_position SET producer = $2
          WHERE consumer = $1 AND producer = '' AND tenant_id = $3 AND aggregate_type = $4
            AND aggregate_id = $5
            AND NOT EXISTS (SELECT 1 FROM outbox_consumer_position
                             WHERE consumer = $1 AND producer = $2 AND tenant_id = $3
                               AND aggregate_type = $4 AND aggregate_id = $5)",
    )
    .bind(k.consumer)
    .bind(k.producer)
    .bind(&k.agg.tenant_id)
    .bind(&k.agg.aggregate_type)
    .bind(&k.agg.aggregate_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    Ok(n == 1)
}

async fn record_skip(
    tx: &mut PgConnection,
    k: &Key<'_>,
    from: Option<Position>,
    to: Position,
    reason: &str,
    event_id: Option<Uuid>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO outbox_consumer_skip (consumer, producer, tenant_id, aggregate_type,
             aggregate_id, from_epoch, from_seq, to_epoch, to_seq, reason, event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(k.consumer)
    .bind(k.producer)
    .bind(&k.agg.tenant_id)
    .bind(&k.agg.aggregate_type)
    .bind(&k.agg.aggregate_id)
    .bind(from.map(|p| p.epoch))
    .bind(from.map(|p| p.seq))
    .bind(to.epoch)
    .bind(to.seq)
    .bind(reason)
    .bind(event_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Records that `e` waits for its predecessor (the broker redelivers it meanwhile) and returns
/// whether it has waited `timeout` since it was first seen so, by any process of the consumer.
pub(crate) async fn note_gap(
    pool: &PgPool,
    consumer: &str,
    e: &InboundEvent,
    timeout: std::time::Duration,
) -> Result<bool> {
    let Some((agg, pos)) = e.sequenced() else {
        return Ok(true);
    };
    let due: bool = sqlx::query_scalar(
        "INSERT INTO outbox_consumer_gap AS g (consumer, event_id, producer, tenant_id,
             aggregate_type, aggregate_id, seq_epoch, seq)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (consumer, event_id) DO UPDATE SET last_seen_at = now()
         RETURNING g.first_seen_at <= now() - make_interval(secs => $9)",
    )
    .bind(consumer)
    .bind(e.event_id)
    .bind(text(&e.producer))
    .bind(text(&agg.tenant_id))
    .bind(text(&agg.aggregate_type))
    .bind(text(&agg.aggregate_id))
    .bind(pos.epoch)
    .bind(pos.seq)
    .bind(timeout.as_secs_f64())
    .fetch_one(pool)
    .await?;
    Ok(due)
}

/// Deletes gap rows whose wait is over: the position reached them, they were parked, or they
/// have not been delivered for `stale` (the message is gone from the broker). Bounded per call.
pub(crate) async fn prune_gaps(
    pool: &PgPool,
    consumer: &str,
    stale: std::time::Duration,
) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM outbox_consumer_gap WHERE ctid IN (
             SELECT g.ctid FROM outbox_consumer_gap g
              WHERE g.consumer = $1
                AND (g.last_seen_at < now() - make_interval(secs => $2)
                     OR EXISTS (SELECT 1 FROM outbox_consumer_position p
                                 WHERE p.consumer = g.consumer AND p.producer = g.producer
                                   AND p.tenant_id = g.tenant_id
                                   AND p.aggregate_type = g.aggregate_type
                                   AND p.aggregate_id = g.aggregate_id
                                   AND (p.seq_epoch, p.seq) >= (g.seq_epoch, g.seq))
                     OR EXISTS (SELECT 1 FROM outbox_consumer_dead_letter d
                                 WHERE d.consumer = g.consumer AND d.event_id = g.event_id))
              LIMIT 1000)",
    )
    .bind(consumer)
    .bind(stale.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// What a consumer's database says of it now: parked events per reason, aggregates waiting in a
/// gap, and the oldest such wait in seconds.
pub(crate) async fn state(pool: &PgPool, consumer: &str) -> Result<(Vec<(String, i64)>, i64, f64)> {
    let parked: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reason, count(*) FROM outbox_consumer_dead_letter WHERE consumer = $1
          GROUP BY reason",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await?;
    let (aggregates, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(DISTINCT (g.producer, g.tenant_id, g.aggregate_type, g.aggregate_id)),
                EXTRACT(EPOCH FROM now() - min(g.first_seen_at))::float8
           FROM outbox_consumer_gap g
          WHERE g.consumer = $1
            AND NOT EXISTS (SELECT 1 FROM outbox_consumer_position p
                             WHERE p.consumer = g.consumer AND p.producer = g.producer
                               AND p.tenant_id = g.tenant_id AND p.aggregate_type = g.aggregate_type
                               AND p.aggregate_id = g.aggregate_id
                               AND (p.seq_epoch, p.seq) >= (g.seq_epoch, g.seq))
            AND NOT EXISTS (SELECT 1 FROM outbox_consumer_dead_letter d
                             WHERE d.consumer = g.consumer AND d.event_id = g.event_id)",
    )
    .bind(consumer)
    .fetch_one(pool)
    .await?;
    Ok((parked, aggregates, oldest.unwrap_or(0.0).max(0.0)))
}

/// Counts a failure of `e` (its handler's, or a data error of its inbox statements); returns the
/// attempts so far.
pub(crate) async fn record_failure(
    pool: &PgPool,
    consumer: &str,
    e: &InboundEvent,
    error: &str,
) -> Result<i32> {
    let agg = e.aggregate.as_ref().filter(|_| e.position.is_some());
    let n: i32 = sqlx::query_scalar(
        "INSERT INTO outbox_consumer_attempt (consumer, event_id, attempts, last_error, producer,
             tenant_id, aggregate_type, aggregate_id, seq_epoch, seq)
         VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (consumer, event_id) DO UPDATE
            SET attempts = outbox_consumer_attempt.attempts + 1, last_error = $3, failed_at = now()
         RETURNING attempts",
    )
    .bind(consumer)
    .bind(e.event_id)
    .bind(text(error))
    .bind(agg.map(|_| text(&e.producer)))
    .bind(agg.map(|a| text(&a.tenant_id)))
    .bind(agg.map(|a| text(&a.aggregate_type)))
    .bind(agg.map(|a| text(&a.aggregate_id)))
    .bind(e.position.map(|p| p.epoch))
    .bind(e.position.map(|p| p.seq))
    .fetch_one(pool)
    .await?;
    Ok(n)
}

/// Forgets the failures of an event (parked now, or applied).
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

/// A text column's value: PostgreSQL's text cannot hold NUL, which a broker header can, so NUL
/// becomes U+FFFD there. The exact headers are kept beside it (`headers_raw`).
fn text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Parks `e` with `reason` (and the last error); a second park of the same event is a no-op. The
/// headers are stored exactly (as JSON bytes), whatever they hold, so that parking never fails on
/// the value that made the event fail.
pub(crate) async fn park(
    pool: &PgPool,
    consumer: &str,
    e: &InboundEvent,
    reason: &str,
    last_error: Option<&str>,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    let agg = e.aggregate.as_ref();
    let raw = serde_json::to_vec(&e.headers)?;
    // JSONB for operators' queries where it can hold them; NULL when a value has a NUL.
    let json = (!raw.windows(6).any(|w| w == b"\\u0000"))
        .then(|| serde_json::to_value(&e.headers))
        .transpose()?;
    sqlx::query(
        "INSERT INTO outbox_consumer_dead_letter
             (consumer, event_id, event_type, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq,
              subject, headers, headers_raw, payload, reason, attempts, last_error, producer)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                 COALESCE((SELECT attempts FROM outbox_consumer_attempt
                            WHERE consumer = $1 AND event_id = $2), 0), $14, $15)
         ON CONFLICT (consumer, event_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(e.event_id)
    .bind(e.event_type.as_deref().map(text))
    .bind(agg.map(|a| text(&a.tenant_id)))
    .bind(agg.map(|a| text(&a.aggregate_type)))
    .bind(agg.map(|a| text(&a.aggregate_id)))
    .bind(e.position.map(|p| p.epoch))
    .bind(e.position.map(|p| p.seq))
    .bind(text(&e.subject))
    .bind(json)
    .bind(raw)
    .bind(e.payload.as_ref())
    .bind(reason)
    .bind(last_error.map(text))
    .bind(text(&e.producer))
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
