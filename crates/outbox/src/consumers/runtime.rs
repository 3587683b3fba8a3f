//! The consumer loop: reads a [`EventSource`], queues each message in the lane of its aggregate,
//! and lets `concurrency` workers take ready lanes: a worker owns the lanes it took (so an
//! aggregate is handled by one worker at a time, in arrival order) and applies up to `batch_size`
//! of their events in one transaction with their inbox records, acknowledging after the commit.
//! A batch in which anything fails is rolled back whole and its events are applied again one
//! transaction each, so a failure, a retry or a park concerns only its own event. A replayer
//! applies parked events an operator asked for.
//!
//! Why batches: an event in a transaction of its own costs three statements more than the
//! handler's own (`BEGIN`, the position upsert, `COMMIT`) and a commit flush; under a backlog
//! several events share the `BEGIN`, the `COMMIT` and the flush (docs/benchmarks.md).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use super::dead_letters;
use super::event::InboundEvent;
use super::inbox::{self, Mode, Verdict};
use super::metrics as m;
use super::source::{Acknowledger, EventSource, Received};
use crate::error::{OutboxError, Result};
use async_trait::async_trait;
use futures::FutureExt;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// What a handler may fail with; the message is kept as the event's last error.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The application's code for one event. It runs inside the transaction that also records the
/// event in the inbox: write the effects through `tx` and they commit (or roll back) together.
/// It must not commit `tx` itself, and should have no effects outside the database (those would
/// be repeated when the transaction rolls back and the event is retried).
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Applies `event`.
    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &InboundEvent,
    ) -> std::result::Result<(), HandlerError>;
}

/// A test hook run between a step of the runtime and the next (to crash a consumer there).
pub type Hook = Arc<dyn Fn(&InboundEvent) + Send + Sync>;

/// How a consumer behaves.
#[derive(Clone)]
pub struct ConsumerConfig {
    /// The consumer's name: the inbox, the parked events and the metrics are kept under it. Two
    /// processes with the same name share one inbox (and must read the same subscription).
    pub name: String,
    /// Transactions at once: workers, each owning the lanes (aggregates) it took, so one
    /// aggregate is handled by one worker at a time, in order.
    pub concurrency: usize,
    /// Most events a worker applies in one transaction (from the lanes it took; 1: one
    /// transaction per event). Batches only form under a backlog: a worker takes what is ready.
    pub batch_size: usize,
    /// Handler failures before the event is parked.
    pub max_attempts: i32,
    /// Delay before the first redelivery of a failed event; doubled per attempt.
    pub retry_base: Duration,
    /// Longest delay between redeliveries of a failed event.
    pub retry_max: Duration,
    /// Delay before an event that arrived ahead of its predecessor is delivered again.
    pub gap_retry: Duration,
    /// How long an event may wait for its predecessor before it is parked (reason `gap`).
    pub gap_timeout: Duration,
    /// How long event ids of events without a sequence are remembered for de-duplication.
    pub seen_retention: Duration,
    /// How often the replayer looks for parked events to apply.
    pub replay_poll: Duration,
    /// Where an aggregate may start when its beginning was never received (a late consumer, a
    /// stream that dropped its first events, a new sequence epoch).
    pub start_policy: StartPolicy,
    /// Crash-test hook run after the commit, before the acknowledgement.
    #[doc(hidden)]
    pub after_commit: Option<Hook>,
    /// Crash-test hook run after the handler, before the commit.
    #[doc(hidden)]
    pub before_commit: Option<Hook>,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerConfig")
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl ConsumerConfig {
    /// Defaults for consumer `name`: 16 transactions at once of up to 32 events, 5 attempts from
    /// 500 ms to 30 s, gaps retried every second and parked after 5 minutes, event ids kept 7
    /// days.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            concurrency: 16,
            batch_size: 32,
            max_attempts: 5,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            gap_retry: Duration::from_secs(1),
            gap_timeout: Duration::from_secs(300),
            seen_retention: Duration::from_secs(7 * 24 * 3600),
            replay_poll: Duration::from_secs(1),
            start_policy: StartPolicy::Strict,
            after_commit: None,
            before_commit: None,
        }
    }

    fn backoff(&self, attempts: i32) -> Duration {
        let exp = attempts.saturating_sub(1).clamp(0, 20) as u32;
        self.retry_base
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.retry_max)
    }
}

