//! The narrow storage interface the relay runs on. PostgreSQL implements it in [`crate::pg`];
//! another database can follow by implementing this trait without touching the relay.

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::error::Result;
use crate::publisher::OutboundMessage;

/// What happened to a claimed row after its publish (rows are named by their event id).
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// The broker acknowledged it.
    Published(Uuid),
    /// Retry after `delay`, keeping `error`.
    Retry {
        /// The event.
        id: Uuid,
        /// How long until it is due again.
        delay: Duration,
        /// Why the publish failed.
        error: String,
    },
    /// Give up: a dead letter with its last error.
    Dead {
        /// The event.
        id: Uuid,
        /// Why it is dead.
        error: String,
    },
}

/// What a lease round left this relay with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeaseState {
    /// Partitions this relay may publish from until the next round.
    pub owned: Vec<i16>,
    /// The lease epoch of each partition in `owned` (same order).
    pub epochs: Vec<i64>,
    /// Live relays seen (this one included).
    pub live_relays: i64,
}

/// What a relay held when it claimed a batch: retries and dead letters of that batch are written
/// only while it still holds those partitions under those epochs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fence {
    /// The relay.
    pub relay_id: String,
    /// Its partitions at the last lease round.
    pub partitions: Vec<i16>,
    /// Their epochs (same order).
    pub epochs: Vec<i64>,
}

/// What one claim found.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The rows to publish, in id order.
    pub messages: Vec<OutboundMessage>,
    /// No deliverable row of the owned partitions was left out by the batch size or a tenant's
    /// share of it: until something new commits (or a retry falls due), claiming again finds
    /// nothing more. The relay then waits for a wake-up instead of claiming again at once.
    pub drained: bool,
}

/// Aggregates a claim leaves out: their first pending event goes to a route the broker refused,
/// and the relay holds that route back for a back-off (`crate::relay::routes`). Every pending row
/// of these aggregates is left out, so nothing overtakes the refused event. The relay learns the
/// aggregates from what it claims (a claim returns each aggregate's pending events from its
/// first), so a claim never has to render routes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeldRoutes {
    /// Tenant of each held aggregate.
    pub tenants: Vec<String>,
    /// Aggregate type of each (same order).
    pub aggregate_types: Vec<String>,
    /// Aggregate id of each (same order).
    pub aggregate_ids: Vec<String>,
}

impl HeldRoutes {
    /// Whether nothing is left out.
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }
}

/// One route a relay holds back, as written for `outbox status` (table `outbox_route_hold`).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteHoldRow {
    /// The routing key / subject.
    pub route: String,
    /// Refusals in a row.
    pub refusals: i32,
    /// When its first refusal in a row came.
    pub since: chrono::DateTime<chrono::Utc>,
    /// When the relay sends to it again (one probe).
    pub until: chrono::DateTime<chrono::Utc>,
    /// Creation time of the oldest event it holds back.
    pub oldest_event_at: chrono::DateTime<chrono::Utc>,
    /// The broker's last refusal.
    pub last_error: String,
}

/// Storage operations of the relay.
#[async_trait]
pub trait RelayStore: Send + Sync + 'static {
    /// Heartbeat, renew leases, take a fair share of free partitions and give back any excess.
    /// Called only between batches, so that nothing given back is still in flight. `instance`
    /// is unique per running relay: a relay id held by another live instance is refused with
    /// [`crate::OutboxError::RelayIdInUse`].
    async fn lease_round(
        &self,
        relay_id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<LeaseState>;

    /// Gives back every partition of `relay_id` and removes its heartbeat (clean shutdown), if
    /// `instance` still holds the id.
    async fn release_all(&self, relay_id: &str, instance: &str) -> Result<()>;

    /// Up to `limit` deliverable rows of the owned partitions, in id order: pending, due, not in
    /// `exclude` (published rows whose settlement is still being written), and not behind a
    /// failing (or, with `dead_blocks`, dead) earlier event of their aggregate, and only from
    /// partitions whose lease outlives `lease_margin`. At most `limit` rows in all; with
    /// [`Claimed::drained`] when no deliverable row was left behind.
    async fn claim(
        &self,
        relay_id: &str,
        limit: i64,
        dead_blocks: bool,
        exclude: &[Uuid],
        lease_margin: Duration,
    ) -> Result<Claimed>;

    /// [`RelayStore::claim`], leaving out every row of the `held` aggregates. The default ignores
    /// `held` (the relay drops such rows from the batch itself, keeping order; only a refused
    /// route's backlog can then fill the batch).
    async fn claim_except(
        &self,
        relay_id: &str,
        limit: i64,
        dead_blocks: bool,
        exclude: &[Uuid],
        lease_margin: Duration,
        held: &HeldRoutes,
    ) -> Result<Claimed> {
        let _ = held;
        self.claim(relay_id, limit, dead_blocks, exclude, lease_margin)
            .await
    }

    /// Replaces the routes `relay_id` holds back, as shown by `outbox status`. The default keeps
    /// nothing.
    async fn record_route_holds(&self, relay_id: &str, holds: &[RouteHoldRow]) -> Result<()> {
        let _ = (relay_id, holds);
        Ok(())
    }

    /// Records the outcomes of a publish in one transaction. With `delete_published` the
    /// acknowledged rows are deleted instead of kept as `published` (retention zero). Retries
    /// and dead letters are written only within `fence`.
    async fn settle(
        &self,
        settlements: &[Settlement],
        delete_published: bool,
        fence: &Fence,
    ) -> Result<()>;

    /// Deletes up to `batch` published rows older than `retention`; returns how many.
    async fn cleanup_batch(&self, retention: Duration, batch: i64) -> Result<u64>;

    /// Removes up to `batch` rows of `outbox_aggregate` whose aggregates have nothing pending,
    /// held or dead and whose last event is older than `horizon`; returns how many. An aggregate
    /// that writes again afterwards restarts at seq 1 in a new `seq_epoch`. The default does
    /// nothing (a store whose sequence table does not grow).
    async fn compact_aggregates(&self, horizon: Duration, batch: i64) -> Result<u64> {
        let _ = (horizon, batch);
        Ok(0)
    }

    /// Pending rows and the age of the oldest, for metrics.
    async fn backlog(&self) -> Result<(i64, Option<Duration>)>;

    /// Held rows (behind a blocking dead letter), for metrics. The default: a store that holds
    /// nothing.
    async fn held(&self) -> Result<HeldCounts> {
        Ok(HeldCounts::default())
    }
}

/// Rows held behind blocking dead letters.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct HeldCounts {
    /// Every held row.
    pub held: i64,
    /// Held rows with no blocking dead letter ahead of them in their aggregate: nothing releases
    /// them (docs/outbox-table.md, "Writers' isolation level").
    pub orphaned: i64,
}
