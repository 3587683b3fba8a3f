//! NATS JetStream adapter.
//!
//! `Nats-Msg-Id` is the `eventId`, so the stream drops re-publishes inside its duplicate window;
//! the window is checked against the relay's re-publish horizon before anything is published.
//! Built without async-nats' `server_2_10` features: Debian ships nats-server 2.9, which would
//! reject the 2.10-only stream fields.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use async_nats::{connection::State, HeaderMap};
use async_trait::async_trait;
use futures::future::{join_all, BoxFuture, FutureExt};
use tokio::sync::Mutex;

use crate::error::{OutboxError, Result};
use crate::publisher::{Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher};

/// Settings of the JetStream adapter.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Subjects the stream captures (used when the adapter creates it).
    pub subjects: Vec<String>,
    /// Subject per event: `{tenant}`, `{topic}`, `{event_type}`, `{aggregate_type}`.
    pub subject_template: String,
    /// Duplicate window of a stream the adapter creates.
    pub duplicate_window: Duration,
    /// Create the stream when it does not exist (otherwise only check it).
    pub create_stream: bool,
    /// How long to wait for one acknowledgement.
    pub ack_timeout: Duration,
    /// Most acknowledgements outstanding at once.
    pub max_in_flight: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "OUTBOX".into(),
            subjects: vec!["outbox.>".into()],
            subject_template: "outbox.{tenant}.{topic}".into(),
            duplicate_window: Duration::from_secs(120),
            create_stream: true,
            ack_timeout: Duration::from_secs(5),
            max_in_flight: 4096,
        }
    }
}

/// Publishes to a JetStream stream.
pub struct NatsPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: NatsConfig,
    horizon: Duration,
    stream_checked: Mutex<bool>,
}

