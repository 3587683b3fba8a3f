//! The relay engine: lease partitions, claim, publish, settle, retry, dead-letter, clean up.
//!
//! One loop per relay process, strictly sequential (claim → publish → settle), so that nothing is
//! ever in flight while leases are rebalanced. Throughput comes from large batches whose
//! aggregates are pipelined (one unacknowledged event per aggregate, many aggregates at once:
//! [`crate::pipeline`]), not from overlapping batches; overlapping them would let two batches of
//! one aggregate race. See `docs/architecture.md`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{OutboxError, Result};
use crate::publisher::{Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher};
use crate::relay::routes::RouteHolds;
use crate::retry::RetryPolicy;
use crate::store::{Claimed, Fence, HeldRoutes, RelayStore, Settlement};
use crate::telemetry as m;

/// Settings of one relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Unique name of this relay process (shown by `outbox status`).
    pub relay_id: String,
    /// Most events claimed and in flight at once.
    pub batch_size: i64,
    /// Longest wait for new events when no notification arrives.
    pub poll_interval: Duration,
    /// Partition lease: how long a dead relay's partitions stay unclaimed.
    pub lease: Duration,
    /// Per-event retry policy.
    pub retry: RetryPolicy,
    /// When true (default) a dead letter holds back the later events of its aggregate until it is
    /// replayed or purged, so replay keeps the order; when false they flow past it.
    pub dead_letters_block: bool,
    /// Published rows older than this are deleted; zero deletes them at acknowledgement (the
    /// fastest mode: no row version is written), `None` keeps them.
    pub retention: Option<Duration>,
    /// Pause between retention passes.
    pub cleanup_interval: Duration,
    /// Rows deleted per statement of a retention pass.
    pub cleanup_batch: i64,
    /// Pause between the statements of a retention pass (keeps producers' latency; see
    /// `docs/benchmarks.md`).
    pub cleanup_pause: Duration,
    /// Longest pause while the broker is unreachable.
    pub broker_backoff_cap: Duration,
    /// Work pending and nothing settled for this long: the relay reports itself stalled
    /// (`/healthz` 503, `outbox_relay_stalled` 1).
    pub stall_timeout: Duration,
    /// An aggregate idle this long, with nothing pending, held or dead, loses its sequence row
    /// (`outbox_aggregate`), so that the table does not only grow; its next event starts a new
    /// `seq_epoch` at seq 1. Compaction runs in the cleanup loop, in `cleanup_batch` batches.
    /// `None` (the default) keeps every sequence row: a new epoch cannot be linked by consumers
    /// to the end of the previous one, so they treat it as a gap (docs/architecture.md).
    pub aggregate_horizon: Option<Duration>,
    /// Routes the broker refused (a full `reject-publish` queue, a subject at its limit) are held
    /// back one by one while the others flow; more than this many held at once is treated as a
    /// broker-wide outage ([`crate::relay::routes`]).
    pub max_refused_routes: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_id: default_relay_id(),
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(15),
            retry: RetryPolicy::default(),
            dead_letters_block: true,
            retention: Some(Duration::from_secs(24 * 3600)),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 1000,
            cleanup_pause: Duration::from_millis(20),
            broker_backoff_cap: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(60),
            aggregate_horizon: None,
            max_refused_routes: 8,
        }
    }
}

