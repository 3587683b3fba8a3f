//! Kafka adapter (feature `kafka`): librdkafka's idempotent producer through `rdkafka`, built from
//! the sources the crate bundles (Debian's librdkafka 2.0 is older than the crate needs).
//!
//! - **Key and headers.** The record key is the aggregate (`{tenant}/{aggregate_type}/{aggregate_id}`),
//!   so all events of one aggregate go to one partition and keep their order there; the headers
//!   are the ones every adapter sends (`Outbox-Event-Id`, `-Seq`, `-Seq-Epoch`, `-Producer-Id`,
//!   `-Skip`, ...: [`crate::nats::NatsPublisher::headers`] without `Nats-Msg-Id`). With
//!   [`KafkaConfig::header_encoding`] compact they are `Outbox-Event-Id` (a Kafka record has no
//!   message id of its own: consumers de-duplicate on this header), `Outbox-Meta`
//!   ([`crate::meta`]) and `traceparent`.
//! - **Acknowledged by all in-sync replicas.** `acks=all` with `enable.idempotence=true`: a
//!   broker retry within one producer session is de-duplicated by the broker, and the messages of
//!   one partition stay in order with up to five requests in flight. So the adapter says
//!   [`Publisher::ordered_in_flight_per_key`] and sends an aggregate's next event without waiting
//!   for the previous acknowledgement. `enable.gapless.guarantee` turns a failure that would leave
//!   a gap in a partition into a fatal error instead of letting later messages through.
//! - **Fatal errors.** An idempotent producer that hits a fatal error (a sequence it cannot
//!   recover, a fenced epoch) refuses everything after it. The adapter then reports the batch
//!   `Unavailable` (no attempt spent), drops that producer and builds a new one; the engine
//!   publishes the rows that were not acknowledged again, in order, with the new producer.
//! - **Fencing.** librdkafka retries a message on its own until `message.timeout.ms`. It is set
//!   to [`KafkaConfig::delivery_timeout`], which the relay keeps inside the reserve it holds
//!   back from its lease (`RelayConfig::lease_margin`), and when the relay's send deadline passes
//!   the producer's queue is purged: nothing handed to librdkafka leaves after the lease could
//!   have passed to another relay. Purged messages are reported `LeaseExpired`.
//! - **Classification.** Not enough in-sync replicas, leader changes, unknown partitions during
//!   a topic's creation, time-outs and lost connections are outages (`Unavailable`, no attempt
//!   spent); a message too large, an invalid record or topic name is that message's
//!   (`Permanent`); anything else the broker refuses for one message is `Retryable`.
//! - **A duplicate without a position is not trusted.** librdkafka counts a retry that the
//!   broker refuses with `DUPLICATE_SEQUENCE_NUMBER` as delivered ("the first send got through"),
//!   with no offset. A broker whose producer state can run ahead of its log breaks that promise:
//!   tansu's S3 storage records a request's sequence numbers, then the watermark, then the
//!   records, so a broker killed in between answers the retry "duplicate" for records it never
//!   stored (seen in `kafka.rs: durable_broker_*`, a loss). Such messages (see `unconfirmed`) are
//!   reported `Unavailable` (`unconfirmed`) and published again: on Kafka (which answers a retry
//!   of one of a producer's last five requests with its original offset, and this error only for
//!   older ones) a rare duplicate, on tansu the record that was missing. A later request of the
//!   same partition may already be stored, so a consumer can meet the re-published event after
//!   its successor: the consumer runtime sends such a gap back until the predecessor arrives, and
//!   the engine publishes the successor again after it (not seen in the tests so far).
//! - **Duplicates.** Kafka keeps no message-id window across producer sessions: a row published
//!   again after a relay crash or a fatal error is stored twice. Consumers drop the copy by
//!   `Outbox-Event-Id` / `Outbox-Seq` (the inbox), as for RabbitMQ.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};

