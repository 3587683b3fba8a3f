//! Command-line and environment settings of a relay.

use std::time::Duration;

use clap::{Args, ValueEnum};
use outbox::{RelayConfig, RetryPolicy};

/// Which broker the relay publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerKind {
    /// NATS JetStream.
    Nats,
    /// RabbitMQ (AMQP 0-9-1) with publisher confirms.
    Rabbitmq,
    /// Redis Streams, single node (feature `redis`).
    #[cfg(feature = "redis")]
    Redis,
    /// Kafka (idempotent producer, acks=all; consumer groups).
    Kafka,
}

/// How a relay sends each event's metadata (`--message-headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MessageHeaders {
    /// One header per field.
    Full,
    /// One `Outbox-Meta` header (docs/message-format.md).
    Compact,
}

impl From<MessageHeaders> for outbox::meta::HeaderEncoding {
    fn from(h: MessageHeaders) -> Self {
        match h {
            MessageHeaders::Full => Self::Full,
            MessageHeaders::Compact => Self::Compact,
        }
    }
}

/// Broker selection and the JetStream adapter's settings.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Broker to publish to.
    #[arg(long, env = "OUTBOX_BROKER", value_enum, default_value = "nats")]
    pub broker: BrokerKind,
    /// NATS server URL; for a cluster, several separated by commas (the relay fails over
    /// between them and to the members the servers announce).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// JetStream stream the events go to.
    #[arg(long, env = "OUTBOX_NATS_STREAM", default_value = "OUTBOX")]
    pub nats_stream: String,
    /// Subjects of the stream when the relay creates it (comma-separated).
    #[arg(
        long,
        env = "OUTBOX_NATS_STREAM_SUBJECTS",
        default_value = "outbox.>",
        value_delimiter = ','
    )]
    pub nats_stream_subjects: Vec<String>,
    /// Subject of each event: {tenant}, {topic}, {event_type}, {aggregate_type}.
    #[arg(
        long,
        env = "OUTBOX_NATS_SUBJECT",
        default_value = "outbox.{tenant}.{topic}"
    )]
    pub nats_subject: String,
    /// Duplicate window (seconds) of a stream the relay creates; must cover the retry horizon.
    #[arg(long, env = "OUTBOX_NATS_DUPLICATE_WINDOW_SECS", default_value_t = 120)]
    pub nats_duplicate_window_secs: u64,
    /// Replicas of the stream (3 for an R3 stream on a cluster): the relay creates the stream
    /// with this many and refuses to start against an existing stream with another number.
    /// Unset: a created stream has 1 and an existing one is taken as it is.
    #[arg(long, env = "OUTBOX_NATS_STREAM_REPLICAS", value_parser = clap::value_parser!(u16).range(1..=5))]
    pub nats_stream_replicas: Option<u16>,
    /// Only check the stream, never create it.
    #[arg(long, env = "OUTBOX_NATS_NO_CREATE_STREAM")]
    pub nats_no_create_stream: bool,
    /// Seconds to wait for one JetStream acknowledgement.
    #[arg(long, env = "OUTBOX_NATS_ACK_TIMEOUT_SECS", default_value_t = 5)]
    pub nats_ack_timeout_secs: u64,
    /// Publish a hot aggregate's run of events as JetStream atomic batches (all or nothing)
    /// instead of one event per aggregate in flight. Needs nats-server 2.12 or later and a stream
    /// with `allow_atomic` (turned on by the relay unless --nats-no-create-stream); checked at
    /// start-up. See docs/benchmarks.md for when it pays.
    #[arg(long, env = "OUTBOX_NATS_ATOMIC_BATCH")]
    pub nats_atomic_batch: bool,
    /// How each event's ids and position travel (every broker): `full`, one header per field
    /// (Outbox-Tenant-Id, Outbox-Seq, ...; Redis: one stream field each; what every consumer
    /// reads), or `compact`, one `Outbox-Meta` header (Redis: field) beside the event id
    /// (Nats-Msg-Id, AMQP message_id, Redis / Kafka Outbox-Event-Id) and traceparent (smaller and
    /// faster; read by this project's consumer runtime from this version on, layout in
    /// docs/message-format.md for consumers in other languages). Upgrade the consumers first.
    #[arg(
        long,
        env = "OUTBOX_MESSAGE_HEADERS",
        value_enum,
        default_value = "full"
    )]
    pub message_headers: MessageHeaders,
    /// RabbitMQ adapter settings.
    #[command(flatten)]
    pub amqp: AmqpArgs,
    /// Redis Streams adapter settings.
    #[cfg(feature = "redis")]
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Kafka adapter settings.
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// Settings of the Redis Streams adapter.
#[cfg(feature = "redis")]
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL (single node).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Stream of each event: {tenant}, {topic}, {event_type}, {aggregate_type}.
    #[arg(
        long,
        env = "OUTBOX_REDIS_STREAM",
        default_value = "outbox:{tenant}:{topic}"
    )]
    pub redis_stream: String,
    /// Set of every stream name the relay writes to: consumers discover the streams by it.
    #[arg(
        long,
        env = "OUTBOX_REDIS_REGISTRY_KEY",
        default_value = "outbox:streams"
    )]
    pub redis_registry_key: String,
    /// Do not de-duplicate at the broker (duplicates then reach the stream; consumers drop them).
    #[arg(long, env = "OUTBOX_REDIS_NO_DEDUP")]
    pub redis_no_dedup: bool,
    /// Prefix of the de-duplication keys (one per event, kept for the retry horizon).
    #[arg(
        long,
        env = "OUTBOX_REDIS_DEDUP_PREFIX",
        default_value = "outbox:dedup:"
    )]
    pub redis_dedup_prefix: String,
    /// Publish even when Redis is not configured to keep what it acknowledged (`appendonly yes`,
    /// `appendfsync always`, `maxmemory-policy noeviction`); the loss window is logged.
    #[arg(long, env = "OUTBOX_REDIS_ALLOW_LOSS_WINDOW")]
    pub redis_allow_loss_window: bool,
    /// Seconds one Redis command may take before it counts as an outage.
    #[arg(long, env = "OUTBOX_REDIS_TIMEOUT_SECS", default_value_t = 5)]
    pub redis_timeout_secs: u64,
}

