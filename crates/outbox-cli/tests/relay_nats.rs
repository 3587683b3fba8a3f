//! The outbox invariants against the real PostgreSQL and NATS JetStream on this machine.
//! Each test has its own database and its own stream.

mod common;

use std::time::Duration;

use common::*;
use outbox::{NewEvent, Outbox};
use serde_json::json;
use testkit::proxy::Proxy;
use testkit::{eventually, TestDb, TestStream};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn event(tenant: &str, agg: &str, n: i64) -> NewEvent {
    stock_event(tenant, agg, json!({ "n": n }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_committed_transactions_yield_events_and_exactly_theirs() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let outbox = Outbox::new("Test");

    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &[event("acme", "a", 1), event("acme", "b", 1)])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // A bad event anywhere in the call means nothing of the call is written.
    let mut tx = db.pool.begin().await.unwrap();
    let mut bad = event("acme", "a", 2);
    bad.tenant_id = "not a token".into();
    assert!(outbox
        .enqueue(&mut tx, &[event("acme", "a", 2), bad])
        .await
        .is_err());
    tx.commit().await.unwrap();
    assert_eq!(
        count(&db, "pending").await,
        0,
        "rolled back or rejected events must leave no row"
    );

    let mut tx = db.pool.begin().await.unwrap();
    let ids = outbox
        .enqueue(
            &mut tx,
            &[
                event("acme", "a", 3),
                event("acme", "b", 3).traceparent(TRACEPARENT),
                event("globex", "a", 3),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == 3
        })
        .await
    );
    relay.shutdown().await;

    let msgs = seen(&stream).await;
    let mut got: Vec<String> = msgs.iter().map(|m| m.event_id.clone()).collect();
    let mut want: Vec<String> = ids.iter().map(|u| u.to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "the stream holds exactly the committed events");
    // The caller's W3C trace context travels as a header, only on the event that had one.
    let traced: Vec<_> = msgs
        .iter()
        .filter(|m| m.headers.contains_key("traceparent"))
        .collect();
    assert_eq!(traced.len(), 1);
    assert_eq!(traced[0].headers["traceparent"], TRACEPARENT);
    assert_eq!(traced[0].event_id, ids[1].to_string());
    // The bytes consumers receive are the bytes the transaction wrote.
    for m in &msgs {
        let stored: Vec<u8> =
            sqlx::query_scalar("SELECT payload FROM outbox_event_all WHERE event_id = $1::uuid")
                .bind(&m.event_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(stored, m.payload);
        let env: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(env["eventId"].as_str().unwrap(), m.event_id);
        assert_eq!(env["sourceService"], "Test");
        assert!(m.subject.starts_with(&format!(
            "{}.{}.",
            stream.prefix,
            env["tenantId"].as_str().unwrap()
        )));
        assert_eq!(
            m.headers.get("Outbox-Correlation-Id").map(String::as_str),
            env["correlationId"].as_str()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_holds_the_backlog_and_delivers_it_afterwards() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let proxy = Proxy::start("127.0.0.1:4222").await;
    let mut nats = stream.nats_config();
    nats.url = format!("nats://{}", proxy.addr);
    nats.ack_timeout = Duration::from_secs(1);
    let relay = start_relay(&db, nats, test_config()).await;

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outbox = Outbox::new("Test");
    for i in 0..50 {
        let mut tx = db.pool.begin().await.unwrap();
        outbox
            .enqueue(
                &mut tx,
                &[
                    event("acme", &format!("v{}", i % 7), i),
                    event("globex", "v0", i),
                ],
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(&db, "published").await,
        0,
        "nothing may be marked published while the broker is away"
    );
    assert_eq!(
        count(&db, "dead").await,
        0,
        "an outage must not spend events' retry budgets"
    );
    assert_eq!(count(&db, "pending").await, 100);
    assert!(seen(&stream).await.is_empty());

    proxy.restore();
    assert!(
        eventually(Duration::from_secs(60), || async {
            count(&db, "published").await == 100
        })
        .await,
        "backlog delivered after the broker returned"
    );
    relay.shutdown().await;
    let msgs = seen(&stream).await;
    assert_eq!(assert_once_and_in_order(&msgs), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_backlog_then_restarted_delivers_every_event_once() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let total = 20_000;
    insert_backlog(&db, total, 200).await;

    let mut first = RelayProcess::spawn(&db, &stream, &["--batch-size", "200"]);
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await >= 2_000
        })
        .await,
        "relay made progress"
    );
    first.sigkill();
    let done = count(&db, "published").await;
    assert!(
        done < total,
        "killed mid-backlog ({done} of {total} published)"
    );

    let mut second = RelayProcess::spawn(&db, &stream, &["--batch-size", "500"]);
    assert!(
        eventually(Duration::from_secs(60), || async {
            count(&db, "published").await == total
        })
        .await,
        "restarted relay finished the backlog"
    );
    assert!(second.sigterm_and_wait().success(), "SIGTERM exits 0");
    let owners: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_partition WHERE owner IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        owners, 0,
        "a relay stopped by SIGTERM gives its partitions back"
    );
    let msgs = seen(&stream).await;
    assert_eq!(
        assert_once_and_in_order(&msgs),
        total as usize,
        "every event exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relay_processes_share_one_table_without_duplicates() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let total = 20_000;
    insert_backlog(&db, total, 500).await;
    let _a = RelayProcess::spawn(&db, &stream, &["--batch-size", "200"]);
    let _b = RelayProcess::spawn(&db, &stream, &["--batch-size", "200"]);
    let both_held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = eventually(Duration::from_secs(60), || {
        let pool = db.pool.clone();
        let held = both_held.clone();
        async move {
            let owners: i64 =
                sqlx::query_scalar("SELECT count(DISTINCT owner) FROM outbox_partition")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if owners == 2 {
                held.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_published")
                .fetch_one(&pool)
                .await
                .unwrap();
            n == total
        }
    })
    .await;
    assert!(finished, "both relays together delivered the backlog");
    assert!(
        both_held.load(std::sync::atomic::Ordering::Relaxed),
        "the partitions were shared between the two relays"
    );
    let msgs = seen(&stream).await;
    assert_eq!(
        assert_once_and_in_order(&msgs),
        total as usize,
        "none missing, none twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_is_dead_lettered_others_flow_and_its_aggregate_waits() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let outbox = Outbox::new("Test");
    let huge = "x".repeat(1_100_000); // over NATS's default 1 MiB max_payload
    let mut tx = db.pool.begin().await.unwrap();
    let poison = NewEvent::new(
        "acme",
        "ProductVariant",
        "bad",
        "Huge",
        "inventory.stock.changed",
        json!({ "blob": huge }),
    );
    outbox
        .enqueue(
            &mut tx,
            &[
                poison,
                event("acme", "bad", 2),
                event("acme", "good", 1),
                event("acme", "good", 2),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            count(&db, "dead").await == 1
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            count(&db, "published").await == 2
        })
        .await
    );
    // Later events of the poisoned aggregate keep waiting; the others flowed.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (err, agg): (String, String) =
        sqlx::query_as("SELECT last_error, aggregate_id FROM outbox_event WHERE status = 'dead'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(agg, "bad");
    assert!(
        err.contains("payload"),
        "the dead letter keeps its error: {err}"
    );
    // Held behind it (out of the claim's index: migration `..._table_contract.sql`).
    let waiting: String =
        sqlx::query_scalar("SELECT aggregate_id FROM outbox_event WHERE status = 'held'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(waiting, "bad");

    // Removing the dead letter releases the aggregate.
    sqlx::query("DELETE FROM outbox_event WHERE status = 'dead'")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == 3
        })
        .await
    );
    relay.shutdown().await;
    let msgs = seen(&stream).await;
    assert_eq!(msgs.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_configured_not_to_block() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    let poison = NewEvent::new(
        "acme",
        "ProductVariant",
        "bad",
        "Huge",
        "x.y",
        json!({ "blob": "x".repeat(1_100_000) }),
    );
    outbox
        .enqueue(&mut tx, &[poison, event("acme", "bad", 2)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut cfg = test_config();
    cfg.dead_letters_block = false;
    let relay = start_relay(&db, stream.nats_config(), cfg).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            count(&db, "dead").await == 1 && count(&db, "published").await == 1
        })
        .await
    );
    relay.shutdown().await;
}

/// The classic trap: ids drawn from a sequence before the writer waits for a lock are not in
/// commit order. Here C2 draws its id while C1 holds the aggregate, C1 then writes again and
/// commits first; the stream must follow commit order (C1, C1, C2), not id-drawing order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_waited_for_the_aggregate_is_delivered_after_the_one_it_waited_for() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let outbox = Outbox::new("Test");

    let mut c1 = db.pool.begin().await.unwrap();
    let first = outbox
        .enqueue(&mut c1, &[event("acme", "x", 1)])
        .await
        .unwrap();
    let pool = db.pool.clone();
    let ob = outbox.clone();
    let c2 = tokio::spawn(async move {
        let mut c2 = pool.begin().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *c2)
            .await
            .unwrap();
        let _ = PID.set(pid);
        let id = ob.enqueue(&mut c2, &[event("acme", "x", 3)]).await.unwrap();
        c2.commit().await.unwrap();
        id
    });
    // Wait until C2 is really blocked on C1's aggregate lock.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let Some(pid) = PID.get() else { return false };
            let w: Option<String> =
                sqlx::query_scalar("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_optional(&db.pool)
                    .await
                    .unwrap()
                    .flatten();
            w.as_deref() == Some("Lock")
        })
        .await
    );
    let second = outbox
        .enqueue(&mut c1, &[event("acme", "x", 2)])
        .await
        .unwrap();
    c1.commit().await.unwrap();
    let third = c2.await.unwrap();

    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == 3
        })
        .await
    );
    relay.shutdown().await;
    let order: Vec<String> = seen(&stream)
        .await
        .into_iter()
        .map(|m| m.event_id)
        .collect();
    let want: Vec<String> = [first[0], second[0], third[0]]
        .iter()
        .map(|u| u.to_string())
        .collect();
    assert_eq!(order, want, "stream order is commit order");
}

