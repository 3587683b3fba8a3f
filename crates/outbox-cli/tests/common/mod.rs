//! Helpers shared by this crate's integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox::nats::NatsConfig;
use outbox::RelayConfig;
use testkit::{TestDb, TestStream};

#[allow(unused_imports)] // not every test file uses every helper
pub use testkit::relay::{free_port, start_relay_on, InProcessRelay};

/// Relay settings fit for tests: short lease and poll, quick retries.
pub fn test_config() -> RelayConfig {
    RelayConfig {
        relay_id: testkit::unique("relay"),
        poll_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1500),
        retry: outbox::RetryPolicy {
            base: Duration::from_millis(50),
            cap: Duration::from_millis(500),
            max_attempts: 4,
            ..Default::default()
        },
        ..Default::default()
    }
}

pub async fn start_relay(db: &TestDb, nats: NatsConfig, config: RelayConfig) -> InProcessRelay {
    start_relay_on(db.pool.clone(), nats, config).await
}

/// A relay child process, killed when dropped.
pub struct RelayProcess(pub Child);

impl RelayProcess {
    pub fn spawn(db: &TestDb, stream: &TestStream, extra: &[&str]) -> Self {
        Self::spawn_via(db, stream, &testkit::nats_url(), extra)
    }

    /// A relay reaching NATS at `nats_url` (a proxy, in outage tests); `extra` flags override.
    pub fn spawn_via(db: &TestDb, stream: &TestStream, nats_url: &str, extra: &[&str]) -> Self {
        let subjects = format!("{}.>", stream.prefix);
        let template = format!("{}.{{tenant}}.{{topic}}", stream.prefix);
        let mut args = vec![
            "relay",
            "--nats-stream",
            &stream.name,
            "--nats-stream-subjects",
            &subjects,
            "--nats-subject",
            &template,
            "--lease-ms",
            "1500",
            "--poll-interval-ms",
            "100",
        ];
        // clap refuses a flag given twice: no HTTP server unless the caller asks for one.
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr", ""]);
        }
        let child = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(&args)
            .args(extra)
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", nats_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outbox relay");
        Self(child)
    }

    /// An `outbox` child process with these arguments (no HTTP server unless `args` name one)
    /// and environment, besides `DATABASE_URL`.
    pub fn spawn_args(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox"));
        cmd.args(args);
        if !args.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", ""]);
        }
        let child = cmd
            .envs(env.iter().copied())
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outbox relay");
        Self(child)
    }

    pub fn sigkill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        self.0.wait().expect("wait relay")
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Inserts `n` events spread over `aggregates` aggregates and 3 tenants with one SQL statement,
/// as a writer in any language would.
pub async fn insert_backlog(db: &TestDb, n: i64, aggregates: i64) {
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 't' || (g % 3), 'V', 'a' || (g % $2), 'Bulk', 'bulk.created',
                convert_to(json_build_object('g', g)::text, 'UTF8')
         FROM generate_series(1, $1) AS g ORDER BY g",
    )
    .bind(n)
    .bind(aggregates)
    .execute(&db.pool)
    .await
    .expect("insert backlog");
}

