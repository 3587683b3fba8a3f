//! The small trait a broker adapter implements to feed the consumer runtime: a stream of
//! messages, each with its acknowledgement handle.

use std::time::Duration;

use async_trait::async_trait;

use super::event::{InboundEvent, Unreadable};
use crate::error::Result;

/// Settles one delivered message with its broker.
#[async_trait]
pub trait Acknowledger: Send + 'static {
    /// The message is done (applied, a duplicate, or parked in the dead-letter table): the broker
    /// may forget it.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// Deliver the message again after `delay` (JetStream: NAK with delay; RabbitMQ: requeue once
    /// the delay has passed, the message counting against the prefetch meanwhile).
    async fn retry_after(self: Box<Self>, delay: Duration) -> Result<()>;
}

/// One message from a source: the event (or why it cannot be read) and how to settle it.
pub struct Received {
    /// The event; for a message that is not one, its parts under a random event id.
    pub event: InboundEvent,
    /// Why the message cannot be handled as an event (it is then parked as `unreadable`).
    pub unreadable: Option<Unreadable>,
    /// Settles the message.
    pub acker: Box<dyn Acknowledger>,
}

/// A broker subscription delivering at least once with explicit acknowledgements.
#[async_trait]
pub trait EventSource: Send + 'static {
    /// Name of the broker, for metrics and logs.
    fn broker(&self) -> &'static str;
    /// The next message; `Ok(None)` when the subscription ended. Must be cancel-safe: the runtime
    /// drops the future on shutdown and to sample lag.
    async fn next(&mut self) -> Result<Option<Received>>;
    /// Messages waiting at the broker for this consumer, when the broker says (the lag).
    async fn lag(&mut self) -> Option<u64>;
}
