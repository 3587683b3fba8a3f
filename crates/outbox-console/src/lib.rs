//! The outbox's browser console (`outbox console`): server-rendered HTML pages over the outbox
//! library's operator queries ([`outbox::console`]), served from the binary itself (no script, no
//! build step).
//!
//! # Security model
//!
//! - Reading and acting need an operator session unless the console was started with
//!   `anonymous_read` (then reading is open; acting still needs a session). Operators are named,
//!   each with a secret token ([`operators`]); the audit trail records the operator's name.
//! - A token is only ever sent in the body of the login form (never in a URL), compared in
//!   constant time, and exchanged for a random session id kept in an `HttpOnly`,
//!   `SameSite=Strict` cookie ([`sessions`]).
//! - Every request's `Host` must be one the console serves (no DNS rebinding), every
//!   state-changing request must come with an `Origin` of that host, and every form carries the
//!   session's CSRF token ([`guard`]).
//! - Every response forbids script (`Content-Security-Policy: default-src 'none'; ...`); every
//!   value from a row is escaped by the template engine, control characters are shown as escapes
//!   and binary payloads as hex ([`render`]); large payloads are cut and offered as a download.
//! - Every query runs on the console's own small pool with a statement timeout ([`console_pool`]),
//!   so the console cannot starve producers or relays of connections.

pub mod guard;
pub mod operators;
mod pages;
pub mod render;
pub mod sessions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub use operators::Operators;

/// A database the console shows, under the operator's name for it.
#[derive(Debug, Clone)]
pub struct NamedPool {
    /// Name (as given with `NAME=URL`, or derived from the URL).
    pub name: String,
    /// The console's pool on it.
    pub pool: PgPool,
}

/// What the console serves and who may use it.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Outbox databases.
    pub outboxes: Vec<NamedPool>,
    /// Consumer databases (their parked events).
    pub consumers: Vec<NamedPool>,
    /// Operators and their tokens.
    pub operators: Operators,
    /// Reading without a session.
    pub anonymous_read: bool,
    /// `Host` values accepted besides the listening address itself and `localhost:PORT`
    /// (e.g. the name a reverse proxy forwards).
    pub allowed_hosts: Vec<String>,
    /// Mark the session cookie `Secure` (when served over HTTPS, e.g. behind a proxy).
    pub secure_cookie: bool,
}

/// Why the console cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A database URL sqlx cannot parse.
    #[error("database {name}: {source}; give a postgres:// URL")]
    BadUrl {
        /// Its name.
        name: String,
        /// The parse error.
        source: sqlx::Error,
    },
    /// The operators file or variable is wrong.
    #[error(transparent)]
    Operators(#[from] operators::OperatorsError),
    /// Binding or serving failed.
    #[error("console server: {0}")]
    Io(#[from] std::io::Error),
}

/// A pool for the console on `url`: at most `size` connections, each query cancelled by the
/// server after `statement_timeout`, `application_name` `outbox-console` (so a DBA sees it), and
/// connections made lazily (an unreachable database shows as an error on its card, not a failed
/// start).
pub fn console_pool(
    name: &str,
    url: &str,
    size: u32,
    statement_timeout: Duration,
) -> Result<PgPool, ConsoleError> {
    let opts: PgConnectOptions = url.parse().map_err(|source| ConsoleError::BadUrl {
        name: name.into(),
        source,
    })?;
    let opts = opts.application_name("outbox-console").options([
        (
            "statement_timeout",
            statement_timeout.as_millis().to_string(),
        ),
        // Reading a page must never wait behind a writer's lock for long.
        ("lock_timeout", statement_timeout.as_millis().to_string()),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(size.max(1))
        .min_connections(0)
        .acquire_timeout(statement_timeout.max(Duration::from_secs(1)))
        .connect_lazy_with(opts))
}

/// Shared by every request.
pub(crate) struct AppState {
    pub(crate) config: ConsoleConfig,
    pub(crate) sessions: sessions::Sessions,
    pub(crate) hosts: guard::AllowedHosts,
}

/// The console's routes for a server listening on `addr`.
pub fn router(config: ConsoleConfig, addr: SocketAddr) -> Router {
    let hosts = guard::AllowedHosts::new(addr, &config.allowed_hosts);
    let state = Arc::new(AppState {
        config,
        sessions: sessions::Sessions::default(),
        hosts,
    });
    Router::new()
        .route("/", get(pages::overview::page))
        .route("/login", get(pages::login::form).post(pages::login::submit))
        .route("/logout", post(pages::login::logout))
        .route("/static/console.css", get(pages::assets::css))
        .route("/db/{db}/dead", get(pages::dead::groups))
        .route("/db/{db}/dead/list", get(pages::dead::list))
        .route("/db/{db}/dead/preview", post(pages::actions::dead_preview))
        .route("/db/{db}/dead/apply", post(pages::actions::dead_apply))
        .route("/db/{db}/event/{id}", get(pages::event::page))
        .route("/db/{db}/event/{id}/payload", get(pages::event::payload))
        .route("/consumers/{db}", get(pages::consumers::page))
        .route("/consumers/{db}/list", get(pages::consumers::list))
        .route(
            "/consumers/{db}/event/{consumer}/{id}",
            get(pages::consumers::event),
        )
        .route(
            "/consumers/{db}/event/{consumer}/{id}/payload",
            get(pages::consumers::payload),
        )
        .route(
            "/consumers/{db}/preview",
            post(pages::actions::parked_preview),
        )
        .route("/consumers/{db}/apply", post(pages::actions::parked_apply))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .with_state(state)
}

/// Serves the console on `listener` until `stop` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: ConsoleConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ConsoleError> {
    let addr = listener.local_addr()?;
    let app = router(config, addr);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await?;
    Ok(())
}
