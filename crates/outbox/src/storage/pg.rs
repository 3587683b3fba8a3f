//! PostgreSQL implementation of the relay's storage.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Connection, PgPool, Row};
use uuid::Uuid;

use crate::error::{OutboxError, Result};
use crate::publisher::OutboundMessage;
use crate::store::{
    Claimed, Fence, HeldCounts, HeldRoutes, LeaseState, RelayStore, RouteHoldRow, Settlement,
};

/// Number of partitions in the schema (see the migration's `outbox_partition_of`).
pub const PARTITIONS: i64 = 64;

/// The relay's storage on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The `dead_blocks` of the last claim. Why here: `settle` must know whether a dead letter
    /// holds its aggregate (its later rows become `held`), the trait's `settle` does not carry the
    /// relay's mode, and the claim that precedes every settlement does.
    dead_blocks: Arc<AtomicBool>,
    /// This database's identity (`outbox_producer`), read once: sent with every event as
    /// `Outbox-Producer-Id`.
    producer: Arc<tokio::sync::OnceCell<Uuid>>,
    /// The pool's connections start with JIT and parallel workers off ([`relay_connect_options`]):
    /// the relay's reads run as single statements, not in a transaction of their own
    /// ([`PgStore::read_conn`]).
    session_settings: bool,
}

/// The settings the relay's large reads need (see [`PgStore::read_conn`]), as startup options.
const READ_SETTINGS: [(&str, &str); 2] = [("jit", "off"), ("max_parallel_workers_per_gather", "0")];

/// Connection settings for a pool of the relay's own: `url` with JIT and parallel workers off for
/// the whole session, sent with the connection's startup message (no round trip). A [`PgStore`]
/// over such a pool claims in one statement instead of four (`BEGIN`, the settings, the claim,
/// `COMMIT`): at a steady load of small batches those round trips were most of the relay's
/// statements (docs/benchmarks.md, "The relay at steady load"). Pools shared with an application
/// keep its settings: [`PgStore::new`] then sets them per read, in a transaction.
///
/// Also `plan_cache_mode = force_generic_plan`: the claim is one prepared statement, and
/// PostgreSQL kept planning it afresh for every execution (a custom plan: its generic plan is
/// estimated dearer), 0.375 ms of planning against 0.07 ms of execution for a batch of two events
/// at 1,000 events/s. The claim's parts are written to stay cheap in a generic plan (the
/// exclusion list as a hashed subplan, see `claim_except`).
pub fn relay_connect_options(url: &str) -> Result<PgConnectOptions> {
    let options: PgConnectOptions = url.parse()?;
    Ok(options
        .options(READ_SETTINGS)
        .options([("plan_cache_mode", "force_generic_plan")]))
}

/// Whether startup options (`-c key=value ...`) set everything in [`READ_SETTINGS`].
fn has_read_settings(options: Option<&str>) -> bool {
    let Some(options) = options else {
        return false;
    };
    let set: Vec<&str> = options
        .split_whitespace()
        .filter(|w| *w != "-c")
        .map(|w| w.trim_start_matches("-c"))
        .collect();
    READ_SETTINGS
        .iter()
        .all(|(k, v)| set.iter().any(|w| w.split_once('=') == Some((k, v))))
}

impl PgStore {
    /// Wraps an existing pool.
    pub fn new(pool: PgPool) -> Self {
        let session_settings = has_read_settings(pool.connect_options().get_options());
        Self {
            pool,
            dead_blocks: Arc::new(AtomicBool::new(true)),
            producer: Arc::default(),
            session_settings,
        }
    }

    /// This database's producer identity (`outbox_producer`, made by the migrations).
    pub async fn producer_id(&self) -> Result<Uuid> {
        let id = self
            .producer
            .get_or_try_init(|| async {
                sqlx::query_scalar::<_, Uuid>("SELECT id FROM outbox_producer")
                    .fetch_one(&self.pool)
                    .await
            })
            .await?;
        Ok(*id)
    }