static PID: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_producers_on_interleaved_aggregates_arrive_in_commit_order() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    let outbox = Outbox::new("Test");
    let mut tasks = Vec::new();
    for p in 0..8 {
        let pool = db.pool.clone();
        let ob = outbox.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..60i64 {
                let mut tx = pool.begin().await.unwrap();
                // Each transaction touches two or three of 12 aggregates, in varying order.
                let aggs: Vec<NewEvent> = (0..(2 + (i % 2)))
                    .map(|k| {
                        event(
                            if k == 0 { "acme" } else { "globex" },
                            &format!("v{}", (p * 7 + i * 5 + k * 3) % 12),
                            i,
                        )
                    })
                    .collect();
                ob.enqueue(&mut tx, &aggs).await.unwrap();
                if i % 10 == 9 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // One statement: rows move from pending to published while the relay runs.
    let expected: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event_all")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let done = eventually(Duration::from_secs(60), || async {
        count(&db, "published").await == expected
    })
    .await;
    if !done {
        let stuck: Vec<(String, String, i64, String, i32, Option<String>)> = sqlx::query_as(
            "SELECT tenant_id, aggregate_id, seq, status, attempts, last_error FROM outbox_event
             ORDER BY id LIMIT 20",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        panic!("not all published; first unpublished rows: {stuck:#?}");
    }
    relay.shutdown().await;
    let msgs = seen(&stream).await;
    assert_eq!(assert_once_and_in_order(&msgs) as i64, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_stream_whose_duplicate_window_is_shorter_than_the_retry_horizon() {
    let stream = TestStream::new();
    let mut cfg = stream.nats_config();
    cfg.duplicate_window = Duration::from_secs(5);
    let err = match outbox::nats::NatsPublisher::connect(cfg, Duration::from_secs(60)).await {
        Ok(_) => panic!("a 5 s window must be refused for a 60 s horizon"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("duplicate window") || err.contains("drops duplicates"),
        "{err}"
    );
}

/// The relay's database connections cut (as by a restart or a network cut) while producers keep
/// committing directly: the relay reconnects by itself and delivers everything once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_survives_losing_its_database_connections() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let relay_url = db.url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    let relay_db_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&relay_url)
        .unwrap();
    let relay = start_relay_on(relay_db_pool, stream.nats_config(), test_config()).await;
    let outbox = Outbox::new("Test");
    let write = |from: i64| {
        let pool = db.pool.clone();
        let ob = outbox.clone();
        async move {
            for i in from..from + 40 {
                let mut tx = pool.begin().await.unwrap();
                ob.enqueue(&mut tx, &[event("acme", &format!("v{}", i % 5), i)])
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        }
    };
    write(0).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            count(&db, "published").await == 40
        })
        .await
    );
    proxy.cut();
    write(40).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&db, "published").await,
        40,
        "no progress is recorded without the database"
    );
    proxy.restore();
    write(80).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            count(&db, "published").await == 120
        })
        .await,
        "the relay reconnected to the database and caught up"
    );
    relay.shutdown().await;
    assert_eq!(assert_once_and_in_order(&seen(&stream).await), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_zero_deletes_rows_once_acknowledged_and_keeps_failures() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    let poison = NewEvent::new(
        "acme",
        "ProductVariant",
        "bad",
        "Huge",
        "x.y",
        json!({ "blob": "x".repeat(1_100_000) }),
    );
    let ids = outbox
        .enqueue(
            &mut tx,
            &[event("acme", "a", 1), event("acme", "b", 1), poison],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut cfg = test_config();
    cfg.retention = Some(Duration::ZERO);
    let relay = start_relay(&db, stream.nats_config(), cfg).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            left == 1 && count(&db, "dead").await == 1
        })
        .await,
        "acknowledged rows deleted, the dead letter kept"
    );
    relay.shutdown().await;
    let got: Vec<String> = seen(&stream)
        .await
        .into_iter()
        .map(|m| m.event_id)
        .collect();
    assert_eq!(got, vec![ids[0].to_string(), ids[1].to_string()]);
}

/// A subject no stream captures cannot be fixed by retrying: dead-lettered at once, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_stream_captures_is_dead_lettered_at_once() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let mut nats = stream.nats_config();
    nats.subject_template = format!("nowhere_{}.{{tenant}}.{{topic}}", stream.prefix);
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut tx, &[event("acme", "a", 1)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = start_relay(&db, nats, test_config()).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "dead").await == 1
        })
        .await
    );
    relay.shutdown().await;
    let (attempts, err): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM outbox_event_all")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1, "no retries for a permanent failure");
    assert!(err.contains("no stream"), "{err}");
}
