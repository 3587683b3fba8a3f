//! The one interface between the relay and a broker.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// The row header (in `outbox_event.headers`) that makes a row a skip marker: the place of a
/// dead letter an operator purged, published in its aggregate's order as `Outbox-Skip` so that
/// consumers move past it instead of waiting for it for ever (`outbox dead-letters purge`).
pub const SKIP_HEADER: &str = "outboxSkip";

/// A committed event on its way to the broker.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    /// Row id in `outbox_event`.
    pub id: i64,
    /// The envelope's `eventId`: the broker message id.
    pub event_id: Uuid,
    /// Tenant; part of the subject / routing key.
    pub tenant_id: String,
    /// Aggregate kind.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Position of the event in its aggregate (1, 2, ...), in commit order, within its epoch.
    pub seq: i64,
    /// Partition of the aggregate (the unit of relay ownership): settlements are fenced by it.
    pub partition: i16,
    /// Sequence epoch of the aggregate (column `seq_epoch`): 0 for aggregates older than the
    /// table-contract migration, else the row id of the first event of this incarnation of the
    /// aggregate. When an idle aggregate's sequence row is compacted away, its next event starts a
    /// new epoch at seq 1: consumers order by (`seq_epoch`, `seq`).
    pub seq_epoch: i64,
    /// Event type.
    pub event_type: String,
    /// Routing key written by the producer.
    pub topic: String,
    /// The exact bytes the producer's transaction wrote.
    pub payload: Bytes,
    /// `correlationId`, `traceparent`, `contentType` as written at enqueue.
    pub headers: BTreeMap<String, String>,
    /// Failed publish attempts so far.
    pub attempts: i32,
    /// When the row was written (close to its commit).
    pub created_at: DateTime<Utc>,
    /// The identity of the outbox database it comes from (`Outbox-Producer-Id`): an aggregate's
    /// sequence is only meaningful within one database, so consumers key positions by it.
    pub producer_id: Option<Uuid>,
}

impl OutboundMessage {
    /// Renders a subject / routing-key template: `{tenant}`, `{topic}`, `{event_type}`,
    /// `{aggregate_type}`.
    pub fn render(&self, template: &str) -> String {
        // One pass and one allocation: this runs once or twice per event on the relay's hot path,
        // where four chained `str::replace` calls (a string each) showed in the drain's profile
        // (docs/benchmarks.md, issue 20). Values are put in as they are, never searched for
        // placeholders themselves.
        let mut out =
            String::with_capacity(template.len() + self.tenant_id.len() + self.topic.len());
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let tail = &rest[open..];
            let (value, len) = if tail.starts_with("{tenant}") {
                (self.tenant_id.as_str(), "{tenant}".len())
            } else if tail.starts_with("{topic}") {
                (self.topic.as_str(), "{topic}".len())
            } else if tail.starts_with("{event_type}") {
                (self.event_type.as_str(), "{event_type}".len())
            } else if tail.starts_with("{aggregate_type}") {
                (self.aggregate_type.as_str(), "{aggregate_type}".len())
            } else {
                ("{", 1)
            };
            out.push_str(value);
            rest = &tail[len..];
        }
        out.push_str(rest);
        out
    }

    /// The aggregate this event belongs to: the unit of ordering.
    pub fn aggregate_key(&self) -> (&str, &str, &str) {
        (&self.tenant_id, &self.aggregate_type, &self.aggregate_id)
    }

    /// A header written at enqueue, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What the broker said of a message it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Stored by the broker.
    Stored,
    /// The broker already had this message id and dropped the copy.
    Duplicate,
}

/// How a failure is handled by the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The broker cannot be reached: the event is not at fault, its attempt budget is not used,
    /// and the relay backs off as a whole.
    Unavailable,
    /// The broker refused this message for a reason that may pass: retried with backoff, then
    /// dead-lettered when the attempt budget is spent.
    Retryable,
    /// Retrying cannot help (too large, no stream for the subject): dead-lettered at once.
    Permanent,
    /// Not sent because the relay's partition lease ran out first: neither the broker's fault nor
    /// the event's. No attempt is spent; the relay renews its lease before claiming again.
    LeaseExpired,
    /// The broker refused this message because of where it goes, not what it is: one queue
    /// bound to its routing key is full (`x-overflow: reject-publish`), or one JetStream subject
    /// is at its limit (`discard_new_per_subject`). An outage of that route only: no attempt is
    /// spent, and the relay holds back what goes to the route (the message rendered with
    /// [`Publisher::route_template`]) for a back-off while the other routes flow.
    RouteRefused,
}

