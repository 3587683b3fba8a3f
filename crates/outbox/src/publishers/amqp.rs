//! RabbitMQ (AMQP 0-9-1) adapter, with publisher confirms.
//!
//! Every event is published to one durable **topic exchange** (default `outbox.events`; the
//! inventory seed uses `inventory.events`) as a persistent message (`delivery_mode` 2) on a channel
//! in confirm mode. A row is reported published only when the broker confirmed (`basic.ack`) the
//! message *and* did not return it; a `basic.nack`, a return, a broken channel or connection, or a
//! confirm that does not come in time all mean "not published".
//!
//! **Routing key.** Rendered from a template that must contain `{tenant}` (invariant 7). The
//! default `{topic}.{tenant}` keeps the producer's topic (the seed's `inventory.stock.changed`) as
//! the key's prefix, so a seed pattern `P` becomes `P.*` for every tenant or `P.acme` for one:
//! `inventory.stock.*` (the seed's "stock events") is `inventory.stock.*.*`, and `inventory.#`
//! still takes everything.
//!
//! A service whose published contract fixes the routing keys (the inventory seed: exactly
//! `inventory.reservation.created`, bound as `inventory.reservation.*`) can opt out with
//! [`AmqpConfig::tenant_in_header_only`]: the template may then omit `{tenant}`, and the tenant
//! travels only in the `Outbox-Tenant-Id` header, which every message carries. Invariant 7 still
//! holds in the message (header and envelope); a consumer takes one tenant through a headers
//! exchange bound behind the topic exchange (`x-match: all`, `Outbox-Tenant-Id: acme`). It is an
//! explicit setting, never implied, so a typo in a template cannot silently drop the tenant.
//!
//! **Message.** `message_id` = `eventId` (consumers de-duplicate on it: RabbitMQ has no
//! de-duplication of its own), `correlation_id`, `type` = event type, `timestamp` (seconds, the
//! row's creation), `content_type`, `app_id`, and the headers `Outbox-Event-Id`,
//! `Outbox-Event-Type`, `Outbox-Tenant-Id`, `Outbox-Aggregate-Type`, `Outbox-Aggregate-Id`,
//! `Outbox-Seq` and `Outbox-Seq-Epoch` (integers), `Outbox-Correlation-Id` and `traceparent` when the event has one: the
//! same names as the NATS adapter, so consumers move between brokers unchanged. With
//! [`AmqpConfig::header_encoding`] compact, the `Outbox-*` headers are replaced by one
//! `Outbox-Meta` ([`crate::meta`]; the properties stay).
//!
//! **Unroutable messages** are never lost silently. Messages are published `mandatory`. By default
//! the exchange is declared with an *alternate exchange* (`<exchange>.unroutable`, fanout, bound to
//! a durable queue of the same name): a message no binding wants is parked there, confirmed, and
//! counted as published, because the broker holds it and an operator can shovel it on. When no
//! alternate exchange is configured (or it cannot route either), the broker returns the message:
//! the adapter counts it in `outbox_events_unroutable_total`, logs a warning, and reports a
//! *retryable* failure (`unroutable`), so the event is retried with backoff (a consumer's binding
//! may be on its way) and ends in the outbox's dead letters, replayable, when its budget is spent.
//!
//! **Failures.** Sending goes through [`crate::pipeline::run`]: at most one unconfirmed message per
//! aggregate, at most `max_in_flight` confirms outstanding. Outages (`Unavailable`: no attempt is
//! used, the relay backs off, the events stay in the outbox, and the next batch opens a fresh
//! channel where the old one may be stuck): the broker unreachable, a channel or connection broken,
//! a confirm that does not come within `confirm_timeout` (confirms come in publish order, so a
//! missing one means the channel is stuck, not that the event is at fault), a connection the broker
//! blocked (`connection.blocked`, a memory or disk alarm), and a publish not written within
//! `send_timeout` (a blocked connection is not read, and `basic_publish` waits until its frames are
//! written). A `basic.nack` (a queue with `x-overflow: reject-publish` is full, or a queue process
//! failed) is an outage of its *routing key* only (`RouteRefused`): no attempt is used, and the
//! relay holds back that key for a back-off while the other keys flow (many keys refused at once,
//! as by a full queue bound by `#`, and it backs off as a whole). Per message: a return (`Retryable`, see above); a message
//! larger than the broker's `max_message_size` (client-side check; the limit is also learnt from the
//! broker's refusal) or a routing key over 255 bytes (`Permanent`). After a failure the later events
//! of the same aggregate in the batch are not sent at all, so the broker never sees them ahead of
//! the failed one.
//!
//! **Reconnection.** No automatic recovery inside the client: the adapter holds at most one
//! connection and one confirm channel, and after any failure opens new ones on the next publish
//! (re-declaring the topology). The relay starts while RabbitMQ is down and reports `Unavailable`
//! until it is back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::Mutex;

