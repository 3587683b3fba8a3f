//! Cost of one claim (`PgStore::claim`, batch 1000, all 64 partitions) with 0, 50,000 and 500,000
//! events behind one dead letter, on top of a normal backlog of other aggregates (issue 10, point
//! 4; goal: every claim within 1.5x of the unblocked one). Each case gets a fresh database in which
//! the stuck aggregate's rows come first in id order, the worst case: a claim walking the pending
//! index in id order meets all of them before any deliverable row of that tenant.
//! `cargo run --release -p outbox-cli --example bench_claim -- [backlog] [claims]`
//! (defaults 100000 and 150).

use std::time::{Duration, Instant};

use outbox::store::{RelayStore, Settlement};
use outbox::PgStore;
use testkit::TestDb;

#[path = "support/mod.rs"]
mod support;

/// Claim times (see [`measure`]) with the rows behind the dead letter held, and with them left
/// pending (the layout before issue 10).
type Times = (f64, f64, usize);
async fn case(behind: i64, backlog: i64, claims: usize) -> (Times, Option<Times>) {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let lease = store
        .lease_round("bench", "bench-instance", Duration::from_secs(600))
        .await
        .unwrap();
    let fence = outbox::store::Fence {
        relay_id: "bench".into(),
        partitions: lease.owned,
        epochs: lease.epochs,
    };
    // The stuck aggregate's first event, then its tail, then (below) the relay dead-letters the
    // first event the way it does after a failed publish, with the tail already queued behind it.
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         VALUES (gen_random_uuid(), 't0', 'ProductVariant', 'stuck', 'E', 'x.y', '\\x7b7d')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let t = Instant::now();
    // The tail is written with the insert trigger off and its columns filled as the trigger
    // would: 500,000 upserts of one aggregate's sequence row run into the row versions that the
    // other sessions of this shared server keep from being pruned, which takes many minutes and
    // is not what is measured here.
    let mut conn = db.pool.acquire().await.unwrap();
    for sql in [
        "ALTER TABLE outbox_event DISABLE TRIGGER outbox_event_assign",
        "INSERT INTO outbox_event (id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic,
                                   payload, seq, seq_epoch, partition, status, next_attempt_at)
         SELECT nextval('outbox_event_id_seq'), gen_random_uuid(), 't0', 'ProductVariant', 'stuck', 'E', 'x.y',
                '\\x7b7d', 1 + g, a.seq_epoch, outbox_partition_of('t0', 'ProductVariant', 'stuck'),
                'pending', '-infinity'
         FROM generate_series(1, $1) g, outbox_aggregate a WHERE a.aggregate_id = 'stuck' ORDER BY g",
        "ALTER TABLE outbox_event ENABLE TRIGGER outbox_event_assign",
        "UPDATE outbox_aggregate SET last_seq = 1 + $1,
                last_id = (SELECT max(id) FROM outbox_event WHERE aggregate_id = 'stuck')
         WHERE aggregate_id = 'stuck'",
    ] {
        let q = sqlx::query(sql);
        let q = if sql.contains("$1") { q.bind(behind) } else { q };
        q.execute(&mut *conn).await.unwrap();
    }
    drop(conn);
    let first: uuid::Uuid = sqlx::query_scalar(
        "SELECT event_id FROM outbox_event WHERE aggregate_id = 'stuck' AND seq = 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    store
        .settle(
            &[Settlement::Dead {
                id: first,
                error: "bench".into(),
            }],
            false,
            &fence,
        )
        .await
        .unwrap();
    println!(
        "{behind} events behind the dead letter written and held in {:.1} s (not timed)",
        t.elapsed().as_secs_f64()
    );
    support::write_backlog(&db, backlog).await;
    sqlx::query("VACUUM ANALYZE outbox_event")
        .execute(&db.pool)
        .await
        .unwrap();
    support::quiet().await;
    let held = measure(&store, claims).await;
    // The same rows left `pending` behind the dead letter, as before the `held` status: what the
    // claim cost without it, in the same database.
    let pending = if behind > 0 {
        sqlx::query("UPDATE outbox_event SET status = 'pending' WHERE status = 'held'")
            .execute(&db.pool)
            .await
            .unwrap();
        sqlx::query("VACUUM ANALYZE outbox_event")
            .execute(&db.pool)
            .await
            .unwrap();
        support::quiet().await;
        Some(measure(&store, claims).await)
    } else {
        None
    };
    (held, pending)
}

/// Median and 90th percentile of `claims` claims in ms, and the last batch's size.
async fn measure(store: &PgStore, claims: usize) -> (f64, f64, usize) {
    let mut times = Vec::with_capacity(claims);
    let mut n = 0;
    for _ in 0..claims {
        let t = Instant::now();
        let batch = store
            .claim("bench", 1000, true, &[], Duration::ZERO)
            .await
            .unwrap()
            .messages;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        n = batch.len();
        assert!(
            batch.iter().all(|m| m.aggregate_id != "stuck"),
            "nothing behind the dead letter is claimed"
        );
    }
    let p50 = support::percentile(&mut times, 0.5);
    let p90 = support::percentile(&mut times, 0.9);
    (p50, p90, n)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let backlog: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let claims: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(150);
    println!(
        "machine: {} cores; normal backlog {backlog} events (10 tenants, 5000 aggregates); {claims} claims of 1000 per case",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut base = None;
    let mut lines = Vec::new();
    for behind in [0i64, 50_000, 500_000] {
        let ((p50, p90, n), pending) = case(behind, backlog, claims).await;
        let b = *base.get_or_insert(p50);
        lines.push(format!(
            "claim with {behind:>6} behind a dead letter: p50 {p50:6.2} ms  p90 {p90:6.2} ms  ({n} rows)  ratio {:.2} (goal <= 1.5)",
            p50 / b
        ));
        if let Some((p50, p90, n)) = pending {
            lines.push(format!(
                "   the same rows left pending (before issue 10): p50 {p50:6.2} ms  p90 {p90:6.2} ms  ({n} rows)  ratio {:.2}",
                p50 / b
            ));
        }
    }
    for l in lines {
        println!("{l}");
    }
}