/// Inserts, in one statement and in this order: per refused aggregate `r0..`, `per_agg` events on
/// topic `full.topic` of tenant `t0` (routing key `full.topic.t0`); an aggregate `m` whose first
/// event goes there and whose next `per_agg - 1` go to `ok.topic`; and `healthy_aggs` aggregates
/// `h0..` with `per_agg` events each on `ok.topic` of tenants `t0`..`t2`.
pub async fn insert_routes(db: &TestDb, refused_aggs: i64, healthy_aggs: i64, per_agg: i64) {
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), tenant, 'V', agg, 'Bulk', topic, convert_to(json_build_object('k', k)::text, 'UTF8')
         FROM (
             SELECT 1 AS part, g AS k, 't0' AS tenant, 'r' || (g % $1) AS agg, 'full.topic' AS topic
             FROM generate_series(0, $1 * $3 - 1) AS g
             UNION ALL
             SELECT 2, g, 't0', 'm', CASE WHEN g = 0 THEN 'full.topic' ELSE 'ok.topic' END
             FROM generate_series(0, $3 - 1) AS g
             UNION ALL
             SELECT 3, g, 't' || ((g % $2) % 3), 'h' || (g % $2), 'ok.topic'
             FROM generate_series(0, $2 * $3 - 1) AS g
         ) AS x ORDER BY part, k",
    )
    .bind(refused_aggs)
    .bind(healthy_aggs)
    .bind(per_agg)
    .execute(&db.pool)
    .await
    .expect("insert events");
}

/// How many back-off intervals of a refused route fit in `elapsed` (100 ms doubling, capped at the
/// default broker back-off cap of 5 s, as `outbox::relay::routes::back_off`): the most probes a
/// refused route may get in that time, after the refusals of its first batch.
pub fn route_probes(elapsed: Duration) -> u32 {
    let (mut n, mut t) = (0u32, Duration::ZERO);
    while t < elapsed {
        n += 1;
        t += Duration::from_millis(100u64 << (n - 1).min(16)).min(Duration::from_secs(5));
    }
    n
}

/// While one route is refused: every healthy event published, nothing dead, no attempt spent,
/// and aggregate `m` (whose head goes to the refused route, its later events elsewhere) still
/// waiting behind its head.
pub async fn assert_route_held_back(db: &TestDb, healthy_total: i64) {
    assert_eq!(count(db, "published").await, healthy_total);
    assert_eq!(count(db, "dead").await, 0, "nothing dead");
    assert_eq!(
        attempts_spent(db).await,
        0,
        "a refused route spends no attempt"
    );
    let m_published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_published WHERE aggregate_id = 'm'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        m_published, 0,
        "m's later events (another route) wait behind its refused head"
    );
}