    /// Opens a pool of the relay's own ([`relay_connect_options`]). `connect_lazy` lets a relay
    /// start while the database is down; its loop retries until the database answers.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(relay_connect_options(url)?);
        Ok(Self::new(pool))
    }

    /// The underlying pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection for the relay's large reads (the claim, the backlog and held gauges), with JIT
    /// and parallel workers off. Why: once the planner has statistics of a large backlog, the
    /// claim's estimated cost passes `jit_above_cost` and compiling it took about 0.5 s per claim
    /// against 9 ms for running it; and the gauge, read every 2 s, ran as a three-process parallel
    /// scan (~110 ms on 200,000 rows) that took CPU from the drain it reports on
    /// (docs/benchmarks.md). A pool of the relay's own ([`relay_connect_options`]) has them for
    /// the whole session; on any other pool (which may be shared with an application, and is left
    /// untouched) they are set in one round trip, for a transaction of the read's own.
    async fn read_conn(&self) -> Result<ReadConn> {
        if self.session_settings {
            return Ok(ReadConn::Session(self.pool.acquire().await?));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT set_config('jit', 'off', true), set_config('max_parallel_workers_per_gather', '0', true)",
        )
        .execute(&mut *tx)
        .await?;
        Ok(ReadConn::Transaction(tx))
    }
}

