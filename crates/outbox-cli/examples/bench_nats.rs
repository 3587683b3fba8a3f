//! Benchmark of the relay against NATS JetStream on this machine. Prints:
//! 1. the drain rate of a backlog through the relay and its ratio to a raw JetStream asynchronous
//!    publish of the same messages, measured in the same run (goal: ratio >= 0.4);
//! 2. commit-to-stream latency p50 / p99 at a steady rate (goal: p50 <= 5 ms, p99 <= 25 ms);
//! 3. what the commit-time NOTIFY costs concurrent producers (commits/s and p99 with and without).
//!
//! 4. the drain with the compact header encoding, and its ratio to the default drain (issue 20,
//!    goal >= 1.3x).
//!
//! `cargo run --release -p outbox-cli --example bench_nats -- [backlog] [rate] [seconds]`
//! (defaults 200000 events, 1000 events/s, 10 s); `BENCH_ONLY=drain` measures the drains only.
//! `BENCH_ONLY=headers` measures what the headers cost instead: a raw publish of the backlog
//! with 0, 1, 5, 10 and the relay's 11 headers and in the compact encoding (`BENCH_ROUNDS`
//! rounds, default 3, with CPU per message of this process and nats-server), then
//! `BENCH_PAIRS` (default 3) pairs of drains, default and compact headers, alternating which
//! goes first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use outbox::nats::NatsPublisher;
use outbox::{NewEvent, Outbox, RelayConfig};
use testkit::{TestDb, TestStream};

#[path = "support/mod.rs"]
mod support;
use support::{drain, headers, percentile, quiet, write_backlog};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        outbox_cli::logging::init(outbox_cli::logging::LogFormat::Text);
    }
    let args: Vec<String> = std::env::args().collect();
    let backlog: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let rate: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(10);
    println!(
        "machine: {} cores; backlog {backlog}; steady rate {rate}/s for {secs} s",
        num_cpus()
    );

    // `BENCH_ONLY=drain` skips parts 2 and 3 (for iterating on the drain rate); `headers`
    // measures what the message headers cost instead (below).
    let only = std::env::var("BENCH_ONLY");
    let all = only.is_err();
    // --- 2. steady-rate latency ----------------------------------------------------------
    for notify in [true, false].into_iter().filter(|_| all) {
        let l = steady_latency(rate, secs, notify).await;
        println!(
            "commit-to-stream at {rate}/s, notify {}: p50 {:.2} ms  p99 {:.2} ms  ({} events){}",
            if notify { "on " } else { "off" },
            l.p50,
            l.p99,
            l.n,
            if notify {
                "   (goal p50 <= 5, p99 <= 25)"
            } else {
                "   (poll every 500 ms)"
            }
        );
        println!(
            "   counted from the COMMIT call instead (includes PostgreSQL's commit): p50 {:.2} ms  p99 {:.2} ms",
            l.p50_with_commit, l.p99_with_commit
        );
    }

    // --- 3. NOTIFY cost to concurrent producers -------------------------------------------
    for notify in [false, true].into_iter().filter(|_| all) {
        let (tps, p99) = producers(notify, 8, Duration::from_secs(5)).await;
        println!(
            "8 producers, 1 event per commit, notify {}: {tps:>7.0} commits/s  p99 commit {p99:.2} ms",
            if notify { "on " } else { "off" }
        );
    }
    quiet().await;

    // --- 1. drain rate -------------------------------------------------------------------
    let db = TestDb::new().await;
    let stream = TestStream::new();
    write_backlog(&db, backlog).await;

    // The raw baseline publishes exactly the messages the relay will publish (same subjects, same
    // headers with `Nats-Msg-Id`, same payload bytes) with the same number of acknowledgements in
    // flight per batch, to a stream of its own, with no database involved.
    let msgs = support::backlog_messages(&db).await;
    let client = async_nats::connect(testkit::nats_url()).await.unwrap();
    if only.as_deref() == Ok("headers") {
        return headers_and_drains(&db, &client, msgs, backlog).await;
    }
    let raw = headers::raw_rate(&client, &msgs, |m| Some(NatsPublisher::headers(m).unwrap())).await;
    drop(msgs);

    let drained = drain(&db, &stream, &client, backlog, None).await;
    println!("raw JetStream async publish : {raw:>9.0} msg/s");
    println!(
        "relay drain, rows kept as published (default)   : {drained:>9.0} events/s   ratio {:.2} (goal >= 0.40)",
        drained / raw
    );
    drop(db);
    quiet().await;
    // The same with the compact header encoding (issue 20, goal 3: >= 1.3x the default drain).
    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;
    let compact = compact_drain(&db, &client, backlog).await;
    println!(
        "relay drain, rows kept, compact headers         : {compact:>9.0} events/s   ratio {:.2}   x{:.2} the default drain (goal >= 1.3)",
        compact / raw,
        compact / drained
    );
    drop(db);
    quiet().await;
    // A fresh database with the same backlog, rows deleted at acknowledgement.
    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;
    let stream2 = TestStream::new();
    let drained0 = drain(&db, &stream2, &client, backlog, Some(Duration::ZERO)).await;
    println!(
        "relay drain, rows deleted at acknowledgement    : {drained0:>9.0} events/s   ratio {:.2} (goal >= 0.40)",
        drained0 / raw
    );
    drop(db);
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

