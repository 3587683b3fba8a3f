//! The consumer runtime against the real brokers: duplicates applied once, out-of-order arrival
//! applied in seq order, a failing aggregate retried, parked and replayed from the CLI while the
//! others flow, and consumers killed between handler and commit / commit and ack applying every
//! event exactly once (effects counted, not messages).

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use outbox::consumers::amqp::{AmqpSource, AmqpSourceConfig};
use outbox::consumers::nats::{NatsSource, NatsSourceConfig};
use outbox::consumers::{Consumer, ConsumerConfig, Handler, HandlerError, InboundEvent};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::{PgConnection, PgPool};
use testkit::{TestDb, TestStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Writes one effect row per handled event; fails while `fail` is set for aggregate `fail_agg`;
/// takes `delay` per event (a slow handler).
#[derive(Clone, Default)]
struct Recorder {
    fail: Arc<AtomicBool>,
    fail_agg: String,
    delay: Duration,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, tx: &mut PgConnection, e: &InboundEvent) -> Result<(), HandlerError> {
        let agg = e.aggregate.as_ref().map(|a| a.aggregate_id.clone());
        if self.fail.load(Ordering::SeqCst) && agg.as_deref() == Some(self.fail_agg.as_str()) {
            return Err("injected failure".into());
        }
        if agg.as_deref() == Some("panics") {
            panic!("injected panic");
        }
        if agg.as_deref() == Some("swallows") {
            // A handler bug: the statement fails, the transaction is aborted, and the handler
            // reports success.
            let _ = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
            return Ok(());
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        sqlx::query("INSERT INTO effect (event_id, aggregate_id, seq) VALUES ($1, $2, $3)")
            .bind(e.event_id)
            .bind(agg)
            .bind(e.position.map(|p| p.seq))
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

async fn effect_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE effect (n BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL, aggregate_id TEXT, seq BIGINT,
                              tx BIGINT NOT NULL DEFAULT txid_current())",
    )
    .execute(pool)
    .await
    .expect("effect table");
}

/// One test event as the relay would send it.
#[derive(Clone, Debug)]
struct Ev {
    id: Uuid,
    agg: Option<String>,
    seq: Option<i64>,
}

impl Ev {
    fn seq(agg: &str, seq: i64) -> Self {
        Self {
            id: Uuid::now_v7(),
            agg: Some(agg.into()),
            seq: Some(seq),
        }
    }
}

/// A random seed, printed, and the generator it seeds (replay a failure with its seed).
fn seeded() -> (u64, rand::rngs::StdRng) {
    let seed: u64 = rand::rng().random();
    eprintln!("seed {seed}");
    (seed, rand::rngs::StdRng::seed_from_u64(seed))
}

/// A fresh database with the effect table, and a fresh stream.
async fn db_and_stream() -> (TestDb, TestStream, jetstream::Context) {
    let db = TestDb::new().await;
    effect_table(&db.pool).await;
    let s = TestStream::new();
    let js = stream_for(&s).await;
    (db, s, js)
}

async fn stream_for(s: &TestStream) -> jetstream::Context {
    let js = jetstream::new(
        async_nats::connect(testkit::nats_url())
            .await
            .expect("NATS"),
    );
    js.create_stream(jetstream::stream::Config {
        name: s.name.clone(),
        subjects: vec![format!("{}.>", s.prefix)],
        ..Default::default()
    })
    .await
    .expect("create stream");
    js
}

/// Publishes `e` as a new broker message (its own `Nats-Msg-Id`, so copies are not dropped by
/// the stream: a second message with the same `eventId`).
async fn publish(js: &jetstream::Context, s: &TestStream, e: &Ev) {
    publish_with(js, s, e, 0, &[]).await
}

/// [`publish`] in sequence epoch `epoch`, with `extra` headers (a producer id, a skip marker).
async fn publish_with(
    js: &jetstream::Context,
    s: &TestStream,
    e: &Ev,
    epoch: i64,
    extra: &[(&str, &str)],
) {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", Uuid::new_v4().to_string().as_str());
    h.insert("Outbox-Event-Id", e.id.to_string().as_str());
    h.insert("Outbox-Event-Type", "test.happened");
    if let (Some(agg), Some(seq)) = (&e.agg, e.seq) {
        h.insert("Outbox-Tenant-Id", "t1");
        h.insert("Outbox-Aggregate-Type", "item");
        h.insert("Outbox-Aggregate-Id", agg.as_str());
        h.insert("Outbox-Seq", seq.to_string().as_str());
        h.insert("Outbox-Seq-Epoch", epoch.to_string().as_str());
    }
    for (k, v) in extra {
        h.insert(*k, *v);
    }
    let body = format!(r#"{{"eventId":"{}"}}"#, e.id);
    js.publish_with_headers(format!("{}.t1.test", s.prefix), h, body.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

fn config(name: &str) -> ConsumerConfig {
    let mut c = ConsumerConfig::new(name);
    c.concurrency = 4;
    c.max_attempts = 3;
    c.retry_base = Duration::from_millis(30);
    c.retry_max = Duration::from_millis(200);
    c.gap_retry = Duration::from_millis(30);
    c.replay_poll = Duration::from_millis(100);
    c
}

fn source_config(s: &TestStream, durable: &str) -> NatsSourceConfig {
    NatsSourceConfig {
        url: testkit::nats_url(),
        stream: s.name.clone(),
        durable: durable.into(),
        ack_wait: Duration::from_secs(3),
        ..Default::default()
    }
}

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<outbox::error::Result<()>>,
}

impl Running {
    async fn shutdown(self) {
        self.stop.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("consumer stops within 10 s on shutdown");
        r.expect("task").expect("consumer ends cleanly");
    }
}

async fn start(db: &TestDb, s: &TestStream, h: Recorder, cfg: ConsumerConfig) -> Running {
    let source = NatsSource::connect(source_config(s, &cfg.name))
        .await
        .expect("source");
    let consumer = Consumer::new(db.pool.clone(), h, cfg).expect("consumer");
    let stop = CancellationToken::new();
    let st = stop.clone();
    let task = tokio::spawn(async move { consumer.run(source, st).await });
    Running { stop, task }
}

/// Whether the durable consumer has nothing pending and nothing unacknowledged.
async fn drained(s: &TestStream, durable: &str) -> bool {
    let js = jetstream::new(
        async_nats::connect(testkit::nats_url())
            .await
            .expect("NATS"),
    );
    let Ok(stream) = js.get_stream(&s.name).await else {
        return false;
    };
    let Ok(mut c) = stream
        .get_consumer::<jetstream::consumer::pull::Config>(durable)
        .await
    else {
        return false;
    };
    match c.info().await {
        Ok(i) => i.num_pending == 0 && i.num_ack_pending == 0,
        Err(_) => false,
    }
}

/// Effect rows: (event id, aggregate, seq) in the order they were written.
async fn effects(pool: &PgPool) -> Vec<(Uuid, Option<String>, Option<i64>)> {
    sqlx::query_as("SELECT event_id, aggregate_id, seq FROM effect ORDER BY n")
        .fetch_all(pool)
        .await
        .expect("effects")
}

/// Each event exactly once, and each aggregate's effects in seq order 1..n.
fn assert_exactly_once_in_order(
    rows: &[(Uuid, Option<String>, Option<i64>)],
    expected: &[Ev],
    context: &str,
) {
    let mut ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    ids.sort();
    let mut want: Vec<Uuid> = expected.iter().map(|e| e.id).collect();
    want.sort();
    want.dedup();
    assert_eq!(ids, want, "{context}: every event applied exactly once");
    let mut per: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    for (_, agg, seq) in rows {
        if let (Some(a), Some(s)) = (agg, seq) {
            per.entry(a.clone()).or_default().push(*s);
        }
    }
    for (agg, seqs) in per {
        let sorted: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(
            seqs, sorted,
            "{context}: aggregate {agg} applied in seq order"
        );
    }
}

async fn wait_drained(s: &TestStream, durable: &str, within: Duration) {
    assert!(
        testkit::eventually(within, || drained(s, durable)).await,
        "the consumer did not drain its stream within {within:?}"
    );
}

#[tokio::test]
async fn the_same_event_published_twice_has_one_effect() {
    let t0 = Instant::now();
    let (db, s, js) = db_and_stream().await;
    let a1 = Ev::seq("a", 1);
    let a2 = Ev::seq("a", 2);
    // A producer that is not this library: no aggregate, no Outbox-Seq.
    let foreign = Ev {
        id: Uuid::now_v7(),
        agg: None,
        seq: None,
    };
    for e in [&a1, &foreign, &a1, &a2, &foreign, &a2, &a1] {
        publish(&js, &s, e).await;
    }
    let name = testkit::unique("dup");
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    wait_drained(&s, &name, Duration::from_secs(15)).await;
    // A redelivery after the first consumer is gone, to a second consumer process.
    publish(&js, &s, &a2).await;
    publish(&js, &s, &foreign).await;
    wait_drained(&s, &name, Duration::from_secs(15)).await;
    c.shutdown().await;
    assert_exactly_once_in_order(&effects(&db.pool).await, &[a1, a2, foreign], "duplicates");
    eprintln!("took {:?}", t0.elapsed());
}

#[tokio::test]
async fn events_arriving_out_of_order_are_applied_in_seq_order() {
    let t0 = Instant::now();
    let (seed, mut rng) = seeded();
    let (db, s, js) = db_and_stream().await;
    let mut all = Vec::new();
    for agg in ["a", "b", "c"] {
        for seq in 1..=8 {
            all.push(Ev::seq(agg, seq));
        }
    }
    let mut shuffled = all.clone();
    shuffled.shuffle(&mut rng);
    let name = testkit::unique("order");
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    for e in &shuffled {
        publish(&js, &s, e).await;
    }
    wait_drained(&s, &name, Duration::from_secs(20)).await;
    c.shutdown().await;
    assert_exactly_once_in_order(
        &effects(&db.pool).await,
        &all,
        &format!("out of order (seed {seed})"),
    );
    eprintln!("took {:?}", t0.elapsed());
}

#[tokio::test]
async fn a_backlog_is_applied_in_batches_and_a_failing_event_in_a_batch_costs_only_itself() {
    let t0 = Instant::now();
    let (seed, mut rng) = seeded();
    let (db, s, js) = db_and_stream().await;
    // A backlog waiting before the consumer starts: 12 aggregates of 15 events, interleaved at
    // random (each aggregate in seq order), some delivered twice, and among them an aggregate
    // whose handler fails and one whose handler panics, so that batches hold them.
    let mut lanes: Vec<Vec<Ev>> = (0..12)
        .map(|a| (1..=15).map(|q| Ev::seq(&format!("a{a}"), q)).collect())
        .collect();
    lanes.push((1..=3).map(|q| Ev::seq("x", q)).collect());
    lanes.push(vec![Ev::seq("panics", 1)]);
    let good: Vec<Ev> = lanes[..12].iter().flatten().cloned().collect();
    let mut next = vec![0usize; lanes.len()];
    let mut published = 0;
    while next.iter().zip(&lanes).any(|(n, l)| *n < l.len()) {
        let a = rng.random_range(0..lanes.len());
        if next[a] < lanes[a].len() {
            let e = &lanes[a][next[a]];
            publish(&js, &s, e).await;
            if rng.random_bool(0.1) {
                publish(&js, &s, e).await;
            }
            next[a] += 1;
            published += 1;
        }
    }
    let name = testkit::unique("batch");
    let mut cfg = config(&name);
    cfg.batch_size = 16;
    let h = Recorder {
        fail: Arc::new(AtomicBool::new(true)),
        fail_agg: "x".into(),
        ..Default::default()
    };
    let c = start(&db, &s, h, cfg).await;
    wait_parked(&db.pool, &name, 4, Duration::from_secs(20)).await;
    wait_drained(&s, &name, Duration::from_secs(20)).await;
    c.shutdown().await;
    assert_exactly_once_in_order(
        &effects(&db.pool).await,
        &good,
        &format!("batched backlog (seed {seed})"),
    );
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT reason FROM outbox_consumer_dead_letter WHERE consumer = $1 ORDER BY aggregate_id, seq",
    )
    .bind(&name)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        reasons,
        ["handler", "handler", "held", "held"],
        "panics, then x 1..3"
    );
    let transactions: i64 = sqlx::query_scalar("SELECT count(DISTINCT tx) FROM effect")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    eprintln!(
        "{published} events published, {} applied in {transactions} transactions",
        good.len()
    );
    assert!(
        transactions * 2 <= good.len() as i64,
        "a backlog is applied several events per transaction: {transactions} transactions for {}",
        good.len()
    );
    eprintln!("took {:?}", t0.elapsed());
}

/// Waits until `n` events are parked (x's three events and the panicking one, in the tests).
async fn wait_parked(pool: &PgPool, name: &str, n: usize, within: Duration) {
    assert!(
        testkit::eventually(within, || {
            let (pool, name) = (pool.clone(), name.to_string());
            async move { parked(&pool, &name).await.len() == n }
        })
        .await,
        "{n} events parked within {within:?}: {:?}",
        parked(pool, name).await
    );
}

async fn parked(pool: &PgPool, name: &str) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT seq, reason FROM outbox_consumer_dead_letter WHERE consumer = $1 ORDER BY seq",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .expect("parked")
}

