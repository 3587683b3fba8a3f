//! Parked events of a consumer, for operators: list them, ask the running consumer to replay
//! them (audited in `outbox_audit` as for the relay's dead letters), purge them.
//!
//! Replay does not go back through the broker: the consumer process applies the stored message
//! itself (it has the handler), per aggregate in (`seq_epoch`, `seq`) order, together with the
//! events parked behind it.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::event::{AggregateKey, InboundEvent, Position};
use crate::error::{OutboxError, Result};

/// A parked event, as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedEvent {
    /// Row id.
    pub id: i64,
    /// Consumer that parked it.
    pub consumer: String,
    /// Its `eventId`.
    pub event_id: Uuid,
    /// Its producer (`Outbox-Producer-Id`; empty when the producer sent none).
    pub producer: String,
    /// Its type, if sent.
    pub event_type: Option<String>,
    /// Tenant, if sent.
    pub tenant_id: Option<String>,
    /// Aggregate type, if sent.
    pub aggregate_type: Option<String>,
    /// Aggregate id, if sent.
    pub aggregate_id: Option<String>,
    /// Sequence epoch, if sent.
    pub seq_epoch: Option<i64>,
    /// Sequence, if sent.
    pub seq: Option<i64>,
    /// `handler`, `gap`, `held` (behind a parked event of its aggregate), `unreadable`, or `late`
    /// (arrived after its aggregate's position was moved past it: never applied; purge it).
    pub reason: String,
    /// Handler failures before it was parked.
    pub attempts: i32,
    /// The last error.
    pub last_error: Option<String>,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
    /// When an operator asked for a replay the consumer has not finished yet.
    pub replay_requested_at: Option<DateTime<Utc>>,
    /// The replay asked for accepts the gap before it (`--accept-gap`).
    pub accept_gap: bool,
}

/// Which parked events an operator command applies to.
#[derive(Debug, Clone, Default)]
pub struct ParkedFilter {
    /// Only this consumer.
    pub consumer: Option<String>,
    /// Only this event.
    pub event_id: Option<Uuid>,
    /// Only this tenant.
    pub tenant_id: Option<String>,
    /// Only this reason.
    pub reason: Option<String>,
    /// Only this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only this aggregate id.
    pub aggregate_id: Option<String>,
    /// Only this failure group (`outbox_error_group(last_error)`: reason code and normalized
    /// message, the console's grouping).
    pub error_group: Option<String>,
    /// Parked at or after.
    pub since: Option<DateTime<Utc>>,
    /// Parked before.
    pub until: Option<DateTime<Utc>>,
    /// Parked at or before this moment (a dry run's time: what was parked after it was shown is
    /// left out).
    pub as_of: Option<DateTime<Utc>>,
}

impl ParkedFilter {
    /// True when no condition is set (the filter would mean every parked event).
    pub fn is_empty(&self) -> bool {
        self.consumer.is_none()
            && self.event_id.is_none()
            && self.tenant_id.is_none()
            && self.reason.is_none()
            && self.aggregate_type.is_none()
            && self.aggregate_id.is_none()
            && self.error_group.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }
}

/// The filter's conditions, `$1`..`$10` (see [`bind`]).
const WHERE: &str = "($1::text IS NULL OR consumer = $1) AND ($2::uuid IS NULL OR event_id = $2)
     AND ($3::text IS NULL OR tenant_id = $3) AND ($4::text IS NULL OR reason = $4)
     AND ($5::text IS NULL OR aggregate_type = $5) AND ($6::text IS NULL OR aggregate_id = $6)
     AND ($7::text IS NULL OR outbox_error_group(last_error) = $7)
     AND ($8::timestamptz IS NULL OR parked_at >= $8) AND ($9::timestamptz IS NULL OR parked_at < $9)
     AND ($10::timestamptz IS NULL OR parked_at <= $10)";
/// [`WHERE`] over the alias `g`.
const WHERE_G: &str = "($1::text IS NULL OR g.consumer = $1) AND ($2::uuid IS NULL OR g.event_id = $2)
     AND ($3::text IS NULL OR g.tenant_id = $3) AND ($4::text IS NULL OR g.reason = $4)
     AND ($5::text IS NULL OR g.aggregate_type = $5) AND ($6::text IS NULL OR g.aggregate_id = $6)
     AND ($7::text IS NULL OR outbox_error_group(g.last_error) = $7)
     AND ($8::timestamptz IS NULL OR g.parked_at >= $8) AND ($9::timestamptz IS NULL OR g.parked_at < $9)
     AND ($10::timestamptz IS NULL OR g.parked_at <= $10)";

