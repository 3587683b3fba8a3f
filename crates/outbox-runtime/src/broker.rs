//! Builds the configured broker adapter.

use std::sync::Arc;
use std::time::Duration;

use outbox::amqp::AmqpPublisher;
use outbox::nats::{NatsConfig, NatsPublisher};
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
                ..Default::default()
            };
            let horizon = relay.dedup_horizon(cfg.ack_timeout);
            Ok(Arc::new(NatsPublisher::connect(cfg, horizon).await?))
        }
        // RabbitMQ has no de-duplication window to check: consumers de-duplicate on message_id.
        BrokerKind::Rabbitmq => Ok(Arc::new(AmqpPublisher::connect(args.amqp.config()).await?)),
        // Kafka keeps no message-id window across producer sessions: consumers de-duplicate.
        BrokerKind::Kafka => Ok(Arc::new(
            outbox::publishers::kafka::KafkaPublisher::connect(
                args.kafka.config(relay.lease_margin()),
            )
            .await?,
        )),
    }
}