fn outbox_cli(db: &TestDb, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("USER", "consumer-test")
        .output()
        .expect("outbox runs");
    assert!(
        out.status.success(),
        "outbox {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_failing_aggregate_is_parked_while_others_flow_and_replay_applies_it_in_order() {
    let t0 = Instant::now();
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("park");
    let h = Recorder {
        fail: Arc::new(AtomicBool::new(true)),
        fail_agg: "x".into(),
        ..Default::default()
    };
    let c = start(&db, &s, h.clone(), config(&name)).await;
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    // A handler that panics is a failing handler: parked like the others, its lane released.
    publish(&js, &s, &Ev::seq("panics", 1)).await;
    for i in 1..=5 {
        if i <= 3 {
            xs.push(Ev::seq("x", i));
            publish(&js, &s, xs.last().unwrap()).await;
        }
        ys.push(Ev::seq("y", i));
        publish(&js, &s, ys.last().unwrap()).await;
    }
    wait_parked(&db.pool, &name, 4, Duration::from_secs(15)).await;
    wait_drained(&s, &name, Duration::from_secs(10)).await;
    let panicked: String = sqlx::query_scalar(
        "DELETE FROM outbox_consumer_dead_letter WHERE aggregate_id = 'panics' RETURNING last_error",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(panicked.contains("injected panic"), "{panicked}");
    assert_eq!(
        parked(&db.pool, &name).await,
        vec![
            (1, "handler".into()),
            (2, "held".into()),
            (3, "held".into())
        ]
    );
    // The other aggregate flowed; nothing of x was applied.
    assert_exactly_once_in_order(&effects(&db.pool).await, &ys, "y while x is parked");
    // A later event of x parks behind the others.
    xs.push(Ev::seq("x", 4));
    publish(&js, &s, &xs[3]).await;
    wait_drained(&s, &name, Duration::from_secs(10)).await;
    assert_eq!(parked(&db.pool, &name).await.len(), 4);
    let listed = outbox_cli(&db, &["consumer-dead-letters", "list", "--consumer", &name]);
    assert!(
        listed.contains("reason=handler") && listed.contains("injected failure"),
        "{listed}"
    );

    // The handler is fixed; the operator replays the first one: it and those behind it apply, in order.
    h.fail.store(false, Ordering::SeqCst);
    let out = outbox_cli(
        &db,
        &[
            "consumer-dead-letters",
            "replay",
            "--consumer",
            &name,
            "--reason",
            "handler",
        ],
    );
    assert!(out.contains("replay requested for 1"), "{out}");
    let pool = db.pool.clone();
    assert!(
        testkit::eventually(Duration::from_secs(10), || {
            let pool = pool.clone();
            async move { effects(&pool).await.len() == 9 }
        })
        .await,
        "replay applied x: {:?}",
        effects(&db.pool).await
    );
    assert!(parked(&db.pool, &name).await.is_empty());
    // x flows live again after the replay.
    xs.push(Ev::seq("x", 5));
    publish(&js, &s, &xs[4]).await;
    wait_drained(&s, &name, Duration::from_secs(10)).await;
    c.shutdown().await;
    let all: Vec<Ev> = xs.iter().chain(ys.iter()).cloned().collect();
    assert_exactly_once_in_order(&effects(&db.pool).await, &all, "after replay");
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_audit WHERE action = 'consumer_replay' AND actor = 'consumer-test'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(audited, 1, "the replay is audited");
    eprintln!("took {:?}", t0.elapsed());
}

/// Run only as a child of the crash test: consumes with a crash hook, dies at the chosen point.
#[tokio::test]
#[ignore = "child process of consumers_killed_mid_event_apply_every_event_exactly_once"]
async fn consumer_child_process() {
    let env =
        |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent test"));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&env("CHILD_DB"))
        .await
        .expect("db");
    let name = env("CHILD_CONSUMER");
    let mut cfg = config(&name);
    if let Ok(b) = std::env::var("CHILD_BATCH") {
        cfg.batch_size = b.parse().expect("batch size");
    }
    let crash = env("CHILD_CRASH");
    if let Some((at, n)) = crash.split_once(':') {
        let n: usize = n.parse().expect("crash count");
        let count = Arc::new(AtomicUsize::new(0));
        let hook: outbox::consumers::runtime::Hook = Arc::new(move |_e| {
            if count.fetch_add(1, Ordering::SeqCst) + 1 == n {
                // Dies on the spot, like SIGKILL: no destructor, no close frame, no ack.
                std::process::abort();
            }
        });
        match at {
            "before_commit" => cfg.before_commit = Some(hook),
            "after_commit" => cfg.after_commit = Some(hook),
            other => panic!("unknown crash point {other}"),
        }
    }
    let recorder = Recorder {
        delay: Duration::from_millis(
            std::env::var("CHILD_SLOW_MS").map_or(0, |v| v.parse().expect("CHILD_SLOW_MS")),
        ),
        ..Default::default()
    };
    let consumer = Consumer::new(pool, recorder, cfg).expect("consumer");
    if let Ok(queue) = std::env::var("CHILD_QUEUE") {
        let source = AmqpSource::connect(AmqpSourceConfig {
            url: testkit::rabbit::amqp_url(),
            queue,
            prefetch: 50,
            consumer_tag: name.clone(),
        })
        .await
        .expect("source");
        consumer
            .run(source, CancellationToken::new())
            .await
            .expect("runs");
    } else {
        let source = NatsSource::connect(NatsSourceConfig {
            url: testkit::nats_url(),
            stream: env("CHILD_STREAM"),
            durable: name.clone(),
            // The shipped default when asked (the resume test measures it).
            ack_wait: if std::env::var("CHILD_DEFAULT_ACK_WAIT").is_ok() {
                NatsSourceConfig::default().ack_wait
            } else {
                Duration::from_secs(2)
            },
            ..Default::default()
        })
        .await
        .expect("source");
        consumer
            .run(source, CancellationToken::new())
            .await
            .expect("runs");
    }
}

#[tokio::test]
async fn consumers_killed_mid_event_apply_every_event_exactly_once() {
    let t0 = Instant::now();
    let (seed, mut rng) = seeded();
    let (db, s, js) = db_and_stream().await;
    // Batches of 4 (the crash points fall inside batches and between them): a child dying
    // after a commit may have committed up to a batch per hot aggregate beyond its crash count,
    // so 40 events per aggregate leave every child events to crash on.
    let mut all = Vec::new();
    for seq in 1..=40 {
        for agg in ["h1", "h2", "h3"] {
            all.push(Ev::seq(agg, seq));
        }
    }
    for e in &all {
        publish(&js, &s, e).await;
    }
    let name = testkit::unique("crash");
    let spawn = |crash: String| {
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "consumer_child_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("CHILD_DB", &db.url)
            .env("CHILD_STREAM", &s.name)
            .env("CHILD_CONSUMER", &name)
            .env("CHILD_CRASH", crash)
            .env("CHILD_BATCH", "4")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child consumer")
    };
    for at in [
        "before_commit",
        "after_commit",
        "before_commit",
        "after_commit",
    ] {
        let n = rng.random_range(1..=6);
        eprintln!("crash {at} at event {n}");
        let mut child = spawn(format!("{at}:{n}"));
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .expect("child exits");
        assert!(!status.success(), "the child died at its crash point");
    }
    let mut last = spawn("none".into());
    let done = testkit::eventually(Duration::from_secs(20), || drained(&s, &name)).await;
    let _ = last.kill();
    let _ = last.wait();
    assert!(done, "the last consumer drained the stream");
    assert_exactly_once_in_order(
        &effects(&db.pool).await,
        &all,
        &format!("crashes (seed {seed})"),
    );
    eprintln!("took {:?}", t0.elapsed());
}

/// Publishes `e` to `queue` as the relay would (a new message id each time, so copies stay).
async fn publish_amqp(ch: &lapin::Channel, queue: &str, e: &Ev) {
    let mut h = FieldTable::default();
    for (k, v) in [
        ("Outbox-Event-Id", e.id.to_string()),
        ("Outbox-Tenant-Id", "t1".into()),
        ("Outbox-Aggregate-Type", "item".into()),
        ("Outbox-Aggregate-Id", e.agg.clone().unwrap()),
    ] {
        h.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    h.insert("Outbox-Seq".into(), AMQPValue::LongLongInt(e.seq.unwrap()));
    h.insert("Outbox-Seq-Epoch".into(), AMQPValue::LongLongInt(0));
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        format!(r#"{{"eventId":"{}"}}"#, e.id).as_bytes(),
        BasicProperties::default()
            .with_message_id(Uuid::new_v4().to_string().into())
            .with_headers(h),
    )
    .await
    .expect("publish")
    .await
    .expect("published");
}

/// Queue depth and unacknowledged count are both zero.
async fn queue_drained(url: &str, queue: &str) -> bool {
    let Ok(conn) = Connection::connect(url, ConnectionProperties::default()).await else {
        return false;
    };
    let Ok(ch) = conn.create_channel().await else {
        return false;
    };
    let depth = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count());
    let _ = conn.close(200, "depth read".into()).await;
    matches!(depth, Ok(0))
}

#[tokio::test]
async fn rabbitmq_duplicates_disorder_and_killed_consumers_apply_every_event_exactly_once_in_order()
{
    let t0 = Instant::now();
    let (seed, mut rng) = seeded();
    let db = TestDb::new().await;
    effect_table(&db.pool).await;
    let url = testkit::rabbit::amqp_url();
    let queue = testkit::unique("consumer_q");
    let _cleanup = QueueGuard(url.clone(), queue.clone());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    let mut all = Vec::new();
    // 30 per aggregate: with batches of 4, a child dying after a commit may have committed a
    // batch per aggregate beyond its crash count, and every child must still find its crash point.
    for seq in 1..=30 {
        for agg in ["r1", "r2", "r3"] {
            all.push(Ev::seq(agg, seq));
        }
    }
    // Out of order within windows of 30 messages, plus copies of some events (other messages,
    // same eventId). The window stays below the prefetch (50): a requeued message goes back to
    // its place in the queue, so disorder wider than the prefetch waits for the gap timeout.
    let mut sent = all.clone();
    for w in sent.chunks_mut(30) {
        w.shuffle(&mut rng);
    }
    for _ in 0..6 {
        let i = rng.random_range(0..all.len());
        sent.push(all[i].clone());
    }
    for e in &sent {
        publish_amqp(&ch, &queue, e).await;
    }
    let _ = conn.close(200, "published".into()).await;
    let name = testkit::unique("rcrash");
    let spawn = |crash: String| {
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "consumer_child_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("CHILD_DB", &db.url)
            .env("CHILD_QUEUE", &queue)
            .env("CHILD_CONSUMER", &name)
            .env("CHILD_CRASH", crash)
            .env("CHILD_BATCH", "4")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child consumer")
    };
    for at in ["before_commit", "after_commit", "after_commit"] {
        let n = rng.random_range(1..=6);
        eprintln!("crash {at} at event {n}");
        let mut child = spawn(format!("{at}:{n}"));
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .expect("child exits");
        assert!(!status.success(), "the child died at its crash point");
    }
    let mut last = spawn("none".into());
    let done = testkit::eventually(Duration::from_secs(20), || queue_drained(&url, &queue)).await;
    // Requeued (gap) messages may be in flight: let the consumer settle them.
    let pool = db.pool.clone();
    let settled = testkit::eventually(Duration::from_secs(20), || {
        let pool = pool.clone();
        async move { effects(&pool).await.len() >= 90 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = last.kill();
    let _ = last.wait();
    assert!(done && settled, "the last consumer drained the queue");
    assert_exactly_once_in_order(
        &effects(&db.pool).await,
        &all,
        &format!("rabbitmq crashes (seed {seed})"),
    );
    eprintln!("took {:?}", t0.elapsed());
}

struct QueueGuard(String, String);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        testkit::rabbit::delete_names(&self.0, vec![self.1.clone()], vec![]);
    }
}

#[tokio::test]
async fn the_event_id_set_is_bounded_by_its_retention() {
    let t0 = Instant::now();
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("retention");
    let foreign: Vec<Ev> = (0..5)
        .map(|_| Ev {
            id: Uuid::now_v7(),
            agg: None,
            seq: None,
        })
        .collect();
    for e in &foreign {
        publish(&js, &s, e).await;
    }
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    wait_drained(&s, &name, Duration::from_secs(10)).await;
    c.shutdown().await;
    let seen = |pool: PgPool, name: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM outbox_consumer_seen WHERE consumer = $1",
        )
        .bind(name)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(
        seen(db.pool.clone(), name.clone()).await,
        5,
        "one id per event without a sequence"
    );
    // Two of them age past a one-hour retention; the consumer's retention pass removes only those.
    sqlx::query(
        "UPDATE outbox_consumer_seen SET seen_at = now() - interval '2 hours'
          WHERE event_id = ANY($1)",
    )
    .bind(vec![foreign[0].id, foreign[1].id])
    .execute(&db.pool)
    .await
    .unwrap();
    let mut cfg = config(&name);
    cfg.seen_retention = Duration::from_secs(3600);
    let c = start(&db, &s, Recorder::default(), cfg).await;
    let (pool, n) = (db.pool.clone(), name.clone());
    assert!(
        testkit::eventually(Duration::from_secs(10), || seen(pool.clone(), n.clone())
            .map(|c| c == 3))
        .await,
        "the retention pass deletes the two old ids"
    );
    c.shutdown().await;
    eprintln!("took {:?}", t0.elapsed());
}

#[tokio::test]
async fn a_gap_that_never_fills_is_parked_and_applied_once_its_predecessor_arrives() {
    let t0 = Instant::now();
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("gap");
    let mut cfg = config(&name);
    cfg.gap_timeout = Duration::from_millis(400);
    let c = start(&db, &s, Recorder::default(), cfg).await;
    let g: Vec<Ev> = (1..=3).map(|i| Ev::seq("g", i)).collect();
    // Seq 1 is "lost": 2 waits for it, is parked as a gap, and 3 parks behind it.
    publish(&js, &s, &g[1]).await;
    publish(&js, &s, &g[2]).await;
    let (pool, n) = (db.pool.clone(), name.clone());
    assert!(
        testkit::eventually(Duration::from_secs(10), || {
            let (pool, n) = (pool.clone(), n.clone());
            async move {
                let p = parked(&pool, &n).await;
                // 3 parks behind 2 ("held") or, if its own wait ran out first, as a gap too.
                p.len() == 2 && p[0] == (2, "gap".into()) && p[1].0 == 3
            }
        })
        .await,
        "parked: {:?}",
        parked(&db.pool, &name).await
    );
    assert!(effects(&db.pool).await.is_empty());
    // The missing event turns up (a late redelivery): it applies, and the parked ones follow.
    publish(&js, &s, &g[0]).await;
    let pool = db.pool.clone();
    assert!(
        testkit::eventually(Duration::from_secs(10), || {
            let pool = pool.clone();
            async move { effects(&pool).await.len() == 3 }
        })
        .await,
        "{:?}",
        effects(&db.pool).await
    );
    c.shutdown().await;
    assert!(parked(&db.pool, &name).await.is_empty());
    assert_exactly_once_in_order(&effects(&db.pool).await, &g, "gap filled late");
    eprintln!("took {:?}", t0.elapsed());
}

#[tokio::test]
async fn purging_a_parked_event_skips_it_and_its_aggregate_moves_on() {
    let t0 = Instant::now();
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("purge");
    let h = Recorder {
        fail: Arc::new(AtomicBool::new(true)),
        fail_agg: "p".into(),
        ..Default::default()
    };
    let c = start(&db, &s, h.clone(), config(&name)).await;
    let p: Vec<Ev> = (1..=3).map(|i| Ev::seq("p", i)).collect();
    publish(&js, &s, &p[0]).await;
    publish(&js, &s, &p[1]).await;
    let (pool, n) = (db.pool.clone(), name.clone());
    assert!(
        testkit::eventually(Duration::from_secs(10), || {
            let (pool, n) = (pool.clone(), n.clone());
            async move { parked(&pool, &n).await.len() == 2 }
        })
        .await
    );
    h.fail.store(false, Ordering::SeqCst);
    let id = p[0].id.to_string();
    let out = outbox_cli(
        &db,
        &[
            "consumer-dead-letters",
            "purge",
            "--consumer",
            &name,
            "--id",
            &id,
            "--yes",
        ],
    );
    assert!(out.contains("purged 1"), "{out}");
    publish(&js, &s, &p[2]).await;
    let pool = db.pool.clone();
    assert!(
        testkit::eventually(Duration::from_secs(10), || {
            let pool = pool.clone();
            async move { effects(&pool).await.len() == 2 }
        })
        .await,
        "{:?}",
        effects(&db.pool).await
    );
    c.shutdown().await;
    let got: Vec<Option<i64>> = effects(&db.pool).await.iter().map(|r| r.2).collect();
    assert_eq!(
        got,
        vec![Some(2), Some(3)],
        "seq 1 skipped, 2 and 3 applied in order"
    );
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_audit WHERE action = 'consumer_purge'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 1);
    eprintln!("took {:?}", t0.elapsed());
}

/// Parked rows with their aggregate: (aggregate, seq, reason).
async fn parked_of(pool: &PgPool, name: &str) -> Vec<(String, i64, String)> {
    sqlx::query_as(
        "SELECT aggregate_id, seq, reason FROM outbox_consumer_dead_letter
          WHERE consumer = $1 ORDER BY aggregate_id, seq_epoch, seq",
    )
    .bind(name)
    .fetch_all(pool)
    .await
    .expect("parked")
}

/// Waits until `check` holds for the effect rows.
async fn wait_effects(
    pool: &PgPool,
    within: Duration,
    check: impl Fn(&[(Uuid, Option<String>, Option<i64>)]) -> bool,
) {
    let check = &check;
    let ok = testkit::eventually(within, || {
        let pool = pool.clone();
        async move { check(&effects(&pool).await) }
    })
    .await;
    assert!(ok, "effects: {:?}", effects(pool).await);
}

async fn request_replay(db: &TestDb, name: &str, id: Option<Uuid>, accept_gap: bool) {
    let filter = outbox::consumers::dead_letters::ParkedFilter {
        consumer: Some(name.into()),
        event_id: id,
        ..Default::default()
    };
    outbox::consumers::dead_letters::request_replay(&db.pool, &filter, "test", accept_gap)
        .await
        .expect("replay requested");
}

/// Issue 18.1: an epoch change used to overtake a parked event (E2/1 applied at once), and the
/// replay then deleted the parked E1 event as a "duplicate" without running its handler.
#[tokio::test]
async fn a_new_epoch_never_overtakes_a_parked_event_of_the_previous_one() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("epoch");
    let h = Recorder {
        fail: Arc::new(AtomicBool::new(true)),
        fail_agg: "e".into(),
        ..Default::default()
    };
    let c = start(&db, &s, h.clone(), config(&name)).await;
    let (e1_1, e1_2, e2_1) = (Ev::seq("e", 1), Ev::seq("e", 2), Ev::seq("e", 1));
    h.fail.store(false, Ordering::SeqCst);
    publish_with(&js, &s, &e1_1, 5, &[]).await;
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 1).await;
    h.fail.store(true, Ordering::SeqCst);
    publish_with(&js, &s, &e1_2, 5, &[]).await;
    wait_parked(&db.pool, &name, 1, Duration::from_secs(10)).await;
    // The relay compacted the aggregate: its next event starts epoch 9 at seq 1.
    publish_with(&js, &s, &e2_1, 9, &[]).await;
    wait_parked(&db.pool, &name, 2, Duration::from_secs(10)).await;
    assert_eq!(effects(&db.pool).await.len(), 1, "E2/1 must not pass E1/2");
    h.fail.store(false, Ordering::SeqCst);
    request_replay(&db, &name, None, false).await;
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 2).await;
    // E1/2 is applied; E2/1 still cannot know that E1 ended at 2: it stays parked for an
    // operator (strict start policy).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(effects(&db.pool).await[1].0, e1_2.id);
    assert_eq!(parked_of(&db.pool, &name).await.len(), 1);
    request_replay(&db, &name, Some(e2_1.id), true).await;
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 3).await;
    c.shutdown().await;
    let ids: Vec<Uuid> = effects(&db.pool).await.iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![e1_1.id, e1_2.id, e2_1.id]);
    let skips: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_consumer_skip WHERE consumer = $1 AND reason = 'operator'",
    )
    .bind(&name)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(skips, 1, "the operator's start is on record");
}

