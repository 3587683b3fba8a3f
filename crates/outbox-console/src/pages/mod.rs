//! The pages: each a thin layer over [`outbox::console`].

pub(crate) mod actions;
pub(crate) mod assets;
pub(crate) mod consumers;
pub(crate) mod dead;
pub(crate) mod event;
pub(crate) mod filters;
pub(crate) mod layout;
pub(crate) mod login;
pub(crate) mod overview;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;

use crate::AppState;

/// The outbox database called `name`.
#[allow(clippy::result_large_err)]
pub(crate) fn outbox_db(state: &Arc<AppState>, name: &str) -> Result<PgPool, Response> {
    state
        .config
        .outboxes
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.pool.clone())
        .ok_or_else(|| not_found("no outbox database of that name"))
}

/// The consumer database called `name`.
#[allow(clippy::result_large_err)]
pub(crate) fn consumer_db(state: &Arc<AppState>, name: &str) -> Result<PgPool, Response> {
    state
        .config
        .consumers
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.pool.clone())
        .ok_or_else(|| not_found("no consumer database of that name"))
}

pub(crate) fn not_found(why: &str) -> Response {
    (StatusCode::NOT_FOUND, layout::bare("Not found", why)).into_response()
}

/// A failed query as a page: what failed and what to do.
pub(crate) fn db_error(db: &str, e: &outbox::OutboxError) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        layout::bare("Database error", &db_error_text(db, e)),
    )
        .into_response()
}

pub(crate) fn db_error_text(db: &str, e: &outbox::OutboxError) -> String {
    let s = e.to_string();
    if s.contains("statement timeout") || s.contains("canceling statement") {
        format!("database {db}: the console's statement timeout cancelled the query ({s}); narrow the filter or raise --statement-timeout-ms")
    } else {
        format!("database {db}: {s}; check that the database is reachable and migrated (`outbox migrate`)")
    }
}