/// Where a consumer starts an aggregate whose beginning it never received: no position yet and
/// an event past seq 1 (a queue bound after the producer's first events, a stream whose limits
/// dropped them, a producer purge of seq 1), or a new sequence epoch (the consumer cannot know
/// where the previous epoch ended). Every start past a gap is recorded in
/// `outbox_consumer_skip`; an event that arrives later inside the skipped range is parked as
/// `late`, never dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPolicy {
    /// Only at seq 1 of an unknown aggregate (or the next seq of a known one). Anything else
    /// waits `gap_timeout` and is then parked as `gap`; an operator starts the aggregate there
    /// with `outbox consumer-dead-letters replay --accept-gap`. For consumers whose state is
    /// built from every event (counters, ledgers).
    #[default]
    Strict,
    /// At the lowest event of the aggregate that has waited `gap_timeout`, provided nothing
    /// earlier of it is still being retried, waiting for its own predecessor, or parked. Never
    /// at first delivery: an earlier event that is only late gets the gap timeout to arrive. For
    /// consumers whose events carry absolute state (a read model of current levels).
    AfterGapTimeout,
}

/// Liveness of a running consumer, for health endpoints.
#[derive(Debug, Default)]
pub struct ConsumerHealth {
    last_progress_ms: AtomicU64,
    /// Last lag the broker reported, plus one (0: never reported).
    lag_plus_one: AtomicU64,
}

impl ConsumerHealth {
    fn touch(&self) {
        let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
        self.last_progress_ms.store(now, Ordering::Relaxed);
    }

    fn set_lag(&self, lag: u64) {
        self.lag_plus_one
            .store(lag.saturating_add(1), Ordering::Relaxed);
    }

    /// Time since the consumer last received or settled a message (or started).
    pub fn since_progress(&self) -> Duration {
        let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
        Duration::from_millis(now.saturating_sub(self.last_progress_ms.load(Ordering::Relaxed)))
    }

