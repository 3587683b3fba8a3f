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

/// Rows of `outbox_event` per state and of `outbox_published`, and the planner's size of
/// `outbox_event`, in one round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    /// Pending.
    pub pending: Count,
    /// Held behind a dead letter.
    pub held: Count,
    /// Dead letters.
    pub dead: Count,
    /// Published rows kept.
    pub published: Count,
    /// The planner's row count of `outbox_event` (scaled to its current size).
    pub event_rows_estimate: i64,
}

/// Reads [`StateCounts`]: each count exact up to [`EXACT_UP_TO`] (an index walk that stops
/// there), beyond it the table's planner row count (`pg_class.reltuples`, scaled to the table's
/// current pages as the planner does) times the state's share in `pg_stats`.
pub async fn state_counts(pool: &PgPool) -> Result<StateCounts> {
    let cap = EXACT_UP_TO + 1;
    let capped = |from_where: &str| {
        format!("(SELECT count(*) FROM (SELECT 1 FROM {from_where} LIMIT {cap}) s)")
    };
    let rows = |table: &str| {
        format!(
            "(SELECT CASE WHEN c.reltuples < 0 THEN 0
                          WHEN c.relpages > 0
                              THEN c.reltuples / c.relpages
                                   * (pg_relation_size(c.oid) / current_setting('block_size')::float8)
                          ELSE c.reltuples END::float8
                FROM pg_class c WHERE c.oid = to_regclass('{table}'))"
        )
    };
    let share = |status: &str| {
        format!(
            "(SELECT u.f::float8 FROM pg_stats s,
                     unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS u(v, f)
               WHERE s.schemaname = current_schema() AND s.tablename = 'outbox_event'
                 AND s.attname = 'status' AND u.v = '{status}')"
        )
    };
    let sql = format!(
        "SELECT {}, {}, {}, {}, COALESCE({}, 0), COALESCE({}, 0), COALESCE({}, 0), COALESCE({}, 0), COALESCE({}, 0)",
        capped("outbox_event WHERE status = 'pending'"),
        capped("outbox_event WHERE status = 'held'"),
        capped("outbox_event WHERE status = 'dead'"),
        capped("outbox_published"),
        rows("outbox_event"),
        rows("outbox_published"),
        share("pending"),
        share("held"),
        share("dead"),
    );
    type Row = (i64, i64, i64, i64, f64, f64, f64, f64, f64);
    let (p, h, d, pb, ev_rows, pub_rows, sp, sh, sd): Row =
        sqlx::query_as(&sql).fetch_one(pool).await?;
    let count = |n: i64, est: f64| {
        if n <= EXACT_UP_TO {
            Count::Exact(n)
        } else {
            Count::Estimate((est.round() as i64).max(cap))
        }
    };
    Ok(StateCounts {
        pending: count(p, ev_rows * sp),
        held: count(h, ev_rows * sh),
        dead: count(d, ev_rows * sd),
        published: count(pb, pub_rows),
        event_rows_estimate: ev_rows.round() as i64,
    })
}

/// The rows of `outbox_event` when there are at most `cap`, else `None`; and the planner's row
/// count of it, in one round trip.
pub(crate) async fn event_rows(pool: &PgPool, cap: i64) -> Result<(Option<i64>, f64)> {
    let (n, est): (i64, Option<f64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox_event LIMIT $1) s),
                (SELECT CASE WHEN c.reltuples < 0 THEN 0
                             WHEN c.relpages > 0
                                 THEN c.reltuples / c.relpages
                                      * (pg_relation_size(c.oid) / current_setting('block_size')::float8)
                             ELSE c.reltuples END::float8
                   FROM pg_class c WHERE c.oid = to_regclass('outbox_event'))",
    )
    .bind(cap + 1)
    .fetch_one(pool)
    .await?;
    Ok(((n <= cap).then_some(n), est.unwrap_or(0.0)))
}