#[cfg(feature = "redis")]
impl RedisArgs {
    /// The adapter configuration these flags describe.
    pub fn config(&self) -> outbox::publishers::redis::RedisConfig {
        outbox::publishers::redis::RedisConfig {
            url: self.redis_url.clone(),
            stream_template: self.redis_stream.clone(),
            registry_key: self.redis_registry_key.clone(),
            dedup: !self.redis_no_dedup,
            dedup_prefix: self.redis_dedup_prefix.clone(),
            allow_loss_window: self.redis_allow_loss_window,
            command_timeout: Duration::from_secs(self.redis_timeout_secs.max(1)),
            ..Default::default()
        }
    }
}

/// Settings of the Kafka adapter.
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (host:port, several separated by commas).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Topic of each event: {tenant}, {topic}, {event_type}, {aggregate_type}. The key is the
    /// aggregate ({tenant}/{aggregate_type}/{aggregate_id}) and the tenant is in the
    /// Outbox-Tenant-Id header; with {tenant} here consumers subscribe to a pattern (^outbox\..*).
    #[arg(long, env = "OUTBOX_KAFKA_TOPIC", default_value = "outbox.events")]
    pub kafka_topic: String,
    /// Partitions of a topic the relay creates.
    #[arg(long, env = "OUTBOX_KAFKA_PARTITIONS", default_value_t = 8)]
    pub kafka_partitions: i32,
    /// Replication factor of a topic the relay creates (3 on a production cluster, with the
    /// topic's min.insync.replicas at 2: acks=all then waits for two copies).
    #[arg(long, env = "OUTBOX_KAFKA_REPLICATION", default_value_t = 1)]
    pub kafka_replication: i32,
    /// Only use existing topics, never create them.
    #[arg(long, env = "OUTBOX_KAFKA_NO_CREATE_TOPICS")]
    pub kafka_no_create_topics: bool,
    /// Longest time (ms) librdkafka may spend delivering one message, retries included
    /// (message.timeout.ms). Capped at the relay's lease reserve (a fifth of the lease), so that
    /// nothing leaves after the lease could have passed to another relay.
    #[arg(long, env = "OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS", default_value_t = 3000)]
    pub kafka_delivery_timeout_ms: u64,
    /// Largest record in bytes (the topic's max.message.bytes); larger events are dead-lettered.
    #[arg(
        long,
        env = "OUTBOX_KAFKA_MAX_MESSAGE_BYTES",
        default_value_t = 1_000_000
    )]
    pub kafka_max_message_bytes: usize,
}

