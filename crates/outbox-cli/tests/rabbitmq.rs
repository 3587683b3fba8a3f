//! The outbox invariants with RabbitMQ as the broker: the `outbox` binary relays a test database's
//! events to the real RabbitMQ on this machine, and a queue bound to the test's own exchange shows
//! what consumers receive. Outages go through a cuttable proxy: the shared broker keeps running.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    assert_route_held_back, attempts_spent, count, insert_backlog, insert_routes, route_probes,
};
use lapin::options::{
    BasicGetOptions, BasicRejectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use outbox::{NewEvent, Outbox};
use serde_json::json;
use testkit::proxy::Proxy;
use testkit::{eventually, TestDb};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

use testkit::rabbit::amqp_url;

/// A test's own exchange and the queue that collects everything published to it; both (and the
/// alternate exchange, dead-letter exchange and queues the test made) are deleted on drop.
struct Rabbit {
    exchange: String,
    queue: String,
    _conn: Connection,
    ch: Channel,
    extra_queues: Vec<String>,
    extra_exchanges: Vec<String>,
}

impl Rabbit {
    /// A unique exchange (declared the way the relay declares it) and a queue bound by `#`.
    async fn new() -> Self {
        Self::with_bindings(&["#"]).await
    }

    /// A unique exchange and a collecting queue bound by `bindings` (none: no queue bound).
    async fn with_bindings(bindings: &[&str]) -> Self {
        let exchange = testkit::unique("ex");
        let queue = format!("{exchange}.all");
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ reachable on 127.0.0.1:5672");
        let ch = conn.create_channel().await.unwrap();
        let me = Self {
            extra_queues: vec![
                format!("{exchange}.unroutable"),
                format!("{queue}.dlq"),
                queue.clone(),
            ],
            extra_exchanges: vec![format!("{exchange}.unroutable"), format!("{queue}.dlx")],
            exchange,
            queue,
            _conn: conn,
            ch,
        };
        if !bindings.is_empty() {
            let b: Vec<String> = bindings.iter().map(|s| s.to_string()).collect();
            outbox::amqp::declare_consumer_queue(
                &me.config(),
                &me.queue,
                &b,
                &format!("{}.dlx", me.queue),
                &format!("{}.dlq", me.queue),
            )
            .await
            .expect("declare the test's queue");
        }
        me
    }

    fn config(&self) -> outbox::amqp::AmqpConfig {
        outbox::amqp::AmqpConfig {
            url: amqp_url(),
            exchange: self.exchange.clone(),
            alternate_exchange: Some(format!("{}.unroutable", self.exchange)),
            ..Default::default()
        }
    }

    /// Takes every message now in `queue`, in queue order.
    async fn drain(&self, queue: &str) -> Vec<Seen> {
        let mut out = Vec::new();
        while let Some(m) = self
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            out.push(Seen::of(
                &m.delivery.properties,
                m.delivery.routing_key.as_str(),
                &m.delivery.data,
            ));
        }
        out
    }

    async fn depth(&self, queue: &str) -> u32 {
        self.ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .unwrap_or(0)
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let exchanges = self.extra_exchanges.iter().chain([&self.exchange]);
        testkit::rabbit::delete_names(
            &amqp_url(),
            self.extra_queues.clone(),
            exchanges.cloned().collect(),
        );
    }
}

/// A message as a consumer sees it.
#[derive(Debug, Clone)]
struct Seen {
    event_id: String,
    aggregate: String,
    seq: i64,
    routing_key: String,
    payload: Vec<u8>,
    props: BasicProperties,
    headers: HashMap<String, String>,
}

