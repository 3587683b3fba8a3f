//! Replay and purge through the console's HTTP forms: the dry run counts a set, applying acts on
//! that set only (later failures left out, the difference reported), purge uses the CLI's skip
//! markers, and `outbox_audit` records the operator's name.

mod common;

use common::*;
use testkit::TestDb;

#[tokio::test]
async fn a_group_replay_applies_to_the_dry_runs_set_and_is_audited_under_the_operator() {
    let db = TestDb::new().await;
    seed_dead(
        &db.pool,
        4,
        3,
        "gave up after 4 attempts: nats: no responders for",
    )
    .await;
    let c = Console::start(&db.url, false).await;
    let (sid, csrf) = c.login(ALICE).await;
    let groups = c.get("/db/db/dead", Some(&sid)).await;
    // Four errors that differ only in their event ids make one group.
    let group = "retries_exhausted: nats: no responders for <id>";
    assert!(
        groups
            .body
            .contains("retries_exhausted: nats: no responders for &lt;id&gt;"),
        "{}",
        groups.body
    );
    assert_eq!(groups.body.matches("class=\"group\"").count(), 1);
    let dry = c
        .post(
            "/db/db/dead/preview",
            Some(&sid),
            &[("group", group), ("action", "replay"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    assert_eq!(dry.attr_of("preview", "data-count").as_deref(), Some("4"));
    assert_eq!(
        count(&db.pool, "dead").await,
        4,
        "a dry run changes nothing"
    );
    let as_of = dry.field_value("as_of").unwrap();
    // After the dry run: one of the four is purged by someone else, and a new dead letter of
    // the same group appears. Neither is in what the operator confirms.
    let gone: uuid::Uuid = sqlx::query_scalar(
        "SELECT event_id FROM outbox_event WHERE status = 'dead' AND aggregate_id = 'a0'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    outbox::ops::purge(
        &db.pool,
        &outbox::ops::DeadLetterFilter {
            event_id: Some(gone),
            ..Default::default()
        },
        "someone",
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         VALUES (gen_random_uuid(), 't9', 'V', 'late', 'Bulk', 'bulk.created', '\\x7b7d')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    dead_letter_all_pending_of(&db.pool, "t9").await;
    let applied = c
        .post(
            "/db/db/dead/apply",
            Some(&sid),
            &[
                ("group", group),
                ("action", "replay"),
                ("as_of", &as_of),
                ("shown", "4"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    assert_eq!(applied.attr_of("result", "data-done").as_deref(), Some("3"));
    assert!(
        applied
            .body
            .contains("1 of those shown were no longer there"),
        "{}",
        applied.body
    );
    let left: Vec<String> =
        sqlx::query_scalar("SELECT tenant_id FROM outbox_event WHERE status = 'dead'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        left,
        vec!["t9".to_string()],
        "the dead letter that came after the dry run stays"
    );
    assert_eq!(
        count(&db.pool, "held").await,
        0,
        "the replayed aggregates' held events flow again"
    );
    let audit = audit_actors(&db.pool).await;
    assert_eq!(
        audit.last().unwrap(),
        &("replay".to_string(), "alice".to_string(), 3)
    );
}

async fn dead_letter_all_pending_of(pool: &sqlx::PgPool, tenant: &str) {
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', dead_at = now() + interval '1 second', attempts = 4,
                blocks_aggregate = true, last_error = 'gave up after 4 attempts: nats: no responders for ' || event_id
          WHERE status = 'pending' AND tenant_id = $1",
    )
    .bind(tenant)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn purging_an_aggregate_needs_confirmation_and_leaves_skip_markers() {
    let db = TestDb::new().await;
    seed_dead(&db.pool, 2, 3, "permanent: message too large").await;
    let c = Console::start(&db.url, false).await;
    let (sid, csrf) = c.login(BOB).await;
    let agg = [
        ("tenant", "t0"),
        ("aggregate_type", "V"),
        ("aggregate_id", "a1"),
    ];
    let mut form: Vec<(&str, &str)> = agg.to_vec();
    form.extend([("action", "purge"), ("csrf", csrf.as_str())]);
    let dry = c.post("/db/db/dead/preview", Some(&sid), &form).await;
    assert_eq!(dry.attr_of("preview", "data-count").as_deref(), Some("1"));
    assert!(
        dry.body.contains("id=\"confirm-purge\""),
        "a purge asks for confirmation"
    );
    let as_of = dry.field_value("as_of").unwrap();
    let mut apply: Vec<(&str, &str)> = agg.to_vec();
    apply.extend([
        ("action", "purge"),
        ("csrf", csrf.as_str()),
        ("as_of", as_of.as_str()),
        ("shown", "1"),
    ]);
    let refused = c.post("/db/db/dead/apply", Some(&sid), &apply).await;
    assert_eq!(refused.status, 400, "no confirmation, no purge");
    assert_eq!(count(&db.pool, "dead").await, 2);
    apply.push(("confirm", "yes"));
    let done = c.post("/db/db/dead/apply", Some(&sid), &apply).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.attr_of("result", "data-done").as_deref(), Some("1"));
    // The CLI's rule: the purged row stays in its place as a skip marker.
    let (status, skip): (String, Option<String>) = sqlx::query_as(
        "SELECT status, headers->>'outboxSkip' FROM outbox_event WHERE aggregate_id = 'a1' AND seq = 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), skip.as_deref()),
        ("pending", Some("purged"))
    );
    assert_eq!(
        count(&db.pool, "dead").await,
        1,
        "a0's dead letter is untouched"
    );
    assert_eq!(
        audit_actors(&db.pool).await,
        vec![("purge".into(), "bob".into(), 1)]
    );
}

#[tokio::test]
async fn parked_consumer_events_are_replayed_and_purged_the_same_way() {
    let db = TestDb::new().await;
    for (seq, reason) in [(1, "handler"), (2, "held")] {
        sqlx::query(
            "INSERT INTO outbox_consumer_dead_letter (consumer, event_id, producer, tenant_id, aggregate_type,
                     aggregate_id, seq_epoch, seq, subject, headers, payload, reason, last_error)
             VALUES ('c1', gen_random_uuid(), 'p', 't0', 'V', 'a1', 1, $1, 's', '{}', '\\x7b7d', $2,
                     CASE WHEN $1 = 1 THEN 'handler failed: duplicate key 42' END)",
        )
        .bind(seq as i64)
        .bind(reason)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let c = Console::start(&db.url, false).await;
    let (sid, csrf) = c.login(ALICE).await;
    let page = c.get("/consumers/cons", Some(&sid)).await;
    assert!(
        page.body
            .contains("permanent: handler failed: duplicate key &lt;n&gt;"),
        "{}",
        page.body
    );
    let overview = c.get("/", Some(&sid)).await;
    assert!(
        overview.body.contains("handler 1") && overview.body.contains("held 1"),
        "parked states on the first page"
    );
    // Purging the held one alone is refused (the handler one before it would stay parked).
    let one: uuid::Uuid =
        sqlx::query_scalar("SELECT event_id FROM outbox_consumer_dead_letter WHERE seq = 2")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let one = one.to_string();
    let dry = c
        .post(
            "/consumers/cons/preview",
            Some(&sid),
            &[
                ("consumer", "c1"),
                ("event_id", &one),
                ("action", "purge"),
                ("csrf", &csrf),
            ],
        )
        .await;
    let as_of = dry.field_value("as_of").unwrap();
    let r = c
        .post(
            "/consumers/cons/apply",
            Some(&sid),
            &[
                ("consumer", "c1"),
                ("event_id", &one),
                ("action", "purge"),
                ("csrf", &csrf),
                ("as_of", &as_of),
                ("shown", "1"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("earlier parked event"), "{}", r.body);
    // A replay of the aggregate asks the consumer to apply both.
    let agg = [
        ("consumer", "c1"),
        ("tenant", "t0"),
        ("aggregate_type", "V"),
        ("aggregate_id", "a1"),
    ];
    let mut f: Vec<(&str, &str)> = agg.to_vec();
    f.extend([("action", "replay"), ("csrf", csrf.as_str())]);
    let dry = c.post("/consumers/cons/preview", Some(&sid), &f).await;
    assert_eq!(dry.attr_of("preview", "data-count").as_deref(), Some("2"));
    let as_of = dry.field_value("as_of").unwrap();
    f.extend([("as_of", as_of.as_str()), ("shown", "2")]);
    let done = c.post("/consumers/cons/apply", Some(&sid), &f).await;
    assert_eq!(
        done.attr_of("result", "data-done").as_deref(),
        Some("2"),
        "{}",
        done.body
    );
    let requested: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_consumer_dead_letter WHERE replay_requested_at IS NOT NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(requested, 2);
    assert_eq!(
        audit_actors(&db.pool).await,
        vec![("consumer_replay".into(), "alice".into(), 2)]
    );
}
