//! `outbox rabbitmq-topology`: declares a subscriber's queue with its dead-letter queue (the
//! seed's DLQs), bound to the events exchange by routing patterns.
//!
//! The relay only owns the exchange; queues belong to consumers. This command is for operators
//! and deployment scripts that want the seed's layout without writing AMQP code: a durable queue
//! bound by each pattern, whose rejected (`requeue=false`) or expired messages go to a fanout
//! dead-letter exchange and on to a durable dead-letter queue. It is idempotent.
//!
//! Queues are quorum queues unless `--queue-type classic` is given (see
//! `outbox::amqp_topology` for why, and for the delivery limit).

use clap::{Args, ValueEnum};
use outbox::amqp_topology::{ConsumerQueue, QueueType};

use crate::args::AmqpArgs;

/// Flags of `outbox rabbitmq-topology`.
#[derive(Debug, Clone, Args)]
pub struct TopologyArgs {
    /// Queue to declare.
    #[arg(long)]
    pub queue: String,
    /// Routing pattern binding the queue to the exchange (repeatable), e.g.
    /// `inventory.stock.*.*` (every tenant) or `inventory.reservation.#`.
    #[arg(long = "binding", required = true, num_args = 1..)]
    pub bindings: Vec<String>,
    /// Dead-letter exchange ({queue} is the queue's name).
    #[arg(long, default_value = "{queue}.dlx")]
    pub dead_letter_exchange: String,
    /// Dead-letter queue ({queue} is the queue's name).
    #[arg(long, default_value = "{queue}.dlq")]
    pub dead_letter_queue: String,
    /// Queue type of the queue and its dead-letter queue: quorum (replicated, delivery limit) or
    /// classic. An existing queue must be declared with its own type.
    #[arg(
        long,
        env = "OUTBOX_AMQP_QUEUE_TYPE",
        value_enum,
        default_value = "quorum"
    )]
    pub queue_type: QueueTypeArg,
    /// Deliveries after which a quorum queue dead-letters a message its consumers keep handing
    /// back (`x-delivery-limit`; RabbitMQ 4's default is 20); 0: no limit. Quorum queues only.
    #[arg(long, env = "OUTBOX_AMQP_DELIVERY_LIMIT", default_value_t = 20)]
    pub delivery_limit: u32,
    /// Exchange and connection settings (the relay's).
    #[command(flatten)]
    pub amqp: AmqpArgs,
}

/// `--queue-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueueTypeArg {
    /// Quorum queue (replicated, with a delivery limit).
    Quorum,
    /// Classic durable queue.
    Classic,
}

/// Declares the topology `args` describe and prints what it declared.
pub async fn run(args: &TopologyArgs) -> anyhow::Result<()> {
    let q = ConsumerQueue {
        queue: args.queue.clone(),
        bindings: args.bindings.clone(),
        dead_letter_exchange: args.dead_letter_exchange.replace("{queue}", &args.queue),
        dead_letter_queue: args.dead_letter_queue.replace("{queue}", &args.queue),
        queue_type: match args.queue_type {
            QueueTypeArg::Quorum => QueueType::Quorum,
            QueueTypeArg::Classic => QueueType::Classic,
        },
        delivery_limit: (args.delivery_limit > 0).then_some(args.delivery_limit),
    };
    let cfg = args.amqp.config();
    outbox::amqp_topology::declare(&cfg, &q).await?;
    let limit = match (q.queue_type, q.delivery_limit) {
        (QueueType::Quorum, Some(n)) => format!(", delivery limit {n}"),
        _ => String::new(),
    };
    println!(
        "{} queue {} bound to exchange {} by {}{limit}; dead letters go to exchange {} and queue {}",
        q.queue_type.as_str(),
        q.queue,
        cfg.exchange,
        q.bindings.join(", "),
        q.dead_letter_exchange,
        q.dead_letter_queue
    );
    Ok(())
}
