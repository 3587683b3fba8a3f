//! The consumer runtime: the other half of the outbox. Applies each event exactly once, in order
//! per aggregate, from JetStream or RabbitMQ.
//!
//! - [`runtime::Consumer`] runs the application's [`runtime::Handler`] inside a transaction of the
//!   consumer's own database together with the [`inbox`] record; the message is acknowledged only
//!   after that commit. A redelivery or a duplicate (same `eventId`, or an `Outbox-Seq` at or below
//!   the aggregate's applied position) is acknowledged without running the handler.
//! - Order: events of one aggregate (`Outbox-Tenant-Id`, `-Aggregate-Type`, `-Aggregate-Id`) are
//!   handled one at a time in (`Outbox-Seq-Epoch`, `Outbox-Seq`) order in their aggregate's lane;
//!   `concurrency` workers each own the lanes they took and apply up to `batch_size` of their
//!   events in one transaction (a batch in which a handler fails is rolled back and applied
//!   again one event per transaction). An event that arrives
//!   before its predecessor is applied is sent back (retried after `gap_retry`) and parked with
//!   reason `gap` after `gap_timeout` (metric `outbox_consumer_parked_total{reason="gap"}`: alert on it).
//! - Failures: a handler error rolls the transaction back and the event is retried with an
//!   exponential delay (counted in `outbox_consumer_attempt`, so the budget survives restarts and
//!   needs no broker counter); after `max_attempts` it is parked in
//!   `outbox_consumer_dead_letter`, and the later events of its aggregate are parked behind it
//!   (reason `held`) as they arrive. `outbox consumer-dead-letters replay` asks the running
//!   consumer to apply them again, in order ([`dead_letters`]).
//! - Bounded growth: one position row per aggregate; event ids only for events without a sequence,
//!   deleted after `seen_retention` (default 7 days) in batches of 1,000, every 10 minutes, by the
//!   running consumer.
//! - Events without `Outbox-Seq` (producers other than this library) are de-duplicated by `eventId`
//!   only, within `seen_retention`, and are **not** ordered: they are handled in arrival order per
//!   worker, and a retried one may be overtaken by later ones.
//!
//! Brokers are adapters behind one small trait ([`source::EventSource`]): [`nats`] (feature
//! `nats`), [`amqp`] (feature `rabbitmq`), `redis` (feature `redis`) and `kafka` (feature `kafka`).

#[cfg(feature = "rabbitmq")]
pub mod amqp;
pub mod dead_letters;
pub mod event;
mod inbox;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
pub mod runtime;
pub mod source;

pub use event::{AggregateKey, InboundEvent, Position};
pub use runtime::{Consumer, ConsumerConfig, ConsumerHealth, Handler, HandlerError, StartPolicy};
pub use source::{Acknowledger, EventSource, Received};
