//! JetStream atomic batch publish (nats-server 2.12 or later; ADR-50), opt-in: a hot aggregate's
//! run of events goes to the stream as one all-or-nothing batch instead of one broker round trip
//! per event.
//!
//! Why: the default adapter keeps one unacknowledged event per aggregate in flight
//! ([`crate::pipeline`]), which is what keeps an aggregate's order when the broker refuses or
//! loses a message; a backlog of one aggregate therefore drains at one round trip per event. An
//! atomic batch cannot be split by a refusal or a lost connection: the server stores all of its
//! messages or none, in the order of their `Nats-Batch-Sequence`, so a whole run may be in flight.
//!
//! The protocol, hand-written because async-nats 0.51 has no batch publisher: every message of a
//! batch carries `Nats-Batch-Id` (one id per batch, at most 64 characters) and
//! `Nats-Batch-Sequence` (1, 2, ...); the last one also `Nats-Batch-Commit: 1` and a reply
//! subject. The others are sent without a reply subject (the server answers nothing to them;
//! a gap makes the commit fail with "batch is incomplete"). The commit's answer is an ordinary
//! publish acknowledgement for the last message, or one error for the whole batch. Server limits:
//! 1,000 messages per batch, 50 open batches per stream, 10 s from first message to commit.
//!
//! Per aggregate one batch at a time; across aggregates up to [`BATCHES_IN_FLIGHT`] batches at
//! once. An aggregate with a single event in the relay's batch is sent as the default adapter
//! sends it (a batch of one buys nothing).
//!
//! A re-sent batch: inside a batch a `Nats-Msg-Id` the stream already holds rejects the whole
//! batch (error 10201). That is what happens when a commit was stored but its acknowledgement
//! was lost (connection cut, relay killed before it settled): the rows stay pending and the next
//! claim sends a batch whose first events are already in the stream. Any refusal of a batch that
//! is not an outage (a duplicate, a message too large, too many open batches, atomic publish
//! turned off on the stream, ...) is therefore answered by publishing that batch's events again
//! one by one in order, exactly as the default adapter does: the stored ones come back as
//! duplicates (the stream's de-duplication drops them), the others are stored after them, and a
//! per-message refusal is charged to the event at fault. Because a previous batch of the
//! aggregate was stored whole or not at all, the stored events are always a prefix of the run,
//! so the order holds. Nothing is lost, nothing is stored twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderValue;
use async_trait::async_trait;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::error::{OutboxError, Result};
use crate::nats::{NatsConfig, NatsPublisher};
use crate::publisher::{Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher};

/// Most messages in one atomic batch: nats-server's default limit (`max_batch_size`).
pub const MAX_BATCH: usize = 1000;

/// Most atomic batches of one relay open at once: below the server's default of 50 per stream,
/// leaving room for a second relay. A refusal for too many open batches is answered like any
/// other batch refusal (the batch's events are sent one by one).
pub const BATCHES_IN_FLIGHT: usize = 16;

/// The oldest nats-server with atomic batch publish.
pub const MIN_SERVER: (u64, u64) = (2, 12);

/// Publishes to a JetStream stream, a hot aggregate's run of events as atomic batches.
pub struct NatsBatchPublisher {
    inner: NatsPublisher,
    /// The connected server is 2.12 or later and the stream allows atomic publish, as of the last
    /// check; until then (or when not) everything is published as by the default adapter.
    ready: AtomicBool,
    /// A warning about a server that cannot take batches was logged since the last success.
    warned: AtomicBool,
}

