//! Benchmark of the relay against Redis Streams (issue 22). Prints the drain rate of a backlog
//! through the relay, with the broker-side de-duplication script and without it, and the ratio of
//! each to a raw `XADD` of the same messages, all measured in the same run.
//!
//! - **Redis**: a private `redis-server` on a free port, configured as the relay requires
//!   (`appendonly yes`, `appendfsync always`, `noeviction`): every acknowledged write is fsynced.
//! - **Raw baseline**: one multiplexed connection, no database: `XADD` of exactly the entries the
//!   relay writes (the rows read with `outbox::pg::row_to_message`, the adapter's stream template
//!   and its `RedisPublisher::fields`), in chunks of 1000 with every command of a chunk in
//!   flight, as the relay's batches of 1000 are.
//! - **Relay drain**: `outbox::Relay` with `PgStore` and `RedisPublisher` (batch size 1000,
//!   default retention), timed from its start until the streams hold the whole backlog; once with
//!   de-duplication (script: `GET` of the event's key, `XADD`, `SET PX`, `SADD`) and once without
//!   (script: `XADD`, `SADD`), each on a fresh database and fresh stream names.
//!
//! `cargo run --release -p outbox-cli --example bench_redis -- [backlog]` (default 100000).
//!
//! `BENCH_ONLY=headers` measures the compact encoding instead (issue 20 goal 3 on Redis):
//! `BENCH_PAIRS` pairs (default 3) of drains with full and with compact fields (de-duplication
//! on, each drain a fresh backlog, the order alternating), with the CPU time per event of this
//! process (the relay), the database's backends and redis-server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use outbox::meta::HeaderEncoding;
use outbox::publishers::redis::{RedisConfig, RedisPublisher};
use outbox::{OutboundMessage, PgStore, Relay, RelayConfig};
use redis::aio::MultiplexedConnection;
use testkit::redis_server::PrivateRedis;
use testkit::TestDb;
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;
use support::{quiet, write_backlog};

const CHUNK: usize = 1000;

#[tokio::main]
async fn main() {
    let backlog: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    println!(
        "machine: {} cores; backlog {backlog}; redis-server appendfsync always",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let server = PrivateRedis::start().await;
    let mut conn = redis::Client::open(server.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new()
                .set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();

    if std::env::var("BENCH_ONLY").as_deref() == Ok("headers") {
        let pid = server.pid().expect("redis-server runs");
        let mut round = 0;
        support::header_pairs(
            backlog,
            support::env_or("BENCH_PAIRS", 3),
            "redis-server",
            pid,
            || {
                let mut conn = conn.clone();
                async move { flush(&mut conn).await }.boxed()
            },
            |db, compact| {
                round += 1;
                let cfg = RedisConfig {
                    header_encoding: if compact {
                        HeaderEncoding::Compact
                    } else {
                        HeaderEncoding::Full
                    },
                    ..config(&server, &format!("h{round}"))
                };
                let mut conn = conn.clone();
                async move { drain(db, &mut conn, cfg, backlog).await }.boxed()
            },
        )
        .await;
        return;
    }

    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;
    quiet().await;
    let msgs = support::backlog_messages(&db).await;
    let raw_cfg = config(&server, "raw");
    let raw = raw_xadd(&mut conn, &raw_cfg, &msgs).await;
    assert_eq!(total_len(&mut conn, &msgs, &raw_cfg).await, backlog);
    drop(msgs);
    flush(&mut conn).await;
    println!("raw XADD (pipelined, fsync always)          : {raw:>9.0} msg/s");

    let drained = drain(&db, &mut conn, config(&server, "dedup"), backlog).await;
    println!(
        "relay drain, de-duplication script (default) : {drained:>9.0} events/s   ratio {:.2}",
        drained / raw
    );
    drop(db);
    flush(&mut conn).await;
    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;
    quiet().await;
    let plain = RedisConfig {
        dedup: false,
        ..config(&server, "plain")
    };
    let drained = drain(&db, &mut conn, plain, backlog).await;
    println!(
        "relay drain, no de-duplication               : {drained:>9.0} events/s   ratio {:.2}",
        drained / raw
    );
}

fn config(server: &PrivateRedis, prefix: &str) -> RedisConfig {
    RedisConfig {
        url: server.url(),
        stream_template: format!("{prefix}:{{tenant}}:{{topic}}"),
        registry_key: format!("{prefix}:streams"),
        dedup_prefix: format!("{prefix}:dedup:"),
        ..Default::default()
    }
}

async fn raw_xadd(
    conn: &mut MultiplexedConnection,
    cfg: &RedisConfig,
    msgs: &[OutboundMessage],
) -> f64 {
    let t = Instant::now();
    for chunk in msgs.chunks(CHUNK) {
        let sends = chunk.iter().map(|m| {
            let mut c = conn.clone();
            let mut cmd = redis::cmd("XADD");
            cmd.arg(m.render(&cfg.stream_template)).arg("*");
            for (k, v) in RedisPublisher::fields(m) {
                cmd.arg(k).arg(v);
            }
            async move { cmd.query_async::<String>(&mut c).await.unwrap() }
        });
        futures::future::join_all(sends).await;
    }
    msgs.len() as f64 / t.elapsed().as_secs_f64()
}

/// Entries in the streams the messages go to under `cfg`.
async fn total_len(
    conn: &mut MultiplexedConnection,
    msgs: &[OutboundMessage],
    cfg: &RedisConfig,
) -> i64 {
    let streams: std::collections::BTreeSet<String> = msgs
        .iter()
        .map(|m| m.render(&cfg.stream_template))
        .collect();
    lengths(conn, streams).await
}

/// Entries in the streams the relay registered in `registry`.
async fn registered_len(conn: &mut MultiplexedConnection, registry: &str) -> i64 {
    let streams: Vec<String> = redis::cmd("SMEMBERS")
        .arg(registry)
        .query_async(conn)
        .await
        .unwrap();
    lengths(conn, streams).await
}

async fn lengths(
    conn: &mut MultiplexedConnection,
    streams: impl IntoIterator<Item = String>,
) -> i64 {
    let mut n = 0;
    for s in streams {
        n += redis::cmd("XLEN")
            .arg(s)
            .query_async::<i64>(conn)
            .await
            .unwrap();
    }
    n
}

async fn flush(conn: &mut MultiplexedConnection) {
    let _: () = redis::cmd("FLUSHALL").query_async(conn).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn drain(
    db: &TestDb,
    conn: &mut MultiplexedConnection,
    cfg: RedisConfig,
    backlog: i64,
) -> f64 {
    let config = RelayConfig {
        relay_id: testkit::unique("bench"),
        batch_size: CHUNK as i64,
        ..Default::default()
    };
    let registry = cfg.registry_key.clone();
    let publisher = RedisPublisher::connect(cfg, Duration::from_secs(300))
        .await
        .unwrap();
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
    while registered_len(conn, &registry).await < backlog {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = backlog as f64 / t.elapsed().as_secs_f64();
    stop.cancel();
    task.await.unwrap().unwrap();
    rate
}
