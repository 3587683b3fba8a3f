//! Issue 10: the table contract (docs/outbox-table.md) cannot be broken by a writer, and a stuck
//! aggregate costs nothing to the rest. Each test failed before the fix it covers. Real
//! PostgreSQL (own database per test) and, where a relay runs, real NATS JetStream.

mod common;

use std::time::Duration;

use common::*;
use outbox::store::RelayStore;
use outbox::{NewEvent, Outbox, OutboxError, PgStore};
use serde_json::json;
use sqlx::{Connection, Row};
use testkit::{eventually, TestDb, TestStream};
use uuid::Uuid;

fn event(agg: &str, n: i64) -> NewEvent {
    NewEvent::new(
        "acme",
        "V",
        agg,
        "StockLevelChangedEvent",
        "inventory.stock.changed",
        json!({ "n": n }),
    )
}

/// A raw INSERT as a writer in another language would send it; `extra` columns and values are
/// appended (SQL literals).
fn raw_insert(agg_sql: &str, extra_cols: &str, extra_vals: &str) -> String {
    format!(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic,
                                   payload{extra_cols})
         VALUES (gen_random_uuid(), 'acme', 'V', {agg_sql}, 'E', 'x.y', '\\x7b7d'{extra_vals})"
    )
}

async fn sql_error(db: &TestDb, sql: &str) -> sqlx::postgres::PgDatabaseError {
    match sqlx::query(sql).execute(&db.pool).await {
        Ok(_) => panic!("accepted, but must be refused: {sql}"),
        Err(sqlx::Error::Database(e)) => *e.downcast::<sqlx::postgres::PgDatabaseError>(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn lease_all(store: &PgStore, relay: &str) {
    let state = store
        .lease_round(relay, relay, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(state.owned.len(), 64);
}

/// Sequence numbers of aggregate `agg` in a claim by `relay`.
async fn claimed_seqs(store: &PgStore, relay: &str, agg: &str) -> Vec<i64> {
    store
        .claim(relay, 100, true, &[], Duration::ZERO)
        .await
        .unwrap()
        .messages
        .into_iter()
        .filter(|m| m.aggregate_id == agg)
        .map(|m| m.seq)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Poison rows

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_refuses_at_insert_what_no_broker_can_carry() {
    let db = TestDb::new().await;
    let cases = [
        (
            raw_insert("E'v\\n1'", "", ""),
            "outbox_event_aggregate_id_no_control_chars",
        ),
        (
            raw_insert(
                "'v1'",
                ", headers",
                ", '{\"correlationId\": \"c\\r\\nX-Evil: 1\"}'",
            ),
            "outbox_event_headers_are_strings_without_control_chars",
        ),
        (
            raw_insert("'v1'", ", headers", ", '{\"traceparent\": 42}'"),
            "outbox_event_headers_are_strings_without_control_chars",
        ),
        (
            raw_insert("'v1'", ", headers", ", '{\"contentType\": {\"a\": \"b\"}}'"),
            "outbox_event_headers_are_strings_without_control_chars",
        ),
    ];
    for (sql, constraint) in cases {
        let e = sql_error(&db, &sql).await;
        assert_eq!(e.code(), "23514", "check_violation for {sql}");
        assert_eq!(e.constraint(), Some(constraint), "{}", e.message());
    }
    // What the writer says about timestamps is not taken: the trigger sets them.
    sqlx::query(&raw_insert(
        "'v1'",
        ", created_at, next_attempt_at",
        ", 'infinity', now() + interval '1 hour'",
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let (created_ok, due): (bool, bool) = sqlx::query_as(
        "SELECT created_at BETWEEN now() - interval '1 minute' AND now() + interval '1 minute',
                next_attempt_at <= now() FROM outbox_event",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(created_ok, "created_at is the insert time, not 'infinity'");
    assert!(due, "a new row is due at once, whatever the writer gave");
    // And a later UPDATE cannot plant an undecodable timestamp either.
    let e = sql_error(&db, "UPDATE outbox_event SET created_at = 'infinity'").await;
    assert_eq!(e.constraint(), Some("outbox_event_created_at_decodable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_refuses_control_characters_with_a_typed_error_before_writing() {
    let db = TestDb::new().await;
    let outbox = Outbox::new("Test");
    let bad = [
        event("v\n1", 1),
        event("v1", 1).correlation_id("c\r\nX-Evil: 1"),
        event("v1", 1).correlation_id("c".repeat(201)),
    ];
    for b in bad {
        let mut tx = db.pool.begin().await.unwrap();
        let got = outbox.enqueue(&mut tx, &[event("ok", 1), b.clone()]).await;
        assert!(
            matches!(got, Err(OutboxError::InvalidEvent(_))),
            "{b:?} must be refused before any write: {got:?}"
        );
        tx.commit().await.unwrap();
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "nothing of a refused call is written");
}

/// Rows that bypassed the constraints (dropped here, as on a database where someone did): the relay
/// must not crash on them, must dead-letter each with its reason at once, and the healthy
/// aggregate behind them flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_relay_cannot_carry_are_dead_lettered_at_once_and_the_others_flow() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    // The control-character rules live on the columns' domains (20261213000001).
    for drop in [
        "ALTER TABLE outbox_event DROP CONSTRAINT outbox_event_created_at_decodable",
        "ALTER DOMAIN outbox_aggregate_id DROP CONSTRAINT outbox_event_aggregate_id_no_control_chars",
        "ALTER DOMAIN outbox_headers DROP CONSTRAINT outbox_event_headers_are_strings_without_control_chars",
    ] {
        sqlx::query(drop).execute(&db.pool).await.unwrap();
    }
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    let ids = outbox
        .enqueue(
            &mut tx,
            &[event("inf", 1), event("inf", 2), event("far", 1)],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE outbox_event SET created_at = 'infinity' WHERE event_id = $1")
        .bind(ids[0])
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox_event SET created_at = '262145-01-01' WHERE event_id = $1")
        .bind(ids[2])
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(&raw_insert("E'new\\nline'", "", ""))
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(&raw_insert(
        "'crlf'",
        ", headers",
        ", '{\"traceparent\": \"00-x\\r\\nX-Evil: 1\"}'",
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    // The healthy aggregate comes after every bad row, in id order.
    let mut tx = db.pool.begin().await.unwrap();
    let good = outbox
        .enqueue(&mut tx, &[event("good", 1), event("good", 2)])
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    let delivered = eventually(Duration::from_secs(20), || async {
        count(&db, "published").await == 2 && count(&db, "dead").await == 4
    })
    .await;
    relay.shutdown().await;
    assert!(
        delivered,
        "the relay survived: 4 dead letters, the healthy aggregate delivered"
    );
    let dead: Vec<(String, i32, String)> = sqlx::query_as(
        "SELECT aggregate_id, attempts, last_error FROM outbox_event WHERE status = 'dead' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for (agg, attempts, err) in &dead {
        assert_eq!(*attempts, 1, "{agg}: dead-lettered at once");
        let why = if agg.contains('\n') || agg == "crlf" {
            "control character"
        } else {
            "created_at"
        };
        assert!(err.contains(why), "{agg}: reason {err:?}");
    }
    // The later event of the dead-lettered aggregate waits behind it (dead letters block).
    let inf2: String = sqlx::query_scalar("SELECT status FROM outbox_event WHERE event_id = $1")
        .bind(ids[1])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_ne!(inf2, "dead");
    let got: Vec<String> = seen(&stream)
        .await
        .into_iter()
        .map(|m| m.event_id)
        .collect();
    assert_eq!(got, vec![good[0].to_string(), good[1].to_string()]);
    // Operators can list them (the undecodable timestamps were replaced when dead-lettered).
    let list = outbox::ops::dead_letters(&db.pool, &Default::default())
        .await
        .unwrap();
    assert_eq!(list.len(), 4);
}

// ---------------------------------------------------------------------------------------------
// 2. Order

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_given_due_time_cannot_let_a_later_event_overtake() {
    let db = TestDb::new().await;
    sqlx::query(&raw_insert(
        "'x'",
        ", next_attempt_at",
        ", now() + interval '1 hour'",
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(&raw_insert("'x'", "", ""))
        .execute(&db.pool)
        .await
        .unwrap();
    let store = PgStore::new(db.pool.clone());
    lease_all(&store, "r1").await;
    assert_eq!(claimed_seqs(&store, "r1", "x").await, vec![1, 2]);
}

/// The claim's rule, as `PgStore::claim` applies it, run in a transaction of our own so that its
/// `now()` can be placed between the writers' transaction starts.
const DUE_IN_ORDER: &str = "SELECT e.seq FROM outbox_event e
    WHERE e.status = 'pending' AND e.next_attempt_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM outbox_event b
          WHERE (b.status = 'dead' OR (b.status = 'pending' AND b.attempts > 0))
            AND b.tenant_id = e.tenant_id AND b.aggregate_type = e.aggregate_type
            AND b.aggregate_id = e.aggregate_id AND b.id < e.id
            AND ((b.status = 'pending' AND b.next_attempt_at > now()) OR b.status = 'dead'))
    ORDER BY e.id";

/// B starts, then the claim C, then A; A writes seq 1 and commits, B writes seq 2 and commits;
/// C then claims. With `next_attempt_at DEFAULT now()`, seq 1 was due only from A's start (after
/// C's now()) and seq 2 from B's (before): C returned seq 2 alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_started_earlier_cannot_overtake_through_transaction_start_times() {
    let db = TestDb::new().await;
    let mut b = db.pool.begin().await.unwrap();
    sqlx::query("SELECT now()").execute(&mut *b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut c = db.pool.begin().await.unwrap();
    sqlx::query("SELECT now()").execute(&mut *c).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut a = db.pool.begin().await.unwrap();
    sqlx::query(&raw_insert("'x'", "", ""))
        .execute(&mut *a)
        .await
        .unwrap();
    a.commit().await.unwrap();
    sqlx::query(&raw_insert("'x'", "", ""))
        .execute(&mut *b)
        .await
        .unwrap();
    b.commit().await.unwrap();
    let seqs: Vec<i64> = sqlx::query_scalar(DUE_IN_ORDER)
        .fetch_all(&mut *c)
        .await
        .unwrap();
    c.commit().await.unwrap();
    assert_eq!(seqs, vec![1, 2], "seq 2 never without seq 1");
}

/// The same race through a replay: a dead letter replayed after a claim's transaction started
/// must not be overtaken by its aggregate's next event in that claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_event_cannot_be_overtaken_by_the_next_one() {
    let db = TestDb::new().await;
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    let ids = outbox.enqueue(&mut tx, &[event("x", 1)]).await.unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE outbox_event SET status = 'dead', dead_at = now(), attempts = 3, last_error = 'no' WHERE event_id = $1")
        .bind(ids[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &[event("x", 2)]).await.unwrap();
    tx.commit().await.unwrap();

    let mut c = db.pool.begin().await.unwrap();
    sqlx::query("SELECT now()").execute(&mut *c).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let filter = outbox::ops::DeadLetterFilter {
        event_id: Some(ids[0]),
        ..Default::default()
    };
    assert_eq!(
        outbox::ops::replay(&db.pool, &filter, "test")
            .await
            .unwrap(),
        vec![ids[0]]
    );
    let seqs: Vec<i64> = sqlx::query_scalar(DUE_IN_ORDER)
        .fetch_all(&mut *c)
        .await
        .unwrap();
    c.commit().await.unwrap();
    assert_eq!(seqs, vec![1, 2]);
}

/// The header rule's fast path (migration `20261210000001`, which reads the object's JSON text
/// instead of each key and value) decides exactly as the rule as first written
/// (`outbox_headers_valid_full`), over random objects made of the characters that matter: JSON
/// escapes and backslashes, control characters below and above U+0020, multi-byte characters,
/// values that are not strings, empty keys, and values at and past 1024 characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_header_check_decides_as_the_rule_as_written() {
    use rand::{Rng, SeedableRng};
    let db = TestDb::new().await;
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const CHARS: &[char] = &[
        'a', 'b', 'n', 'r', 't', 'u', 'f', '0', ' ', '"', '\\', '/', '\n', '\r', '\t', '\u{1}',
        '\u{8}', '\u{c}', '\u{1f}', '\u{7f}', '\u{85}', '\u{9f}', '\u{a0}', 'é', '\u{2028}', '€',
    ];
    let text = |rng: &mut rand::rngs::StdRng| -> String {
        let len = match rng.random_range(0..10) {
            0 => rng.random_range(1015..1035),
            1 => 0,
            _ => rng.random_range(1..12),
        };
        // Mostly plain characters, so that long values are not almost always refused.
        (0..len)
            .map(|_| {
                if rng.random_range(0..20) == 0 {
                    CHARS[rng.random_range(0..CHARS.len())]
                } else {
                    CHARS[rng.random_range(0..9)]
                }
            })
            .collect()
    };
    let mut objects = Vec::new();
    for _ in 0..3000 {
        let mut m = serde_json::Map::new();
        for _ in 0..rng.random_range(0..4) {
            let k = text(&mut rng).chars().take(8).collect::<String>();
            let v = match rng.random_range(0..12) {
                0 => json!(1),
                1 => json!(null),
                2 => json!([text(&mut rng)]),
                3 => json!({ "x": "y" }),
                _ => json!(text(&mut rng)),
            };
            m.insert(k, v);
        }
        objects.push(serde_json::Value::Object(m));
    }
    objects.extend([json!([]), json!("s"), json!(null), json!(1)]);
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE outbox_headers_valid(h)) AS valid,
                count(*) FILTER (WHERE NOT outbox_headers_valid(h)) AS invalid,
                (array_agg(h::text) FILTER (
                    WHERE outbox_headers_valid(h) IS DISTINCT FROM outbox_headers_valid_full(h)))[1:5]
                    AS differ
         FROM unnest($1::jsonb[]) AS h",
    )
    .bind(&objects)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let differ: Option<Vec<String>> = row.get("differ");
    assert_eq!(differ, None, "seed {seed}: the fast path differs on these");
    let (valid, invalid): (i64, i64) = (row.get("valid"), row.get("invalid"));
    assert!(
        valid > 300 && invalid > 300,
        "seed {seed}: both outcomes must be exercised ({valid} valid, {invalid} invalid)"
    );
}

/// The name formats of rule 1 are checked without bounded repetitions since migration
/// `20261212000001` (cheaper for writers); the constraints as installed must decide exactly as the
/// formats as documented (docs/outbox-table.md), on random names around every length bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cheaper_name_checks_decide_as_the_rules_as_written() {
    use rand::{Rng, SeedableRng};
    let db = TestDb::new().await;
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const CHARS: &[char] = &[
        'a', 'Z', '0', '9', '_', '-', '.', ' ', '/', '\n', '\u{7f}', 'é', 'Ａ', '€', '[', '^', '$',
    ];
    let mut names = vec![String::new()];
    for _ in 0..4000 {
        let len = match rng.random_range(0..6) {
            0 => rng.random_range(60..70),
            1 => rng.random_range(124..134),
            _ => rng.random_range(0..12),
        };
        names.push(
            (0..len)
                .map(|_| {
                    if rng.random_range(0..40) == 0 {
                        CHARS[rng.random_range(0..CHARS.len())]
                    } else {
                        CHARS[rng.random_range(0..6)]
                    }
                })
                .collect(),
        );
    }
    for (column, rule) in [
        ("tenant_id", "'^[A-Za-z0-9_-]{1,64}$'"),
        ("aggregate_type", "'^[A-Za-z0-9_-]{1,64}$'"),
        ("event_type", "'^[A-Za-z0-9_.-]{1,128}$'"),
    ] {
        // The constraint's own text, evaluated on the samples under the column's name. Since
        // 20261213000001 it is a CHECK of the column's domain, written over `VALUE`.
        let def: String = sqlx::query_scalar(
            "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c
             JOIN pg_attribute a ON a.atttypid = c.contypid
             WHERE a.attrelid = 'outbox_event'::regclass AND a.attname = $2 AND c.conname = $1",
        )
        .bind(format!("outbox_event_{column}_check"))
        .bind(column)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let expr = def
            .strip_prefix("CHECK ")
            .expect("a CHECK constraint")
            .replace("VALUE", column);
        let row = sqlx::query(&format!(
            "SELECT count(*) FILTER (WHERE {column} ~ {rule}) AS valid,
                    count(*) FILTER (WHERE NOT {column} ~ {rule}) AS invalid,
                    (array_agg({column}) FILTER (WHERE ({expr}) IS DISTINCT FROM ({column} ~ {rule})))[1:5]
                        AS differ
             FROM unnest($1::text[]) AS u({column})"
        ))
        .bind(&names)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let differ: Option<Vec<String>> = row.get("differ");
        assert_eq!(
            differ, None,
            "seed {seed}: {column}: {def} differs on these"
        );
        let (valid, invalid): (i64, i64) = (row.get("valid"), row.get("invalid"));
        assert!(
            valid > 300 && invalid > 300,
            "seed {seed}: {column}: both outcomes must be exercised ({valid} valid, {invalid} invalid)"
        );
    }
    // And a broken format is refused under the same constraint name as ever.
    let e = sql_error(
        &db,
        &format!(
            "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
             VALUES (gen_random_uuid(), 'acme', 'V', 'v1', '{}', 'x.y', '\\x7b7d')",
            "E".repeat(129)
        ),
    )
    .await;
    assert_eq!(e.code(), "23514");
    assert_eq!(e.constraint(), Some("outbox_event_event_type_check"));
}

/// 20261213000001 moved the eight rules on writer-supplied names and headers from table CHECKs to
/// domains (a table CHECK's text is read and planned again for every statement). Same rules, same
/// SQLSTATE and constraint names, for INSERTs (one row and many) and UPDATEs alike; and the
/// migration goes through on a table holding rows older than the control-character rules (which
/// were added NOT VALID for such rows), keeping them for the relay to dead-letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_name_rules_hold_from_their_domains_for_old_rows_inserts_and_updates() {
    const DOMAINS: i64 = 20261213000001;
    let db = TestDb::empty().await;
    db.apply_outbox_migrations(|v| v < DOMAINS).await;
    // A writer's session that inserts before the migration and after it: its compiled trigger
    // functions must not keep the old column types.
    let mut writer = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // Rows from before the control-character rules, as an old database may hold.
    for sql in [
        "ALTER TABLE outbox_event DROP CONSTRAINT outbox_event_aggregate_id_no_control_chars,
                                  DROP CONSTRAINT outbox_event_headers_are_strings_without_control_chars",
        raw_insert("E'old\\nrow'", "", "").as_str(),
        raw_insert("'old'", ", headers", ", '{\"traceparent\": \"a\\u0001b\"}'").as_str(),
        "ALTER TABLE outbox_event
             ADD CONSTRAINT outbox_event_aggregate_id_no_control_chars
                 CHECK (aggregate_id !~ '[[:cntrl:]]') NOT VALID,
             ADD CONSTRAINT outbox_event_headers_are_strings_without_control_chars
                 CHECK (outbox_headers_valid(headers)) NOT VALID",
    ] {
        sqlx::query(sql).execute(&mut writer).await.unwrap();
    }
    db.apply_outbox_migrations(|v| v >= DOMAINS).await;
    let old: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT aggregate_id, headers FROM outbox_event ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        old,
        vec![
            ("old\nrow".to_string(), json!({})),
            ("old".to_string(), json!({ "traceparent": "a\u{1}b" }))
        ],
        "the old rows are kept, and read as text and JSON"
    );

    sqlx::query(&raw_insert("'good'", "", ""))
        .execute(&mut writer)
        .await
        .expect("a session that wrote before the migration writes after it");
    let values = |column: &str, bad: &str| -> [String; 6] {
        let mut v = ["'acme'", "'V'", "'a1'", "'E'", "'x.y'", "'{}'::jsonb"].map(String::from);
        let i = [
            "tenant_id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "topic",
            "headers",
        ]
        .iter()
        .position(|c| *c == column)
        .unwrap();
        v[i] = bad.to_string();
        v
    };
    let headers_rule = "outbox_event_headers_are_strings_without_control_chars";
    let cases = [
        ("tenant_id", "'ac me'", "outbox_event_tenant_id_check"),
        (
            "tenant_id",
            "repeat('t', 65)",
            "outbox_event_tenant_id_check",
        ),
        (
            "aggregate_type",
            "'V/1'",
            "outbox_event_aggregate_type_check",
        ),
        ("aggregate_id", "''", "outbox_event_aggregate_id_check"),
        (
            "aggregate_id",
            "repeat('a', 201)",
            "outbox_event_aggregate_id_check",
        ),
        (
            "aggregate_id",
            "E'a\\tb'",
            "outbox_event_aggregate_id_no_control_chars",
        ),
        ("event_type", "'E E'", "outbox_event_event_type_check"),
        (
            "event_type",
            "repeat('E', 129)",
            "outbox_event_event_type_check",
        ),
        ("topic", "'x..y'", "outbox_event_topic_check"),
        ("topic", "repeat('x', 201)", "outbox_event_topic_check"),
        ("headers", "'[]'::jsonb", headers_rule),
        ("headers", "'{\"a\": 1}'::jsonb", headers_rule),
        ("headers", "'{\"a\": \"b\\r\\nc\"}'::jsonb", headers_rule),
    ];
    for (column, bad, constraint) in cases {
        let [t, at, a, e, topic, h] = values(column, bad);
        let one = format!(
            "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                       topic, headers, payload)
             VALUES (gen_random_uuid(), {t}, {at}, {a}, {e}, {topic}, {h}, '\\x7b7d')"
        );
        // The bad row last of three, so the statement's first rows are written before it fails.
        let many = format!(
            "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type,
                                       topic, headers, payload)
             SELECT gen_random_uuid(), x.*, '\\x7b7d' FROM (VALUES
                 ('acme', 'V', 'm1', 'E', 'x.y', '{{}}'::jsonb), ('acme', 'V', 'm2', 'E', 'x.y', '{{}}'),
                 ({t}, {at}, {a}, {e}, {topic}, {h})) AS x"
        );
        let update =
            format!("UPDATE outbox_event SET {column} = {bad} WHERE aggregate_id = 'good'");
        for sql in [one, many, update] {
            let e = sql_error(&db, &sql).await;
            assert_eq!(e.code(), "23514", "{sql}: {}", e.message());
            assert_eq!(e.constraint(), Some(constraint), "{sql}: {}", e.message());
        }
    }
    let rows: Vec<(String, String, serde_json::Value)> =
        sqlx::query_as("SELECT aggregate_id, tenant_id, headers FROM outbox_event ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 3, "nothing of a refused statement was written");
    assert_eq!(
        rows[2],
        ("good".to_string(), "acme".to_string(), json!({})),
        "nothing was changed by a refused UPDATE"
    );
}

/// The same migration under a running relay: its claim, prepared before it, returns columns whose
/// type the migration changes, and PostgreSQL refuses such a statement in that session for as long
/// as it is kept (`0A000 cached plan must not change result type`). The relay used to fail every
/// claim, keeping its leases, until its connections were replaced (30 min by default); it now drops
/// the stale statements and goes on. On a pool of the relay's own (reads as single statements) and
/// on an application's pool (reads in a transaction of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_relay_carries_on_through_a_migration_that_changes_column_types() {
    relay_through_a_type_changing_migration(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_an_application_pool_carries_on_through_a_type_changing_migration() {
    relay_through_a_type_changing_migration(false).await;
}

async fn relay_through_a_type_changing_migration(own_pool: bool) {
    const DOMAINS: i64 = 20261213000001;
    let db = TestDb::empty().await;
    db.apply_outbox_migrations(|v| v < DOMAINS).await;
    let stream = TestStream::new();
    // A pool of two connections for the relay alone: its LISTEN takes one for good, so every
    // claim runs on the other, and the deliveries before the migration prove that it prepared
    // the claim there. With more connections, or in a pool shared with the test, a claim on a
    // connection that never prepared the statement would go through and hide the stall. (With
    // one, the relay cannot work at all: the LISTEN holds it.)
    let relay_pool = if own_pool {
        PgStore::connect_lazy(&db.url, 2).unwrap().pool().clone()
    } else {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&db.url)
            .await
            .unwrap()
    };
    let relay =
        testkit::relay::start_relay_on(relay_pool, stream.nats_config(), test_config()).await;
    let outbox = Outbox::new("Test");
    let enqueue = |n: i64| {
        let (pool, outbox) = (db.pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox
                .enqueue(&mut tx, &[event("a", n), event("b", n)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    };
    enqueue(1).await;
    let before = eventually(Duration::from_secs(10), || async {
        count(&db, "published").await == 2
    })
    .await;
    assert!(before, "delivered before the migration");
    db.apply_outbox_migrations(|v| v >= DOMAINS).await;
    enqueue(2).await;
    let after = eventually(Duration::from_secs(15), || async {
        count(&db, "published").await == 4
    })
    .await;
    relay.shutdown().await;
    assert!(after, "the relay stalled after the migration");
    let got: Vec<(String, i64)> = seen(&stream)
        .await
        .into_iter()
        .map(|m| (m.aggregate, m.seq))
        .collect();
    assert_eq!(got.len(), 4, "{got:?}");
    for agg in ["acme/a", "acme/b"] {
        let seqs: Vec<i64> = got
            .iter()
            .filter(|(a, _)| a == agg)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(seqs, vec![1, 2], "{agg}: in order, once each");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Event ids

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_event_id_cannot_be_used_again() {
    let db = TestDb::new().await;
    let id = Uuid::now_v7();
    let insert = format!(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         VALUES ('{id}', 'acme', 'V', 'x', 'E', 'x.y', '\\x7b7d'), (gen_random_uuid(), 'acme', 'V', 'y', 'E', 'x.y', '\\x7b7d')"
    );
    sqlx::query(&insert).execute(&db.pool).await.unwrap();
    testkit::mark_published(&db.pool, "true", "now()").await;
    let e = sql_error(&db, &insert).await;
    assert_eq!(e.code(), "23505", "unique_violation: {}", e.message());
    assert!(e.message().contains("already used"), "{}", e.message());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_event")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the whole statement is refused");
}

// ---------------------------------------------------------------------------------------------
// 4. Held rows

/// Rows behind a blocking dead letter leave the pending index (`held`), new ones are inserted
/// held, `outbox status` counts them, a purge releases them in order, and a relay whose dead
/// letters do not block delivers held rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_behind_a_dead_letter_are_held_and_released_in_order() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let outbox = Outbox::new("Test");
    let poison = NewEvent::new(
        "acme",
        "V",
        "bad",
        "Huge",
        "x.y",
        json!({ "blob": "x".repeat(1_100_000) }),
    );
    let mut tx = db.pool.begin().await.unwrap();
    let first = outbox
        .enqueue(
            &mut tx,
            &[
                poison.clone(),
                event("bad", 2),
                event("bad", 3),
                event("ok", 1),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "dead").await == 1 && count(&db, "published").await == 1
        })
        .await
    );
    let mut tx = db.pool.begin().await.unwrap();
    let later = outbox.enqueue(&mut tx, &[event("bad", 4)]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        count(&db, "held").await,
        3,
        "seq 2, 3 and the new 4 are held"
    );
    assert_eq!(count(&db, "pending").await, 0);
    let status = outbox::ops::status(&db.pool).await.unwrap();
    assert_eq!((status.counts.held, status.counts.dead), (3, 1));

    let filter = outbox::ops::DeadLetterFilter {
        event_id: Some(first[0]),
        ..Default::default()
    };
    outbox::ops::purge(&db.pool, &filter, "test").await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == 5
        })
        .await,
        "released in order after the purge (the purged event's place first, as a skip marker)"
    );
    relay.shutdown().await;
    let bad: Vec<String> = seen(&stream)
        .await
        .into_iter()
        .filter(|m| m.aggregate == "acme/bad")
        .map(|m| m.event_id)
        .collect();
    assert_eq!(
        bad,
        vec![
            first[0].to_string(),
            first[1].to_string(),
            first[2].to_string(),
            later[0].to_string()
        ]
    );
    let msgs = seen(&stream).await;
    let marker = msgs
        .iter()
        .find(|m| m.event_id == first[0].to_string())
        .unwrap();
    assert_eq!(marker.headers["Outbox-Skip"], "purged");
    let producer: Uuid = sqlx::query_scalar("SELECT id FROM outbox_producer")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(msgs
        .iter()
        .all(|m| m.headers["Outbox-Producer-Id"] == producer.to_string()));

    // A relay whose dead letters do not block lets held rows (from a blocking relay) flow.
    let mut tx = db.pool.begin().await.unwrap();
    let again = outbox
        .enqueue(&mut tx, &[poison, event("bad", 6)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "dead").await == 1 && count(&db, "held").await == 1
        })
        .await
    );
    relay.shutdown().await;
    let mut cfg = test_config();
    cfg.dead_letters_block = false;
    let relay = start_relay(&db, stream.nats_config(), cfg).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == 6 && count(&db, "held").await == 0
        })
        .await
    );
    relay.shutdown().await;
    let last = seen(&stream).await.last().unwrap().event_id.clone();
    assert_eq!(last, again[1].to_string());
}

