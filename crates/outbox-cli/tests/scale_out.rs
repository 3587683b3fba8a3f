//! Several relays on one outbox, against the real PostgreSQL and NATS: shares move when a relay
//! dies or joins, every event arrives once and in commit order per aggregate, and one tenant's
//! backlog does not starve another tenant.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outbox::{NewEvent, Outbox};
use serde_json::json;
use testkit::{eventually, TestDb, TestStream};

async fn owned_by(db: &TestDb, relay: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox_partition WHERE owner = $1 AND lease_until > now()",
    )
    .bind(relay)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_one_killed_one_joining_deliver_every_event_once_in_order() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let relay =
        |id: &str| RelayProcess::spawn(&db, &stream, &["--relay-id", id, "--batch-size", "100"]);
    let _a = relay("relay-a");
    let mut b = relay("relay-b");
    let _c = relay("relay-c");
    assert!(
        eventually(Duration::from_secs(15), || async {
            owned_by(&db, "relay-a").await > 0
                && owned_by(&db, "relay-b").await > 0
                && owned_by(&db, "relay-c").await > 0
        })
        .await,
        "the three relays share the partitions"
    );

    let outbox = Outbox::new("Test");
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..6i64 {
        let pool = db.pool.clone();
        let ob = outbox.clone();
        producers.push(tokio::spawn(async move {
            let mut i = 0i64;
            while started.elapsed() < Duration::from_secs(8) {
                let events: Vec<NewEvent> = (0..1 + (i % 3))
                    .map(|k| {
                        let agg = (p * 31 + i * 7 + k * 13) % 300;
                        NewEvent::new(
                            format!("t{}", agg % 4),
                            "V",
                            format!("a{agg}"),
                            "E",
                            "x.y",
                            json!({ "p": p, "i": i }),
                        )
                    })
                    .collect();
                let mut tx = pool.begin().await.unwrap();
                ob.enqueue(&mut tx, &events).await.unwrap();
                tx.commit().await.unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.sigkill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _d = relay("relay-d");
    for p in producers {
        p.await.unwrap();
    }
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event_all")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == written
        })
        .await,
        "every event published after the kill and the join"
    );
    assert!(
        owned_by(&db, "relay-d").await > 0,
        "the relay that joined late got a share"
    );
    assert_eq!(
        owned_by(&db, "relay-b").await,
        0,
        "the killed relay's share was taken over"
    );
    let msgs = seen(&stream).await;
    assert_eq!(
        assert_once_and_in_order(&msgs) as i64,
        written,
        "every event once, in order per aggregate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_backlog_does_not_starve_a_quiet_tenant() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    // A big backlog for tenant t0..t2 (the helper spreads over three tenants), then a trickle.
    insert_backlog(&db, 60_000, 1000).await;
    let mut cfg = test_config();
    cfg.batch_size = 500;
    let relay = start_relay(&db, stream.nats_config(), cfg).await;
    let outbox = Outbox::new("Test");
    let mut latencies = Vec::new();
    for i in 0..10 {
        let mut tx = db.pool.begin().await.unwrap();
        let id = outbox
            .enqueue(
                &mut tx,
                &[NewEvent::new(
                    "quiet",
                    "V",
                    "q",
                    "E",
                    "x.y",
                    json!({ "i": i }),
                )],
            )
            .await
            .unwrap()[0];
        tx.commit().await.unwrap();
        let t = Instant::now();
        let delivered = eventually(Duration::from_secs(20), || async {
            sqlx::query_scalar::<_, String>(
                "SELECT status FROM outbox_event_all WHERE event_id = $1",
            )
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .unwrap()
                == "published"
        })
        .await;
        assert!(delivered);
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let still_pending = count(&db, "pending").await;
    relay.shutdown().await;
    assert!(
        still_pending > 0,
        "the big backlog was still draining while the quiet tenant was served"
    );
    let worst = latencies.iter().max().unwrap();
    assert!(
        *worst < Duration::from_secs(3),
        "quiet tenant's worst delivery latency {worst:?} (latencies {latencies:?})"
    );
}
