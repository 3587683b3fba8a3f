//! Consumers as the console shows them, from a consumer's database: per consumer its parked
//! events by reason and the time since it last applied an event; parked events grouped by
//! failure and by aggregate; one parked event with its stored message.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::Result;

/// Groups listed per page.
pub const PAGE: i64 = 100;

/// One consumer of a consumer database.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerSummary {
    /// Its name.
    pub consumer: String,
    /// Parked events per reason (`handler`, `gap`, `held`, `unreadable`, `late`).
    pub parked_by_reason: Vec<(String, i64)>,
    /// Parked events an operator asked to replay that the consumer has not applied yet.
    pub replay_requested: i64,
    /// Events waiting for their predecessor (`outbox_consumer_gap`).
    pub waiting_for_gap: i64,
    /// The last time it applied an event (an aggregate position moved, or an event without a
    /// sequence was recorded as seen).
    pub last_applied_at: Option<DateTime<Utc>>,
}

impl ConsumerSummary {
    /// All parked events.
    pub fn parked(&self) -> i64 {
        self.parked_by_reason.iter().map(|(_, n)| n).sum()
    }
}

/// Every consumer that has positions, seen events or parked events in this database.
pub async fn consumers(pool: &PgPool) -> Result<Vec<ConsumerSummary>> {
    let rows = sqlx::query(
        "WITH names AS (
             SELECT consumer FROM outbox_consumer_position
             UNION SELECT consumer FROM outbox_consumer_seen
             UNION SELECT consumer FROM outbox_consumer_dead_letter)
         SELECT n.consumer,
                (SELECT max(applied_at) FROM outbox_consumer_position p WHERE p.consumer = n.consumer) AS applied,
                (SELECT max(seen_at) FROM outbox_consumer_seen s WHERE s.consumer = n.consumer) AS seen,
                (SELECT count(*) FROM outbox_consumer_dead_letter d
                  WHERE d.consumer = n.consumer AND d.replay_requested_at IS NOT NULL) AS requested,
                (SELECT count(*) FROM outbox_consumer_gap g WHERE g.consumer = n.consumer) AS gaps,
                COALESCE((SELECT array_agg(reason ORDER BY reason) FROM (
                    SELECT reason FROM outbox_consumer_dead_letter d WHERE d.consumer = n.consumer
                    GROUP BY reason) r), '{}') AS reasons,
                COALESCE((SELECT array_agg(c ORDER BY reason) FROM (
                    SELECT reason, count(*) AS c FROM outbox_consumer_dead_letter d
                     WHERE d.consumer = n.consumer GROUP BY reason) r), '{}') AS counts
           FROM names n ORDER BY n.consumer",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let applied: Option<DateTime<Utc>> = r.try_get("applied")?;
            let seen: Option<DateTime<Utc>> = r.try_get("seen")?;
            let reasons: Vec<String> = r.try_get("reasons")?;
            let counts: Vec<i64> = r.try_get("counts")?;
            Ok(ConsumerSummary {
                consumer: r.try_get("consumer")?,
                parked_by_reason: reasons.into_iter().zip(counts).collect(),
                replay_requested: r.try_get("requested")?,
                waiting_for_gap: r.try_get("gaps")?,
                last_applied_at: applied.max(seen),
            })
        })
        .collect()
}

/// Parked events failing the same way.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ParkedGroup {
    /// Consumer.
    pub consumer: String,
    /// Why parked.
    pub reason: String,
    /// `outbox_error_group(last_error)`.
    pub error_group: String,
    /// Parked events in it.
    pub count: i64,
    /// First parked.
    pub first_parked_at: DateTime<Utc>,
    /// Last parked.
    pub last_parked_at: DateTime<Utc>,
}

/// Parked events grouped by consumer, reason and failure, largest first.
pub async fn by_error(pool: &PgPool) -> Result<Vec<ParkedGroup>> {
    Ok(sqlx::query_as(
        "SELECT consumer, reason, outbox_error_group(last_error) AS error_group, count(*) AS count,
                min(parked_at) AS first_parked_at, max(parked_at) AS last_parked_at
           FROM outbox_consumer_dead_letter
          GROUP BY 1, 2, 3 ORDER BY count(*) DESC, 1, 2, 3 LIMIT $1",
    )
    .bind(PAGE)
    .fetch_all(pool)
    .await?)
}

