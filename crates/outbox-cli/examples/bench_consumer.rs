//! Benchmark of the consumer runtime on JetStream: throughput of the inbox consumer (handler
//! writes one row, inbox record in the same transaction) against a hand-written consumer of the
//! same stream writing the same row with no inbox (autocommit insert, then ack), same run, same
//! parallelism (one worker per aggregate hash, `concurrency` workers). Also the inbox's cost per
//! event in WAL bytes, for few and for many aggregates (goal: ratio >= 0.7).
//!
//! `cargo run --release -p outbox-cli --example bench_consumer -- [events] [concurrency] [batch]`
//! (defaults 10000 events, 16 workers, batches of 32). The inbox consumer runs twice, with
//! batches of 1 (one transaction per event) and of `batch`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use async_trait::async_trait;
use futures::StreamExt;
use outbox::consumers::nats::{NatsSource, NatsSourceConfig};
use outbox::consumers::{Consumer, ConsumerConfig, Handler, HandlerError, InboundEvent};
use sqlx::{PgConnection, PgPool};
use testkit::{TestDb, TestStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Row;

#[async_trait]
impl Handler for Row {
    async fn handle(&self, tx: &mut PgConnection, e: &InboundEvent) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO effect (event_id, aggregate_id, seq) VALUES ($1, $2, $3)")
            .bind(e.event_id)
            .bind(e.aggregate.as_ref().map(|a| a.aggregate_id.clone()))
            .bind(e.position.map(|p| p.seq))
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

async fn wal(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
        .fetch_one(pool)
        .await
        .expect("wal position")
}

async fn effects(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM effect")
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let conc: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(16);
    let batch: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(32);
    println!("events {n}, concurrency {conc}, batch {batch}");
    for aggregates in [10i64, 1000] {
        let db = TestDb::new().await;
        sqlx::query(
            "CREATE TABLE effect (n BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL, aggregate_id TEXT, seq BIGINT)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        // Both consumers get a connection per worker (the test database's pool has only 8).
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(conc as u32 + 4)
            .connect(&db.url)
            .await
            .unwrap();
        let s = TestStream::new();
        let client = async_nats::connect(testkit::nats_url()).await.unwrap();
        let js = jetstream::new(client);
        js.create_stream(jetstream::stream::Config {
            name: s.name.clone(),
            subjects: vec![format!("{}.>", s.prefix)],
            ..Default::default()
        })
        .await
        .unwrap();
        // The backlog, as the relay would publish it.
        let mut acks = Vec::new();
        for i in 0..n {
            let agg = i % aggregates;
            let seq = i / aggregates + 1;
            let id = Uuid::now_v7();
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", id.to_string().as_str());
            h.insert("Outbox-Event-Id", id.to_string().as_str());
            h.insert("Outbox-Event-Type", "bench.happened");
            h.insert("Outbox-Tenant-Id", "t1");
            h.insert("Outbox-Aggregate-Type", "item");
            h.insert("Outbox-Aggregate-Id", format!("a{agg}").as_str());
            h.insert("Outbox-Seq", seq.to_string().as_str());
            h.insert("Outbox-Seq-Epoch", "0");
            let body = format!(r#"{{"eventId":"{id}","data":{{"n":{i}}}}}"#);
            acks.push(
                js.publish_with_headers(format!("{}.t1.bench", s.prefix), h, body.into())
                    .await
                    .unwrap(),
            );
            if acks.len() >= 1000 {
                for a in acks.drain(..) {
                    a.await.unwrap();
                }
            }
        }
        for a in acks.drain(..) {
            a.await.unwrap();
        }

        // Hand-written: one insert per message (autocommit), then the ack.
        let w0 = wal(&db.pool).await;
        let t = Instant::now();
        raw(&pool, &js, &s.name, conc, n).await;
        let raw_secs = t.elapsed().as_secs_f64();
        let raw_wal = (wal(&db.pool).await - w0) as f64 / n as f64;
        assert_eq!(effects(&db.pool).await, n);
        sqlx::query("TRUNCATE effect")
            .execute(&db.pool)
            .await
            .unwrap();

        // The inbox consumer: one transaction per event (batch 1, as before batches), then
        // batches of up to `batch`.
        let mut line = format!(
            "aggregates {aggregates:>5}: hand-written {:>6.0} ev/s ({raw_wal:.0} WAL B/ev)",
            n as f64 / raw_secs
        );
        for b in [1, batch] {
            let (secs, inbox_wal) = inbox(&pool, &db.pool, &s.name, conc, b, n).await;
            line += &format!(
                "  inbox batch {b:>2} {:>6.0} ev/s ratio {:.2} (+{:.0} WAL B/ev)",
                n as f64 / secs,
                raw_secs / secs,
                inbox_wal - raw_wal
            );
            sqlx::query("TRUNCATE effect")
                .execute(&db.pool)
                .await
                .unwrap();
        }
        println!("{line}");
    }
    println!("goal: inbox / hand-written >= 0.7");
    println!(
        "statements per event: hand-written 1 (INSERT, autocommit); inbox batch 1: 5 (BEGIN, position upsert, the handler's INSERT, the aborted-transaction check, COMMIT); batch b: 2 + 3/b"
    );
}

/// Runs the inbox consumer with batches of up to `batch` until it has applied all `n` events;
/// returns the seconds it took and the WAL bytes per event.
async fn inbox(
    pool: &PgPool,
    db: &PgPool,
    stream: &str,
    conc: usize,
    batch: usize,
    n: i64,
) -> (f64, f64) {
    let w0 = wal(db).await;
    let t = Instant::now();
    let name = format!("bench-{batch}");
    let mut cfg = ConsumerConfig::new(&name);
    cfg.concurrency = conc;
    cfg.batch_size = batch;
    let consumer = Consumer::new(pool.clone(), Row, cfg).unwrap();
    let source = NatsSource::connect(NatsSourceConfig {
        url: testkit::nats_url(),
        stream: stream.into(),
        durable: name,
        max_ack_pending: 4096,
        ..Default::default()
    })
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let st = stop.clone();
    let task = tokio::spawn(async move { consumer.run(source, st).await });
    while effects(db).await < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let per_event = (wal(db).await - w0) as f64 / n as f64;
    stop.cancel();
    let _ = task.await;
    (secs, per_event)
}

/// The hand-written consumer: same stream, same parallelism by aggregate, no inbox.
async fn raw(pool: &PgPool, js: &jetstream::Context, stream: &str, conc: usize, n: i64) {
    let consumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_or_create_consumer(
            "raw",
            pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 4096,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut senders = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..conc {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<jetstream::Message>(16);
        senders.push(tx);
        let pool = pool.clone();
        workers.push(tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let h = m.headers.as_ref().unwrap();
                let id: Uuid = h.get("Outbox-Event-Id").unwrap().as_str().parse().unwrap();
                let agg = h.get("Outbox-Aggregate-Id").unwrap().as_str().to_string();
                let seq: i64 = h.get("Outbox-Seq").unwrap().as_str().parse().unwrap();
                sqlx::query("INSERT INTO effect (event_id, aggregate_id, seq) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(agg)
                    .bind(seq)
                    .execute(&pool)
                    .await
                    .unwrap();
                m.ack().await.unwrap();
            }
        }));
    }
    for _ in 0..n {
        let m = messages.next().await.unwrap().unwrap();
        let agg = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Outbox-Aggregate-Id"))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let mut hasher = DefaultHasher::new();
        agg.hash(&mut hasher);
        let k = (hasher.finish() % conc as u64) as usize;
        senders[k].send(m).await.unwrap();
    }
    drop(senders);
    for w in workers {
        w.await.unwrap();
    }
}
