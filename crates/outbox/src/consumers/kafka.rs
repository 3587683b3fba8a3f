//! Kafka source (feature `kafka`): a consumer group member reading the relay's topics.
//!
//! Kafka's offsets are per partition and cumulative, while the runtime settles messages one by
//! one and out of order (aggregates are handled in parallel, a failing event is retried later).
//! So the source keeps, per assigned partition, the offsets it delivered and not yet settled
//! ([`Offsets`]) and commits only the lowest contiguous settled position, the way vector's
//! `OrderedFinalizer` releases an offset only after every earlier one settled:
//!
//! - **A retry never holds other aggregates.** `retry_after` does not rewind the partition: the
//!   source hands the same message to the runtime again after the delay, while the messages after
//!   it keep flowing. Only the *commit* waits at the retried offset; after a restart the messages
//!   behind it are delivered again and the inbox drops the ones already applied.
//! - **A revoked partition commits nothing more.** On a revoke the settled prefix is committed
//!   (synchronously, inside the rebalance) and the partition's state is dropped with its
//!   generation; a settlement or a retry that arrives later for that generation is ignored, so a
//!   slow handler cannot commit past what the new owner starts from.
//! - Offsets are committed by a task every `commit_interval` and on shutdown; auto-commit is off.
//! - Topics: a name, or a pattern starting with `^` (librdkafka's regex subscription) for a topic
//!   template with `{tenant}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::event::InboundEvent;
use super::source::{Acknowledger, EventSource, Received};
use crate::error::{OutboxError, Result};

/// Where a Kafka source reads.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group (the consumer's name).
    pub group: String,
    /// Topics, or one pattern starting with `^`.
    pub topics: Vec<String>,
    /// How often settled offsets are committed.
    pub commit_interval: Duration,
    /// Group session time-out: how long a killed member's partitions wait for a new owner.
    pub session_timeout: Duration,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group: "read-model".into(),
            topics: vec!["outbox.events".into()],
            commit_interval: Duration::from_millis(500),
            session_timeout: Duration::from_secs(10),
        }
    }
}

/// (topic, partition).
type Tp = (String, i32);

/// Per partition: the offsets delivered and not settled, the highest delivered, and the position
/// last committed; with the generation of the assignment they belong to.
#[derive(Debug, Default)]
struct PartitionState {
    generation: u64,
    open: BTreeSet<i64>,
    /// One past the highest offset delivered.
    next: Option<i64>,
    committed: Option<i64>,
}

/// The settled offsets of the assigned partitions (see the module doc). Pure bookkeeping, shared
/// by the acknowledgements, the rebalance callback and the commit task.
#[derive(Debug, Default)]
pub struct Offsets {
    parts: HashMap<Tp, PartitionState>,
    generation: u64,
}

impl Offsets {
    /// A partition was assigned: a fresh state under a new generation.
    pub fn assign(&mut self, topic: &str, partition: i32) {
        self.generation += 1;
        self.parts.insert(
            (topic.to_string(), partition),
            PartitionState {
                generation: self.generation,
                ..Default::default()
            },
        );
    }

    /// A partition was revoked: what it settled so far, to commit now, and its state dropped.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<i64> {
        let mut s = self.parts.remove(&(topic.to_string(), partition))?;
        let at = Self::position(&s)?;
        (s.committed != Some(at)).then(|| {
            s.committed = Some(at);
            at
        })
    }

    /// A message was delivered: its generation (0 when its partition is not assigned, e.g. a
    /// message fetched just before a revoke; such a message is never committed).
    pub fn delivered(&mut self, topic: &str, partition: i32, offset: i64) -> u64 {
        let Some(s) = self.parts.get_mut(&(topic.to_string(), partition)) else {
            return 0;
        };
        s.open.insert(offset);
        s.next = Some(s.next.map_or(offset + 1, |n| n.max(offset + 1)));
        s.generation
    }

    /// Whether a delivery of generation `generation` still belongs to the current assignment.
    pub fn current(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.parts
            .get(&(topic.to_string(), partition))
            .is_some_and(|s| s.generation == generation && generation != 0)
    }

    /// A message was settled (applied, duplicate or parked); ignored when its partition was
    /// revoked since it was delivered.
    pub fn settled(&mut self, topic: &str, partition: i32, generation: u64, offset: i64) {
        if let Some(s) = self.parts.get_mut(&(topic.to_string(), partition)) {
            if s.generation == generation {
                s.open.remove(&offset);
            }
        }
    }

    /// The position a partition may commit: the lowest unsettled offset, or one past the highest
    /// delivered when all are settled.
    fn position(s: &PartitionState) -> Option<i64> {
        s.open.first().copied().or(s.next)
    }

    /// Positions to commit (those that moved since the last call), marked as committed.
    pub fn to_commit(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, s) in &mut self.parts {
            if let Some(at) = Self::position(s) {
                if s.committed != Some(at) {
                    s.committed = Some(at);
                    out.push((tp.clone(), at));
                }
            }
        }
        out
    }

    /// Marks positions as not committed after a failed commit, so that they are tried again.
    pub fn uncommit(&mut self, tps: &[(Tp, i64)]) {
        for (tp, at) in tps {
            if let Some(s) = self.parts.get_mut(tp) {
                if s.committed == Some(*at) {
                    s.committed = None;
                }
            }
        }
    }
}

