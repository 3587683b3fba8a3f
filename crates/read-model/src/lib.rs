//! A read model of the inventory's six events, built with the outbox consumer runtime: per tenant
//! and variant the quantity, reserved, status and open low-stock alert, served over HTTP. It is an
//! example for users of the runtime and the proof that it applies every event exactly once, in
//! order: after any run its numbers equal the inventory's.

pub mod apply;
pub mod http;

use sqlx::PgPool;

/// The read model's own migrations (its tables), beside the consumer runtime's inbox tables.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m
}

/// Applies the inbox migrations (from the `outbox` library) and the read model's own, under the
/// workspace's migration lock (`outbox::schema::migrate_all`): safe beside the inventory (or any
/// other process) migrating the same database at the same time.
pub async fn migrate(pool: &PgPool) -> Result<(), outbox::OutboxError> {
    outbox::schema::migrate_all(pool, &[&outbox::schema::migrator(), &migrator()]).await
}
