//! The console's security points, each against a real server on a free port and a real database
//! (issue 21): sessions and tokens, Host and Origin, CSRF, CSP, inert rendering of hostile rows,
//! large payloads, the statement timeout, and that actions apply to the set their dry run showed,
//! audited under the operator's name.

mod common;

use std::time::Duration;

use common::*;
use testkit::TestDb;

const ERR: &str = "gave up after 4 attempts: nats: no responders for";

#[tokio::test]
async fn reading_needs_a_session_unless_anonymous_read_and_acting_always_does() {
    let db = TestDb::new().await;
    seed_dead(&db.pool, 3, 2, ERR).await;
    let c = Console::start(&db.url, false).await;
    for path in ["/", "/db/db/dead", "/db/db/dead/list", "/consumers/cons"] {
        let r = c.get(path, None).await;
        assert_eq!(r.status, 303, "{path} without a session");
        assert_eq!(r.header("location"), Some("/login"));
        assert!(!r.body.contains("dead letters"), "{path} shows nothing");
    }
    // A made-up session id is no session.
    assert_eq!(c.get("/", Some(&"0".repeat(64))).await.status, 303);
    let anon = Console::start(&db.url, true).await;
    let r = anon.get("/", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.attr_of("dead-db", "class").as_deref(), Some("count bad"));
    assert!(r.body.contains("read-only (anonymous)"));
    assert!(!r.body.contains("Replay…"), "no action offered to a reader");
    // Acting without a session changes nothing, even on an anonymous-read console.
    let r = anon
        .post(
            "/db/db/dead/apply",
            None,
            &[
                ("tenant", "t0"),
                ("action", "replay"),
                ("as_of", "2100-01-01T00:00:00Z"),
                ("shown", "3"),
                ("csrf", ""),
            ],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(count(&db.pool, "dead").await, 3);
    assert!(audit_actors(&db.pool).await.is_empty());
}

#[tokio::test]
async fn login_takes_the_token_in_the_body_only_and_sets_a_strict_httponly_session_cookie() {
    let db = TestDb::new().await;
    let c = Console::start(&db.url, false).await;
    let wrong = c
        .post("/login", None, &[("token", "alice-token-012345678")])
        .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    // A token in the URL is ignored: no login through a link or a log line.
    let r = c.get(&format!("/login?token={ALICE}"), None).await;
    assert!(r.header("set-cookie").is_none());
    assert_eq!(c.get(&format!("/?token={ALICE}"), None).await.status, 303);
    let ok = c.post("/login", None, &[("token", ALICE)]).await;
    assert_eq!(ok.status, 303);
    let cookie = ok.header("set-cookie").unwrap().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(
        !cookie.contains(ALICE),
        "the cookie holds a session id, not the token"
    );
    let sid = ok.session_cookie().unwrap();
    assert!(sid.len() >= 64);
    let page = c.get("/", Some(&sid)).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("id=\"operator\">alice<"),
        "the operator's name is shown"
    );
    assert!(
        !page.body.contains(ALICE),
        "the token never appears in a page"
    );
    // Logging out needs the CSRF token, then ends the session.
    let csrf = page.field_value("csrf").unwrap();
    assert_eq!(
        c.post("/logout", Some(&sid), &[("csrf", "x")]).await.status,
        403
    );
    assert_eq!(
        c.post("/logout", Some(&sid), &[("csrf", &csrf)])
            .await
            .status,
        303
    );
    assert_eq!(c.get("/", Some(&sid)).await.status, 303);
}