/// A connection of [`PgStore::read_conn`].
enum ReadConn {
    /// A connection of a pool whose sessions have the read settings.
    Session(sqlx::pool::PoolConnection<sqlx::Postgres>),
    /// A transaction that set them for itself.
    Transaction(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl ReadConn {
    /// The connection to read on.
    fn conn(&mut self) -> &mut sqlx::PgConnection {
        match self {
            ReadConn::Session(c) => c,
            ReadConn::Transaction(t) => t,
        }
    }

    /// Ends the read: commits its transaction, if it has one, and gives the connection back.
    async fn finish(self) -> Result<()> {
        if let ReadConn::Transaction(t) = self {
            t.commit().await?;
        }
        Ok(())
    }

    /// The read failed with `e`. If a statement went stale under a migration
    /// ([`is_stale_statement`]), drops this connection's prepared statements, so that its next
    /// read prepares them against the schema as it is now: each connection of the pool that held
    /// the old statement fails one read and comes here, and the relay retries after its usual
    /// back-off.
    async fn failed(mut self, e: OutboxError) -> OutboxError {
        if is_stale_statement(&e) {
            tracing::warn!(
                "the outbox schema changed under this relay (a migration ran while it was \
                 running): preparing its statements again"
            );
            // PostgreSQL takes Close messages inside a failed transaction too; the transaction's
            // rollback follows when it is dropped.
            if let Err(close) = self.conn().clear_cached_statements().await {
                tracing::warn!(error = %close, "could not drop a connection's prepared statements");
            }
        }
        e
    }
}

/// Whether `e` is PostgreSQL refusing a statement prepared before a migration changed the type of a
/// column it returns (`0A000 cached plan must not change result type`). It refuses it in that
/// session for as long as the statement lives, and sqlx keeps prepared statements per connection
/// until the connection closes (`max_lifetime`, 30 min by default): a relay would keep its leases and
/// fail every claim until then (migration `20261213000001` changes six columns' types).
fn is_stale_statement(e: &OutboxError) -> bool {
    match e {
        OutboxError::Database(sqlx::Error::Database(db)) => {
            db.code().as_deref() == Some("0A000")
                && db
                    .message()
                    .contains("cached plan must not change result type")
        }
        _ => false,
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
    ) -> Result<Claimed> {
        let none = HeldRoutes::default();
        self.claim_except(relay_id, limit, dead_blocks, exclude, lease_margin, &none)
            .await
    }

    async fn claim_except(
        &self,
        relay_id: &str,
        limit: i64,
        dead_blocks: bool,
        exclude: &[Uuid],
        lease_margin: Duration,
        held: &HeldRoutes,
    ) -> Result<Claimed> {
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
        // "Waits for its retry" covers every earlier pending row that is not itself claimable:
        // a row that never failed is due
        // at once (the insert trigger sets `next_attempt_at` to '-infinity' and a CHECK keeps it
        // so until a failure), and a failed row is in the small `outbox_event_blocking` index.
        // Rows behind a blocking dead letter are `held`, out of the pending index, so the cost
        // does not grow with them (docs/benchmarks.md, "claim behind a dead letter").
        self.dead_blocks.store(dead_blocks, Ordering::Relaxed);
        if !dead_blocks {
            self.release_held().await?;
        }
        // Refused routes (issue 19): the aggregates whose first pending event goes to a held
        // route are left out whole, from a hashed list the relay passes (bounded by what it has
        // claimed of the held routes, never a scan of the backlog).
        let (held_cte, held_filter) = if held.is_empty() {
            ("", "")
        } else {
            (
                ", refused AS MATERIALIZED (
                     SELECT * FROM unnest($6::text[], $7::text[], $8::text[]) AS u(tenant_id, aggregate_type, aggregate_id))",
                "AND (e.tenant_id, e.aggregate_type, e.aggregate_id) NOT IN (
                       SELECT r.tenant_id, r.aggregate_type, r.aggregate_id FROM refused r)",
            )
        };
        let sql = format!(
            "WITH RECURSIVE t(tenant_id) AS (
                 (SELECT tenant_id FROM outbox_event WHERE status = 'pending' ORDER BY tenant_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT e.tenant_id FROM outbox_event e
                         WHERE e.status = 'pending' AND e.tenant_id > t.tenant_id
                         ORDER BY e.tenant_id LIMIT 1)
                 FROM t WHERE t.tenant_id IS NOT NULL),
             tenants AS (SELECT tenant_id FROM t WHERE tenant_id IS NOT NULL),
             n AS (SELECT count(*) AS k FROM tenants){held_cte}
             SELECT c.*, n.k AS tenants_pending FROM tenants CROSS JOIN n CROSS JOIN LATERAL (
                 SELECT e.id, e.event_id, e.tenant_id, e.aggregate_type, e.aggregate_id, e.seq, e.partition,
                        e.event_type, e.topic, e.payload, e.headers, e.attempts, e.seq_epoch,
                        -- A timestamp chrono cannot hold must not fail the claim: NULL, and
                        -- the row is dead-lettered by decode_rows.
                        CASE WHEN isfinite(e.created_at) AND e.created_at < '10000-01-01'
                             THEN e.created_at END AS created_at
                 FROM outbox_event e
                 WHERE e.status = 'pending' AND e.tenant_id = tenants.tenant_id
                   AND e.next_attempt_at <= now()
                   -- The rows in flight and being settled (up to two batches): a hashed
                   -- subplan, built once per claim. `NOT (event_id = ANY($4))` compared each
                   -- row with every id in turn once PostgreSQL used its generic plan (after
                   -- five claims): ~2,000 comparisons for each of the ~3,000 rows walked, 55-95 ms
                   -- per claim against 3-20 ms (docs/benchmarks.md, issue 20). No id is NULL.
                   AND e.event_id NOT IN (SELECT unnest($4::uuid[]))
                   AND e.partition = ANY(ARRAY(
                       SELECT p.partition FROM outbox_partition p
                       WHERE p.owner = $1 AND p.lease_until > now() + make_interval(secs => $5 / 1000.0)))
                   AND NOT EXISTS (
                       SELECT 1 FROM outbox_event b
                       WHERE (b.status = 'dead' OR (b.status = 'pending' AND b.attempts > 0))
                         AND b.tenant_id = e.tenant_id AND b.aggregate_type = e.aggregate_type
                         AND b.aggregate_id = e.aggregate_id AND b.id < e.id
                         AND ((b.status = 'pending' AND b.next_attempt_at > now()) OR ($3 AND b.status = 'dead')))
                   {held_filter}
                 ORDER BY e.id
                 LIMIT ($2 + n.k - 1) / n.k) AS c
             ORDER BY c.id
             LIMIT $2"
        );
        let mut query = sqlx::query(&sql)
            .bind(relay_id)
            .bind(limit)
            .bind(dead_blocks)
            .bind(exclude)
            .bind(millis(lease_margin) as f64);
        if !held.is_empty() {
            query = query
                .bind(&held.tenants)
                .bind(&held.aggregate_types)
                .bind(&held.aggregate_ids);
        }
        let mut read = self.read_conn().await?;
        let rows = match query.fetch_all(read.conn()).await {
            Ok(rows) => rows,
            Err(e) => return Err(read.failed(e.into()).await),
        };
        read.finish().await?;
        let drained = drained(&rows, limit)?;
        let (mut batch, bad) = decode_rows(&rows, dead_blocks)?;
        if !batch.is_empty() {
            let producer = self.producer_id().await?;
            for m in &mut batch {
                m.producer_id = Some(producer);
            }
        }
        if !bad.is_empty() {
            for (id, reason) in &bad {
                tracing::error!(event_id = %id, reason = %reason, "row cannot be delivered; dead-lettered");
            }
            metrics::counter!(crate::telemetry::DEAD_LETTERED, "reason" => "undeliverable_row")
                .increment(bad.len() as u64);
            let (ids, errs): (Vec<Uuid>, Vec<String>) = bad.into_iter().unzip();
            let errs: Vec<&str> = errs.iter().map(String::as_str).collect();
            let mut conn = self.pool.acquire().await?;
            // Claimed under the lease just checked: no fence needed.
            dead_letter(&mut conn, &ids, &errs, dead_blocks, None).await?;
        }
        Ok(Claimed {
            messages: batch,
            drained,
        })
    }

    async fn record_route_holds(&self, relay_id: &str, holds: &[RouteHoldRow]) -> Result<()> {
        crate::storage::route_holds::record(&self.pool, relay_id, holds).await
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
                               payload, headers, seq, partition, attempts, created_at, seq_epoch)
                 INSERT INTO outbox_published (id, event_id, tenant_id, aggregate_type, aggregate_id,
                        event_type, topic, payload, headers, seq, partition, attempts, created_at,
                        seq_epoch)
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
            dead_letter(
                &mut tx,
                &dead_ids,
                &dead_err,
                self.dead_blocks.load(Ordering::Relaxed),
                Some(fence),
            )
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

    async fn compact_aggregates(&self, horizon: Duration, batch: i64) -> Result<u64> {
        // An aggregate row may go when nothing of its aggregate is left in `outbox_event` and it
        // has been idle for `horizon`. Its last event (`last_id`) is not pending (pending index),
        // and nothing of it is failing, dead or held (the two small aggregate-keyed indexes): by
        // per-aggregate order nothing earlier is pending either. SKIP LOCKED skips aggregates a
        // producer is writing to; a producer that commits after our snapshot changed `last_at`,
        // and FOR UPDATE re-checks the row's latest version. A producer that comes after the
        // delete inserts a fresh row: the aggregate restarts at seq 1 in a new epoch.
        let done = sqlx::query(
            "DELETE FROM outbox_aggregate WHERE ctid = ANY(ARRAY(
                 SELECT a.ctid FROM outbox_aggregate a
                 WHERE a.last_at < now() - make_interval(secs => $1 / 1000.0)
                   AND NOT EXISTS (SELECT 1 FROM outbox_event e
                                   WHERE e.status = 'pending' AND e.tenant_id = a.tenant_id AND e.id = a.last_id)
                   AND NOT EXISTS (SELECT 1 FROM outbox_event e
                                   WHERE (e.status = 'dead' OR (e.status = 'pending' AND e.attempts > 0))
                                     AND e.tenant_id = a.tenant_id AND e.aggregate_type = a.aggregate_type
                                     AND e.aggregate_id = a.aggregate_id)
                   AND NOT EXISTS (SELECT 1 FROM outbox_event e
                                   WHERE (e.status = 'held' OR (e.status = 'dead' AND e.blocks_aggregate))
                                     AND e.tenant_id = a.tenant_id AND e.aggregate_type = a.aggregate_type
                                     AND e.aggregate_id = a.aggregate_id)
                 LIMIT $2 FOR UPDATE SKIP LOCKED))",
        )
        .bind(millis(horizon) as f64)
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn backlog(&self) -> Result<(i64, Option<Duration>)> {
        let q = sqlx::query(
            "SELECT count(*) AS n, EXTRACT(EPOCH FROM (now() - min(created_at)))::float8 AS age
             FROM outbox_event WHERE status = 'pending'",
        );
        let mut read = self.read_conn().await?;
        let row = match q.fetch_one(read.conn()).await {
            Ok(row) => row,
            Err(e) => return Err(read.failed(e.into()).await),
        };
        read.finish().await?;
        let n: i64 = row.try_get("n")?;
        let age: Option<f64> = row.try_get("age")?;
        Ok((n, age.map(|a| Duration::from_secs_f64(a.max(0.0)))))
    }

    async fn held(&self) -> Result<HeldCounts> {
        // Serial and without JIT, as the backlog gauge (see `read_conn`).
        let mut read = self.read_conn().await?;
        let counts = match held_counts(read.conn()).await {
            Ok(counts) => counts,
            Err(e) => return Err(read.failed(e).await),
        };
        read.finish().await?;
        Ok(counts)
    }
}

