//! The outbox schema: SQL migrations embedded in the library, and the one way to apply them
//! ([`migrate_all`]) that any number of processes can call against one database at once.
//!
//! # Why not `Migrator::run` alone
//!
//! sqlx 0.8 serialises migrators with a *blocking* session advisory lock
//! (`SELECT pg_advisory_lock(..)`), and runs `-- no-transaction` migrations while holding it. A
//! `CREATE INDEX CONCURRENTLY` in such a migration waits for every transaction in the database
//! whose snapshot might still see the table, and that includes the other process's
//! `pg_advisory_lock` statement, itself waiting for the lock the index builder holds: PostgreSQL
//! reports "deadlock detected" and kills one of the two (the read model in `scripts/run.sh`, 3 of 4
//! fresh starts). If it kills the index builder, the index is left INVALID and, because the
//! migration says `IF NOT EXISTS`, the retry records it as applied without rebuilding it.
//!
//! So [`migrate_all`] first takes an advisory lock of our own ([`MIGRATION_LOCK_KEY`]) by
//! *polling* `pg_try_advisory_lock` on a dedicated connection: a waiting process has no statement
//! open between polls, so an index build in the holder waits at most one poll's duration for it.
//! Holding that lock, it runs the migrators on the same connection (sqlx's own lock is then
//! uncontended among our processes; it stays on so that older binaries, which know only sqlx's
//! lock, are still kept out), and rebuilds any index a concurrent-index migration named that is
//! left invalid. Making the migration non-concurrent was the other option, but an applied
//! migration's text cannot change (sqlx checks its checksum) and a plain `CREATE INDEX` on a large
//! live table blocks writes for its whole build.

use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool};

use crate::error::Result;

/// Key of the session advisory lock that serialises every migrator of this workspace on one
/// database (advisory locks are per database). Distinct from sqlx's own key, which is derived
/// from the database name. The bytes spell "outboxmg".
pub const MIGRATION_LOCK_KEY: i64 = 0x6f75_7462_6f78_6d67;

/// How long a waiting migrator sleeps between tries, before jitter. Short, because an index build
/// in the lock holder waits for each try to finish (a try takes well under a millisecond).
const POLL: Duration = Duration::from_millis(100);

/// How often a waiting migrator says it is still waiting.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The outbox's own migrations (versions `2026112200xxxx`). An application may keep its own
/// migrations in the same database: both sides ignore versions they do not know.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// Applies the outbox migrations that are not applied yet. Safe to call from any number of
/// processes at once, beside other callers of [`migrate_all`] (see the module docs).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    migrate_all(pool, &[&migrator()]).await
}

/// Applies `migrators` in order, under the workspace's migration lock, on a dedicated connection
/// made with `pool`'s options. Services whose schema adds to the outbox's pass
/// `[&outbox::schema::migrator(), &their_migrator]`. Any number of processes may call this at
/// once against one database: they take turns, and none can deadlock another's
/// `CREATE INDEX CONCURRENTLY`. Waits as long as another process migrates (logging every 10 s
/// which backend holds the lock); wrap it in a timeout to bound that.
pub async fn migrate_all(pool: &PgPool, migrators: &[&Migrator]) -> Result<()> {
    // Not a pooled connection: if this future is dropped or the process dies, closing the socket
    // is what releases a session lock, and a pooled connection would keep it.
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let result = migrate_locked(&mut conn, migrators).await;
    // Closing ends the session, which releases the lock whether or not the unlock ran.
    let _ = conn.close().await;
    result
}

async fn migrate_locked(conn: &mut PgConnection, migrators: &[&Migrator]) -> Result<()> {
    acquire_lock(conn).await?;
    for migrator in migrators {
        // `run_direct` is what `run` calls after acquiring; `run(&mut *conn)` itself makes this
        // future not provably `Send` (sqlx's `Acquire<'a>` bound), which callers that spawn need.
        migrator.run_direct(&mut *conn).await?;
        rebuild_invalid_indexes(conn, migrator).await?;
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Polls for the lock rather than blocking in `pg_advisory_lock`: see the module docs.
async fn acquire_lock(conn: &mut PgConnection) -> Result<()> {
    let started = Instant::now();
    let mut reported = None::<Instant>;
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(MIGRATION_LOCK_KEY)
            .fetch_one(&mut *conn)
            .await?;
        if got {
            if reported.is_some() {
                tracing::info!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "migration lock acquired"
                );
            }
            return Ok(());
        }
        if reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            let holder = lock_holder(conn).await?;
            tracing::info!(
                holder_pid = holder,
                waited_s = started.elapsed().as_secs(),
                "another process is migrating this database; waiting for it (its backend pid is \
                 holder_pid: see pg_stat_activity if this does not end)"
            );
            reported = Some(Instant::now());
        }
        let jitter = rand::rng().random_range(0..POLL.as_millis() as u64 / 2);
        tokio::time::sleep(POLL + Duration::from_millis(jitter)).await;
    }
}