/// Issue 18.2: a consumer that never saw seq 1 of an aggregate applied none of its events. With
/// the permissive start policy it starts at the lowest event that waited the gap timeout; an
/// earlier event that is only being retried keeps its place; one arriving after the start is
/// parked as `late`, never dropped.
#[tokio::test]
async fn a_late_consumer_starts_after_the_gap_timeout_and_a_retried_seq_1_keeps_its_place() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("late");
    let h = Recorder {
        fail: Arc::new(AtomicBool::new(true)),
        fail_agg: "r".into(),
        ..Default::default()
    };
    let mut cfg = config(&name);
    cfg.start_policy = outbox::consumers::StartPolicy::AfterGapTimeout;
    cfg.gap_timeout = Duration::from_millis(800);
    cfg.max_attempts = 1000;
    let c = start(&db, &s, h.clone(), cfg).await;
    // b: its seq 1 and 2 were published before this consumer existed.
    let b: Vec<Ev> = (1..=4).map(|i| Ev::seq("b", i)).collect();
    publish(&js, &s, &b[2]).await;
    publish(&js, &s, &b[3]).await;
    // r: seq 1 fails for longer than the gap timeout; seq 2 must wait for it.
    let r: Vec<Ev> = (1..=2).map(|i| Ev::seq("r", i)).collect();
    publish(&js, &s, &r[0]).await;
    publish(&js, &s, &r[1]).await;
    wait_effects(&db.pool, Duration::from_secs(15), |e| e.len() == 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seqs = |rows: &[(Uuid, Option<String>, Option<i64>)], agg: &str| -> Vec<i64> {
        rows.iter()
            .filter(|r| r.1.as_deref() == Some(agg))
            .filter_map(|r| r.2)
            .collect()
    };
    assert_eq!(seqs(&effects(&db.pool).await, "b"), vec![3, 4]);
    assert!(
        seqs(&effects(&db.pool).await, "r").is_empty(),
        "r's seq 2 must not start past a seq 1 that is being retried"
    );
    h.fail.store(false, Ordering::SeqCst);
    wait_effects(&db.pool, Duration::from_secs(15), |e| e.len() == 4).await;
    assert_eq!(seqs(&effects(&db.pool).await, "r"), vec![1, 2]);
    // b's seq 2 turns up after the start: parked as late, not dropped.
    publish(&js, &s, &b[1]).await;
    let (pool, n) = (db.pool.clone(), name.clone());
    assert!(
        testkit::eventually(Duration::from_secs(10), || {
            let (pool, n) = (pool.clone(), n.clone());
            async move { parked_of(&pool, &n).await == vec![("b".into(), 2, "late".into())] }
        })
        .await,
        "{:?}",
        parked_of(&db.pool, &name).await
    );
    c.shutdown().await;
    let started: Vec<(Option<i64>, i64, String)> = sqlx::query_as(
        "SELECT from_seq, to_seq, reason FROM outbox_consumer_skip WHERE consumer = $1",
    )
    .bind(&name)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(started, vec![(None, 3, "start_policy".into())]);
}

