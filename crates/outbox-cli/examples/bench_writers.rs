//! What the outbox table's rules cost writers (issue 20, goal 5): four producer workloads against
//! four schemas, interleaved in one run, with the ratios to the schema before the table contract.
//!
//! `cargo run --release -p outbox-cli --example bench_writers -- [events] [rounds]`
//! (defaults 20000 and 5). Schemas, each a fresh database per round with a chosen set of the
//! library's embedded migrations (`TestDb::apply_outbox_migrations`):
//! - `pre`: the first two migrations (before the table contract, issue 10);
//! - `contract`: every migration except this blocks (`20261210*`, `20261212*`);
//! - `now`: every migration before the fifth pass (`20261213*`, the rules as domains);
//! - `next`: every migration.
//!
//! Workloads, in this order in each database (events over 5,000 aggregates of 10 tenants):
//! - `multi`: one multi-row `INSERT ... SELECT` of `events` rows;
//! - `single`: `events` single-row `INSERT`s (prepared, bound), 1,000 per transaction;
//! - `enqueue`: `Outbox::enqueue` of 100 events per transaction, `events` in all;
//! - `commit1`: 300 transactions of one `Outbox::enqueue`d event each (waits for the WAL flush).
//!
//! `BENCH_WORKLOADS=multi,single` runs only the named workloads (the others print 0); `single`
//! should keep `multi` before it, which creates the aggregates it then updates.
//!
//! Prints, per workload, the median time per schema and the median (min-max) over rounds of the
//! ratio to `pre` measured in the same round (the goal is `now / pre` at most 1.2), for the wall
//! clock and for the CPU time of the writing connection's server process (`/proc`, so the server
//! must run on this machine): on a shared machine the second is the steadier measure of what the
//! triggers and constraints cost.

use std::time::Instant;

use outbox::{NewEvent, Outbox};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use testkit::TestDb;
use uuid::Uuid;

const SCHEMAS: [&str; 4] = ["pre", "contract", "now", "next"];
const WORKLOADS: [&str; 4] = ["multi", "single", "enqueue", "commit1"];
const COMMITS: usize = 300;

/// A fresh database with the schema `schema` (see the module docs).
async fn database(schema: &str) -> TestDb {
    let db = TestDb::empty().await;
    db.apply_outbox_migrations(|v| match schema {
        "pre" => v < 20261201000001,
        "contract" => {
            !(20261210000001..=20261210999999).contains(&v)
                && !(20261212000001..=20261212999999).contains(&v)
        }
        "now" => v < 20261213000001,
        _ => true,
    })
    .await;
    db
}

fn event(i: usize) -> NewEvent {
    NewEvent::new(
        format!("t{}", i % 10),
        "V",
        format!("a{}", i % 5000),
        "StockLevelChangedEvent",
        "inventory.stock.changed",
        json!({ "n": i }),
    )
}