/// Held rows, and those with no blocking dead letter ahead of them (orphans). One scan of the
/// `outbox_event_holding` index (its predicate is this WHERE), which is empty in a healthy
/// outbox and holds only what is stuck otherwise; the window keeps it one pass however many rows
/// are held. Measured: 1.7 ms with 1,000 dead letters and nothing held beside 200,000 pending
/// rows; 74 ms with 100,000 rows held behind them (the backlog gauge: 32 ms for the 200,000).
pub(crate) async fn held_counts<'e, E>(db: E) -> Result<HeldCounts>
where
    E: sqlx::PgExecutor<'e>,
{
    let (held, orphaned): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'held'),
                count(*) FILTER (WHERE status = 'held' AND (first_dead IS NULL OR id < first_dead))
         FROM (SELECT status, id,
                      min(id) FILTER (WHERE status = 'dead')
                          OVER (PARTITION BY tenant_id, aggregate_type, aggregate_id) AS first_dead
               FROM outbox_event
               WHERE status = 'held' OR (status = 'dead' AND blocks_aggregate)) h",
    )
    .fetch_one(db)
    .await?;
    Ok(HeldCounts { held, orphaned })
}

/// Maps a row of `outbox_event` (the claim's columns) to the message handed to the publisher.
/// A row that breaks the table contract (see `docs/outbox-table.md`) is an
/// [`OutboxError::InvalidEvent`] naming the broken rule; it never panics.
pub fn row_to_message(r: &sqlx::postgres::PgRow) -> Result<OutboundMessage> {
    decode_row(r, &Cols::of(r)?)?.map_err(OutboxError::InvalidEvent)
}