fn bind<'q, Q: Bindable<'q>>(q: Q, f: &'q ParkedFilter) -> Q {
    q.bind(&f.consumer)
        .bind(f.event_id)
        .bind(&f.tenant_id)
        .bind(&f.reason)
        .bind(&f.aggregate_type)
        .bind(&f.aggregate_id)
        .bind(&f.error_group)
        .bind(f.since)
        .bind(f.until)
        .bind(f.as_of)
}

/// A query taking the filter's parameters.
trait Bindable<'q>: Sized {
    fn bind<T>(self, v: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send;
}

impl<'q> Bindable<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind<T>(self, v: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
    {
        sqlx::query::Query::bind(self, v)
    }
}

impl<'q, O> Bindable<'q>
    for sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>
{
    fn bind<T>(self, v: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
    {
        sqlx::query::QueryScalar::bind(self, v)
    }
}

/// Parked events matching `filter`, oldest first, at most `limit`.
pub async fn list(pool: &PgPool, filter: &ParkedFilter, limit: i64) -> Result<Vec<ParkedEvent>> {
    let sql = format!(
        "SELECT id, consumer, event_id, producer, event_type, tenant_id, aggregate_type,
                aggregate_id, seq_epoch, seq, reason, attempts, last_error, parked_at,
                replay_requested_at, accept_gap
           FROM outbox_consumer_dead_letter WHERE {WHERE} ORDER BY id LIMIT $11"
    );
    let rows = bind(sqlx::query(&sql), filter)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(ParkedEvent {
                id: r.try_get("id")?,
                consumer: r.try_get("consumer")?,
                event_id: r.try_get("event_id")?,
                producer: r.try_get("producer")?,
                event_type: r.try_get("event_type")?,
                tenant_id: r.try_get("tenant_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                seq_epoch: r.try_get("seq_epoch")?,
                seq: r.try_get("seq")?,
                reason: r.try_get("reason")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                parked_at: r.try_get("parked_at")?,
                replay_requested_at: r.try_get("replay_requested_at")?,
                accept_gap: r.try_get("accept_gap")?,
            })
        })
        .collect()
}

/// How many parked events match `filter`: an action's dry run.
pub async fn count(pool: &PgPool, filter: &ParkedFilter) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM outbox_consumer_dead_letter WHERE {WHERE}");
    Ok(bind(sqlx::query_scalar(&sql), filter)
        .fetch_one(pool)
        .await?)
}

/// Asks the running consumer(s) to apply the matching parked events again (the events parked
/// behind them in their aggregates follow), and records who asked. Returns the event ids.
/// `accept_gap`: apply them even though events before them never arrived (a parked `gap`: the
/// aggregate starts there; the skip is recorded in `outbox_consumer_skip`), provided nothing
/// earlier of the aggregate is still parked, waiting or being retried.
pub async fn request_replay(
    pool: &PgPool,
    filter: &ParkedFilter,
    actor: &str,
    accept_gap: bool,
) -> Result<Vec<Uuid>> {
    let (action, change) = if accept_gap {
        (
            "consumer_replay_accept_gap",
            "UPDATE outbox_consumer_dead_letter SET replay_requested_at = now(), accept_gap = true",
        )
    } else {
        (
            "consumer_replay",
            "UPDATE outbox_consumer_dead_letter SET replay_requested_at = now()",
        )
    };
    act(pool, filter, actor, action, change).await
}

/// Skips the matching parked events for good: they are deleted and never applied, and their
/// aggregates' positions move past them (recorded in `outbox_consumer_skip`), so the events
/// parked behind them (and later ones) are applied next. Refused, naming them, when an earlier
/// parked event of one of their aggregates would stay parked: moving the position past it would
/// make it look applied. Records who did it. Returns the event ids.
pub async fn purge(pool: &PgPool, filter: &ParkedFilter, actor: &str) -> Result<Vec<Uuid>> {
    act(pool, filter, actor, "consumer_purge", "PURGE").await
}

