//! The `read-model` binary against the real NATS and PostgreSQL: it applies the inventory's events,
//! serves them (to the tenant's bearer token only) and its consumer metrics over HTTP, and on
//! SIGTERM finishes and exits 0.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use testkit::{TestDb, TestStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tenant-auth/tests/keys/");

async fn get(addr: &str, path: &str) -> Option<String> {
    get_as(addr, path, None).await
}

async fn get_as(addr: &str, path: &str, token: Option<&str>) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn publish(js: &jetstream::Context, s: &TestStream, variant: Uuid, seq: i64, body: String) {
    let id = Uuid::now_v7();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", id.to_string().as_str());
    h.insert("Outbox-Event-Id", id.to_string().as_str());
    h.insert("Outbox-Tenant-Id", "acme");
    h.insert("Outbox-Aggregate-Type", "ProductVariant");
    h.insert("Outbox-Aggregate-Id", variant.to_string().as_str());
    h.insert("Outbox-Seq", seq.to_string().as_str());
    h.insert("Outbox-Seq-Epoch", "0");
    let body = body.replace("EVENT_ID", &id.to_string());
    js.publish_with_headers(format!("{}.acme.inventory", s.prefix), h, body.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test]
async fn applies_serves_and_stops_cleanly_on_sigterm() {
    let t0 = Instant::now();
    let db = TestDb::empty().await;
    let s = TestStream::new();
    let js = jetstream::new(
        async_nats::connect(testkit::nats_url())
            .await
            .expect("NATS"),
    );
    js.create_stream(jetstream::stream::Config {
        name: s.name.clone(),
        subjects: vec![format!("{}.>", s.prefix)],
        ..Default::default()
    })
    .await
    .expect("stream");
    let v = Uuid::now_v7();
    let env = |t: &str, data: &str| {
        format!(r#"{{"eventId":"EVENT_ID","eventType":"{t}","tenantId":"acme","data":{data}}}"#)
    };
    // Seq 2 first: the service must hold it until seq 1 is applied.
    publish(
        &js,
        &s,
        v,
        2,
        env(
            "StockStatusChangedEvent",
            r#"{"newStatus":"LOW_STOCK","oldStatus":"OUT_OF_STOCK","currentQuantity":3}"#,
        ),
    )
    .await;
    publish(
        &js,
        &s,
        v,
        1,
        env(
            "StockLevelChangedEvent",
            r#"{"newQuantity":3,"oldQuantity":0,"quantityChanged":3,"changeType":"PURCHASE"}"#,
        ),
    )
    .await;
    publish(
        &js,
        &s,
        v,
        3,
        env(
            "InventoryReservedEvent",
            r#"{"quantityReserved":2,"availableQuantityAfterReservation":1}"#,
        ),
    )
    .await;
    let addr = format!("127.0.0.1:{}", testkit::relay::free_port());
    // The inventory's tokens, verified with the public half of its EdDSA key.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &serde_json::json!({"tenant": "acme", "sub": "u", "iat": now, "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_ed_pem(
            &std::fs::read(format!("{KEYS}ed25519-private.pem")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_read-model"))
        .env("READ_MODEL_DATABASE_URL", &db.url)
        .env(
            "READ_MODEL_JWT_PUBLIC_KEY_FILE",
            format!("{KEYS}ed25519-public.pem"),
        )
        .env("READ_MODEL_LISTEN", &addr)
        .env("OUTBOX_NATS_STREAM", &s.name)
        .env("NATS_URL", testkit::nats_url())
        .env("OUTBOX_CONSUMER_NAME", testkit::unique("rm"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("read-model starts");
    let path = format!("/tenants/acme/variants/{v}");
    let ok = testkit::eventually(Duration::from_secs(20), || async {
        get_as(&addr, &path, Some(&token)).await.is_some_and(|b| {
            b.contains(r#""quantity":3"#)
                && b.contains(r#""reserved":2"#)
                && b.contains(r#""status":"LOW_STOCK""#)
                && b.contains(r#""eventsApplied":3"#)
        })
    })
    .await;
    let body = get_as(&addr, &path, Some(&token)).await;
    let anonymous = get(&addr, &path).await.unwrap_or_default();
    let metrics = get(&addr, "/metrics").await.unwrap_or_default();
    let health = get(&addr, "/healthz").await.unwrap_or_default();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .expect("waits");
    assert!(
        ok,
        "the read model shows the three events in order: {body:?}"
    );
    assert!(
        anonymous.starts_with("HTTP/1.0 401"),
        "no token, no stock: {anonymous}"
    );
    assert!(
        metrics.contains("outbox_consumer_events_handled_total")
            && metrics.contains("outbox_consumer_retries_total"),
        "consumer metrics served (a gap retry happened): {metrics}"
    );
    assert!(
        health.starts_with("HTTP/1.0 200") && health.contains(r#""status":"ok""#),
        "{health}"
    );
    assert!(status.success(), "exit 0 on SIGTERM, got {status:?}");
    eprintln!("took {:?}", t0.elapsed());
}

#[test]
fn refuses_to_start_without_a_key_to_verify_tokens_with() {
    let out = Command::new(env!("CARGO_BIN_EXE_read-model"))
        .env_remove("READ_MODEL_JWT_PUBLIC_KEY_FILE")
        .env_remove("READ_MODEL_JWT_SECRET")
        .env(
            "READ_MODEL_DATABASE_URL",
            "postgres://nobody@127.0.0.1:1/none",
        )
        .output()
        .expect("run read-model");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("READ_MODEL_JWT_PUBLIC_KEY_FILE"), "{err}");
}