/// Issue 18.2: a producer's purge publishes a skip marker in the purged event's place; the
/// consumer moves past it without running the handler and records that it did.
#[tokio::test]
async fn a_producer_skip_marker_is_passed_over_and_recorded() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("skip");
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    let k: Vec<Ev> = (1..=3).map(|i| Ev::seq("k", i)).collect();
    publish(&js, &s, &k[0]).await;
    publish_with(&js, &s, &k[1], 0, &[("Outbox-Skip", "purged")]).await;
    publish(&js, &s, &k[2]).await;
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 2).await;
    c.shutdown().await;
    let got: Vec<Option<i64>> = effects(&db.pool).await.iter().map(|r| r.2).collect();
    assert_eq!(got, vec![Some(1), Some(3)]);
    let skipped: Vec<(Option<i64>, i64, String)> = sqlx::query_as(
        "SELECT from_seq, to_seq, reason FROM outbox_consumer_skip WHERE consumer = $1",
    )
    .bind(&name)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(skipped, vec![(Some(1), 2, "purged".into())]);
}

/// Issue 18.3: a handler that swallowed a database error had its events acknowledged with
/// nothing applied (COMMIT of an aborted transaction answers ROLLBACK without an error); as the
/// last of a batch, the whole batch went so. The event is now that handler's failure, alone.
#[tokio::test]
async fn a_handler_that_swallows_a_database_error_is_never_acknowledged_unapplied() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("swallow");
    // A backlog first, so that the events share batches: the swallowing one lands at some
    // place in a batch of many (the lanes are sorted by hash), and alone in the last round.
    let mut evs: Vec<Ev> = (0..40).map(|i| Ev::seq(&format!("ok{i}"), 1)).collect();
    evs.insert(20, Ev::seq("swallows", 1));
    for e in &evs {
        publish(&js, &s, e).await;
    }
    let mut cfg = config(&name);
    cfg.concurrency = 1;
    cfg.batch_size = 64;
    let c = start(&db, &s, Recorder::default(), cfg).await;
    wait_parked(&db.pool, &name, 1, Duration::from_secs(15)).await;
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 40).await;
    // Alone: a single-event transaction.
    let again = Ev::seq("swallows", 2);
    publish(&js, &s, &again).await;
    wait_parked(&db.pool, &name, 2, Duration::from_secs(15)).await;
    c.shutdown().await;
    let p = parked_of(&db.pool, &name).await;
    assert_eq!(
        p,
        vec![
            ("swallows".into(), 1, "handler".into()),
            ("swallows".into(), 2, "held".into())
        ]
    );
    let positions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_consumer_position WHERE consumer = $1 AND aggregate_id = 'swallows'",
    )
    .bind(&name)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        positions, 0,
        "nothing of the swallowing handler's events committed"
    );
}