    /// Messages waiting at the broker, as last sampled (every 2 s), if the broker said.
    pub fn lag(&self) -> Option<u64> {
        self.lag_plus_one.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Whether messages are waiting and nothing moved for `timeout`: the consumer is stuck (or
    /// its database or broker is away).
    pub fn stalled(&self, timeout: Duration) -> bool {
        self.lag().is_some_and(|l| l > 0) && self.since_progress() > timeout
    }
}

/// A consumer: a handler, its database and its settings.
pub struct Consumer<H: Handler> {
    inner: Arc<Inner<H>>,
}

struct Inner<H> {
    pool: PgPool,
    handler: H,
    cfg: ConsumerConfig,
    health: Arc<ConsumerHealth>,
}

enum Outcome {
    Applied,
    /// A producer's skip marker: the position moved past it, no handler ran.
    Skipped,
    Duplicate,
    Late,
    Gap,
    Blocked,
    HandlerFailed(String),
}

impl<H: Handler> Consumer<H> {
    /// A consumer of `handler` whose inbox lives in `pool` (migrated with
    /// [`crate::schema::migrate`]).
    pub fn new(pool: PgPool, handler: H, cfg: ConsumerConfig) -> Result<Self> {
        if cfg.name.is_empty()
            || cfg.concurrency == 0
            || cfg.batch_size == 0
            || cfg.max_attempts < 1
        {
            return Err(OutboxError::Config(
                "a consumer needs a name, a concurrency and a batch size of at least 1, and at \
                 least 1 attempt"
                    .into(),
            ));
        }
        let health = Arc::new(ConsumerHealth::default());
        health.touch();
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                handler,
                cfg,
                health,
            }),
        })
    }

    /// Its health handle.
    pub fn health(&self) -> Arc<ConsumerHealth> {
        self.inner.health.clone()
    }

    /// Consumes `source` until `stop` is cancelled or the source ends. On stop it reads nothing
    /// more, lets every message already received finish (handled, committed, acknowledged) and
    /// returns; what was not acknowledged is redelivered by the broker to the next consumer.
    pub async fn run<S: EventSource>(&self, mut source: S, stop: CancellationToken) -> Result<()> {
        let cfg = &self.inner.cfg;
        let name = cfg.name.clone();
        m::register_zeros(&name);
        // Messages received and not yet settled: the broker bounds them too (ack-pending,
        // prefetch); this bound holds whatever the broker allows, and on stop it tells when
        // everything received has been settled.
        let buffer = (cfg.concurrency * cfg.batch_size * 2).max(1024);
        let buffered = Arc::new(Semaphore::new(buffer));
        let lanes: Lanes = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let ready_rx = Arc::new(tokio::sync::Mutex::new(ready_rx));
        let workers_stop = CancellationToken::new();
        let workers: Vec<_> = (0..cfg.concurrency)
            .map(|_| {
                tokio::spawn(worker(
                    self.inner.clone(),
                    lanes.clone(),
                    ready_tx.clone(),
                    ready_rx.clone(),
                    workers_stop.clone(),
                ))
            })
            .collect();
        let replay_stop = stop.child_token();
        let replayer = tokio::spawn(replayer(self.inner.clone(), replay_stop.clone()));
        let mut lag_at = Instant::now();
        let outcome = loop {
            if lag_at.elapsed() >= Duration::from_secs(2) {
                lag_at = Instant::now();
                if let Some(lag) = source.lag().await {
                    metrics::gauge!(m::LAG, "consumer" => name.clone()).set(lag as f64);
                    self.inner.health.set_lag(lag);
                }
            }
            let next = tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                n = tokio::time::timeout(Duration::from_secs(1), source.next()) => n,
            };
            match next {
                Err(_) => continue,
                Ok(Ok(Some(r))) => {
                    self.inner.health.touch();
                    let Ok(permit) = buffered.clone().acquire_owned().await else {
                        break Err(OutboxError::Config("the consumer's buffer closed".into()));
                    };
                    let key = lane_of(&r.event);
                    let queued = Queued { r, _permit: permit };
                    let mut l = lanes.lock().expect("lanes lock");
                    match l.get_mut(&key) {
                        // Ready or owned by a worker: its owner takes this one after the others.
                        Some(queue) => queue.push_back(queued),
                        None => {
                            l.insert(key, VecDeque::from([queued]));
                            // The receiver lives as long as the workers, which outlive this loop.
                            let _ = ready_tx.send(key);
                        }
                    }
                }
                Ok(Ok(None)) => break Ok(()),
                Ok(Err(e)) => {
                    tracing::warn!(consumer = %name, error = %e, "reading from the broker failed; retrying in 1 s");
                    // Cancellable: SIGTERM during a broker outage must not wait out the delay.
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        // Everything received is settled (handled, committed, acknowledged) before the workers go.
        let _ = buffered.acquire_many(buffer as u32).await;
        workers_stop.cancel();
        for w in workers {
            let _ = w.await;
        }
        replay_stop.cancel();
        let _ = replayer.await;
        tracing::info!(consumer = %name, "consumer stopped");
        outcome
    }
}

/// A received message and its place in the consumer's buffer.
struct Queued {
    r: Received,
    _permit: OwnedSemaphorePermit,
}

/// Takes ready lanes and applies what they hold, a batch at a time, until `stop`. A lane taken is
/// owned until its batch is settled: put back as ready if more arrived meanwhile, else removed.
async fn worker<H: Handler>(
    inner: Arc<Inner<H>>,
    lanes: Lanes,
    ready_tx: ReadyTx,
    ready_rx: ReadyRx,
    stop: CancellationToken,
) {
    let max = inner.cfg.batch_size;
    loop {
        let (owned, batch) = {
            let mut rx = tokio::select! {
                _ = stop.cancelled() => return,
                rx = ready_rx.lock() => rx,
            };
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                k = rx.recv() => match k {
                    Some(k) => k,
                    None => return,
                },
            };
            let mut owned = vec![first];
            let mut batch = Vec::new();
            let l = &mut *lanes.lock().expect("lanes lock");
            take(l, first, max, &mut batch);
            while batch.len() < max {
                let Ok(k) = rx.try_recv() else { break };
                owned.push(k);
                take(l, k, max, &mut batch);
            }
            (owned, batch)
        };
        settle_batch(&inner, batch).await;
        inner.health.touch();
        let mut l = lanes.lock().expect("lanes lock");
        for k in owned {
            if l.get(&k).is_some_and(|q| !q.is_empty()) {
                let _ = ready_tx.send(k);
            } else {
                l.remove(&k);
            }
        }
    }
}

/// Moves the messages of lane `key`, in arrival order, into `batch` until it holds `max`.
fn take(lanes: &mut HashMap<u64, VecDeque<Queued>>, key: u64, max: usize, batch: &mut Vec<Queued>) {
    if let Some(q) = lanes.get_mut(&key) {
        let n = q.len().min(max.saturating_sub(batch.len()));
        batch.extend(q.drain(..n));
    }
}