/// Since migration `20261212000001` "held?" is decided once per statement, over all its rows: one
/// multi-row statement (a raw INSERT, and `Outbox::enqueue`) must hold exactly the rows whose
/// aggregate has a blocking dead letter or a held row, whatever their order in the statement, and
/// leave every other row pending (a non-blocking dead letter holds nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_row_insert_holds_exactly_the_rows_behind_a_blocking_dead_letter() {
    let db = TestDb::new().await;
    let one = |agg: &str| raw_insert(&format!("'{agg}'"), "", "");
    for agg in ["a", "b", "c"] {
        sqlx::query(&one(agg)).execute(&db.pool).await.unwrap();
    }
    // As the relay dead-letters: `a` blocks its aggregate, `b` does not.
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', dead_at = now(), last_error = 'test',
                blocks_aggregate = (aggregate_id = 'a')
         WHERE aggregate_id IN ('a', 'b')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let statuses = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (String, String)>(sql)
                .fetch_all(&pool)
                .await
                .unwrap()
        }
    };
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 'acme', 'V', agg, 'E', 'x.y', '\x7b7d'
         FROM unnest(ARRAY['d', 'a', 'c', 'a', 'b', 'e', 'a']) WITH ORDINALITY AS u(agg, n) ORDER BY n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let new_rows = "SELECT aggregate_id, status FROM outbox_event
                    WHERE status <> 'dead' AND seq > 1 OR aggregate_id IN ('d', 'e')
                    ORDER BY id";
    let expected = |s: &[(&str, &str)]| -> Vec<(String, String)> {
        s.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        statuses(new_rows).await,
        expected(&[
            ("d", "pending"),
            ("a", "held"),
            ("c", "pending"),
            ("a", "held"),
            ("b", "pending"),
            ("e", "pending"),
            ("a", "held"),
        ])
    );
    // Enqueue (one statement for all its events), in the same transaction as a raw INSERT that
    // holds: the held row of `a` inserted before in this transaction holds the next ones too.
    sqlx::query("UPDATE outbox_event SET status = 'pending', blocks_aggregate = false, attempts = 1 WHERE status = 'dead' AND aggregate_id = 'b'")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    Outbox::new("Test")
        .enqueue(
            &mut tx,
            &[event("c", 1), event("a", 2), event("f", 3), event("b", 4)],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let held: Vec<(String, String)> = statuses(
        "SELECT aggregate_id, count(*)::text FROM outbox_event WHERE status = 'held'
         GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(held, expected(&[("a", "4")]), "only `a` is held, all of it");
    let pending: Vec<(String, String)> = statuses(
        "SELECT aggregate_id, count(*)::text FROM outbox_event WHERE status = 'pending'
         GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(
        pending,
        expected(&[("b", "3"), ("c", "3"), ("d", "1"), ("e", "1"), ("f", "1")])
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Aggregate compaction

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_aggregates_are_compacted_and_come_back_in_a_new_epoch() {
    let db = TestDb::new().await;
    let outbox = Outbox::new("Test");
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .enqueue(
            &mut tx,
            &[
                event("idle", 1),
                event("idle", 2),
                event("pending", 1),
                event("dead", 1),
                event("busy", 1),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    testkit::mark_published(&db.pool, "aggregate_id IN ('idle', 'busy')", "now()").await;
    sqlx::query("UPDATE outbox_event SET status = 'dead', dead_at = now(), attempts = 1 WHERE aggregate_id = 'dead'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE outbox_aggregate SET last_at = now() - interval '8 days'")
        .execute(&db.pool)
        .await
        .unwrap();
    // A producer writing to `busy` right now: its aggregate must not be compacted under it.
    let mut busy = db.pool.begin().await.unwrap();
    outbox
        .enqueue(&mut busy, &[event("busy", 2)])
        .await
        .unwrap();

    let week = Duration::from_secs(7 * 24 * 3600);
    let n = outbox::ops::compact_aggregates(&db.pool, week, 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(n, 1, "only the idle aggregate with nothing pending or dead");
    busy.commit().await.unwrap();
    let left: Vec<String> =
        sqlx::query_scalar("SELECT aggregate_id FROM outbox_aggregate ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, vec!["busy", "dead", "pending"]);

    let mut tx = db.pool.begin().await.unwrap();
    let back = outbox
        .enqueue(&mut tx, &[event("idle", 3), event("idle", 4)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows = sqlx::query(
        "SELECT event_id, seq, seq_epoch, id FROM outbox_event_all WHERE aggregate_id = 'idle' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let got: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| (r.get::<i64, _>("seq"), r.get::<i64, _>("seq_epoch")))
        .collect();
    let (e1, e2) = (got[0].1, got[2].1);
    assert!(e2 > e1, "a new epoch, later than the first: {got:?}");
    assert_eq!(
        got,
        vec![(1, e1), (2, e1), (1, e2), (2, e2)],
        "seq restarts at 1"
    );
    assert_eq!(
        e2,
        rows[2].get::<i64, _>("id"),
        "epoch = id of its first event"
    );
    let busy_seq: i64 =
        sqlx::query_scalar("SELECT seq FROM outbox_event WHERE aggregate_id = 'busy'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(busy_seq, 2, "the busy aggregate kept its sequence");

    // The relay hands the epoch to the publisher.
    let store = PgStore::new(db.pool.clone());
    lease_all(&store, "r1").await;
    let batch = store
        .claim("r1", 100, true, &[], Duration::ZERO)
        .await
        .unwrap()
        .messages;
    let m = batch.iter().find(|m| m.event_id == back[0]).unwrap();
    assert_eq!((m.seq, m.seq_epoch), (1, e2));
}
