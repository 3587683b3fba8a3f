//! Operator queries and actions over the outbox tables: status, dead letters (list, show, replay,
//! purge, each audited) and one retention pass. The `outbox` binary prints what these return.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::{OutboxError, Result};

/// Row counts per state.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StateCounts {
    /// Waiting for delivery.
    pub pending: i64,
    /// Acknowledged by the broker and kept for retention.
    pub published: i64,
    /// Dead letters.
    pub dead: i64,
    /// Waiting behind a dead letter of their aggregate (delivered after its replay or purge).
    pub held: i64,
    /// Of `held`: rows with no blocking dead letter ahead of them in their aggregate, which
    /// nothing will release (docs/outbox-table.md, "Writers' isolation level"). Should be 0.
    pub held_orphaned: i64,
}

/// Pending or dead events of one tenant or event type.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct Breakdown {
    /// Tenant id or event type.
    pub key: String,
    /// Pending events.
    pub pending: i64,
    /// Dead letters.
    pub dead: i64,
    /// Held behind a dead letter.
    pub held: i64,
}

/// A relay with a recent heartbeat and the partitions (its share) it leases.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct RelayShare {
    /// The relay's id.
    pub relay_id: String,
    /// Host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: i32,
    /// Last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// Partitions it holds a valid lease on.
    pub partitions: Vec<i16>,
}

/// What `outbox status` shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// Rows per state.
    pub counts: StateCounts,
    /// Age of the oldest pending event, in seconds.
    pub oldest_pending_age_seconds: Option<f64>,
    /// Pending and dead per tenant (tenants with either).
    pub by_tenant: Vec<Breakdown>,
    /// Pending and dead per event type.
    pub by_event_type: Vec<Breakdown>,
    /// Relays and their shares.
    pub relays: Vec<RelayShare>,
    /// Partitions no relay holds a valid lease on.
    pub unowned_partitions: Vec<i16>,
}

/// Reads the outbox's state.
pub async fn status(pool: &PgPool) -> Result<Status> {
    let (pending, published, dead, held, age): (i64, i64, i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'), (SELECT count(*) FROM outbox_published),
                count(*) FILTER (WHERE status = 'dead'), count(*) FILTER (WHERE status = 'held'),
                EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE status = 'pending'))::float8
         FROM outbox_event",
    )
    .fetch_one(pool)
    .await?;
    let breakdown = |col: &str| {
        format!(
            "SELECT {col} AS key, count(*) FILTER (WHERE status = 'pending') AS pending,
                    count(*) FILTER (WHERE status = 'dead') AS dead,
                    count(*) FILTER (WHERE status = 'held') AS held
             FROM outbox_event GROUP BY {col} ORDER BY {col}"
        )
    };
    let held_counts = crate::pg::held_counts(pool).await?;
    let by_tenant = sqlx::query_as::<_, Breakdown>(&breakdown("tenant_id"))
        .fetch_all(pool)
        .await?;
    let by_event_type = sqlx::query_as::<_, Breakdown>(&breakdown("event_type"))
        .fetch_all(pool)
        .await?;
    let relays: Vec<RelayShare> = sqlx::query_as(
        "SELECT r.relay_id, r.host, r.pid, r.heartbeat_at,
                COALESCE(array_agg(p.partition ORDER BY p.partition) FILTER (WHERE p.partition IS NOT NULL), '{}') AS partitions
         FROM outbox_relay r
         LEFT JOIN outbox_partition p ON p.owner = r.relay_id AND p.lease_until > now()
         GROUP BY r.relay_id, r.host, r.pid, r.heartbeat_at ORDER BY r.relay_id",
    )
    .fetch_all(pool)
    .await?;
    let unowned: Vec<i16> = sqlx::query_scalar(
        "SELECT partition FROM outbox_partition WHERE owner IS NULL OR lease_until <= now() ORDER BY partition",
    )
    .fetch_all(pool)
    .await?;
    Ok(Status {
        counts: StateCounts {
            pending,
            published,
            dead,
            held,
            held_orphaned: held_counts.orphaned,
        },
        oldest_pending_age_seconds: age,
        by_tenant,
        by_event_type,
        relays,
        unowned_partitions: unowned,
    })
}

/// Which dead letters an operator means. All given conditions must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterFilter {
    /// One event.
    pub event_id: Option<Uuid>,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Aggregate type.
    pub aggregate_type: Option<String>,
    /// Aggregate id.
    pub aggregate_id: Option<String>,
    /// Dead-lettered at or after.
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before.
    pub until: Option<DateTime<Utc>>,
    /// Failure group (`<reason code>: <normalized message>`, column `error_group`; the console's
    /// grouping).
    pub error_group: Option<String>,
    /// Dead-lettered at or before this moment: a dry run's time, so that applying it leaves out
    /// what was dead-lettered after it was shown.
    pub as_of: Option<DateTime<Utc>>,
    /// At most this many (listing only).
    pub limit: Option<i64>,
}

