//! The console's first page, per outbox database: counts per state, the oldest pending event,
//! published per minute, relays and their partitions, held-back routes, and the backlog per
//! tenant and event type.

use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::estimate::{self, Count};
use crate::error::Result;
use crate::storage::route_holds::{self, RouteHold};

/// Minutes of the published-per-minute chart.
pub const CHART_MINUTES: i64 = 15;
/// Rows of `outbox_event` up to which the backlog breakdown is counted exactly; above, it is
/// estimated from a sample of about this many rows.
pub const BREAKDOWN_EXACT_UP_TO: f64 = 20_000.0;
/// Tenants and event types listed (largest backlog first).
pub const BREAKDOWN_ROWS: i64 = 25;

/// What the first page shows of one outbox database.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// Waiting for delivery.
    pub pending: Count,
    /// Waiting behind a dead letter of their aggregate.
    pub held: Count,
    /// Dead letters.
    pub dead: Count,
    /// Published rows kept for retention.
    pub published: Count,
    /// Held rows with no dead letter ahead of them (nothing releases them; should be 0). `None`
    /// when held and dead rows are too many to check on a page view (the relay's gauge
    /// `outbox_held_orphaned_events` has it).
    pub held_orphaned: Option<i64>,
    /// Age of the oldest pending event (lowest id), seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Published events per minute, oldest minute first, the current (partial) minute last.
    /// From `outbox_published.published_at`: with `--retention-hours 0` published rows are not
    /// kept and this is all zeros (the relay's `outbox_events_published_total` has the rate).
    pub published_per_minute: Vec<MinuteCount>,
    /// The latest `published_at` in the database: the relays' last progress as the database
    /// records it (per-relay progress is not stored; each relay's `/metrics` has its own).
    pub last_published_at: Option<DateTime<Utc>>,
    /// Relays with their heartbeat and partitions.
    pub relays: Vec<Relay>,
    /// Partitions no relay holds a valid lease on.
    pub unowned_partitions: Vec<i16>,
    /// Routes relays hold back because the broker refuses them (issue 19).
    pub route_holds: Vec<RouteHold>,
    /// Backlog per tenant.
    pub by_tenant: Backlog,
    /// Backlog per event type.
    pub by_event_type: Backlog,
}

/// Published events in one minute.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MinuteCount {
    /// Start of the minute.
    pub minute: DateTime<Utc>,
    /// Events published in it.
    pub published: i64,
}

/// A relay's row.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Relay {
    /// Relay id.
    pub relay_id: String,
    /// Host.
    pub host: String,
    /// Process id.
    pub pid: i32,
    /// When this relay id started.
    pub started_at: DateTime<Utc>,
    /// Last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// Partitions it holds a valid lease on.
    pub partitions: Vec<i16>,
}

/// Pending, held and dead events per key (tenant or event type).
#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    /// Largest first, at most [`BREAKDOWN_ROWS`].
    pub rows: Vec<BacklogRow>,
    /// `Some(n)`: estimated from a sample of `n` rows (`TABLESAMPLE SYSTEM`), scaled up.
    pub sampled_rows: Option<i64>,
}

/// One key's backlog.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct BacklogRow {
    /// Tenant id or event type.
    pub key: String,
    /// Pending.
    pub pending: i64,
    /// Held.
    pub held: i64,
    /// Dead.
    pub dead: i64,
}

/// Reads the overview of one outbox database.
pub async fn overview(pool: &PgPool) -> Result<Overview> {
    let pending = estimate::status_count(pool, "pending").await?;
    let held = estimate::status_count(pool, "held").await?;
    let dead = estimate::status_count(pool, "dead").await?;
    let published = estimate::published_count(pool).await?;
    let held_orphaned = if held.is_estimate() || dead.is_estimate() {
        None
    } else {
        Some(crate::pg::held_counts(pool).await?.orphaned)
    };
    let relays: Vec<Relay> = sqlx::query_as(
        "SELECT r.relay_id, r.host, r.pid, r.started_at, r.heartbeat_at,
                COALESCE(array_agg(p.partition ORDER BY p.partition) FILTER (WHERE p.partition IS NOT NULL), '{}') AS partitions
         FROM outbox_relay r
         LEFT JOIN outbox_partition p ON p.owner = r.relay_id AND p.lease_until > now()
         GROUP BY r.relay_id, r.host, r.pid, r.started_at, r.heartbeat_at ORDER BY r.relay_id",
    )
    .fetch_all(pool)
    .await?;
    let unowned_partitions: Vec<i16> = sqlx::query_scalar(
        "SELECT partition FROM outbox_partition WHERE owner IS NULL OR lease_until <= now() ORDER BY partition",
    )
    .fetch_all(pool)
    .await?;
    let last_published_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(published_at) FROM outbox_published")
            .fetch_one(pool)
            .await?;
    Ok(Overview {
        pending,
        held,
        dead,
        published,
        held_orphaned,
        oldest_pending_age_seconds: oldest_pending_age(pool).await?,
        published_per_minute: published_per_minute(pool).await?,
        last_published_at,
        relays,
        unowned_partitions,
        route_holds: route_holds::list(pool).await?,
        by_tenant: backlog(pool, "tenant_id").await?,
        by_event_type: backlog(pool, "event_type").await?,
    })
}

