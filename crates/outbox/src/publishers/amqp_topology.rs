//! Consumer-side RabbitMQ topology (the seed's dead-letter queues), declared by operators and
//! deployment scripts through `outbox rabbitmq-topology`.
//!
//! **Quorum queues by default.** A quorum queue is replicated by Raft over the cluster's nodes
//! (on one node it is still durable and survives restarts); it is what RabbitMQ recommends for
//! data that must not be lost, and classic mirrored queues are deprecated. It also counts
//! redeliveries: `x-delivery-limit` dead-letters a message that consumers keep handing back
//! (`nack`/`reject` with requeue, or a consumer dying with it unacknowledged) after that many
//! deliveries, so a poison message cannot spin forever. Dead-lettering from a quorum queue is
//! RabbitMQ's default *at-most-once* (the `at-least-once` strategy needs `x-overflow:
//! reject-publish`, which would make a full queue refuse the relay's publishes). The dead-letter
//! queue has the same type as the queue. Classic queues stay available (`QueueType::Classic`)
//! for brokers without the quorum queue feature and for existing classic queues: RabbitMQ refuses
//! to re-declare a queue with another type, so the type of an existing queue must be matched.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::amqp::{declare_exchange, AmqpConfig, Declare};
use crate::error::{OutboxError, Result};

/// The kind of queue declared for a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Replicated, Raft-based queue with a delivery limit (RabbitMQ 3.8+).
    #[default]
    Quorum,
    /// Classic durable queue (no replication, no delivery limit).
    Classic,
}

impl QueueType {
    /// The `x-queue-type` argument's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

/// One subscriber's queue and its dead-letter path.
#[derive(Debug, Clone)]
pub struct ConsumerQueue {
    /// Queue name.
    pub queue: String,
    /// Routing patterns binding it to the events exchange (at least one).
    pub bindings: Vec<String>,
    /// Fanout exchange the queue's dead letters go to.
    pub dead_letter_exchange: String,
    /// Durable queue bound to the dead-letter exchange.
    pub dead_letter_queue: String,
    /// Quorum (default) or classic.
    pub queue_type: QueueType,
    /// Deliveries after which a quorum queue dead-letters a message (`x-delivery-limit`);
    /// `None`: no limit. Ignored for classic queues, which cannot count deliveries.
    pub delivery_limit: Option<u32>,
}

/// Declares the events exchange as the relay does, then `q`'s queue bound by each of its
/// patterns, whose rejected, expired or over-delivered messages go to its dead-letter exchange
/// and queue. Idempotent while the queue keeps its type and arguments.
pub async fn declare(cfg: &AmqpConfig, q: &ConsumerQueue) -> Result<()> {
    if q.bindings.is_empty() {
        return Err(OutboxError::Config(
            "give at least one binding pattern".into(),
        ));
    }
    let conn = tokio::time::timeout(
        cfg.connect_timeout,
        Connection::connect(&cfg.url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| OutboxError::Broker("connecting to RabbitMQ timed out".into()))?
    .map_err(|e| OutboxError::Broker(format!("cannot connect to RabbitMQ: {e}")))?;
    let result = async {
        // The broker refusing a declaration (another type or other arguments) is the operator's
        // to resolve; a broken connection is an outage.
        let err = |what: String| {
            move |e: lapin::Error| {
                if e.is_amqp_error() {
                    OutboxError::Config(format!("{what}: {e}"))
                } else {
                    OutboxError::Broker(format!("{what}: {e}"))
                }
            }
        };
        let ch = conn
            .create_channel()
            .await
            .map_err(err("opening a channel".into()))?;
        declare_exchange(&ch, cfg).await.map_err(|e| match e {
            Declare::Broken(m) => OutboxError::Broker(m),
            Declare::Refused(m) => OutboxError::Config(m),
        })?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let typed = |mut args: FieldTable| {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(q.queue_type.as_str().into()),
            );
            args
        };
        let mismatch = "(an existing queue of another type or with other arguments must be \
                        deleted first, or declared with its own type: --queue-type)";
        ch.exchange_declare(
            q.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(err(format!(
            "dead-letter exchange {:?}",
            q.dead_letter_exchange
        )))?;
        ch.queue_declare(
            q.dead_letter_queue.as_str().into(),
            durable,
            typed(FieldTable::default()),
        )
        .await
        .map_err(err(format!(
            "dead-letter queue {:?} {mismatch}",
            q.dead_letter_queue
        )))?;
        ch.queue_bind(
            q.dead_letter_queue.as_str().into(),
            q.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(err(format!("binding {:?}", q.dead_letter_queue)))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(q.dead_letter_exchange.as_str().into()),
        );
        if let (QueueType::Quorum, Some(limit)) = (q.queue_type, q.delivery_limit) {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(limit.into()),
            );
        }
        ch.queue_declare(q.queue.as_str().into(), durable, typed(args))
            .await
            .map_err(err(format!("queue {:?} {mismatch}", q.queue)))?;
        for b in &q.bindings {
            ch.queue_bind(
                q.queue.as_str().into(),
                cfg.exchange.as_str().into(),
                b.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err(format!("binding {:?} to {b:?}", q.queue)))?;
        }
        Ok(())
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    result
}