impl KafkaArgs {
    /// The adapter configuration these flags describe, for a relay whose lease reserve is
    /// `lease_margin`.
    pub fn config(&self, lease_margin: Duration) -> outbox::publishers::kafka::KafkaConfig {
        outbox::publishers::kafka::KafkaConfig {
            brokers: self.kafka_brokers.clone(),
            topic_template: self.kafka_topic.clone(),
            create_topics: !self.kafka_no_create_topics,
            partitions: self.kafka_partitions,
            replication: self.kafka_replication,
            delivery_timeout: Duration::from_millis(self.kafka_delivery_timeout_ms)
                .min(lease_margin)
                .max(Duration::from_secs(1)),
            max_message_bytes: self.kafka_max_message_bytes,
            ..Default::default()
        }
    }
}

/// Settings of the RabbitMQ adapter (also used by `outbox rabbitmq-topology`).
#[derive(Debug, Clone, Args)]
pub struct AmqpArgs {
    /// AMQP URL of RabbitMQ.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Durable topic exchange the events go to (the inventory seed uses `inventory.events`).
    #[arg(long, env = "OUTBOX_AMQP_EXCHANGE", default_value = "outbox.events")]
    pub amqp_exchange: String,
    /// Routing key of each event: {tenant} (required unless --amqp-tenant-in-header-only),
    /// {topic}, {event_type}, {aggregate_type}.
    #[arg(
        long,
        env = "OUTBOX_AMQP_ROUTING_KEY",
        default_value = "{topic}.{tenant}"
    )]
    pub amqp_routing_key: String,
    /// Allow a routing key without {tenant}: the tenant then travels only in the
    /// Outbox-Tenant-Id header (every message has it), and a consumer selects one tenant with a
    /// headers binding. For contracts with fixed routing keys (the inventory seed's).
    #[arg(long, env = "OUTBOX_AMQP_TENANT_IN_HEADER_ONLY")]
    pub amqp_tenant_in_header_only: bool,
    /// Only check (passive declare) the exchange and alternate exchange, never declare them.
    #[arg(long, env = "OUTBOX_AMQP_NO_DECLARE")]
    pub amqp_no_declare: bool,
    /// Alternate exchange for unroutable events ({exchange} is the exchange's name); empty: none,
    /// unroutable events are returned, retried and finally dead-lettered in the outbox.
    #[arg(
        long,
        env = "OUTBOX_AMQP_ALTERNATE_EXCHANGE",
        default_value = "{exchange}.unroutable"
    )]
    pub amqp_alternate_exchange: String,
    /// Most publisher confirms outstanding at once (the batch size bounds it too).
    #[arg(long, env = "OUTBOX_AMQP_MAX_IN_FLIGHT", default_value_t = 2048)]
    pub amqp_max_in_flight: usize,
    /// Seconds to wait for one publisher confirm.
    #[arg(long, env = "OUTBOX_AMQP_CONFIRM_TIMEOUT_SECS", default_value_t = 10)]
    pub amqp_confirm_timeout_secs: u64,
    /// Seconds one publish may take to be written: under a memory or disk alarm RabbitMQ stops
    /// reading, and the relay treats that as an outage instead of waiting forever.
    #[arg(long, env = "OUTBOX_AMQP_SEND_TIMEOUT_SECS", default_value_t = 5)]
    pub amqp_send_timeout_secs: u64,
    /// Largest message body in bytes: set it to the broker's `max_message_size`; larger events
    /// are dead-lettered at once.
    #[arg(
        long,
        env = "OUTBOX_AMQP_MAX_MESSAGE_BYTES",
        default_value_t = 134_217_728
    )]
    pub amqp_max_message_bytes: usize,
}

