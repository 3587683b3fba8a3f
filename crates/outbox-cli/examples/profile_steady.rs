//! What the relay costs at a steady load (issue 20, goal 6): producers commit one event per
//! transaction at a fixed rate (default 1,000/s) and the relay, **in a child process of its own**
//! (this binary re-run with `PROFILE_STEADY_RELAY=1`), publishes them to JetStream. Per phase it
//! prints, over the measured seconds only:
//! - CPU microseconds per event of the relay's process, of the relay's PostgreSQL backends (it
//!   connects as the role `relay_prof`: its pool and its `LISTEN` connection), of the producers'
//!   backends, of PostgreSQL's other processes (walwriter, ...), of nats-server, and of this
//!   process (producers and the latency subscriber), from `/proc/<pid>/stat`;
//! - the relay's statements per batch (`pg_stat_statements`, by the relay's role), its batches
//!   (non-empty claims) and their mean size;
//! - commit-to-stream latency p50 / p99 (from the producer's `COMMIT` returning to a core NATS
//!   subscriber seeing the message, as `bench_nats`).
//!
//! A phase with the relay off (same producers, no relay) is run first, so that the PostgreSQL
//! figures can be read as a difference. `STEADY_NOTIFY` picks how producers wake the relay:
//! `commit` (default: `pg_notify` in each producer transaction, as `bench_nats`' latency figure),
//! `window:<ms>` (the `CommitNotifier` of the inventory service, at most one notification per
//! window), `off` (the relay polls). `STEADY_RETENTION_ZERO=1`: the relay deletes published rows.
//!
//! Run by `scripts/profile-steady.sh` (a private PostgreSQL with `pg_stat_statements` and a private
//! nats-server, named by `PROFILE_PG_PID` / `PROFILE_NATS_PID`):
//! `profile_steady [rate, default 1000] [seconds, default 10]`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use outbox::{NewEvent, Outbox, RelayConfig};
use testkit::{TestDb, TestStream};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;
use support::cpu::{machine, stat, summary};
use support::{percentile, quiet};

/// The relay's PostgreSQL role: its backends and statements are told apart by it.
const RELAY_ROLE: &str = "relay_prof";

/// Every process under the postmaster `root` with its own CPU seconds, plus the postmaster itself
/// and what it reaped of exited children (under pid 0).
fn pg_tree(root: u32) -> HashMap<u32, f64> {
    let mut out = HashMap::new();
    if let Some((own, reaped, _)) = stat(root) {
        out.insert(root, own);
        out.insert(0, reaped);
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((own, _, ppid)) = stat(pid) {
            if ppid == root {
                out.insert(pid, own);
            }
        }
    }
    out
}

struct Sample {
    at: Instant,
    me: f64,
    relay: f64,
    pg: HashMap<u32, f64>,
    nats: f64,
    machine: (f64, f64),
}

fn sample(pg: u32, nats: u32, relay: Option<u32>) -> Sample {
    Sample {
        at: Instant::now(),
        me: stat(std::process::id()).map(|s| s.0).unwrap_or(0.0),
        relay: relay.and_then(stat).map(|s| s.0).unwrap_or(0.0),
        pg: pg_tree(pg),
        nats: stat(nats).map(|s| s.0).unwrap_or(0.0),
        machine: machine(),
    }
}

/// The backend pids of `db` by role: (relay's pool, relay's `LISTEN` connection, producers').
async fn backends(admin: &sqlx::PgPool, db: &str) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let rows: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT pid, usename::text, coalesce(query, '') FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(db)
    .fetch_all(admin)
    .await
    .unwrap();
    let (mut relay, mut listen, mut producers) = (Vec::new(), Vec::new(), Vec::new());
    for (pid, user, query) in rows {
        if user != RELAY_ROLE {
            producers.push(pid as u32);
        } else if query
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("LISTEN")
        {
            listen.push(pid as u32);
        } else {
            relay.push(pid as u32);
        }
    }
    (relay, listen, producers)
}

