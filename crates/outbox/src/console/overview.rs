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
pub const BREAKDOWN_EXACT_UP_TO: f64 = 10_000.0;
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

/// Reads the overview of one outbox database: a handful of statements, run two at a time
/// (the console's pool), none of which walks more than an index range or a small sample.
pub async fn overview(pool: &PgPool) -> Result<Overview> {
    // The two longest first, so that they take the pool's two connections at once.
    let (oldest, backlogs, counts, (relays, unowned_partitions, last_published_at), chart, holds) =
        tokio::try_join!(
            oldest_pending_age(pool),
            backlogs(pool),
            estimate::state_counts(pool),
            relays(pool),
            published_per_minute(pool),
            route_holds::list(pool),
        )?;
    let held_orphaned = if counts.held.is_estimate() || counts.dead.is_estimate() {
        None
    } else {
        Some(crate::pg::held_counts(pool).await?.orphaned)
    };
    let (by_tenant, by_event_type) = backlogs;
    Ok(Overview {
        pending: counts.pending,
        held: counts.held,
        dead: counts.dead,
        published: counts.published,
        held_orphaned,
        oldest_pending_age_seconds: oldest,
        published_per_minute: chart,
        last_published_at,
        relays,
        unowned_partitions,
        route_holds: holds,
        by_tenant,
        by_event_type,
    })
}

/// Relays with their partitions, the partitions nobody leases, and the last publish.
async fn relays(pool: &PgPool) -> Result<(Vec<Relay>, Vec<i16>, Option<DateTime<Utc>>)> {
    let relays: Vec<Relay> = sqlx::query_as(
        "SELECT r.relay_id, r.host, r.pid, r.started_at, r.heartbeat_at,
                COALESCE(array_agg(p.partition ORDER BY p.partition) FILTER (WHERE p.partition IS NOT NULL), '{}') AS partitions
         FROM outbox_relay r
         LEFT JOIN outbox_partition p ON p.owner = r.relay_id AND p.lease_until > now()
         GROUP BY r.relay_id, r.host, r.pid, r.started_at, r.heartbeat_at ORDER BY r.relay_id",
    )
    .fetch_all(pool)
    .await?;
    let (unowned, last): (Vec<i16>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT COALESCE((SELECT array_agg(partition ORDER BY partition) FROM outbox_partition
                           WHERE owner IS NULL OR lease_until <= now()), '{}'),
                (SELECT max(published_at) FROM outbox_published)",
    )
    .fetch_one(pool)
    .await?;
    Ok((relays, unowned, last))
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

/// Backlog per tenant and per event type: exact on a small table, else from one sample of about
/// [`BREAKDOWN_EXACT_UP_TO`] rows (`TABLESAMPLE SYSTEM`) scaled to the table's estimated size.
async fn backlogs(pool: &PgPool) -> Result<(Backlog, Backlog)> {
    use sqlx::Row;
    let (small, rows_est) = estimate::event_rows(pool, BREAKDOWN_EXACT_UP_TO as i64).await?;
    let exact = small.is_some();
    let source = if exact {
        "outbox_event".to_string()
    } else {
        let p = (BREAKDOWN_EXACT_UP_TO / rows_est.max(1.0) * 100.0).clamp(0.01, 100.0);
        format!("outbox_event TABLESAMPLE SYSTEM ({p})")
    };
    let sql = format!(
        "SELECT GROUPING(tenant_id) AS by_type, COALESCE(tenant_id, event_type) AS key,
                count(*) FILTER (WHERE status = 'pending') AS pending,
                count(*) FILTER (WHERE status = 'held') AS held,
                count(*) FILTER (WHERE status = 'dead') AS dead,
                count(*) AS n
           FROM {source} GROUP BY GROUPING SETS ((tenant_id), (event_type), ())
          ORDER BY 1, count(*) DESC, 2"
    );
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    // The empty grouping set is the sample's size.
    let mut sampled = 0i64;
    for r in &rows {
        if r.try_get::<Option<String>, _>("key")?.is_none() {
            sampled = r.try_get("n")?;
        }
    }
    let scale = if exact || sampled == 0 {
        1.0
    } else {
        // The sample's measured share of the table (pages differ in how many live rows they
        // hold, so the asked percentage is not it).
        rows_est / sampled as f64
    };
    let mut out = (Vec::new(), Vec::new());
    for r in &rows {
        let Some(key) = r.try_get::<Option<String>, _>("key")? else {
            continue;
        };
        let list = if r.try_get::<i32, _>("by_type")? == 1 {
            &mut out.1
        } else {
            &mut out.0
        };
        if list.len() >= BREAKDOWN_ROWS as usize {
            continue;
        }
        let s = |c: &str| -> Result<i64> {
            Ok((r.try_get::<i64, _>(c)? as f64 * scale).round() as i64)
        };
        list.push(BacklogRow {
            key,
            pending: s("pending")?,
            held: s("held")?,
            dead: s("dead")?,
        });
    }
    let sampled_rows = (!exact).then_some(sampled);
    Ok((
        Backlog {
            rows: out.0,
            sampled_rows,
        },
        Backlog {
            rows: out.1,
            sampled_rows,
        },
    ))
}