impl NatsPublisher {
    /// Connects (in the background: the relay starts while NATS is down) and, if the server
    /// answers, makes sure the stream exists with a duplicate window of at least `horizon`.
    /// Fails at once on a configuration error, including a window shorter than `horizon`.
    pub async fn connect(cfg: NatsConfig, horizon: Duration) -> Result<Self> {
        if !cfg.subject_template.contains("{tenant}") {
            return Err(OutboxError::Config(format!(
                "subject template {:?} must contain {{tenant}}: the tenant is part of every subject",
                cfg.subject_template
            )));
        }
        if cfg.max_in_flight == 0 {
            return Err(OutboxError::Config(
                "max in-flight acknowledgements must be at least 1".into(),
            ));
        }
        let client = async_nats::ConnectOptions::new()
            .name("outbox-relay")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2000))
            })
            .connect(cfg.url.as_str())
            .await
            .map_err(|e| OutboxError::Broker(format!("cannot use NATS URL {:?}: {e}", cfg.url)))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.ack_timeout)
            .max_ack_inflight(cfg.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let me = Self {
            client,
            js,
            cfg,
            horizon,
            stream_checked: Mutex::new(false),
        };
        // Give a reachable server a moment, so that a bad stream is reported at start-up.
        for _ in 0..20 {
            if me.client.connection_state() == State::Connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if me.client.connection_state() == State::Connected {
            me.ensure_stream().await?;
        } else {
            tracing::warn!(url = %me.cfg.url, "NATS not reachable yet; events wait in the outbox until it is");
        }
        Ok(me)
    }

    /// The underlying client (tests and benchmarks subscribe with it).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Creates the stream if configured and absent; checks its duplicate window.
    pub async fn ensure_stream(&self) -> Result<()> {
        let mut checked = self.stream_checked.lock().await;
        if *checked {
            return Ok(());
        }
        let info = match self.js.get_stream(&self.cfg.stream).await {
            Ok(mut s) => s
                .info()
                .await
                .map_err(|e| OutboxError::Broker(e.to_string()))?
                .clone(),
            Err(e) if is_not_found(&e) && self.cfg.create_stream => {
                let config = stream::Config {
                    name: self.cfg.stream.clone(),
                    subjects: self.cfg.subjects.clone(),
                    duplicate_window: self.cfg.duplicate_window,
                    storage: stream::StorageType::File,
                    ..Default::default()
                };
                let mut s = self.js.create_stream(config).await.map_err(|e| {
                    OutboxError::Broker(format!("cannot create stream {}: {e}", self.cfg.stream))
                })?;
                tracing::info!(stream = %self.cfg.stream, "created JetStream stream");
                s.info()
                    .await
                    .map_err(|e| OutboxError::Broker(e.to_string()))?
                    .clone()
            }
            Err(e) if is_not_found(&e) => {
                return Err(OutboxError::Config(format!(
                "stream {} does not exist and stream creation is off: create it or allow creation",
                self.cfg.stream
            )))
            }
            Err(e) => {
                return Err(OutboxError::Broker(format!(
                    "cannot look up stream {}: {e}",
                    self.cfg.stream
                )))
            }
        };
        let window = info.config.duplicate_window;
        if window < self.horizon {
            return Err(OutboxError::Config(format!(
                "stream {} drops duplicates for {:?} only, but the relay may re-publish an event up to {:?} \
                 after its first publish; raise the stream's duplicate window (nats stream edit {} --dupe-window) \
                 or lower the retry budget / lease",
                self.cfg.stream, window, self.horizon, self.cfg.stream
            )));
        }
        *checked = true;
        Ok(())
    }

    /// The headers an event is published with (also used by the benchmark's raw baseline, so
    /// that it sends byte-for-byte the messages the relay sends).
    pub fn headers(m: &OutboundMessage) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", m.event_id.to_string().as_str());
        h.insert("Outbox-Event-Id", m.event_id.to_string().as_str());
        h.insert("Outbox-Event-Type", m.event_type.as_str());
        h.insert("Outbox-Tenant-Id", m.tenant_id.as_str());
        h.insert("Outbox-Aggregate-Type", m.aggregate_type.as_str());
        h.insert("Outbox-Aggregate-Id", m.aggregate_id.as_str());
        h.insert("Outbox-Seq", m.seq.to_string().as_str());
        if let Some(c) = m.header("correlationId") {
            h.insert("Outbox-Correlation-Id", c);
        }
        if let Some(tp) = m.header("traceparent") {
            h.insert("traceparent", tp);
        }
        h.insert(
            "Content-Type",
            m.header("contentType").unwrap_or("application/json"),
        );
        h
    }

    fn classify(&self, kind: PublishErrorKind, err: String) -> PublishFailure {
        let connected = self.client.connection_state() == State::Connected;
        match kind {
            PublishErrorKind::MaxPayloadExceeded => {
                PublishFailure::new(FailureKind::Permanent, "too_large", err)
            }
            PublishErrorKind::StreamNotFound if connected => PublishFailure::new(
                FailureKind::Permanent,
                "no_stream",
                format!("no stream captures this subject ({err})"),
            ),
            _ if !connected => PublishFailure::new(FailureKind::Unavailable, "disconnected", err),
            PublishErrorKind::TimedOut => {
                PublishFailure::new(FailureKind::Retryable, "timeout", err)
            }
            PublishErrorKind::BrokenPipe => {
                PublishFailure::new(FailureKind::Unavailable, "disconnected", err)
            }
            _ => PublishFailure::new(FailureKind::Retryable, "rejected", err),
        }
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

#[async_trait]
impl Publisher for NatsPublisher {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    async fn publish(&self, batch: &[OutboundMessage]) -> Vec<Result<Delivery, PublishFailure>> {
        let all = |f: PublishFailure| batch.iter().map(|_| Err(f.clone())).collect::<Vec<_>>();
        if !self.is_connected() {
            return all(PublishFailure::new(
                FailureKind::Unavailable,
                "disconnected",
                "not connected to NATS",
            ));
        }
        if let Err(e) = self.ensure_stream().await {
            // A stream problem is the operator's to fix; the events wait rather than die.
            tracing::error!(error = %e, "JetStream stream not usable");
            return all(PublishFailure::new(
                FailureKind::Unavailable,
                "stream",
                e.to_string(),
            ));
        }
        // Send everything first (in order, on one connection), then collect the acknowledgements.
        let mut acks: Vec<
            BoxFuture<'static, std::result::Result<Delivery, (PublishErrorKind, String)>>,
        > = Vec::with_capacity(batch.len());
        for m in batch {
            let msg = PublishMessage::build()
                .payload(m.payload.clone())
                .headers(Self::headers(m));
            match self
                .js
                .send_publish(m.render(&self.cfg.subject_template), msg)
                .await
            {
                Ok(ack) => acks.push(
                    async move {
                        match ack.await {
                            Ok(a) if a.duplicate => Ok(Delivery::Duplicate),
                            Ok(_) => Ok(Delivery::Stored),
                            Err(e) => Err((e.kind(), e.to_string())),
                        }
                    }
                    .boxed(),
                ),
                Err(e) => {
                    let r = Err((e.kind(), e.to_string()));
                    acks.push(async move { r }.boxed());
                }
            }
        }
        let results = join_all(acks).await;
        // Every acknowledgement timing out means the server is not answering at all, not that
        // these events are at fault: do not spend their attempt budgets.
        let all_timed_out = results
            .iter()
            .all(|r| matches!(r, Err((PublishErrorKind::TimedOut, _))));
        results
            .into_iter()
            .map(|r| {
                r.map_err(|(kind, err)| {
                    if all_timed_out {
                        PublishFailure::new(FailureKind::Unavailable, "timeout", err)
                    } else {
                        self.classify(kind, err)
                    }
                })
            })
            .collect()
    }
}