impl Seen {
    fn of(p: &BasicProperties, routing_key: &str, data: &[u8]) -> Self {
        let mut headers = HashMap::new();
        let mut seq = -1;
        if let Some(h) = p.headers() {
            for (k, v) in h.inner() {
                match v {
                    AMQPValue::LongString(s) => {
                        headers.insert(
                            k.to_string(),
                            String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        );
                    }
                    AMQPValue::LongLongInt(n) if k.as_str() == "Outbox-Seq" => seq = *n,
                    _ => {}
                }
            }
        }
        Self {
            event_id: p
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            aggregate: format!(
                "{}/{}",
                headers.get("Outbox-Tenant-Id").cloned().unwrap_or_default(),
                headers
                    .get("Outbox-Aggregate-Id")
                    .cloned()
                    .unwrap_or_default()
            ),
            seq,
            routing_key: routing_key.to_string(),
            payload: data.to_vec(),
            props: p.clone(),
            headers,
        }
    }
}

/// Every event of the table reached the queue; duplicates (a crash's re-publishes) are allowed and
/// skipped, and per aggregate the first copies come with seq 1, 2, 3, ... Returns the number of
/// duplicates.
async fn assert_all_delivered_in_order(db: &TestDb, msgs: &[Seen]) -> usize {
    let items: Vec<(&str, &str, i64)> = msgs
        .iter()
        .map(|m| (m.event_id.as_str(), m.aggregate.as_str(), m.seq))
        .collect();
    common::assert_delivered_in_order(db, &items, false).await
}

/// An `outbox relay --broker rabbitmq` child process, killed when dropped.
struct RelayProcess(Child);

impl RelayProcess {
    fn spawn(db: &TestDb, rabbit: &Rabbit, url: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "relay",
            "--broker",
            "rabbitmq",
            "--amqp-exchange",
            &rabbit.exchange,
            "--lease-ms",
            "1000",
            "--poll-interval-ms",
            "100",
            "--retry-base-ms",
            "50",
            "--retry-cap-ms",
            "500",
        ];
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr", ""]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(&args)
            .args(extra)
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outbox relay");
        Self(child)
    }

    fn sigkill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

async fn all_published(db: &TestDb, n: i64, within: Duration) -> bool {
    eventually(within, || async { count(db, "published").await == n }).await
}

