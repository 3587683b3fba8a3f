//! p99 commit latency of concurrent producers while a large retention pass runs, against the same
//! workload without it, in the same run (issue 5; goal: within 2x).
//! `cargo run --release -p outbox-cli --example bench_cleanup -- [published rows]` (default 200000).

use std::time::{Duration, Instant};

use outbox::Outbox;
use testkit::TestDb;

#[path = "support/mod.rs"]
mod support;

async fn producers(db: &TestDb, dur: Duration) -> (usize, f64, f64) {
    let mut lat = support::producer_load(db, &Outbox::new("Bench"), "live", 4, dur).await;
    let p50 = support::percentile(&mut lat, 0.5);
    (lat.len(), p50, support::percentile(&mut lat, 0.99))
}

#[tokio::main]
async fn main() {
    let rows: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    println!(
        "machine: {} cores; {rows} published rows past retention",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let db = TestDb::new().await;
    support::write_backlog(&db, rows).await;
    testkit::mark_published(&db.pool, "true", "now() - interval '48 hours'").await;
    sqlx::query("VACUUM ANALYZE outbox_event, outbox_published")
        .execute(&db.pool)
        .await
        .unwrap();
    support::quiet().await;

    let (n0, p50_0, p99_0) = producers(&db, Duration::from_secs(8)).await;
    println!("without cleanup: {n0} commits, p50 {p50_0:.2} ms, p99 {p99_0:.2} ms");

    // The relay's pacing (20 ms between batches: the default) and the operator command at full speed.
    for pause_ms in [20u64, 0] {
        let pool = db.pool.clone();
        let started = Instant::now();
        let cleanup = tokio::spawn(async move {
            let n = outbox::ops::cleanup(
                &pool,
                Duration::from_secs(24 * 3600),
                1000,
                Duration::from_millis(pause_ms),
                false,
            )
            .await
            .unwrap();
            (n, started.elapsed())
        });
        let (n1, p50_1, p99_1) = producers(&db, Duration::from_secs(8)).await;
        let (deleted, took) = cleanup.await.unwrap();
        println!(
            "during cleanup, {pause_ms} ms pause: {n1} commits, p50 {p50_1:.2} ms, p99 {p99_1:.2} ms; ratio {:.2} (goal <= 2.0); deleted {deleted} rows in {:.1} s",
            p99_1 / p99_0,
            took.as_secs_f64()
        );
        if pause_ms == 0 {
            break;
        }
        // As many rows past retention again for the next case (the producers' own rows stay
        // pending and are not touched by retention).
        support::write_backlog(&db, deleted as i64).await;
        testkit::mark_published(
            &db.pool,
            "tenant_id <> 'live'",
            "now() - interval '48 hours'",
        )
        .await;
        sqlx::query("VACUUM ANALYZE outbox_event, outbox_published")
            .execute(&db.pool)
            .await
            .unwrap();
        support::quiet().await;
    }
}
