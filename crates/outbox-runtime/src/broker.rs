//! Builds the configured broker adapter.

use std::sync::Arc;
use std::time::Duration;

use outbox::amqp::{AmqpConfig, AmqpPublisher};
use outbox::nats::{NatsConfig, NatsPublisher};
use outbox::nats_batch::NatsBatchPublisher;
use outbox::{OutboxError, Publisher, RelayConfig};

use crate::args::{BrokerArgs, BrokerKind};

/// Connects the adapter selected by `args` for a relay configured as `relay`, whose re-publish
/// horizon the broker's de-duplication must cover.
pub async fn connect(
    args: &BrokerArgs,
    relay: &RelayConfig,
) -> Result<Arc<dyn Publisher>, OutboxError> {
    match args.broker {
        BrokerKind::Nats => {
            let cfg = NatsConfig {
                url: args.nats_url.clone(),
                stream: args.nats_stream.clone(),
                subjects: args.nats_stream_subjects.clone(),
                subject_template: args.nats_subject.clone(),
                duplicate_window: Duration::from_secs(args.nats_duplicate_window_secs),
                replicas: args.nats_stream_replicas.map(usize::from),
                create_stream: !args.nats_no_create_stream,
                ack_timeout: Duration::from_secs(args.nats_ack_timeout_secs.max(1)),
                header_encoding: args.message_headers.into(),
                ..Default::default()
            };
            let horizon = relay.dedup_horizon(cfg.ack_timeout);
            if args.nats_atomic_batch {
                return Ok(Arc::new(NatsBatchPublisher::connect(cfg, horizon).await?));
            }
            Ok(Arc::new(NatsPublisher::connect(cfg, horizon).await?))
        }
        // RabbitMQ has no de-duplication window to check: consumers de-duplicate on message_id.
        BrokerKind::Rabbitmq => {
            let cfg = AmqpConfig {
                header_encoding: args.message_headers.into(),
                ..args.amqp.config()
            };
            Ok(Arc::new(AmqpPublisher::connect(cfg).await?))
        }
        // The de-duplication keys must outlive every re-publish of an event.
        #[cfg(feature = "redis")]
        BrokerKind::Redis => {
            let cfg = outbox::publishers::redis::RedisConfig {
                header_encoding: args.message_headers.into(),
                ..args.redis.config()
            };
            let horizon = relay.dedup_horizon(cfg.command_timeout);
            Ok(Arc::new(
                outbox::publishers::redis::RedisPublisher::connect(cfg, horizon).await?,
            ))
        }
        // Kafka keeps no message-id window across producer sessions: consumers de-duplicate.
        BrokerKind::Kafka => Ok(Arc::new(
            outbox::publishers::kafka::KafkaPublisher::connect(
                outbox::publishers::kafka::KafkaConfig {
                    header_encoding: args.message_headers.into(),
                    ..args.kafka.config(relay.lease_margin())
                },
            )
            .await?,
        )),
    }
}