/// The positions of the claim's columns, looked up once per claim: reading a column by name
/// hashes the name (SipHash) on every read, fourteen reads per row, which showed in the drain's
/// profile (docs/benchmarks.md, issue 20).
struct Cols {
    id: usize,
    event_id: usize,
    tenant_id: usize,
    aggregate_type: usize,
    aggregate_id: usize,
    seq: usize,
    partition: usize,
    seq_epoch: usize,
    event_type: usize,
    topic: usize,
    payload: usize,
    headers: usize,
    attempts: usize,
    created_at: usize,
}

impl Cols {
    fn of(r: &PgRow) -> Result<Self> {
        use sqlx::Column;
        let at = |name: &str| -> Result<usize> { Ok(r.try_column(name)?.ordinal()) };
        Ok(Self {
            id: at("id")?,
            event_id: at("event_id")?,
            tenant_id: at("tenant_id")?,
            aggregate_type: at("aggregate_type")?,
            aggregate_id: at("aggregate_id")?,
            seq: at("seq")?,
            partition: at("partition")?,
            seq_epoch: at("seq_epoch")?,
            event_type: at("event_type")?,
            topic: at("topic")?,
            payload: at("payload")?,
            headers: at("headers")?,
            attempts: at("attempts")?,
            created_at: at("created_at")?,
        })
    }
}