/// Issue 18.5: a NUL in a header made every inbox statement fail (SQLSTATE 22021), which was
/// retried as a database outage for ever and never parked: as many of them as the prefetch
/// stopped all delivery. They are now that event's failure, parked with their exact headers.
#[tokio::test]
async fn poison_headers_are_parked_and_the_rest_flows() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("poison");
    let mut cfg = config(&name);
    cfg.concurrency = 2;
    let mut src = source_config(&s, &name);
    src.max_ack_pending = 4;
    let source = NatsSource::connect(src).await.expect("source");
    let consumer = Consumer::new(db.pool.clone(), Recorder::default(), cfg).expect("consumer");
    let stop = CancellationToken::new();
    let st = stop.clone();
    let task = tokio::spawn(async move { consumer.run(source, st).await });
    let poison: Vec<Ev> = (0..6).map(|i| Ev::seq(&format!("p\0{i}"), 1)).collect();
    for e in &poison {
        publish(&js, &s, e).await;
    }
    let fine: Vec<Ev> = (1..=3).map(|i| Ev::seq("fine", i)).collect();
    for e in &fine {
        publish(&js, &s, e).await;
    }
    wait_effects(&db.pool, Duration::from_secs(15), |e| e.len() == 3).await;
    wait_parked(&db.pool, &name, 6, Duration::from_secs(15)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let raw: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT headers_raw FROM outbox_consumer_dead_letter WHERE consumer = $1",
    )
    .bind(&name)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for r in raw {
        let h: std::collections::BTreeMap<String, String> = serde_json::from_slice(&r).unwrap();
        assert!(
            h["Outbox-Aggregate-Id"].contains('\0'),
            "kept exactly: {h:?}"
        );
    }
}