struct Latency {
    p50: f64,
    p99: f64,
    p50_with_commit: f64,
    p99_with_commit: f64,
    n: usize,
}

async fn steady_latency(rate: u64, secs: u64, notify: bool) -> Latency {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let config = RelayConfig {
        relay_id: "bench-latency".into(),
        retention: None,
        ..Default::default()
    };
    // The relay's own pool, as `outbox relay` (`--db-connections 4`) and `inventory serve` run
    // it: sharing the producers' pool would measure the relay's wait for a connection behind up
    // to 64 producers, not its delivery.
    let (relay, relay_pool) = support::nats_relay(&db.url, &stream, config, 4).await;
    let stop = CancellationToken::new();
    let listen = tokio::spawn(outbox::wake::listen(
        relay_pool,
        relay.waker(),
        stop.child_token(),
    ));
    let s = stop.clone();
    let task = tokio::spawn(async move { relay.run(s).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Core NATS subscribers see JetStream-published messages as they are stored.
    let client = async_nats::connect(testkit::nats_url()).await.unwrap();
    let mut sub = client
        .subscribe(format!("{}.>", stream.prefix))
        .await
        .unwrap();
    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let r = received.clone();
    let reader = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(id) = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
                r.lock().await.insert(id.to_string(), Instant::now());
            }
        }
    });
    let outbox = Outbox::new("Bench").with_notify(notify);
    // For each event: when COMMIT was sent, and when it returned (the event exists from then on).
    let committed: Arc<Mutex<HashMap<String, (Instant, Instant)>>> = Arc::default();
    let total = rate * secs;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut producers = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let pool = db.pool.clone();
        let ob = outbox.clone();
        let c = committed.clone();
        producers.spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let ev = NewEvent::new(
                "t1",
                "ProductVariant",
                format!("v{}", i % 100),
                "StockLevelChangedEvent",
                "inventory.stock.changed",
                serde_json::json!({"i": i}),
            );
            let id = ob.enqueue(&mut tx, &[ev]).await.unwrap()[0];
            let sent = Instant::now();
            tx.commit().await.unwrap();
            c.lock()
                .await
                .insert(id.to_string(), (sent, Instant::now()));
        });
        while producers.len() > 64 {
            producers.join_next().await;
        }
    }
    while producers.join_next().await.is_some() {}
    let end = Instant::now() + Duration::from_secs(10);
    while received.lock().await.len() < total as usize && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = task.await;
    let _ = listen.await;
    reader.abort();
    let committed = committed.lock().await;
    let received = received.lock().await;
    let ms = |a: &Instant, b: &Instant| b.saturating_duration_since(*a).as_secs_f64() * 1000.0;
    let mut lat: Vec<f64> = Vec::new();
    let mut with_commit: Vec<f64> = Vec::new();
    for (id, (sent, done)) in committed.iter() {
        if let Some(r) = received.get(id) {
            lat.push(ms(done, r));
            with_commit.push(ms(sent, r));
        }
    }
    let n = lat.len();
    assert_eq!(n as u64, total, "every committed event reached the stream");
    Latency {
        p50: percentile(&mut lat, 0.5),
        p99: percentile(&mut lat, 0.99),
        p50_with_commit: percentile(&mut with_commit, 0.5),
        p99_with_commit: percentile(&mut with_commit, 0.99),
        n,
    }
}