use crate::error::{OutboxError, Result};
use crate::meta::{self, HeaderEncoding, META_HEADER};
use crate::publisher::{
    Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher, SKIP_HEADER,
};

/// Settings of the Kafka adapter.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: host:port, several separated by commas.
    pub brokers: String,
    /// Topic per event: `{tenant}`, `{topic}`, `{event_type}`, `{aggregate_type}`. Without
    /// `{tenant}` the tenant travels in the key and the `Outbox-Tenant-Id` header.
    pub topic_template: String,
    /// Create a missing topic (with `partitions` and `replication`) before its first event.
    pub create_topics: bool,
    /// Partitions of a topic the adapter creates.
    pub partitions: i32,
    /// Replication factor of a topic the adapter creates.
    pub replication: i32,
    /// How long librdkafka may try to deliver one message (`message.timeout.ms`), retries
    /// included: keep it inside the relay's lease reserve (the runtime does).
    pub delivery_timeout: Duration,
    /// Largest record librdkafka accepts (`message.max.bytes`): larger events are dead-lettered
    /// at once. Set it to the topic's `max.message.bytes`.
    pub max_message_bytes: usize,
    /// Most acknowledgements outstanding at once.
    pub max_in_flight: usize,
    /// Which headers carry each event's metadata ([`HeaderEncoding`]; default: one per field).
    pub header_encoding: HeaderEncoding,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic_template: "outbox.events".into(),
            create_topics: true,
            partitions: 8,
            replication: 1,
            delivery_timeout: Duration::from_secs(3),
            max_message_bytes: 1_000_000,
            max_in_flight: 4096,
            header_encoding: HeaderEncoding::Full,
        }
    }
}

/// Publishes to Kafka with an idempotent producer.
pub struct KafkaPublisher {
    cfg: KafkaConfig,
    /// Replaced after a fatal error (see the module doc).
    producer: RwLock<Arc<FutureProducer>>,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist.
    topics: Mutex<HashSet<String>>,
}

/// The headers an event is published with: the ones JetStream messages carry, without
/// `Nats-Msg-Id` (Kafka headers are bytes, so no value is refused). Also used by the benchmark's
/// raw baseline, so that it sends the same records.
pub fn headers(m: &OutboundMessage) -> OwnedHeaders {
    headers_for(m, HeaderEncoding::Full)
}

