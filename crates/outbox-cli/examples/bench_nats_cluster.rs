//! Benchmark of the relay against an R3 stream on a 3-node JetStream cluster on this machine
//! (testkit's `NatsCluster`: three nats-server processes on loopback). Prints the drain rate of a
//! backlog through the relay and its ratio to a raw JetStream asynchronous publish of the same
//! messages to an R3 stream of the same cluster, measured in the same run (goal: ratio >= 0.5).
//! Also prints the CPU seconds the nats-servers, this process (relay) and PostgreSQL spent per
//! event of each phase, read from `/proc` (for `docs/capacity.md`).
//!
//! `cargo run --release -p outbox-cli --example bench_nats_cluster -- [backlog]` (default 100000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use outbox::nats::{NatsConfig, NatsPublisher};
use outbox::{PgStore, Relay, RelayConfig};
use testkit::nats_cluster::NatsCluster;
use testkit::{TestDb, TestStream};
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;
use support::{cpu, quiet, write_backlog};

#[tokio::main]
async fn main() {
    let backlog: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let mut cluster = NatsCluster::start().await;
    println!("3-node JetStream cluster (nats-server 2.9, loopback), R3 streams; backlog {backlog}");
    let db = TestDb::new().await;
    let w0 = wal(&db).await;
    write_backlog(&db, backlog).await;
    let wal_insert = wal(&db).await - w0;
    let msgs = support::backlog_messages(&db).await;
    let js = cluster.jetstream().await;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(js.client());
    quiet().await;

    // Raw baseline: the relay's very messages (subjects, headers with Nats-Msg-Id, payloads), the
    // same acknowledgements in flight per batch, to an R3 stream of its own; no database.
    let raw_stream = TestStream::new();
    js.create_stream(jetstream::stream::Config {
        name: raw_stream.name.clone(),
        subjects: vec![format!("{}.>", raw_stream.prefix)],
        duplicate_window: Duration::from_secs(120),
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let template = format!("{}.{{tenant}}.{{topic}}", raw_stream.prefix);
    let c0 = cpu::Sample::take(&cluster.pids());
    let t = Instant::now();
    support::raw_publish(&js, &msgs, &template).await;
    let raw_secs = t.elapsed().as_secs_f64();
    let raw_cpu = cpu::Sample::take(&cluster.pids()).since(&c0);
    let raw = msgs.len() as f64 / raw_secs;
    drop(msgs);
    js.delete_stream(&raw_stream.name).await.unwrap();
    quiet().await;

    // The relay, configured as an operator would for the cluster: every URL, R3.
    let stream = TestStream::new();
    let cfg = NatsConfig {
        url: cluster.urls(),
        replicas: Some(3),
        ..stream.nats_config()
    };
    let config = RelayConfig {
        relay_id: testkit::unique("bench"),
        batch_size: 1000,
        ..Default::default()
    };
    let publisher = NatsPublisher::connect(cfg.clone(), config.dedup_horizon(cfg.ack_timeout))
        .await
        .unwrap();
    let relay = Relay::new(
        Arc::new(PgStore::new(db.pool.clone())),
        Arc::new(publisher),
        config,
    )
    .unwrap();
    let mut info = js.get_stream(&stream.name).await.unwrap();
    let c0 = cpu::Sample::take(&cluster.pids());
    let nodes0 = cpu::snapshot(&cluster.pids());
    let pg0 = cpu::snapshot(&cpu::backends(&db).await);
    let w0 = wal(&db).await;
    let t = Instant::now();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { relay.run(s).await });
    loop {
        if info.info().await.unwrap().state.messages as i64 >= backlog {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let relay_cpu = cpu::Sample::take(&cluster.pids()).since(&c0);
    // Backends the relay opened during the drain are still connected: its pool keeps them.
    let pg_cpu = cpu::backend_delta(&pg0, &cpu::backends(&db).await);
    let wal_drain = wal(&db).await - w0;
    let mut per_node: Vec<f64> = cluster
        .pids()
        .iter()
        .map(|p| cpu::seconds(*p) - nodes0.get(p).copied().unwrap_or(0.0))
        .collect();
    per_node.sort_by(|a, b| b.total_cmp(a));
    stop.cancel();
    task.await.unwrap().unwrap();
    let drained = backlog as f64 / secs;
    js.delete_stream(&stream.name).await.unwrap();

    let per = |s: f64| s * 1e6 / backlog as f64;
    println!("raw JetStream async publish to R3 : {raw:>9.0} msg/s");
    println!(
        "relay drain to R3                  : {drained:>9.0} events/s   ratio {:.2} (goal >= 0.50)",
        drained / raw
    );
    println!(
        "CPU per event, raw publish  : nats-servers {:.1} us (leader + 2 followers), publisher {:.1} us",
        per(raw_cpu.children),
        per(raw_cpu.me)
    );
    println!(
        "CPU per event, relay drain  : nats-servers {:.1} us, relay process {:.1} us, PostgreSQL (this database's backends) {:.1} us",
        per(relay_cpu.children),
        per(relay_cpu.me),
        per(pg_cpu)
    );
    println!(
        "   per nats-server, busiest first: {}",
        per_node
            .iter()
            .map(|s| format!("{:.1} us", per(*s)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "WAL per event (whole PostgreSQL server, other sessions included: an upper bound): \
         backlog insert {:.0} B, drain (claim + settle) {:.0} B",
        wal_insert / backlog as f64,
        wal_drain / backlog as f64
    );
}

/// The server's WAL position in bytes.
async fn wal(db: &TestDb) -> f64 {
    sqlx::query_scalar::<_, f64>("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}
