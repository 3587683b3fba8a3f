//! The console in a real browser (headless Chromium): the first page shows a seeded database's
//! counts; hostile row content runs no script; requests without the session, without the CSRF
//! token or from another origin change nothing; a replay done through the page moves the dead
//! letters back and their events reach the JetStream stream in order; a purge asks for
//! confirmation.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::browser::Browser;
use common::*;
use fantoccini::{Client, Locator};
use outbox::RelayConfig;
use testkit::{TestDb, TestStream};

const HOSTILE_ID: &str = "<img src=x onerror=\"document.title='pwned'\">";

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Logs in as alice through the login form.
async fn log_in(c: &Client, base: &str) {
    c.goto(&format!("{base}/login")).await.unwrap();
    c.find(Locator::Css("input[name=token]"))
        .await
        .unwrap()
        .send_keys(ALICE)
        .await
        .unwrap();
    click(c, "button[type=submit]").await;
    c.wait()
        .for_element(Locator::Css("#operator"))
        .await
        .unwrap();
}

async fn dead(db: &TestDb) -> i64 {
    count(&db.pool, "dead").await
}

#[tokio::test]
async fn the_console_in_a_real_browser() {
    let db = TestDb::new().await;
    seed_dead(
        &db.pool,
        3,
        3,
        "gave up after 4 attempts: nats: no responders for",
    )
    .await;
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         VALUES (gen_random_uuid(), 'evil', 'V', $1, 'Bulk', 'bulk.created',
                 convert_to('<script>document.title=\"pwned\"</script>', 'UTF8'))",
    )
    .bind(HOSTILE_ID)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', dead_at = now(), attempts = 1, blocks_aggregate = true,
                last_error = '<script>document.title=''pwned''</script>' WHERE tenant_id = 'evil'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let hostile: uuid::Uuid =
        sqlx::query_scalar("SELECT event_id FROM outbox_event WHERE tenant_id = 'evil'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let console = Console::start(&db.url, false).await;
    let base = console.origin();
    let b = Browser::start().await;
    let c = &b.client;

    // Logging in through the form; the first page shows the database's counts.
    c.goto(&format!("{base}/")).await.unwrap();
    assert!(c.current_url().await.unwrap().path().ends_with("/login"));
    log_in(c, &base).await;
    assert_eq!(text_of(c, "#operator").await, "alice");
    assert_eq!(text_of(c, "#dead-db .v").await, "4");
    assert_eq!(text_of(c, "#held-db .v").await, "6");
    assert_eq!(text_of(c, "#pending-db .v").await, "0");

    // Hostile content runs no script: the pages that show it have no script or img element
    // and the title is the console's.
    for page in [
        format!("{base}/db/db/event/{hostile}"),
        format!("{base}/db/db/dead/list"),
        format!("{base}/db/db/dead"),
    ] {
        c.goto(&page).await.unwrap();
        assert!(
            c.find_all(Locator::Css("script")).await.unwrap().is_empty(),
            "{page}"
        );
        assert!(
            c.find_all(Locator::Css("main img"))
                .await
                .unwrap()
                .is_empty(),
            "{page}"
        );
        let title = c.title().await.unwrap();
        assert!(
            title.ends_with("outbox console") && !title.contains("pwned"),
            "{page}: {title}"
        );
    }
    c.goto(&format!("{base}/db/db/event/{hostile}"))
        .await
        .unwrap();
    assert!(
        text_of(c, "main").await.contains(HOSTILE_ID),
        "shown as text"
    );

    // Without the CSRF token: the confirmation form of a replay of aggregate a0, its token
    // removed before submitting.
    let a0 = format!("{base}/db/db/dead/list?tenant=t0&aggregate_type=V&aggregate_id=a0");
    c.goto(&a0).await.unwrap();
    click(c, "button.replay").await;
    c.wait()
        .for_element(Locator::Css("#confirm"))
        .await
        .unwrap();
    c.execute(
        "document.querySelector('#confirm input[name=csrf]').remove()",
        vec![],
    )
    .await
    .unwrap();
    click(c, "#apply").await;
    c.wait()
        .for_element(Locator::Css("p.message"))
        .await
        .unwrap();
    assert!(text_of(c, "p.message").await.contains("CSRF"));
    assert_eq!(dead(&db).await, 4, "nothing changed without the CSRF token");

    // Without the session: the same form, the cookie gone.
    c.goto(&a0).await.unwrap();
    click(c, "button.replay").await;
    c.wait()
        .for_element(Locator::Css("#confirm"))
        .await
        .unwrap();
    c.delete_all_cookies().await.unwrap();
    click(c, "#apply").await;
    c.wait()
        .for_element(Locator::Css("p.message"))
        .await
        .unwrap();
    assert!(text_of(c, "p.message").await.contains("log in"));
    assert_eq!(dead(&db).await, 4, "nothing changed without a session");
    log_in(c, &base).await;

    // From another origin: a page on another port (same site, so the Strict cookie is sent)
    // with a complete form, the session's real CSRF token included.
    c.goto(&format!("{base}/")).await.unwrap();
    let csrf = c
        .find(Locator::Css("input[name=csrf]"))
        .await
        .unwrap()
        .attr("value")
        .await
        .unwrap()
        .unwrap();
    let evil = evil_site(&format!(
        "<form method=post action='{base}/db/db/dead/apply'>
           <input name=tenant value=t0><input name=action value=replay>
           <input name=as_of value=2100-01-01T00:00:00Z><input name=shown value=3>
           <input name=csrf value={csrf}><button id=go type=submit>win a prize</button></form>"
    ))
    .await;
    c.goto(&format!("http://{evil}/")).await.unwrap();
    click(c, "#go").await;
    c.wait()
        .for_element(Locator::Css("p.message"))
        .await
        .unwrap();
    assert!(text_of(c, "p.message").await.contains("another origin"));
    assert_eq!(dead(&db).await, 4, "nothing changed from another origin");

    // A replay through the page: the failure group, dry run, confirm. With a relay running, the
    // dead letters and the events held behind them reach the stream, each aggregate in order.
    let stream = TestStream::new();
    let relay = testkit::relay::start_relay_on(
        db.pool.clone(),
        stream.nats_config(),
        RelayConfig {
            relay_id: testkit::unique("relay"),
            poll_interval: Duration::from_millis(100),
            lease: Duration::from_millis(1500),
            ..Default::default()
        },
    )
    .await;
    c.goto(&format!("{base}/db/db/dead")).await.unwrap();
    let row = c
        .find(Locator::XPath(
            "//tr[@class='group'][contains(., 'retries_exhausted')]",
        ))
        .await
        .unwrap();
    row.find(Locator::Css("button.replay"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Css("#preview"))
        .await
        .unwrap();
    assert_eq!(
        c.find(Locator::Css("#preview"))
            .await
            .unwrap()
            .attr("data-count")
            .await
            .unwrap()
            .as_deref(),
        Some("3")
    );
    click(c, "#apply").await;
    c.wait().for_element(Locator::Css("#result")).await.unwrap();
    assert_eq!(
        c.find(Locator::Css("#result"))
            .await
            .unwrap()
            .attr("data-done")
            .await
            .unwrap()
            .as_deref(),
        Some("3")
    );
    let mut msgs = Vec::new();
    for _ in 0..200 {
        msgs = stream.messages().await;
        if msgs.len() >= 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        msgs.len(),
        9,
        "the 3 replayed events and the 6 held behind them"
    );
    let mut next: HashMap<String, i64> = HashMap::new();
    for m in &msgs {
        let h = |k: &str| m.headers.get(k).map(|v| v.to_string()).unwrap_or_default();
        let n = next.entry(h("Outbox-Aggregate-Id")).or_insert(1);
        assert_eq!(
            h("Outbox-Seq").parse::<i64>().unwrap(),
            *n,
            "in order within {}",
            h("Outbox-Aggregate-Id")
        );
        *n += 1;
    }
    assert_eq!(next.len(), 3);
    assert_eq!(dead(&db).await, 1, "only the hostile one is left");

    // A purge asks for confirmation: nothing happens until the box is ticked.
    c.goto(&format!("{base}/db/db/event/{hostile}"))
        .await
        .unwrap();
    click(c, "button.purge").await;
    c.wait()
        .for_element(Locator::Css("#confirm-purge"))
        .await
        .unwrap();
    let confirm_url = c.current_url().await.unwrap();
    click(c, "#apply").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        c.current_url().await.unwrap(),
        confirm_url,
        "the browser does not submit without the box"
    );
    assert_eq!(dead(&db).await, 1);
    click(c, "#confirm-purge").await;
    click(c, "#apply").await;
    c.wait().for_element(Locator::Css("#result")).await.unwrap();
    assert_eq!(dead(&db).await, 0);
    let audit = audit_actors(&db.pool).await;
    assert_eq!(
        audit,
        vec![
            ("replay".into(), "alice".into(), 3),
            ("purge".into(), "alice".into(), 1)
        ]
    );
    relay.shutdown().await;
    b.close().await;
}

