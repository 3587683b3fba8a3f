//! Transactional outbox for PostgreSQL.
//!
//! Business changes and the events that describe them commit in one transaction
//! ([`Outbox::enqueue`] takes the caller's open transaction); a [`relay::Relay`] delivers every
//! committed event to a broker through a [`publisher::Publisher`], at least once and in commit order
//! per aggregate.
//!
//! The crate knows nothing of any particular broker: adapters live behind cargo features
//! (`nats` for JetStream). See `docs/architecture.md` for the invariants and how each is kept.

#[cfg(feature = "rabbitmq")]
pub mod amqp;
#[cfg(feature = "rabbitmq")]
pub mod amqp_topology;
pub mod enqueue;
pub mod envelope;
pub mod error;
#[cfg(feature = "nats")]
pub mod nats;
pub mod ops;
pub mod pg;
pub mod pipeline;
pub mod publisher;
pub mod relay;
pub mod retry;
pub mod schema;
pub mod store;
pub mod telemetry;
pub mod wake;

pub use enqueue::Outbox;
pub use envelope::{Envelope, NewEvent};
pub use error::OutboxError;
pub use pg::PgStore;
pub use publisher::{Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher};
pub use relay::{Relay, RelayConfig};
pub use retry::RetryPolicy;