use crate::error::{OutboxError, Result};
use crate::meta::{self, HeaderEncoding, META_HEADER};
use crate::pipeline::AckFuture;
use crate::publisher::{
    Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher, SKIP_HEADER,
};

/// Counter: messages the broker returned as unroutable (`exchange`).
pub const UNROUTABLE: &str = "outbox_events_unroutable_total";

/// RabbitMQ's default `max_message_size` (128 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

/// AMQP short strings (routing keys, property values) hold at most 255 bytes.
const SHORT_STRING_MAX: usize = 255;

/// Settings of the RabbitMQ adapter.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// AMQP URL, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Topic exchange the events go to.
    pub exchange: String,
    /// Routing key per event: `{tenant}`, `{topic}`, `{event_type}`, `{aggregate_type}`; must
    /// contain `{tenant}` unless [`AmqpConfig::tenant_in_header_only`] is set.
    pub routing_key_template: String,
    /// Allow a routing-key template without `{tenant}`: the tenant is then carried only by the
    /// `Outbox-Tenant-Id` header (sent with every message), for contracts whose routing keys
    /// are fixed. Off by default, so invariant 7 is only relaxed on purpose.
    pub tenant_in_header_only: bool,
    /// Declare the exchange (and the alternate exchange); when false only check that they exist
    /// (passive declare), for brokers whose topology is owned by the operator.
    pub declare: bool,
    /// Alternate exchange for unroutable messages (`None`: unroutable messages are returned and
    /// retried, see the module doc).
    pub alternate_exchange: Option<String>,
    /// Most confirms outstanding at once (the relay's batch bounds it too).
    pub max_in_flight: usize,
    /// How long to wait for one confirm.
    pub confirm_timeout: Duration,
    /// How long one `basic.publish` may take to be written (a blocked connection is not read).
    pub send_timeout: Duration,
    /// How long to wait for the TCP connection and AMQP handshake.
    pub connect_timeout: Duration,
    /// Largest message body the broker accepts (its `max_message_size`).
    pub max_message_size: usize,
    /// `app_id` property of every message.
    pub app_id: String,
    /// Which headers carry each event's metadata ([`HeaderEncoding`]; default: one per field).
    /// Compact keeps the properties and sends `Outbox-Meta` (and `traceparent`, and
    /// `Outbox-Tenant-Id` when [`AmqpConfig::tenant_in_header_only`] is set: headers bindings
    /// select tenants by it) in place of the `Outbox-*` headers.
    pub header_encoding: HeaderEncoding,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: "outbox.events".into(),
            routing_key_template: "{topic}.{tenant}".into(),
            tenant_in_header_only: false,
            declare: true,
            alternate_exchange: Some("outbox.events.unroutable".into()),
            max_in_flight: 2048,
            confirm_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            app_id: "outbox-relay".into(),
            header_encoding: HeaderEncoding::Full,
        }
    }
}

/// One open connection and its confirm channel.
struct Live {
    conn: Connection,
    channel: Channel,
}

