//! Dead letters grouped the two ways an operator triages them: by failure (reason code and
//! normalized message, column `error_group`, so that errors that differ only in ids, numbers or
//! quoted values fall together) and by aggregate (one stuck aggregate holds back its later events).

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::Result;
use crate::ops::DeadLetterFilter;

/// Groups and rows listed per page.
pub const PAGE: i64 = 100;

/// Dead letters failing the same way.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ErrorGroup {
    /// `<reason code>: <normalized message>` (`outbox_error_group()`, migration
    /// `20261211000001_console_error_group.sql`).
    pub error_group: String,
    /// Dead letters in it.
    pub count: i64,
    /// First dead-lettered.
    pub first_dead_at: Option<DateTime<Utc>>,
    /// Last dead-lettered.
    pub last_dead_at: Option<DateTime<Utc>>,
}

/// Groups by failure, largest first (an index-only walk of `outbox_event_dead_group`).
pub async fn by_error(pool: &PgPool) -> Result<Vec<ErrorGroup>> {
    Ok(sqlx::query_as(
        "SELECT COALESCE(error_group, '') AS error_group, count(*) AS count,
                min(dead_at) AS first_dead_at, max(dead_at) AS last_dead_at
           FROM outbox_event WHERE status = 'dead'
          GROUP BY error_group ORDER BY count(*) DESC, error_group LIMIT $1",
    )
    .bind(PAGE)
    .fetch_all(pool)
    .await?)
}

/// Dead letters of one aggregate.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateGroup {
    /// Tenant.
    pub tenant_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Its dead letters.
    pub dead: i64,
    /// Its later events held behind them.
    pub held: i64,
    /// First dead-lettered.
    pub first_dead_at: Option<DateTime<Utc>>,
}

/// Aggregates with dead letters, in key order after `after` (a page cursor), at most [`PAGE`],
/// optionally only those with a dead letter of `error_group` or of `tenant`. Key order lets the
/// `outbox_event_blocking` index stop after one page however many dead letters there are.
pub async fn by_aggregate<'a>(
    pool: &PgPool,
    error_group: Option<&'a str>,
    tenant: Option<&'a str>,
    after: Option<(&'a str, &'a str, &'a str)>,
) -> Result<Vec<AggregateGroup>> {
    // Only the conditions given, so that each case plans as an index range (a generic plan of
    // `($1 IS NULL OR ...)` could use none).
    let mut conds = vec!["status = 'dead'".to_string()];
    let mut args: Vec<&str> = Vec::new();
    let mut arg = |v: &'a str| {
        args.push(v);
        format!("${}", args.len())
    };
    if let Some(g) = error_group {
        conds.push(format!("error_group = {}", arg(g)));
    }
    if let Some(t) = tenant {
        conds.push(format!("tenant_id = {}", arg(t)));
    }
    if let Some((t, ty, id)) = after {
        conds.push(format!(
            "(tenant_id, aggregate_type, aggregate_id) > ({}, {}, {})",
            arg(t),
            arg(ty),
            arg(id)
        ));
    }
    let sql = format!(
        "SELECT d.tenant_id, d.aggregate_type, d.aggregate_id, d.dead, d.first_dead_at,
                (SELECT count(*) FROM outbox_event h
                  WHERE h.status = 'held' AND h.tenant_id = d.tenant_id
                    AND h.aggregate_type = d.aggregate_type AND h.aggregate_id = d.aggregate_id) AS held
           FROM (SELECT tenant_id, aggregate_type, aggregate_id, count(*) AS dead,
                        min(dead_at) AS first_dead_at
                   FROM outbox_event WHERE {}
                  GROUP BY tenant_id, aggregate_type, aggregate_id
                  ORDER BY tenant_id, aggregate_type, aggregate_id
                  LIMIT {PAGE}) d
          ORDER BY d.tenant_id, d.aggregate_type, d.aggregate_id",
        conds.join(" AND ")
    );
    let mut q = sqlx::query(&sql);
    for a in args {
        q = q.bind(a);
    }
    let rows = q.fetch_all(pool).await?;
    rows.iter()
        .map(|r| {
            Ok(AggregateGroup {
                tenant_id: r.try_get("tenant_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                dead: r.try_get("dead")?,
                held: r.try_get("held")?,
                first_dead_at: r.try_get("first_dead_at")?,
            })
        })
        .collect()
}

/// A dead letter in a listing (no payload: its size only).
#[derive(Debug, Clone, Serialize)]
pub struct DeadRow {
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
    /// Failed attempts.
    pub attempts: i32,
    /// The last error.
    pub last_error: Option<String>,
    /// Failure group.
    pub error_group: Option<String>,
    /// Written.
    pub created_at: DateTime<Utc>,
    /// Dead-lettered.
    pub dead_at: Option<DateTime<Utc>>,
    /// Payload size in bytes.
    pub payload_bytes: i32,
}

/// Dead letters matching `filter`, most recently dead-lettered first, at most [`PAGE`].
pub async fn list(pool: &PgPool, filter: &DeadLetterFilter) -> Result<Vec<DeadRow>> {
    let rows = sqlx::query(
        "SELECT event_id, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq, event_type,
                attempts, last_error, error_group, created_at, dead_at, length(payload) AS payload_bytes
           FROM outbox_event
          WHERE status = 'dead'
            AND ($1::uuid IS NULL OR event_id = $1) AND ($2::text IS NULL OR tenant_id = $2)
            AND ($3::text IS NULL OR aggregate_type = $3) AND ($4::text IS NULL OR aggregate_id = $4)
            AND ($5::timestamptz IS NULL OR dead_at >= $5) AND ($6::timestamptz IS NULL OR dead_at < $6)
            AND ($7::text IS NULL OR error_group = $7)
          ORDER BY dead_at DESC, id DESC LIMIT $8",
    )
    .bind(filter.event_id)
    .bind(&filter.tenant_id)
    .bind(&filter.aggregate_type)
    .bind(&filter.aggregate_id)
    .bind(filter.since)
    .bind(filter.until)
    .bind(&filter.error_group)
    .bind(filter.limit.unwrap_or(PAGE).clamp(1, 1000))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DeadRow {
                event_id: r.try_get("event_id")?,
                tenant_id: r.try_get("tenant_id")?,
                aggregate_type: r.try_get("aggregate_type")?,
                aggregate_id: r.try_get("aggregate_id")?,
                seq_epoch: r.try_get("seq_epoch")?,
                seq: r.try_get("seq")?,
                event_type: r.try_get("event_type")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                error_group: r.try_get("error_group")?,
                created_at: r.try_get("created_at")?,
                dead_at: r.try_get("dead_at")?,
                payload_bytes: r.try_get("payload_bytes")?,
            })
        })
        .collect()
}