async fn producers(notify: bool, n: usize, dur: Duration) -> (f64, f64) {
    let db = TestDb::new().await;
    let outbox = Outbox::new("Bench").with_notify(notify);
    let mut lat = support::producer_load(&db, &outbox, "t1", n, dur).await;
    (
        lat.len() as f64 / dur.as_secs_f64(),
        percentile(&mut lat, 0.99),
    )
}

/// The relay's drain of the backlog in `db` with the compact header encoding; events/s.
async fn compact_drain(db: &TestDb, client: &async_nats::Client, backlog: i64) -> f64 {
    let stream = TestStream::new();
    let cfg = outbox::nats::NatsConfig {
        header_encoding: outbox::meta::HeaderEncoding::Compact,
        ..stream.nats_config()
    };
    support::drain_nats(db, &stream, cfg, client, backlog, None, 1).await
}

/// `BENCH_ONLY=headers`: the raw publish by headers, then pairs of drains (rows kept) with the
/// default and the compact encoding, each pair's order alternating, with the CPU time per event
/// of this process (the relay), the database's backends and nats-server.
async fn headers_and_drains(
    db: &TestDb,
    client: &async_nats::Client,
    msgs: Vec<outbox::OutboundMessage>,
    backlog: i64,
) {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    headers::sweep(client, &msgs, env("BENCH_ROUNDS", 3)).await;
    drop(msgs);
    let nats: Vec<u32> = headers::nats_server_pid().into_iter().collect();
    let pairs = env("BENCH_PAIRS", 3);
    // Per mode (full, compact): rates, and CPU us per event of relay, PostgreSQL, nats-server.
    let mut rates: [Vec<f64>; 2] = Default::default();
    let mut cpu: [Vec<[f64; 3]>; 2] = Default::default();
    let mut ratios = Vec::new();
    for pair in 0..pairs {
        let mut this = [0.0; 2];
        for i in 0..2 {
            let compact = (pair + i) % 2 == 1;
            let fresh;
            let db = if pair == 0 && i == 0 {
                db
            } else {
                fresh = TestDb::new().await;
                write_backlog(&fresh, backlog).await;
                &fresh
            };
            quiet().await;
            let pg_before = support::cpu::snapshot(&support::cpu::backends(db).await);
            let before = support::cpu::Sample::take(&nats);
            let rate = if compact {
                compact_drain(db, client, backlog).await
            } else {
                drain(db, &TestStream::new(), client, backlog, None).await
            };
            let used = support::cpu::Sample::take(&nats).since(&before);
            let pg = support::cpu::backend_delta(&pg_before, &support::cpu::backends(db).await);
            let per = |s: f64| s * 1e6 / backlog as f64;
            let us = [per(used.me), per(pg), per(used.children)];
            println!(
                "  pair {pair}: drain, rows kept, {} headers: {rate:>9.0} events/s   CPU us/event: relay {:.1}  PostgreSQL {:.1}  nats-server {:.1}  total {:.1}",
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
    let med = |v: &mut Vec<f64>| headers::median_of(v.clone());
    let cpu_med = |m: usize, k: usize| med(&mut cpu[m].iter().map(|c| c[k]).collect());
    let total = |m: usize| med(&mut cpu[m].iter().map(|c| c.iter().sum()).collect());
    for (m, name) in [(0, "full   "), (1, "compact")] {
        println!(
            "relay drain, rows kept, {name} headers: median {:>7.0} events/s   CPU us/event: relay {:.1}  PostgreSQL {:.1}  nats-server {:.1}  total {:.1}",
            med(&mut rates[m].clone()),
            cpu_med(m, 0),
            cpu_med(m, 1),
            cpu_med(m, 2),
            total(m)
        );
    }
    println!(
        "compact / full drain per pair {:?}, median x{:.2} (goal >= 1.3); CPU per event full / compact x{:.2} \
         (the drain's bound on this 2-core machine when the three processes share it)",
        ratios.iter().map(|r| (r * 100.0).round() / 100.0).collect::<Vec<_>>(),
        med(&mut ratios.clone()),
        total(0) / total(1)
    );
}