impl Live {
    fn healthy(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

/// Publishes to a RabbitMQ topic exchange with publisher confirms.
pub struct AmqpPublisher {
    cfg: AmqpConfig,
    live: Mutex<Option<Live>>,
    connected: AtomicBool,
    /// The broker's limit as far as we know: the configured one, lowered when the broker refuses a
    /// message as too large.
    max_message_size: AtomicUsize,
}

impl AmqpPublisher {
    /// Checks the configuration and, if RabbitMQ answers, connects and declares (or checks) the
    /// exchange, so that a topology error is reported at start-up. A broker that cannot be
    /// reached is not an error: the relay starts and the events wait in the outbox.
    pub async fn connect(cfg: AmqpConfig) -> Result<Self> {
        if !cfg.tenant_in_header_only && !cfg.routing_key_template.contains("{tenant}") {
            return Err(OutboxError::Config(format!(
                "routing key template {:?} must contain {{tenant}}: the tenant is part of every routing key \
                 (or allow a key without it explicitly, the tenant then travels only in the Outbox-Tenant-Id header)",
                cfg.routing_key_template
            )));
        }
        if cfg.max_in_flight == 0 {
            return Err(OutboxError::Config(
                "max in-flight confirms must be at least 1".into(),
            ));
        }
        if cfg.exchange.is_empty() {
            return Err(OutboxError::Config(
                "the exchange name must not be empty (the default exchange cannot be a topic exchange)".into(),
            ));
        }
        if cfg.alternate_exchange.as_deref() == Some(cfg.exchange.as_str()) {
            return Err(OutboxError::Config(
                "the alternate exchange must differ from the exchange".into(),
            ));
        }
        cfg.url
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| OutboxError::Config(format!("AMQP URL is not valid: {e}")))?;
        let me = Self {
            max_message_size: AtomicUsize::new(cfg.max_message_size),
            cfg,
            live: Mutex::new(None),
            connected: AtomicBool::new(false),
        };
        match me.open().await {
            Ok(live) => *me.live.lock().await = Some(live),
            Err(Open::Unreachable(e)) => {
                tracing::warn!(error = %e, "RabbitMQ not reachable yet; events wait in the outbox until it is")
            }
            Err(Open::Topology(e)) => return Err(e),
        }
        Ok(me)
    }

    /// The adapter's settings.
    pub fn config(&self) -> &AmqpConfig {
        &self.cfg
    }

    async fn open(&self) -> std::result::Result<Live, Open> {
        let props = ConnectionProperties::default().with_connection_name("outbox-relay".into());
        let conn = tokio::time::timeout(
            self.cfg.connect_timeout,
            Connection::connect(&self.cfg.url, props),
        )
        .await
        .map_err(|_| Open::Unreachable("connecting to RabbitMQ timed out".into()))?
        .map_err(|e| Open::Unreachable(format!("cannot connect to RabbitMQ: {e}")))?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| Open::Unreachable(format!("cannot open a channel: {e}")))?;
        if let Err(e) = declare_exchange(&channel, &self.cfg).await {
            let _ = conn.close(200, "topology error".into()).await;
            return Err(match e {
                Declare::Broken(m) => Open::Unreachable(m),
                Declare::Refused(m) => Open::Topology(OutboxError::Config(m)),
            });
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| Open::Unreachable(format!("cannot enable publisher confirms: {e}")))?;
        self.connected.store(true, Ordering::Relaxed);
        tracing::info!(exchange = %self.cfg.exchange, "connected to RabbitMQ");
        Ok(live_of(conn, channel))
    }

