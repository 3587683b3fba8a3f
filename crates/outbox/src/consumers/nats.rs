//! JetStream source: a durable pull consumer with explicit acknowledgements. A retry is a NAK with
//! the delay (the server redelivers then); `max_deliver` is unlimited because the runtime, not the
//! server, decides when an event is parked.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use async_trait::async_trait;
use futures::StreamExt;

use super::event::InboundEvent;
use super::source::{Acknowledger, EventSource, Received};
use crate::error::{OutboxError, Result};

/// Where a JetStream source reads.
#[derive(Debug, Clone)]
pub struct NatsSourceConfig {
    /// Server URL.
    pub url: String,
    /// Stream the relay publishes to.
    pub stream: String,
    /// Durable consumer name (created if missing).
    pub durable: String,
    /// Only subjects matching this filter (empty: all of the stream).
    pub filter_subject: String,
    /// How long the server waits for an acknowledgement before redelivering.
    pub ack_wait: Duration,
    /// Unacknowledged messages the server lets this consumer hold.
    pub max_ack_pending: i64,
}

impl Default for NatsSourceConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "OUTBOX".into(),
            durable: "outbox-consumer".into(),
            filter_subject: String::new(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 1024,
        }
    }
}

/// A JetStream durable consumer as an [`EventSource`].
pub struct NatsSource {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    messages: jetstream::consumer::pull::Stream,
    pending: Option<u64>,
}

impl NatsSource {
    /// Connects and binds (creating if needed) the durable consumer.
    pub async fn connect(cfg: NatsSourceConfig) -> Result<Self> {
        let client = async_nats::connect(&cfg.url).await.map_err(|e| {
            OutboxError::Broker(format!(
                "cannot connect to NATS at {}: {e} (check the URL and that nats-server runs)",
                cfg.url
            ))
        })?;
        let js = jetstream::new(client);
        let stream = js.get_stream(&cfg.stream).await.map_err(|e| {
            OutboxError::Broker(format!(
                "stream {:?} not found: {e} (start the relay first, it creates the stream)",
                cfg.stream
            ))
        })?;
        let consumer = stream
            .get_or_create_consumer(
                &cfg.durable,
                pull::Config {
                    durable_name: Some(cfg.durable.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: cfg.ack_wait,
                    max_deliver: -1,
                    max_ack_pending: cfg.max_ack_pending,
                    filter_subject: cfg.filter_subject.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                OutboxError::Broker(format!(
                    "cannot create durable consumer {:?} on {:?}: {e}",
                    cfg.durable, cfg.stream
                ))
            })?;
        let messages = consumer.messages().await.map_err(|e| {
            OutboxError::Broker(format!("cannot start pulling from {:?}: {e}", cfg.durable))
        })?;
        Ok(Self {
            consumer,
            messages,
            pending: None,
        })
    }
}

struct NatsAck(jetstream::message::Acker);

#[async_trait]
impl Acknowledger for NatsAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        // A plain ack: one lost on the way only causes a redelivery, which the inbox drops.
        self.0
            .ack()
            .await
            .map_err(|e| OutboxError::Broker(format!("ack: {e}")))
    }

    async fn retry_after(self: Box<Self>, delay: Duration) -> Result<()> {
        self.0
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| OutboxError::Broker(format!("nak: {e}")))
    }
}

#[async_trait]
impl EventSource for NatsSource {
    fn broker(&self) -> &'static str {
        "nats"
    }

    async fn next(&mut self) -> Result<Option<Received>> {
        let Some(msg) = self.messages.next().await else {
            return Ok(None);
        };
        let msg = msg.map_err(|e| OutboxError::Broker(format!("pulling messages: {e}")))?;
        if let Ok(info) = msg.info() {
            self.pending = Some(info.pending);
        }
        let (m, acker) = msg.split();
        let mut headers = BTreeMap::new();
        if let Some(h) = &m.headers {
            for (k, v) in h.iter() {
                if let Some(v) = v.first() {
                    headers.insert(k.to_string(), v.as_str().to_string());
                }
            }
        }
        let msg_id = headers.get("Nats-Msg-Id").cloned();
        let (event, unreadable) =
            InboundEvent::read(m.subject.to_string(), headers, msg_id.as_deref(), m.payload);
        Ok(Some(Received {
            event,
            unreadable,
            acker: Box::new(NatsAck(acker)),
        }))
    }

    async fn lag(&mut self) -> Option<u64> {
        match self.consumer.info().await {
            Ok(i) => Some(i.num_pending),
            Err(_) => self.pending,
        }
    }
}