/// CPU milliseconds used so far by the server process `pid` (the connection's backend), from
/// `/proc`: the trigger and constraint work, free of what other processes on a shared machine do
/// to the wall clock. The server must run on this machine. `/proc/<pid>/schedstat` counts in
/// nanoseconds (a single-event commit costs a fraction of a millisecond); `stat`, in 10 ms clock
/// ticks, is the fallback.
fn backend_cpu_ms(pid: i32) -> f64 {
    if let Some(ns) = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
    {
        return ns / 1e6;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let ticks: f64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    ticks * 10.0 // USER_HZ is 100 on Linux
}

/// Wall and backend CPU milliseconds of one workload on `conn`.
async fn run(conn: &mut PgConnection, workload: &str, events: usize) -> (f64, f64) {
    sqlx::query("CHECKPOINT").execute(&mut *conn).await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let outbox = Outbox::new("Bench");
    let cpu0 = backend_cpu_ms(pid);
    let t = Instant::now();
    match workload {
        "multi" => {
            sqlx::query(
                "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                           topic, payload, headers)
                 SELECT gen_random_uuid(), 't' || (g % 10), 'V', 'a' || (g % 5000), 'StockLevelChangedEvent',
                        'inventory.stock.changed', convert_to('{\"n\":' || g || '}', 'UTF8'),
                        '{\"correlationId\":\"c\",\"contentType\":\"application/json\"}'
                 FROM generate_series(1, $1) g ORDER BY g",
            )
            .bind(events as i64)
            .execute(&mut *conn)
            .await
            .unwrap();
        }
        "single" => {
            let headers = json!({ "correlationId": "c", "contentType": "application/json" });
            for chunk in (0..events).collect::<Vec<_>>().chunks(1000) {
                let mut tx = conn.begin().await.unwrap();
                for &i in chunk {
                    sqlx::query(
                        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id,
                                                   event_type, topic, payload, headers)
                         VALUES ($1, $2, 'V', $3, 'StockLevelChangedEvent', 'inventory.stock.changed', $4, $5)",
                    )
                    .bind(Uuid::now_v7())
                    .bind(format!("t{}", i % 10))
                    .bind(format!("a{}", i % 5000))
                    .bind(format!("{{\"n\":{i}}}").into_bytes())
                    .bind(&headers)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
                tx.commit().await.unwrap();
            }
        }
        "enqueue" => {
            for start in (0..events).step_by(100) {
                let batch: Vec<NewEvent> = (start..(start + 100).min(events)).map(event).collect();
                let mut tx = conn.begin().await.unwrap();
                outbox.enqueue(&mut tx, &batch).await.unwrap();
                tx.commit().await.unwrap();
            }
        }
        _ => {
            for i in 0..COMMITS {
                let mut tx = conn.begin().await.unwrap();
                outbox.enqueue(&mut tx, &[event(i)]).await.unwrap();
                tx.commit().await.unwrap();
            }
        }
    }
    (
        t.elapsed().as_secs_f64() * 1000.0,
        backend_cpu_ms(pid) - cpu0,
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    println!(
        "machine: {} cores; {events} events per workload ({COMMITS} for commit1), {rounds} rounds, schemas interleaved",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    // BENCH_WORKLOADS=single,... runs only those (the others print as 0).
    let only: Option<Vec<String>> = std::env::var("BENCH_WORKLOADS")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());
    // ms[schema][workload][round], cpu likewise
    let mut ms = vec![vec![Vec::new(); WORKLOADS.len()]; SCHEMAS.len()];
    let mut cpu = ms.clone();
    for round in 0..rounds {
        // Rotate the order so that no schema always goes first.
        for k in 0..SCHEMAS.len() {
            let s = (k + round) % SCHEMAS.len();
            let db = database(SCHEMAS[s]).await;
            let mut conn = PgConnection::connect(&db.url).await.unwrap();
            for (w, workload) in WORKLOADS.iter().enumerate() {
                if only
                    .as_ref()
                    .is_some_and(|o| !o.iter().any(|x| x == workload))
                {
                    ms[s][w].push(0.0);
                    cpu[s][w].push(0.0);
                    continue;
                }
                let (wall, c) = run(&mut conn, workload, events).await;
                ms[s][w].push(wall);
                cpu[s][w].push(c);
            }
            conn.close().await.unwrap();
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!(
        "wall clock (ms, events/s), and the ratio to pre: median (min-max) of the rounds' ratios"
    );
    report(&ms, rounds, events, true);
    println!("server CPU of the writing connection's backend (ms), same ratios");
    report(&cpu, rounds, events, false);
}

fn report(ms: &[Vec<Vec<f64>>], rounds: usize, events: usize, rate: bool) {
    for (w, workload) in WORKLOADS.iter().enumerate() {
        let n = if *workload == "commit1" {
            COMMITS
        } else {
            events
        };
        let mut line = format!("{workload:<8}");
        for (s, schema) in SCHEMAS.iter().enumerate() {
            let m = median(&mut ms[s][w].clone());
            line += &format!("  {schema} {m:7.0} ms");
            if rate {
                line += &format!(" ({:6.0}/s)", n as f64 * 1000.0 / m);
            }
        }
        for s in 1..SCHEMAS.len() {
            let mut r: Vec<f64> = (0..rounds)
                .map(|i| ms[s][w][i] / ms[0][w][i].max(1.0))
                .collect();
            let (lo, hi) = r
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            line += &format!(
                "  {}/pre {:.2} ({lo:.2}-{hi:.2})",
                SCHEMAS[s],
                median(&mut r)
            );
        }
        println!("{line}");
    }
}