pub async fn count(db: &TestDb, status: &str) -> i64 {
    // Published rows live in their own table (migration `..._published_archive.sql`).
    let sql = if status == "published" {
        "SELECT count(*) FROM outbox_published WHERE $1 = 'published'"
    } else {
        "SELECT count(*) FROM outbox_event WHERE status = $1"
    };
    sqlx::query_scalar(sql)
        .bind(status)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A `StockLevelChangedEvent` of the product variant `agg` carrying `data`.
pub fn stock_event(tenant: &str, agg: &str, data: serde_json::Value) -> outbox::NewEvent {
    outbox::NewEvent::new(
        tenant,
        "ProductVariant",
        agg,
        "StockLevelChangedEvent",
        "inventory.stock.changed",
        data,
    )
}

/// Failed attempts spent by the events still in `outbox_event` (an outage must spend none).
pub async fn attempts_spent(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT coalesce(sum(attempts), 0) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A message read back from the stream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub event_id: String,
    pub aggregate: String,
    pub seq: i64,
    pub subject: String,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
}

pub async fn seen(stream: &TestStream) -> Vec<Seen> {
    seen_of(stream.messages().await)
}

/// [`Seen`] of messages read from any server (a private one, with its own `read_stream`).
pub fn seen_of(msgs: Vec<async_nats::jetstream::message::StreamMessage>) -> Vec<Seen> {
    msgs.into_iter()
        .map(|m| {
            let h = m.headers.clone();
            let mut headers = HashMap::new();
            for (k, vs) in h.iter() {
                if let Some(v) = vs.first() {
                    headers.insert(k.to_string(), v.to_string());
                }
            }
            // A compact-encoded message reads as its full headers (kept beside `Outbox-Meta`).
            if let Some(meta) = headers.get(outbox::meta::META_HEADER).cloned() {
                let meta = outbox::meta::Meta::decode(&meta).expect("a readable Outbox-Meta");
                for (k, v) in meta.full_headers() {
                    headers.entry(k.to_string()).or_insert(v);
                }
            }
            let get = |k: &str| headers.get(k).cloned().unwrap_or_default();
            Seen {
                event_id: get("Nats-Msg-Id"),
                aggregate: format!("{}/{}", get("Outbox-Tenant-Id"), get("Outbox-Aggregate-Id")),
                seq: get("Outbox-Seq").parse().unwrap_or(-1),
                subject: m.subject.to_string(),
                payload: m.payload.to_vec(),
                headers,
            }
        })
        .collect()
}

/// Every event at most once in the stream, and per aggregate the sequence numbers 1, 2, 3, ...
/// in stream order. Returns the number of distinct events.
pub fn assert_once_and_in_order(msgs: &[Seen]) -> usize {
    let mut ids = std::collections::HashSet::new();
    let mut next: HashMap<&str, i64> = HashMap::new();
    for m in msgs {
        assert!(
            ids.insert(m.event_id.clone()),
            "event {} twice in the stream",
            m.event_id
        );
        let n = next.entry(m.aggregate.as_str()).or_insert(1);
        assert_eq!(
            m.seq, *n,
            "aggregate {} out of order: got seq {} expected {}",
            m.aggregate, m.seq, n
        );
        *n += 1;
    }
    ids.len()
}

/// Every event of the table reached the broker: `msgs` are (event id, aggregate, seq) in broker
/// order; duplicates (a crash's re-publishes) are allowed and skipped, and per aggregate the first
/// copies come with seq 1, 2, 3, ... (with `any_start`, from whatever seq the aggregate's first
/// copy has: its earlier events went to a broker that lost them). Returns the number of
/// duplicates.
pub async fn assert_delivered_in_order(
    db: &TestDb,
    msgs: &[(&str, &str, i64)],
    any_start: bool,
) -> usize {
    let want: std::collections::HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT event_id FROM outbox_event_all")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    let mut seen = std::collections::HashSet::new();
    let mut next: HashMap<&str, i64> = HashMap::new();
    let mut dups = 0;
    for &(id, aggregate, seq) in msgs {
        if !seen.insert(id.to_string()) {
            dups += 1;
            continue;
        }
        let n = next
            .entry(aggregate)
            .or_insert(if any_start { seq } else { 1 });
        assert_eq!(
            seq, *n,
            "aggregate {aggregate} out of order: got seq {seq} expected {n}"
        );
        *n += 1;
    }
    let missing: Vec<_> = want.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} events never reached the broker, e.g. {missing:?}",
        want.difference(&seen).count()
    );
    assert_eq!(
        seen.len(),
        want.len(),
        "the broker holds events not in the table"
    );
    dups
}

/// The consumer runtime over a broker's source, for the broker tests: one effect row per applied
/// event with the producer identity and position the runtime read from the message.
pub mod applied {
    use std::time::Duration;

    use async_trait::async_trait;
    use outbox::consumers::{
        Consumer, ConsumerConfig, EventSource, Handler, HandlerError, InboundEvent,
    };
    use sqlx::PgConnection;
    use testkit::TestDb;
    use tokio_util::sync::CancellationToken;
    use uuid::Uuid;

    /// Writes (event id, producer, tenant/aggregate, seq) of each applied event.
    struct Recorder;

    #[async_trait]
    impl Handler for Recorder {
        async fn handle(
            &self,
            tx: &mut PgConnection,
            e: &InboundEvent,
        ) -> Result<(), HandlerError> {
            let (agg, seq) = match e.sequenced() {
                Some((a, p)) => (
                    Some(format!("{}/{}", a.tenant_id, a.aggregate_id)),
                    Some(p.seq),
                ),
                None => (None, None),
            };
            sqlx::query(
                "INSERT INTO test_effect (event_id, producer, aggregate, seq) VALUES ($1, $2, $3, $4)",
            )
            .bind(e.event_id)
            .bind(&e.producer)
            .bind(agg)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            Ok(())
        }
    }

