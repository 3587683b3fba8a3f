//! PostgreSQL implementation of the relay's storage.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::{OutboxError, Result};
use crate::publisher::OutboundMessage;
use crate::store::{Fence, LeaseState, RelayStore, Settlement};

/// Number of partitions in the schema (see the migration's `outbox_partition_of`).
pub const PARTITIONS: i64 = 64;

/// The relay's storage on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Wraps an existing pool.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Opens a pool for a relay. `connect_lazy` lets a relay start while the database is down; its
    /// loop retries until the database answers.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(url)?;
        Ok(Self { pool })
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A transaction for the relay's large reads (the claim, the backlog gauge) with JIT and
    /// parallel workers off, set in one round trip and for this transaction only, so the caller's
    /// pool (which may be shared with an application) is left untouched. Why: once the planner
    /// has statistics of a large backlog, the claim's estimated cost passes `jit_above_cost` and
    /// compiling it took about 0.5 s per claim against 9 ms for running it; and the gauge, read
    /// every 2 s, ran as a three-process parallel scan (~110 ms on 200,000 rows) that took CPU
    /// from the drain it reports on (docs/benchmarks.md).
    async fn read_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT set_config('jit', 'off', true), set_config('max_parallel_workers_per_gather', '0', true)",
        )
        .execute(&mut *tx)
        .await?;
        Ok(tx)
    }
}

