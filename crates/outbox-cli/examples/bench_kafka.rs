//! Benchmark of the relay against Kafka (issue 22): a private tansu broker (memory storage, the
//! one the tests use) on a free port. Prints the drain rate of a backlog through the relay and its
//! ratio to a raw idempotent `acks=all` produce of the same records, measured in the same run.
//!
//! - **Raw baseline**: one rdkafka `FutureProducer` with the adapter's settings (idempotent,
//!   `acks=all`), no database. It produces exactly the records the relay will produce (the outbox
//!   rows read with `outbox::pg::row_to_message`, the adapter's key and headers) with every
//!   delivery of a chunk of 1000 in flight, as the relay's batches of 1000 are, and waits for each.
//! - **Relay drain**: `outbox::Relay` with `PgStore` and `KafkaPublisher` (batch size 1000),
//!   timed from its start until every row is marked published (each only after its broker
//!   acknowledgement), rows kept (default retention). tansu's high watermarks lag behind what it
//!   stores, so the topic is not counted; the tests read topics back in full.
//!
//! `cargo run --release -p outbox-cli --example bench_kafka -- [backlog]` (default 100000).
//! Needs tansu (`scripts/ensure-services.sh` installs it; `TANSU_BIN` overrides).
//!
//! `BENCH_ONLY=headers` measures the compact encoding instead (issue 20 goal 3 on Kafka):
//! `BENCH_PAIRS` pairs (default 3) of drains with full and with compact record headers (each
//! drain a fresh backlog and topic, the order alternating), with the CPU time per event of this
//! process (the relay), the database's backends and tansu.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::FutureExt;
use outbox::meta::HeaderEncoding;
use outbox::publishers::kafka::{self, KafkaConfig, KafkaPublisher};
use outbox::{PgStore, Relay, RelayConfig};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use testkit::tansu::Tansu;
use testkit::TestDb;
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;
use support::{quiet, write_backlog};

const CHUNK: usize = 1000;
const PARTITIONS: i32 = 8;

#[tokio::main]
async fn main() {
    let backlog: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("machine: {cores} cores; backlog {backlog}; broker: tansu (memory storage)");
    let broker = Tansu::start().await;
    if std::env::var("BENCH_ONLY").as_deref() == Ok("headers") {
        let pid = broker.pid().expect("tansu runs");
        support::header_pairs(
            backlog,
            support::env_or("BENCH_PAIRS", 3),
            "tansu",
            pid,
            || async {}.boxed(),
            |db, compact| {
                let cfg = KafkaConfig {
                    header_encoding: if compact {
                        HeaderEncoding::Compact
                    } else {
                        HeaderEncoding::Full
                    },
                    ..config(&broker, &testkit::unique("bench_headers"))
                };
                async move { relay_drain(db, cfg, backlog).await }.boxed()
            },
        )
        .await;
        return;
    }

    // --- raw baseline --------------------------------------------------------------------
    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;
    quiet().await;
    let msgs = support::backlog_messages(&db).await;
    let raw_topic = testkit::unique("bench_raw");
    // The adapter creates the topic as it would for the relay; its producer is not used.
    let adapter = KafkaPublisher::connect(config(&broker, &raw_topic))
        .await
        .unwrap();
    let warm = vec![msgs[0].clone()];
    let far = tokio::time::Instant::now() + Duration::from_secs(60);
    use outbox::Publisher;
    assert!(adapter.publish(&warm, far).await[0].is_ok());
    drop(adapter);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    let t = Instant::now();
    for chunk in msgs.chunks(CHUNK) {
        let keys: Vec<String> = chunk.iter().map(kafka::key).collect();
        let futs = chunk.iter().zip(&keys).map(|(m, k)| {
            producer
                .send_result(
                    FutureRecord::to(&raw_topic)
                        .key(k)
                        .payload(m.payload.as_ref())
                        .headers(kafka::headers(m)),
                )
                .map_err(|(e, _)| e)
                .expect("queued")
        });
        for r in join_all(futs).await {
            r.expect("delivered").expect("acknowledged");
        }
    }
    let raw = msgs.len() as f64 / t.elapsed().as_secs_f64();
    drop(producer);
    println!("raw rdkafka idempotent acks=all produce : {raw:>9.0} msg/s");
    drop(msgs);
    drop(db);
    quiet().await;

    // --- relay drain ---------------------------------------------------------------------
    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;
    quiet().await;
    let topic = testkit::unique("bench_relay");
    let drained = relay_drain(&db, config(&broker, &topic), backlog).await;
    println!(
        "relay drain, rows kept as published      : {drained:>9.0} events/s   ratio {:.2}",
        drained / raw
    );
}

fn config(broker: &Tansu, topic: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: broker.brokers(),
        topic_template: topic.into(),
        partitions: PARTITIONS,
        ..Default::default()
    }
}

/// Runs a relay with the adapter settings `cfg` over the backlog of `db` until every row is
/// published (rows kept); events/s.
async fn relay_drain(db: &TestDb, cfg: KafkaConfig, backlog: i64) -> f64 {
    let relay_config = RelayConfig {
        relay_id: testkit::unique("bench"),
        batch_size: 1000,
        ..Default::default()
    };
    let publisher = KafkaPublisher::connect(cfg).await.unwrap();
    let relay = Relay::new(
        Arc::new(PgStore::new(db.pool.clone())),
        Arc::new(publisher),
        relay_config,
    )
    .unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let t = Instant::now();
    let task = tokio::spawn(async move { relay.run(s).await });
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_published")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if n >= backlog {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = backlog as f64 / t.elapsed().as_secs_f64();
    stop.cancel();
    task.await.unwrap().unwrap();
    drained
}
