//! RabbitMQ source: a queue consumed with manual acknowledgements and a prefetch. A retry is a
//! requeue once the delay has passed (RabbitMQ has no delayed NACK; the message counts against the
//! prefetch meanwhile). Parked events go to the consumer's dead-letter table like JetStream's, not
//! to the queue's DLX: replay must run the handler in aggregate order with the inbox, which a
//! message moved to another queue cannot give. The DLX declared by `outbox rabbitmq-topology`
//! stays for messages rejected by other consumers of the queue.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

use super::event::InboundEvent;
use super::source::{Acknowledger, EventSource, Received};
use crate::error::{OutboxError, Result};

/// Where a RabbitMQ source reads.
#[derive(Debug, Clone)]
pub struct AmqpSourceConfig {
    /// Broker URL.
    pub url: String,
    /// Queue to consume (declared beforehand, e.g. by `outbox rabbitmq-topology`).
    pub queue: String,
    /// Unacknowledged messages the broker sends ahead.
    pub prefetch: u16,
    /// Consumer tag.
    pub consumer_tag: String,
}

impl Default for AmqpSourceConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            queue: "outbox.consumer".into(),
            prefetch: 256,
            consumer_tag: "outbox-consumer".into(),
        }
    }
}

/// A RabbitMQ queue as an [`EventSource`].
pub struct AmqpSource {
    conn: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    queue: String,
}

fn broker(what: &str, e: lapin::Error) -> OutboxError {
    OutboxError::Broker(format!("RabbitMQ: {what}: {e}"))
}

impl AmqpSource {
    /// Connects and starts consuming `cfg.queue`.
    pub async fn connect(cfg: AmqpSourceConfig) -> Result<Self> {
        let props =
            ConnectionProperties::default().with_connection_name(cfg.consumer_tag.clone().into());
        let conn = Connection::connect(&cfg.url, props)
            .await
            .map_err(|e| broker("cannot connect (check the URL and that RabbitMQ runs)", e))?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| broker("opening a channel", e))?;
        channel
            .basic_qos(cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| broker("setting the prefetch", e))?;
        let consumer = channel
            .basic_consume(
                cfg.queue.as_str().into(),
                cfg.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                broker(
                    &format!("consuming queue {:?} (declare it first)", cfg.queue),
                    e,
                )
            })?;
        Ok(Self {
            conn,
            channel,
            consumer,
            queue: cfg.queue,
        })
    }

    /// Closes the connection (unacknowledged messages go back to the queue).
    pub async fn close(self) {
        let _ = self.conn.close(200, "consumer stopped".into()).await;
    }
}

struct AmqpAck(lapin::Acker);

#[async_trait]
impl Acknowledger for AmqpAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.0
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| broker("ack", e))
    }

    async fn retry_after(self: Box<Self>, delay: Duration) -> Result<()> {
        // The worker must not wait out the delay (it would hold back other aggregates).
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = self
                .0
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        });
        Ok(())
    }
}

fn text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        _ => return None,
    })
}

#[async_trait]
impl EventSource for AmqpSource {
    fn broker(&self) -> &'static str {
        "rabbitmq"
    }

    async fn next(&mut self) -> Result<Option<Received>> {
        let Some(d) = self.consumer.next().await else {
            return Ok(None);
        };
        let d = d.map_err(|e| broker("receiving", e))?;
        let mut headers = BTreeMap::new();
        if let Some(h) = d.properties.headers() {
            for (k, v) in h.inner() {
                if let Some(v) = text(v) {
                    headers.insert(k.to_string(), v);
                }
            }
        }
        let msg_id = d.properties.message_id().as_ref().map(|s| s.to_string());
        let (event, unreadable) = InboundEvent::read(
            d.routing_key.to_string(),
            headers,
            msg_id.as_deref(),
            bytes::Bytes::from(d.data),
        );
        Ok(Some(Received {
            event,
            unreadable,
            acker: Box::new(AmqpAck(d.acker)),
        }))
    }

    async fn lag(&mut self) -> Option<u64> {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()
            .map(|q| q.message_count() as u64)
    }
}
