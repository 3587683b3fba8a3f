//! Where a drain's time goes (issue 20, goals 1-2): drains a backlog to JetStream with the relay at
//! its default settings (rows kept as published) and prints, for the drain only,
//! - the CPU microseconds per event of the relay (this process), of PostgreSQL (every process of
//!   the server: client backends, walwriter, checkpointer, background writer, autovacuum, and what
//!   exited during the drain) and of nats-server, read from `/proc` (utime + stime);
//! - the round trips per batch to PostgreSQL (from `pg_stat_statements`) and the publish waves
//!   per batch (the longest chain of one aggregate in a batch: one acknowledgement each);
//! - the composite limit of this machine for the relay's work: its cores divided by the summed
//!   CPU per event, and the single-threaded stages (the claim's and the settlement's statements,
//!   each run by one backend), and the drain's ratio to it;
//! - a raw JetStream publish of the very messages in the same run, and the drain's ratio to it.
//!
//! Run by `scripts/profile-drain.sh`, which starts a PostgreSQL and a nats-server of its own so
//! that their processes hold nothing but this run's work (the shared servers serve other tests):
//! `PROFILE_PG_PID` (the postmaster) and `PROFILE_NATS_PID` name them. `PROFILE_PERF=<file>`
//! records the relay's process with `perf record` during the drain.
//! `cargo run --release -p outbox-cli --example profile_drain -- [backlog]` (default 200000).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use outbox::RelayConfig;
use testkit::{TestDb, TestStream};
use tokio_util::sync::CancellationToken;

#[path = "support/mod.rs"]
mod support;
use support::cpu::{machine, stat, summary};
use support::{quiet, write_backlog};

/// What a PostgreSQL process does, from the title it sets (`postgres: walwriter`, ...).
fn pg_role(pid: u32) -> String {
    let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let title = cmd.trim_end_matches('\0').replace('\0', " ");
    let t = title.trim_start_matches("postgres: ");
    for role in [
        "walwriter",
        "checkpointer",
        "background writer",
        "autovacuum launcher",
        "autovacuum worker",
        "logical replication launcher",
        "stats collector",
    ] {
        if t.starts_with(role) {
            return role.replace(' ', "_");
        }
    }
    "backends".into()
}

/// CPU seconds of a process tree rooted at `root` (the postmaster): its own, what it reaped of
/// exited children, and every live child's own, by role.
fn tree(root: u32) -> HashMap<String, f64> {
    let mut out: HashMap<String, f64> = HashMap::new();
    if let Some((own, reaped, _)) = stat(root) {
        *out.entry("postmaster".into()).or_default() += own;
        // Children that exited (backends of closed connections, autovacuum workers).
        *out.entry("exited".into()).or_default() += reaped;
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((own, _, ppid)) = stat(pid) {
            if ppid == root {
                *out.entry(pg_role(pid)).or_default() += own;
            }
        }
    }
    out
}

#[derive(Clone)]
struct Sample {
    at: Instant,
    me: f64,
    pg: HashMap<String, f64>,
    nats: f64,
    machine: (f64, f64),
}

impl Sample {
    fn take(pg: u32, nats: u32) -> Self {
        Self {
            at: Instant::now(),
            me: stat(std::process::id()).map(|s| s.0).unwrap_or(0.0),
            pg: tree(pg),
            nats: stat(nats).map(|s| s.0).unwrap_or(0.0),
            machine: machine(),
        }
    }
}

/// CPU spent between two samples.
struct Spent {
    wall: f64,
    me: f64,
    pg: Vec<(String, f64)>,
    pg_total: f64,
    nats: f64,
    /// Cores busy on the whole machine, and how many of them were not these three processes.
    busy: f64,
    outside: f64,
}

fn spent(a: &Sample, b: &Sample) -> Spent {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    let mut pg: Vec<(String, f64)> =
        b.pg.iter()
            .map(|(k, v)| (k.clone(), v - a.pg.get(k).copied().unwrap_or(0.0)))
            .collect();
    // A live backend that existed at `a` and exited before `b` moved from its role into
    // "exited": the sum is right, the split shows it.
    pg.sort_by(|x, y| y.1.partial_cmp(&x.1).unwrap());
    let pg_total: f64 = pg.iter().map(|(_, v)| v).sum();
    let me = b.me - a.me;
    let nats = b.nats - a.nats;
    let busy = (b.machine.0 - a.machine.0) / wall;
    Spent {
        wall,
        me,
        pg,
        pg_total,
        nats,
        busy,
        outside: busy - (me + pg_total + nats) / wall,
    }
}