/// The backend holding the migration lock, if it still does.
async fn lock_holder(conn: &mut PgConnection) -> Result<Option<i32>> {
    // A bigint advisory key is stored as classid = high 32 bits, objid = low 32 bits, objsubid 1.
    let pid = sqlx::query_scalar(
        "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database
         WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()
           AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid AND l.objsubid = 1
         LIMIT 1",
    )
    .bind(MIGRATION_LOCK_KEY >> 32)
    .bind(MIGRATION_LOCK_KEY & 0xffff_ffff)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(pid)
}

/// Rebuilds the indexes that `migrator`'s `CREATE [UNIQUE] INDEX CONCURRENTLY` statements name
/// and that exist but are invalid: what a build leaves behind when its process is killed or its
/// statement fails. `IF NOT EXISTS` then skips it, and sqlx records the migration as applied, so
/// without this the index would stay unused (and still maintained on every write) for good. This
/// also repairs databases where that already happened. Only those named indexes are touched: an
/// invalid index of someone else's may be a build still in progress.
async fn rebuild_invalid_indexes(conn: &mut PgConnection, migrator: &Migrator) -> Result<()> {
    for migration in migrator.iter().filter(|m| m.no_tx) {
        for name in concurrent_index_names(&migration.sql) {
            let invalid: Option<String> = sqlx::query_scalar(
                "SELECT i.indexrelid::regclass::text FROM pg_index i
                 WHERE i.indexrelid = to_regclass($1) AND NOT (i.indisvalid AND i.indisready)",
            )
            .bind(&name)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(index) = invalid {
                tracing::warn!(
                    index = %index,
                    version = migration.version,
                    "index left invalid by an interrupted concurrent build; rebuilding it"
                );
                // `index` comes from regclass output, so it is quoted as an identifier must be.
                sqlx::query(&format!("REINDEX INDEX CONCURRENTLY {index}"))
                    .execute(&mut *conn)
                    .await?;
            }
        }
    }
    Ok(())
}

/// The names in `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name` statements of `sql`
/// (`--` comments skipped). Our migrations write index names unquoted; a quoted name is passed on
/// with its quotes, which `to_regclass` understands.
fn concurrent_index_names(sql: &str) -> Vec<String> {
    let words: Vec<&str> = sql
        .lines()
        .map(|line| line.split("--").next().unwrap_or(""))
        .flat_map(str::split_whitespace)
        .collect();
    let mut names = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if !w.eq_ignore_ascii_case("CONCURRENTLY") || i < 2 {
            continue;
        }
        let creates = words[i - 1].eq_ignore_ascii_case("INDEX")
            && (words[i - 2].eq_ignore_ascii_case("CREATE")
                || words[i - 2].eq_ignore_ascii_case("UNIQUE"));
        if !creates {
            continue;
        }
        let mut rest = &words[i + 1..];
        if rest.len() >= 3
            && rest[0].eq_ignore_ascii_case("IF")
            && rest[1].eq_ignore_ascii_case("NOT")
            && rest[2].eq_ignore_ascii_case("EXISTS")
        {
            rest = &rest[3..];
        }
        if let Some(name) = rest.first() {
            if !name.eq_ignore_ascii_case("ON") {
                names.push(name.to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::concurrent_index_names;

    #[test]
    fn finds_the_names_of_concurrent_index_builds() {
        let sql = "-- no-transaction\n-- CREATE INDEX CONCURRENTLY commented ON t (a);\n\
                   CREATE INDEX CONCURRENTLY IF NOT EXISTS a_idx ON t (a);\n\
                   create unique index concurrently b_idx on t (b);\n\
                   CREATE INDEX CONCURRENTLY ON t (c);\n\
                   REINDEX INDEX CONCURRENTLY d_idx;\nDROP INDEX CONCURRENTLY e_idx;";
        assert_eq!(concurrent_index_names(sql), vec!["a_idx", "b_idx"]);
    }
}
