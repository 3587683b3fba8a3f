//! Benchmark of the relay against RabbitMQ on this machine (issue 4). Prints the drain rate of a
//! backlog through the relay and its ratio to a raw confirmed persistent publish of the same
//! messages, measured in the same run (goal: ratio >= 0.7).
//!
//! - **Raw baseline**: one lapin connection and channel in confirm mode, no database. It publishes
//!   exactly the messages the relay will publish (the outbox rows read with
//!   `outbox::pg::row_to_message`, the adapter's routing key `{topic}.{tenant}`, the adapter's own
//!   properties and headers from `AmqpPublisher::properties`, persistent, `mandatory`) in chunks of
//!   1000 with every confirm of a chunk in flight, as the relay's batches of 1000 do, and waits for
//!   every confirm (a nack or a return aborts the benchmark).
//! - **Relay drain**: `outbox::Relay` with `PgStore` and `AmqpPublisher` (batch size 1000), timed
//!   from its start until the broker holds the whole backlog: the depth of the relay's queue
//!   (passive `queue.declare`) reaches the backlog. Once with the default retention (rows kept as
//!   `published`) and once with retention zero (rows deleted at acknowledgement), each on a fresh
//!   database.
//!
//! Every destination is a unique durable topic exchange, declared as the adapter declares it (with
//! its alternate exchange), with a durable queue bound by `#`, so every message is routed and
//! stored; all of them are deleted at the end.
//!
//! `cargo run --release -p outbox-cli --example bench_amqp -- [backlog]` (default 100000);
//! `RUST_LOG=outbox::relay=debug` shows the relay's per-batch timings. RabbitMQ is taken from
//! `TEST_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use outbox::amqp::{AmqpConfig, AmqpPublisher};
use outbox::{OutboundMessage, PgStore, Relay, RelayConfig};
use testkit::TestDb;
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;
use support::{queue_depth as depth, quiet, write_backlog};

/// Chunk of the raw baseline: the relay's batch size.
const CHUNK: usize = 1000;

fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        outbox_cli::logging::init(outbox_cli::logging::LogFormat::Text);
    }
    let backlog: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    println!("machine: {} cores; backlog {backlog}", num_cpus());

    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable");
    let admin = conn.create_channel().await.unwrap();
    // Deletes every exchange and queue made here, also when the benchmark panics.
    let mut topology = Cleanup::default();

    // --- raw baseline --------------------------------------------------------------------
    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;
    quiet().await;
    // The very messages the relay will publish, read as the relay reads them.
    let msgs = support::backlog_messages(&db).await;
    let raw_dest = Dest::new(&mut topology);
    // The adapter declares the exchange (with its alternate exchange) exactly as the relay's
    // does, and provides the properties; its own channel is not used for the baseline.
    let adapter = AmqpPublisher::connect(raw_dest.config()).await.unwrap();
    raw_dest.bind(&admin).await;
    let raw = raw_publish(&conn, &adapter, &raw_dest, &msgs).await;
    let raw_depth = depth(&admin, &raw_dest.queue).await;
    assert_eq!(
        raw_depth as usize,
        msgs.len(),
        "the raw queue holds every message"
    );
    drop(adapter);
    drop(msgs);
    // Leave the broker as empty for the relay as it was for the baseline.
    purge(&admin, &raw_dest.queue).await;
    println!("raw RabbitMQ confirmed persistent publish : {raw:>9.0} msg/s");

    // --- relay drain, rows kept ----------------------------------------------------------
    let dest = Dest::new(&mut topology);
    let drained = drain(&db, &admin, &dest, backlog, None).await;
    println!(
        "relay drain, rows kept as published (default)   : {drained:>9.0} events/s   ratio {:.2} (goal >= 0.70)",
        drained / raw
    );
    // Published rows move to `outbox_published`; the view shows every event with its state.
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_event_all WHERE status = 'published'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(published, backlog, "every event recorded as published");
    drop(db);
    purge(&admin, &dest.queue).await;
    quiet().await;

    // --- relay drain, rows deleted at acknowledgement ------------------------------------
    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;
    quiet().await;
    let dest0 = Dest::new(&mut topology);
    let drained0 = drain(&db, &admin, &dest0, backlog, Some(Duration::ZERO)).await;
    println!(
        "relay drain, rows deleted at acknowledgement    : {drained0:>9.0} events/s   ratio {:.2} (goal >= 0.70)",
        drained0 / raw
    );
    drop(db);

    for d in [&raw_dest, &dest, &dest0] {
        let parked = depth(&admin, &d.unroutable()).await;
        assert_eq!(parked, 0, "no message went to the alternate exchange");
    }
    topology.run(&admin).await;
    let _ = conn.close(200, "bench done".into()).await;
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A unique exchange and the durable queue bound to it by `#`.
struct Dest {
    exchange: String,
    queue: String,
}