impl BrokerArgs {
    /// Exports the relay's counters and histograms at zero for this broker (see
    /// [`outbox::telemetry::register_relay_zeros`]) through the recorder in force: before the
    /// metrics endpoint serves, so that the first scrape has every series.
    pub fn register_metric_zeros(&self) {
        match self.broker {
            BrokerKind::Nats => outbox::telemetry::register_relay_zeros("nats", None),
            BrokerKind::Kafka => outbox::telemetry::register_relay_zeros("kafka", None),
            BrokerKind::Rabbitmq => {
                outbox::telemetry::register_relay_zeros("rabbitmq", Some(&self.amqp.amqp_exchange))
            }
            #[cfg(feature = "redis")]
            BrokerKind::Redis => outbox::telemetry::register_relay_zeros("redis", None),
        }
    }
}

impl AmqpArgs {
    /// The adapter configuration these flags describe.
    pub fn config(&self) -> outbox::amqp::AmqpConfig {
        let ae = self
            .amqp_alternate_exchange
            .replace("{exchange}", &self.amqp_exchange);
        outbox::amqp::AmqpConfig {
            url: self.amqp_url.clone(),
            exchange: self.amqp_exchange.clone(),
            routing_key_template: self.amqp_routing_key.clone(),
            tenant_in_header_only: self.amqp_tenant_in_header_only,
            declare: !self.amqp_no_declare,
            alternate_exchange: (!ae.is_empty()).then_some(ae),
            max_in_flight: self.amqp_max_in_flight,
            confirm_timeout: Duration::from_secs(self.amqp_confirm_timeout_secs.max(1)),
            send_timeout: Duration::from_secs(self.amqp_send_timeout_secs.max(1)),
            max_message_size: self.amqp_max_message_bytes,
            ..Default::default()
        }
    }
}