impl RelayConfig {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        self.retry.validate()?;
        if self.batch_size < 1 || self.batch_size > 100_000 {
            return Err(OutboxError::Config(
                "batch size must be between 1 and 100000".into(),
            ));
        }
        if self.lease < Duration::from_millis(300) {
            return Err(OutboxError::Config("lease must be at least 300 ms".into()));
        }
        if self.relay_id.is_empty() || self.relay_id.len() > 200 {
            return Err(OutboxError::Config(
                "relay id must be 1 to 200 characters".into(),
            ));
        }
        if self.stall_timeout < Duration::from_secs(1) {
            return Err(OutboxError::Config(
                "stall timeout must be at least 1 s".into(),
            ));
        }
        if self.cleanup_batch < 1 {
            return Err(OutboxError::Config(
                "cleanup batch must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The longest time an event may be re-published after its first publish, as long as the
    /// broker stays reachable: the broker's de-duplication window must cover it. The retry delays,
    /// plus one acknowledgement time-out per attempt (`ack_timeout`: each attempt may wait that
    /// long before it fails), plus one lease (a crashed relay's batch is re-published once its
    /// lease expires), plus 10 s of slack. Time the broker is unreachable is not bounded by
    /// anything the relay controls: see `docs/architecture.md`, invariant 3.
    pub fn dedup_horizon(&self, ack_timeout: Duration) -> Duration {
        self.retry.horizon()
            + ack_timeout * self.retry.max_attempts
            + self.lease
            + Duration::from_secs(10)
    }

    /// How much of a lease the relay keeps in reserve: it claims only from partitions whose lease
    /// outlives this, and sends nothing once less than this is left (a stalled relay resumes
    /// past its lease rather than publishing under another relay's).
    pub fn lease_margin(&self) -> Duration {
        self.lease / 5
    }
}

/// A unique relay id: host, pid and a random suffix.
pub fn default_relay_id() -> String {
    format!(
        "{}-{}-{}",
        crate::pg::hostname(),
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
}

/// What the relay knows of its own state, for health endpoints. Read by the HTTP handlers and
/// the gauge task, which run apart from the relay's loop, so a loop that hangs is still seen.
#[derive(Debug)]
pub struct RelayHealth {
    database_up: AtomicBool,
    broker_up: AtomicBool,
    partitions: AtomicUsize,
    started: Instant,
    /// Milliseconds after `started` of the loop's last progress: a settled batch, or a claim
    /// that found nothing to do.
    progress_ms: AtomicU64,
    stall_timeout: Duration,
}

impl Default for RelayHealth {
    fn default() -> Self {
        Self::new(RelayConfig::default().stall_timeout)
    }
}

impl RelayHealth {
    fn new(stall_timeout: Duration) -> Self {
        Self {
            database_up: AtomicBool::new(false),
            broker_up: AtomicBool::new(true),
            partitions: AtomicUsize::new(0),
            started: Instant::now(),
            progress_ms: AtomicU64::new(0),
            stall_timeout,
        }
    }
    /// The last database operation succeeded.
    pub fn database_up(&self) -> bool {
        self.database_up.load(Ordering::Relaxed)
    }
    /// The broker connection is up (as of the last publish or gauge update).
    pub fn broker_up(&self) -> bool {
        self.broker_up.load(Ordering::Relaxed)
    }
    /// Partitions held after the last lease round.
    pub fn partitions(&self) -> usize {
        self.partitions.load(Ordering::Relaxed)
    }
    /// Time since the loop last made progress (settled a batch or found nothing to do).
    pub fn since_progress(&self) -> Duration {
        let at = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(at)
    }
    /// True when the loop has had work and settled nothing for longer than the stall timeout:
    /// a hung publish, a broker or database that stays away, a lease that cannot be renewed.
    pub fn stalled(&self) -> bool {
        self.since_progress() > self.stall_timeout
    }
    /// The stall timeout in force.
    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }
    fn progress(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.progress_ms.store(ms, Ordering::Relaxed);
    }
    fn set_db(&self, up: bool) {
        self.database_up.store(up, Ordering::Relaxed);
        metrics::gauge!(m::DATABASE_UP).set(if up { 1.0 } else { 0.0 });
    }
    fn set_broker(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
        metrics::gauge!(m::BROKER_UP).set(if up { 1.0 } else { 0.0 });
    }
}

/// A relay: one store, one publisher, one loop.
pub struct Relay {
    store: Arc<dyn RelayStore>,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    wake: Arc<Notify>,
    health: Arc<RelayHealth>,
    /// Unique per running relay: two processes given the same relay id are told apart by it.
    instance: String,
}

impl Relay {
    /// A relay over `store` publishing through `publisher`.
    pub fn new(
        store: Arc<dyn RelayStore>,
        publisher: Arc<dyn Publisher>,
        config: RelayConfig,
    ) -> Result<Self> {
        config.validate()?;
        let health = Arc::new(RelayHealth::new(config.stall_timeout));
        Ok(Self {
            store,
            publisher,
            config,
            wake: Arc::new(Notify::new()),
            health,
            instance: uuid::Uuid::new_v4().to_string(),
        })
    }

    /// Wake the relay now (wired to PostgreSQL `LISTEN` by [`crate::wake::listen`]).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Health flags, shared with the HTTP endpoints.
    pub fn health(&self) -> Arc<RelayHealth> {
        self.health.clone()
    }

    /// The relay's settings.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Runs until `stop` is cancelled; then finishes the batch in flight, gives its partitions
    /// back and returns. Database and broker failures are retried forever, never returned; the
    /// one error is [`OutboxError::RelayIdInUse`]: another live relay holds this relay's id.
    pub async fn run(&self, stop: CancellationToken) -> Result<()> {
        m::register_relay_zeros(self.publisher.name(), None);
        let background = CancellationToken::new();
        let gauges = tokio::spawn(gauges(
            self.store.clone(),
            self.publisher.clone(),
            self.health.clone(),
            background.clone(),
        ));
        let retention = self.config.retention.filter(|r| !r.is_zero());
        let cleanup = (retention.is_some() || self.config.aggregate_horizon.is_some()).then(|| {
            tokio::spawn(cleanup_loop(
                self.store.clone(),
                retention,
                self.config.aggregate_horizon,
                self.config.cleanup_interval,
                self.config.cleanup_batch,
                self.config.cleanup_pause,
                background.clone(),
            ))
        });
        tracing::info!(relay_id = %self.config.relay_id, broker = self.publisher.name(), "relay started");
        let outcome = self.main_loop(&stop).await;
        background.cancel();
        let _ = gauges.await;
        if let Some(c) = cleanup {
            let _ = c.await;
        }
        if let Err(e) = outcome {
            // The id (and its partitions) belong to another live relay: release nothing of it.
            tracing::error!(error = %e, "relay stopped");
            return Err(e);
        }
        match self
            .store
            .release_all(&self.config.relay_id, &self.instance)
            .await
        {
            Ok(()) => {
                tracing::info!(relay_id = %self.config.relay_id, "relay stopped; partitions released")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not release partitions; they expire with their lease")
            }
        }
        Ok(())
    }

    async fn main_loop(&self, stop: &CancellationToken) -> Result<()> {
        let cfg = &self.config;
        let tick = cfg.lease / 3;
        let margin = cfg.lease_margin();
        let mut next_lease = Instant::now();
        // Until when the partitions of the last lease round may be published from (local clock,
        // counted from before the round's statement, so never later than the database's
        // `lease_until`), less the margin.
        let mut lease_deadline = Instant::now();
        let mut fence = Arc::new(Fence::default());
        let mut owned = 0usize;
        let mut broker_failures = 0u32;
        let mut db_failures = 0u32;
        // The settlement of the previous failure-free batch, written while this one is claimed and
        // published. At most one is outstanding; its ids are kept out of the next claim.
        let mut background: Option<(tokio::task::JoinHandle<()>, Vec<uuid::Uuid>)> = None;
        // The next batch, claimed while the previous one was being published (see below).
        let mut prefetched: Option<Claimed> = None;
        let mut routes = RouteHolds::new(
            self.publisher.route_template(),
            cfg.broker_backoff_cap,
            cfg.max_refused_routes,
        );
        routes.gauges();
        while !stop.is_cancelled() {
            if Instant::now() >= next_lease {
                // Partitions may be given back in this round: nothing of ours may still be
                // unsettled, and a batch claimed under the old lease may not be published.
                prefetched = None;
                finish(&mut background).await;
                let round_started = Instant::now();
                match self
                    .store
                    .lease_round(&cfg.relay_id, &self.instance, cfg.lease)
                    .await
                {
                    Ok(state) => {
                        if state.owned.len() != owned {
                            tracing::info!(
                                partitions = state.owned.len(),
                                live_relays = state.live_relays,
                                "lease round"
                            );
                        }
                        owned = state.owned.len();
                        lease_deadline = round_started + cfg.lease.saturating_sub(margin);
                        fence = Arc::new(Fence {
                            relay_id: cfg.relay_id.clone(),
                            partitions: state.owned,
                            epochs: state.epochs,
                        });
                        self.health.set_db(true);
                    }
                    Err(e @ OutboxError::RelayIdInUse { .. }) => return Err(e),
                    Err(e) => {
                        // Without a renewed lease nothing may be claimed once the old one runs
                        // out; claims re-check leases in the database too.
                        tracing::warn!(error = %e, "lease round failed");
                        self.health.set_db(false);
                    }
                }
                self.health.partitions.store(owned, Ordering::Relaxed);
                metrics::gauge!(m::PARTITIONS_OWNED).set(owned as f64);
                next_lease = Instant::now() + tick;
            }
            let until_lease = next_lease.saturating_duration_since(Instant::now());
            if Instant::now() >= lease_deadline {
                // No valid lease (the database is away, or this relay stalled): publish nothing
                // until a lease round succeeds.
                self.idle(stop, until_lease.min(cfg.poll_interval)).await;
                continue;
            }
            if owned == 0 {
                // Other relays hold every partition: nothing is ours to do.
                self.health.progress();
                self.idle(stop, until_lease).await;
                continue;
            }
            if background.as_ref().is_some_and(|(h, _)| h.is_finished()) {
                finish(&mut background).await;
            }
            let exclude = background
                .as_ref()
                .map(|(_, ids)| ids.as_slice())
                .unwrap_or(&[]);
            let claim_started = Instant::now();
            let claimed = match prefetched.take() {
                Some(b) => Ok(b),
                None => self.claim(exclude, &routes.active()).await,
            };
            let Claimed {
                messages: batch,
                drained,
            } = match claimed {
                Ok(b) => {
                    db_failures = 0;
                    self.health.set_db(true);
                    b
                }
                Err(e) => {
                    db_failures += 1;
                    self.health.set_db(false);
                    tracing::warn!(error = %e, "claim failed; retrying");
                    self.pause(stop, backoff(db_failures, tick)).await;
                    continue;
                }
            };
            let batch = routes.filter(batch);
            if batch.is_empty() {
                finish(&mut background).await;
                self.health.progress();
                let mut wait = cfg.poll_interval.min(until_lease);
                if let Some(due) = routes.next_due() {
                    // A held route's back-off ends: its probe need not wait for the poll.
                    wait = wait.min(due.saturating_duration_since(Instant::now()));
                }
                self.idle(stop, wait.max(Duration::from_millis(1))).await;
                continue;
            }
            metrics::histogram!(m::BATCH_SIZE).record(batch.len() as f64);
            let started = Instant::now();
            // A full batch means a backlog: claim the next batch while this one is in flight, so
            // that the claim's round trip overlaps the broker's. The next claim must not see the
            // rows of this batch nor those whose settlement is being written. It is used only if
            // this batch comes back clean: a failure here must be recorded before anything later of
            // its aggregate is claimed, so after one the prefetched batch is simply dropped (a
            // claim writes nothing, so dropping it costs only the query).
            let deadline = tokio::time::Instant::from_std(lease_deadline);
            let (outcomes, next) =
                if batch.len() as i64 >= cfg.batch_size && next_lease > Instant::now() + tick / 4 {
                    let mut in_flight: Vec<uuid::Uuid> = batch.iter().map(|m| m.event_id).collect();
                    if let Some((_, ids)) = &background {
                        in_flight.extend_from_slice(ids);
                    }
                    let held = routes.active();
                    let (outcomes, next) = tokio::join!(
                        self.publisher.publish(&batch, deadline),
                        self.claim(&in_flight, &held)
                    );
                    (outcomes, next.ok().filter(|b| !b.messages.is_empty()))
                } else {
                    (self.publisher.publish(&batch, deadline).await, None)
                };
            metrics::histogram!(m::PUBLISH_SECONDS).record(started.elapsed().as_secs_f64());
            tracing::debug!(
                events = batch.len(),
                claim_ms = (started - claim_started).as_secs_f64() * 1e3,
                publish_ms = started.elapsed().as_secs_f64() * 1e3,
                "batch published"
            );
            let decided = decide(&batch, outcomes, &cfg.retry, self.publisher.name());
            let broker_wide = self.note_routes(&batch, &decided, &mut routes).await;
            let lease_ran_out = decided.lease_expired || Instant::now() >= lease_deadline;
            if lease_ran_out {
                // Renew (or lose) the lease before anything else is claimed.
                tracing::warn!(
                    "the partition lease ran out during a batch; renewing it before the next claim"
                );
                next_lease = Instant::now();
                prefetched = None;
            }
            if (decided.unavailable || broker_wide) && decided.settlements.is_empty() {
                broker_failures += 1;
                self.health.set_broker(false);
                let wait = backoff(broker_failures, cfg.broker_backoff_cap.min(tick));
                tracing::warn!(error = %decided.first_error, retry_in_ms = wait.as_millis() as u64, "broker unavailable; events stay in the outbox");
                self.pause(stop, wait).await;
                continue;
            }
            if !broker_wide {
                broker_failures = 0;
            }
            self.health.set_broker(!decided.unavailable);
            // Settlements are written in batch order: the previous one first.
            finish(&mut background).await;
            let clean = !decided.unavailable
                && !decided.lease_expired
                && decided.refused.is_empty()
                && decided
                    .settlements
                    .iter()
                    .all(|s| matches!(s, Settlement::Published(_)));
            if clean {
                if !lease_ran_out {
                    prefetched = next;
                }
                // Nothing in this batch holds back a later event, so the next claim need not see
                // this settlement; it only must not claim these rows again.
                let ids = decided.settlements.iter().filter_map(|s| match s {
                    Settlement::Published(id) => Some(*id),
                    _ => None,
                });
                let ids: Vec<uuid::Uuid> = ids.collect();
                let (store, health, stop) = (self.store.clone(), self.health.clone(), stop.clone());
                let delete = self.delete_published();
                let fence = fence.clone();
                let handle = tokio::spawn(async move {
                    let t = Instant::now();
                    settle(
                        store.as_ref(),
                        &health,
                        &decided.settlements,
                        delete,
                        &fence,
                        &stop,
                    )
                    .await;
                    tracing::debug!(settle_ms = t.elapsed().as_secs_f64() * 1e3, "batch settled");
                });
                background = Some((handle, ids));
            } else {
                // A retry or dead letter must be recorded before the next claim, or the later
                // events of its aggregate would be claimed past it.
                settle(
                    self.store.as_ref(),
                    &self.health,
                    &decided.settlements,
                    self.delete_published(),
                    &fence,
                    stop,
                )
                .await;
            }
            if broker_wide {
                // Settled what was acknowledged; now back off as for any outage.
                broker_failures += 1;
                let wait = backoff(broker_failures, cfg.broker_backoff_cap.min(tick));
                tracing::warn!(error = %decided.first_error, retry_in_ms = wait.as_millis() as u64, "broker refuses many routes; events stay in the outbox");
                self.pause(stop, wait).await;
                continue;
            }
            if clean && drained {
                // Nothing deliverable was left behind: wait for a commit's wake-up (or the poll)
                // instead of claiming again at once. Under a steady stream of commits the relay
                // would otherwise run back to back batches of one or two events, each with its
                // claim, publish and settle round trips.
                self.idle(stop, cfg.poll_interval.min(until_lease)).await;
            }
        }
        finish(&mut background).await;
        Ok(())
    }

    /// Holds back the routes the broker refused in this batch and releases those it took again;
    /// writes the change for `outbox status`. True when so many routes are refused that the relay
    /// must back off as a whole.
    async fn note_routes(
        &self,
        batch: &[OutboundMessage],
        decided: &Decided,
        routes: &mut RouteHolds,
    ) -> bool {
        if decided.refused.is_empty() && routes.is_empty() {
            return false;
        }
        let refused: Vec<(&OutboundMessage, &str)> = decided
            .refused
            .iter()
            .map(|(i, e)| (&batch[*i], e.as_str()))
            .collect();
        let delivered: Vec<&OutboundMessage> =
            decided.delivered.iter().map(|i| &batch[*i]).collect();
        let recorded = routes.record(&refused, &delivered);
        if recorded.changed {
            if let Err(e) = self
                .store
                .record_route_holds(&self.config.relay_id, &routes.rows())
                .await
            {
                tracing::warn!(error = %e, "could not record the refused routes for `outbox status`");
            }
        }
        recorded.broker_wide
    }

    /// One claim of up to a batch from this relay's partitions, its time recorded.
    async fn claim(&self, exclude: &[uuid::Uuid], held: &HeldRoutes) -> Result<Claimed> {
        let cfg = &self.config;
        let started = Instant::now();
        let claimed = self
            .store
            .claim_except(
                &cfg.relay_id,
                cfg.batch_size,
                cfg.dead_letters_block,
                exclude,
                cfg.lease_margin(),
                held,
            )
            .await;
        metrics::histogram!(m::CLAIM_SECONDS).record(started.elapsed().as_secs_f64());
        claimed
    }

    fn delete_published(&self) -> bool {
        self.config.retention.is_some_and(|r| r.is_zero())
    }

    async fn idle(&self, stop: &CancellationToken, d: Duration) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    async fn pause(&self, stop: &CancellationToken, d: Duration) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// Waits for the background settlement, if any.
async fn finish(background: &mut Option<(tokio::task::JoinHandle<()>, Vec<uuid::Uuid>)>) {
    if let Some((handle, _)) = background.take() {
        let _ = handle.await;
    }
}

/// Records outcomes, retrying while the database is away: the events are already at the broker,
/// and giving up would only cause re-publishes (which the broker de-duplicates).
async fn settle(
    store: &dyn RelayStore,
    health: &RelayHealth,
    settlements: &[Settlement],
    delete_published: bool,
    fence: &Fence,
    stop: &CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        match store.settle(settlements, delete_published, fence).await {
            Ok(()) => {
                health.set_db(true);
                if !settlements.is_empty() {
                    health.progress();
                }
                return;
            }
            Err(e) => {
                failures += 1;
                health.set_db(false);
                tracing::warn!(error = %e, attempt = failures, "recording publish outcomes failed; retrying");
                // Once asked to stop, a few more tries, then the rows stay pending and are
                // published again (as duplicates) by whoever takes the partitions.
                if stop.is_cancelled() && failures >= 3 {
                    return;
                }
                tokio::time::sleep(backoff(failures, Duration::from_secs(2))).await;
            }
        }
    }
}

/// 100 ms doubling per failure, capped.
fn backoff(failures: u32, cap: Duration) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_millis(ms).min(cap)
}

/// The settlements for one published batch.
#[derive(Debug, Default)]
pub(crate) struct Decided {
    pub settlements: Vec<Settlement>,
    pub unavailable: bool,
    /// Some events were not sent because the lease ran out: renew it before the next claim.
    pub lease_expired: bool,
    pub first_error: String,
    /// Batch indices of messages a route refused, with the broker's words: no settlement.
    pub refused: Vec<(usize, String)>,
    /// Batch indices of acknowledged messages (a refused route that takes one is released).
    pub delivered: Vec<usize>,
}

/// Turns publish outcomes into settlements. Per aggregate, only the acknowledged prefix is marked
/// published: once one event of an aggregate failed, its later events in the batch are left
/// pending even if acknowledged, and are published again after it (the broker drops the copies),
/// so the stream never sees them overtake their predecessor for good.
pub(crate) fn decide(
    batch: &[OutboundMessage],
    outcomes: Vec<Result<Delivery, PublishFailure>>,
    retry: &RetryPolicy,
    broker: &'static str,
) -> Decided {
    let mut out = Decided {
        settlements: Vec::with_capacity(batch.len()),
        delivered: Vec::with_capacity(batch.len()),
        ..Decided::default()
    };
    let mut stopped: HashSet<(&str, &str, &str)> = HashSet::new();
    let now = Utc::now();
    // Handles looked up once per batch, counts added once: a lookup per event (the key built and
    // hashed into the recorder's registry) showed in the drain's profile (issue 20).
    let commit_to_ack = metrics::histogram!(m::COMMIT_TO_ACK);
    let (mut published, mut duplicates) = (0u64, 0u64);
    for (i, (msg, outcome)) in batch.iter().zip(outcomes).enumerate() {
        let key = msg.aggregate_key();
        // Hashing the key only once an aggregate was stopped (rare), not for every event.
        if !stopped.is_empty() && stopped.contains(&key) {
            continue;
        }
        match outcome {
            Ok(delivery) => {
                if delivery == Delivery::Duplicate {
                    duplicates += 1;
                }
                published += 1;
                let lag = (now - msg.created_at).to_std().unwrap_or_default();
                commit_to_ack.record(lag.as_secs_f64());
                out.settlements.push(Settlement::Published(msg.event_id));
                out.delivered.push(i);
            }
            Err(f) => {
                stopped.insert(key);
                if out.first_error.is_empty() {
                    out.first_error = f.message.clone();
                }
                let kind = match f.kind {
                    FailureKind::Unavailable => "unavailable",
                    FailureKind::LeaseExpired => "lease_expired",
                    FailureKind::RouteRefused => "route_refused",
                    FailureKind::Retryable => "retryable",
                    FailureKind::Permanent => "permanent",
                };
                metrics::counter!(m::FAILED, "kind" => kind, "reason" => f.reason).increment(1);
                match f.kind {
                    FailureKind::Unavailable => out.unavailable = true,
                    FailureKind::LeaseExpired => out.lease_expired = true,
                    // The route's outage, not the event's: nothing is written for it.
                    FailureKind::RouteRefused => out.refused.push((i, f.message)),
                    FailureKind::Permanent => {
                        metrics::counter!(m::DEAD_LETTERED, "reason" => f.reason).increment(1);
                        tracing::error!(event_id = %msg.event_id, reason = f.reason, error = %f.message, "event dead-lettered");
                        out.settlements.push(Settlement::Dead {
                            id: msg.event_id,
                            error: f.message,
                        });
                    }
                    FailureKind::Retryable => {
                        let attempt = u32::try_from(msg.attempts).unwrap_or(0) + 1;
                        if attempt >= retry.max_attempts {
                            metrics::counter!(m::DEAD_LETTERED, "reason" => "retries_exhausted")
                                .increment(1);
                            tracing::error!(event_id = %msg.event_id, attempts = attempt, error = %f.message, "event dead-lettered after its last attempt");
                            out.settlements.push(Settlement::Dead {
                                id: msg.event_id,
                                error: format!("gave up after {attempt} attempts: {}", f.message),
                            });
                        } else {
                            metrics::counter!(m::RETRIED, "reason" => f.reason).increment(1);
                            tracing::warn!(event_id = %msg.event_id, attempt, error = %f.message, "publish failed; will retry");
                            out.settlements.push(Settlement::Retry {
                                id: msg.event_id,
                                delay: retry.delay(attempt),
                                error: f.message,
                            });
                        }
                    }
                }
            }
        }
    }
    if published > 0 {
        metrics::counter!(m::PUBLISHED, "broker" => broker).increment(published);
    }
    if duplicates > 0 {
        metrics::counter!(m::DUPLICATES, "broker" => broker).increment(duplicates);
    }
    out
}

/// Gauges read apart from the loop: the backlog, the broker connection (so `outbox_broker_up`
/// follows the connection even when nothing is published), and the loop's progress (so a loop
/// that hangs is reported by this task, which does not hang with it).
async fn gauges(
    store: Arc<dyn RelayStore>,
    publisher: Arc<dyn Publisher>,
    health: Arc<RelayHealth>,
    stop: CancellationToken,
) {
    loop {
        if let Ok((n, age)) = store.backlog().await {
            metrics::gauge!(m::PENDING).set(n as f64);
            metrics::gauge!(m::OLDEST_PENDING_AGE).set(age.map(|a| a.as_secs_f64()).unwrap_or(0.0));
        }
        if let Ok(h) = store.held().await {
            metrics::gauge!(m::HELD).set(h.held as f64);
            metrics::gauge!(m::HELD_ORPHANED).set(h.orphaned as f64);
        }
        health.set_broker(publisher.is_connected());
        metrics::gauge!(m::SINCE_PROGRESS).set(health.since_progress().as_secs_f64());
        metrics::gauge!(m::STALLED).set(if health.stalled() { 1.0 } else { 0.0 });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Deletes published rows past retention, then compacts idle aggregates' sequence rows, in
/// bounded batches, pausing between batches so that a large pass never competes with producers
/// for long.
async fn cleanup_loop(
    store: Arc<dyn RelayStore>,
    retention: Option<Duration>,
    aggregate_horizon: Option<Duration>,
    every: Duration,
    batch: i64,
    pause: Duration,
    stop: CancellationToken,
) {
    loop {
        if let Some(retention) = retention {
            batches(&stop, batch, pause, "retention pass", m::CLEANED, || {
                store.cleanup_batch(retention, batch)
            })
            .await;
        }
        if let Some(horizon) = aggregate_horizon {
            batches(
                &stop,
                batch,
                pause,
                "aggregate compaction",
                m::AGGREGATES_COMPACTED,
                || store.compact_aggregates(horizon, batch),
            )
            .await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Runs `step` until it does less than a full `batch` (or fails, or `stop`), counting into
/// `counter`.
async fn batches<F, Fut>(
    stop: &CancellationToken,
    batch: i64,
    pause: Duration,
    what: &str,
    counter: &'static str,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    loop {
        if stop.is_cancelled() {
            return;
        }
        match step().await {
            Ok(n) => {
                metrics::counter!(counter).increment(n);
                if n < batch as u64 {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed");
                return;
            }
        }
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, agg: &str, attempts: i32) -> OutboundMessage {
        crate::publisher::test_message(id, agg, attempts)
    }

    fn fail(kind: FailureKind) -> Result<Delivery, PublishFailure> {
        Err(PublishFailure::new(kind, "test", "boom"))
    }

    #[test]
    fn a_failure_stops_its_aggregate_only() {
        let batch = vec![
            msg(1, "a", 0),
            msg(2, "b", 0),
            msg(3, "a", 0),
            msg(4, "b", 0),
        ];
        let out = decide(
            &batch,
            vec![
                fail(FailureKind::Retryable),
                Ok(Delivery::Stored),
                Ok(Delivery::Stored),
                Ok(Delivery::Duplicate),
            ],
            &RetryPolicy::default(),
            "test",
        );
        let row = |e: &uuid::Uuid| batch.iter().find(|m| m.event_id == *e).unwrap().id;
        let ids: Vec<_> = out
            .settlements
            .iter()
            .map(|s| match s {
                Settlement::Published(id) => ("p", row(id)),
                Settlement::Retry { id, .. } => ("r", row(id)),
                Settlement::Dead { id, .. } => ("d", row(id)),
            })
            .collect();
        // Row 3 was acknowledged but stays pending behind row 1.
        assert_eq!(ids, vec![("r", 1), ("p", 2), ("p", 4)]);
    }

    #[test]
    fn budget_spent_or_permanent_means_dead() {
        let retry = RetryPolicy {
            max_attempts: 3,
            ..Default::default()
        };
        let batch = vec![msg(1, "a", 2), msg(2, "b", 0)];
        let out = decide(
            &batch,
            vec![fail(FailureKind::Retryable), fail(FailureKind::Permanent)],
            &retry,
            "test",
        );
        assert!(
            matches!(&out.settlements[0], Settlement::Dead { id, error } if *id == batch[0].event_id && error.contains("3 attempts"))
        );
        assert!(
            matches!(&out.settlements[1], Settlement::Dead { id, .. } if *id == batch[1].event_id)
        );
        assert!(!out.unavailable);
    }

    #[test]
    fn unavailable_touches_nothing() {
        let batch = vec![msg(1, "a", 0), msg(2, "b", 0)];
        let out = decide(
            &batch,
            vec![
                fail(FailureKind::Unavailable),
                fail(FailureKind::Unavailable),
            ],
            &RetryPolicy::default(),
            "test",
        );
        assert!(out.settlements.is_empty());
        assert!(out.unavailable);
    }
}