/// The relay's statements in `db`, by kind: (calls, server ms executing, plannings, ms planning;
/// the last two need `pg_stat_statements.track_planning`, which the script turns on).
async fn relay_statements(admin: &sqlx::PgPool, db: &str) -> Vec<(String, i64, f64, i64, f64)> {
    let rows: Vec<(String, i64, f64, i64, f64)> = sqlx::query_as(
        "SELECT s.query, s.calls, s.total_exec_time, s.plans, s.total_plan_time FROM pg_stat_statements s
         JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.userid
         WHERE d.datname = $1 AND r.rolname = $2",
    )
    .bind(db)
    .bind(RELAY_ROLE)
    .fetch_all(admin)
    .await
    .unwrap_or_default();
    let mut out: HashMap<&'static str, (i64, f64, i64, f64)> = HashMap::new();
    for (q, calls, ms, plans, plan_ms) in rows {
        let e = out.entry(classify(&q)).or_default();
        e.0 += calls;
        e.1 += ms;
        e.2 += plans;
        e.3 += plan_ms;
    }
    let mut v: Vec<(String, i64, f64, i64, f64)> = out
        .into_iter()
        .map(|(k, (c, ms, p, pms))| (k.to_string(), c, ms, p, pms))
        .collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1));
    v
}

fn classify(q: &str) -> &'static str {
    let t = q.trim_start().to_ascii_uppercase();
    if t.starts_with("BEGIN") {
        "begin"
    } else if t.starts_with("COMMIT") {
        "commit"
    } else if t.contains("WITH RECURSIVE T(TENANT_ID)") {
        "claim"
    } else if t.contains("SET_CONFIG('JIT'") {
        "claim_settings"
    } else if t.contains("INSERT INTO OUTBOX_PUBLISHED") || t.contains("DELETE FROM OUTBOX_EVENT") {
        "settle"
    } else if t.starts_with("LISTEN") {
        "listen"
    } else if t.contains("OUTBOX_PARTITION") || t.contains("OUTBOX_RELAY") {
        "lease"
    } else if t.contains("COUNT(*)") {
        "gauges"
    } else {
        "other"
    }
}

/// The child: a relay at its defaults (own pool of 4, `LISTEN` wake-ups, the Prometheus recorder
/// as `outbox relay` installs it) until its stdin closes; each line read on stdin is answered with
/// `BATCHES <count> <sum>` of its batch-size histogram.
async fn relay_child() {
    let metrics = outbox_runtime::http::install_metrics().unwrap();
    let url = std::env::var("STEADY_DB_URL").unwrap();
    let stream = TestStream {
        name: std::env::var("STEADY_STREAM").unwrap(),
        prefix: std::env::var("STEADY_PREFIX").unwrap(),
    };
    let mut config = RelayConfig {
        relay_id: testkit::unique("steady"),
        ..Default::default()
    };
    if std::env::var("STEADY_RETENTION_ZERO").as_deref() == Ok("1") {
        config.retention = Some(Duration::ZERO);
    }
    let (relay, pool) = support::nats_relay(&url, &stream, config, 4).await;
    let stop = CancellationToken::new();
    let listen = tokio::spawn(outbox::wake::listen(
        pool,
        relay.waker(),
        stop.child_token(),
    ));
    let s = stop.clone();
    let task = tokio::spawn(async move { relay.run(s).await });
    println!("READY");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {
        let (sum, count) = summary(&metrics.render(), outbox::telemetry::BATCH_SIZE);
        println!("BATCHES {count} {sum}");
        let _ = std::io::stdout().flush();
    }
    stop.cancel();
    let _ = task.await;
    let _ = listen.await;
    std::mem::forget(stream);
}