/// Settings of the relay engine.
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// Unique name of this relay (default: host-pid-random).
    #[arg(long, env = "OUTBOX_RELAY_ID")]
    pub relay_id: Option<String>,
    /// Most events claimed and in flight at once.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: i64,
    /// Milliseconds between polls when no commit notification arrives.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL_MS", default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// Partition lease in milliseconds: how long a dead relay's share waits before another takes it.
    #[arg(long, env = "OUTBOX_LEASE_MS", default_value_t = 15_000)]
    pub lease_ms: u64,
    /// First retry delay in milliseconds.
    #[arg(long, env = "OUTBOX_RETRY_BASE_MS", default_value_t = 200)]
    pub retry_base_ms: u64,
    /// Longest retry delay in milliseconds.
    #[arg(long, env = "OUTBOX_RETRY_CAP_MS", default_value_t = 15_000)]
    pub retry_cap_ms: u64,
    /// Growth factor of the retry delay.
    #[arg(long, env = "OUTBOX_RETRY_MULTIPLIER", default_value_t = 2.0)]
    pub retry_multiplier: f64,
    /// Failed attempts before an event is dead-lettered.
    #[arg(long, env = "OUTBOX_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// Let later events of an aggregate flow past its dead letter (default: they wait for replay or purge).
    #[arg(long, env = "OUTBOX_DEAD_LETTERS_DO_NOT_BLOCK")]
    pub dead_letters_do_not_block: bool,
    /// Hours published events are kept before retention deletes them; 0 deletes them as soon as
    /// the broker acknowledges them (fastest).
    #[arg(long, env = "OUTBOX_RETENTION_HOURS", default_value_t = 24.0)]
    pub retention_hours: f64,
    /// Keep published events forever (no retention).
    #[arg(long, env = "OUTBOX_KEEP_PUBLISHED")]
    pub keep_published: bool,
    /// Seconds between retention passes.
    #[arg(long, env = "OUTBOX_CLEANUP_INTERVAL_SECS", default_value_t = 60)]
    pub cleanup_interval_secs: u64,
    /// Rows deleted per statement of a retention pass.
    #[arg(long, env = "OUTBOX_CLEANUP_BATCH", default_value_t = 1000)]
    pub cleanup_batch: i64,
    /// Milliseconds to pause between the statements of a retention pass.
    #[arg(long, env = "OUTBOX_CLEANUP_PAUSE_MS", default_value_t = 20)]
    pub cleanup_pause_ms: u64,
    /// Seconds with work pending and nothing settled after which the relay reports itself
    /// stalled (`/healthz` answers 503, `outbox_relay_stalled` is 1).
    #[arg(long, env = "OUTBOX_STALL_TIMEOUT_SECS", default_value_t = 60)]
    pub stall_timeout_secs: u64,
    /// Hours an aggregate with nothing pending, held or dead stays idle before its sequence row
    /// (`outbox_aggregate`) is compacted away; its next event then starts a new `seq_epoch` at
    /// seq 1, which ordered consumers cannot link to the previous epoch's end and treat as a gap
    /// (their start policy decides; docs/architecture.md). 0 (the default) keeps every sequence
    /// row: one row per aggregate, as every consumer keeps one position per aggregate.
    #[arg(long, env = "OUTBOX_AGGREGATE_HORIZON_HOURS", default_value_t = 0.0)]
    pub aggregate_horizon_hours: f64,
    /// Routes (routing keys / subjects) the broker refuses one by one (a full `reject-publish`
    /// queue, a JetStream subject at its limit) are held back alone while the others flow; more
    /// than this many held at once (a full queue bound by `#`) is treated as a broker-wide outage.
    #[arg(long, env = "OUTBOX_MAX_REFUSED_ROUTES", default_value_t = 8)]
    pub max_refused_routes: usize,
    /// Database connections of the relay.
    #[arg(long, env = "OUTBOX_DB_CONNECTIONS", default_value_t = 4)]
    pub db_connections: u32,
}

impl RelayArgs {
    /// The engine configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<RelayConfig> {
        if !(self.retention_hours >= 0.0 && self.retention_hours.is_finite()) {
            anyhow::bail!(
                "--retention-hours must be 0 or more (0 deletes published events at once)"
            );
        }
        if !(self.aggregate_horizon_hours >= 0.0 && self.aggregate_horizon_hours.is_finite()) {
            anyhow::bail!("--aggregate-horizon-hours must be 0 (off) or more");
        }
        let defaults = RelayConfig::default();
        let config = RelayConfig {
            relay_id: self.relay_id.clone().unwrap_or(defaults.relay_id),
            batch_size: self.batch_size,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            lease: Duration::from_millis(self.lease_ms),
            retry: RetryPolicy {
                base: Duration::from_millis(self.retry_base_ms),
                cap: Duration::from_millis(self.retry_cap_ms),
                multiplier: self.retry_multiplier,
                max_attempts: self.max_attempts,
                jitter: true,
            },
            dead_letters_block: !self.dead_letters_do_not_block,
            retention: (!self.keep_published)
                .then(|| Duration::from_secs_f64(self.retention_hours.max(0.0) * 3600.0)),
            cleanup_interval: Duration::from_secs(self.cleanup_interval_secs.max(1)),
            cleanup_batch: self.cleanup_batch,
            cleanup_pause: Duration::from_millis(self.cleanup_pause_ms),
            stall_timeout: Duration::from_secs(self.stall_timeout_secs),
            aggregate_horizon: (self.aggregate_horizon_hours > 0.0)
                .then(|| Duration::from_secs_f64(self.aggregate_horizon_hours * 3600.0)),
            max_refused_routes: self.max_refused_routes,
            ..defaults
        };
        config.validate()?;
        Ok(config)
    }
}
