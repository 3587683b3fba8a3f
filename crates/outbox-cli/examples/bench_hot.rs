//! A hot aggregate (issue 20, goal 4): the relay's drain of a backlog of ONE aggregate and of 10
//! aggregates, against a spread backlog (5000 aggregates over 10 tenants, as in the other
//! benchmarks), each on a fresh database, all in one run:
//!
//! - nats-server 2.9 (the machine's, 127.0.0.1:4222) and RabbitMQ, default mode: one event per
//!   aggregate in flight, which is what keeps an aggregate's order under a refusal;
//! - the pinned nats-server 2.12 (`scripts/nats-server-versions`), one node on a free port, and a
//!   3-node cluster of it with an R3 stream: the default mode and the atomic batch mode
//!   (`--nats-atomic-batch`: a hot aggregate's run as one all-or-nothing JetStream batch).
//!
//! Prints events/s of each drain and its ratio to the default mode's spread drain on the same
//! server in the same run (goal for the batch mode: hot aggregate >= 0.5 of the spread backlog).
//!
//! `cargo run --release -p outbox-cli --example bench_hot -- [backlog] [parts]` (default 20000;
//! parts: comma-separated of `nats29,rabbitmq,nats212,cluster`, default all).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use lapin::options::QueueDeleteOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use outbox::amqp::{AmqpConfig, AmqpPublisher};
use outbox::nats::{NatsConfig, NatsPublisher};
use outbox::nats_batch::NatsBatchPublisher;
use outbox::{PgStore, Publisher, Relay, RelayConfig};
use testkit::nats_cluster::NatsCluster;
use testkit::nats_server::{pinned_server, PrivateNats};
use testkit::{TestDb, TestStream};
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;
use support::{queue_depth, quiet, write_backlog_over};

/// Aggregates of the spread backlog (as `support::write_backlog`).
const SPREAD: i64 = 5000;

fn relay_config() -> RelayConfig {
    RelayConfig {
        relay_id: testkit::unique("bench"),
        batch_size: 1000,
        ..Default::default()
    }
}

/// Runs `publisher`'s relay until `done` says the broker holds the backlog; events/s.
async fn run_relay<F, Fut>(db: &TestDb, publisher: Arc<dyn Publisher>, backlog: i64, done: F) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let stop = CancellationToken::new();
    let relay = Relay::new(
        Arc::new(PgStore::new(db.pool.clone())),
        publisher,
        relay_config(),
    )
    .unwrap();
    let t = Instant::now();
    let s = stop.clone();
    let task = tokio::spawn(async move { relay.run(s).await });
    while done().await < backlog {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = backlog as f64 / t.elapsed().as_secs_f64();
    stop.cancel();
    task.await.unwrap().unwrap();
    rate
}