/// `(major, minor)` of a nats-server version string (`2.12.8`, `v2.15.1-beta`).
pub fn server_version(v: &str) -> Option<(u64, u64)> {
    let mut it = v.trim_start_matches('v').split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

impl NatsBatchPublisher {
    /// Connects like [`NatsPublisher::connect`], then checks what batches need: a server of
    /// version 2.12 or later (from the server's INFO) and a stream with `allow_atomic`. A stream
    /// the relay may create (or has just created) without it gets it; an existing stream the relay
    /// must not change is refused. Fails at once, with what to do, when either is missing. A
    /// server not reachable yet is checked at the first publish; until a check passes the events
    /// are published as by the default adapter (one per aggregate in flight).
    pub async fn connect(cfg: NatsConfig, horizon: Duration) -> Result<Self> {
        let inner = NatsPublisher::connect(cfg, horizon).await?;
        let me = Self {
            inner,
            ready: AtomicBool::new(false),
            warned: AtomicBool::new(false),
        };
        if me.inner.is_connected() {
            me.check().await?;
        }
        Ok(me)
    }

    /// The underlying client (tests and benchmarks subscribe with it).
    pub fn client(&self) -> &async_nats::Client {
        self.inner.client()
    }

    /// Checks the server's version and the stream's `allow_atomic` (turning it on when the relay
    /// may create the stream); marks the publisher ready when both hold.
    pub async fn check(&self) -> Result<()> {
        let (js, cfg) = self.inner.parts();
        let info = self.inner.client().server_info();
        match server_version(&info.version) {
            Some(v) if v >= MIN_SERVER => {}
            _ => {
                self.ready.store(false, Ordering::Relaxed);
                return Err(OutboxError::Config(format!(
                    "the atomic batch mode needs nats-server {}.{} or later, but the server at {} is {:?}: \
                     upgrade the server, or turn the mode off (--nats-atomic-batch / OUTBOX_NATS_ATOMIC_BATCH)",
                    MIN_SERVER.0, MIN_SERVER.1, cfg.url, info.version
                )));
            }
        }
        let subject = format!("STREAM.INFO.{}", cfg.stream);
        let reply: serde_json::Value = js
            .request(subject, &())
            .await
            .map_err(|e| OutboxError::Broker(format!("cannot read stream {}: {e}", cfg.stream)))?;
        if let Some(e) = reply.get("error") {
            return Err(OutboxError::Broker(format!(
                "cannot read stream {}: {e}",
                cfg.stream
            )));
        }
        let Some(mut config) = reply.get("config").cloned() else {
            return Err(OutboxError::Broker(format!(
                "stream {} info has no config: {reply}",
                cfg.stream
            )));
        };
        if config.get("allow_atomic").and_then(|v| v.as_bool()) != Some(true) {
            if !cfg.create_stream {
                return Err(OutboxError::Config(format!(
                    "stream {} does not allow atomic batch publish, which the atomic batch mode needs: set \
                     allow_atomic: true in its configuration (nats-server 2.12+), allow the relay to create \
                     and adjust the stream, or turn the mode off",
                    cfg.stream
                )));
            }
            // The relay may create the stream: it may also turn on what its own mode needs. The
            // configuration is sent back as read, so that fields this client does not know stay.
            config["allow_atomic"] = serde_json::Value::Bool(true);
            let reply: serde_json::Value = js
                .request(format!("STREAM.UPDATE.{}", cfg.stream), &config)
                .await
                .map_err(|e| {
                    OutboxError::Broker(format!("cannot update stream {}: {e}", cfg.stream))
                })?;
            if let Some(e) = reply.get("error") {
                return Err(OutboxError::Config(format!(
                    "cannot turn on allow_atomic on stream {}: {e}; set it yourself or turn the atomic batch mode off",
                    cfg.stream
                )));
            }
            tracing::info!(stream = %cfg.stream, "turned on atomic batch publish (allow_atomic) on the stream");
        }
        self.ready.store(true, Ordering::Relaxed);
        self.warned.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Whether batches may be sent now: the last check passed and the server the client is
    /// connected to now (it may have failed over to another) is recent enough.
    async fn batches_possible(&self) -> bool {
        let now_ok = server_version(&self.inner.client().server_info().version)
            .is_some_and(|v| v >= MIN_SERVER);
        if self.ready.load(Ordering::Relaxed) && now_ok {
            return true;
        }
        match self.check().await {
            Ok(()) => true,
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "atomic batches not possible; publishing one event per aggregate in flight");
                }
                false
            }
        }
    }

    /// Sends `chunk` (events of one aggregate, in order) as one atomic batch. Returns one outcome
    /// per event.
    async fn send_batch(
        &self,
        chunk: &[OutboundMessage],
        deadline: Instant,
    ) -> Vec<Result<Delivery, PublishFailure>> {
        let (js, cfg) = self.inner.parts();
        let client = self.inner.client();
        let mut prepared = Vec::with_capacity(chunk.len());
        for m in chunk {
            let subject = m.render(&cfg.subject_template);
            match (
                self.inner.captured(&subject),
                NatsPublisher::headers_for(m, cfg.header_encoding),
            ) {
                (Ok(()), Ok(h)) => prepared.push((subject, h)),
                // One event's problem: the default path charges it to that event.
                _ => return self.inner.publish(chunk, deadline).await,
            }
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let all = |f: PublishFailure| chunk.iter().map(|_| Err(f.clone())).collect::<Vec<_>>();
        let n = chunk.len();
        let mut ack = None;
        for (k, ((subject, mut h), m)) in prepared.into_iter().zip(chunk).enumerate() {
            h.insert("Nats-Batch-Id", HeaderValue::from(id.as_str()));
            h.insert(
                "Nats-Batch-Sequence",
                HeaderValue::from((k + 1).to_string().as_str()),
            );
            if k + 1 < n {
                if let Err(e) = client
                    .publish_with_headers(subject, h, m.payload.clone())
                    .await
                {
                    return all(PublishFailure::new(
                        FailureKind::Unavailable,
                        "disconnected",
                        format!("atomic batch not sent: {e}"),
                    ));
                }
            } else {
                h.insert("Nats-Batch-Commit", HeaderValue::from("1"));
                let msg = PublishMessage::build()
                    .payload(m.payload.clone())
                    .headers(h);
                match js.send_publish(subject, msg).await {
                    Ok(a) => ack = Some(a),
                    Err(e) => {
                        return all(NatsPublisher::classify(client, &e));
                    }
                }
            }
        }
        let Some(ack) = ack else {
            return Vec::new();
        };
        match ack.await {
            Ok(_) => chunk.iter().map(|_| Ok(Delivery::Stored)).collect(),
            Err(e) => {
                let f = NatsPublisher::classify(client, &e);
                if f.kind == FailureKind::Unavailable {
                    // Not answered (or the broker refuses everything): the batch may or may not
                    // be stored; the rows stay pending and the next claim re-sends it.
                    return all(f);
                }
                tracing::warn!(error = %f.message, events = n, "atomic batch refused; publishing its events one by one");
                self.inner.publish(chunk, deadline).await
            }
        }
    }

    /// Publishes one aggregate's `chunks` in order, one batch at a time.
    async fn run_aggregate(
        &self,
        chunks: Vec<Vec<OutboundMessage>>,
        deadline: Instant,
        permits: &Semaphore,
        outage: &AtomicBool,
    ) -> Vec<Result<Delivery, PublishFailure>> {
        let mut out = Vec::new();
        let mut stop: Option<PublishFailure> = None;
        for chunk in chunks {
            if stop.is_none() && outage.load(Ordering::Relaxed) {
                stop = Some(PublishFailure::new(
                    FailureKind::Unavailable,
                    "disconnected",
                    "not sent: the broker became unavailable",
                ));
            }
            if stop.is_none() && Instant::now() >= deadline {
                stop = Some(PublishFailure::new(
                    FailureKind::LeaseExpired,
                    "lease",
                    "not sent: the relay's partition lease ran out before it could be sent",
                ));
            }
            if let Some(f) = &stop {
                out.extend(chunk.iter().map(|_| Err(f.clone())));
                continue;
            }
            let outcomes = {
                let _permit = permits.acquire().await.ok();
                self.send_batch(&chunk, deadline).await
            };
            if let Some(Err(f)) = outcomes.iter().find(|o| o.is_err()) {
                if f.kind == FailureKind::Unavailable {
                    outage.store(true, Ordering::Relaxed);
                }
                stop = Some(match f.kind {
                    FailureKind::Unavailable
                    | FailureKind::LeaseExpired
                    | FailureKind::RouteRefused => f.clone(),
                    _ => PublishFailure::new(
                        FailureKind::Retryable,
                        "held_back",
                        "not sent: an earlier event of its aggregate was not published",
                    ),
                });
            }
            out.extend(outcomes);
        }
        out
    }
}

