//! Starting several services on one database at once, as `scripts/run.sh` does with the inventory
//! and the read model. Migrating: every migrator must succeed (no "deadlock detected"), every
//! migration must be recorded, and no index may be left invalid; each migrator has a pool of its
//! own, as a separate process would, and each round starts from a fresh, empty database.
//! Supervising: when one service `run.sh` started ends, the script says so and stops the other.

use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use testkit::TestDb;

const ROUNDS: usize = 4;
const MIGRATORS: usize = 8;

/// The three migrate entry points the binaries call, mixed like `run.sh` mixes them.
async fn migrate_one(kind: usize, pool: &PgPool) -> Result<(), String> {
    match kind % 3 {
        0 => inventory::migrate(pool)
            .await
            .map_err(|e| format!("inventory: {e}")),
        1 => read_model::migrate(pool)
            .await
            .map_err(|e| format!("read model: {e}")),
        _ => outbox::schema::migrate(pool)
            .await
            .map_err(|e| format!("outbox: {e}")),
    }
}

async fn invalid_indexes(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE NOT i.indisvalid OR NOT i.indisready",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_migrators_at_once_serialize_cleanly() {
    let expected: usize = [
        outbox::schema::migrator(),
        inventory::migrator(),
        read_model::migrator(),
    ]
    .iter()
    .map(|m| m.iter().count())
    .sum();
    for round in 0..ROUNDS {
        let db = TestDb::empty().await;
        let mut tasks = Vec::new();
        for kind in 0..MIGRATORS {
            let url = db.url.clone();
            tasks.push(tokio::spawn(async move {
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&url)
                    .await
                    .expect("connect");
                let r = tokio::time::timeout(Duration::from_secs(60), migrate_one(kind, &pool))
                    .await
                    .unwrap_or_else(|_| Err(format!("migrator {kind}: no answer in 60 s")));
                pool.close().await;
                r
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "round {round}: {} of {MIGRATORS} migrators failed: {failures:#?}",
            failures.len()
        );
        let recorded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            recorded as usize, expected,
            "round {round}: migrations recorded"
        );
        let invalid = invalid_indexes(&db.pool).await;
        assert!(
            invalid.is_empty(),
            "round {round}: invalid indexes {invalid:?}"
        );
    }
}

/// Leaves `inv_idempotency_created_at` as a killed migrator leaves it: a `CREATE INDEX
/// CONCURRENTLY` terminated while it waited for an older snapshot, the index INVALID.
async fn interrupt_index_build(db: &TestDb) {
    sqlx::query("DROP INDEX inv_idempotency_created_at")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *blocker)
        .await
        .unwrap();
    sqlx::query("SELECT 1")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut builder = db.pool.acquire().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *builder)
        .await
        .unwrap();
    let build = tokio::spawn(async move {
        sqlx::query(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS inv_idempotency_created_at \
             ON inv_idempotency (created_at)",
        )
        .execute(&mut *builder)
        .await
        .map(|_| ())
    });
    let waits = testkit::eventually(Duration::from_secs(20), || async {
        let waiting: Option<String> =
            sqlx::query_scalar("SELECT wait_event::text FROM pg_stat_activity WHERE pid = $1")
                .bind(pid)
                .fetch_optional(&db.pool)
                .await
                .unwrap()
                .flatten();
        waiting.as_deref() == Some("virtualxid")
    })
    .await;
    assert!(waits, "the index build waits for the older snapshot");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(build.await.unwrap().is_err(), "the build was killed");
    blocker.commit().await.unwrap();
    assert_eq!(
        invalid_indexes(&db.pool).await,
        vec!["inv_idempotency_created_at".to_string()]
    );
}

#[tokio::test]
async fn an_index_left_invalid_by_a_killed_migrator_is_rebuilt() {
    // Two histories: the killed build's migration never recorded (the next start re-runs it,
    // whose `IF NOT EXISTS` skips the invalid index), and one recorded as applied after such a
    // skip (what the old code left in databases where the index builder lost the deadlock).
    for forget_migration in [true, false] {
        let db = TestDb::empty().await;
        inventory::migrate(&db.pool).await.expect("migrations");
        interrupt_index_build(&db).await;
        if forget_migration {
            sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 20270101000002")
                .execute(&db.pool)
                .await
                .unwrap();
        }
        inventory::migrate(&db.pool)
            .await
            .expect("migrations again");
        let invalid = invalid_indexes(&db.pool).await;
        assert!(
            invalid.is_empty(),
            "forget_migration={forget_migration}: invalid indexes {invalid:?}"
        );
    }
}

/// `scripts/lib/supervise.sh`, as `run.sh` uses it, with stand-ins for the two services.
fn supervise(script: &str) -> (std::process::Output, Duration) {
    let lib = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/lib/supervise.sh"
    );
    let started = Instant::now();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail; source {lib}; {script}"))
        .output()
        .expect("bash runs");
    (out, started.elapsed())
}

#[test]
fn run_sh_stops_when_a_service_it_started_dies() {
    // The read model dies at start (as it did on a migration deadlock); the inventory runs on.
    let (out, took) = supervise(
        "(sleep 0.3; exit 3) & rm=$!; sleep 60 & inv=$!; \
         supervise read-model $rm inventory $inv; echo not reached",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(
        stderr.contains("read-model (pid") && stderr.contains("exited with code 3"),
        "says which service ended and how: {stderr}"
    );
    assert!(
        took < Duration::from_secs(20),
        "the other service was stopped ({took:?})"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("not reached"));

    // Killed by a signal, and ending with 0 (a service is not meant to end by itself).
    let (out, _) = supervise(
        "sleep 60 & rm=$!; (sleep 0.3; kill -KILL $BASHPID) & inv=$!; \
         supervise read-model $rm inventory $inv",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "stderr: {stderr}");
    assert!(stderr.contains("inventory (pid") && stderr.contains("killed by signal 9"));
    let (out, _) =
        supervise("sleep 60 & rm=$!; true & inv=$!; supervise read-model $rm inventory $inv");
    assert_eq!(out.status.code(), Some(1));
}