/// Decodes one claimed row. The outer error is a database failure (the whole claim is retried);
/// the inner one is this row's own problem, the reason it is dead-lettered.
fn decode_row(
    r: &sqlx::postgres::PgRow,
    c: &Cols,
) -> Result<std::result::Result<OutboundMessage, String>> {
    let aggregate_id: String = r.try_get(c.aggregate_id)?;
    if aggregate_id.chars().any(char::is_control) {
        return Ok(Err(format!(
            "aggregate_id {aggregate_id:?} contains a control character: no broker header can carry it"
        )));
    }
    // The claim selects NULL for a timestamp chrono cannot represent ('infinity', year 262144+).
    let Some(created_at) = r.try_get::<Option<DateTime<Utc>>, _>(c.created_at)? else {
        return Ok(Err(
            "created_at is infinite or out of range: the relay cannot decode it".into(),
        ));
    };
    let raw: serde_json::Value = r.try_get(c.headers)?;
    let mut headers = BTreeMap::new();
    if let Some(m) = raw.as_object() {
        for (k, v) in m {
            // Only strings are forwarded (as before the contract forbade the others).
            let Some(s) = v.as_str() else { continue };
            if s.chars().any(char::is_control) || k.chars().any(char::is_control) {
                return Ok(Err(format!(
                    "header {k:?} contains a control character: no broker header can carry it"
                )));
            }
            headers.insert(k.clone(), s.to_string());
        }
    }
    let payload: Vec<u8> = r.try_get(c.payload)?;
    Ok(Ok(OutboundMessage {
        id: r.try_get(c.id)?,
        event_id: r.try_get::<Uuid, _>(c.event_id)?,
        tenant_id: r.try_get(c.tenant_id)?,
        aggregate_type: r.try_get(c.aggregate_type)?,
        aggregate_id,
        seq: r.try_get(c.seq)?,
        partition: r.try_get(c.partition)?,
        seq_epoch: r.try_get(c.seq_epoch)?,
        event_type: r.try_get(c.event_type)?,
        topic: r.try_get(c.topic)?,
        payload: Bytes::from(payload),
        headers,
        attempts: r.try_get(c.attempts)?,
        created_at,
        producer_id: None,
    }))
}

/// A claimed row that cannot be delivered: its event id and the reason.
type Undeliverable = (Uuid, String);

/// Whether a claim left no deliverable row behind: it was not cut by the batch size, and no
/// tenant filled its share of the batch (a tenant that got fewer rows than its share has none
/// more to give).
fn drained(rows: &[PgRow], limit: i64) -> Result<bool> {
    if rows.len() as i64 >= limit {
        return Ok(false);
    }
    let Some(first) = rows.first() else {
        return Ok(true);
    };
    let tenants: i64 = first.try_get("tenants_pending")?;
    let share = (limit + tenants.max(1) - 1) / tenants.max(1);
    let mut per_tenant: HashMap<&str, i64> = HashMap::new();
    for r in rows {
        *per_tenant.entry(r.try_get("tenant_id")?).or_default() += 1;
    }
    Ok(per_tenant.values().all(|&n| n < share))
}

/// Splits claimed rows into the batch to publish and the rows to dead-letter at once (event id,
/// reason). With `dead_blocks`, the later rows of a bad row's aggregate leave the batch too: they
/// must not overtake it (the dead-lettering holds them).
fn decode_rows(
    rows: &[sqlx::postgres::PgRow],
    dead_blocks: bool,
) -> Result<(Vec<OutboundMessage>, Vec<Undeliverable>)> {
    let mut batch = Vec::with_capacity(rows.len());
    let mut bad = Vec::new();
    let Some(first) = rows.first() else {
        return Ok((batch, bad));
    };
    let c = Cols::of(first)?;
    let mut stopped: HashSet<(&str, &str, &str)> = HashSet::new();
    fn key<'r>(r: &'r PgRow, c: &Cols) -> Result<(&'r str, &'r str, &'r str)> {
        Ok((
            r.try_get(c.tenant_id)?,
            r.try_get(c.aggregate_type)?,
            r.try_get(c.aggregate_id)?,
        ))
    }
    for r in rows {
        // The aggregate is looked at only once a bad row stopped one (rare): not per row.
        if !stopped.is_empty() && stopped.contains(&key(r, &c)?) {
            continue;
        }
        match decode_row(r, &c)? {
            Ok(m) => batch.push(m),
            Err(reason) => {
                bad.push((r.try_get::<Uuid, _>(c.event_id)?, reason));
                if dead_blocks {
                    stopped.insert(key(r, &c)?);
                }
            }
        }
    }
    Ok((batch, bad))
}