fn event(tenant: &str, agg: &str, topic: &str, n: i64) -> NewEvent {
    NewEvent::new(
        tenant,
        "ProductVariant",
        agg,
        "StockLevelChangedEvent",
        topic,
        json!({ "n": n }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_events_arrive_with_their_ids_properties_and_routing_keys() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::new().await;
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &[event("acme", "a", "inventory.stock.changed", 0)])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let ids = outbox
        .enqueue(
            &mut tx,
            &[
                event("acme", "a", "inventory.stock.changed", 1),
                event("acme", "a", "inventory.stock.changed", 2).traceparent(TRACEPARENT),
                event("globex", "b", "inventory.reservation.created", 1).correlation_id("corr-1"),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    insert_backlog(&db, 1500, 40).await;

    let _relay = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &[]);
    assert!(all_published(&db, 1503, Duration::from_secs(20)).await);
    let msgs = rabbit.drain(&rabbit.queue).await;
    assert_eq!(
        assert_all_delivered_in_order(&db, &msgs).await,
        0,
        "no duplicates without a crash"
    );

    let by_id: HashMap<&str, &Seen> = msgs.iter().map(|m| (m.event_id.as_str(), m)).collect();
    let traced = by_id[ids[1].to_string().as_str()];
    assert_eq!(traced.headers["traceparent"], TRACEPARENT);
    assert!(!by_id[ids[0].to_string().as_str()]
        .headers
        .contains_key("traceparent"));
    let r = by_id[ids[2].to_string().as_str()];
    assert_eq!(r.routing_key, "inventory.reservation.created.globex");
    assert_eq!(
        r.props.correlation_id().as_ref().unwrap().as_str(),
        "corr-1"
    );
    assert_eq!(r.headers["Outbox-Correlation-Id"], "corr-1");
    for id in &ids {
        let m = by_id[id.to_string().as_str()];
        let p = &m.props;
        assert_eq!(*p.delivery_mode(), Some(2), "persistent");
        assert_eq!(
            p.kind().as_ref().unwrap().as_str(),
            "StockLevelChangedEvent"
        );
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert!(p.app_id().is_some() && p.timestamp().unwrap() > 1_700_000_000);
        assert_eq!(m.headers["Outbox-Event-Id"], m.event_id);
        assert_eq!(m.headers["Outbox-Aggregate-Type"], "ProductVariant");
        // The bytes consumers receive are the bytes the transaction wrote.
        let stored: Vec<u8> =
            sqlx::query_scalar("SELECT payload FROM outbox_event_all WHERE event_id = $1")
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(stored, m.payload);
        let env: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(env["eventId"].as_str().unwrap(), m.event_id);
        assert!(m
            .routing_key
            .ends_with(&format!(".{}", env["tenantId"].as_str().unwrap())));
    }
    assert_eq!(
        by_id[ids[0].to_string().as_str()].routing_key,
        "inventory.stock.changed.acme"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_starts_while_rabbitmq_is_unreachable_and_delivers_after_outages() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::new().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    proxy.cut();
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let _relay = RelayProcess::spawn(&db, &rabbit, &url, &[]);
    insert_backlog(&db, 300, 7).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&db, "pending").await,
        300,
        "nothing is published while the broker is unreachable"
    );
    let attempts: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(attempts), 0) FROM outbox_event_all")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 0, "an outage spends no event's attempt budget");

    proxy.restore();
    assert!(all_published(&db, 300, Duration::from_secs(15)).await);

    // A second outage on an established connection, with events arriving during it.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    insert_backlog(&db, 5000, 7).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(count(&db, "published").await < 5300);
    proxy.restore();
    assert!(all_published(&db, 5300, Duration::from_secs(20)).await);
    assert_eq!(count(&db, "dead").await, 0);
    let msgs = rabbit.drain(&rabbit.queue).await;
    assert_all_delivered_in_order(&db, &msgs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_backlog_loses_nothing_after_restart() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::new().await;
    insert_backlog(&db, 15_000, 50).await;
    let mut relay = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &["--batch-size", "500"]);
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await >= 2000
        })
        .await
    );
    relay.sigkill();
    let after_kill = count(&db, "published").await;
    assert!(after_kill < 15_000, "the kill came mid-backlog");
    let _relay = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &[]);
    assert!(all_published(&db, 15_000, Duration::from_secs(30)).await);
    let msgs = rabbit.drain(&rabbit.queue).await;
    let dups = assert_all_delivered_in_order(&db, &msgs).await;
    // At most what was unsettled at the kill is published twice: the batch in flight and the
    // previous one, whose settlement is written while the next batch is published (2 x 500).
    assert!(dups <= 1000, "{dups} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_table_keep_every_aggregate_in_order() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::new().await;
    let _a = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &["--batch-size", "200"]);
    let _b = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &["--batch-size", "200"]);
    // Events arrive while both relays run, in several commits.
    for _ in 0..5 {
        insert_backlog(&db, 2000, 30).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(all_published(&db, 10_000, Duration::from_secs(30)).await);
    let msgs = rabbit.drain(&rabbit.queue).await;
    assert_eq!(assert_all_delivered_in_order(&db, &msgs).await, 0);
}