async fn act(
    pool: &PgPool,
    filter: &ParkedFilter,
    actor: &str,
    action: &str,
    change: &str,
) -> Result<Vec<Uuid>> {
    if filter.is_empty() {
        return Err(OutboxError::Config(
            "name what to act on: --consumer, --event-id, --tenant or --reason".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    if change == "PURGE" {
        let left: Vec<Uuid> = bind(
            sqlx::query_scalar(&format!(
                "SELECT e.event_id FROM outbox_consumer_dead_letter e
                  WHERE e.reason <> 'late' AND e.seq IS NOT NULL AND NOT ({WHERE})
                    AND EXISTS (SELECT 1 FROM outbox_consumer_dead_letter g
                                 WHERE {WHERE_G} AND g.seq IS NOT NULL AND g.consumer = e.consumer
                                   AND g.producer = e.producer AND g.tenant_id = e.tenant_id
                                   AND g.aggregate_type = e.aggregate_type
                                   AND g.aggregate_id = e.aggregate_id
                                   AND (e.seq_epoch, e.seq) < (g.seq_epoch, g.seq))
                  LIMIT 10"
            )),
            filter,
        )
        .fetch_all(&mut *tx)
        .await?;
        if !left.is_empty() {
            return Err(OutboxError::Config(format!(
                "an earlier parked event of the same aggregate would stay parked while the \
                 position moves past it: {left:?}; purge or replay those first (or include them)"
            )));
        }
    }
    let sql = if change == "PURGE" {
        format!(
            "WITH gone AS (DELETE FROM outbox_consumer_dead_letter WHERE {WHERE} RETURNING *),
             last AS (
                 SELECT DISTINCT ON (consumer, producer, tenant_id, aggregate_type, aggregate_id)
                        consumer, producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq,
                        event_id
                   FROM gone WHERE aggregate_id IS NOT NULL AND seq IS NOT NULL AND reason <> 'late'
                  ORDER BY consumer, producer, tenant_id, aggregate_type, aggregate_id,
                           seq_epoch DESC, seq DESC),
             before AS (
                 SELECT l.*, p.seq_epoch AS from_epoch, p.seq AS from_seq FROM last l
                   LEFT JOIN outbox_consumer_position p
                     ON p.consumer = l.consumer AND p.producer = l.producer
                    AND p.tenant_id = l.tenant_id AND p.aggregate_type = l.aggregate_type
                    AND p.aggregate_id = l.aggregate_id
                  WHERE p.seq IS NULL OR (p.seq_epoch, p.seq) < (l.seq_epoch, l.seq)),
             skipped AS (
                 INSERT INTO outbox_consumer_skip (consumer, producer, tenant_id, aggregate_type,
                        aggregate_id, from_epoch, from_seq, to_epoch, to_seq, reason, event_id)
                 SELECT consumer, producer, tenant_id, aggregate_type, aggregate_id, from_epoch,
                        from_seq, seq_epoch, seq, 'consumer_purge', event_id FROM before),
             moved AS (
                 INSERT INTO outbox_consumer_position AS p
                        (consumer, producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq)
                 SELECT consumer, producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq
                   FROM before
                 ON CONFLICT (consumer, producer, tenant_id, aggregate_type, aggregate_id) DO UPDATE
                    SET seq_epoch = EXCLUDED.seq_epoch, seq = EXCLUDED.seq, applied_at = now()
                  WHERE (p.seq_epoch, p.seq) < (EXCLUDED.seq_epoch, EXCLUDED.seq))
             SELECT event_id FROM gone"
        )
    } else {
        format!("{change} WHERE {WHERE} RETURNING event_id")
    };
    let ids: Vec<Uuid> = bind(sqlx::query(&sql), filter)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get("event_id"))
        .collect::<std::result::Result<_, _>>()?;
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO outbox_audit (action, actor, event_ids, detail) VALUES ($1, $2, $3, $4)",
        )
        .bind(action)
        .bind(actor)
        .bind(&ids)
        .bind(serde_json::json!({ "count": ids.len(), "consumer": filter.consumer }))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// A parked row loaded back as the event it was.
pub(crate) struct Stored {
    pub id: i64,
    pub requested: bool,
    pub accept_gap: bool,
    /// How long it has been parked.
    pub parked_for: std::time::Duration,
    pub event: InboundEvent,
}

/// Aggregates whose requested replays one pass takes on; more are left for the next pass, which
/// follows at once.
pub(crate) const REQUESTS_PER_PASS: i64 = 100;
/// Waiting aggregates (earliest parked event `held` or `gap`) one pass looks at, from where the
/// last pass stopped.
pub(crate) const WAITING_PER_PASS: i64 = 100;
/// Parked events of one aggregate one pass applies; an aggregate with more continues in the
/// next pass, which follows at once.
pub(crate) const ROWS_PER_AGGREGATE: i64 = 100;

/// What the replayer looks at: an aggregate (its parked events, in order) or a single parked
/// event without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Candidate {
    /// Every parked event of this aggregate, in (`seq_epoch`, `seq`) order.
    Aggregate(Keyed),
    /// This parked row alone.
    Single(i64),
}

/// An aggregate of one producer.
pub(crate) type Keyed = (String, AggregateKey);

/// Aggregates whose earliest parked event an operator asked to replay, and requested events
/// without an aggregate: oldest request first, at most `limit`.
pub(crate) async fn requested(pool: &PgPool, consumer: &str, limit: i64) -> Result<Vec<Candidate>> {
    let rows = sqlx::query(
        "SELECT id, producer, tenant_id, aggregate_type, aggregate_id
           FROM outbox_consumer_dead_letter d
          WHERE consumer = $1 AND replay_requested_at IS NOT NULL AND reason <> 'late'
            AND NOT EXISTS (
                SELECT 1 FROM outbox_consumer_dead_letter e
                 WHERE e.consumer = $1 AND e.producer = d.producer AND e.tenant_id = d.tenant_id
                   AND e.aggregate_type = d.aggregate_type AND e.aggregate_id = d.aggregate_id
                   AND e.reason <> 'late' AND (e.seq_epoch, e.seq) < (d.seq_epoch, d.seq))
          ORDER BY replay_requested_at, id
          LIMIT $2",
    )
    .bind(consumer)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut out: Vec<Candidate> = Vec::with_capacity(rows.len());
    for r in &rows {
        let c = match aggregate_of(r)? {
            Some(a) => Candidate::Aggregate((r.try_get("producer")?, a)),
            None => Candidate::Single(r.try_get("id")?),
        };
        // Rows of one aggregate without a sequence would each name it.
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// Aggregates after `after` (from the start: `None`) whose earliest parked event only waits
/// (`held`, `gap`, not requested) and may follow by now, in key order, at most `limit`.
pub(crate) async fn waiting(
    pool: &PgPool,
    consumer: &str,
    after: Option<&Keyed>,
    limit: i64,
) -> Result<Vec<Keyed>> {
    // Two texts rather than an OR, so that the cursor is an index range in both.
    let from = if after.is_some() {
        "(producer, tenant_id, aggregate_type, aggregate_id) > ($6, $2, $3, $4)"
    } else {
        "($2::text, $3::text, $4::text, $6::text) IS NULL"
    };
    let sql = format!(
        "SELECT producer, tenant_id, aggregate_type, aggregate_id FROM (
             SELECT DISTINCT ON (producer, tenant_id, aggregate_type, aggregate_id)
                    producer, tenant_id, aggregate_type, aggregate_id, reason, replay_requested_at
               FROM outbox_consumer_dead_letter
              WHERE consumer = $1 AND aggregate_id IS NOT NULL AND reason <> 'late' AND {from}
              ORDER BY producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq) firsts
          WHERE reason IN ('held', 'gap') AND replay_requested_at IS NULL
          ORDER BY producer, tenant_id, aggregate_type, aggregate_id
          LIMIT $5"
    );
    let rows = sqlx::query(&sql)
        .bind(consumer)
        .bind(after.map(|a| &a.1.tenant_id))
        .bind(after.map(|a| &a.1.aggregate_type))
        .bind(after.map(|a| &a.1.aggregate_id))
        .bind(limit)
        .bind(after.map(|a| &a.0))
        .fetch_all(pool)
        .await?;
    // A row with an aggregate id but no tenant or type (written by hand) has no aggregate to
    // walk: it is left out here, not allowed to stop the replayer.
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        if let Some(a) = aggregate_of(r)? {
            out.push((r.try_get("producer")?, a));
        }
    }
    Ok(out)
}

/// The first `limit` parked events of one aggregate, in order: their row ids only (each is
/// loaded with [`load`] when its turn comes, so a pass holds one payload at a time).
pub(crate) async fn of_aggregate(
    pool: &PgPool,
    consumer: &str,
    (producer, a): &Keyed,
    limit: i64,
) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar(
        "SELECT id FROM outbox_consumer_dead_letter
          WHERE consumer = $1 AND producer = $6 AND tenant_id = $2 AND aggregate_type = $3
            AND aggregate_id = $4 AND reason <> 'late'
          ORDER BY seq_epoch, seq, id
          LIMIT $5",
    )
    .bind(consumer)
    .bind(&a.tenant_id)
    .bind(&a.aggregate_type)
    .bind(&a.aggregate_id)
    .bind(limit)
    .bind(producer)
    .fetch_all(pool)
    .await?;
    Ok(ids)
}