/// Lanes that are ready (their key waits in the ready channel) or owned by a worker, with the
/// messages not yet taken; a lane is removed when its owner finds it empty.
type Lanes = Arc<Mutex<HashMap<u64, VecDeque<Queued>>>>;
type ReadyTx = tokio::sync::mpsc::UnboundedSender<u64>;
type ReadyRx = Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<u64>>>;

/// The lane of an event: its aggregate's (so one aggregate is handled in order, by one task at a
/// time), else its id's.
fn lane_of(e: &InboundEvent) -> u64 {
    let mut h = DefaultHasher::new();
    match &e.aggregate {
        Some(a) => (&e.producer, a).hash(&mut h),
        None => e.event_id.hash(&mut h),
    }
    h.finish()
}

/// Settles a batch taken by a worker: in one transaction when it holds several events and all of
/// them go through, else one transaction per event (so that a failure is its event's own).
async fn settle_batch<H: Handler>(inner: &Inner<H>, mut batch: Vec<Queued>) {
    if batch.len() > 1 && batch.iter().all(|q| q.r.unreadable.is_none()) {
        // Position rows are locked in lane order, so two processes sharing an inbox lock them
        // in the same order (the sort is stable: each lane keeps its arrival order).
        batch.sort_by_key(|q| lane_of(&q.r.event));
        let events: Vec<&InboundEvent> = batch.iter().map(|q| &q.r.event).collect();
        match apply_batch(inner, &events).await {
            Ok(Some(outcomes)) => {
                metrics::counter!(m::BATCHES, "consumer" => inner.cfg.name.clone()).increment(1);
                for (q, outcome) in batch.into_iter().zip(outcomes) {
                    conclude(inner, q.r.event, q.r.acker, Ok(outcome)).await;
                }
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(consumer = %inner.cfg.name, error = %e, "batch failed; applying its events one by one");
            }
        }
    }
    for q in batch {
        settle(inner, q.r).await;
    }
}

async fn settle<H: Handler>(inner: &Inner<H>, r: Received) {
    let Received {
        event,
        unreadable,
        acker,
    } = r;
    if let Some(why) = unreadable {
        tracing::warn!(consumer = %inner.cfg.name, reason = %why.0, "parking a message that is not an event");
        park_then_ack(inner, &event, "unreadable", Some(&why.0), acker).await;
        return;
    }
    let outcome = apply(inner, &event, None, Mode::Next).await;
    conclude(inner, event, acker, outcome).await;
}

/// Acknowledges, retries or parks an event after its transaction, by its outcome.
async fn conclude<H: Handler>(
    inner: &Inner<H>,
    event: InboundEvent,
    acker: Box<dyn Acknowledger>,
    outcome: Result<Outcome>,
) {
    let cfg = &inner.cfg;
    let c = cfg.name.clone();
    let outcome = match outcome {
        Ok(Outcome::Gap) => match gap_timed_out(inner, &event).await {
            Ok(None) => {
                metrics::counter!(m::RETRIES, "consumer" => c, "reason" => "gap").increment(1);
                retry(acker, cfg.gap_retry).await;
                return;
            }
            Ok(Some(outcome)) => Ok(outcome),
            Err(e) => Err(e),
        },
        other => other,
    };
    match outcome {
        Ok(Outcome::Applied) => {
            metrics::counter!(m::HANDLED, "consumer" => c).increment(1);
            if let Some(h) = &cfg.after_commit {
                h(&event);
            }
            ack(acker).await;
        }
        Ok(Outcome::Skipped) => {
            metrics::counter!(m::SKIPPED, "consumer" => c).increment(1);
            ack(acker).await;
        }
        Ok(Outcome::Duplicate) => {
            metrics::counter!(m::DUPLICATES, "consumer" => c).increment(1);
            ack(acker).await;
        }
        Ok(Outcome::Late) => {
            tracing::error!(consumer = %c, event_id = %event.event_id, aggregate = ?event.aggregate,
                position = ?event.position, "the event arrived after its aggregate was started past it; parking it");
            park_then_ack(
                inner,
                &event,
                "late",
                Some("arrived after its aggregate's position was moved past it"),
                acker,
            )
            .await;
        }
        Ok(Outcome::Blocked) => {
            park_then_ack(inner, &event, "held", None, acker).await;
        }
        Ok(Outcome::Gap) => {
            tracing::error!(consumer = %c, event_id = %event.event_id, aggregate = ?event.aggregate,
                position = ?event.position, "the event before this one never arrived; parking it");
            park_then_ack(
                inner,
                &event,
                "gap",
                Some("its predecessor never arrived"),
                acker,
            )
            .await;
        }
        Ok(Outcome::HandlerFailed(err)) => failed(inner, event, acker, err).await,
        Err(e) if e.is_data_error() => {
            // The database refused this event's own data (a NUL in a header, a value too long):
            // its failure, which no retry mends, not an outage that would hold it for ever.
            failed(
                inner,
                event,
                acker,
                format!("the inbox refused the event: {e}"),
            )
            .await
        }
        Err(e) => database_down(&c, e, acker).await,
    }
}