/// RabbitMQ refuses bodies over its `max_message_size` (128 MiB by default, and it closes the
/// channel when one arrives). The relay knows the limit (`--amqp-max-message-bytes`, here lowered
/// to 64 KiB so the test does not move 128 MiB) and dead-letters such an event at once without
/// sending it; the other aggregates keep flowing and the poison's own later events wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_event_is_dead_lettered_and_holds_back_only_its_aggregate() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::new().await;
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    let big = "x".repeat(100_000);
    let ids = outbox
        .enqueue(
            &mut tx,
            &[
                event("acme", "poisoned", "inventory.stock.changed", 1),
                NewEvent::new(
                    "acme",
                    "ProductVariant",
                    "poisoned",
                    "StockLevelChangedEvent",
                    "inventory.stock.changed",
                    json!({ "blob": big }),
                ),
                event("acme", "poisoned", "inventory.stock.changed", 3),
                event("acme", "healthy", "inventory.stock.changed", 1),
                event("acme", "healthy", "inventory.stock.changed", 2),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let _relay = RelayProcess::spawn(
        &db,
        &rabbit,
        &amqp_url(),
        &["--amqp-max-message-bytes", "65536"],
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            count(&db, "dead").await == 1 && count(&db, "published").await == 3
        })
        .await
    );
    let (dead, error): (uuid::Uuid, String) =
        sqlx::query_as("SELECT event_id, last_error FROM outbox_event WHERE status = 'dead'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(dead, ids[1]);
    assert!(error.contains("max_message_size"), "{error}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Held behind it (out of the claim's index: migration `..._table_contract.sql`).
    assert_eq!(
        count(&db, "held").await,
        1,
        "the poison's later event waits"
    );
    let got: Vec<String> = rabbit
        .drain(&rabbit.queue)
        .await
        .into_iter()
        .map(|m| m.event_id)
        .collect();
    let want: Vec<String> = [ids[0], ids[3], ids[4]]
        .iter()
        .map(|u| u.to_string())
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    let mut want_sorted = want;
    want_sorted.sort();
    assert_eq!(
        got_sorted, want_sorted,
        "neither the poison nor its aggregate's later event reached the broker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_events_go_to_the_alternate_exchange_by_default() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::with_bindings(&[]).await;
    let _relay = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &[]);
    insert_backlog(&db, 50, 5).await;
    assert!(all_published(&db, 50, Duration::from_secs(15)).await);
    let parked = rabbit
        .drain(&format!("{}.unroutable", rabbit.exchange))
        .await;
    assert_all_delivered_in_order(&db, &parked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_alternate_exchange_unroutable_events_are_counted_retried_and_dead_lettered() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::with_bindings(&[]).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let _relay = RelayProcess::spawn(
        &db,
        &rabbit,
        &amqp_url(),
        &[
            "--amqp-alternate-exchange",
            "",
            "--max-attempts",
            "3",
            "--metrics-addr",
            &addr,
        ],
    );
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(
            &mut tx,
            &[
                event("acme", "a", "inventory.stock.changed", 1),
                event("acme", "a", "inventory.stock.changed", 2),
                event("acme", "b", "inventory.stock.changed", 1),
                event("acme", "b", "inventory.stock.changed", 2),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "dead").await == 2
        })
        .await,
        "the first event of each aggregate is dead-lettered after its attempts"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&db, "held").await, 2, "their later events wait");
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT last_error FROM outbox_event WHERE status = 'dead'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(errors.iter().all(|e| e.contains("NO_ROUTE")), "{errors:?}");
    assert_eq!(count(&db, "published").await, 0);
    let body = tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-s", &format!("http://{addr}/metrics")])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap();
    let total: f64 = body
        .lines()
        .filter(|l| l.starts_with("outbox_events_unroutable_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(total >= 6.0, "3 returns per dead event counted: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_command_declares_a_bound_queue_with_a_dead_letter_queue() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::with_bindings(&[]).await;
    let status = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "rabbitmq-topology",
            "--queue",
            &rabbit.queue,
            "--binding",
            "inventory.stock.*.*",
            "--amqp-exchange",
            &rabbit.exchange,
            "--amqp-url",
            &amqp_url(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    let ids = outbox
        .enqueue(
            &mut tx,
            &[
                event("acme", "a", "inventory.stock.changed", 1),
                event("acme", "a", "inventory.reservation.created", 2),
                event("acme", "a", "inventory.stock.status.changed", 3),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let _relay = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &[]);
    assert!(all_published(&db, 3, Duration::from_secs(15)).await);
    assert!(
        eventually(Duration::from_secs(5), || async {
            rabbit.depth(&rabbit.queue).await == 1
        })
        .await,
        "only the 3-word stock event matches inventory.stock.*.*"
    );
    // A consumer rejects it: it lands in the dead-letter queue.
    let m = rabbit
        .ch
        .basic_get(rabbit.queue.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(
        m.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        ids[0].to_string()
    );
    m.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let dlq = format!("{}.dlq", rabbit.queue);
    assert!(
        eventually(Duration::from_secs(5), || async {
            rabbit.depth(&dlq).await == 1
        })
        .await
    );
    let dead = rabbit.drain(&dlq).await;
    assert_eq!(dead[0].event_id, ids[0].to_string());
}

/// Before: a queue refusing new messages (`x-overflow: reject-publish` on a full queue) made
/// RabbitMQ nack every publish, each event spent its attempts, and every aggregate's first event
/// ended dead and blocking. A nack is the broker's state, not the event's fault: no attempt is
/// spent, nothing is dead-lettered, and once the queue has room everything arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_refusing_publishes_is_an_outage_not_a_dead_letter() {
    let db = TestDb::new().await;
    let mut rabbit = Rabbit::new().await;
    let full = format!("{}.full", rabbit.exchange);
    rabbit.extra_queues.push(full.clone());
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(3));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    rabbit
        .ch
        .queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    rabbit
        .ch
        .queue_bind(
            full.as_str().into(),
            rabbit.exchange.as_str().into(),
            "#".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    insert_backlog(&db, 30, 3).await;
    let _relay = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &["--max-attempts", "3"]);
    assert!(
        eventually(Duration::from_secs(15), || async {
            count(&db, "published").await == 3
        })
        .await
    );
    // Several retry budgets' worth of time (3 attempts, 50-500 ms apart).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(&db, "dead").await,
        0,
        "a full queue dead-letters nothing"
    );
    let spent = attempts_spent(&db).await;
    assert_eq!(spent, 0, "a full queue spends no attempt");

    rabbit
        .ch
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(all_published(&db, 30, Duration::from_secs(20)).await);
    let msgs = rabbit.drain(&rabbit.queue).await;
    assert_all_delivered_in_order(&db, &msgs).await;
}

/// Before: `basic_publish` had no deadline. A broker that stops reading the connection (what
/// RabbitMQ does under a memory or disk alarm; here a proxy that stalls) filled the socket
/// buffers and the relay's loop waited in `basic_publish` for good: it ignored SIGTERM. Now a
/// send that takes longer than `--amqp-send-timeout-secs` is an outage: the loop backs off, stays
/// responsive, and exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_reading_cannot_hang_the_relay() {
    let db = TestDb::new().await;
    let rabbit = Rabbit::new().await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let mut relay = RelayProcess::spawn(&db, &rabbit, &url, &["--amqp-send-timeout-secs", "1"]);
    // Connected and delivering first.
    insert_backlog(&db, 10, 2).await;
    assert!(all_published(&db, 10, Duration::from_secs(15)).await);
    proxy.stall();
    // 40 MB of events: far more than the socket buffers between relay and broker hold.
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 't', 'V', 'big' || (g % 50), 'Bulk', 'bulk.created',
                convert_to(json_build_object('blob', repeat('x', 200000))::text, 'UTF8')
         FROM generate_series(1, 200) AS g ORDER BY g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(count(&db, "dead").await, 0);
    // SIGTERM: the relay finishes (its batch failed as an outage) and exits 0.
    let _ = Command::new("kill")
        .args(["-TERM", &relay.0.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = relay.0.try_wait().unwrap() {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    proxy.restore();
    let status = status.expect("the relay exits on SIGTERM while the broker stalls");
    assert!(status.success(), "{status:?}");
    let attempts = attempts_spent(&db).await;
    assert_eq!(attempts, 0, "a stalled broker spends no attempt");
}

/// The metrics page of a relay started with `--metrics-addr addr`.
async fn scrape(addr: &str) -> String {
    let url = format!("http://{addr}/metrics");
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl")
            .args(["-s", &url])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// The sum of the samples of `metric` whose line contains every one of `with`.
fn sample(body: &str, metric: &str, with: &[&str]) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(metric) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// Declares a queue that refuses every publish (`x-max-length` 0, `reject-publish`) bound to
/// `binding`.
async fn refusing_queue(rabbit: &mut Rabbit, binding: &str) -> String {
    let full = format!("{}.full", rabbit.exchange);
    rabbit.extra_queues.push(full.clone());
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    rabbit
        .ch
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    rabbit
        .ch
        .queue_bind(
            full.as_str().into(),
            rabbit.exchange.as_str().into(),
            binding.into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    full
}

/// Issue 19, item 2. Before: one queue refusing publishes (one tenant's binding of one topic,
/// `reject-publish` at its `x-max-length`) nacked its messages and the whole batch was an outage:
/// the refused events stayed at the head of every claim and the relay went claim, send, nack,
/// back off, hundreds of nacks a minute, while nothing said which route was full. Now the refused
/// routing key is held back alone (one probe per back-off), every other key flows, no attempt is
/// spent, the aggregate whose head was refused keeps its later events (on another key) behind it,
/// and `outbox status`, the route gauges and the log name the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_holds_back_only_its_routing_key() {
    let db = TestDb::new().await;
    let mut rabbit = Rabbit::new().await;
    let full = refusing_queue(&mut rabbit, "full.topic.t0").await;
    insert_routes(&db, 4, 30, 10).await;
    let (refused_total, healthy_total) = (4 * 10 + 10, 30 * 10);
    let addr = free_addr();
    let started = std::time::Instant::now();
    let _relay = RelayProcess::spawn(
        &db,
        &rabbit,
        &amqp_url(),
        &["--max-attempts", "3", "--metrics-addr", &addr],
    );
    assert!(
        all_published(&db, healthy_total, Duration::from_secs(20)).await,
        "the healthy routes drain while one is refused"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let body = scrape(&addr).await;
    let elapsed = started.elapsed();
    let nacks = sample(&body, "outbox_publish_failures_total", &["reason=\"nack\""]);
    // One probe per back-off (100 ms doubling, capped at 5 s) after the first refusals, which
    // may come from every refused aggregate at once (one event each in flight).
    let bound = (5 + route_probes(elapsed)) as f64;
    assert!(
        nacks <= bound,
        "the refused routing key got {nacks} publishes in {elapsed:?}; at most {bound} (one per back-off)"
    );
    assert_route_held_back(&db, healthy_total).await;
    assert_eq!(sample(&body, "outbox_refused_routes", &[]), 1.0, "{body}");
    assert!(sample(&body, "outbox_oldest_route_held_age_seconds", &[]) > 1.0);
    // `outbox status` names the route.
    let url = db.url.clone();
    let status = tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .arg("status")
            .env("DATABASE_URL", url)
            .output()
            .expect("outbox status");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap();
    assert!(
        status.contains("refused routes (1)") && status.contains("full.topic.t0"),
        "{status}"
    );

    // Room again: the held route and m follow, every aggregate in order.
    rabbit
        .ch
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(
        all_published(&db, healthy_total + refused_total, Duration::from_secs(20)).await,
        "the refused route delivers once it takes messages again"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_route_hold")
                .fetch_one(&db.pool)
                .await
                .unwrap()
                == 0
        })
        .await,
        "the released route leaves `outbox status`"
    );
    let msgs = rabbit.drain(&rabbit.queue).await;
    assert_all_delivered_in_order(&db, &msgs).await;
}

/// The figures of docs/benchmarks.md, "One refused route" (issue 19): the same backlog drained
/// with nothing refused and with one routing key refused (a `reject-publish` queue at
/// `x-max-length` 0 bound to it), alternating, three runs each. Per run: seconds until every
/// event of the healthy routes is published, the refused route's publishes (nacks) per back-off
/// interval, attempts spent, and (after the queue is deleted) every aggregate in order. Run with
/// `cargo test -p outbox-cli --test rabbitmq -- --ignored --nocapture bench_one_refused_route`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: about a minute; figures in docs/benchmarks.md"]
async fn bench_one_refused_route() {
    let (refused_aggs, healthy_aggs, per_agg) = (20i64, 400i64, 50i64);
    let healthy_total = healthy_aggs * per_agg;
    let all_total = healthy_total + (refused_aggs + 1) * per_agg;
    let mut table = Vec::new();
    for run in 0..6 {
        let refuse = run % 2 == 1;
        let db = TestDb::new().await;
        let mut rabbit = Rabbit::new().await;
        let full = if refuse {
            Some(refusing_queue(&mut rabbit, "full.topic.t0").await)
        } else {
            None
        };
        insert_routes(&db, refused_aggs, healthy_aggs, per_agg).await;
        let addr = free_addr();
        let started = std::time::Instant::now();
        let _relay = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &["--metrics-addr", &addr]);
        let healthy: i64 = loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM outbox_published WHERE topic = 'ok.topic' AND aggregate_id <> 'm'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            if n == healthy_total || started.elapsed() > Duration::from_secs(120) {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let drain = started.elapsed();
        assert_eq!(healthy, healthy_total, "healthy routes drained");
        let (mut nacks, mut intervals, mut spent) = (0.0, 0, 0);
        if let Some(full) = full {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let elapsed = started.elapsed();
            nacks = sample(
                &scrape(&addr).await,
                "outbox_publish_failures_total",
                &["reason=\"nack\""],
            );
            intervals = route_probes(elapsed);
            spent = attempts_spent(&db).await;
            assert_eq!(count(&db, "dead").await, 0);
            rabbit
                .ch
                .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
                .await
                .unwrap();
        }
        assert!(all_published(&db, all_total, Duration::from_secs(60)).await);
        let msgs = rabbit.drain(&rabbit.queue).await;
        assert_all_delivered_in_order(&db, &msgs).await;
        println!(
            "run {run}: refused={refuse} healthy {healthy_total} events in {:.2} s ({:.0}/s); refused-route publishes {nacks} over {intervals} back-off intervals; attempts spent {spent}; order kept",
            drain.as_secs_f64(),
            healthy_total as f64 / drain.as_secs_f64()
        );
        table.push((refuse, drain.as_secs_f64()));
    }
    let median = |r: bool| {
        let mut v: Vec<f64> = table.iter().filter(|t| t.0 == r).map(|t| t.1).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (clear, refused) = (median(false), median(true));
    println!(
        "median healthy drain: nothing refused {clear:.2} s, one route refused {refused:.2} s: ratio of rates {:.2}",
        clear / refused
    );
}

/// Issue 19, item 2: a full queue bound by `#` refuses every routing key. More keys refused at
/// once than `--max-refused-routes` is the broker's outage, not the keys': the relay holds no
/// route (none is written for `outbox status`) and backs off as a whole; nothing dead, no attempt
/// spent, and everything follows in order once the queue is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_refused_routes_than_the_limit_is_a_broker_wide_outage() {
    let db = TestDb::new().await;
    let mut rabbit = Rabbit::new().await;
    let full = refusing_queue(&mut rabbit, "#").await;
    // 12 tenants: 12 routing keys `bulk.created.tN`.
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 't' || (g % 12), 'V', 'a' || (g % 24), 'Bulk', 'bulk.created', '\\x7b7d'
         FROM generate_series(0, 119) AS g ORDER BY g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let _relay = RelayProcess::spawn(&db, &rabbit, &amqp_url(), &["--max-refused-routes", "4"]);
    let mut held_seen = 0i64;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_route_hold")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        held_seen = held_seen.max(n);
    }
    assert_eq!(held_seen, 0, "no route is held: it is the broker's outage");
    assert_eq!(count(&db, "published").await, 0);
    assert_eq!(count(&db, "dead").await, 0);
    assert_eq!(attempts_spent(&db).await, 0);
    rabbit
        .ch
        .queue_delete(full.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert!(all_published(&db, 120, Duration::from_secs(20)).await);
    let msgs = rabbit.drain(&rabbit.queue).await;
    assert_all_delivered_in_order(&db, &msgs).await;
}
