//! RabbitMQ quorum queues, on a private RabbitMQ node (testkit's `RabbitNode`; the shared node is
//! never restarted): `outbox rabbitmq-topology` declares quorum queues by default, classic ones
//! on request, and the relay's publisher confirms hold through a crash of the broker: every event
//! the outbox marked published is in the quorum queue afterwards.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::{Rng, SeedableRng};
use testkit::faults::soak_seed;
use testkit::rabbit_node::RabbitNode;
use testkit::TestDb;

fn topology(url: &str, exchange: &str, queue: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "rabbitmq-topology",
            "--queue",
            queue,
            "--binding",
            "#",
            "--amqp-exchange",
            exchange,
            "--amqp-url",
            url,
        ])
        .args(extra)
        .output()
        .expect("run outbox rabbitmq-topology")
}

/// Whether `queue` accepts a re-declaration as `kind` with the dead-letter exchange `dlx` and
/// delivery limit `limit`: RabbitMQ refuses another queue type or other arguments.
async fn is_of_type(
    url: &str,
    queue: &str,
    kind: &str,
    dlx: Option<&str>,
    limit: Option<i64>,
) -> bool {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("connect the private node");
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    if let Some(dlx) = dlx {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.into()),
        );
    }
    if let Some(n) = limit {
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(n));
    }
    let ok = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .is_ok();
    let _ = conn.close(200, "done".into()).await;
    ok
}