/// A gap's clock (kept in the database): `None` while the event may still wait for its
/// predecessor; past the gap timeout, what the start policy makes of it (applied at a start,
/// still a gap to park).
async fn gap_timed_out<H: Handler>(inner: &Inner<H>, e: &InboundEvent) -> Result<Option<Outcome>> {
    let cfg = &inner.cfg;
    if !inbox::note_gap(&inner.pool, &cfg.name, e, cfg.gap_timeout).await? {
        return Ok(None);
    }
    if cfg.start_policy == StartPolicy::Strict {
        return Ok(Some(Outcome::Gap));
    }
    match apply(inner, e, None, Mode::Start("start_policy")).await? {
        // Something earlier of the aggregate is still coming: keep waiting for it.
        Outcome::Gap => Ok(None),
        other => {
            if matches!(other, Outcome::Applied | Outcome::Skipped) {
                tracing::warn!(consumer = %cfg.name, event_id = %e.event_id, aggregate = ?e.aggregate,
                    position = ?e.position, "started the aggregate past events never received (start policy)");
            }
            Ok(Some(other))
        }
    }
}

/// Counts a failure of the event; retries it with back-off or parks it once its attempts are
/// spent.
async fn failed<H: Handler>(
    inner: &Inner<H>,
    event: InboundEvent,
    acker: Box<dyn Acknowledger>,
    err: String,
) {
    let cfg = &inner.cfg;
    let c = cfg.name.clone();
    match inbox::record_failure(&inner.pool, &c, &event, &err).await {
        Ok(n) if n >= cfg.max_attempts => {
            tracing::error!(consumer = %c, event_id = %event.event_id, attempts = n, error = %err,
                "handler keeps failing; parking the event");
            park_then_ack(inner, &event, "handler", Some(&err), acker).await;
        }
        Ok(n) => {
            tracing::warn!(consumer = %c, event_id = %event.event_id, attempts = n, error = %err,
                "handler failed; the event will be delivered again");
            metrics::counter!(m::RETRIES, "consumer" => c, "reason" => "handler").increment(1);
            retry(acker, cfg.backoff(n)).await;
        }
        Err(e) => database_down(&c, e, acker).await,
    }
}

async fn database_down(consumer: &str, e: OutboxError, acker: Box<dyn Acknowledger>) {
    // Not the event's fault: no attempt is spent.
    tracing::warn!(consumer, error = %e, "inbox database unavailable; the event will be delivered again");
    metrics::counter!(m::RETRIES, "consumer" => consumer.to_string(), "reason" => "database")
        .increment(1);
    retry(acker, Duration::from_secs(1)).await;
}

async fn park_then_ack<H: Handler>(
    inner: &Inner<H>,
    e: &InboundEvent,
    reason: &'static str,
    error: Option<&str>,
    acker: Box<dyn Acknowledger>,
) {
    match inbox::park(&inner.pool, &inner.cfg.name, e, reason, error).await {
        Ok(()) => {
            metrics::counter!(m::PARKED, "consumer" => inner.cfg.name.clone(), "reason" => reason)
                .increment(1);
            ack(acker).await;
        }
        Err(err) => database_down(&inner.cfg.name, err, acker).await,
    }
}

async fn ack(acker: Box<dyn Acknowledger>) {
    // A lost acknowledgement only means a redelivery, which the inbox drops as a duplicate.
    if let Err(e) = acker.ack().await {
        tracing::warn!(error = %e, "acknowledgement failed; the broker will redeliver (a duplicate)");
    }
}

async fn retry(acker: Box<dyn Acknowledger>, delay: Duration) {
    if let Err(e) = acker.retry_after(delay).await {
        tracing::warn!(error = %e, "asking for a redelivery failed; the broker redelivers after its ack wait");
    }
}

