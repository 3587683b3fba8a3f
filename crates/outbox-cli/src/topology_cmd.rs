//! `outbox rabbitmq-topology`: declares a subscriber's queue with its dead-letter queue (the
//! seed's DLQs), bound to the events exchange by routing patterns.
//!
//! The relay only owns the exchange; queues belong to consumers. This command is for operators
//! and deployment scripts that want the seed's layout without writing AMQP code: a durable queue
//! bound by each pattern, whose rejected (`requeue=false`) or expired messages go to a fanout
//! dead-letter exchange and on to a durable dead-letter queue. It is idempotent.

use clap::Args;

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
    /// Exchange and connection settings (the relay's).
    #[command(flatten)]
    pub amqp: AmqpArgs,
}

/// Declares the topology `args` describe and prints what it declared.
pub async fn run(args: &TopologyArgs) -> anyhow::Result<()> {
    let dlx = args.dead_letter_exchange.replace("{queue}", &args.queue);
    let dlq = args.dead_letter_queue.replace("{queue}", &args.queue);
    let cfg = args.amqp.config();
    outbox::amqp::declare_consumer_queue(&cfg, &args.queue, &args.bindings, &dlx, &dlq).await?;
    println!(
        "queue {} bound to exchange {} by {}; dead letters go to exchange {} and queue {}",
        args.queue,
        cfg.exchange,
        args.bindings.join(", "),
        dlx,
        dlq
    );
    Ok(())
}