#[tokio::test]
async fn host_origin_and_csrf_are_checked_and_a_refused_request_changes_nothing() {
    let db = TestDb::new().await;
    seed_dead(&db.pool, 2, 3, ERR).await;
    let c = Console::start(&db.url, false).await;
    let (sid, csrf) = c.login(ALICE).await;
    let cookie = format!("outbox_console_session={sid}");
    let form = encode_form(&[
        ("tenant", "t0"),
        ("action", "replay"),
        ("as_of", "2100-01-01T00:00:00Z"),
        ("shown", "2"),
        ("csrf", &csrf),
    ]);
    let host = c.addr.to_string();
    let origin = c.origin();
    // DNS rebinding: a page of evil.example whose name now points at 127.0.0.1.
    for (h, o) in [
        ("evil.example", "http://evil.example"),
        ("evil.example:80", "http://evil.example:80"),
    ] {
        let r = request(
            c.addr,
            "POST",
            "/db/db/dead/apply",
            h,
            &[("Cookie", &cookie), ("Origin", o)],
            Some(&form),
        )
        .await;
        assert_eq!(r.status, 421, "{}", r.body);
        assert_eq!(
            request(c.addr, "GET", "/", h, &[("Cookie", &cookie)], None)
                .await
                .status,
            421
        );
    }
    // Another origin (a page on another port is same-site, so the Strict cookie comes along).
    let other = format!("http://127.0.0.1:{}", c.addr.port() + 1);
    for headers in [
        vec![("Cookie", cookie.as_str()), ("Origin", other.as_str())],
        vec![("Cookie", cookie.as_str()), ("Origin", "null")],
        vec![("Cookie", cookie.as_str())],
        vec![
            ("Cookie", cookie.as_str()),
            ("Origin", origin.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
        ],
    ] {
        let r = request(
            c.addr,
            "POST",
            "/db/db/dead/apply",
            &host,
            &headers,
            Some(&form),
        )
        .await;
        assert_eq!(r.status, 403, "{headers:?}: {}", r.body);
    }
    // No or a wrong CSRF token, and another session's token.
    let (_, bob_csrf) = c.login(BOB).await;
    for bad in ["", "0000", bob_csrf.as_str()] {
        let r = c
            .post(
                "/db/db/dead/apply",
                Some(&sid),
                &[
                    ("tenant", "t0"),
                    ("action", "replay"),
                    ("as_of", "2100-01-01T00:00:00Z"),
                    ("shown", "2"),
                    ("csrf", bad),
                ],
            )
            .await;
        assert_eq!(r.status, 403, "csrf {bad:?}: {}", r.body);
    }
    assert_eq!(count(&db.pool, "dead").await, 2, "nothing was replayed");
    assert!(
        audit_actors(&db.pool).await.is_empty(),
        "nothing was audited"
    );
    // The same request with everything right works: the checks above were the only obstacle.
    let r = request(
        c.addr,
        "POST",
        "/db/db/dead/apply",
        &host,
        &[("Cookie", &cookie), ("Origin", &origin)],
        Some(&form),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(count(&db.pool, "dead").await, 0);
}

#[tokio::test]
async fn every_response_forbids_script_and_framing() {
    let db = TestDb::new().await;
    let c = Console::start(&db.url, true).await;
    for path in [
        "/",
        "/login",
        "/static/console.css",
        "/db/db/dead",
        "/nowhere",
        "/db/nope/dead",
    ] {
        let r = c.get(path, None).await;
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("script-src"),
            "{path}: {csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{path}"
        );
        assert!(!r.body.to_ascii_lowercase().contains("<script"), "{path}");
    }
    let refused = request(c.addr, "GET", "/", "evil.example", &[], None).await;
    assert!(refused.header("content-security-policy").is_some());
}

#[tokio::test]
async fn hostile_row_content_is_rendered_inert() {
    let db = TestDb::new().await;
    let hostile = "<script>alert(\"x\")</script><img src=x onerror='alert(1)'>";
    // An outbox dead letter: markup in the aggregate id, the payload, a header and the error
    // (which also carries control characters: CR LF, NUL is refused by PostgreSQL text, ESC, BEL).
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers)
         VALUES (gen_random_uuid(), 't0', 'V', $1, 'Bulk', 'bulk.created', convert_to($1, 'UTF8'),
                 jsonb_build_object('correlationId', $1::text))",
    )
    .bind(hostile)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', dead_at = now(), attempts = 1, blocks_aggregate = true,
                last_error = $1 || E'\\r\\nX-Injected: 1\\u001b[31m\\u0007'",
    )
    .bind(hostile)
    .execute(&db.pool)
    .await
    .unwrap();
    // A consumer's parked event: a binary payload (not UTF-8), control characters in the
    // aggregate id and headers exactly as received with a NUL.
    sqlx::query(
        "INSERT INTO outbox_consumer_dead_letter (consumer, event_id, tenant_id, aggregate_type, aggregate_id,
                 subject, headers, headers_raw, payload, reason, last_error)
         VALUES ('c1', gen_random_uuid(), 't0', 'V', E'agg\\u0001\\u000a<script>', 's.t',
                 NULL, decode('7b2258223a22003c7363726970743e227d', 'hex'), '\\xff00fe3c7363726970743e', 'handler',
                 'handler failed: ' || $1)",
    )
    .bind(hostile)
    .execute(&db.pool)
    .await
    .unwrap();
    let event_id: uuid::Uuid = sqlx::query_scalar("SELECT event_id FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let parked_id: uuid::Uuid =
        sqlx::query_scalar("SELECT event_id FROM outbox_consumer_dead_letter")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let c = Console::start(&db.url, false).await;
    let (sid, _) = c.login(ALICE).await;
    let pages = [
        "/".to_string(),
        "/db/db/dead".into(),
        "/db/db/dead/list".into(),
        format!("/db/db/event/{event_id}"),
        "/consumers/cons".into(),
        "/consumers/cons/list?consumer=c1".into(),
        format!("/consumers/cons/event/c1/{parked_id}"),
    ];
    for p in &pages {
        let r = c.get(p, Some(&sid)).await;
        assert_eq!(r.status, 200, "{p}: {}", r.body);
        let lower = r.body.to_ascii_lowercase();
        assert!(
            !lower.contains("<script"),
            "{p}: markup from a row reached the page"
        );
        assert!(!lower.contains("<img"), "{p}");
        // `onerror=` stays visible as text, inside an escaped `&lt;img`.
        assert_eq!(
            lower.matches("onerror=").count(),
            lower.matches("&lt;img src=x onerror=").count(),
            "{p}"
        );
        for ctl in [0u8, 1, 7, 0x1b, b'\r'] {
            assert!(
                !r.raw_body.contains(&ctl),
                "{p}: control character {ctl:#x} reached the page"
            );
        }
    }
    let ev = c.get(&format!("/db/db/event/{event_id}"), Some(&sid)).await;
    assert!(ev
        .body
        .contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;"));
    assert!(
        ev.body.contains("\\u{d}\\u{a}</span>X-Injected")
            && ev.body.contains("\\u{1b}")
            && ev.body.contains("\\u{7}")
    );
    let parked = c
        .get(&format!("/consumers/cons/event/c1/{parked_id}"), Some(&sid))
        .await;
    assert!(
        parked.body.contains("Not UTF-8 text: shown as hex."),
        "{}",
        parked.body
    );
    assert!(
        parked.body.contains("ff 00 fe 3c 73 63 72 69 70 74 3e"),
        "binary payload as hex"
    );
    assert!(
        parked.body.contains("\\u{1}\\u{a}</span>&lt;script&gt;"),
        "control characters escaped"
    );
    assert!(
        parked.body.contains("\\u{0}"),
        "the NUL of the raw headers is shown, not sent"
    );
}

#[tokio::test]
async fn a_one_megabyte_payload_is_cut_on_the_page_and_offered_whole_as_a_download() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         VALUES (gen_random_uuid(), 't0', 'V', 'big', 'Bulk', 'bulk.created',
                 convert_to('{\"blob\":\"' || repeat('x', 1048576) || '\"}', 'UTF8'))",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let id: uuid::Uuid = sqlx::query_scalar("SELECT event_id FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let c = Console::start(&db.url, false).await;
    let (sid, _) = c.login(ALICE).await;
    let page = c.get(&format!("/db/db/event/{id}"), Some(&sid)).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.len() < 100 * 1024,
        "page is {} bytes",
        page.body.len()
    );
    assert!(page.body.contains("id=\"payload-truncated\""));
    let link = page.attr_of("payload-download", "href").unwrap();
    assert_eq!(link, format!("/db/db/event/{id}/payload"));
    let dl = c.get(&link, Some(&sid)).await;
    assert_eq!(dl.status, 200);
    assert_eq!(dl.raw_body.len(), 1048576 + 11);
    assert_eq!(dl.header("content-type"), Some("application/octet-stream"));
    assert!(dl
        .header("content-disposition")
        .unwrap()
        .starts_with("attachment"));
    assert_eq!(
        c.get(&link, None).await.status,
        303,
        "downloads need a session too"
    );
}

#[tokio::test]
async fn console_queries_run_under_their_own_statement_timeout() {
    let db = TestDb::new().await;
    let pool = outbox_console::console_pool("db", &db.url, 2, Duration::from_millis(150)).unwrap();
    let t: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(t, "150ms");
    let app: String = sqlx::query_scalar("SHOW application_name")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(app, "outbox-console");
    let err = sqlx::query("SELECT pg_sleep(2)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("statement timeout"), "{err}");
    assert_eq!(pool.options().get_max_connections(), 2);
}
