//! What published rows that autovacuum has not yet reached cost the claim (issue 20). A settled
//! row leaves its entry in the pending index (`outbox_event_pending_tenant`) until a VACUUM
//! removes it, and every claim walks each tenant's entries from the start, so it steps over all of
//! them (killed entries, so cheaply, but each one). Per case: a fresh database with 2,000 pending
//! events of 10 tenants behind `churn` events the relay has already settled with its own statement
//! (`PgStore::settle`, rows kept), autovacuum off for the table; then `claims` claims of 53 rows
//! (a batch at the inventory's 20 ms wake-up window and 2,500 events/s) and of 1,000 rows (the
//! default batch), before and after `VACUUM outbox_event`.
//! `cargo run --release -p outbox-cli --example bench_claim_churn -- [claims]` (default 200).

use std::time::{Duration, Instant};

use outbox::store::{Fence, RelayStore, Settlement};
use outbox::PgStore;
use testkit::TestDb;

#[path = "support/mod.rs"]
mod support;

/// Pending events every case leaves for the claims.
const PENDING: i64 = 2_000;

/// Median claim time in ms of `claims` claims of `limit` rows.
async fn claim_ms(store: &PgStore, limit: i64, claims: usize) -> f64 {
    let mut times = Vec::with_capacity(claims);
    for _ in 0..claims {
        let t = Instant::now();
        let got = store
            .claim("bench", limit, true, &[], Duration::ZERO)
            .await
            .unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(
            got.messages.len() as i64,
            limit,
            "the pending rows are claimed"
        );
    }
    support::percentile(&mut times, 0.5)
}

/// Claim times for 53 and 1,000 rows with `churn` settled rows not vacuumed, then vacuumed.
async fn case(churn: i64, claims: usize) -> [f64; 4] {
    let db = TestDb::new().await;
    // The relay's own pool settings (no JIT, generic plans), as `outbox relay` opens it.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(outbox::pg::relay_connect_options(&db.url).unwrap())
        .await
        .unwrap();
    let store = PgStore::new(pool);
    let lease = store
        .lease_round("bench", "bench-instance", Duration::from_secs(600))
        .await
        .unwrap();
    let fence = Fence {
        relay_id: "bench".into(),
        partitions: lease.owned,
        epochs: lease.epochs,
    };
    sqlx::query("ALTER TABLE outbox_event SET (autovacuum_enabled = false)")
        .execute(&db.pool)
        .await
        .unwrap();
    support::write_backlog(&db, churn + PENDING).await;
    let settled: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT event_id FROM outbox_event ORDER BY id LIMIT $1")
            .bind(churn)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for chunk in settled.chunks(1000) {
        let done: Vec<Settlement> = chunk.iter().map(|id| Settlement::Published(*id)).collect();
        store.settle(&done, false, &fence).await.unwrap();
    }
    support::quiet().await;
    let before = [
        claim_ms(&store, 53, claims).await,
        claim_ms(&store, 1000, claims).await,
    ];
    sqlx::query("VACUUM outbox_event")
        .execute(&db.pool)
        .await
        .unwrap();
    support::quiet().await;
    [
        before[0],
        before[1],
        claim_ms(&store, 53, claims).await,
        claim_ms(&store, 1000, claims).await,
    ]
}

#[tokio::main]
async fn main() {
    let claims: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    println!(
        "{PENDING} pending events of 10 tenants behind settled rows not yet vacuumed; median of {claims} claims"
    );
    for churn in [0i64, 25_000, 100_000, 400_000] {
        let [b53, b1000, a53, a1000] = case(churn, claims).await;
        println!(
            "{churn:>7} settled, not vacuumed: claim of 53 {b53:6.3} ms, of 1000 {b1000:6.3} ms | after VACUUM: {a53:6.3} ms, {a1000:6.3} ms | x{:.2} / x{:.2}",
            b53 / a53,
            b1000 / a1000
        );
    }
}
