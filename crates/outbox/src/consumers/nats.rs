//! JetStream source: a durable pull consumer with explicit acknowledgements. A retry is a NAK with
//! the delay (the server redelivers then); `max_deliver` is unlimited because the runtime, not the
//! server, decides when an event is parked.
//!
//! Resuming fast without redelivering what is still held: the server redelivers a message that
//! is not acknowledged within `ack_wait`, so `ack_wait` is also how long the messages delivered
//! to a process that was killed wait before another process gets them. It is short (3 s by
//! default), and the source keeps what it holds alive: every message is registered the moment
//! it arrives (a task drains the pull subscription into the source's own queue, so nothing waits
//! unregistered in the client library's buffer) and dropped from the register when it is
//! acknowledged or NAKed; every `progress_interval` a progress acknowledgement (`+WPI`, which
//! restarts the server's `ack_wait` clock for that message) goes out for each registered one.
//! So a backlog held in the runtime's buffer longer than `ack_wait` is not redelivered, and a
//! killed process's messages come back within `ack_wait`. A handler that hangs keeps its message
//! (and its aggregate) for as long as the process lives, as it would hold the lane anyway.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, FromConsumer};
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, Subject};
use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
    /// How long the server waits for an acknowledgement (or a progress acknowledgement) before
    /// redelivering: the longest a message delivered to a killed process waits. Applied to an
    /// existing durable consumer too (the last process to start sets it).
    pub ack_wait: Duration,
    /// How often a progress acknowledgement is sent for each message held and not settled yet
    /// (`None`: a third of `ack_wait`). Must be shorter than `ack_wait`.
    pub progress_interval: Option<Duration>,
    /// Unacknowledged messages the server lets this consumer hold. Applied to an existing
    /// durable consumer too.
    pub max_ack_pending: i64,
}

impl Default for NatsSourceConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "OUTBOX".into(),
            durable: "outbox-consumer".into(),
            filter_subject: String::new(),
            ack_wait: Duration::from_secs(3),
            progress_interval: None,
            max_ack_pending: 1024,
        }
    }
}

impl NatsSourceConfig {
    fn progress_every(&self) -> Result<Duration> {
        let every = self.progress_interval.unwrap_or(self.ack_wait / 3);
        if self.ack_wait < Duration::from_millis(100) || every.is_zero() || every >= self.ack_wait {
            return Err(OutboxError::Config(format!(
                "the JetStream ack wait ({:?}) must be at least 100 ms and the progress interval \
                 ({every:?}) shorter than it and above zero: raise the ack wait or lower the \
                 progress interval",
                self.ack_wait
            )));
        }
        Ok(every)
    }
}

/// A JetStream durable consumer as an [`EventSource`].
pub struct NatsSource {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    received: mpsc::UnboundedReceiver<Result<Received>>,
    pending: Arc<AtomicU64>,
    pump: JoinHandle<()>,
    keep_alive: JoinHandle<()>,
}

impl NatsSource {
    /// Connects and binds (creating if needed) the durable consumer, setting its `ack_wait` and
    /// `max_ack_pending` to the configured ones.
    pub async fn connect(cfg: NatsSourceConfig) -> Result<Self> {
        let progress_every = cfg.progress_every()?;
        let client = async_nats::connect(&cfg.url).await.map_err(|e| {
            OutboxError::Broker(format!(
                "cannot connect to NATS at {}: {e} (check the URL and that nats-server runs)",
                cfg.url
            ))
        })?;
        let js = jetstream::new(client.clone());
        let stream = js.get_stream(&cfg.stream).await.map_err(|e| {
            OutboxError::Broker(format!(
                "stream {:?} not found: {e} (start the relay first, it creates the stream)",
                cfg.stream
            ))
        })?;
        let create_failed = |e: &dyn std::fmt::Display| {
            OutboxError::Broker(format!(
                "cannot create durable consumer {:?} on {:?}: {e}",
                cfg.durable, cfg.stream
            ))
        };
        let mut consumer = stream
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
            .map_err(|e| create_failed(&e))?;
        // A durable created by an older version (30 s) or with other settings keeps them unless
        // told: a create of an existing durable with a changed, editable config updates it.
        let existing = consumer.cached_info().config.clone();
        if existing.ack_wait != cfg.ack_wait || existing.max_ack_pending != cfg.max_ack_pending {
            tracing::info!(durable = %cfg.durable, from = ?existing.ack_wait, to = ?cfg.ack_wait,
                max_ack_pending = cfg.max_ack_pending, "updating the durable consumer's ack wait");
            let mut updated = <pull::Config as FromConsumer>::try_from_consumer_config(existing)
                .map_err(|e| create_failed(&e))?;
            updated.ack_wait = cfg.ack_wait;
            updated.max_ack_pending = cfg.max_ack_pending;
            consumer = stream
                .create_consumer(updated)
                .await
                .map_err(|e| create_failed(&e))?;
        }
        let messages = consumer.messages().await.map_err(|e| {
            OutboxError::Broker(format!("cannot start pulling from {:?}: {e}", cfg.durable))
        })?;
        let held = Arc::new(Held::default());
        let pending = Arc::new(AtomicU64::new(u64::MAX));
        let (tx, received) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(
            messages,
            tx,
            client.clone(),
            held.clone(),
            pending.clone(),
        ));
        // A message younger than this at a tick is at most `ack_wait - progress_every` old at
        // the next one: inside its ack wait, whatever the two settings.
        let young = cfg.ack_wait.saturating_sub(progress_every * 2);
        let keep_alive = tokio::spawn(keep_alive(client, held, progress_every, young));
        Ok(Self {
            consumer,
            received,
            pending,
            pump,
            keep_alive,
        })
    }
}