/// [`headers`] in the given encoding: [`HeaderEncoding::Compact`] sends `Outbox-Event-Id`,
/// [`META_HEADER`] and `traceparent` (when the event has one).
pub fn headers_for(m: &OutboundMessage, encoding: HeaderEncoding) -> OwnedHeaders {
    let id = m.event_id.to_string();
    if encoding == HeaderEncoding::Compact {
        let value = meta::encode(m);
        let mut h = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "Outbox-Event-Id",
                value: Some(&id),
            })
            .insert(Header {
                key: META_HEADER,
                value: Some(&value),
            });
        if let Some(tp) = m.header("traceparent") {
            h = h.insert(Header {
                key: "traceparent",
                value: Some(tp),
            });
        }
        return h;
    }
    let seq = m.seq.to_string();
    let epoch = m.seq_epoch.to_string();
    let producer = m.producer_id.map(|p| p.to_string());
    let mut pairs: Vec<(&str, &str)> = vec![
        ("Outbox-Event-Id", &id),
        ("Outbox-Event-Type", &m.event_type),
        ("Outbox-Tenant-Id", &m.tenant_id),
        ("Outbox-Aggregate-Type", &m.aggregate_type),
        ("Outbox-Aggregate-Id", &m.aggregate_id),
        ("Outbox-Seq", &seq),
        ("Outbox-Seq-Epoch", &epoch),
    ];
    if let Some(c) = m.header("correlationId") {
        pairs.push(("Outbox-Correlation-Id", c));
    }
    if let Some(tp) = m.header("traceparent") {
        pairs.push(("traceparent", tp));
    }
    if let Some(p) = &producer {
        pairs.push(("Outbox-Producer-Id", p));
    }
    if let Some(skip) = m.header(SKIP_HEADER) {
        pairs.push(("Outbox-Skip", skip));
    }
    pairs.push((
        "Content-Type",
        m.header("contentType").unwrap_or("application/json"),
    ));
    pairs
        .into_iter()
        .fold(OwnedHeaders::new_with_capacity(12), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// The record key: the aggregate, so that its events share a partition.
pub fn key(m: &OutboundMessage) -> String {
    format!("{}/{}/{}", m.tenant_id, m.aggregate_type, m.aggregate_id)
}

fn producer(cfg: &KafkaConfig) -> Result<FutureProducer> {
    let timeout = cfg.delivery_timeout.as_millis().max(1000).to_string();
    ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "outbox-relay")
        .set("enable.idempotence", "true")
        .set("enable.gapless.guarantee", "true")
        .set("acks", "all")
        .set("message.timeout.ms", &timeout)
        .set("request.timeout.ms", &timeout)
        .set(
            "message.max.bytes",
            cfg.max_message_bytes.max(1000).to_string(),
        )
        .set("linger.ms", "2")
        .set("reconnect.backoff.max.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "10000")
        .create()
        .map_err(|e| OutboxError::Config(format!("cannot build the Kafka producer: {e}")))
}

impl KafkaPublisher {
    /// Builds the producer (it connects in the background: the relay starts while Kafka is down).
    /// Fails at once on a configuration error.
    pub async fn connect(cfg: KafkaConfig) -> Result<Self> {
        if cfg.brokers.trim().is_empty() {
            return Err(OutboxError::Config(
                "no Kafka bootstrap server given: give host:port, several separated by commas"
                    .into(),
            ));
        }
        if cfg.topic_template.trim().is_empty() {
            return Err(OutboxError::Config(
                "the Kafka topic template is empty".into(),
            ));
        }
        let admin = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .create()
            .map_err(|e| {
                OutboxError::Config(format!("cannot build the Kafka admin client: {e}"))
            })?;
        let producer = producer(&cfg)?;
        Ok(Self {
            producer: RwLock::new(Arc::new(producer)),
            admin,
            topics: Mutex::new(HashSet::new()),
            cfg,
        })
    }

    /// The producer in use.
    fn current(&self) -> Arc<FutureProducer> {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces `old` by a new producer (once: concurrent callers see the new one); `fatal`:
    /// after its fatal error, else after a batch of which nothing got through.
    fn replace(&self, old: &Arc<FutureProducer>, fatal: bool) {
        let mut cur = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&cur, old) {
            match producer(&self.cfg) {
                Ok(p) => {
                    if fatal {
                        tracing::warn!("Kafka producer hit a fatal error; replaced by a new one");
                    } else {
                        tracing::debug!("no record got through; Kafka producer replaced");
                    }
                    *cur = Arc::new(p);
                }
                Err(e) => tracing::error!(error = %e, "cannot rebuild the Kafka producer"),
            }
        }
    }

    /// Puts the producer in use into librdkafka's fatal-error state, as an unrecoverable
    /// sequence gap or a fenced epoch would, through librdkafka's own test hook
    /// (`rd_kafka_test_fatal_error`): no broker here raises a fatal error on demand, and the
    /// replace-and-re-send path must still be exercised by tests and fault drills. librdkafka
    /// then fails what it still queues and refuses new records; what is in flight completes.
    /// True when librdkafka took it (false: that producer was already in its fatal state).
    #[doc(hidden)]
    pub fn raise_fatal_error(&self, reason: &str) -> bool {
        let producer = self.current();
        let reason = std::ffi::CString::new(reason.replace('\0', " ")).unwrap_or_default();
        // SAFETY: the client pointer belongs to `producer`, alive for the whole call, and
        // librdkafka formats `reason` into its own buffer before returning.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            )
        };
        err == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
    }

    /// Creates the topics of `batch` that are not known to exist.
    async fn ensure_topics(
        &self,
        batch: &[OutboundMessage],
    ) -> std::result::Result<(), PublishFailure> {
        if !self.cfg.create_topics {
            return Ok(());
        }
        let missing: Vec<String> = {
            let known = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            let mut m: Vec<String> = batch
                .iter()
                .map(|m| m.render(&self.cfg.topic_template))
                .filter(|t| !known.contains(t))
                .collect();
            m.sort();
            m.dedup();
            m
        };
        if missing.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.cfg.partitions.max(1),
                    TopicReplication::Fixed(self.cfg.replication.max(1)),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(self.cfg.delivery_timeout));
        let results = self.admin.create_topics(&new, &opts).await.map_err(|e| {
            PublishFailure::new(
                FailureKind::Unavailable,
                "topic",
                format!("cannot create Kafka topics {missing:?}: {e}"),
            )
        })?;
        let mut known = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        for r in results {
            match r {
                Ok(t) | Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    known.insert(t);
                }
                Err((t, RDKafkaErrorCode::InvalidTopic)) => {
                    // The event's topic name: dead-lettered when sent (librdkafka refuses it).
                    tracing::error!(topic = %t, "invalid Kafka topic name");
                }
                Err((t, code)) => {
                    return Err(PublishFailure::new(
                        FailureKind::Unavailable,
                        "topic",
                        format!("cannot create Kafka topic {t:?}: {code}"),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// How a failure to hand over or deliver one message is handled (see the module doc).
pub fn classify(e: &KafkaError) -> PublishFailure {
    use RDKafkaErrorCode as C;
    let text = e.to_string();
    let code = e.rdkafka_error_code();
    let outage = |reason| PublishFailure::new(FailureKind::Unavailable, reason, text.clone());
    let Some(code) = code else {
        // Cancelled delivery (the producer went away) and client-side errors without a code.
        return outage("disconnected");
    };
    match code {
        C::MessageSizeTooLarge | C::InvalidMessageSize => {
            PublishFailure::new(FailureKind::Permanent, "too_large", text)
        }
        C::InvalidRecord | C::InvalidTopic | C::InvalidArgument | C::BadMessage => {
            PublishFailure::new(FailureKind::Permanent, "rejected", text)
        }
        C::PurgeQueue | C::PurgeInflight => {
            PublishFailure::new(FailureKind::LeaseExpired, "lease", text)
        }
        C::Fatal => outage("fatal"),
        C::NotEnoughReplicas | C::NotEnoughReplicasAfterAppend => outage("not_enough_replicas"),
        C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::PreferredLeaderNotAvailable => outage("leader_change"),
        C::MessageTimedOut | C::RequestTimedOut | C::OperationTimedOut => outage("timeout"),
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::NetworkException
        | C::BrokerNotAvailable
        | C::Resolve => outage("disconnected"),
        C::QueueFull => outage("queue_full"),
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => {
            outage("unknown_topic")
        }
        C::KafkaStorageError
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::PolicyViolation
        | C::OutOfOrderSequenceNumber
        | C::InvalidProducerEpoch
        | C::UnknownProducerId
        | C::InvalidProducerIdMapping
        | C::ProducerFenced => outage("broker_refused"),
        _ => PublishFailure::new(FailureKind::Retryable, "rejected", text),
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn is_connected(&self) -> bool {
        // librdkafka keeps no single connection state; a fatal error is the one state in which it
        // cannot publish until replaced. Replaced here too, not only at the next batch: an idle
        // relay would otherwise report its broker down (readiness failing) until an event came.
        let producer = self.current();
        if producer.client().fatal_error().is_some() {
            self.replace(&producer, true);
        }
        self.current().client().fatal_error().is_none()
    }

    fn route_template(&self) -> &str {
        &self.cfg.topic_template
    }

    fn ordered_in_flight_per_key(&self) -> bool {
        true
    }

    async fn publish(
        &self,
        batch: &[OutboundMessage],
        deadline: tokio::time::Instant,
    ) -> Vec<Result<Delivery, PublishFailure>> {
        let all = |f: PublishFailure| batch.iter().map(|_| Err(f.clone())).collect::<Vec<_>>();
        let producer = self.current();
        if let Some((code, why)) = producer.client().fatal_error() {
            self.replace(&producer, true);
            return all(PublishFailure::new(
                FailureKind::Unavailable,
                "fatal",
                format!("Kafka producer fatal error {code}: {why}"),
            ));
        }
        if let Err(f) = self.ensure_topics(batch).await {
            return all(f);
        }
        let purged = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let sends = std::sync::atomic::AtomicU64::new(0);
        let run = crate::pipeline::run_with(
            batch,
            &self.cfg.topic_template,
            self.cfg.max_in_flight,
            deadline,
            true,
            |m| {
                let producer = producer.clone();
                let purged = purged.clone();
                let acks = acks.clone();
                let n = sends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = m.id;
                async move {
                    let topic = m.render(&self.cfg.topic_template);
                    let key = key(m);
                    let record = FutureRecord::to(&topic)
                        .key(&key)
                        .payload(m.payload.as_ref())
                        .headers(headers_for(m, self.cfg.header_encoding));
                    let ack = producer
                        .send_result(record)
                        .map_err(|(e, _)| classify(&e))?;
                    Ok(async move {
                        match ack.await {
                            Ok(Ok(d)) => {
                                acks.lock().unwrap_or_else(|p| p.into_inner()).push(Ack {
                                    id,
                                    sent: n,
                                    topic,
                                    partition: d.partition,
                                    offset: d.offset,
                                });
                                Ok(Delivery::Stored)
                            }
                            Ok(Err((e, _))) => {
                                let mut f = classify(&e);
                                if purged.load(std::sync::atomic::Ordering::Relaxed)
                                    && f.kind == FailureKind::Unavailable
                                {
                                    f.kind = FailureKind::LeaseExpired;
                                }
                                Err(f)
                            }
                            Err(_) => Err(PublishFailure::new(
                                FailureKind::Unavailable,
                                "disconnected",
                                "the Kafka producer went away before it reported the delivery",
                            )),
                        }
                    }
                    .boxed())
                }
            },
        );
        tokio::pin!(run);
        let out = tokio::select! {
            out = &mut run => out,
            () = tokio::time::sleep_until(deadline) => {
                // The lease may pass to another relay: what librdkafka still holds must not leave.
                purged.store(true, std::sync::atomic::Ordering::Relaxed);
                producer.purge(PurgeConfig::default().queue().non_blocking());
                run.await
            }
        };
        let mut out = out;
        let unsure = unconfirmed(&acks.lock().unwrap_or_else(|p| p.into_inner()));
        if !unsure.is_empty() {
            tracing::warn!(
                events = unsure.len(),
                "Kafka acknowledged a retry as a duplicate without a position; publishing those events again"
            );
            for (o, m) in out.iter_mut().zip(batch) {
                if unsure.contains(&m.id) {
                    *o = Err(PublishFailure::new(
                        FailureKind::Unavailable,
                        "unconfirmed",
                        "the broker answered a retry with DUPLICATE_SEQUENCE_NUMBER and no offset: it may not have stored the event (tansu's S3 storage after a crash); published again",
                    ));
                }
            }
        }
        let outage = out
            .iter()
            .any(|o| matches!(o, Err(f) if f.kind == FailureKind::Unavailable));
        if outage && out.iter().all(|o| o.is_err()) {
            // Nothing got through: the broker may have come back as another one (restarted
            // empty, failed over) that knows neither the topic nor this producer's id, which
            // librdkafka reports only as time-outs. Create the topics again (an existing one is
            // fine) and start the next batch with a new producer session.
            self.topics
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.replace(&producer, false);
        }
        if producer.client().fatal_error().is_some() {
            self.replace(&producer, true);
            // Whatever was acknowledged stays so; what failed is an outage, re-sent in order by
            // the engine with the new producer.
            return out
                .into_iter()
                .map(|o| {
                    o.map_err(|mut f| {
                        if f.kind != FailureKind::LeaseExpired {
                            f.kind = FailureKind::Unavailable;
                            f.reason = "fatal";
                        }
                        f
                    })
                })
                .collect();
        }
        out
    }
}

/// One acknowledged message: its row id, its place in the order the batch was handed to
/// librdkafka, and the position librdkafka reported.
#[derive(Debug, Clone)]
struct Ack {
    id: i64,
    sent: u64,
    topic: String,
    partition: i32,
    offset: i64,
}

/// The acknowledged messages whose storage the broker did not confirm (see the module doc):
/// librdkafka reports a ProduceRequest refused with `DUPLICATE_SEQUENCE_NUMBER` as delivered,
/// with the response's base offset -1 numbered on through the request's messages (-1, 0, 1, ...;
/// `rd_kafka_msgq_set_metadata`). So, per partition in send order, a message acknowledged at
/// offset -1 and the ones right after it at 0, 1, ... are those of such a request. A real request
/// that happens to follow at exactly the next number is counted in too: it is published again,
/// a duplicate, never a loss.
fn unconfirmed(acks: &[Ack]) -> HashSet<i64> {
    let mut by_partition: std::collections::HashMap<(&str, i32), Vec<&Ack>> =
        std::collections::HashMap::new();
    for a in acks {
        by_partition
            .entry((a.topic.as_str(), a.partition))
            .or_default()
            .push(a);
    }
    let mut out = HashSet::new();
    for (_, mut list) in by_partition {
        list.sort_by_key(|a| a.sent);
        let mut expect: Option<i64> = None;
        for a in list {
            if a.offset == -1 {
                expect = Some(0);
            } else if expect == Some(a.offset) {
                expect = Some(a.offset + 1);
            } else {
                expect = None;
                continue;
            }
            out.insert(a.id);
        }
    }
    out
}

/// Waits until librdkafka sent everything handed to it (benchmarks, shutdown).
pub fn flush(p: &KafkaPublisher, timeout: Duration) {
    let _ = p.current().flush(timeout);
}

#[cfg(test)]
mod tests {
    use super::{unconfirmed, Ack};

    fn ack(id: i64, sent: u64, partition: i32, offset: i64) -> Ack {
        Ack {
            id,
            sent,
            topic: "t".into(),
            partition,
            offset,
        }
    }

    #[test]
    fn a_duplicate_sequence_answer_and_the_rest_of_its_request_are_unconfirmed() {
        // Partition 0: 100, 101 stored; then a request of three answered DUPLICATE_SEQUENCE_NUMBER
        // (-1, 0, 1); then a stored request at 57. Partition 1 untouched. Acks arrive in any order.
        let acks = vec![
            ack(6, 5, 0, 57),
            ack(1, 0, 0, 100),
            ack(4, 3, 0, 0),
            ack(3, 2, 0, -1),
            ack(2, 1, 0, 101),
            ack(5, 4, 0, 1),
            ack(7, 6, 1, 0),
            ack(8, 7, 1, 1),
        ];
        let mut got: Vec<i64> = unconfirmed(&acks).into_iter().collect();
        got.sort();
        assert_eq!(got, vec![3, 4, 5]);
    }

    #[test]
    fn ordinary_acknowledgements_are_confirmed() {
        let acks: Vec<Ack> = (0..10).map(|i| ack(i, i as u64, 0, i)).collect();
        assert!(unconfirmed(&acks).is_empty());
    }
}