/// Runs the handler for `e` in one transaction with its inbox record; `parked`: the dead-letter
/// row being replayed, deleted in the same transaction.
async fn apply<H: Handler>(
    inner: &Inner<H>,
    e: &InboundEvent,
    parked: Option<i64>,
    mode: Mode,
) -> Result<Outcome> {
    let c = &inner.cfg.name;
    let mut tx = inner.pool.begin().await?;
    let run = match inbox::claim(&mut tx, c, e, mode, parked.is_some()).await? {
        Verdict::Duplicate => {
            if let Some(id) = parked {
                delete_parked(&mut tx, id).await?;
                tx.commit().await?;
            }
            return Ok(Outcome::Duplicate);
        }
        Verdict::Late => return Ok(Outcome::Late),
        Verdict::Gap => return Ok(Outcome::Gap),
        Verdict::Blocked => return Ok(Outcome::Blocked),
        Verdict::Skip => false,
        Verdict::Apply => true,
    };
    if run {
        if let Some(err) = run_handler(inner, &mut tx, e).await {
            drop(tx);
            return Ok(Outcome::HandlerFailed(err));
        }
        if let Err(err) = committable(&mut tx).await {
            drop(tx);
            return match err {
                Aborted::Swallowed(why) => Ok(Outcome::HandlerFailed(why)),
                Aborted::Database(e) => Err(e),
            };
        }
    }
    // The failure count of an event that now succeeded is not deleted here (a statement per
    // event for a rare case): it can never be read again, since the event is applied, and the
    // inbox retention deletes it.
    if let Some(id) = parked {
        delete_parked(&mut tx, id).await?;
    }
    if let Some(h) = &inner.cfg.before_commit {
        h(e);
    }
    tx.commit().await?;
    Ok(if run {
        Outcome::Applied
    } else {
        Outcome::Skipped
    })
}

/// Why a transaction cannot be committed after its handlers ran.
enum Aborted {
    /// A handler's statement failed and the handler returned `Ok` anyway: PostgreSQL has
    /// aborted the transaction, and `COMMIT` would answer `ROLLBACK` without an error (sqlx
    /// does not read the command tag), so the event would be acknowledged unapplied.
    Swallowed(String),
    /// The check itself could not run.
    Database(OutboxError),
}

/// Checks that the transaction is still alive before it is committed: one statement, which
/// PostgreSQL refuses with SQLSTATE 25P02 when an earlier one failed. sqlx keeps the
/// connection's transaction status (from ReadyForQuery) private, so asking is the only way.
async fn committable(tx: &mut PgConnection) -> std::result::Result<(), Aborted> {
    match sqlx::query("SELECT 1").execute(&mut *tx).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = OutboxError::from(e);
            if e.sqlstate().as_deref() == Some("25P02") {
                Err(Aborted::Swallowed(
                    "a statement of the handler failed and the handler did not return the error \
                     (the transaction was aborted): return database errors from the handler"
                        .into(),
                ))
            } else {
                Err(Aborted::Database(e))
            }
        }
    }
}

/// Runs the handler for `e` in `tx`; returns why it failed, if it did.
async fn run_handler<H: Handler>(
    inner: &Inner<H>,
    tx: &mut PgConnection,
    e: &InboundEvent,
) -> Option<String> {
    // A panicking handler is a failing handler: without this its lane would never be released
    // and its aggregate would stop without a word.
    let handled = AssertUnwindSafe(inner.handler.handle(tx, e))
        .catch_unwind()
        .await;
    match handled {
        Ok(Ok(())) => None,
        Ok(Err(err)) => Some(err.to_string()),
        Err(panic) => Some(format!(
            "the handler panicked: {}",
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default()
        )),
    }
}

/// Applies `events` (several lanes, each in arrival order) in one transaction: every event that
/// is next in its aggregate runs its handler there; duplicates, gaps and blocked ones write
/// nothing and are settled after the commit by their outcome. `None`: a handler failed (or
/// panicked, or swallowed a database error), and the transaction was rolled back whole.
async fn apply_batch<H: Handler>(
    inner: &Inner<H>,
    events: &[&InboundEvent],
) -> Result<Option<Vec<Outcome>>> {
    let c = &inner.cfg.name;
    let mut tx = inner.pool.begin().await?;
    let mut outcomes = Vec::with_capacity(events.len());
    for e in events {
        // A handler that swallowed a database error makes the next claim fail (25P02): the
        // batch is then applied one event per transaction, where the check below names it.
        let outcome = match inbox::claim(&mut tx, c, e, Mode::Next, false).await? {
            Verdict::Duplicate => Outcome::Duplicate,
            Verdict::Late => Outcome::Late,
            Verdict::Gap => Outcome::Gap,
            Verdict::Blocked => Outcome::Blocked,
            Verdict::Skip => Outcome::Skipped,
            Verdict::Apply => {
                if run_handler(inner, &mut tx, e).await.is_some() {
                    return Ok(None);
                }
                Outcome::Applied
            }
        };
        outcomes.push(outcome);
    }
    // Only the last handler's swallowed error is left for this check to find.
    if matches!(outcomes.last(), Some(Outcome::Applied)) {
        match committable(&mut tx).await {
            Ok(()) => {}
            Err(Aborted::Swallowed(_)) => return Ok(None),
            Err(Aborted::Database(e)) => return Err(e),
        }
    }
    if let Some(h) = &inner.cfg.before_commit {
        for (e, o) in events.iter().zip(&outcomes) {
            if matches!(o, Outcome::Applied) {
                h(e);
            }
        }
    }
    tx.commit().await?;
    Ok(Some(outcomes))
}