impl DeadLetterFilter {
    /// True when no condition is set (the filter means every dead letter).
    pub fn is_empty(&self) -> bool {
        self.event_id.is_none()
            && self.tenant_id.is_none()
            && self.aggregate_type.is_none()
            && self.aggregate_id.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.error_group.is_none()
    }
}

/// A dead letter as operators see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// Event id.
    pub event_id: Uuid,
    /// Tenant.
    pub tenant_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Position in its aggregate.
    pub seq: i64,
    /// Event type.
    pub event_type: String,
    /// Routing key.
    pub topic: String,
    /// Failed attempts.
    pub attempts: i32,
    /// The last error.
    pub last_error: Option<String>,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// When it was dead-lettered.
    pub dead_at: Option<DateTime<Utc>>,
    /// The payload as text (lossy for non-UTF-8 payloads).
    pub payload: String,
}

const DEAD_WHERE: &str = "status = 'dead'
    AND ($1::uuid IS NULL OR event_id = $1) AND ($2::text IS NULL OR tenant_id = $2)
    AND ($3::text IS NULL OR aggregate_type = $3) AND ($4::text IS NULL OR aggregate_id = $4)
    AND ($5::timestamptz IS NULL OR dead_at >= $5) AND ($6::timestamptz IS NULL OR dead_at < $6)
    AND ($7::text IS NULL OR error_group = $7) AND ($8::timestamptz IS NULL OR dead_at <= $8)";

/// Binds `filter` to `$1`..`$8` of a statement built around [`DEAD_WHERE`].
fn bind_filter<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    f: &'q DeadLetterFilter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(f.event_id)
        .bind(&f.tenant_id)
        .bind(&f.aggregate_type)
        .bind(&f.aggregate_id)
        .bind(f.since)
        .bind(f.until)
        .bind(&f.error_group)
        .bind(f.as_of)
}

/// Dead letters matching `filter`, oldest event first (the order replay delivers them in).
pub async fn dead_letters(pool: &PgPool, filter: &DeadLetterFilter) -> Result<Vec<DeadLetter>> {
    let sql = format!(
        "SELECT event_id, tenant_id, aggregate_type, aggregate_id, seq, event_type, topic, attempts, last_error,
                created_at, dead_at, payload
         FROM outbox_event WHERE {DEAD_WHERE} ORDER BY id LIMIT $9"
    );
    let rows = bind_filter(sqlx::query(&sql), filter)
        .bind(filter.limit.unwrap_or(100).clamp(1, 100_000))
        .fetch_all(pool)
        .await?;
    rows.iter().map(dead_letter_from_row).collect()
}

fn dead_letter_from_row(r: &sqlx::postgres::PgRow) -> Result<DeadLetter> {
    use sqlx::Row;
    let payload: Vec<u8> = r.try_get("payload")?;
    Ok(DeadLetter {
        event_id: r.try_get("event_id")?,
        tenant_id: r.try_get("tenant_id")?,
        aggregate_type: r.try_get("aggregate_type")?,
        aggregate_id: r.try_get("aggregate_id")?,
        seq: r.try_get("seq")?,
        event_type: r.try_get("event_type")?,
        topic: r.try_get("topic")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        dead_at: r.try_get("dead_at")?,
        payload: String::from_utf8_lossy(&payload).into_owned(),
    })
}

/// How many dead letters match `filter` (its `limit` is ignored): an action's dry run.
pub async fn count_dead_letters(pool: &PgPool, filter: &DeadLetterFilter) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM outbox_event WHERE {DEAD_WHERE}");
    let row = bind_filter(sqlx::query(&sql), filter)
        .fetch_one(pool)
        .await?;
    Ok(sqlx::Row::try_get(&row, 0)?)
}

/// One dead letter by event id.
pub async fn dead_letter(pool: &PgPool, event_id: Uuid) -> Result<DeadLetter> {
    let filter = DeadLetterFilter {
        event_id: Some(event_id),
        ..Default::default()
    };
    dead_letters(pool, &filter)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| OutboxError::NotFound(format!("no dead letter with event id {event_id}")))
}

/// Puts matching dead letters back into delivery (attempts reset, last error kept until they are
/// published) and records who did it. Rows keep their id and sequence, so relays deliver them in
/// their original order, ahead of the later events of their aggregates. Returns the event ids.
pub async fn replay(pool: &PgPool, filter: &DeadLetterFilter, actor: &str) -> Result<Vec<Uuid>> {
    act(pool, filter, actor, "replay").await
}

/// Purges matching dead letters for good (releasing their aggregates) and records who did it,
/// with the event ids, in `outbox_audit`. Returns the event ids.
///
/// A purged event is never delivered, but its place in its aggregate's sequence is: the row
/// becomes a **skip marker** (payload and headers replaced, `outboxSkip` set), which the relay
/// publishes in order with the header `Outbox-Skip: purged`, so that consumers move past the
/// purged seq instead of waiting for it for ever. A marker that cannot be delivered either (dead
/// again), or a row no broker could carry (an aggregate id with a control character) is deleted.
pub async fn purge(pool: &PgPool, filter: &DeadLetterFilter, actor: &str) -> Result<Vec<Uuid>> {
    act(pool, filter, actor, "purge").await
}