/// One drain to JetStream at `url`: a fresh database with the backlog shape, a fresh stream.
async fn drain_nats(
    url: &str,
    replicas: Option<usize>,
    batch: bool,
    backlog: i64,
    aggs: i64,
) -> f64 {
    let db = TestDb::new().await;
    write_backlog_over(&db, backlog, aggs).await;
    quiet().await;
    let stream = TestStream::new();
    let cfg = NatsConfig {
        url: url.to_string(),
        replicas,
        ..stream.nats_config()
    };
    let horizon = relay_config().dedup_horizon(cfg.ack_timeout);
    let publisher: Arc<dyn Publisher> = if batch {
        Arc::new(NatsBatchPublisher::connect(cfg, horizon).await.unwrap())
    } else {
        Arc::new(NatsPublisher::connect(cfg, horizon).await.unwrap())
    };
    let client = async_nats::connect(
        url.split(',')
            .map(|u| u.parse::<async_nats::ServerAddr>().unwrap())
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let js = jetstream::new(client);
    let mut s = js.get_stream(&stream.name).await.unwrap();
    let s = &mut s;
    let s = tokio::sync::Mutex::new(s);
    let rate = run_relay(&db, publisher, backlog, || async {
        s.lock()
            .await
            .info()
            .await
            .map(|i| i.state.messages as i64)
            .unwrap_or(0)
    })
    .await;
    let _ = js.delete_stream(&stream.name).await;
    rate
}

fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// One drain to RabbitMQ: a fresh database, a fresh exchange with one durable queue bound by `#`.
async fn drain_rabbit(admin: &Channel, backlog: i64, aggs: i64) -> f64 {
    let db = TestDb::new().await;
    write_backlog_over(&db, backlog, aggs).await;
    quiet().await;
    let exchange = testkit::unique("bench-hot");
    let queue = format!("{exchange}.all");
    let cfg = AmqpConfig {
        url: amqp_url(),
        exchange: exchange.clone(),
        ..Default::default()
    };
    let publisher = AmqpPublisher::connect(cfg).await.unwrap();
    support::bind_all(admin, &exchange, &queue).await;
    let rate = run_relay(&db, Arc::new(publisher), backlog, || async {
        i64::from(queue_depth(admin, &queue).await)
    })
    .await;
    let _ = admin
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = admin
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    rate
}

fn line(what: &str, rate: f64, spread: f64) {
    println!(
        "  {what:<44} {rate:>8.0} events/s   {:>5.2} of the spread drain",
        rate / spread
    );
}

/// The shapes on one JetStream server: default mode spread, 10, 1 aggregate(s); then the batch
/// mode when the server has it.
async fn nats_part(label: &str, url: &str, replicas: Option<usize>, batch: bool, backlog: i64) {
    println!("{label}");
    let spread = drain_nats(url, replicas, false, backlog, SPREAD).await;
    line("default, spread (5000 aggregates)", spread, spread);
    line(
        "default, 10 aggregates",
        drain_nats(url, replicas, false, backlog, 10).await,
        spread,
    );
    line(
        "default, 1 aggregate",
        drain_nats(url, replicas, false, backlog, 1).await,
        spread,
    );
    if batch {
        line(
            "atomic batch, spread (5000 aggregates)",
            drain_nats(url, replicas, true, backlog, SPREAD).await,
            spread,
        );
        line(
            "atomic batch, 10 aggregates",
            drain_nats(url, replicas, true, backlog, 10).await,
            spread,
        );
        line(
            "atomic batch, 1 aggregate (goal >= 0.5)",
            drain_nats(url, replicas, true, backlog, 1).await,
            spread,
        );
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let backlog: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let parts = args
        .next()
        .unwrap_or_else(|| "nats29,rabbitmq,nats212,cluster".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("backlog {backlog} per drain, relay batch size 1000, {cores} cores (shared, noisy)");
    if parts.contains("nats29") {
        let v = async_nats::connect(testkit::nats_url())
            .await
            .unwrap()
            .server_info()
            .version;
        nats_part(
            &format!("nats-server {v} (the machine's), R1"),
            &testkit::nats_url(),
            None,
            false,
            backlog,
        )
        .await;
    }
    if parts.contains("rabbitmq") {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ reachable");
        let admin = conn.create_channel().await.unwrap();
        println!("RabbitMQ, one durable classic queue");
        let spread = drain_rabbit(&admin, backlog, SPREAD).await;
        line("default, spread (5000 aggregates)", spread, spread);
        line(
            "default, 10 aggregates",
            drain_rabbit(&admin, backlog, 10).await,
            spread,
        );
        line(
            "default, 1 aggregate",
            drain_rabbit(&admin, backlog, 1).await,
            spread,
        );
        let _ = conn.close(200, "bench done".into()).await;
    }
    let (version, bin) = pinned_server("2.12");
    if parts.contains("nats212") {
        let server = PrivateNats::start_with(&bin).await;
        nats_part(
            &format!("nats-server {version}, one node, R1"),
            &server.url(),
            None,
            true,
            backlog,
        )
        .await;
    }
    if parts.contains("cluster") {
        let cluster = NatsCluster::start_with(&bin).await;
        nats_part(
            &format!("nats-server {version}, 3-node cluster on loopback, R3"),
            &cluster.urls(),
            Some(3),
            true,
            backlog,
        )
        .await;
    }
}