    /// The properties and headers this adapter sends with `m` (persistent, `message_id`, `type`,
    /// `timestamp`, `content_type`, `app_id`, `correlation_id` and the `Outbox-*` headers; see the
    /// module doc). Public so that a benchmark's raw baseline publishes byte-for-byte the same
    /// messages as the relay.
    pub fn properties(&self, m: &OutboundMessage) -> BasicProperties {
        let mut h = FieldTable::default();
        let put = |h: &mut FieldTable, k: &str, v: &str| {
            h.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
        };
        if self.cfg.header_encoding == HeaderEncoding::Compact {
            put(&mut h, META_HEADER, &meta::encode(m));
            if self.cfg.tenant_in_header_only {
                put(&mut h, "Outbox-Tenant-Id", &m.tenant_id);
            }
        } else {
            put(&mut h, "Outbox-Event-Id", &m.event_id.to_string());
            put(&mut h, "Outbox-Event-Type", &m.event_type);
            put(&mut h, "Outbox-Tenant-Id", &m.tenant_id);
            put(&mut h, "Outbox-Aggregate-Type", &m.aggregate_type);
            put(&mut h, "Outbox-Aggregate-Id", &m.aggregate_id);
            if let Some(c) = m.header("correlationId") {
                put(&mut h, "Outbox-Correlation-Id", c);
            }
            if let Some(p) = m.producer_id {
                put(&mut h, "Outbox-Producer-Id", &p.to_string());
            }
            if let Some(skip) = m.header(SKIP_HEADER) {
                put(&mut h, "Outbox-Skip", skip);
            }
            h.insert("Outbox-Seq".into(), AMQPValue::LongLongInt(m.seq));
            h.insert(
                "Outbox-Seq-Epoch".into(),
                AMQPValue::LongLongInt(m.seq_epoch),
            );
        }
        if let Some(tp) = m.header("traceparent") {
            put(&mut h, "traceparent", tp);
        }
        let mut p = BasicProperties::default()
            .with_message_id(m.event_id.to_string().into())
            .with_type(short(&m.event_type))
            .with_timestamp(m.created_at.timestamp().max(0) as u64)
            .with_content_type(short(m.header("contentType").unwrap_or("application/json")))
            .with_app_id(short(&self.cfg.app_id))
            .with_delivery_mode(2)
            .with_headers(h);
        if let Some(c) = m.header("correlationId") {
            p = p.with_correlation_id(short(c));
        }
        p
    }

    /// Checks that need no broker: a failure here is the event's, not the broker's.
    fn precheck(&self, m: &OutboundMessage, key: &str) -> Option<PublishFailure> {
        let limit = self.max_message_size.load(Ordering::Relaxed);
        if m.payload.len() > limit {
            return Some(PublishFailure::new(
                FailureKind::Permanent,
                "too_large",
                format!(
                    "message of {} bytes exceeds the broker's max_message_size of {limit} bytes",
                    m.payload.len()
                ),
            ));
        }
        if key.len() > SHORT_STRING_MAX {
            return Some(PublishFailure::new(
                FailureKind::Permanent,
                "bad_routing_key",
                format!("routing key of {} bytes exceeds AMQP's 255", key.len()),
            ));
        }
        None
    }

    /// The broker closed the channel because a message was too large: remember its limit
    /// (from "message size N is larger than configured max size M"), so the next attempt
    /// dead-letters that message instead of breaking the channel again.
    fn learn_limit(&self, error: &str) {
        if let Some(rest) = error.split("max size ").nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse::<usize>() {
                self.max_message_size.fetch_min(n, Ordering::Relaxed);
                tracing::warn!(
                    max_message_size = n,
                    "RabbitMQ refused a message as too large; using its limit"
                );
            }
        }
    }
}

fn live_of(conn: Connection, channel: Channel) -> Live {
    Live { conn, channel }
}

/// Why a connection could not be set up.
enum Open {
    /// Network, handshake or channel failure: try again later.
    Unreachable(String),
    /// The broker refused the topology: the operator must act.
    Topology(OutboxError),
}

/// Why a declaration failed.
pub(crate) enum Declare {
    /// The connection broke.
    Broken(String),
    /// The broker refused (exists with other settings, absent in passive mode, access refused).
    Refused(String),
}

fn short(s: &str) -> ShortString {
    // Property values are short strings: cut at a character boundary within 255 bytes.
    let mut end = s.len().min(SHORT_STRING_MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].into()
}

