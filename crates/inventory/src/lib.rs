//! The inventory service: stock, goods receipts, reservations and shipments of product variants,
//! per tenant, with every state change committing its events through the transactional outbox.
//!
//! Layout: [`http`] (routes and request hygiene) calls [`ops`] (one function per operation, each
//! inside the caller's transaction), which changes stock only through [`stock`] (row locks,
//! invariant checks, ledger entries and the seed's six events). [`idempotency`] stores answers
//! with their effects; [`expiry`] releases expired reservations in the background.
//!
//! Decisions where the issue is silent are written next to the code that makes them; the crate
//! README lists them.

#![recursion_limit = "512"]

pub mod auth;
pub mod error;
pub mod expiry;
pub mod http;
pub mod idempotency;
pub mod model;
pub mod openapi;
pub mod ops;
pub mod stock;
pub mod supervise;

use std::sync::Arc;

use outbox::wake::CommitNotifier;
use outbox::Outbox;
use sqlx::PgPool;

pub use error::{ApiError, ApiResult};
pub use http::router;

/// `sourceService` of every envelope (seed section 3).
pub const SOURCE_SERVICE: &str = "InventoryService";

/// The seed's topic exchange (section 4): the default of `inventory serve --broker rabbitmq`.
pub const SEED_EXCHANGE: &str = "inventory.events";

/// The seed's routing keys are the events' topics as they are (`inventory.reservation.created`),
/// so that the seed's bindings (`inventory.reservation.*`) match; the tenant travels in the
/// `Outbox-Tenant-Id` header (see the README).
pub const SEED_ROUTING_KEY: &str = "{topic}";

/// The longest a relay waits to hear of a commit (besides one round trip) while commits keep
/// coming: commits within it share one wake-up notification, and so one relay batch. The first
/// commit after a quiet spell wakes the relays at once.
///
/// Why 20 ms and not 5: a relay batch costs about 1-2 ms of CPU beyond its events (claim,
/// publish and settlement round trips on the relay, PostgreSQL and the broker), so under a steady
/// stream of commits the window bounds that overhead at (batch cost / window) of a core, which the
/// service, sharing the machine, would otherwise lose. At 1,000 events/s the relay's side cost
/// 261 µs per event with 5 ms, 196 with 10 ms and 132 with 20 ms, for a commit-to-stream p50 of
/// 4.3, 7.4 and 13 ms (docs/benchmarks.md, "Issue 20, fourth pass"). `inventory serve
/// --wake-window-ms` sets it.
pub const WAKE_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// What every request handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The service's database (inventory schema and outbox tables).
    pub pool: PgPool,
    /// The enqueue side of the outbox. It does not notify the relays inside the transaction
    /// (that would flush concurrent commits one at a time): handlers call
    /// [`AppState::notifier`] after they commit.
    pub outbox: Outbox,
    /// Wakes the relays after commits, at most once per [`WAKE_WINDOW`] (or the window given to
    /// [`AppState::with_wake_window`]).
    pub notifier: CommitNotifier,
    /// Token verification (verify only: minting is `auth::Minter`'s).
    pub jwt: Arc<auth::Verifier>,
    /// Whether the in-process relay died (health endpoints answer 503 then).
    pub relay: Arc<supervise::RelayState>,
}

impl AppState {
    /// State over `pool`, verifying tokens signed with `jwt_secret`.
    pub fn new(pool: PgPool, jwt_secret: &[u8]) -> Self {
        Self::with_keys(pool, auth::JwtKeys::new(jwt_secret))
    }

    /// State over `pool`, verifying tokens with `keys` (a [`auth::Verifier`] of any algorithm,
    /// or HS256 [`auth::JwtKeys`]; either may also check `iss` and `aud`).
    /// Starts the relays' wake-up task, so it must be called within a Tokio runtime.
    pub fn with_keys(pool: PgPool, keys: impl Into<auth::Verifier>) -> Self {
        Self::with_keys_and_wake_window(pool, keys, WAKE_WINDOW)
    }

    /// [`AppState::with_keys`], with the relays woken at most once per `window` (see
    /// [`AppState::with_wake_window`]): what `inventory serve` builds, starting one wake-up task.
    pub fn with_keys_and_wake_window(
        pool: PgPool,
        keys: impl Into<auth::Verifier>,
        window: std::time::Duration,
    ) -> Self {
        Self {
            notifier: CommitNotifier::spawn(pool.clone(), window),
            pool,
            outbox: Outbox::new(SOURCE_SERVICE).with_notify(false),
            jwt: Arc::new(keys.into()),
            relay: Arc::default(),
        }
    }

    /// The same state with the relays woken at most once per `window` instead of
    /// [`WAKE_WINDOW`] (`inventory serve --wake-window-ms`): a wider window means fewer, larger
    /// relay batches under a steady stream of commits, at the price of up to `window` more
    /// commit-to-stream latency while commits keep coming. Must be called within a Tokio runtime.
    pub fn with_wake_window(mut self, window: std::time::Duration) -> Self {
        // The notifier replaced here ends its task when its last sender is dropped.
        self.notifier = CommitNotifier::spawn(self.pool.clone(), window);
        self
    }
}

/// The inventory schema's migrations. Versions sort after the outbox's, and missing versions are
/// ignored so that both migrators can share one `_sqlx_migrations` table.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.set_ignore_missing(true);
    m
}

/// Applies the outbox migrations, then the inventory's, under the workspace's migration lock
/// (`outbox::schema::migrate_all`): any number of processes, the read model's included, may migrate
/// one database at once.
pub async fn migrate(pool: &PgPool) -> Result<(), outbox::OutboxError> {
    outbox::schema::migrate_all(pool, &[&outbox::schema::migrator(), &migrator()]).await
}

/// The API's connection pool settings: `max` connections, a 5 s wait for one.
///
/// A connection is checked (a round trip) before it is handed out only when it sat idle for more
/// than [`CHECK_IDLE_AFTER`]: sqlx's default checks every checkout, which costs each request one
/// round trip more than its commands need. A connection in steady use that the server closed (a
/// restart, a failover) fails its next statement instead; sqlx then drops it, and the request
/// answers 503 with `Retry-After` having changed nothing (see `error.rs`).
pub fn pool_options(max: u32) -> sqlx::postgres::PgPoolOptions {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > CHECK_IDLE_AFTER {
                    use sqlx::Connection;
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// How long a pooled connection may sit idle before it is checked when handed out.
pub const CHECK_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