fn list(positions: &[(Tp, i64)]) -> TopicPartitionList {
    let mut l = TopicPartitionList::new();
    for ((t, p), at) in positions {
        let _ = l.add_partition_offset(t, *p, Offset::Offset(*at));
    }
    l
}

/// Keeps [`Offsets`] in step with the group's assignment.
struct Ctx {
    offsets: Arc<Mutex<Offsets>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let commit: Vec<(Tp, i64)> = {
                let mut o = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
                tpl.elements()
                    .iter()
                    .filter_map(|e| {
                        o.revoke(e.topic(), e.partition())
                            .map(|at| ((e.topic().to_string(), e.partition()), at))
                    })
                    .collect()
            };
            if !commit.is_empty() {
                if let Err(e) = consumer.commit(&list(&commit), CommitMode::Sync) {
                    tracing::warn!(error = %e, "committing the settled offsets of revoked partitions failed; the new owner re-reads them (the inbox drops what was applied)");
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut o = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
            for e in tpl.elements() {
                o.assign(e.topic(), e.partition());
            }
        }
    }
}

/// A Kafka consumer group member as an [`EventSource`].
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<Ctx>>,
    offsets: Arc<Mutex<Offsets>>,
    received: mpsc::UnboundedReceiver<Result<Received>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // What was settled is committed on the way out; the rest is delivered again.
        let commit = self
            .offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_commit();
        if !commit.is_empty() {
            let _ = self.consumer.commit(&list(&commit), CommitMode::Sync);
        }
    }
}

fn broker(what: &str, e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Broker(format!("Kafka: {what}: {e}"))
}

impl KafkaSource {
    /// Joins the group and subscribes to the topics.
    pub async fn connect(cfg: KafkaSourceConfig) -> Result<Self> {
        let offsets: Arc<Mutex<Offsets>> = Arc::default();
        let consumer: StreamConsumer<Ctx> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group)
            .set("client.id", &cfg.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set(
                "session.timeout.ms",
                cfg.session_timeout.as_millis().max(1000).to_string(),
            )
            .set("topic.metadata.refresh.interval.ms", "5000")
            .create_with_context(Ctx {
                offsets: offsets.clone(),
            })
            .map_err(|e| OutboxError::Config(format!("cannot build the Kafka consumer: {e}")))?;
        let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
        // A subscription to a topic that does not exist yet is not always assigned once it is
        // created (tansu never rebalances for it): wait for the relay's first event instead.
        for t in topics.iter().filter(|t| !t.starts_with('^')) {
            let c = &consumer;
            let known = tokio::task::block_in_place(|| {
                c.fetch_metadata(Some(t), Duration::from_secs(5)).map(|m| {
                    m.topics().iter().any(|mt| {
                        mt.name() == *t && mt.error().is_none() && !mt.partitions().is_empty()
                    })
                })
            })
            .map_err(|e| broker(&format!("reading the metadata of topic {t}"), e))?;
            if !known {
                return Err(broker(
                    &format!("topic {t} does not exist yet"),
                    "the relay creates it with its first event; retrying",
                ));
            }
        }
        consumer
            .subscribe(&topics)
            .map_err(|e| broker("subscribing", e))?;
        let consumer = Arc::new(consumer);
        let (tx, received) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(consumer.clone(), offsets.clone(), tx));
        let committer = tokio::spawn(commit_loop(
            consumer.clone(),
            offsets.clone(),
            cfg.commit_interval,
        ));
        Ok(Self {
            consumer,
            offsets,
            received,
            tasks: vec![pump, committer],
        })
    }
}

/// Moves every fetched message into the source's queue, registering its offset on arrival.
async fn pump(
    consumer: Arc<StreamConsumer<Ctx>>,
    offsets: Arc<Mutex<Offsets>>,
    tx: mpsc::UnboundedSender<Result<Received>>,
) {
    loop {
        let item = match consumer.recv().await {
            Ok(m) => {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        if let Some(v) = hd.value {
                            headers.insert(
                                hd.key.to_string(),
                                String::from_utf8_lossy(v).into_owned(),
                            );
                        }
                    }
                }
                let delivery = Delivered {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    headers,
                    payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
                };
                let generation = offsets.lock().unwrap_or_else(|p| p.into_inner()).delivered(
                    &delivery.topic,
                    delivery.partition,
                    delivery.offset,
                );
                Ok(delivery.received(generation, offsets.clone(), tx.clone()))
            }
            Err(e) => Err(broker("receiving", e)),
        };
        let failed = item.is_err();
        if tx.send(item).is_err() {
            return;
        }
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Commits what moved, every `every`.
async fn commit_loop(
    consumer: Arc<StreamConsumer<Ctx>>,
    offsets: Arc<Mutex<Offsets>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let commit = offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_commit();
        if commit.is_empty() {
            continue;
        }
        if let Err(e) = consumer.commit(&list(&commit), CommitMode::Async) {
            tracing::warn!(error = %e, "committing Kafka offsets failed; retried");
            offsets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .uncommit(&commit);
        }
    }
}