/// A message the broker did not acknowledge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFailure {
    /// How the relay treats it.
    pub kind: FailureKind,
    /// A short fixed label for metrics (`timeout`, `too_large`, ...).
    pub reason: &'static str,
    /// The broker's or client's words, kept as the row's `last_error`.
    pub message: String,
}

impl PublishFailure {
    /// A failure of the given kind.
    pub fn new(kind: FailureKind, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            reason,
            message: message.into(),
        }
    }
}

/// A broker adapter. Implementations publish a batch with many acknowledgements in flight and
/// report one outcome per message, in the batch's order. Adapters send through
/// [`crate::pipeline::run`], which keeps at most one unacknowledged message per aggregate in
/// flight (see its doc for why), unless they say [`Publisher::ordered_in_flight_per_key`].
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Short name for logs and metrics (`nats`, `rabbitmq`).
    fn name(&self) -> &'static str;

    /// Publishes `batch`. Messages of one aggregate appear in the batch in commit order and must
    /// reach the broker in that order. Nothing may be *sent* at or after `deadline` (the end of
    /// the relay's partition lease): what is not sent by then is reported `LeaseExpired`.
    /// Returns exactly `batch.len()` outcomes.
    async fn publish(
        &self,
        batch: &[OutboundMessage],
        deadline: tokio::time::Instant,
    ) -> Vec<Result<Delivery, PublishFailure>>;

    /// Whether the broker connection is up right now (health endpoints, metrics).
    fn is_connected(&self) -> bool;

    /// The template ([`OutboundMessage::render`]) of the subject or routing key a message is
    /// published with: its *route*. A [`FailureKind::RouteRefused`] failure holds back every
    /// message with the same rendered route.
    fn route_template(&self) -> &str {
        "{topic}.{tenant}"
    }

    /// Whether the broker and its client keep the messages of one key (one aggregate) in order
    /// with several in flight, through retries and reconnects (Kafka's idempotent producer: one
    /// partition per key, sequence numbers per partition). Then the adapter sends through
    /// [`crate::pipeline::run_with`] with more than one unacknowledged event per aggregate, and a
    /// hot aggregate is not held to one round trip per event. `false` (one in flight per
    /// aggregate) unless the adapter proves otherwise.
    fn ordered_in_flight_per_key(&self) -> bool {
        false
    }
}

/// An event of aggregate `agg` at row `id` (seq = id) with `attempts` failures, for unit tests.
#[cfg(test)]
pub(crate) fn test_message(id: i64, agg: &str, attempts: i32) -> OutboundMessage {
    OutboundMessage {
        producer_id: None,
        id,
        event_id: Uuid::now_v7(),
        tenant_id: "t".into(),
        aggregate_type: "A".into(),
        aggregate_id: agg.into(),
        seq: id,
        partition: 0,
        seq_epoch: 0,
        event_type: "E".into(),
        topic: "x".into(),
        payload: Bytes::new(),
        headers: Default::default(),
        attempts,
        created_at: Utc::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_fills_every_placeholder_and_keeps_other_text() {
        let mut m = test_message(1, "a", 0);
        m.tenant_id = "acme".into();
        m.topic = "stock.changed".into();
        m.event_type = "StockChanged".into();
        m.aggregate_type = "Variant".into();
        assert_eq!(
            m.render("outbox.{tenant}.{topic}"),
            "outbox.acme.stock.changed"
        );
        assert_eq!(
            m.render("{aggregate_type}/{event_type}/{tenant}/{topic}/{tenant}"),
            "Variant/StockChanged/acme/stock.changed/acme"
        );
        // Unknown placeholders and lone braces stay as written.
        assert_eq!(m.render("a.{other}.{tenant}{"), "a.{other}.acme{");
        assert_eq!(m.render("plain"), "plain");
        assert_eq!(m.render(""), "");
    }
}
