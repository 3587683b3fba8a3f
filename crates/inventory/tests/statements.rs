//! How many round trips to PostgreSQL each command takes (most of them while its variant rows are
//! locked): the statements counted from sqlx's own per-statement log events (`COMMIT`
//! included), plus the `BEGIN` that sqlx sends without one; and that an answer built from what
//! was written equals what reading it back gives.
//!
//! Its own test binary: the statement counter is process-wide, so no other test may run beside it.
//! `SHOW_SQL=1` prints each statement counted.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::App;
use serde_json::{json, Value};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;
use uuid::Uuid;

static STATEMENTS: AtomicU64 = AtomicU64::new(0);

struct CountStatements;

impl<S: tracing::Subscriber> Layer<S> for CountStatements {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        struct Summary(String);
        impl tracing::field::Visit for Summary {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "summary" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut summary = Summary(String::new());
        event.record(&mut summary);
        // The relays' wake-up runs on its own connection after a commit, outside the command's
        // transaction (wake::CommitNotifier), whenever its task gets to it: not the command's.
        if summary.0.contains("pg_notify") {
            return;
        }
        STATEMENTS.fetch_add(1, Ordering::Relaxed);
        if std::env::var("SHOW_SQL").is_ok() {
            eprintln!("SQL {}", summary.0);
        }
    }
}

/// Runs `f`, one command in one transaction, and returns what it returned with the round trips
/// it took: the statements logged meanwhile plus the unlogged `BEGIN`.
async fn counted<T>(f: impl std::future::Future<Output = T>) -> (T, u64) {
    let before = STATEMENTS.load(Ordering::SeqCst);
    let out = f.await;
    (out, STATEMENTS.load(Ordering::SeqCst) - before + 1)
}

#[tokio::test]
async fn each_command_takes_the_fewest_round_trips_its_locks_allow() {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("sqlx::query", tracing::Level::TRACE);
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry().with(CountStatements.with_filter(filter)),
    )
    .unwrap();
    let app = App::new().await;
    let t = app.token("acme");
    let v1 = app.variant(&t, 5, 0).await;
    let v2 = app.variant(&t, 5, 0).await;
    let mut table: Vec<(&str, u64, u64)> = Vec::new();

    // (command, round trips, most allowed: BEGIN + one per lock order + one write + COMMIT).
    let ((s, _), n) = counted(app.post(
        &t,
        &format!("/variants/{v1}/adjustments"),
        json!({"changeType": "PURCHASE", "quantity": 100}),
    ))
    .await;
    assert_eq!(s, 200);
    table.push(("POST /variants/{id}/adjustments", n, 4));

    let ((s, receipt), n) = counted(app.post(
        &t,
        "/receipts",
        json!({"reference": "PO-1", "lines": [
            {"warehouseId": Uuid::now_v7(), "productVariantId": v1, "quantity": 10},
            {"warehouseId": Uuid::now_v7(), "productVariantId": v2, "quantity": 20}]}),
    ))
    .await;
    assert_eq!(s, 201, "{receipt}");
    table.push(("POST /receipts (2 lines)", n, 4));
    let rid = receipt["id"].as_str().unwrap().to_string();
    assert_eq!(app.get(&t, &format!("/receipts/{rid}")).await.1, receipt);

    let ((s, validated), n) =
        counted(app.post_empty(&t, &format!("/receipts/{rid}/validate"))).await;
    assert_eq!(s, 200, "{validated}");
    table.push(("POST /receipts/{id}/validate (2 lines)", n, 5));
    assert_eq!(app.get(&t, &format!("/receipts/{rid}")).await.1, validated);

    let reservation = |lines: Value| json!({"orderId": Uuid::now_v7(), "lines": lines});
    let mut answers = Vec::new();
    for (what, lines, close) in [
        (
            "POST /reservations (1 line)",
            json!([{"productVariantId": v1, "quantity": 3}]),
            "cancel",
        ),
        (
            "POST /reservations (2 lines)",
            json!([{"productVariantId": v2, "quantity": 4}, {"productVariantId": v1, "quantity": 1}]),
            "ship",
        ),
    ] {
        let ((s, r), n) = counted(app.post(&t, "/reservations", reservation(lines))).await;
        assert_eq!(s, 201, "{r}");
        table.push((what, n, 4));
        let id = r["id"].as_str().unwrap().to_string();
        assert_eq!(app.get(&t, &format!("/reservations/{id}")).await.1, r);
        let ((s, closed), n) =
            counted(app.post_empty(&t, &format!("/reservations/{id}/{close}"))).await;
        assert_eq!(s, 200, "{closed}");
        table.push((
            if close == "cancel" {
                "POST /reservations/{id}/cancel"
            } else {
                "POST /reservations/{id}/ship"
            },
            n,
            5,
        ));
        assert_eq!(app.get(&t, &format!("/reservations/{id}")).await.1, closed);
        answers.push(closed);
    }

    let ((s, _), n) = counted(app.post(
        &t,
        "/reservations",
        reservation(json!([{"productVariantId": v1, "quantity": 1_000_000}])),
    ))
    .await;
    assert_eq!(s, 409);
    table.push(("POST /reservations (refused: 409)", n, 4));

    println!("{:<42} {:>11} {:>8}", "command", "round trips", "at most");
    for (what, n, max) in &table {
        println!("{what:<42} {n:>11} {max:>8}");
    }
    for (what, n, max) in &table {
        assert!(n <= max, "{what} took {n} round trips, more than {max}");
    }

    // The events are all there, in order: the one statement wrote them with the rows.
    let events = app.events().await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert!(
        types.contains(&"InventoryReservedEvent")
            && types.contains(&"InventoryReleasedEvent")
            && types.contains(&"InventoryReservationFailedEvent"),
        "{types:?}"
    );
    assert_eq!(answers[0]["status"], "RELEASED");
    assert_eq!(answers[1]["status"], "SHIPPED");
}