/// Parked events of one aggregate of one consumer.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ParkedAggregate {
    /// Consumer.
    pub consumer: String,
    /// Producer (`Outbox-Producer-Id`).
    pub producer: String,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Aggregate type.
    pub aggregate_type: Option<String>,
    /// Aggregate id.
    pub aggregate_id: Option<String>,
    /// Parked events.
    pub count: i64,
    /// Reasons among them.
    pub reasons: Vec<String>,
    /// First parked.
    pub first_parked_at: DateTime<Utc>,
}

/// Aggregates with parked events, in key order, at most [`PAGE`].
pub async fn by_aggregate(pool: &PgPool) -> Result<Vec<ParkedAggregate>> {
    Ok(sqlx::query_as(
        "SELECT consumer, producer, tenant_id, aggregate_type, aggregate_id, count(*) AS count,
                array_agg(DISTINCT reason) AS reasons, min(parked_at) AS first_parked_at
           FROM outbox_consumer_dead_letter
          GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5 LIMIT $1",
    )
    .bind(PAGE)
    .fetch_all(pool)
    .await?)
}

/// Payload bytes a page shows of a parked event.
pub const PAYLOAD_PREVIEW_BYTES: i32 = super::event::PAYLOAD_PREVIEW_BYTES;

/// One parked event with its stored message.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedDetail {
    /// Row id.
    pub id: i64,
    /// Consumer.
    pub consumer: String,
    /// Event id.
    pub event_id: Uuid,
    /// Producer.
    pub producer: String,
    /// Event type.
    pub event_type: Option<String>,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Aggregate type.
    pub aggregate_type: Option<String>,
    /// Aggregate id.
    pub aggregate_id: Option<String>,
    /// Sequence epoch.
    pub seq_epoch: Option<i64>,
    /// Sequence.
    pub seq: Option<i64>,
    /// Subject or routing key it came on.
    pub subject: String,
    /// Headers exactly as received (JSON text; may hold bytes no JSONB value can), else the JSONB.
    pub headers_text: String,
    /// The payload's first bytes.
    pub payload_head: Vec<u8>,
    /// The payload's size.
    pub payload_bytes: i32,
    /// Why parked.
    pub reason: String,
    /// Handler failures.
    pub attempts: i32,
    /// Last error.
    pub last_error: Option<String>,
    /// Failure group.
    pub error_group: String,
    /// Parked at.
    pub parked_at: DateTime<Utc>,
    /// Replay asked for at.
    pub replay_requested_at: Option<DateTime<Utc>>,
}

/// One parked event of `consumer` by event id.
pub async fn parked_event(
    pool: &PgPool,
    consumer: &str,
    event_id: Uuid,
) -> Result<Option<ParkedDetail>> {
    let Some(r) = sqlx::query(
        "SELECT id, consumer, event_id, producer, event_type, tenant_id, aggregate_type, aggregate_id,
                seq_epoch, seq, subject, headers_raw, headers::text AS headers_json,
                substring(payload from 1 for $3) AS payload_head, length(payload) AS payload_bytes,
                reason, attempts, last_error, outbox_error_group(last_error) AS error_group,
                parked_at, replay_requested_at
           FROM outbox_consumer_dead_letter WHERE consumer = $1 AND event_id = $2",
    )
    .bind(consumer)
    .bind(event_id)
    .bind(PAYLOAD_PREVIEW_BYTES)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let raw: Option<Vec<u8>> = r.try_get("headers_raw")?;
    let json: Option<String> = r.try_get("headers_json")?;
    Ok(Some(ParkedDetail {
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
        subject: r.try_get("subject")?,
        headers_text: match raw {
            Some(b) => String::from_utf8_lossy(&b).into_owned(),
            None => json.unwrap_or_default(),
        },
        payload_head: r.try_get("payload_head")?,
        payload_bytes: r.try_get("payload_bytes")?,
        reason: r.try_get("reason")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        error_group: r.try_get("error_group")?,
        parked_at: r.try_get("parked_at")?,
        replay_requested_at: r.try_get("replay_requested_at")?,
    }))
}

/// The whole payload of a parked event (a download).
pub async fn parked_payload(
    pool: &PgPool,
    consumer: &str,
    event_id: Uuid,
) -> Result<Option<Vec<u8>>> {
    Ok(sqlx::query_scalar(
        "SELECT payload FROM outbox_consumer_dead_letter WHERE consumer = $1 AND event_id = $2",
    )
    .bind(consumer)
    .bind(event_id)
    .fetch_optional(pool)
    .await?)
}