/// Issue 18.6: positions knew no producer, so two outbox databases publishing the same
/// aggregate key dropped each other's events as duplicates. A legacy position (events without
/// `Outbox-Producer-Id`, from an older relay) is taken over by the first producer that names
/// itself, so an upgrade of the relay strands nothing.
#[tokio::test]
async fn two_producers_of_one_aggregate_key_keep_their_own_positions() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("producers");
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    let (p1, p2) = (Uuid::now_v7().to_string(), Uuid::now_v7().to_string());
    let old: Vec<Ev> = (1..=2).map(|i| Ev::seq("m", i)).collect();
    let new: Vec<Ev> = (3..=4).map(|i| Ev::seq("m", i)).collect();
    let other: Vec<Ev> = (1..=2).map(|i| Ev::seq("m", i)).collect();
    // An old relay (no producer id), then the same database's relay upgraded.
    for e in &old {
        publish(&js, &s, e).await;
    }
    for e in &new {
        publish_with(&js, &s, e, 0, &[("Outbox-Producer-Id", p1.as_str())]).await;
    }
    // Another database publishing the same aggregate key.
    for e in &other {
        publish_with(&js, &s, e, 0, &[("Outbox-Producer-Id", p2.as_str())]).await;
    }
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 6).await;
    c.shutdown().await;
    let positions: Vec<(String, i64)> = sqlx::query_as(
        "SELECT producer, seq FROM outbox_consumer_position WHERE consumer = $1 ORDER BY seq",
    )
    .bind(&name)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut want = vec![(p2.clone(), 2), (p1.clone(), 4)];
    want.sort_by_key(|w| w.1);
    assert_eq!(positions, want);
}

/// Issue 18.7: purging a parked event moved the position past an earlier parked event that was
/// not purged (a later replay then dropped that one as a duplicate). Such a purge is refused.
#[tokio::test]
async fn a_purge_may_not_move_the_position_past_an_earlier_parked_event() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("purge-order");
    let h = Recorder {
        fail: Arc::new(AtomicBool::new(true)),
        fail_agg: "q".into(),
        ..Default::default()
    };
    let c = start(&db, &s, h.clone(), config(&name)).await;
    let q: Vec<Ev> = (1..=2).map(|i| Ev::seq("q", i)).collect();
    publish(&js, &s, &q[0]).await;
    publish(&js, &s, &q[1]).await;
    wait_parked(&db.pool, &name, 2, Duration::from_secs(10)).await;
    let filter = outbox::consumers::dead_letters::ParkedFilter {
        consumer: Some(name.clone()),
        event_id: Some(q[1].id),
        ..Default::default()
    };
    let refused = outbox::consumers::dead_letters::purge(&db.pool, &filter, "test").await;
    assert!(refused.is_err(), "{refused:?}");
    h.fail.store(false, Ordering::SeqCst);
    request_replay(&db, &name, None, false).await;
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 2).await;
    c.shutdown().await;
}

/// Parks `n` events directly (as the runtime would have): aggregates `{prefix}{i}` of `tenant`,
/// each at `seq` with `reason`.
async fn park_rows(
    pool: &PgPool,
    name: &str,
    tenant: &str,
    prefix: &str,
    n: i64,
    seq: i64,
    reason: &str,
) {
    sqlx::query(
        "INSERT INTO outbox_consumer_dead_letter
             (consumer, event_id, event_type, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq,
              subject, headers, payload, reason)
         SELECT $1, gen_random_uuid(), 'test.happened', $2, 'item', $3 || lpad(i::text, 4, '0'), 0, $4,
                'x', '{}'::jsonb, '{}'::bytea, $5
           FROM generate_series(1, $6) i",
    )
    .bind(name)
    .bind(tenant)
    .bind(prefix)
    .bind(seq)
    .bind(reason)
    .bind(n)
    .execute(pool)
    .await
    .expect("parked rows");
}

/// Parks `e` directly (tenant `tenant`, aggregate type `item`) with `reason`.
async fn park_event(pool: &PgPool, name: &str, tenant: &str, e: &Ev, reason: &str) {
    sqlx::query(
        "INSERT INTO outbox_consumer_dead_letter
             (consumer, event_id, event_type, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq,
              subject, headers, payload, reason)
         VALUES ($1, $2, 'test.happened', $3, 'item', $4, 0, $5, 'x', '{}'::jsonb, '{}'::bytea, $6)",
    )
    .bind(name)
    .bind(e.id)
    .bind(tenant)
    .bind(&e.agg)
    .bind(e.seq)
    .bind(reason)
    .execute(pool)
    .await
    .expect("parked event");
}

async fn applied(pool: &PgPool, id: Uuid) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM effect WHERE event_id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("effect")
}

