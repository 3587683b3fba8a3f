//! Transactional outbox for PostgreSQL.
//!
//! Business changes and the events that describe them commit in one transaction
//! ([`Outbox::enqueue`] takes the caller's open transaction); a [`relay::Relay`] delivers every
//! committed event to a broker through a [`publisher::Publisher`], at least once and in commit order
//! per aggregate.
//!
//! The crate knows nothing of any particular broker: adapters live behind cargo features
//! (`nats` for JetStream, `rabbitmq` for RabbitMQ). The folders show the architecture:
//! [`storage`] (the store trait, its PostgreSQL implementation, the migrations), [`publishers`]
//! (the publisher trait and one module per broker), [`relay`] (the engine, its retry policy and
//! wake-ups), [`consumers`] (the inbox runtime that applies events exactly once, in order). See `docs/architecture.md` for the invariants and how each is kept.

pub mod console;
pub mod consumers;
pub mod enqueue;
pub mod envelope;
pub mod error;
pub mod ops;
pub mod publishers;
pub mod relay;
pub mod storage;
pub mod telemetry;

// The modules' historical flat paths (`outbox::pg`, `outbox::nats`, ...) stay valid so that code
// written against them needs no change.
#[cfg(feature = "nats")]
pub use publishers::nats;
#[cfg(feature = "nats")]
pub use publishers::nats_batch;
#[cfg(feature = "rabbitmq")]
pub use publishers::{amqp, amqp_topology};
pub use publishers::{meta, pipeline, publisher};
pub use relay::{retry, wake};
pub use storage::{pg, schema, store};

pub use enqueue::{Outbox, PreparedEvents};
pub use envelope::{Envelope, NewEvent};
pub use error::OutboxError;
pub use pg::PgStore;
pub use publisher::{Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher};
pub use relay::{Relay, RelayConfig};
pub use retry::RetryPolicy;