/// One parked row, payload included (`None`: gone meanwhile, applied or purged).
pub(crate) async fn load(pool: &PgPool, id: i64) -> Result<Option<Stored>> {
    sqlx::query("SELECT * FROM outbox_consumer_dead_letter WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(stored)
        .transpose()
}

fn aggregate_of(r: &sqlx::postgres::PgRow) -> Result<Option<AggregateKey>> {
    Ok(
        match (
            r.try_get::<Option<String>, _>("tenant_id")?,
            r.try_get::<Option<String>, _>("aggregate_type")?,
            r.try_get::<Option<String>, _>("aggregate_id")?,
        ) {
            (Some(tenant_id), Some(aggregate_type), Some(aggregate_id)) => Some(AggregateKey {
                tenant_id,
                aggregate_type,
                aggregate_id,
            }),
            _ => None,
        },
    )
}

fn stored(r: &sqlx::postgres::PgRow) -> Result<Stored> {
    // The exact headers where they were kept (rows parked since they are), else the JSONB.
    let headers: BTreeMap<String, String> = match r.try_get::<Option<Vec<u8>>, _>("headers_raw")? {
        Some(raw) => serde_json::from_slice(&raw)?,
        None => serde_json::from_value(
            r.try_get::<Option<serde_json::Value>, _>("headers")?
                .unwrap_or_default(),
        )
        .unwrap_or_default(),
    };
    let payload: Vec<u8> = r.try_get("payload")?;
    let agg = aggregate_of(r)?;
    let position = match (
        r.try_get::<Option<i64>, _>("seq_epoch")?,
        r.try_get::<Option<i64>, _>("seq")?,
    ) {
        (Some(epoch), Some(seq)) if agg.is_some() => Some(Position { epoch, seq }),
        _ => None,
    };
    Ok(Stored {
        id: r.try_get("id")?,
        requested: r
            .try_get::<Option<DateTime<Utc>>, _>("replay_requested_at")?
            .is_some(),
        accept_gap: r.try_get("accept_gap")?,
        parked_for: (Utc::now() - r.try_get::<DateTime<Utc>, _>("parked_at")?)
            .to_std()
            .unwrap_or_default(),
        event: InboundEvent {
            event_id: r.try_get("event_id")?,
            producer: headers
                .get("Outbox-Producer-Id")
                .cloned()
                .unwrap_or_else(|| r.try_get("producer").unwrap_or_default()),
            skip: headers.get("Outbox-Skip").cloned(),
            event_type: r.try_get("event_type")?,
            aggregate: agg,
            position,
            subject: r.try_get("subject")?,
            headers,
            payload: Bytes::from(payload),
        },
    })
}

/// What a replay that did not apply a parked event makes of its reason.
pub(crate) enum Reason {
    /// Kept (it still waits for its predecessor).
    Unchanged,
    /// `handler`: it failed, and waits for an operator, not the next poll.
    Handler,
    /// `late`: its aggregate's position was moved past it; an operator purges it.
    Late,
}

/// Marks a replay attempt that did not apply `id`: the request is cleared and the reason set.
pub(crate) async fn replay_failed(
    pool: &PgPool,
    id: i64,
    error: &str,
    reason: Reason,
) -> Result<()> {
    let (failed, reason) = match reason {
        Reason::Unchanged => (0, None),
        Reason::Handler => (1, Some("handler")),
        Reason::Late => (0, Some("late")),
    };
    sqlx::query(
        "UPDATE outbox_consumer_dead_letter
            SET replay_requested_at = NULL, accept_gap = false, last_error = $2,
                attempts = attempts + $3::int, reason = COALESCE($4, reason)
          WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(failed)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}
