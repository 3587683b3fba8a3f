//! How events leave: the [`publisher::Publisher`] trait the relay engine talks to, the
//! per-aggregate [`pipeline`] the adapters share, and one module per broker behind its cargo
//! feature (`nats` for JetStream, `rabbitmq` for RabbitMQ, `redis` for Redis Streams, `kafka` for
//! Kafka).

#[cfg(feature = "rabbitmq")]
pub mod amqp;
#[cfg(feature = "rabbitmq")]
pub mod amqp_topology;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod meta;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "nats")]
pub mod nats_batch;
pub mod pipeline;
pub mod publisher;
#[cfg(feature = "redis")]
pub mod redis;
