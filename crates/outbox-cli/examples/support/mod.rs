//! Helpers shared by the benchmarks (included with `#[path]`; not an example of its own).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use outbox::nats::NatsPublisher;
use outbox::{PgStore, Relay, RelayConfig};
use testkit::{TestDb, TestStream};
use tokio_util::sync::CancellationToken;

pub mod headers;

/// The binaries' allocator (`src/main.rs`), so that what is measured is what ships.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs a relay over the backlog in `db` until `stream` holds `backlog` messages; events/s.
pub async fn drain(
    db: &TestDb,
    stream: &TestStream,
    client: &async_nats::Client,
    backlog: i64,
    retention: Option<Duration>,
) -> f64 {
    drain_with(db, stream, client, backlog, retention, 1).await
}

/// Like [`drain`] with `relays` relays sharing the outbox.
pub async fn drain_with(
    db: &TestDb,
    stream: &TestStream,
    client: &async_nats::Client,
    backlog: i64,
    retention: Option<Duration>,
    relays: usize,
) -> f64 {
    drain_nats(
        db,
        stream,
        stream.nats_config(),
        client,
        backlog,
        retention,
        relays,
    )
    .await
}

/// Like [`drain_with`] with the adapter's settings `nats` (e.g. a header encoding).
pub async fn drain_nats(
    db: &TestDb,
    stream: &TestStream,
    nats: outbox::nats::NatsConfig,
    client: &async_nats::Client,
    backlog: i64,
    retention: Option<Duration>,
    relays: usize,
) -> f64 {
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let t = Instant::now();
    for _ in 0..relays {
        let config = RelayConfig {
            relay_id: testkit::unique("bench"),
            batch_size: 1000,
            retention,
            ..Default::default()
        };
        let publisher =
            NatsPublisher::connect(nats.clone(), config.dedup_horizon(nats.ack_timeout))
                .await
                .unwrap();
        let relay = Relay::new(
            Arc::new(PgStore::new(db.pool.clone())),
            Arc::new(publisher),
            config,
        )
        .unwrap();
        let s = stop.clone();
        tasks.push(tokio::spawn(async move { relay.run(s).await }));
    }
    let mut info_stream = jetstream::new(client.clone())
        .get_stream(&stream.name)
        .await
        .unwrap();
    loop {
        let n = info_stream.info().await.unwrap().state.messages;
        if n as i64 >= backlog {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = backlog as f64 / t.elapsed().as_secs_f64();
    stop.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    rate
}

/// Writes `backlog` events spread over 10 tenants and 5000 aggregates (not timed).
pub async fn write_backlog(db: &TestDb, backlog: i64) {
    write_backlog_over(db, backlog, 5000).await
}

/// Writes `backlog` events over `aggregates` aggregates (`v<g % aggregates>` of tenant
/// `t<g % aggregates % 10>`), not timed.
pub async fn write_backlog_over(db: &TestDb, backlog: i64, aggregates: i64) {
    let t = Instant::now();
    sqlx::query(
        // Event ids shaped like the enqueue API's UUID v7 (a millisecond timestamp first), so that
        // the primary key sees the same append-mostly inserts as in production.
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers)
         SELECT s.eid, 't' || (g % $2 % 10), 'ProductVariant', 'v' || (g % $2), 'StockLevelChangedEvent',
                'inventory.stock.changed',
                convert_to(json_build_object('eventId', s.eid, 'eventType', 'StockLevelChangedEvent',
                    'eventVersion', '1.0', 'timestamp', now(), 'sourceService', 'Bench', 'correlationId', gen_random_uuid(),
                    'tenantId', 't' || (g % $2 % 10), 'data', json_build_object('productVariantId', gen_random_uuid(),
                    'newQuantity', g, 'oldQuantity', g - 1, 'quantityChanged', 1, 'changeType', 'PURCHASE'))::text, 'UTF8'),
                json_build_object('correlationId', gen_random_uuid()::text)
         FROM (SELECT g, (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || '7'
                          || substr(h, 1, 3) || '8' || substr(h, 4, 15))::uuid AS eid
               FROM generate_series(1, $1) AS g, LATERAL (SELECT md5(g::text || random()::text) AS h) AS r) AS s
         ORDER BY g",
    )
    .bind(backlog)
    .bind(aggregates)
    .execute(&db.pool)
    .await
    .unwrap();
    // Statistics as a production table has them (autovacuum would take a while to gather them):
    // the planner's choices, JIT included, depend on them.
    sqlx::query("ANALYZE outbox_event")
        .execute(&db.pool)
        .await
        .unwrap();
    println!(
        "backlog of {backlog} written in {:.1} s (not timed)",
        t.elapsed().as_secs_f64()
    );
}

/// Messages in the RabbitMQ queue `queue` (a passive declare).
pub async fn queue_depth(admin: &lapin::Channel, queue: &str) -> u32 {
    admin
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap()
}

/// Declares the durable RabbitMQ queue `queue` and binds it to `exchange` (which must exist) by `#`.
pub async fn bind_all(admin: &lapin::Channel, exchange: &str, queue: &str) {
    admin
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    admin
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Lets PostgreSQL write out what the previous phase dirtied, so that its checkpoint does not land
/// on the next phase's measurements.
pub async fn quiet() {
    if let Ok(p) = sqlx::PgPool::connect(&format!("{}/postgres", testkit::pg_server_url())).await {
        let _ = sqlx::query("CHECKPOINT").execute(&p).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// `producers` tasks committing one event per transaction on `db` for `dur`, tenant `tenant`;
/// returns every commit's latency (begin to commit) in milliseconds.
pub async fn producer_load(
    db: &TestDb,
    outbox: &outbox::Outbox,
    tenant: &str,
    producers: usize,
    dur: Duration,
) -> Vec<f64> {
    let end = Instant::now() + dur;
    let mut set = tokio::task::JoinSet::new();
    for p in 0..producers {
        let pool = db.pool.clone();
        let ob = outbox.clone();
        let tenant = tenant.to_string();
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                let mut tx = pool.begin().await.unwrap();
                let agg = format!("p{p}-{}", i % 20);
                let ev = outbox::NewEvent::new(
                    tenant.as_str(),
                    "V",
                    agg,
                    "E",
                    "x.y",
                    serde_json::json!({ "i": i }),
                );
                ob.enqueue(&mut tx, &[ev]).await.unwrap();
                tx.commit().await.unwrap();
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                i += 1;
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(l) = set.join_next().await {
        all.extend(l.unwrap());
    }
    all
}

/// The `p` quantile (0..=1) of `v` (sorted in place).
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The backlog's rows as the relay reads them (`row_to_message`, with the producer id the relay
/// adds), in id order: what a raw baseline publishes so that it sends the very messages the
/// relay sends.
pub async fn backlog_messages(db: &TestDb) -> Vec<outbox::OutboundMessage> {
    let producer = PgStore::new(db.pool.clone()).producer_id().await.unwrap();
    sqlx::query(
        "SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, seq, partition, event_type, topic, payload,
                headers, attempts, created_at, seq_epoch FROM outbox_event ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| outbox::OutboundMessage {
        producer_id: Some(producer),
        ..outbox::pg::row_to_message(r).unwrap()
    })
    .collect()
}

/// CPU time of processes, read from `/proc/<pid>/stat` (Linux), for per-event CPU figures.
pub mod cpu {
    /// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ: 100 on Linux).
    const TICKS: f64 = 100.0;

    /// User + system CPU seconds of `pid`, 0 when it is gone.
    pub fn seconds(pid: u32) -> f64 {
        stat(pid).map_or(0.0, |(own, _, _)| own)
    }

    /// `pid`'s own user + system CPU seconds, what it reaped of exited children (cutime +
    /// cstime), and its parent's pid.
    pub fn stat(pid: u32) -> Option<(f64, f64, u32)> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold spaces: fields count from after it.
        let (_, rest) = s.rsplit_once(')')?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
        Some((
            (get(11) + get(12)) / TICKS,
            (get(13) + get(14)) / TICKS,
            get(1) as u32,
        ))
    }

    /// Busy and total CPU seconds of the whole machine (`/proc/stat`).
    pub fn machine() -> (f64, f64) {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<f64> = s
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: f64 = v.iter().sum();
        // idle and iowait.
        let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
        ((total - idle) / TICKS, total / TICKS)
    }

    /// `_sum` and `_count` of a Prometheus histogram in `text`.
    pub fn summary(text: &str, name: &str) -> (f64, f64) {
        let find = |suffix: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}{suffix}")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        (find("_sum"), find("_count"))
    }

    /// CPU seconds of this process and of a set of other processes.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Sample {
        /// This process.
        pub me: f64,
        /// The other processes, summed.
        pub children: f64,
    }

    impl Sample {
        /// CPU seconds now of this process and of `pids`.
        pub fn take(pids: &[u32]) -> Self {
            Self {
                me: seconds(std::process::id()),
                children: pids.iter().map(|&p| seconds(p)).sum(),
            }
        }

        /// CPU seconds spent between `earlier` and this sample.
        pub fn since(&self, earlier: &Self) -> Self {
            Self {
                me: self.me - earlier.me,
                children: self.children - earlier.children,
            }
        }
    }

    /// PIDs of the PostgreSQL backends connected to `db` now.
    pub async fn backends(db: &testkit::TestDb) -> Vec<u32> {
        sqlx::query_scalar::<_, i32>("SELECT pid FROM pg_stat_activity WHERE datname = $1")
            .bind(db.name())
            .fetch_all(&db.pool)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|p| p as u32)
            .collect()
    }

    /// CPU seconds of the backends of `db` at two moments: `start` holds the CPU seconds of the
    /// backends that existed then; backends opened later started from 0.
    pub fn backend_delta(start: &std::collections::HashMap<u32, f64>, end_pids: &[u32]) -> f64 {
        end_pids
            .iter()
            .map(|p| seconds(*p) - start.get(p).copied().unwrap_or(0.0))
            .sum()
    }

    /// CPU seconds now of each of `pids`.
    pub fn snapshot(pids: &[u32]) -> std::collections::HashMap<u32, f64> {
        pids.iter().map(|&p| (p, seconds(p))).collect()
    }
}

/// The raw baseline of the NATS benchmarks: publishes `msgs` (the relay's exact messages, headers
/// included) to the stream behind `template` through `js`, 1,000 acknowledgements in flight per
/// chunk as the relay's batch, with no database involved.
pub async fn raw_publish(
    js: &jetstream::Context,
    msgs: &[outbox::OutboundMessage],
    template: &str,
) {
    use async_nats::jetstream::message::PublishMessage;
    for chunk in msgs.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let p = PublishMessage::build()
                .payload(m.payload.clone())
                .headers(NatsPublisher::headers(m).unwrap());
            acks.push(js.send_publish(m.render(template), p).await.unwrap());
        }
        for a in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            a.unwrap();
        }
    }
}