#[tokio::test]
async fn a_replay_is_applied_promptly_behind_hundreds_of_waiting_aggregates() {
    let t0 = Instant::now();
    let (db, s, _js) = db_and_stream().await;
    let name = testkit::unique("starve");
    // 600 aggregates of one tenant wait for a predecessor that never comes (seq 2 parked as a
    // gap, nothing applied before it): the replayer looks at them again and again.
    park_rows(&db.pool, &name, "t0", "w", 600, 2, "gap").await;
    // Another tenant: one event parked by a failing handler, which the operator replays...
    let x = Ev::seq("x", 1);
    park_event(&db.pool, &name, "t9", &x, "handler").await;
    // ... and one gap whose predecessor was applied meanwhile (it may follow now).
    sqlx::query(
        "INSERT INTO outbox_consumer_position (consumer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq)
         VALUES ($1, 't9', 'item', 'y', 0, 1)",
    )
    .bind(&name)
    .execute(&db.pool)
    .await
    .unwrap();
    let y = Ev::seq("y", 2);
    park_event(&db.pool, &name, "t9", &y, "gap").await;
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let asked = Instant::now();
    let ids = outbox::consumers::dead_letters::request_replay(
        &db.pool,
        &outbox::consumers::dead_letters::ParkedFilter {
            consumer: Some(name.clone()),
            event_id: Some(x.id),
            ..Default::default()
        },
        "test",
        false,
    )
    .await
    .expect("replay requested");
    assert_eq!(ids, vec![x.id]);
    let pool = db.pool.clone();
    let done = testkit::eventually(Duration::from_secs(20), || applied(&pool, x.id)).await;
    let took = asked.elapsed();
    eprintln!("requested replay applied after {took:?} behind 600 waiting aggregates");
    assert!(
        done && took < Duration::from_secs(3),
        "the requested replay was not applied within 3 s ({took:?})"
    );
    // Every waiting aggregate is looked at in turn: y, after the 600, follows too.
    let done = testkit::eventually(Duration::from_secs(20), || applied(&pool, y.id)).await;
    eprintln!(
        "the waiting aggregate after the 600 applied {:?} after start",
        asked.elapsed()
    );
    assert!(done, "the gap behind 600 others was never looked at again");
    c.shutdown().await;
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_consumer_dead_letter WHERE consumer = $1")
            .bind(&name)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, 600, "only the 600 real gaps stay parked");
    eprintln!("took {:?}", t0.elapsed());
}

#[tokio::test]
async fn an_aggregate_with_more_parked_events_than_one_pass_applies_is_replayed_whole_in_order() {
    let t0 = Instant::now();
    let (db, s, _js) = db_and_stream().await;
    let name = testkit::unique("long");
    // 250 parked events of one aggregate (a pass applies at most 100 of an aggregate): the
    // first parked by its handler, the others behind it.
    let big: Vec<Ev> = (1..=250).map(|i| Ev::seq("big", i)).collect();
    for e in &big {
        let reason = if e.seq == Some(1) { "handler" } else { "held" };
        park_event(&db.pool, &name, "t1", e, reason).await;
    }
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    outbox::consumers::dead_letters::request_replay(
        &db.pool,
        &outbox::consumers::dead_letters::ParkedFilter {
            consumer: Some(name.clone()),
            event_id: Some(big[0].id),
            ..Default::default()
        },
        "test",
        false,
    )
    .await
    .expect("replay requested");
    let pool = db.pool.clone();
    let asked = Instant::now();
    let done = testkit::eventually(Duration::from_secs(30), || {
        let pool = pool.clone();
        async move { effects(&pool).await.len() == 250 }
    })
    .await;
    eprintln!("250 parked events replayed in {:?}", asked.elapsed());
    assert!(done, "replayed {} of 250", effects(&db.pool).await.len());
    c.shutdown().await;
    assert_exactly_once_in_order(&effects(&db.pool).await, &big, "long replay");
    assert!(parked(&db.pool, &name).await.is_empty());
    eprintln!("took {:?}", t0.elapsed());
}

/// Redeliveries by the durable consumer so far: every delivery takes a consumer sequence, the
/// first of each message its stream sequence too (the consumer reads the whole stream).
async fn redeliveries(s: &TestStream, durable: &str) -> u64 {
    let js = jetstream::new(
        async_nats::connect(testkit::nats_url())
            .await
            .expect("NATS"),
    );
    let mut c = js
        .get_stream(&s.name)
        .await
        .expect("stream")
        .get_consumer::<jetstream::consumer::pull::Config>(durable)
        .await
        .expect("consumer");
    let i = c.info().await.expect("consumer info");
    i.delivered.consumer_sequence - i.delivered.stream_sequence
}

async fn ack_pending(s: &TestStream, durable: &str) -> usize {
    let js = jetstream::new(
        async_nats::connect(testkit::nats_url())
            .await
            .expect("NATS"),
    );
    let Ok(stream) = js.get_stream(&s.name).await else {
        return 0;
    };
    let Ok(mut c) = stream
        .get_consumer::<jetstream::consumer::pull::Config>(durable)
        .await
    else {
        return 0;
    };
    c.info().await.map_or(0, |i| i.num_ack_pending)
}