async fn delete_parked(tx: &mut PgConnection, id: i64) -> Result<()> {
    sqlx::query("DELETE FROM outbox_consumer_dead_letter WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Applies parked events that were asked for (and those parked behind them), and waiting ones
/// whose predecessor has arrived since; also runs the inbox's retention. A pass that left work
/// it could have done (its bounds cut it short) is followed by the next at once.
async fn replayer<H: Handler>(inner: Arc<Inner<H>>, stop: CancellationToken) {
    let mut cleaned = Instant::now() - Duration::from_secs(3600);
    let mut walk = ReplayWalk::default();
    let mut busy = false;
    loop {
        if busy {
            if stop.is_cancelled() {
                return;
            }
        } else {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(inner.cfg.replay_poll) => {}
            }
        }
        if cleaned.elapsed() >= Duration::from_secs(600) {
            cleaned = Instant::now();
            match inbox::cleanup(&inner.pool, &inner.cfg.name, inner.cfg.seen_retention).await {
                Ok(n) if n > 0 => {
                    tracing::info!(consumer = %inner.cfg.name, rows = n, "inbox retention")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "inbox retention failed; next pass in 10 min"),
            }
        }
        // A gap row is over once the position reached it or it was parked; one not delivered
        // again for long (its message is gone from the broker) is dropped too, so it does not
        // hold back a start for ever.
        let stale = inner.cfg.gap_timeout + inner.cfg.gap_retry * 10 + Duration::from_secs(60);
        if let Err(e) = inbox::prune_gaps(&inner.pool, &inner.cfg.name, stale).await {
            tracing::warn!(consumer = %inner.cfg.name, error = %e, "pruning the gap clocks failed; retrying");
        }
        if let Err(e) = export_state(&inner).await {
            tracing::warn!(consumer = %inner.cfg.name, error = %e, "reading the consumer's state for its gauges failed");
        }
        busy = match replay_pass(&inner, &mut walk).await {
            Ok(busy) => busy,
            Err(e) => {
                tracing::warn!(consumer = %inner.cfg.name, error = %e, "replaying parked events failed; retrying");
                false
            }
        };
    }
}

/// Sets the state gauges from the consumer's database (every replayer pass).
async fn export_state<H: Handler>(inner: &Inner<H>) -> Result<()> {
    let c = &inner.cfg.name;
    let (parked, gap_aggregates, gap_oldest) = inbox::state(&inner.pool, c).await?;
    for reason in m::PARK_REASONS {
        let n = parked
            .iter()
            .find(|(r, _)| r == reason)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!(m::PARKED_NOW, "consumer" => c.clone(), "reason" => *reason).set(n as f64);
    }
    metrics::gauge!(m::GAP_AGGREGATES, "consumer" => c.clone()).set(gap_aggregates as f64);
    metrics::gauge!(m::GAP_OLDEST, "consumer" => c.clone()).set(gap_oldest);
    Ok(())
}

/// The replayer's place among the waiting aggregates, and the aggregates a pass left unfinished
/// (more parked events than one pass applies).
#[derive(Default)]
struct ReplayWalk {
    after: Option<dead_letters::Keyed>,
    unfinished: Vec<dead_letters::Keyed>,
}

/// One bounded pass: requested replays first (oldest request first), then the aggregates the
/// last pass left unfinished, then the next page of waiting aggregates (a cursor, so that every
/// one is looked at in turn however many there are). Returns whether work is left that the next
/// pass should do at once.
async fn replay_pass<H: Handler>(inner: &Inner<H>, walk: &mut ReplayWalk) -> Result<bool> {
    use dead_letters::Candidate;
    let c = &inner.cfg.name;
    let mut todo = dead_letters::requested(&inner.pool, c, dead_letters::REQUESTS_PER_PASS).await?;
    let mut busy = todo.len() as i64 >= dead_letters::REQUESTS_PER_PASS;
    let waiting = dead_letters::waiting(
        &inner.pool,
        c,
        walk.after.as_ref(),
        dead_letters::WAITING_PER_PASS,
    )
    .await?;
    walk.after = match waiting.last() {
        Some(last) if waiting.len() as i64 >= dead_letters::WAITING_PER_PASS => Some(last.clone()),
        _ => None,
    };
    let next = std::mem::take(&mut walk.unfinished)
        .into_iter()
        .chain(waiting);
    for a in next.map(Candidate::Aggregate) {
        if !todo.contains(&a) {
            todo.push(a);
        }
    }
    for candidate in todo {
        match candidate {
            Candidate::Single(id) => {
                replay_rows(inner, &[id]).await?;
            }
            Candidate::Aggregate(a) => {
                let ids = dead_letters::of_aggregate(
                    &inner.pool,
                    c,
                    &a,
                    dead_letters::ROWS_PER_AGGREGATE,
                )
                .await?;
                let cut_short = ids.len() as i64 >= dead_letters::ROWS_PER_AGGREGATE;
                if replay_rows(inner, &ids).await? && cut_short {
                    walk.unfinished.push(a);
                    busy = true;
                }
            }
        }
    }
    Ok(busy)
}

/// Applies the parked rows `ids` (one aggregate's, in order) until one cannot be applied, each
/// loaded only when its turn comes. Returns whether all of them went (applied or duplicates).
async fn replay_rows<H: Handler>(inner: &Inner<H>, ids: &[i64]) -> Result<bool> {
    let c = &inner.cfg.name;
    for &id in ids {
        // Gone meanwhile: applied by another process sharing the inbox, or purged.
        let Some(row) = dead_letters::load(&inner.pool, id).await? else {
            continue;
        };
        // A parked event that waited the gap timeout is started as a live one would be by the
        // start policy (a held row at the start of a new epoch would otherwise wait for ever).
        let mode = if row.accept_gap {
            Mode::Start("operator")
        } else if inner.cfg.start_policy == StartPolicy::AfterGapTimeout
            && row.parked_for >= inner.cfg.gap_timeout
        {
            Mode::Start("start_policy")
        } else {
            Mode::Replay
        };
        match apply(inner, &row.event, Some(row.id), mode).await? {
            Outcome::Applied | Outcome::Skipped => {
                metrics::counter!(m::HANDLED, "consumer" => c.clone()).increment(1);
                metrics::counter!(m::REPLAYED, "consumer" => c.clone()).increment(1);
                tracing::info!(consumer = %c, event_id = %row.event.event_id, "replayed a parked event");
            }
            Outcome::Duplicate => {
                metrics::counter!(m::DUPLICATES, "consumer" => c.clone()).increment(1);
            }
            Outcome::Late => {
                dead_letters::replay_failed(
                    &inner.pool,
                    row.id,
                    "replay: its aggregate's position was moved past it; purge it",
                    dead_letters::Reason::Late,
                )
                .await?;
            }
            Outcome::Gap | Outcome::Blocked => {
                if row.requested {
                    dead_letters::replay_failed(
                        &inner.pool,
                        row.id,
                        "replay: an earlier event of its aggregate is not applied yet",
                        dead_letters::Reason::Unchanged,
                    )
                    .await?;
                }
                return Ok(false);
            }
            Outcome::HandlerFailed(err) => {
                dead_letters::replay_failed(
                    &inner.pool,
                    row.id,
                    &err,
                    dead_letters::Reason::Handler,
                )
                .await?;
                return Ok(false);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_only_with_messages_waiting() {
        let h = ConsumerHealth::default();
        h.touch();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!h.stalled(Duration::ZERO), "lag never reported");
        h.set_lag(0);
        assert!(!h.stalled(Duration::ZERO), "nothing waiting");
        h.set_lag(3);
        assert!(h.stalled(Duration::ZERO));
        assert!(!h.stalled(Duration::from_secs(60)));
        assert_eq!(h.lag(), Some(3));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut c = ConsumerConfig::new("x");
        c.retry_base = Duration::from_millis(100);
        c.retry_max = Duration::from_millis(1000);
        let d: Vec<u128> = (1..=6).map(|a| c.backoff(a).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
    }
}
