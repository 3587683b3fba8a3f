//! End to end: the service's events through a relay to the real NATS JetStream, and the binary
//! itself (starts with the broker down, serves, stops on SIGTERM).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::*;
use outbox::RelayConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use testkit::{eventually, TestStream};
use uuid::Uuid;

async fn start_relay(app: &App, stream: &TestStream) -> testkit::relay::InProcessRelay {
    let config = RelayConfig {
        relay_id: testkit::unique("relay"),
        poll_interval: Duration::from_millis(100),
        lease: Duration::from_millis(1500),
        ..Default::default()
    };
    testkit::relay::start_relay_on(app.db.pool.clone(), stream.nats_config(), config).await
}

async fn random_op(
    app: &App,
    rng: &mut StdRng,
    tokens: &[(String, String)],
    variants: &[(usize, Uuid)],
    active: &mut Vec<(usize, String)>,
) {
    let (ti, v) = variants[rng.random_range(0..variants.len())];
    let t = &tokens[ti].1;
    match rng.random_range(0..10) {
        0..=2 => {
            let (ct, q) = match rng.random_range(0..4) {
                0 => ("PURCHASE", rng.random_range(1..20)),
                1 => ("RETURN", rng.random_range(1..5)),
                2 => ("SALE", -rng.random_range(1..8)),
                _ => ("ADJUSTMENT", rng.random_range(-5..6i64).max(1)),
            };
            let (s, b) = app
                .post(
                    t,
                    &format!("/variants/{v}/adjustments"),
                    json!({"changeType": ct, "quantity": q}),
                )
                .await;
            assert!(s == StatusCode::OK || s == StatusCode::CONFLICT, "{s} {b}");
        }
        3 => {
            let (_, v2) = variants
                .iter()
                .copied()
                .filter(|(i, _)| *i == ti)
                .nth(rng.random_range(0..3))
                .unwrap();
            let wh = Uuid::now_v7();
            let (s, r) = app
                .post(t, "/receipts", json!({"lines": [
                    {"warehouseId": wh, "productVariantId": v, "quantity": rng.random_range(1..30)},
                    {"warehouseId": wh, "productVariantId": v2, "quantity": rng.random_range(1..30)}]}))
                .await;
            assert_eq!(s, StatusCode::CREATED, "{r}");
            let (s, r) = app
                .post_empty(
                    t,
                    &format!("/receipts/{}/validate", r["id"].as_str().unwrap()),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{r}");
        }
        4..=6 => {
            let mut lines =
                vec![json!({"productVariantId": v, "quantity": rng.random_range(1..6)})];
            let (_, v2) = variants
                .iter()
                .copied()
                .filter(|(i, _)| *i == ti)
                .nth(rng.random_range(0..3))
                .unwrap();
            if v2 != v {
                lines.push(json!({"productVariantId": v2, "quantity": rng.random_range(1..4)}));
            }
            let (s, r) = app
                .post(
                    t,
                    "/reservations",
                    json!({"orderId": Uuid::now_v7(), "lines": lines, "ttlSeconds": 600}),
                )
                .await;
            match s {
                StatusCode::CREATED => active.push((ti, r["id"].as_str().unwrap().to_string())),
                StatusCode::CONFLICT => {}
                other => panic!("{other} {r}"),
            }
        }
        7 | 8 if !active.is_empty() => {
            let (ti, rid) = active.swap_remove(rng.random_range(0..active.len()));
            let what = if rng.random_bool(0.5) {
                "cancel"
            } else {
                "ship"
            };
            let (s, r) = app
                .post_empty(&tokens[ti].1, &format!("/reservations/{rid}/{what}"))
                .await;
            assert_eq!(s, StatusCode::OK, "{r}");
        }
        _ => {
            let (s, _, _) = app
                .call(
                    Method::PUT,
                    &format!("/variants/{v}"),
                    Some(t),
                    Some(json!({"lowStockThreshold": rng.random_range(0..15)})),
                    &[],
                )
                .await;
            assert_eq!(s, StatusCode::OK);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_level_chain_is_unbroken_in_the_stream_after_a_random_mix() {
    let app = Arc::new(App::new().await);
    let stream = TestStream::new();
    let relay = start_relay(&app, &stream).await;
    let tokens: Vec<(String, String)> = ["acme", "globex"]
        .iter()
        .map(|t| (t.to_string(), app.token(t)))
        .collect();
    let mut variants = Vec::new();
    for (i, (_, t)) in tokens.iter().enumerate() {
        for _ in 0..3 {
            variants.push((i, app.variant(t, 5, 0).await));
        }
    }
    let variants = Arc::new(variants);
    let tokens = Arc::new(tokens);
    // Four concurrent workers, 75 operations each, each with its own seeded generator.
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (app, tokens, variants) = (app.clone(), tokens.clone(), variants.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(0x1a7e + w);
            let mut active = Vec::new();
            for _ in 0..75 {
                random_op(&app, &mut rng, &tokens, &variants, &mut active).await;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'pending'")
                    .fetch_one(&app.db.pool)
                    .await
                    .unwrap();
            pending == 0
        })
        .await,
        "the relay publishes everything"
    );
    relay.shutdown().await;

    let msgs = stream.messages().await;
    let mut ids = std::collections::HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut changes = 0;
    for m in &msgs {
        let env: Value = serde_json::from_slice(&m.payload).unwrap();
        assert!(
            ids.insert(env["eventId"].as_str().unwrap().to_string()),
            "an event twice in the stream"
        );
        let tenant = env["tenantId"].as_str().unwrap();
        let event_type = env["eventType"].as_str().unwrap();
        assert_eq!(
            m.subject.as_str(),
            format!("{}.{tenant}.{}", stream.prefix, seed_topic(event_type)),
            "the subject carries the tenant and the routing key"
        );
        if event_type != "StockLevelChangedEvent" {
            continue;
        }
        changes += 1;
        let d = &env["data"];
        let key = format!("{tenant}/{}", d["productVariantId"].as_str().unwrap());
        let prev = last.get(&key).copied().unwrap_or(0);
        assert_eq!(
            d["oldQuantity"].as_i64().unwrap(),
            prev,
            "chain broken for {key}: {d}"
        );
        let new = d["newQuantity"].as_i64().unwrap();
        assert_eq!(new - prev, d["quantityChanged"].as_i64().unwrap());
        last.insert(key, new);
    }
    assert!(changes > 50, "the mix moved stock ({changes} changes)");
    // Exactly one StockLevelChangedEvent per quantity movement of the ledger: none lost.
    let moves: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM inv_ledger WHERE quantity_before <> quantity_after",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(changes, moves);
    // The chain ends at each variant's quantity.
    for (i, v) in variants.iter() {
        let (tenant, t) = &tokens[*i];
        let (_, var) = app.get(t, &format!("/variants/{v}")).await;
        assert_eq!(
            last.get(&format!("{tenant}/{v}")).copied().unwrap_or(0),
            var["quantity"].as_i64().unwrap()
        );
        assert!(var["available"].as_i64().unwrap() >= 0);
    }
}

use testkit::relay::free_port;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_with_the_broker_down_and_stops_on_sigterm() {
    let app = App::new().await;
    let (port, dead_nats) = (free_port(), free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_inventory"))
        .args([
            "serve",
            "--metrics-addr",
            "",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DATABASE_URL", &app.db.url)
        .env("INVENTORY_JWT_SECRET", std::str::from_utf8(SECRET).unwrap())
        .env("NATS_URL", format!("nats://127.0.0.1:{dead_nats}"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start inventory");
    let base = format!("127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&base).await.is_ok()
    })
    .await;
    assert!(up, "the service listens although NATS is down");
    // A raw HTTP/1.1 request: the service answers and the event waits in the outbox.
    let token = app.token("acme");
    let id = Uuid::now_v7();
    let body = r#"{"lowStockThreshold":3}"#;
    let req = format!(
        "PUT /variants/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let resp = raw_http(&base, &req).await;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    let body = r#"{"changeType":"PURCHASE","quantity":4}"#;
    let req = format!(
        "POST /variants/{id}/adjustments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let resp = raw_http(&base, &req).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = 'pending'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        pending, 2,
        "events wait in the outbox while the broker is down"
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the service did not stop on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

async fn raw_http(addr: &str, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