fn refused_or_broken(e: lapin::Error, what: String) -> Declare {
    if e.is_amqp_error() {
        Declare::Refused(format!("{what}: {e}"))
    } else {
        Declare::Broken(format!("{what}: {e}"))
    }
}

/// Declares (or, with `declare` off, passively checks) the durable topic exchange and its
/// alternate exchange with the queue that keeps unroutable messages. Shared by the relay and the
/// `rabbitmq-topology` command, so both declare the exchange with the same arguments (RabbitMQ
/// refuses a re-declaration with different ones).
pub(crate) async fn declare_exchange(
    ch: &Channel,
    cfg: &AmqpConfig,
) -> std::result::Result<(), Declare> {
    let opts = ExchangeDeclareOptions {
        passive: !cfg.declare,
        durable: true,
        ..Default::default()
    };
    if let Some(ae) = &cfg.alternate_exchange {
        ch.exchange_declare(
            ae.as_str().into(),
            ExchangeKind::Fanout,
            opts,
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused_or_broken(e, format!("alternate exchange {ae:?}")))?;
        if cfg.declare {
            let q = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(ae.as_str().into(), q, FieldTable::default())
                .await
                .map_err(|e| refused_or_broken(e, format!("unroutable queue {ae:?}")))?;
            ch.queue_bind(
                ae.as_str().into(),
                ae.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused_or_broken(e, format!("binding unroutable queue {ae:?}")))?;
        }
    }
    let mut args = FieldTable::default();
    if let Some(ae) = &cfg.alternate_exchange {
        args.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(ae.as_str().into()),
        );
    }
    ch.exchange_declare(
        cfg.exchange.as_str().into(),
        ExchangeKind::Topic,
        opts,
        args,
    )
    .await
    .map_err(|e| {
        refused_or_broken(
            e,
            format!(
                "exchange {:?} (durable topic{}{})",
                cfg.exchange,
                cfg.alternate_exchange
                    .as_deref()
                    .map(|a| format!(", alternate-exchange {a:?}"))
                    .unwrap_or_default(),
                if cfg.declare {
                    "; an existing exchange with other settings must be deleted or matched"
                } else {
                    "; passive check: declare it or drop --amqp-no-declare"
                }
            ),
        )
    })
}

/// Consumer-side topology for one subscriber (the seed's dead-letter queues) with **classic**
/// queues: a durable queue bound to the events exchange by each of `bindings`, whose rejected or
/// expired messages go to the fanout exchange `dead_letter_exchange` and from there to the
/// durable queue `dead_letter_queue`. Declares the events exchange as the relay does. Idempotent.
/// [`crate::amqp_topology::declare`] declares quorum queues (what `outbox rabbitmq-topology`
/// does by default).
pub async fn declare_consumer_queue(
    cfg: &AmqpConfig,
    queue: &str,
    bindings: &[String],
    dead_letter_exchange: &str,
    dead_letter_queue: &str,
) -> Result<()> {
    let q = crate::amqp_topology::ConsumerQueue {
        queue: queue.into(),
        bindings: bindings.to_vec(),
        dead_letter_exchange: dead_letter_exchange.into(),
        dead_letter_queue: dead_letter_queue.into(),
        queue_type: crate::amqp_topology::QueueType::Classic,
        delivery_limit: None,
    };
    crate::amqp_topology::declare(cfg, &q).await
}

#[async_trait]
impl Publisher for AmqpPublisher {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn route_template(&self) -> &str {
        &self.cfg.routing_key_template
    }

    fn is_connected(&self) -> bool {
        match self.live.try_lock() {
            Ok(live) => live
                .as_ref()
                .is_some_and(|l| l.healthy() && !l.conn.status().blocked()),
            // A publish is under way; it keeps the flag current.
            Err(_) => self.connected.load(Ordering::Relaxed),
        }
    }