#[tokio::test]
async fn a_consumer_killed_holding_unacked_messages_is_resumed_within_5_s_of_its_restart() {
    let t0 = Instant::now();
    let (db, s, js) = db_and_stream().await;
    let mut all = Vec::new();
    for seq in 1..=10 {
        for a in 0..40 {
            all.push(Ev::seq(&format!("k{a}"), seq));
        }
    }
    for e in &all {
        publish(&js, &s, e).await;
    }
    let name = testkit::unique("resume");
    let spawn = |slow_ms: &str| {
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "consumer_child_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("CHILD_DB", &db.url)
            .env("CHILD_STREAM", &s.name)
            .env("CHILD_CONSUMER", &name)
            .env("CHILD_CRASH", "none")
            .env("CHILD_SLOW_MS", slow_ms)
            .env("CHILD_DEFAULT_ACK_WAIT", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child consumer")
    };
    // A slow consumer holds every message (400 < max_ack_pending) and has applied a few.
    let mut slow = spawn("20");
    let pool = db.pool.clone();
    assert!(
        testkit::eventually(Duration::from_secs(20), || {
            let pool = pool.clone();
            async move { !effects(&pool).await.is_empty() }
        })
        .await,
        "the slow consumer applied something"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.kill().expect("SIGKILL");
    let _ = slow.wait();
    let held = ack_pending(&s, &name).await;
    let before = effects(&db.pool).await.len();
    eprintln!("killed holding {held} unacknowledged messages, {before} of 400 applied");
    assert!(
        held > 0 && before < 400,
        "the killed consumer held unacknowledged messages"
    );
    let restarted = Instant::now();
    resumed(&db, spawn("0"), restarted, &all, "resume").await;
    eprintln!("took {:?}", t0.elapsed());
}

/// Waits until the consumer `next`, started at `restarted`, has applied every event of `all`
/// (400), stops it, and checks them and the time it took.
async fn resumed(
    db: &TestDb,
    mut next: std::process::Child,
    restarted: Instant,
    all: &[Ev],
    context: &str,
) {
    let pool = db.pool.clone();
    let done = testkit::eventually(Duration::from_secs(60), || {
        let pool = pool.clone();
        async move { effects(&pool).await.len() >= all.len() }
    })
    .await;
    let took = restarted.elapsed();
    let _ = next.kill();
    let _ = next.wait();
    eprintln!("{context}: restart to every event applied: {took:?}");
    assert!(done, "the restarted consumer applied every event");
    assert_exactly_once_in_order(&effects(&db.pool).await, all, context);
    // The goal (5 s) is a speed figure, measured and recorded in docs/benchmarks.md; this bound
    // only tells the fix from a 30 s ack wait on a loaded machine.
    assert!(
        took < Duration::from_secs(15),
        "restart to applied took {took:?} (goal: 5 s)"
    );
}

#[tokio::test]
async fn a_backlog_held_longer_than_the_ack_wait_is_not_redelivered() {
    let t0 = Instant::now();
    let (db, s, js) = db_and_stream().await;
    // 2,000 events; the consumer takes 1,024 at once (max_ack_pending) and applies about 140
    // a second here (2 workers, 10 ms per event): the last of them waits some 7 s in its
    // buffer, seven times the ack wait.
    let all: Vec<Ev> = (1..=40)
        .flat_map(|seq| (0..50).map(move |a| Ev::seq(&format!("b{a}"), seq)))
        .collect();
    let publishes = all.iter().map(|e| publish(&js, &s, e));
    futures::stream::iter(publishes)
        .buffered(64)
        .collect::<Vec<()>>()
        .await;
    let name = testkit::unique("held");
    let mut cfg = config(&name);
    cfg.concurrency = 2;
    let h = Recorder {
        delay: Duration::from_millis(10),
        ..Default::default()
    };
    let source = NatsSource::connect(NatsSourceConfig {
        ack_wait: Duration::from_secs(1),
        ..source_config(&s, &name)
    })
    .await
    .expect("source");
    let consumer = Consumer::new(db.pool.clone(), h, cfg).expect("consumer");
    let stop = CancellationToken::new();
    let st = stop.clone();
    let task = tokio::spawn(async move { consumer.run(source, st).await });
    let c = Running { stop, task };
    let drained_at = Instant::now();
    wait_drained(&s, &name, Duration::from_secs(60)).await;
    eprintln!("drained 2,000 events in {:?}", drained_at.elapsed());
    let again = redeliveries(&s, &name).await;
    c.shutdown().await;
    assert_exactly_once_in_order(&effects(&db.pool).await, &all, "held backlog");
    assert_eq!(
        again, 0,
        "messages held in the consumer's buffer were redelivered"
    );
    eprintln!("took {:?}", t0.elapsed());
}

#[tokio::test]
async fn rabbitmq_a_consumer_killed_holding_unacked_messages_is_resumed_at_once() {
    let t0 = Instant::now();
    let db = TestDb::new().await;
    effect_table(&db.pool).await;
    let url = testkit::rabbit::amqp_url();
    let queue = testkit::unique("resume_q");
    let _cleanup = QueueGuard(url.clone(), queue.clone());
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    let mut all = Vec::new();
    for seq in 1..=10 {
        for a in 0..40 {
            all.push(Ev::seq(&format!("k{a}"), seq));
        }
    }
    for e in &all {
        publish_amqp(&ch, &queue, e).await;
    }
    let _ = conn.close(200, "published".into()).await;
    let name = testkit::unique("rresume");
    let spawn = |slow_ms: &str| {
        Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "consumer_child_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("CHILD_DB", &db.url)
            .env("CHILD_QUEUE", &queue)
            .env("CHILD_CONSUMER", &name)
            .env("CHILD_CRASH", "none")
            .env("CHILD_SLOW_MS", slow_ms)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the child consumer")
    };
    let mut slow = spawn("20");
    let pool = db.pool.clone();
    assert!(
        testkit::eventually(Duration::from_secs(20), || {
            let pool = pool.clone();
            async move { !effects(&pool).await.is_empty() }
        })
        .await,
        "the slow consumer applied something"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.kill().expect("SIGKILL");
    let _ = slow.wait();
    let before = effects(&db.pool).await.len();
    eprintln!("killed with {before} of 400 applied");
    let restarted = Instant::now();
    resumed(&db, spawn("0"), restarted, &all, "rabbitmq resume").await;
    eprintln!("took {:?}", t0.elapsed());
}

/// The figure in docs/benchmarks.md: `CONSUMER_BACKLOG=100000 cargo test -p outbox-cli --test
/// consumer -- --ignored backlog_redeliveries --nocapture`. A backlog drained with the default
/// settings; prints the drain time and the redeliveries (0 expected).
#[tokio::test]
#[ignore = "a benchmark: run by hand"]
async fn backlog_redeliveries() {
    let n: i64 = std::env::var("CONSUMER_BACKLOG").map_or(100_000, |v| v.parse().expect("count"));
    let (db, s, js) = db_and_stream().await;
    let aggregates = 1000;
    let all: Vec<Ev> = (1..=n / aggregates)
        .flat_map(|seq| (0..aggregates).map(move |a| Ev::seq(&format!("a{a}"), seq)))
        .collect();
    let t = Instant::now();
    let publishes = all.iter().map(|e| publish(&js, &s, e));
    futures::stream::iter(publishes)
        .buffered(256)
        .collect::<Vec<()>>()
        .await;
    eprintln!("published {} in {:?}", all.len(), t.elapsed());
    let name = testkit::unique("backlog");
    let source = NatsSource::connect(NatsSourceConfig {
        url: testkit::nats_url(),
        stream: s.name.clone(),
        durable: name.clone(),
        ..Default::default()
    })
    .await
    .expect("source");
    let consumer = Consumer::new(
        db.pool.clone(),
        Recorder::default(),
        ConsumerConfig::new(&name),
    )
    .expect("consumer");
    let stop = CancellationToken::new();
    let st = stop.clone();
    let task = tokio::spawn(async move { consumer.run(source, st).await });
    let t = Instant::now();
    wait_drained(&s, &name, Duration::from_secs(900)).await;
    let secs = t.elapsed().as_secs_f64();
    let again = redeliveries(&s, &name).await;
    Running { stop, task }.shutdown().await;
    eprintln!(
        "drained {} events in {secs:.1} s ({:.0} ev/s), redeliveries {again}",
        all.len(),
        all.len() as f64 / secs
    );
}

/// A compacted aggregate's old epoch arriving after its new seq 1 was applied (the consumer
/// never saw the old epoch) was acknowledged as a duplicate, never applied: it is parked as
/// `late` now (the position remembers where the consumer started the aggregate).
#[tokio::test]
async fn an_old_epoch_arriving_after_the_new_one_started_is_parked_late_not_dropped() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("before-start");
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    let (new, old) = (Ev::seq("z", 1), Ev::seq("z", 3));
    publish_with(&js, &s, &new, 9, &[]).await;
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 1).await;
    publish_with(&js, &s, &old, 5, &[]).await;
    let (pool, n) = (db.pool.clone(), name.clone());
    assert!(
        testkit::eventually(Duration::from_secs(10), || {
            let (pool, n) = (pool.clone(), n.clone());
            async move { parked_of(&pool, &n).await == vec![("z".into(), 3, "late".into())] }
        })
        .await,
        "{:?}",
        parked_of(&db.pool, &name).await
    );
    c.shutdown().await;
    assert_eq!(effects(&db.pool).await.len(), 1);
}

/// A consumer killed between parking an event (committed) and acknowledging it gets the event
/// redelivered: it was applied then, and an operator's later purge of the parked row "skipped" an
/// event that had been applied (the consumer soak found it, seed 7158069551119575883). A delivery
/// of a parked event is acknowledged without running the handler now: the parked row is the one
/// an operator replays or purges.
#[tokio::test]
async fn a_redelivered_parked_event_is_not_applied_beside_its_parked_row() {
    let (db, s, js) = db_and_stream().await;
    let name = testkit::unique("parked-again");
    let first = Ev::seq("v", 1);
    // Parked by a process that died before its acknowledgement.
    park_event(&db.pool, &name, "t1", &first, "handler").await;
    let c = start(&db, &s, Recorder::default(), config(&name)).await;
    publish(&js, &s, &first).await;
    wait_drained(&s, &name, Duration::from_secs(10)).await;
    assert!(
        effects(&db.pool).await.is_empty(),
        "applied beside its parked row"
    );
    // The operator replays it: applied once, the parked row gone.
    request_replay(&db, &name, Some(first.id), false).await;
    wait_effects(&db.pool, Duration::from_secs(10), |e| e.len() == 1).await;
    c.shutdown().await;
    assert!(parked_of(&db.pool, &name).await.is_empty());
}