/// The age of the pending event with the lowest id: a loose index scan over the tenants of the
/// pending index (one probe per tenant), then that tenant's first row, rather than a scan of every
/// pending row.
async fn oldest_pending_age(pool: &PgPool) -> Result<Option<f64>> {
    Ok(sqlx::query_scalar(
        "WITH RECURSIVE t AS (
             (SELECT tenant_id FROM outbox_event WHERE status = 'pending' ORDER BY tenant_id LIMIT 1)
             UNION ALL
             SELECT (SELECT e.tenant_id FROM outbox_event e
                      WHERE e.status = 'pending' AND e.tenant_id > t.tenant_id
                      ORDER BY e.tenant_id LIMIT 1)
               FROM t WHERE t.tenant_id IS NOT NULL),
         firsts AS (
             SELECT t.tenant_id,
                    (SELECT e.id FROM outbox_event e WHERE e.status = 'pending' AND e.tenant_id = t.tenant_id
                      ORDER BY e.id LIMIT 1) AS id
               FROM t WHERE t.tenant_id IS NOT NULL),
         o AS (SELECT tenant_id, id FROM firsts ORDER BY id LIMIT 1)
         SELECT EXTRACT(EPOCH FROM now() - e.created_at)::float8
           FROM o JOIN outbox_event e ON e.status = 'pending' AND e.tenant_id = o.tenant_id AND e.id = o.id",
    )
    .fetch_optional(pool)
    .await?)
}

/// Published per minute over the last [`CHART_MINUTES`] minutes, missing minutes as 0.
async fn published_per_minute(pool: &PgPool) -> Result<Vec<MinuteCount>> {
    let (now, rows): (DateTime<Utc>, Vec<(DateTime<Utc>, i64)>) = {
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
        let rows = sqlx::query_as(
            "SELECT date_trunc('minute', published_at) AS m, count(*)
               FROM outbox_published
              WHERE published_at >= date_trunc('minute', $1::timestamptz) - make_interval(mins => $2)
              GROUP BY 1",
        )
        .bind(now)
        .bind((CHART_MINUTES - 1) as i32)
        .fetch_all(pool)
        .await?;
        (now, rows)
    };
    let last = now.duration_trunc(Duration::minutes(1)).unwrap_or(now);
    Ok((0..CHART_MINUTES)
        .rev()
        .map(|back| {
            let minute = last - Duration::minutes(back);
            MinuteCount {
                minute,
                published: rows
                    .iter()
                    .find(|(m, _)| *m == minute)
                    .map(|(_, n)| *n)
                    .unwrap_or(0),
            }
        })
        .collect())
}

/// Backlog per `column` (`tenant_id` or `event_type`): exact on a small table, else from a
/// sample of about [`BREAKDOWN_EXACT_UP_TO`] rows scaled to the table's estimated size.
async fn backlog(pool: &PgPool, column: &str) -> Result<Backlog> {
    let column = if column == "tenant_id" {
        "tenant_id"
    } else {
        "event_type"
    };
    let rows_est = estimate::table_rows(pool, "outbox_event").await?;
    let exact = rows_est <= BREAKDOWN_EXACT_UP_TO
        && estimate::capped(pool, "outbox_event").await?.is_some();
    let source = if exact {
        "outbox_event".to_string()
    } else {
        let p = (BREAKDOWN_EXACT_UP_TO / rows_est.max(1.0) * 100.0).clamp(0.01, 100.0);
        format!("outbox_event TABLESAMPLE SYSTEM ({p})")
    };
    let sql = format!(
        "SELECT {column} AS key,
                count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) FILTER (WHERE status = 'held') AS held,
                count(*) FILTER (WHERE status = 'dead') AS dead,
                sum(count(*)) OVER ()::int8 AS total
           FROM {source} GROUP BY {column}
          ORDER BY count(*) DESC, {column}"
    );
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    use sqlx::Row;
    let sampled: i64 = rows
        .first()
        .map(|r| r.try_get::<i64, _>("total"))
        .transpose()?
        .unwrap_or(0);
    let scale = if exact || sampled == 0 {
        1.0
    } else {
        // The sample's share of the table, measured rather than the asked percentage (pages
        // differ in how many live rows they hold).
        rows_est / sampled as f64
    };
    let mut out = Vec::new();
    for r in rows.iter().take(BREAKDOWN_ROWS as usize) {
        let s = |c: &str| -> Result<i64> {
            Ok((r.try_get::<i64, _>(c)? as f64 * scale).round() as i64)
        };
        out.push(BacklogRow {
            key: r.try_get("key")?,
            pending: s("pending")?,
            held: s("held")?,
            dead: s("dead")?,
        });
    }
    Ok(Backlog {
        rows: out,
        sampled_rows: (!exact).then_some(sampled),
    })
}