    async fn publish(
        &self,
        batch: &[OutboundMessage],
        deadline: tokio::time::Instant,
    ) -> Vec<Result<Delivery, PublishFailure>> {
        let all = |f: PublishFailure| batch.iter().map(|_| Err(f.clone())).collect::<Vec<_>>();
        // One batch at a time on the one channel: confirms are per channel, in publish order.
        let mut guard = self.live.lock().await;
        if !guard.as_ref().is_some_and(Live::healthy) {
            if let Some(old) = guard.take() {
                // Best effort: the old connection may be half-open.
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    old.conn.close(200, "reconnecting".into()),
                )
                .await;
            }
            self.connected.store(false, Ordering::Relaxed);
            match self.open().await {
                Ok(l) => *guard = Some(l),
                Err(Open::Unreachable(e)) => {
                    return all(PublishFailure::new(
                        FailureKind::Unavailable,
                        "disconnected",
                        e,
                    ))
                }
                Err(Open::Topology(e)) => {
                    // The operator's to fix; the events wait rather than die.
                    tracing::error!(error = %e, "RabbitMQ exchange not usable");
                    return all(PublishFailure::new(
                        FailureKind::Unavailable,
                        "exchange",
                        e.to_string(),
                    ));
                }
            }
        }
        let Some(live) = guard.as_ref() else {
            unreachable!("a live connection was just set")
        };
        // Set by a send or confirm that leaves the channel in an unknown state: the next batch
        // starts on a fresh connection.
        let reset = Arc::new(AtomicBool::new(false));
        let template = self.cfg.routing_key_template.as_str();
        let outcomes =
            crate::pipeline::run(batch, template, self.cfg.max_in_flight, deadline, |m| {
                let reset = reset.clone();
                async move { self.send(live, m, reset).await }
            })
            .await;
        let reset = reset.load(Ordering::Relaxed);
        if reset {
            for f in outcomes.iter().filter_map(|o| o.as_ref().err()) {
                self.learn_limit(&f.message);
            }
            tracing::warn!("RabbitMQ channel broken or stuck; reconnecting on the next batch");
            self.connected.store(false, Ordering::Relaxed);
            if let Some(old) = guard.take() {
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    old.conn.close(200, "channel broken".into()),
                )
                .await;
            }
        }
        outcomes
    }
}

impl AmqpPublisher {
    /// Sends one message and returns the future of its confirm. Under a resource alarm RabbitMQ
    /// blocks the connection and stops reading from it, so `basic_publish` (which waits until its
    /// frames are written) could wait forever: it has a deadline, and a blocked connection is an
    /// outage before anything is sent.
    async fn send(
        &self,
        live: &Live,
        m: &OutboundMessage,
        reset: Arc<AtomicBool>,
    ) -> std::result::Result<AckFuture, PublishFailure> {
        if live.conn.status().blocked() {
            return Err(PublishFailure::new(
                FailureKind::Unavailable,
                "blocked",
                "RabbitMQ blocked the connection (a memory or disk alarm): it accepts no messages until the alarm clears",
            ));
        }
        let routing_key = m.render(&self.cfg.routing_key_template);
        if let Some(f) = self.precheck(m, &routing_key) {
            return Err(f);
        }
        let sent = tokio::time::timeout(
            self.cfg.send_timeout,
            live.channel.basic_publish(
                self.cfg.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &m.payload,
                self.properties(m),
            ),
        )
        .await;
        let confirm = match sent {
            Ok(Ok(confirm)) => confirm,
            Ok(Err(e)) => {
                reset.store(true, Ordering::Relaxed);
                return Err(PublishFailure::new(
                    FailureKind::Unavailable,
                    "disconnected",
                    format!("publishing failed: {e}"),
                ));
            }
            Err(_) => {
                reset.store(true, Ordering::Relaxed);
                return Err(PublishFailure::new(
                    FailureKind::Unavailable,
                    "send_timeout",
                    format!(
                        "RabbitMQ did not take the message within {:?} (connection blocked or stalled)",
                        self.cfg.send_timeout
                    ),
                ));
            }
        };
        let (timeout, exchange) = (self.cfg.confirm_timeout, self.cfg.exchange.clone());
        Ok(async move {
            let settled = tokio::time::timeout(timeout, confirm).await;
            confirmed(settled, timeout, &exchange, &reset)
        }
        .boxed())
    }
}