#[tokio::main]
async fn main() {
    if std::env::var("PROFILE_STEADY_RELAY").as_deref() == Ok("1") {
        return relay_child().await;
    }
    let args: Vec<String> = std::env::args().collect();
    let rate: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let pid = |name: &str| -> u32 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!("{name} must name the process (run scripts/profile-steady.sh)")
            })
    };
    let (pg_pid, nats_pid) = (pid("PROFILE_PG_PID"), pid("PROFILE_NATS_PID"));
    let label = std::env::var("PROFILE_LABEL").unwrap_or_else(|_| "this build".into());
    let notify = std::env::var("STEADY_NOTIFY").unwrap_or_else(|_| "commit".into());
    let phases = std::env::var("STEADY_PHASES").unwrap_or_else(|_| "off,on".into());
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", testkit::pg_server_url()))
        .await
        .unwrap();
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&admin)
        .await
        .expect("pg_stat_statements (the script's server preloads it)");
    let _ = sqlx::query(&format!("CREATE ROLE {RELAY_ROLE} LOGIN SUPERUSER"))
        .execute(&admin)
        .await;
    for phase in phases.split(',') {
        let with_relay = phase == "on";
        run_phase(
            &admin, &label, with_relay, rate, secs, &notify, pg_pid, nats_pid,
        )
        .await;
        quiet().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    admin: &sqlx::PgPool,
    label: &str,
    with_relay: bool,
    rate: u64,
    secs: u64,
    notify: &str,
    pg_pid: u32,
    nats_pid: u32,
) {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let mut child = None;
    let mut child_out = None;
    if with_relay {
        let relay_url = db.url.replacen("://root@", &format!("://{RELAY_ROLE}@"), 1);
        let mut c = tokio::process::Command::new(std::env::current_exe().unwrap())
            .env("PROFILE_STEADY_RELAY", "1")
            .env("STEADY_DB_URL", relay_url)
            .env("STEADY_STREAM", &stream.name)
            .env("STEADY_PREFIX", &stream.prefix)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut out = tokio::io::BufReader::new(c.stdout.take().unwrap()).lines();
        while let Some(l) = out.next_line().await.unwrap() {
            if l == "READY" {
                break;
            }
        }
        child_out = Some(out);
        child = Some(c);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let relay_pid = child.as_ref().and_then(|c| c.id());
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
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(32)
        .connect(&db.url)
        .await
        .unwrap();
    let (outbox, notifier) = match notify {
        "commit" => (Outbox::new("Bench").with_notify(true), None),
        "off" => (Outbox::new("Bench").with_notify(false), None),
        w => {
            let ms: u64 = w
                .strip_prefix("window:")
                .and_then(|m| m.parse().ok())
                .expect("STEADY_NOTIFY: commit, off or window:<ms>");
            (
                Outbox::new("Bench").with_notify(false),
                Some(outbox::wake::CommitNotifier::spawn(
                    pool.clone(),
                    Duration::from_millis(ms),
                )),
            )
        }
    };
    let committed: Arc<Mutex<HashMap<String, (Instant, bool)>>> = Arc::default();
    // 2 s of warm-up (connections opened, plans cached), then `secs` measured.
    let warm = rate * 2;
    let total = rate * secs;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut producers = tokio::task::JoinSet::new();
    let mut before = None;
    for i in 0..warm + total {
        tick.tick().await;
        if i == warm {
            while producers.len() > 4 {
                producers.join_next().await;
            }
            sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(admin)
                .await
                .unwrap();
            let batches = match child_out.as_mut() {
                Some(out) => batches(child.as_mut().unwrap(), out).await,
                None => (0.0, 0.0),
            };
            let (rb, lb, pb) = backends(admin, db.name()).await;
            before = Some((sample(pg_pid, nats_pid, relay_pid), batches, rb, lb, pb));
        }
        let (pool, ob, c, n) = (
            pool.clone(),
            outbox.clone(),
            committed.clone(),
            notifier.clone(),
        );
        let measured = i >= warm;
        let ev = NewEvent::new(
            "t1",
            "ProductVariant",
            format!("v{}", i % 100),
            "StockLevelChangedEvent",
            "inventory.stock.changed",
            serde_json::json!({"i": i}),
        );
        producers.spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let id = ob.enqueue(&mut tx, &[ev]).await.unwrap()[0];
            tx.commit().await.unwrap();
            if let Some(n) = n {
                n.committed();
            }
            c.lock()
                .await
                .insert(id.to_string(), (Instant::now(), measured));
        });
        while producers.len() > 64 {
            producers.join_next().await;
        }
    }
    while producers.join_next().await.is_some() {}
    let end = Instant::now() + Duration::from_secs(20);
    if with_relay {
        while received.lock().await.len() < (warm + total) as usize && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let batches_after = match child_out.as_mut() {
        Some(out) => batches(child.as_mut().unwrap(), out).await,
        None => (0.0, 0.0),
    };
    let after = sample(pg_pid, nats_pid, relay_pid);
    let (rb_after, lb_after, pb_after) = backends(admin, db.name()).await;
    let stmts = relay_statements(admin, db.name()).await;
    let (a, batches_before, rb, lb, pb) = before.unwrap();
    reader.abort();

    // --- report ---------------------------------------------------------------------------
    let e = total as f64;
    let us = |s: f64| s / e * 1e6;
    let wall = after.at.duration_since(a.at).as_secs_f64();
    let d = |pids: &[u32], extra: &[u32]| -> f64 {
        let mut all: Vec<u32> = pids.to_vec();
        all.extend_from_slice(extra);
        all.sort_unstable();
        all.dedup();
        all.iter()
            .map(|p| after.pg.get(p).copied().unwrap_or(0.0) - a.pg.get(p).copied().unwrap_or(0.0))
            .sum()
    };
    let listen_be = d(&lb, &lb_after);
    let relay_be = d(&rb, &rb_after) + listen_be;
    let prod_be = d(&pb, &pb_after);
    let pg_total: f64 = after.pg.values().sum::<f64>() - a.pg.values().sum::<f64>();
    let pg_other = pg_total - relay_be - prod_be;
    let relay = after.relay - a.relay;
    let nats = after.nats - a.nats;
    let me = after.me - a.me;
    let busy = (after.machine.0 - a.machine.0) / wall;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let outside = busy - (me + relay + pg_total + nats) / wall;
    let mode = if with_relay { "relay on " } else { "relay off" };
    println!(
        "[{label}] {mode} notify {notify}: {total} events at {rate}/s over {wall:.1} s; load average {}; machine {busy:.2} of {cores} cores busy, {outside:.2} outside these processes",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "[{label}] {mode} CPU us/event: relay process {:.1}  relay backends {:.1} (of it LISTEN {:.1})  nats-server {:.1}  | producers' backends {:.1}  other postgres {:.1}  producer+subscriber process {:.1}",
        us(relay),
        us(relay_be),
        us(listen_be),
        us(nats),
        us(prod_be),
        us(pg_other),
        us(me)
    );
    if with_relay {
        let (c0, s0) = batches_before;
        let (c1, s1) = batches_after;
        let nb = (c1 - c0).max(1.0);
        let calls: i64 = stmts.iter().map(|s| s.1).sum();
        let list: Vec<String> = stmts
            .iter()
            .map(|(k, c, ms, p, pms)| {
                format!(
                    "{k} {c} (exec {:.3} ms; {p} plannings, {:.3} ms each)",
                    ms / *c.max(&1) as f64,
                    pms / *p.max(&1) as f64
                )
            })
            .collect();
        println!(
            "[{label}] {mode} batches {nb:.0}, mean size {:.2}; relay statements {calls} = {:.2} per batch: {}",
            (s1 - s0) / nb,
            calls as f64 / nb,
            list.join(", ")
        );
        println!(
            "[{label}] {mode} RELAY-SIDE us/event {:.1} (relay {:.1} + its backends {:.1} + nats {:.1})",
            us(relay) + us(relay_be) + us(nats),
            us(relay),
            us(relay_be),
            us(nats)
        );
        let committed = committed.lock().await;
        let received = received.lock().await;
        let mut lat: Vec<f64> = committed
            .iter()
            .filter(|(_, (_, measured))| *measured)
            .filter_map(|(id, (c, _))| {
                let r = received.get(id)?;
                Some(r.saturating_duration_since(*c).as_secs_f64() * 1e3)
            })
            .collect();
        let n = lat.len();
        println!(
            "[{label}] {mode} commit-to-stream p50 {:.2} ms  p99 {:.2} ms  ({n} of {total} events seen)",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99)
        );
    }
    if let Some(mut c) = child {
        drop(c.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), c.wait()).await;
        let _ = c.kill().await;
    }
    pool.close().await;
    let _ = std::io::stdout().flush();
}

/// The child's batch-size histogram: (count, sum).
async fn batches(
    child: &mut tokio::process::Child,
    out: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> (f64, f64) {
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(b"report\n").await.unwrap();
    stdin.flush().await.unwrap();
    while let Some(l) = out.next_line().await.unwrap() {
        if let Some(rest) = l.strip_prefix("BATCHES ") {
            let mut it = rest.split(' ').filter_map(|v| v.parse::<f64>().ok());
            return (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0));
        }
    }
    (0.0, 0.0)
}
