//! Operator commands through the real `outbox` binary against the real PostgreSQL and NATS.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use outbox::{NewEvent, Outbox};
use serde_json::{json, Value};
use testkit::{eventually, TestDb, TestStream};

fn outbox_cmd(db: &TestDb, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run outbox");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json_of(db: &TestDb, args: &[&str]) -> Value {
    let (ok, out, err) = outbox_cmd(db, args);
    assert!(ok, "outbox {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn ev(agg: &str, n: i64) -> NewEvent {
    NewEvent::new(
        "acme",
        "V",
        agg,
        "StockLevelChangedEvent",
        "inventory.stock.changed",
        json!({ "n": n }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_counts_and_which_relay_holds_which_partitions() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let _a = RelayProcess::spawn(&db, &stream, &["--relay-id", "relay-a"]);
    let _b = RelayProcess::spawn(&db, &stream, &["--relay-id", "relay-b"]);
    let split = eventually(Duration::from_secs(20), || async {
        let s = json_of(&db, &["status", "--json"]);
        let relays = s["relays"].as_array().unwrap().clone();
        let mut all: Vec<i64> = relays
            .iter()
            .flat_map(|r| {
                r["partitions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_i64().unwrap())
            })
            .collect();
        let both = relays.len() == 2
            && relays
                .iter()
                .all(|r| !r["partitions"].as_array().unwrap().is_empty());
        all.sort();
        // Every partition held exactly once, shared by the two relays.
        both && all == (0..64).collect::<Vec<i64>>()
    })
    .await;
    assert!(
        split,
        "status shows the 64 partitions split between relay-a and relay-b"
    );
    insert_backlog(&db, 30, 3).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == 30
        })
        .await
    );
    let s = json_of(&db, &["status", "--json"]);
    assert_eq!(s["counts"]["published"], 30);
    assert_eq!(s["counts"]["pending"], 0);
    let (ok, human, _) = outbox_cmd(&db, &["status"]);
    assert!(
        ok && human.contains("relay-a")
            && human.contains("relay-b")
            && human.contains("30 published"),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_in_order_and_purged_with_an_audit_record() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    let x = outbox
        .enqueue(&mut tx, &[ev("x", 1), ev("x", 2), ev("x", 3), ev("y", 1)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // x's first event is a dead letter (as after a spent retry budget).
    sqlx::query("UPDATE outbox_event SET status = 'dead', dead_at = now(), attempts = 8, last_error = 'gave up: broker said no' WHERE event_id = $1")
        .bind(x[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&db, "published").await,
        1,
        "x's later events wait behind its dead letter"
    );

    let list = json_of(
        &db,
        &[
            "dead-letters",
            "list",
            "--json",
            "--tenant",
            "acme",
            "--aggregate-id",
            "x",
        ],
    );
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        list[0]["eventId"]
            .as_str()
            .or(list[0]["event_id"].as_str())
            .unwrap(),
        x[0].to_string()
    );
    let (ok, shown, _) = outbox_cmd(&db, &["dead-letters", "show", &x[0].to_string()]);
    assert!(
        ok && shown.contains("broker said no") && shown.contains("\"n\":1"),
        "{shown}"
    );
    let (ok, _, err) = outbox_cmd(
        &db,
        &["dead-letters", "show", &uuid::Uuid::now_v7().to_string()],
    );
    assert!(!ok && err.contains("no dead letter"), "{err}");

    let replayed = json_of(
        &db,
        &[
            "dead-letters",
            "replay",
            "--id",
            &x[0].to_string(),
            "--actor",
            "alice",
            "--json",
        ],
    );
    assert_eq!(replayed["replayed"][0], x[0].to_string());
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == 4
        })
        .await
    );
    let order: Vec<String> = seen(&stream)
        .await
        .into_iter()
        .filter(|m| m.aggregate == "acme/x")
        .map(|m| m.event_id)
        .collect();
    assert_eq!(
        order,
        vec![x[0].to_string(), x[1].to_string(), x[2].to_string()],
        "replay restores the original order"
    );

    // A poison event for z, purged: its later event then flows, and the purge is on record.
    let mut tx = db.pool.begin().await.unwrap();
    let poison = NewEvent::new(
        "acme",
        "V",
        "z",
        "Huge",
        "x.y",
        json!({ "blob": "x".repeat(1_100_000) }),
    );
    let z = outbox
        .enqueue(&mut tx, &[poison, ev("z", 2)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "dead").await == 1
        })
        .await
    );
    let (ok, _, err) = outbox_cmd(&db, &["dead-letters", "purge", "--aggregate-id", "z"]);
    assert!(
        !ok && err.contains("--yes"),
        "purge without --yes and without a terminal must refuse: {err}"
    );
    assert_eq!(count(&db, "dead").await, 1);
    let purged = json_of(
        &db,
        &[
            "dead-letters",
            "purge",
            "--aggregate-id",
            "z",
            "--yes",
            "--actor",
            "bob",
            "--json",
        ],
    );
    assert_eq!(purged["purged"][0], z[0].to_string());
    // The purged event's place is published as a skip marker (so that consumers do not wait
    // for its seq for ever), then its later event.
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == 6
        })
        .await
    );
    let marker: (serde_json::Value, i64) = sqlx::query_as(
        "SELECT headers, octet_length(payload)::bigint FROM outbox_published WHERE event_id = $1",
    )
    .bind(z[0])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(marker.0["outboxSkip"], "purged");
    assert!(marker.1 < 1000, "the marker does not carry the purged body");
    relay.shutdown().await;
    let audit = outbox::ops::audit(&db.pool, 10).await.unwrap();
    assert_eq!(audit[0].action, "purge");
    assert_eq!(audit[0].actor, "bob");
    assert_eq!(audit[0].event_ids, vec![z[0]]);
    assert_eq!(audit[1].action, "replay");
    assert_eq!(audit[1].actor, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_only_old_published_events() {
    let db = TestDb::new().await;
    insert_backlog(&db, 120, 12).await; // 12 aggregates of 10 events
                                        // Per aggregate: seq 1-3 published two days ago, 4-6 published now, 7-8 dead two days ago,
                                        // the rest pending.
    let bucket = |cond: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM outbox_event WHERE {cond}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let (n_old, n_new) = (
        bucket("seq <= 3").await,
        bucket("seq > 3 AND seq <= 6").await,
    );
    let (n_dead, n_pending) = (
        bucket("seq > 6 AND seq <= 8").await,
        bucket("seq > 8").await,
    );
    assert!(n_old > 0 && n_new > 0 && n_dead > 0 && n_pending > 0);
    testkit::mark_published(&db.pool, "seq <= 3", "now() - interval '48 hours'").await;
    testkit::mark_published(&db.pool, "seq <= 6", "now()").await;
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', dead_at = now() - interval '48 hours'
         WHERE seq > 6 AND seq <= 8",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let states = || async {
        let mut v: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM outbox_event GROUP BY 1")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        v.push(("published".into(), count(&db, "published").await));
        v.sort();
        v
    };
    let before = states().await;
    assert_eq!(
        before,
        vec![
            ("dead".to_string(), n_dead),
            ("pending".to_string(), n_pending),
            ("published".to_string(), n_old + n_new)
        ]
    );
    let old: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_published WHERE published_at < now() - interval '24 hours'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(old, n_old);
    let dry = json_of(
        &db,
        &["cleanup", "--dry-run", "--retention-hours", "24", "--json"],
    );
    assert_eq!(dry["rows"], old);
    assert_eq!(before, states().await, "a dry run deletes nothing");
    let done = json_of(
        &db,
        &[
            "cleanup",
            "--retention-hours",
            "24",
            "--batch",
            "3",
            "--json",
        ],
    );
    assert_eq!(done["rows"], old);
    let left_old: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_published WHERE published_at < now() - interval '24 hours'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(left_old, 0);
    assert_eq!(
        count(&db, "published").await,
        n_new,
        "recent published rows are kept"
    );
    for (status, n) in &before {
        if status != "published" {
            assert_eq!(
                count(&db, status).await,
                *n,
                "{status} rows are never removed by retention"
            );
        }
    }
    let (ok, _, err) = outbox_cmd(&db, &["cleanup", "--retention-hours=-1"]);
    assert!(!ok && err.contains("retention"), "{err}");
}