/// What a confirm (or its absence) means for the message.
fn confirmed(
    settled: std::result::Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>,
    timeout: Duration,
    exchange: &str,
    reset: &AtomicBool,
) -> std::result::Result<Delivery, PublishFailure> {
    let outage = |reason, message: String| {
        reset.store(true, Ordering::Relaxed);
        Err(PublishFailure::new(
            FailureKind::Unavailable,
            reason,
            message,
        ))
    };
    match settled {
        // Confirms come in publish order: one missing means the broker or the channel is stuck,
        // not that this event is at fault.
        Err(_) => outage("timeout", format!("no publisher confirm within {timeout:?}")),
        Ok(Err(e)) => outage(
            "disconnected",
            format!("channel closed before the confirm: {e}"),
        ),
        Ok(Ok(Confirmation::Ack(None))) => Ok(Delivery::Stored),
        // Cannot happen on our confirm-mode channel; if it ever did, nothing confirmed the
        // message, so it must not count as published.
        Ok(Ok(Confirmation::NotRequested)) => outage(
            "disconnected",
            "the channel is not in confirm mode".into(),
        ),
        Ok(Ok(Confirmation::Ack(Some(ret)))) | Ok(Ok(Confirmation::Nack(Some(ret)))) => {
            metrics::counter!(UNROUTABLE, "exchange" => exchange.to_string()).increment(1);
            tracing::warn!(
                exchange = %exchange,
                routing_key = %ret.delivery.routing_key,
                reply = %ret.reply_text,
                "RabbitMQ returned an unroutable event; it stays in the outbox and is retried"
            );
            Err(PublishFailure::new(
                FailureKind::Retryable,
                "unroutable",
                format!(
                    "returned by RabbitMQ ({} {}): no queue is bound for routing key {:?} and no alternate exchange took it",
                    ret.reply_code, ret.reply_text, ret.delivery.routing_key
                ),
            ))
        }
        // RabbitMQ nacks when a queue refuses new messages (`x-overflow: reject-publish` on a
        // full queue) or a queue process failed: a state of the queues bound to this routing key,
        // not of this message, and not of the broker as a whole (the channel stays usable). The
        // relay holds back this route only; many routes refused at once (a full queue bound by
        // `#`) make it back off as a whole.
        Ok(Ok(Confirmation::Nack(None))) => Err(PublishFailure::new(
            FailureKind::RouteRefused,
            "nack",
            "RabbitMQ refused the message (basic.nack: a queue bound to its routing key is full with reject-publish, or failed)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publisher::test_message;

    /// The headers of `m` by an adapter with `encoding` (no broker needed: an unreachable one is
    /// not an error at start-up).
    async fn headers(encoding: HeaderEncoding, tenant_in_header_only: bool) -> FieldTable {
        let p = AmqpPublisher::connect(AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:1/%2f".into(),
            header_encoding: encoding,
            tenant_in_header_only,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut m = test_message(3, "agg", 0);
        m.headers.insert("traceparent".into(), "00-ab-cd-01".into());
        p.properties(&m).headers().clone().unwrap()
    }

    #[tokio::test]
    async fn compact_keeps_the_tenant_header_where_headers_bindings_select_by_it() {
        let names = |t: FieldTable| {
            let mut n: Vec<String> = t.inner().keys().map(|k| k.to_string()).collect();
            n.sort();
            n
        };
        assert_eq!(
            names(headers(HeaderEncoding::Compact, false).await),
            [META_HEADER, "traceparent"]
        );
        assert_eq!(
            names(headers(HeaderEncoding::Compact, true).await),
            [META_HEADER, "Outbox-Tenant-Id", "traceparent"]
        );
        let full = names(headers(HeaderEncoding::Full, true).await);
        assert!(
            full.contains(&"Outbox-Seq".to_string()) && !full.contains(&META_HEADER.to_string()),
            "{full:?}"
        );
    }
}
