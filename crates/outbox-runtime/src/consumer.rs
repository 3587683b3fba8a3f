//! Settings of a consumer service (flags and environment) and running its consumer until
//! SIGTERM: what every binary built on the consumer runtime shares.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use outbox::consumers::amqp::{AmqpSource, AmqpSourceConfig};
use outbox::consumers::kafka::{KafkaSource, KafkaSourceConfig};
use outbox::consumers::nats::{NatsSource, NatsSourceConfig};
use outbox::consumers::{Consumer, ConsumerConfig, Handler, StartPolicy};
use tokio_util::sync::CancellationToken;

use crate::args::BrokerKind;

/// A consumer's flags: where it reads, and how it retries and parks.
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    /// Consumer name: its inbox, parked events and metrics are kept under it (and it is the
    /// JetStream durable name).
    #[arg(long, env = "OUTBOX_CONSUMER_NAME", default_value = "read-model")]
    pub consumer_name: String,
    /// Broker to read from.
    #[arg(long, env = "OUTBOX_BROKER", value_enum, default_value = "nats")]
    pub broker: BrokerKind,
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// JetStream stream the relay publishes to.
    #[arg(long, env = "OUTBOX_NATS_STREAM", default_value = "OUTBOX")]
    pub nats_stream: String,
    /// Only subjects matching this filter (empty: the whole stream).
    #[arg(long, env = "OUTBOX_CONSUMER_NATS_FILTER", default_value = "")]
    pub nats_filter_subject: String,
    /// Seconds JetStream waits for an acknowledgement before redelivering: the longest the
    /// messages a killed consumer held wait before a restarted one gets them. Messages this
    /// process holds are kept from redelivery by progress acknowledgements meanwhile. Applied to
    /// an existing durable consumer at start.
    #[arg(long, env = "OUTBOX_CONSUMER_ACK_WAIT_SECS", default_value_t = 3)]
    pub ack_wait_secs: u64,
    /// Milliseconds between progress acknowledgements (JetStream `+WPI`) for each message held
    /// and not settled yet; must be below the ack wait (default: a third of it).
    #[arg(long, env = "OUTBOX_CONSUMER_PROGRESS_INTERVAL_MS")]
    pub progress_interval_ms: Option<u64>,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "OUTBOX_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Redis URL (`--broker redis`).
    #[cfg(feature = "redis")]
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// The relay's registry set of stream names (its `--redis-registry-key`): the consumer
    /// reads every stream listed there, its group (the consumer name) created from each
    /// stream's start.
    #[cfg(feature = "redis")]
    #[arg(
        long,
        env = "OUTBOX_REDIS_REGISTRY_KEY",
        default_value = "outbox:streams"
    )]
    pub redis_registry_key: String,
    /// Name of this instance in the Redis consumer group: keep it stable across restarts (it
    /// then reads its own pending entries first). Default: the consumer name and the host name.
    #[cfg(feature = "redis")]
    #[arg(long, env = "OUTBOX_CONSUMER_REDIS_INSTANCE")]
    pub redis_instance: Option<String>,
    /// Seconds a pending entry of another instance of the group stays untouched before this
    /// one takes it over (`XAUTOCLAIM`): how long a dead instance's entries wait.
    #[cfg(feature = "redis")]
    #[arg(
        long,
        env = "OUTBOX_CONSUMER_REDIS_CLAIM_IDLE_SECS",
        default_value_t = 30
    )]
    pub redis_claim_idle_secs: u64,
    /// The length cap (MAXLEN) you trim the streams to, if any: exported as
    /// `outbox_consumer_redis_cap_entries` for the alert that compares the group's lag with it.
    #[cfg(feature = "redis")]
    #[arg(long, env = "OUTBOX_CONSUMER_REDIS_CAP_ENTRIES")]
    pub redis_cap_entries: Option<u64>,
    /// The age cap (MINID, in seconds) you trim the streams to, if any: exported as
    /// `outbox_consumer_redis_cap_seconds` for the alert that compares the oldest unread entry
    /// with it.
    #[cfg(feature = "redis")]
    #[arg(long, env = "OUTBOX_CONSUMER_REDIS_CAP_AGE_SECS")]
    pub redis_cap_age_secs: Option<u64>,
    /// RabbitMQ queue to consume (declare it with `outbox rabbitmq-topology`).
    #[arg(long, env = "OUTBOX_CONSUMER_AMQP_QUEUE", default_value = "read-model")]
    pub amqp_queue: String,
    /// Kafka bootstrap servers (host:port, several separated by commas).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Kafka topics to read (comma-separated), or one pattern starting with ^ for a relay
    /// topic template with {tenant} (e.g. ^outbox\..*). The consumer group is the consumer name.
    #[arg(
        long,
        env = "OUTBOX_CONSUMER_KAFKA_TOPICS",
        default_value = "outbox.events",
        value_delimiter = ','
    )]
    pub kafka_topics: Vec<String>,
    /// Unacknowledged messages RabbitMQ sends ahead (also bounds JetStream's ack-pending).
    #[arg(long, env = "OUTBOX_CONSUMER_PREFETCH", default_value_t = 256)]
    pub prefetch: u16,
    /// Transactions at once (each worker owns the aggregates it took: one aggregate is handled
    /// by one worker at a time, in order).
    #[arg(long, env = "OUTBOX_CONSUMER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// Most events applied in one transaction under a backlog (1: a transaction per event). A
    /// batch in which a handler fails is rolled back and its events applied one by one.
    #[arg(long, env = "OUTBOX_CONSUMER_BATCH_SIZE", default_value_t = 32)]
    pub batch_size: usize,
    /// Handler failures before an event is parked.
    #[arg(long, env = "OUTBOX_CONSUMER_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,
    /// Seconds an event may wait for its predecessor before it is parked (reason `gap`).
    #[arg(long, env = "OUTBOX_CONSUMER_GAP_TIMEOUT_SECS", default_value_t = 300)]
    pub gap_timeout_secs: u64,
    /// Hours event ids of events without a sequence are kept for de-duplication.
    #[arg(
        long,
        env = "OUTBOX_CONSUMER_SEEN_RETENTION_HOURS",
        default_value_t = 168
    )]
    pub seen_retention_hours: u64,
    /// Where an aggregate whose beginning never arrived starts: `after-gap-timeout` (the read
    /// model's default: its events carry absolute levels, so starting mid-stream converges; a
    /// queue bound after the inventory's first events would otherwise apply nothing) or
    /// `strict` (only at seq 1; anything else is parked as `gap` for an operator's
    /// `consumer-dead-letters replay --accept-gap`).
    #[arg(
        long,
        env = "OUTBOX_CONSUMER_START_POLICY",
        value_enum,
        default_value = "after-gap-timeout"
    )]
    pub start_policy: StartPolicyArg,
}