/// Serves `form` as the page of another origin (another loopback port); its address.
async fn evil_site(form: &str) -> std::net::SocketAddr {
    let html =
        format!("<!DOCTYPE html><html><head><title>evil</title></head><body>{form}</body></html>");
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(html) }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

/// Writes the screenshots of the main pages into docs/ (`console-*.png`) from a seeded
/// database. Not part of the suite: `cargo test -p outbox-console --test browser -- --ignored`.
#[tokio::test]
#[ignore = "writes docs/console-*.png; run by hand"]
async fn screenshots() {
    let db = TestDb::new().await;
    seed_dead(
        &db.pool,
        6,
        3,
        "gave up after 5 attempts: nats: no responders for subject inv.t0",
    )
    .await;
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers)
         SELECT gen_random_uuid(), (ARRAY['acme', 'globex', 'initech', 'umbrella'])[1 + g % 4], 'ProductVariant',
                'v-' || (g % 40), (ARRAY['StockLevelChanged', 'StockReserved', 'PriceChanged'])[1 + g % 3],
                'inventory.stock.changed',
                convert_to(json_build_object('eventId', gen_random_uuid(), 'eventType', 'StockLevelChanged',
                           'tenantId', 'acme', 'data', json_build_object('variantId', 'v-' || (g % 40), 'quantity', g % 17))::text, 'UTF8'),
                jsonb_build_object('correlationId', 'req-' || g, 'contentType', 'application/json')
           FROM generate_series(1, 240) g ORDER BY g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', dead_at = now() - interval '3 minutes', attempts = 1, blocks_aggregate = true,
                last_error = 'message too large: ' || (1048576 + seq) || ' > 1048576'
          WHERE tenant_id = 'globex' AND aggregate_id IN ('v-1', 'v-5') AND seq = 1",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox_published (id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic,
                                       payload, headers, seq, partition, attempts, created_at, published_at, seq_epoch)
         SELECT 1000000 + g, gen_random_uuid(), 'acme', 'ProductVariant', 'p' || g, 'StockLevelChanged', 'x', '\\x7b7d', '{}',
                1, 0, 0, now(), now() - make_interval(secs => (g % 840) + (g % 7) * 30), 0
           FROM generate_series(1, 6000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO outbox_relay (relay_id, host, pid) VALUES ('relay-a', 'app-1', 4242), ('relay-b', 'app-2', 4243)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE outbox_partition SET owner = CASE WHEN partition < 32 THEN 'relay-a' ELSE 'relay-b' END,
                lease_until = now() + interval '1 hour'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox_consumer_dead_letter (consumer, event_id, producer, tenant_id, aggregate_type, aggregate_id,
                 seq_epoch, seq, subject, headers, payload, reason, attempts, last_error)
         SELECT 'read-model', gen_random_uuid(), 'p1', 'acme', 'ProductVariant', 'v-9', 1, g, 'inv.acme.stock', '{}',
                '\\x7b7d', CASE WHEN g = 3 THEN 'handler' ELSE 'held' END, CASE WHEN g = 3 THEN 5 ELSE 0 END,
                CASE WHEN g = 3 THEN 'handler failed: violates check constraint \"quantity_non_negative\" for v-9' END
           FROM generate_series(3, 5) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let dead_id: uuid::Uuid = sqlx::query_scalar(
        "SELECT event_id FROM outbox_event WHERE tenant_id = 'globex' AND status = 'dead' LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let console = Console::start(&db.url, false).await;
    let base = console.origin();
    let b = Browser::start().await;
    let c = &b.client;
    c.set_window_size(1280, 1700).await.unwrap();
    log_in(c, &base).await;
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let shot = |name: &'static str| {
        let docs = docs.clone();
        async move {
            let png = c.screenshot().await.unwrap();
            std::fs::write(docs.join(format!("console-{name}.png")), png).unwrap();
        }
    };
    shot("overview").await;
    c.set_window_size(1280, 1000).await.unwrap();
    c.goto(&format!("{base}/db/db/dead")).await.unwrap();
    shot("dead-letters").await;
    c.goto(&format!("{base}/db/db/event/{dead_id}"))
        .await
        .unwrap();
    shot("event").await;
    click(c, "button.purge").await;
    c.wait()
        .for_element(Locator::Css("#confirm-purge"))
        .await
        .unwrap();
    shot("purge-confirmation").await;
    c.goto(&format!("{base}/consumers/cons")).await.unwrap();
    shot("consumers").await;
    b.close().await;
}