/// The `pg_stat_statements` rows of one database, keyed by a short name of the statement.
async fn statements(admin: &sqlx::PgPool, db: &str) -> HashMap<&'static str, (i64, f64, i64)> {
    let rows: Vec<(String, i64, f64, i64)> = sqlx::query_as(
        "SELECT s.query, s.calls, s.total_exec_time, s.rows FROM pg_stat_statements s
         JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
    )
    .bind(db)
    .fetch_all(admin)
    .await
    .unwrap_or_default();
    let mut out: HashMap<&'static str, (i64, f64, i64)> = HashMap::new();
    for (q, calls, ms, n) in rows {
        let name = classify(&q);
        let e = out.entry(name).or_default();
        e.0 += calls;
        e.1 += ms;
        e.2 += n;
    }
    out
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
    } else if t.contains("OUTBOX_PARTITION") || t.contains("OUTBOX_RELAY") {
        "lease"
    } else if t.contains("COUNT(*)") {
        "gauges"
    } else {
        "other"
    }
}

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        outbox_cli::logging::init(outbox_cli::logging::LogFormat::Text);
    }
    let backlog: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let pid = |name: &str| -> u32 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!("{name} must name the process (run scripts/profile-drain.sh)")
            })
    };
    let (pg_pid, nats_pid) = (pid("PROFILE_PG_PID"), pid("PROFILE_NATS_PID"));
    let label = std::env::var("PROFILE_LABEL").unwrap_or_else(|_| "this build".into());
    // The relay's metrics recorder, as `outbox relay` installs it: per-event counters and
    // histograms are part of the relay's work.
    let metrics = outbox_runtime::http::install_metrics().unwrap();

    let admin = sqlx::PgPool::connect(&format!("{}/postgres", testkit::pg_server_url()))
        .await
        .unwrap();
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&admin)
        .await
        .expect("pg_stat_statements (the script's server preloads it)");

    let db = TestDb::new().await;
    write_backlog(&db, backlog).await;

    // Raw baseline: the relay's exact messages, no database (as bench_nats).
    let msgs = support::backlog_messages(&db).await;
    let waves = longest_chain(&msgs, 1000);
    let client = async_nats::connect(testkit::nats_url()).await.unwrap();
    let (raw_stream, js, template) = support::raw_stream(&client).await;
    quiet().await;
    let a = Sample::take(pg_pid, nats_pid);
    support::raw_publish(&js, &msgs, &template).await;
    let raw_spent = spent(&a, &Sample::take(pg_pid, nats_pid));
    let n = msgs.len() as f64;
    let raw = n / raw_spent.wall;
    drop(msgs);
    let _ = js.delete_stream(&raw_stream.name).await;
    quiet().await;

    // The drain: the relay at its defaults, its own pool of 4 as `outbox relay` runs it.
    let stream = TestStream::new();
    // `PROFILE_BATCH` tries another batch size; the default is the relay's.
    let mut config = RelayConfig {
        relay_id: testkit::unique("profile"),
        ..Default::default()
    };
    if let Some(b) = std::env::var("PROFILE_BATCH")
        .ok()
        .and_then(|b| b.parse().ok())
    {
        config.batch_size = b;
    }
    let batch_size = config.batch_size;
    let (relay, _pool) = support::nats_relay(&db.url, &stream, config, 4).await;
    let mut info = jetstream::new(client.clone())
        .get_stream(&stream.name)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&admin)
        .await
        .unwrap();
    let perf = std::env::var("PROFILE_PERF").ok().map(|out| {
        std::process::Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "999",
                "-g",
                "-o",
                &out,
                "-p",
            ])
            .arg(std::process::id().to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf (linux-perf) on the PATH")
    });
    if perf.is_some() {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let stop = CancellationToken::new();
    let s = stop.clone();
    let a = Sample::take(pg_pid, nats_pid);
    let task = tokio::spawn(async move { relay.run(s).await });
    loop {
        let n = info.info().await.unwrap().state.messages;
        if n as i64 >= backlog {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = spent(&a, &Sample::take(pg_pid, nats_pid));
    if let Some(mut p) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status();
        let _ = p.wait();
    }
    let st = statements(&admin, db.name()).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    let drained = backlog as f64 / d.wall;
    let rendered = metrics.render();
    let (pub_sum, pub_count) = summary(&rendered, outbox::telemetry::PUBLISH_SECONDS);

    // --- report -----------------------------------------------------------------------------
    let e = backlog as f64;
    let us = |s: f64| s / e * 1e6;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    println!(
        "[{label}] drain of {backlog} events, rows kept (default settings): {:.2} s = {drained:.0} events/s",
        d.wall
    );
    println!(
        "[{label}] raw JetStream publish of the same messages: {raw:.0} msg/s; drain / raw = {:.2}",
        drained / raw
    );
    println!(
        "[{label}] machine during the drain: {:.2} of {cores} cores busy, {:.2} of them outside these three processes",
        d.busy, d.outside
    );
    let total = us(d.me) + us(d.pg_total) + us(d.nats);
    println!(
        "[{label}] CPU per event (us): relay {:.1}  postgres {:.1}  nats-server {:.1}  total {:.1}",
        us(d.me),
        us(d.pg_total),
        us(d.nats),
        total
    );
    let split: Vec<String> =
        d.pg.iter()
            .filter(|(_, v)| *v > 0.0)
            .map(|(k, v)| format!("{k} {:.1}", us(*v)))
            .collect();
    println!(
        "[{label}]   postgres by process (us/event): {}",
        split.join("  ")
    );
    println!(
        "[{label}]   raw publish, per message (us): publisher {:.1}  nats-server {:.1}",
        raw_spent.me / n * 1e6,
        raw_spent.nats / n * 1e6
    );
    let batches = st.get("claim").map(|c| c.0).unwrap_or(0).max(1) as f64;
    let settles = st.get("settle").map(|c| c.0).unwrap_or(0).max(1) as f64;
    let per = |k: &str| st.get(k).map(|c| c.0 as f64).unwrap_or(0.0);
    let claim_rt = (per("claim") + per("claim_settings") + per("begin") + per("commit")) / batches;
    println!(
        "[{label}] round trips: {batches:.0} claims, {settles:.0} settlements; per batch: claim {claim_rt:.1} (the claim, with BEGIN, settings and COMMIT on a shared pool), publish {waves} wave(s) of acknowledgements, settle {:.1}; lease/gauges {:.0} statements in all",
        per("settle") / settles,
        per("lease") + per("gauges")
    );
    let ms = |k: &str| st.get(k).map(|c| c.1).unwrap_or(0.0);
    let claim_ms = ms("claim") / batches;
    let settle_ms = ms("settle") / settles;
    let publish_ms = if pub_count > 0.0 {
        pub_sum / pub_count * 1e3
    } else {
        f64::NAN
    };
    let per_batch = e / batches;
    println!(
        "[{label}] per batch of {per_batch:.0}: claim statement {claim_ms:.1} ms, settle statement {settle_ms:.1} ms (server time), publish {publish_ms:.1} ms (relay's wall, claim of the next batch overlapped)"
    );
    let cpu_limit = cores * 1e6 / total;
    let claim_limit = per_batch / claim_ms * 1e3;
    let settle_limit = per_batch / settle_ms * 1e3;
    let limit = cpu_limit.min(claim_limit).min(settle_limit).min(raw);
    println!(
        "[{label}] composite limit: {cores} cores / {total:.1} us = {cpu_limit:.0} events/s; single-threaded stages: claim {claim_limit:.0}, settle {settle_limit:.0}, raw publish {raw:.0}; limit {limit:.0} events/s (batch size {batch_size})"
    );
    // What the three processes could have had: the cores not taken by other work during the
    // drain (on a shared machine the ratio to the 2-core limit mostly measures the neighbours).
    let left = (cores - d.outside).max(0.1);
    println!(
        "[{label}] cores left to these processes by other work: {left:.2}; CPU limit with them {:.0} events/s, drain / it = {:.2}",
        left * 1e6 / total,
        drained / (left * 1e6 / total)
    );
    println!(
        "[{label}] RESULT drain {drained:.0} events/s, ratio to the composite limit {:.2} (goal >= 0.8), ratio to raw publish {:.2}",
        drained / limit,
        drained / raw
    );
    drop(db);
}

/// The longest run of one aggregate inside one batch of `batch` rows in id order: the
/// acknowledgements waited for one after another (the pipeline sends one per aggregate at a time).
fn longest_chain(msgs: &[outbox::OutboundMessage], batch: usize) -> usize {
    msgs.chunks(batch)
        .map(|c| {
            let mut n: HashMap<(&str, &str, &str), usize> = HashMap::new();
            for m in c {
                *n.entry(m.aggregate_key()).or_default() += 1;
            }
            n.values().copied().max().unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}
