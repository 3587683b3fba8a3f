//! The outbox schema: SQL migrations embedded in the library.

use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::error::Result;

/// The outbox's own migrations (versions `2026112200xxxx`). An application may keep its own
/// migrations in the same database: both sides ignore versions they do not know.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// Applies the outbox migrations that are not applied yet. Safe to call from several processes
/// at once (sqlx takes an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    migrator().run(pool).await?;
    Ok(())
}