/// A fetched message, kept so that a retry can hand it to the runtime again.
#[derive(Clone)]
struct Delivered {
    topic: String,
    partition: i32,
    offset: i64,
    headers: BTreeMap<String, String>,
    payload: Bytes,
}

impl Delivered {
    fn received(
        self,
        generation: u64,
        offsets: Arc<Mutex<Offsets>>,
        tx: mpsc::UnboundedSender<Result<Received>>,
    ) -> Received {
        let (event, unreadable) = InboundEvent::read(
            self.topic.clone(),
            self.headers.clone(),
            None,
            self.payload.clone(),
        );
        Received {
            event,
            unreadable,
            acker: Box::new(KafkaAck {
                msg: self,
                generation,
                offsets,
                tx,
            }),
        }
    }
}

/// Settles one message in the source's bookkeeping (the commit follows).
struct KafkaAck {
    msg: Delivered,
    generation: u64,
    offsets: Arc<Mutex<Offsets>>,
    tx: mpsc::UnboundedSender<Result<Received>>,
}

#[async_trait]
impl Acknowledger for KafkaAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settled(
                &self.msg.topic,
                self.msg.partition,
                self.generation,
                self.msg.offset,
            );
        Ok(())
    }

    async fn retry_after(self: Box<Self>, delay: Duration) -> Result<()> {
        let me = *self;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let current = me
                .offsets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .current(&me.msg.topic, me.msg.partition, me.generation);
            // Revoked meanwhile: the new owner reads it from the committed position.
            if current {
                let again = me.msg.received(me.generation, me.offsets, me.tx.clone());
                let _ = me.tx.send(Ok(again));
            }
        });
        Ok(())
    }
}

#[async_trait]
impl EventSource for KafkaSource {
    fn broker(&self) -> &'static str {
        "kafka"
    }

    async fn next(&mut self) -> Result<Option<Received>> {
        self.received.recv().await.transpose()
    }

    async fn lag(&mut self) -> Option<u64> {
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            let positions = consumer.position().ok()?;
            let mut lag = 0u64;
            for e in positions.elements() {
                let (_, high) = consumer
                    .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(1))
                    .ok()?;
                let at = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                lag += u64::try_from(high - at).unwrap_or(0);
            }
            Some(lag)
        })
        .await
        .ok()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::Offsets;

    #[test]
    fn commits_only_the_lowest_contiguous_settled_offset() {
        let mut o = Offsets::default();
        o.assign("t", 0);
        let g: Vec<u64> = (10..15).map(|off| o.delivered("t", 0, off)).collect();
        // 10 retrying, 11..14 settled: nothing past 10 may be committed.
        for off in 11..15 {
            o.settled("t", 0, g[0], off);
        }
        assert_eq!(o.to_commit(), vec![(("t".into(), 0), 10)]);
        assert!(o.to_commit().is_empty(), "nothing moved");
        o.settled("t", 0, g[0], 10);
        assert_eq!(o.to_commit(), vec![(("t".into(), 0), 15)]);
    }

    #[test]
    fn a_partition_revoked_mid_batch_commits_nothing_more() {
        let mut o = Offsets::default();
        o.assign("t", 1);
        let g = o.delivered("t", 1, 0);
        o.delivered("t", 1, 1);
        o.delivered("t", 1, 2);
        o.settled("t", 1, g, 0);
        // Revoked with 1 and 2 in the handlers: only the settled prefix is committed.
        assert_eq!(o.revoke("t", 1), Some(1));
        o.settled("t", 1, g, 1);
        o.settled("t", 1, g, 2);
        assert!(o.to_commit().is_empty());
        assert!(!o.current("t", 1, g));
        // Assigned again (a new generation): the old settlements still count for nothing.
        o.assign("t", 1);
        o.settled("t", 1, g, 1);
        assert!(o.to_commit().is_empty());
        let g2 = o.delivered("t", 1, 1);
        assert_ne!(g, g2);
        o.settled("t", 1, g2, 1);
        assert_eq!(o.to_commit(), vec![(("t".into(), 1), 2)]);
    }

    #[test]
    fn partitions_are_independent() {
        let mut o = Offsets::default();
        o.assign("t", 0);
        o.assign("t", 1);
        let a = o.delivered("t", 0, 5);
        let b = o.delivered("t", 1, 7);
        o.settled("t", 1, b, 7);
        let mut c = o.to_commit();
        c.sort();
        assert_eq!(c, vec![(("t".into(), 0), 5), (("t".into(), 1), 8)]);
        assert_eq!(o.delivered("u", 0, 1), 0, "not assigned: never committed");
        o.settled("t", 0, a, 5);
        assert_eq!(o.to_commit(), vec![(("t".into(), 0), 6)]);
    }
}