impl Dest {
    /// Names a destination and records it for deletion (nothing is declared yet).
    fn new(cleanup: &mut Cleanup) -> Self {
        let exchange = testkit::unique("bench-amqp");
        let queue = format!("{exchange}.all");
        let me = Self { exchange, queue };
        cleanup.queues.push(me.queue.clone());
        cleanup.queues.push(me.unroutable());
        cleanup.exchanges.push(me.exchange.clone());
        cleanup.exchanges.push(me.unroutable());
        me
    }

    fn unroutable(&self) -> String {
        format!("{}.unroutable", self.exchange)
    }

    /// The relay's configuration for this destination (defaults otherwise).
    fn config(&self) -> AmqpConfig {
        AmqpConfig {
            url: amqp_url(),
            exchange: self.exchange.clone(),
            alternate_exchange: Some(self.unroutable()),
            ..Default::default()
        }
    }

    /// Declares the durable queue and binds it by `#` (the exchange must exist).
    async fn bind(&self, admin: &Channel) {
        support::bind_all(admin, &self.exchange, &self.queue).await
    }
}

/// Publishes `msgs` as the adapter would, on a channel of its own in confirm mode, `CHUNK` confirms
/// in flight; msg/s.
async fn raw_publish(
    conn: &Connection,
    adapter: &AmqpPublisher,
    dest: &Dest,
    msgs: &[OutboundMessage],
) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let template = &adapter.config().routing_key_template;
    let t = Instant::now();
    for chunk in msgs.chunks(CHUNK) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for m in chunk {
            confirms.push(
                ch.basic_publish(
                    dest.exchange.as_str().into(),
                    m.render(template).into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.payload,
                    adapter.properties(m),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            match c.await.unwrap() {
                Confirmation::Ack(None) => {}
                other => panic!("raw publish not confirmed: {other:?}"),
            }
        }
    }
    let rate = msgs.len() as f64 / t.elapsed().as_secs_f64();
    let _ = ch.close(200, "raw done".into()).await;
    rate
}

/// Runs a relay over the backlog in `db` until the queue of `dest` holds `backlog` messages;
/// events/s.
async fn drain(
    db: &TestDb,
    admin: &Channel,
    dest: &Dest,
    backlog: i64,
    retention: Option<Duration>,
) -> f64 {
    let config = RelayConfig {
        relay_id: testkit::unique("bench"),
        batch_size: CHUNK as i64,
        retention,
        ..Default::default()
    };
    // Connecting declares the exchange; the queue is bound before any event is published.
    let publisher = AmqpPublisher::connect(dest.config()).await.unwrap();
    dest.bind(admin).await;
    let stop = CancellationToken::new();
    let t = Instant::now();
    let relay = Relay::new(
        Arc::new(PgStore::new(db.pool.clone())),
        Arc::new(publisher),
        config,
    )
    .unwrap();
    let s = stop.clone();
    let task = tokio::spawn(async move { relay.run(s).await });
    loop {
        if i64::from(depth(admin, &dest.queue).await) >= backlog {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = backlog as f64 / t.elapsed().as_secs_f64();
    stop.cancel();
    task.await.unwrap().unwrap();
    let n = depth(admin, &dest.queue).await;
    if i64::from(n) != backlog {
        println!("   note: the queue holds {n} messages for {backlog} events (duplicates)");
    }
    rate
}

/// Messages in `queue` (passive declare).
async fn purge(admin: &Channel, queue: &str) {
    admin
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .unwrap();
}

/// Queues and exchanges to delete: at the end of the run, or on drop if the run panicked.
#[derive(Default)]
struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    async fn run(&mut self, ch: &Channel) {
        for q in self.queues.drain(..) {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in self.exchanges.drain(..) {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.queues.is_empty() && self.exchanges.is_empty() {
            return;
        }
        let mut me = std::mem::take(self);
        // A runtime of its own: the benchmark's may be unwinding.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let Ok(c) =
                        Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                    else {
                        return;
                    };
                    if let Ok(ch) = c.create_channel().await {
                        me.run(&ch).await;
                    }
                    let _ = c.close(200, "bench cleanup".into()).await;
                })
        })
        .join();
    }
}
