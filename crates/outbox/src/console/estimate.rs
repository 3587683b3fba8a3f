//! Counts that stay cheap however large the table: exact up to [`EXACT_UP_TO`] rows (an index
//! walk that stops there), the planner's statistics beyond.

use serde::Serialize;
use sqlx::PgPool;

use crate::error::Result;

/// Rows counted exactly; past this, a count is an estimate.
pub const EXACT_UP_TO: i64 = 10_000;

/// A row count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Count {
    /// Counted.
    Exact(i64),
    /// More than [`EXACT_UP_TO`]: from the planner's statistics (`pg_class.reltuples` scaled to
    /// the table's current size, `pg_stats` for a status' share), never less than the cap.
    Estimate(i64),
}

impl Count {
    /// The number, exact or not.
    pub fn value(self) -> i64 {
        match self {
            Count::Exact(n) | Count::Estimate(n) => n,
        }
    }

    /// Whether it is an estimate.
    pub fn is_estimate(self) -> bool {
        matches!(self, Count::Estimate(_))
    }
}

/// Counts the rows of `from_where` (`table WHERE ...`, no parameters) up to [`EXACT_UP_TO`];
/// `None` when there are more.
pub(crate) async fn capped(pool: &PgPool, from_where: &str) -> Result<Option<i64>> {
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM (SELECT 1 FROM {from_where} LIMIT {}) s",
        EXACT_UP_TO + 1
    ))
    .fetch_one(pool)
    .await?;
    Ok((n <= EXACT_UP_TO).then_some(n))
}

/// The planner's row count of `table`, scaled to its current size in pages as the planner does;
/// 0 when the table was never analysed.
pub(crate) async fn table_rows(pool: &PgPool, table: &str) -> Result<f64> {
    let n: Option<f64> = sqlx::query_scalar(
        "SELECT CASE WHEN c.reltuples < 0 THEN 0
                     WHEN c.relpages > 0
                         THEN c.reltuples / c.relpages
                              * (pg_relation_size(c.oid) / current_setting('block_size')::float8)
                     ELSE c.reltuples END::float8
           FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(table)
    .fetch_optional(pool)
    .await?
    .flatten();
    Ok(n.unwrap_or(0.0))
}

/// The share of `outbox_event` rows whose status is `status`, from `pg_stats`.
async fn status_share(pool: &PgPool, status: &str) -> Result<f64> {
    let f: Option<f32> = sqlx::query_scalar(
        "SELECT u.f FROM pg_stats s,
                unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS u(v, f)
          WHERE s.schemaname = current_schema() AND s.tablename = 'outbox_event'
            AND s.attname = 'status' AND u.v = $1",
    )
    .bind(status)
    .fetch_optional(pool)
    .await?;
    Ok(f.map(f64::from).unwrap_or(0.0))
}

/// Rows of `outbox_event` with `status` (`pending`, `held`, `dead`).
pub async fn status_count(pool: &PgPool, status: &str) -> Result<Count> {
    let from_where = match status {
        "pending" => "outbox_event WHERE status = 'pending'",
        "held" => "outbox_event WHERE status = 'held'",
        _ => "outbox_event WHERE status = 'dead'",
    };
    if let Some(n) = capped(pool, from_where).await? {
        return Ok(Count::Exact(n));
    }
    let est = table_rows(pool, "outbox_event").await? * status_share(pool, status).await?;
    Ok(Count::Estimate((est.round() as i64).max(EXACT_UP_TO + 1)))
}

/// Rows of `outbox_published` (kept for retention).
pub async fn published_count(pool: &PgPool) -> Result<Count> {
    if let Some(n) = capped(pool, "outbox_published").await? {
        return Ok(Count::Exact(n));
    }
    let est = table_rows(pool, "outbox_published").await?;
    Ok(Count::Estimate((est.round() as i64).max(EXACT_UP_TO + 1)))
}