impl Drop for NatsSource {
    fn drop(&mut self) {
        // The messages still queued here are dropped with the receiver, each NAKed (below), so
        // another process gets them at once; those the runtime took were settled before it let
        // the source go.
        self.pump.abort();
        self.keep_alive.abort();
    }
}

/// The messages this process holds and has not settled: the reply subject (the message's
/// handle at the server) of each, and when it arrived, by a local number.
#[derive(Default)]
struct Held {
    next: AtomicU64,
    subjects: Mutex<HashMap<u64, (Subject, Instant)>>,
}

impl Held {
    fn register(&self, reply: Subject) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.subjects
            .lock()
            .expect("held lock")
            .insert(id, (reply, Instant::now()));
        id
    }

    fn forget(&self, id: u64) {
        self.subjects.lock().expect("held lock").remove(&id);
    }

    /// The messages held for at least `age`: only those need a progress acknowledgement now
    /// (a younger one is still inside its ack wait at the next tick), so a consumer that keeps
    /// up sends none.
    fn older_than(&self, age: Duration) -> Vec<Subject> {
        let now = Instant::now();
        self.subjects
            .lock()
            .expect("held lock")
            .values()
            .filter(|(_, at)| now.duration_since(*at) >= age)
            .map(|(s, _)| s.clone())
            .collect()
    }
}

/// Moves every message from the pull subscription into the source's queue, registering it as
/// held on arrival.
async fn pump(
    mut messages: pull::Stream,
    tx: mpsc::UnboundedSender<Result<Received>>,
    client: Client,
    held: Arc<Held>,
    pending: Arc<AtomicU64>,
) {
    while let Some(msg) = messages.next().await {
        let item = match msg {
            Ok(msg) => {
                if let Ok(info) = msg.info() {
                    pending.store(info.pending, Ordering::Relaxed);
                }
                Ok(received(msg, &client, &held))
            }
            Err(e) => Err(OutboxError::Broker(format!("pulling messages: {e}"))),
        };
        let failed = item.is_err();
        if tx.send(item).is_err() {
            return;
        }
        if failed {
            // The runtime waits a second after an error too: no flood of errors meanwhile.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn received(msg: jetstream::Message, client: &Client, held: &Arc<Held>) -> Received {
    // The reply subject is the message's handle at the server (acks and progress go there);
    // `split` would move it into an `Acker`, which cannot be shared with the keep-alive task.
    let m = msg.message;
    let reply = m.reply.clone();
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
    let id = reply.clone().map(|r| held.register(r)).unwrap_or(u64::MAX);
    Received {
        event,
        unreadable,
        acker: Box::new(NatsAck {
            client: client.clone(),
            reply,
            id,
            held: held.clone(),
        }),
    }
}

/// Sends a progress acknowledgement for every held message, every `every`, until aborted.
async fn keep_alive(client: Client, held: Arc<Held>, every: Duration, young: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A message settled between the snapshot and its `+WPI` gets a progress the server
        // ignores (acknowledged) or that defers its NAK delay to one `ack_wait` (NAKed): rare,
        // and only later, never lost.
        for reply in held.older_than(young) {
            // Fire and forget, like the acknowledgements: one lost costs at most a redelivery,
            // which the inbox drops as a duplicate.
            if client
                .publish(reply, AckKind::Progress.into())
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// Settles one message: an acknowledgement (or NAK) to its reply subject, after which it is no
/// longer kept alive. Dropped unsettled (the source's queue going away on stop), it is NAKed so
/// the server delivers it again at once.
struct NatsAck {
    client: Client,
    reply: Option<Subject>,
    id: u64,
    held: Arc<Held>,
}

impl NatsAck {
    async fn send(mut self: Box<Self>, kind: AckKind, what: &str) -> Result<()> {
        self.held.forget(self.id);
        let Some(reply) = self.reply.take() else {
            return Err(OutboxError::Broker(format!(
                "{what}: the message has no reply subject (not a JetStream delivery)"
            )));
        };
        self.client
            .publish(reply, kind.into())
            .await
            .map_err(|e| OutboxError::Broker(format!("{what}: {e}")))
    }
}

impl Drop for NatsAck {
    fn drop(&mut self) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        self.held.forget(self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            rt.spawn(async move {
                let _ = client.publish(reply, AckKind::Nak(None).into()).await;
            });
        }
    }
}

#[async_trait]
impl Acknowledger for NatsAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        // A plain ack: one lost on the way only causes a redelivery, which the inbox drops.
        self.send(AckKind::Ack, "ack").await
    }

    async fn retry_after(self: Box<Self>, delay: Duration) -> Result<()> {
        self.send(AckKind::Nak(Some(delay)), "nak").await
    }
}

#[async_trait]
impl EventSource for NatsSource {
    fn broker(&self) -> &'static str {
        "nats"
    }

    async fn next(&mut self) -> Result<Option<Received>> {
        // Cancel-safe: a message stays queued until received.
        self.received.recv().await.transpose()
    }

    async fn lag(&mut self) -> Option<u64> {
        match self.consumer.info().await {
            Ok(i) => Some(i.num_pending),
            Err(_) => match self.pending.load(Ordering::Relaxed) {
                u64::MAX => None,
                p => Some(p),
            },
        }
    }
}
