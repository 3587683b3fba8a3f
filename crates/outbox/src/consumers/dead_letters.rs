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
    /// `handler`, `gap`, `held` (behind a parked event of its aggregate) or `unreadable`.
    pub reason: String,
    /// Handler failures before it was parked.
    pub attempts: i32,
    /// The last error.
    pub last_error: Option<String>,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
    /// When an operator asked for a replay the consumer has not finished yet.
    pub replay_requested_at: Option<DateTime<Utc>>,
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
}

const WHERE: &str = "($1::text IS NULL OR consumer = $1) AND ($2::uuid IS NULL OR event_id = $2)
                     AND ($3::text IS NULL OR tenant_id = $3) AND ($4::text IS NULL OR reason = $4)";

fn bind<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    f: &'q ParkedFilter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(&f.consumer)
        .bind(f.event_id)
        .bind(&f.tenant_id)
        .bind(&f.reason)
}

/// Parked events matching `filter`, oldest first, at most `limit`.
pub async fn list(pool: &PgPool, filter: &ParkedFilter, limit: i64) -> Result<Vec<ParkedEvent>> {
    let sql = format!(
        "SELECT id, consumer, event_id, event_type, tenant_id, aggregate_type, aggregate_id,
                seq_epoch, seq, reason, attempts, last_error, parked_at, replay_requested_at
           FROM outbox_consumer_dead_letter WHERE {WHERE} ORDER BY id LIMIT $5"
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
            })
        })
        .collect()
}

/// Asks the running consumer(s) to apply the matching parked events again (the events parked
/// behind them in their aggregates follow), and records who asked. Returns the event ids.
pub async fn request_replay(
    pool: &PgPool,
    filter: &ParkedFilter,
    actor: &str,
) -> Result<Vec<Uuid>> {
    act(
        pool,
        filter,
        actor,
        "consumer_replay",
        "UPDATE outbox_consumer_dead_letter SET replay_requested_at = now()",
    )
    .await
}

/// Skips the matching parked events for good: they are deleted and never applied, and their
/// aggregates' positions move past them, so the events parked behind them (and later ones) are
/// applied next. Records who did it. Returns the event ids.
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
    if filter.consumer.is_none()
        && filter.event_id.is_none()
        && filter.tenant_id.is_none()
        && filter.reason.is_none()
    {
        return Err(OutboxError::Config(
            "name what to act on: --consumer, --event-id, --tenant or --reason".into(),
        ));
    }
    let mut tx = pool.begin().await?;
    let sql = if change == "PURGE" {
        format!(
            "WITH gone AS (DELETE FROM outbox_consumer_dead_letter WHERE {WHERE} RETURNING *),
             moved AS (
                 INSERT INTO outbox_consumer_position AS p
                        (consumer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq)
                 SELECT DISTINCT ON (consumer, tenant_id, aggregate_type, aggregate_id)
                        consumer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq
                   FROM gone WHERE aggregate_id IS NOT NULL AND seq IS NOT NULL
                  ORDER BY consumer, tenant_id, aggregate_type, aggregate_id,
                           seq_epoch DESC, seq DESC
                 ON CONFLICT (consumer, tenant_id, aggregate_type, aggregate_id) DO UPDATE
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
    Aggregate(AggregateKey),
    /// This parked row alone.
    Single(i64),
}

/// Aggregates whose earliest parked event an operator asked to replay, and requested events
/// without an aggregate: oldest request first, at most `limit`.
pub(crate) async fn requested(pool: &PgPool, consumer: &str, limit: i64) -> Result<Vec<Candidate>> {
    let rows = sqlx::query(
        "SELECT id, tenant_id, aggregate_type, aggregate_id
           FROM outbox_consumer_dead_letter d
          WHERE consumer = $1 AND replay_requested_at IS NOT NULL
            AND NOT EXISTS (
                SELECT 1 FROM outbox_consumer_dead_letter e
                 WHERE e.consumer = $1 AND e.tenant_id = d.tenant_id
                   AND e.aggregate_type = d.aggregate_type AND e.aggregate_id = d.aggregate_id
                   AND (e.seq_epoch, e.seq) < (d.seq_epoch, d.seq))
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
            Some(a) => Candidate::Aggregate(a),
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
    after: Option<&AggregateKey>,
    limit: i64,
) -> Result<Vec<AggregateKey>> {
    // Two texts rather than an OR, so that the cursor is an index range in both.
    let from = if after.is_some() {
        "(tenant_id, aggregate_type, aggregate_id) > ($2, $3, $4)"
    } else {
        "($2::text, $3::text, $4::text) IS NULL"
    };
    let sql = format!(
        "SELECT tenant_id, aggregate_type, aggregate_id FROM (
             SELECT DISTINCT ON (tenant_id, aggregate_type, aggregate_id)
                    tenant_id, aggregate_type, aggregate_id, reason, replay_requested_at
               FROM outbox_consumer_dead_letter
              WHERE consumer = $1 AND aggregate_id IS NOT NULL AND {from}
              ORDER BY tenant_id, aggregate_type, aggregate_id, seq_epoch, seq) firsts
          WHERE reason IN ('held', 'gap') AND replay_requested_at IS NULL
          ORDER BY tenant_id, aggregate_type, aggregate_id
          LIMIT $5"
    );
    let rows = sqlx::query(&sql)
        .bind(consumer)
        .bind(after.map(|a| &a.tenant_id))
        .bind(after.map(|a| &a.aggregate_type))
        .bind(after.map(|a| &a.aggregate_id))
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| Ok(aggregate_of(r)?.expect("aggregate_id IS NOT NULL")))
        .collect()
}

/// The first `limit` parked events of one aggregate, in order: their row ids only (each is
/// loaded with [`load`] when its turn comes, so a pass holds one payload at a time).
pub(crate) async fn of_aggregate(
    pool: &PgPool,
    consumer: &str,
    a: &AggregateKey,
    limit: i64,
) -> Result<Vec<i64>> {
    let ids = sqlx::query_scalar(
        "SELECT id FROM outbox_consumer_dead_letter
          WHERE consumer = $1 AND tenant_id = $2 AND aggregate_type = $3 AND aggregate_id = $4
          ORDER BY seq_epoch, seq, id
          LIMIT $5",
    )
    .bind(consumer)
    .bind(&a.tenant_id)
    .bind(&a.aggregate_type)
    .bind(&a.aggregate_id)
    .bind(limit)
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
    let headers: serde_json::Value = r.try_get("headers")?;
    let headers: BTreeMap<String, String> = serde_json::from_value(headers)?;
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
        event: InboundEvent {
            event_id: r.try_get("event_id")?,
            event_type: r.try_get("event_type")?,
            aggregate: agg,
            position,
            subject: r.try_get("subject")?,
            headers,
            payload: Bytes::from(payload),
        },
    })
}

/// Marks a replay attempt that did not apply `id`: the request is cleared; a handler failure
/// makes the reason `handler` (so that it waits for an operator, not the next poll).
pub(crate) async fn replay_failed(
    pool: &PgPool,
    id: i64,
    error: &str,
    handler_failed: bool,
) -> Result<()> {
    sqlx::query(
        "UPDATE outbox_consumer_dead_letter
            SET replay_requested_at = NULL, last_error = $2,
                attempts = attempts + $3::int,
                reason = CASE WHEN $3::int = 1 THEN 'handler' ELSE reason END
          WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(handler_failed as i32)
    .execute(pool)
    .await?;
    Ok(())
}