/// `--start-policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StartPolicyArg {
    /// Only at seq 1 of an unknown aggregate.
    Strict,
    /// At the lowest event that waited the gap timeout with nothing earlier still coming.
    AfterGapTimeout,
}

impl ConsumerArgs {
    /// The runtime's settings.
    pub fn config(&self) -> ConsumerConfig {
        let mut c = ConsumerConfig::new(&self.consumer_name);
        c.concurrency = self.concurrency.max(1);
        c.batch_size = self.batch_size.max(1);
        c.max_attempts = self.max_attempts.max(1);
        c.gap_timeout = Duration::from_secs(self.gap_timeout_secs);
        c.seen_retention = Duration::from_secs(self.seen_retention_hours * 3600);
        c.start_policy = match self.start_policy {
            StartPolicyArg::Strict => StartPolicy::Strict,
            StartPolicyArg::AfterGapTimeout => StartPolicy::AfterGapTimeout,
        };
        c
    }
}

/// Connects the selected broker (retrying every 2 s until it answers: the relay creates the
/// JetStream stream, and a consumer may start first) and runs `consumer` until `stop` is
/// cancelled.
pub async fn run<H: Handler>(
    consumer: &Consumer<H>,
    args: &ConsumerArgs,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let attempt = async {
            match args.broker {
                BrokerKind::Nats => {
                    let source = NatsSource::connect(NatsSourceConfig {
                        url: args.nats_url.clone(),
                        stream: args.nats_stream.clone(),
                        durable: args.consumer_name.clone(),
                        filter_subject: args.nats_filter_subject.clone(),
                        ack_wait: Duration::from_secs(args.ack_wait_secs.max(1)),
                        progress_interval: args.progress_interval_ms.map(Duration::from_millis),
                        max_ack_pending: i64::from(args.prefetch),
                    })
                    .await
                    .context("connecting the JetStream consumer")?;
                    consumer.run(source, stop.clone()).await?;
                }
                BrokerKind::Kafka => {
                    let source = KafkaSource::connect(KafkaSourceConfig {
                        brokers: args.kafka_brokers.clone(),
                        group: args.consumer_name.clone(),
                        topics: args.kafka_topics.clone(),
                        ..Default::default()
                    })
                    .await
                    .context("connecting the Kafka consumer")?;
                    consumer.run(source, stop.clone()).await?;
                }
                BrokerKind::Rabbitmq => {
                    let source = AmqpSource::connect(AmqpSourceConfig {
                        url: args.amqp_url.clone(),
                        queue: args.amqp_queue.clone(),
                        prefetch: args.prefetch,
                        consumer_tag: args.consumer_name.clone(),
                    })
                    .await
                    .context("connecting the RabbitMQ consumer")?;
                    consumer.run(source, stop.clone()).await?;
                }
                #[cfg(feature = "redis")]
                BrokerKind::Redis => {
                    use outbox::consumers::redis::{RedisSource, RedisSourceConfig};
                    let instance = args.redis_instance.clone().unwrap_or_else(|| {
                        let host = std::fs::read_to_string("/etc/hostname")
                            .map(|h| h.trim().to_string())
                            .unwrap_or_else(|_| "host".into());
                        format!("{}-{host}", args.consumer_name)
                    });
                    let source = RedisSource::connect(RedisSourceConfig {
                        url: args.redis_url.clone(),
                        registry_key: args.redis_registry_key.clone(),
                        group: args.consumer_name.clone(),
                        consumer: instance,
                        batch: usize::from(args.prefetch),
                        claim_idle: Duration::from_secs(args.redis_claim_idle_secs.max(1)),
                        cap_entries: args.redis_cap_entries,
                        cap_age: args.redis_cap_age_secs.map(Duration::from_secs),
                        ..Default::default()
                    })
                    .await
                    .context("connecting the Redis consumer")?;
                    consumer.run(source, stop.clone()).await?;
                }
            }
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) if stop.is_cancelled() => return Ok(()),
            Ok(()) => tracing::warn!("the broker ended the subscription; reconnecting in 2 s"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "consumer not running; retrying in 2 s"
            ),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
