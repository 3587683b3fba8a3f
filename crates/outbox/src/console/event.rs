//! One outbox event wherever it lives (pending, held, dead or published), with its payload's
//! first bytes, headers, error and history (the operator actions that named it).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::Result;
use crate::ops::AuditEntry;

/// Payload bytes a page shows; a longer payload is cut there and offered as a download.
pub const PAYLOAD_PREVIEW_BYTES: i32 = 64 * 1024;

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct EventDetail {
    /// `pending`, `held`, `dead` or `published`.
    pub status: String,
    /// Event id.
    pub event_id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Sequence epoch.
    pub seq_epoch: i64,
    /// Position in its aggregate.
    pub seq: i64,
    /// Event type.
    pub event_type: String,
    /// Topic.
    pub topic: String,
    /// Headers as stored.
    pub headers: serde_json::Value,
    /// The payload's first [`PAYLOAD_PREVIEW_BYTES`] bytes.
    pub payload_head: Vec<u8>,
    /// The payload's whole size.
    pub payload_bytes: i32,
    /// Failed attempts.
    pub attempts: i32,
    /// Next attempt (failing pending rows).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The last error.
    pub last_error: Option<String>,
    /// Failure group (dead letters).
    pub error_group: Option<String>,
    /// Written.
    pub created_at: DateTime<Utc>,
    /// Dead-lettered.
    pub dead_at: Option<DateTime<Utc>>,
    /// Published.
    pub published_at: Option<DateTime<Utc>>,
    /// Events of its aggregate held behind a dead letter.
    pub held_in_aggregate: i64,
    /// Operator actions that named this event, newest first.
    pub history: Vec<AuditEntry>,
}

/// The event `event_id`, `None` when it is in neither table (never written, or published and
/// past retention).
pub async fn event(pool: &PgPool, event_id: Uuid) -> Result<Option<EventDetail>> {
    let cols = "event_id, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq, event_type, topic,
                headers, substring(payload from 1 for $2) AS payload_head, length(payload) AS payload_bytes,
                attempts, created_at";
    let row = sqlx::query(&format!(
        "SELECT {cols}, status, CASE WHEN isfinite(next_attempt_at) THEN next_attempt_at END AS next_attempt_at, last_error, error_group, dead_at,
                NULL::timestamptz AS published_at
           FROM outbox_event WHERE event_id = $1"
    ))
    .bind(event_id)
    .bind(PAYLOAD_PREVIEW_BYTES)
    .fetch_optional(pool)
    .await?;
    let row = match row {
        Some(r) => r,
        None => {
            match sqlx::query(&format!(
                "SELECT {cols}, 'published' AS status, NULL::timestamptz AS next_attempt_at,
                        NULL::text AS last_error, NULL::text AS error_group,
                        NULL::timestamptz AS dead_at, published_at
                   FROM outbox_published WHERE event_id = $1 LIMIT 1"
            ))
            .bind(event_id)
            .bind(PAYLOAD_PREVIEW_BYTES)
            .fetch_optional(pool)
            .await?
            {
                Some(r) => r,
                None => return Ok(None),
            }
        }
    };
    let (tenant_id, aggregate_type, aggregate_id): (String, String, String) = (
        row.try_get("tenant_id")?,
        row.try_get("aggregate_type")?,
        row.try_get("aggregate_id")?,
    );
    let held_in_aggregate: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_event
          WHERE status = 'held' AND tenant_id = $1 AND aggregate_type = $2 AND aggregate_id = $3",
    )
    .bind(&tenant_id)
    .bind(&aggregate_type)
    .bind(&aggregate_id)
    .fetch_one(pool)
    .await?;
    let history: Vec<AuditEntry> = sqlx::query_as(
        "SELECT at, action, actor, event_ids FROM outbox_audit WHERE $1 = ANY(event_ids)
          ORDER BY id DESC LIMIT 50",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await?;
    Ok(Some(EventDetail {
        status: row.try_get("status")?,
        event_id: row.try_get("event_id")?,
        tenant_id,
        aggregate_type,
        aggregate_id,
        seq_epoch: row.try_get("seq_epoch")?,
        seq: row.try_get("seq")?,
        event_type: row.try_get("event_type")?,
        topic: row.try_get("topic")?,
        headers: row.try_get("headers")?,
        payload_head: row.try_get("payload_head")?,
        payload_bytes: row.try_get("payload_bytes")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        error_group: row.try_get("error_group")?,
        created_at: row.try_get("created_at")?,
        dead_at: row.try_get("dead_at")?,
        published_at: row.try_get("published_at")?,
        held_in_aggregate,
        history,
    }))
}

/// The whole payload of `event_id` (a download), wherever the event lives.
pub async fn payload(pool: &PgPool, event_id: Uuid) -> Result<Option<Vec<u8>>> {
    Ok(sqlx::query_scalar(
        "SELECT payload FROM outbox_event WHERE event_id = $1
         UNION ALL
         (SELECT payload FROM outbox_published WHERE event_id = $1 LIMIT 1)
         LIMIT 1",
    )
    .bind(event_id)
    .fetch_optional(pool)
    .await?)
}