/// Retries and dead letters are written only while the relay still holds the row's partition
/// under the epoch it claimed it in (`$4` relay id, `$5`/`$6` its partitions and epochs): a relay
/// that stalled past its lease must not reschedule or dead-letter a row that another relay now
/// owns. Acknowledgements are not fenced: the broker has the event, whoever records it.
/// `first` is the number of the first of the three parameters.
fn fence_sql(first: usize) -> String {
    let (relay, parts, epochs) = (first, first + 1, first + 2);
    format!(
        "EXISTS (SELECT 1 FROM outbox_partition p
            JOIN unnest(${parts}::smallint[], ${epochs}::bigint[]) AS f(part, epoch)
              ON f.part = p.partition AND f.epoch = p.epoch
            WHERE p.partition = e.partition AND p.owner = ${relay})"
    )
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl RelayStore for PgStore {
    async fn lease_round(
        &self,
        relay_id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<LeaseState> {
        let lease_ms = millis(lease);
        let mut tx = self.pool.begin().await?;
        // The heartbeat is taken only by the instance that holds the id, or over a heartbeat
        // older than a lease (a crashed predecessor): two live processes never share an id, so
        // a relay paused past its lease cannot come back and renew what another instance holds.
        let took: Option<String> = sqlx::query_scalar(
            "INSERT INTO outbox_relay (relay_id, host, pid, instance) VALUES ($1, $2, $3, $4)
             ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now(), host = EXCLUDED.host,
                 pid = EXCLUDED.pid, instance = EXCLUDED.instance,
                 started_at = CASE WHEN outbox_relay.instance = EXCLUDED.instance
                                   THEN outbox_relay.started_at ELSE now() END
             WHERE outbox_relay.instance = EXCLUDED.instance
                OR outbox_relay.heartbeat_at < now() - make_interval(secs => $5 / 1000.0)
             RETURNING relay_id",
        )
        .bind(relay_id)
        .bind(hostname())
        .bind(std::process::id() as i32)
        .bind(instance)
        .bind(lease_ms as f64)
        .fetch_optional(&mut *tx)
        .await?;
        if took.is_none() {
            let (host, pid): (String, i32) =
                sqlx::query_as("SELECT host, pid FROM outbox_relay WHERE relay_id = $1")
                    .bind(relay_id)
                    .fetch_one(&mut *tx)
                    .await?;
            return Err(OutboxError::RelayIdInUse {
                relay_id: relay_id.to_string(),
                host,
                pid,
            });
        }
        // A relay gone for ten leases is history; its partitions expired long ago.
        sqlx::query("DELETE FROM outbox_relay WHERE heartbeat_at < now() - make_interval(secs => $1 * 10 / 1000.0)")
            .bind(lease_ms as f64)
            .execute(&mut *tx)
            .await?;
        // Renewing also keeps partitions whose lease lapsed while nobody else took them, but
        // under a new epoch: what was claimed under the lapsed lease can no longer be settled
        // as a retry or a dead letter (the fence in `settle`).
        let mut owned: Vec<(i16, i64)> = sqlx::query_as(
            "UPDATE outbox_partition SET lease_until = now() + make_interval(secs => $2 / 1000.0),
                    epoch = CASE WHEN lease_until < now() THEN epoch + 1 ELSE epoch END
             WHERE owner = $1 RETURNING partition, epoch",
        )
        .bind(relay_id)
        .bind(lease_ms as f64)
        .fetch_all(&mut *tx)
        .await?;
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_relay WHERE heartbeat_at > now() - make_interval(secs => $1 / 1000.0)",
        )
        .bind(lease_ms as f64)
        .fetch_one(&mut *tx)
        .await?;
        let live = live.max(1);
        let target = ((PARTITIONS + live - 1) / live) as usize;
        owned.sort_unstable();
        if owned.len() > target {
            let excess: Vec<i16> = owned
                .split_off(target)
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            sqlx::query(
                "UPDATE outbox_partition SET owner = NULL, lease_until = NULL
                 WHERE owner = $1 AND partition = ANY($2)",
            )
            .bind(relay_id)
            .bind(&excess)
            .execute(&mut *tx)
            .await?;
        } else if owned.len() < target {
            let got: Vec<(i16, i64)> = sqlx::query_as(
                "UPDATE outbox_partition SET owner = $1, lease_until = now() + make_interval(secs => $2 / 1000.0),
                        epoch = epoch + 1
                 WHERE partition IN (
                     SELECT partition FROM outbox_partition
                     WHERE owner IS NULL OR lease_until < now()
                     ORDER BY partition LIMIT $3 FOR UPDATE SKIP LOCKED)
                 RETURNING partition, epoch",
            )
            .bind(relay_id)
            .bind(lease_ms as f64)
            .bind((target - owned.len()) as i64)
            .fetch_all(&mut *tx)
            .await?;
            owned.extend(got);
            owned.sort_unstable();
        }
        tx.commit().await?;
        Ok(LeaseState {
            owned: owned.iter().map(|(p, _)| *p).collect(),
            epochs: owned.iter().map(|(_, e)| *e).collect(),
            live_relays: live,
        })
    }

    async fn release_all(&self, relay_id: &str, instance: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // Only while the id is still this instance's: a successor that took it over keeps its
        // partitions.
        let ours = sqlx::query("DELETE FROM outbox_relay WHERE relay_id = $1 AND instance = $2")
            .bind(relay_id)
            .bind(instance)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if ours > 0 {
            sqlx::query(
                "UPDATE outbox_partition SET owner = NULL, lease_until = NULL WHERE owner = $1",
            )
            .bind(relay_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim(
        &self,
        relay_id: &str,
        limit: i64,
        dead_blocks: bool,
        exclude: &[Uuid],
        lease_margin: Duration,
    ) -> Result<Vec<OutboundMessage>> {
        // One statement: `t` finds the tenants with pending events by a loose index scan (one
        // index probe per tenant, however large any backlog), and each tenant gets an equal share
        // of the batch, so a quiet tenant's event waits for at most the batch in flight, not for
        // another tenant's backlog. Within a tenant, id order is commit order per aggregate (the
        // insert trigger draws the id under the aggregate's lock), so `ORDER BY id LIMIT share`
        // yields a prefix of each aggregate's deliverable events. NOT EXISTS holds back everything
        // behind a row that waits for its retry (or is dead, when dead letters block). The final
        // LIMIT bounds the whole batch: with more tenants than the batch size each share is one
        // row, and 6,000 tenants used to yield 6,000 rows for a batch of 1,000; cutting the union
        // in id order keeps a prefix of every aggregate. Only partitions whose lease outlives
        // `lease_margin` are claimed from.
        let mut tx = self.read_tx().await?;
        let rows = sqlx::query(
            "WITH RECURSIVE t(tenant_id) AS (
                 (SELECT tenant_id FROM outbox_event WHERE status = 'pending' ORDER BY tenant_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT e.tenant_id FROM outbox_event e
                         WHERE e.status = 'pending' AND e.tenant_id > t.tenant_id
                         ORDER BY e.tenant_id LIMIT 1)
                 FROM t WHERE t.tenant_id IS NOT NULL),
             tenants AS (SELECT tenant_id FROM t WHERE tenant_id IS NOT NULL),
             n AS (SELECT count(*) AS k FROM tenants)
             SELECT c.* FROM tenants CROSS JOIN n CROSS JOIN LATERAL (
                 SELECT e.id, e.event_id, e.tenant_id, e.aggregate_type, e.aggregate_id, e.seq, e.partition, e.event_type,
                        e.topic, e.payload, e.headers, e.attempts, e.created_at
                 FROM outbox_event e
                 WHERE e.status = 'pending' AND e.tenant_id = tenants.tenant_id
                   AND e.next_attempt_at <= now()
                   AND NOT (e.event_id = ANY($4))
                   AND e.partition = ANY(ARRAY(
                       SELECT p.partition FROM outbox_partition p
                       WHERE p.owner = $1 AND p.lease_until > now() + make_interval(secs => $5 / 1000.0)))
                   AND NOT EXISTS (
                       SELECT 1 FROM outbox_event b
                       WHERE (b.status = 'dead' OR (b.status = 'pending' AND b.attempts > 0))
                         AND b.tenant_id = e.tenant_id AND b.aggregate_type = e.aggregate_type
                         AND b.aggregate_id = e.aggregate_id AND b.id < e.id
                         AND ((b.status = 'pending' AND b.next_attempt_at > now()) OR ($3 AND b.status = 'dead')))
                 ORDER BY e.id
                 LIMIT ($2 + n.k - 1) / n.k) AS c
             ORDER BY c.id
             LIMIT $2",
        )
        .bind(relay_id)
        .bind(limit)
        .bind(dead_blocks)
        .bind(exclude)
        .bind(millis(lease_margin) as f64)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.into_iter().map(|r| row_to_message(&r)).collect()
    }

    async fn settle(
        &self,
        settlements: &[Settlement],
        delete_published: bool,
        fence: &Fence,
    ) -> Result<()> {
        let mut published = Vec::new();
        let (mut retry_ids, mut retry_ms, mut retry_err) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dead_ids, mut dead_err) = (Vec::new(), Vec::new());
        for s in settlements {
            match s {
                Settlement::Published(id) => published.push(*id),
                Settlement::Retry { id, delay, error } => {
                    retry_ids.push(*id);
                    retry_ms.push(millis(*delay));
                    retry_err.push(error.as_str());
                }
                Settlement::Dead { id, error } => {
                    dead_ids.push(*id);
                    dead_err.push(error.as_str());
                }
            }
        }
        // Not waiting for the WAL flush is safe here: a settlement lost in a database crash leaves
        // its rows pending, so they are published again and dropped by the broker as duplicates
        // (the same path as a relay killed before settling). It takes the flush off the relay's
        // critical path. `set_config(.., true)` lasts for the transaction, so it also covers the
        // implicit transaction of a lone statement (docs/benchmarks.md).
        const NO_SYNC: &str =
            "nosync AS (SELECT set_config('synchronous_commit', 'off', true) AS v)";
        // A delete writes no new row version and no index entries; a move (the default, published
        // rows kept for retention) writes one append-only row elsewhere: see the migration
        // `..._published_archive.sql`.
        let published_sql = if delete_published {
            format!(
                "WITH {NO_SYNC} DELETE FROM outbox_event
                 WHERE event_id = ANY($1) AND status = 'pending' AND EXISTS (SELECT 1 FROM nosync)"
            )
        } else {
            format!(
                "WITH {NO_SYNC}, moved AS (
                     DELETE FROM outbox_event
                     WHERE event_id = ANY($1) AND status = 'pending' AND EXISTS (SELECT 1 FROM nosync)
                     RETURNING id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic,
                               payload, headers, seq, partition, attempts, created_at)
                 INSERT INTO outbox_published (id, event_id, tenant_id, aggregate_type, aggregate_id,
                        event_type, topic, payload, headers, seq, partition, attempts, created_at)
                 SELECT * FROM moved"
            )
        };
        if retry_ids.is_empty() && dead_ids.is_empty() {
            // The common case, a clean batch: one statement, one round trip.
            if !published.is_empty() {
                sqlx::query(&published_sql)
                    .bind(&published)
                    .execute(&self.pool)
                    .await?;
            }
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        if !published.is_empty() {
            sqlx::query(&published_sql)
                .bind(&published)
                .execute(&mut *tx)
                .await?;
        }
        if !retry_ids.is_empty() {
            sqlx::query(&format!(
                "UPDATE outbox_event e SET attempts = e.attempts + 1, last_error = u.err,
                        next_attempt_at = now() + make_interval(secs => u.ms / 1000.0)
                 FROM unnest($1::uuid[], $2::bigint[], $3::text[]) AS u(id, ms, err)
                 WHERE e.event_id = u.id AND e.status = 'pending' AND {}",
                fence_sql(4)
            ))
            .bind(&retry_ids)
            .bind(&retry_ms)
            .bind(&retry_err)
            .bind(&fence.relay_id)
            .bind(&fence.partitions)
            .bind(&fence.epochs)
            .execute(&mut *tx)
            .await?;
        }
        if !dead_ids.is_empty() {
            sqlx::query(&format!(
                "UPDATE outbox_event e SET status = 'dead', dead_at = now(), attempts = e.attempts + 1,
                        last_error = u.err
                 FROM unnest($1::uuid[], $2::text[]) AS u(id, err)
                 WHERE e.event_id = u.id AND e.status = 'pending' AND {}",
                fence_sql(3)
            ))
            .bind(&dead_ids)
            .bind(&dead_err)
            .bind(&fence.relay_id)
            .bind(&fence.partitions)
            .bind(&fence.epochs)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn cleanup_batch(&self, retention: Duration, batch: i64) -> Result<u64> {
        // SKIP LOCKED and a bounded batch: the pass never waits on, nor holds up, anyone else.
        let done = sqlx::query(
            "DELETE FROM outbox_published WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM outbox_published
                 WHERE published_at < now() - make_interval(secs => $1 / 1000.0)
                 ORDER BY published_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
        )
        .bind(millis(retention) as f64)
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn backlog(&self) -> Result<(i64, Option<Duration>)> {
        let mut tx = self.read_tx().await?;
        let row = sqlx::query(
            "SELECT count(*) AS n, EXTRACT(EPOCH FROM (now() - min(created_at)))::float8 AS age
             FROM outbox_event WHERE status = 'pending'",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let n: i64 = row.try_get("n")?;
        let age: Option<f64> = row.try_get("age")?;
        Ok((n, age.map(|a| Duration::from_secs_f64(a.max(0.0)))))
    }
}

/// Maps a row of `outbox_event` (the claim's columns) to the message handed to the publisher.
pub fn row_to_message(r: &sqlx::postgres::PgRow) -> Result<OutboundMessage> {
    let headers: serde_json::Value = r.try_get("headers")?;
    let headers: BTreeMap<String, String> = headers
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let payload: Vec<u8> = r.try_get("payload")?;
    Ok(OutboundMessage {
        id: r.try_get("id")?,
        event_id: r.try_get::<Uuid, _>("event_id")?,
        tenant_id: r.try_get("tenant_id")?,
        aggregate_type: r.try_get("aggregate_type")?,
        aggregate_id: r.try_get("aggregate_id")?,
        seq: r.try_get("seq")?,
        partition: r.try_get("partition")?,
        event_type: r.try_get("event_type")?,
        topic: r.try_get("topic")?,
        payload: Bytes::from(payload),
        headers,
        attempts: r.try_get("attempts")?,
        created_at: r.try_get::<DateTime<Utc>, _>("created_at")?,
    })
}

/// This machine's name, for `outbox status`.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