/// A relay to `stream` over `url` with a pool of its own of `connections`, as `outbox relay`
/// (`--db-connections 4`) runs it; returns the relay and its pool.
pub async fn nats_relay(
    url: &str,
    stream: &TestStream,
    config: RelayConfig,
    connections: u32,
) -> (Relay, sqlx::PgPool) {
    let publisher = NatsPublisher::connect(
        stream.nats_config(),
        config.dedup_horizon(stream.nats_config().ack_timeout),
    )
    .await
    .unwrap();
    // The relay's own pool, as the relay binaries open it (relay_connect_options).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(outbox::pg::relay_connect_options(url).unwrap())
        .await
        .unwrap();
    let relay = Relay::new(
        Arc::new(PgStore::new(pool.clone())),
        Arc::new(publisher),
        config,
    )
    .unwrap();
    (relay, pool)
}

/// A stream of its own for the raw baseline, the JetStream context to publish to it (4,096
/// acknowledgements in flight at most) and the subject template of its messages.
pub async fn raw_stream(client: &async_nats::Client) -> (TestStream, jetstream::Context, String) {
    let raw_stream = TestStream::new();
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: raw_stream.name.clone(),
        subjects: vec![format!("{}.>", raw_stream.prefix)],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let template = format!("{}.{{tenant}}.{{topic}}", raw_stream.prefix);
    (raw_stream, js, template)
}