/// First copy of each message in `queue` (message id, aggregate, Outbox-Seq), in queue order,
/// and the number of copies beyond the first: consumed until the queue stays empty for 1 s.
async fn drain_queue(url: &str, queue: &str) -> (Vec<(String, String, i64)>, usize) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut firsts = Vec::new();
    let mut ids = HashSet::new();
    let mut copies = 0;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
    {
        let p = &d.properties;
        let id = p
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let (mut tenant, mut agg, mut seq) = (String::new(), String::new(), -1);
        for (k, v) in p
            .headers()
            .as_ref()
            .map(|h| h.inner().clone())
            .unwrap_or_default()
        {
            match (k.as_str(), v) {
                ("Outbox-Tenant-Id", AMQPValue::LongString(s)) => tenant = s.to_string(),
                ("Outbox-Aggregate-Id", AMQPValue::LongString(s)) => agg = s.to_string(),
                ("Outbox-Seq", AMQPValue::LongLongInt(n)) => seq = n,
                _ => {}
            }
        }
        if ids.insert(id.clone()) {
            firsts.push((id, format!("{tenant}/{agg}"), seq));
        } else {
            copies += 1;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    (firsts, copies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_by_default_and_confirms_hold_through_a_broker_crash() {
    let seed = soak_seed();
    eprintln!("rabbitmq quorum seed={seed} (replay: SOAK_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let mut node = RabbitNode::start(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("private RabbitMQ node: {e}"));
    let url = node.amqp_url();
    eprintln!(
        "seed={seed}: node up after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let exchange = testkit::unique("qq_ex");
    let queue = format!("{exchange}.q");

    // Quorum by default, with the delivery limit and dead-letter exchange.
    let out = topology(&url, &exchange, &queue, &["--delivery-limit", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("quorum queue"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let dlx = format!("{queue}.dlx");
    assert!(is_of_type(&url, &queue, "quorum", Some(&dlx), Some(2)).await);
    assert!(!is_of_type(&url, &queue, "classic", Some(&dlx), None).await);
    assert!(
        !is_of_type(&url, &queue, "quorum", Some(&dlx), None).await,
        "delivery limit set"
    );
    assert!(is_of_type(&url, &format!("{queue}.dlq"), "quorum", None, None).await);
    // Idempotent.
    assert!(
        topology(&url, &exchange, &queue, &["--delivery-limit", "2"])
            .status
            .success()
    );
    // Classic on request; declaring an existing classic queue as quorum is refused with a hint.
    let classic = format!("{exchange}.classic");
    let out = topology(&url, &exchange, &classic, &["--queue-type", "classic"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        is_of_type(
            &url,
            &classic,
            "classic",
            Some(&format!("{classic}.dlx")),
            None
        )
        .await
    );
    let out = topology(&url, &exchange, &classic, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--queue-type"),
        "{err}"
    );

    // The delivery limit: a message handed back twice is dead-lettered, not redelivered forever.
    {
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.basic_publish(
            exchange.as_str().into(),
            "poison".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
        let mut handed_back = 0;
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match ch
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                Some(m) => {
                    m.delivery
                        .acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    handed_back += 1;
                }
                None if handed_back > 0 => break,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let (dead, _) = drain_queue(&url, &format!("{queue}.dlq")).await;
        assert_eq!(
            dead.len(),
            1,
            "the poison message is in the dead-letter queue"
        );
        assert!(
            handed_back <= 3,
            "delivered {handed_back} times with a limit of 2"
        );
        let _ = conn.close(200, "done".into()).await;
    }

    // The relay drains a backlog into the quorum queue while the broker crashes (SIGKILL) at a
    // seeded point, with batches in flight.
    eprintln!(
        "seed={seed}: topology checked at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let db = TestDb::new().await;
    const N: i64 = 4000;
    common::insert_backlog(&db, N, 40).await;
    let batch = rng.random_range(50..=300).to_string();
    let mut relay = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "relay",
            "--broker",
            "rabbitmq",
            "--amqp-exchange",
            &exchange,
            "--batch-size",
            &batch,
            "--lease-ms",
            "1500",
            "--poll-interval-ms",
            "100",
            "--retry-cap-ms",
            "1000",
            "--metrics-addr",
            "",
        ])
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the relay");
    let at = rng.random_range(N / 10..N / 2);
    assert!(
        testkit::eventually(Duration::from_secs(30), || async {
            common::count(&db, "published").await >= at
        })
        .await,
        "seed={seed}: the relay did not publish {at} events"
    );
    let before = common::count(&db, "published").await;
    node.crash_and_restart(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("seed={seed}: restart the node: {e}"));
    eprintln!(
        "seed={seed}: crashed the broker at {before} published (batch {batch}); back at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let drained = testkit::eventually(Duration::from_secs(60), || async {
        common::count(&db, "published").await == N
    })
    .await;
    let _ = relay.kill();
    let _ = relay.wait();
    eprintln!(
        "seed={seed}: drained at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        drained,
        "seed={seed}: the relay did not drain the backlog after the crash"
    );
    assert_eq!(
        common::count(&db, "dead").await,
        0,
        "seed={seed}: dead letters"
    );
    let attempts: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(attempts), 0) FROM outbox_published")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 0, "seed={seed}: a broker crash spent attempts");

    let published: HashMap<String, (String, i64)> =
        sqlx::query_as::<_, (uuid::Uuid, String, String, i64)>(
            "SELECT event_id, tenant_id, aggregate_id, seq FROM outbox_published",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, t, a, s)| (id.to_string(), (format!("{t}/{a}"), s)))
        .collect();
    let (firsts, copies) = drain_queue(&url, &queue).await;
    let in_queue: HashSet<&str> = firsts.iter().map(|(id, _, _)| id.as_str()).collect();
    let lost = published
        .keys()
        .filter(|id| !in_queue.contains(id.as_str()))
        .count();
    let phantom = firsts
        .iter()
        .filter(|(id, _, _)| !published.contains_key(id))
        .count();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut reorders = 0;
    for (_, agg, seq) in &firsts {
        let l = last.entry(agg.as_str()).or_insert(0);
        if *seq < *l {
            reorders += 1;
        }
        *l = (*l).max(*seq);
    }
    eprintln!(
        "seed={seed}: {N} events, {} in the quorum queue (+{copies} re-published copies), lost {lost}, \
         phantom {phantom}, reordered {reorders}, {:.1} s",
        firsts.len(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        lost, 0,
        "seed={seed}: confirmed events missing from the quorum queue"
    );
    assert_eq!(phantom, 0, "seed={seed}: messages nobody committed");
    assert_eq!(
        reorders, 0,
        "seed={seed}: first copies out of per-aggregate order"
    );
}