    /// A consumer runtime running `source` on `db` (which holds the outbox too) under `name`.
    pub struct Running {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<outbox::error::Result<()>>,
    }

    impl Running {
        /// Creates the effect table and starts the consumer.
        pub async fn start(db: &TestDb, name: &str, source: impl EventSource) -> Self {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS test_effect (n BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL,
                     producer TEXT NOT NULL, aggregate TEXT, seq BIGINT)",
            )
            .execute(&db.pool)
            .await
            .expect("effect table");
            let mut cfg = ConsumerConfig::new(name);
            cfg.concurrency = 4;
            cfg.gap_retry = Duration::from_millis(30);
            let consumer = Consumer::new(db.pool.clone(), Recorder, cfg).expect("consumer");
            let stop = CancellationToken::new();
            let st = stop.clone();
            let task = tokio::spawn(async move { consumer.run(source, st).await });
            Self { stop, task }
        }

        /// Stops it; it must still have been running.
        pub async fn shutdown(self) {
            assert!(!self.task.is_finished(), "the consumer is still running");
            self.stop.cancel();
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("the consumer stops within 10 s")
                .expect("no panic")
                .expect("the consumer ends cleanly");
        }
    }

    /// Effect rows (event id, producer, aggregate, seq) in the order they were written.
    pub async fn effects(db: &TestDb) -> Vec<(Uuid, String, Option<String>, Option<i64>)> {
        sqlx::query_as("SELECT event_id, producer, aggregate, seq FROM test_effect ORDER BY n")
            .fetch_all(&db.pool)
            .await
            .unwrap_or_default()
    }

    /// Waits (at most `within`) until `n` events were applied.
    pub async fn wait(db: &TestDb, n: usize, within: Duration) {
        let ok = testkit::eventually(within, || async { effects(db).await.len() >= n }).await;
        assert!(ok, "{} of {n} events applied", effects(db).await.len());
    }

    /// Every event of the outbox in `db` was applied exactly once, each aggregate's in seq order
    /// (1, 2, 3, ...), all under the outbox's producer identity, and nothing was parked.
    pub async fn assert_all_once_in_order_with_the_producer(db: &TestDb, name: &str) {
        let producer: Uuid = sqlx::query_scalar("SELECT id FROM outbox_producer")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let want: Vec<(Uuid, String, i64)> = sqlx::query_as(
            "SELECT event_id, tenant_id || '/' || aggregate_id, seq FROM outbox_event_all ORDER BY event_id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let rows = effects(db).await;
        let mut got: Vec<(Uuid, String, i64)> = rows
            .iter()
            .map(|(id, _, agg, seq)| {
                (
                    *id,
                    agg.clone().expect("sequenced: the aggregate was read"),
                    seq.expect("sequenced: the seq was read"),
                )
            })
            .collect();
        got.sort();
        assert_eq!(got.len(), want.len(), "every event applied exactly once");
        assert_eq!(got, want, "the ids and positions the producer wrote");
        let producer = producer.to_string();
        let others: Vec<&String> = rows
            .iter()
            .map(|r| &r.1)
            .filter(|p| **p != producer)
            .collect();
        assert!(
            others.is_empty(),
            "producer identity lost: {:?}",
            &others[..others.len().min(3)]
        );
        let mut next: std::collections::HashMap<&str, i64> = Default::default();
        for (_, _, agg, seq) in &rows {
            let n = next.entry(agg.as_deref().unwrap()).or_insert(1);
            assert_eq!(seq.unwrap(), *n, "{agg:?} applied out of order");
            *n += 1;
        }
        let parked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_consumer_dead_letter WHERE consumer = $1",
        )
        .bind(name)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(parked, 0, "nothing parked");
    }
}