/// `BENCH_ONLY=headers` of the Redis and Kafka benchmarks: `pairs` pairs of drains, each of a
/// fresh backlog of `backlog` events (rows kept), one with full and one with compact headers, the
/// order alternating per pair; prints per drain the rate and the CPU microseconds per event of
/// this process (the relay), the database's backends and the broker process `broker_pid`, then
/// the medians and the ratios. `drain(db, compact)` runs one relay over `db` until done;
/// `reset()` runs before each drain, outside the measurement (e.g. empties the broker).
pub async fn header_pairs<F, R>(
    backlog: i64,
    pairs: usize,
    broker: &str,
    broker_pid: u32,
    mut reset: R,
    mut drain: F,
) where
    F: for<'a> FnMut(&'a TestDb, bool) -> futures::future::BoxFuture<'a, f64>,
    R: FnMut() -> futures::future::BoxFuture<'static, ()>,
{
    let mut rates: [Vec<f64>; 2] = Default::default();
    let mut cpu: [Vec<[f64; 3]>; 2] = Default::default();
    let mut ratios = Vec::new();
    for pair in 0..pairs {
        let mut this = [0.0; 2];
        for i in 0..2 {
            let compact = (pair + i) % 2 == 1;
            reset().await;
            let db = TestDb::new().await;
            write_backlog(&db, backlog).await;
            quiet().await;
            let pg_before = cpu::snapshot(&cpu::backends(&db).await);
            let before = cpu::Sample::take(&[broker_pid]);
            let rate = drain(&db, compact).await;
            let used = cpu::Sample::take(&[broker_pid]).since(&before);
            let pg = cpu::backend_delta(&pg_before, &cpu::backends(&db).await);
            let per = |s: f64| s * 1e6 / backlog as f64;
            let us = [per(used.me), per(pg), per(used.children)];
            println!(
                "  pair {pair}: drain, rows kept, {} headers: {rate:>8.0} events/s   CPU us/event: relay {:.1}  PostgreSQL {:.1}  {broker} {:.1}  total {:.1}",
                if compact { "compact" } else { "full   " },
                us[0],
                us[1],
                us[2],
                us.iter().sum::<f64>()
            );
            this[compact as usize] = rate;
            rates[compact as usize].push(rate);
            cpu[compact as usize].push(us);
        }
        ratios.push(this[1] / this[0]);
    }
    let med = |v: Vec<f64>| headers::median_of(v);
    let cpu_med = |m: usize, k: usize| med(cpu[m].iter().map(|c| c[k]).collect());
    let total = |m: usize| med(cpu[m].iter().map(|c| c.iter().sum()).collect());
    for (m, name) in [(0, "full   "), (1, "compact")] {
        println!(
            "median, {name} headers: {:>8.0} events/s   CPU us/event: relay {:.1}  PostgreSQL {:.1}  {broker} {:.1}  total {:.1}",
            med(rates[m].clone()),
            cpu_med(m, 0),
            cpu_med(m, 1),
            cpu_med(m, 2),
            total(m)
        );
    }
    println!(
        "compact / full drain per pair {:?}, median x{:.2}; CPU per event full / compact: relay x{:.2}  {broker} x{:.2}  total x{:.2}",
        ratios.iter().map(|r| (r * 100.0).round() / 100.0).collect::<Vec<_>>(),
        med(ratios.clone()),
        cpu_med(0, 0) / cpu_med(1, 0),
        cpu_med(0, 2) / cpu_med(1, 2),
        total(0) / total(1)
    );
}

/// The number in the environment variable `k`, else `d`.
pub fn env_or(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}