async fn act(
    pool: &PgPool,
    filter: &DeadLetterFilter,
    actor: &str,
    action: &str,
) -> Result<Vec<Uuid>> {
    // Replayed rows are due at once ('-infinity', as new rows): a due time in the future would let
    // a later event of the aggregate overtake them (issue 10).
    let change = match action {
        "replay" => "UPDATE outbox_event SET status = 'pending', attempts = 0, next_attempt_at = '-infinity',
                     dead_at = NULL, blocks_aggregate = false",
        _ => "DELETE FROM outbox_event",
    };
    // The marker: a new body and headers (the old ones may be what made the row undeliverable,
    // and would fail the table's CHECKs on UPDATE); id, seq, aggregate and topic stay.
    let marker = format!(
        "UPDATE outbox_event SET status = 'pending', attempts = 0, next_attempt_at = '-infinity',
                dead_at = NULL, blocks_aggregate = false,
                payload = convert_to(json_build_object('eventId', event_id, 'eventType', event_type,
                                     'tenantId', tenant_id, '{skip}', 'purged')::text, 'UTF8'),
                headers = jsonb_build_object('{skip}', 'purged'),
                last_error = 'purged: ' || coalesce(last_error, '')
          WHERE {DEAD_WHERE} AND NOT headers ? '{skip}' AND aggregate_id !~ '[[:cntrl:]]'
          RETURNING event_id",
        skip = crate::publisher::SKIP_HEADER
    );
    let mut tx = pool.begin().await?;
    // The rows these dead letters held are released by the table's trigger
    // (`outbox_event_release`, migration `..._table_contract.sql`), which also covers a DELETE
    // or UPDATE by hand.
    let mut rows = Vec::new();
    if action == "purge" {
        rows = bind_filter(sqlx::query(&marker), filter)
            .fetch_all(&mut *tx)
            .await?;
    }
    let markers = rows.len();
    let sql = format!("{change} WHERE {DEAD_WHERE} RETURNING event_id");
    rows.extend(
        bind_filter(sqlx::query(&sql), filter)
            .fetch_all(&mut *tx)
            .await?,
    );
    let ids: Vec<Uuid> = rows
        .iter()
        .map(|r| sqlx::Row::try_get(r, "event_id"))
        .collect::<std::result::Result<_, _>>()?;
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO outbox_audit (action, actor, event_ids, detail) VALUES ($1, $2, $3, $4)",
        )
        .bind(action)
        .bind(actor)
        .bind(&ids)
        .bind(if action == "purge" {
            serde_json::json!({ "count": ids.len(), "skip_markers": markers })
        } else {
            serde_json::json!({ "count": ids.len() })
        })
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(crate::enqueue::NOTIFY_CHANNEL)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(ids)
}

/// An entry of the audit trail.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct AuditEntry {
    /// When.
    pub at: DateTime<Utc>,
    /// `replay` or `purge`.
    pub action: String,
    /// Who.
    pub actor: String,
    /// The events concerned.
    pub event_ids: Vec<Uuid>,
}

/// The most recent audit entries, newest first.
pub async fn audit(pool: &PgPool, limit: i64) -> Result<Vec<AuditEntry>> {
    Ok(sqlx::query_as(
        "SELECT at, action, actor, event_ids FROM outbox_audit ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// One retention pass: deletes published rows older than `retention` in batches of `batch`,
/// pausing `pause` between batches so that producers keep their latency (or, with `dry_run`, only
/// counts them). Pending rows and dead letters are never touched.
pub async fn cleanup(
    pool: &PgPool,
    retention: std::time::Duration,
    batch: i64,
    pause: std::time::Duration,
    dry_run: bool,
) -> Result<u64> {
    if batch < 1 {
        return Err(OutboxError::Config(
            "cleanup batch must be at least 1".into(),
        ));
    }
    let secs = retention.as_secs_f64();
    if dry_run {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_published WHERE published_at < now() - make_interval(secs => $1)",
        )
        .bind(secs)
        .fetch_one(pool)
        .await?;
        return Ok(n as u64);
    }
    let store = crate::PgStore::new(pool.clone());
    let mut total = 0u64;
    loop {
        let n = crate::store::RelayStore::cleanup_batch(&store, retention, batch).await?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
        tokio::time::sleep(pause).await;
    }
}

/// One compaction pass over `outbox_aggregate`: removes, in batches of `batch` with `pause`
/// between them, the sequence rows of aggregates idle for `horizon` with nothing pending, held or
/// dead. Their next event starts a new `seq_epoch` at seq 1. Returns how many were removed.
pub async fn compact_aggregates(
    pool: &PgPool,
    horizon: std::time::Duration,
    batch: i64,
    pause: std::time::Duration,
) -> Result<u64> {
    if batch < 1 {
        return Err(OutboxError::Config(
            "cleanup batch must be at least 1".into(),
        ));
    }
    let store = crate::PgStore::new(pool.clone());
    let mut total = 0u64;
    loop {
        let n = crate::store::RelayStore::compact_aggregates(&store, horizon, batch).await?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
        tokio::time::sleep(pause).await;
    }
}