/// Dead-letters pending rows (by event id) with their errors. With `blocks`, the dead letters
/// hold their aggregates: the later pending rows become `held`, out of the pending index, so that
/// the claim does not walk them (however many arrive) until the dead letter is replayed or
/// purged; new rows of the aggregate are inserted `held` by the trigger while it stays so.
/// A created_at the relay cannot decode is replaced by now() so that listing the dead letter works
/// (the rest of the row is kept as written). With `fence`, only rows of partitions the relay still
/// holds under the epochs it claimed them in (see [`fence_sql`]).
async fn dead_letter(
    conn: &mut sqlx::PgConnection,
    ids: &[Uuid],
    errors: &[&str],
    blocks: bool,
    fence: Option<&Fence>,
) -> Result<()> {
    let fenced = match fence {
        Some(_) => format!("AND {}", fence_sql(4)),
        None => String::new(),
    };
    let q = format!(
        "WITH d AS (
             UPDATE outbox_event e SET status = 'dead', dead_at = now(), attempts = e.attempts + 1,
                    last_error = u.err, blocks_aggregate = $3,
                    created_at = CASE WHEN isfinite(e.created_at) AND e.created_at < '10000-01-01'
                                      THEN e.created_at ELSE now() END
             FROM unnest($1::uuid[], $2::text[]) AS u(id, err)
             WHERE e.event_id = u.id AND e.status = 'pending' {fenced}
             RETURNING e.tenant_id, e.aggregate_type, e.aggregate_id, e.id)
         UPDATE outbox_event e SET status = 'held'
         FROM d
         WHERE $3 AND e.status = 'pending' AND e.tenant_id = d.tenant_id
           AND e.aggregate_type = d.aggregate_type AND e.aggregate_id = d.aggregate_id AND e.id > d.id"
    );
    let mut query = sqlx::query(&q).bind(ids).bind(errors).bind(blocks);
    if let Some(f) = fence {
        query = query.bind(&f.relay_id).bind(&f.partitions).bind(&f.epochs);
    }
    query.execute(conn).await?;
    Ok(())
}

impl PgStore {
    /// For a relay whose dead letters do not block: dead letters left blocking by a relay that ran
    /// in the blocking mode stop blocking, and held rows become pending (also one that a producer
    /// inserted `held` while this ran, at the next claim). Probes of an index that is empty unless
    /// something is held.
    async fn release_held(&self) -> Result<()> {
        sqlx::query(
            "WITH d AS (UPDATE outbox_event SET blocks_aggregate = false
                        WHERE status = 'dead' AND blocks_aggregate RETURNING 1)
             UPDATE outbox_event SET status = 'pending' WHERE status = 'held'",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// This machine's name, for `outbox status`.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_settings_are_recognised_only_when_all_are_set() {
        let own = relay_connect_options("postgres://u@h/db").unwrap();
        assert!(has_read_settings(own.get_options()));
        assert!(has_read_settings(Some(
            "-c statement_timeout=5s -cjit=off -c max_parallel_workers_per_gather=0"
        )));
        assert!(!has_read_settings(None));
        assert!(!has_read_settings(Some("-c jit=off")));
        assert!(!has_read_settings(Some(
            "-c jit=on -c max_parallel_workers_per_gather=0"
        )));
        assert!(!has_read_settings(Some(
            "-c jit=off -c max_parallel_workers_per_gather=2"
        )));
    }
}