#[async_trait]
impl Publisher for NatsBatchPublisher {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn is_connected(&self) -> bool {
        self.inner.client().connection_state() == State::Connected
    }

    fn route_template(&self) -> &str {
        self.inner.route_template()
    }

    async fn publish(
        &self,
        batch: &[OutboundMessage],
        deadline: Instant,
    ) -> Vec<Result<Delivery, PublishFailure>> {
        // Runs of two or more events of one aggregate go as batches; the rest as by default.
        let mut runs: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        let mut order = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            let run = runs.entry(m.aggregate_key()).or_default();
            if run.is_empty() {
                order.push(m.aggregate_key());
            }
            run.push(i);
        }
        if runs.values().all(|r| r.len() < 2) || !self.is_connected() {
            return self.inner.publish(batch, deadline).await;
        }
        if let Err(e) = self.inner.ensure_stream().await {
            tracing::error!(error = %e, "JetStream stream not usable");
            let f = PublishFailure::new(FailureKind::Unavailable, "stream", e.to_string());
            return batch.iter().map(|_| Err(f.clone())).collect();
        }
        if !self.batches_possible().await {
            return self.inner.publish(batch, deadline).await;
        }
        let mut singles = Vec::new();
        let mut single_msgs = Vec::new();
        let mut hot = Vec::new();
        for key in order {
            let run = &runs[&key];
            if run.len() == 1 {
                singles.push(run[0]);
                single_msgs.push(batch[run[0]].clone());
            } else {
                let chunks: Vec<Vec<OutboundMessage>> = run
                    .chunks(MAX_BATCH)
                    .map(|c| c.iter().map(|&i| batch[i].clone()).collect())
                    .collect();
                hot.push((run.clone(), chunks));
            }
        }
        let permits = Semaphore::new(BATCHES_IN_FLIGHT);
        let outage = AtomicBool::new(false);
        let (single_out, hot_out) = tokio::join!(
            async {
                if single_msgs.is_empty() {
                    Vec::new()
                } else {
                    self.inner.publish(&single_msgs, deadline).await
                }
            },
            futures::future::join_all(hot.into_iter().map(|(idx, chunks)| {
                let (permits, outage) = (&permits, &outage);
                async move {
                    (
                        idx,
                        self.run_aggregate(chunks, deadline, permits, outage).await,
                    )
                }
            }))
        );
        let mut out: Vec<Option<Result<Delivery, PublishFailure>>> = vec![None; batch.len()];
        for (i, o) in singles.into_iter().zip(single_out) {
            out[i] = Some(o);
        }
        for (idx, outcomes) in hot_out {
            for (i, o) in idx.into_iter().zip(outcomes) {
                out[i] = Some(o);
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(PublishFailure::new(
                        FailureKind::Unavailable,
                        "disconnected",
                        "not sent",
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::server_version;

    #[test]
    fn server_versions_parse() {
        assert_eq!(server_version("2.12.8"), Some((2, 12)));
        assert_eq!(server_version("v2.15.1-beta.2"), Some((2, 15)));
        assert_eq!(server_version("2.9.10"), Some((2, 9)));
        assert!(server_version("2.9.10") < Some((2, 12)));
        assert_eq!(server_version(""), None);
    }
}
