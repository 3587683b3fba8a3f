//! Errors of the service and their `application/problem+json` form (RFC 9457).
//!
//! Every failure a client can cause maps to a 4xx with a `detail` that names what is wrong; only
//! failures of the service itself (database down, a bug) are 5xx, and their detail hides internals.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use thiserror::Error;

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// `Retry-After` (seconds) of a 503: long enough for a pool to replace broken connections or a
/// failover to promote a replica, short enough not to stall a checkout.
pub const RETRY_AFTER_SECS: u32 = 1;

/// Everything a request can fail with.
#[derive(Debug, Error)]
pub enum ApiError {
    /// Missing, malformed, expired or badly signed credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Syntactically bad input: malformed JSON, ids or headers (400).
    #[error("{0}")]
    BadRequest(String),
    /// The named resource does not exist for this tenant (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state, e.g. not enough stock (409).
    #[error("{0}")]
    Conflict(String),
    /// Well-formed input that breaks a rule, e.g. a negative quantity (422).
    #[error("{0}")]
    Unprocessable(String),
    /// The body is larger than the service accepts (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The database could not be used (503): the request had no effect and may be retried.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (500); the detail is logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The problem document of this error.
    pub fn to_problem(&self) -> Value {
        let detail = match self {
            // Internals stay in the log.
            ApiError::Internal(_) => "the service failed; the request had no effect".to_string(),
            ApiError::Unavailable(_) => {
                "the database is unavailable; the request had no effect, retry later".to_string()
            }
            other => other.to_string(),
        };
        problem(self.status(), &detail)
    }
}

/// A problem document for `status` with `detail`.
pub fn problem(status: StatusCode, detail: &str) -> Value {
    let title = status.canonical_reason().unwrap_or("Error");
    json!({
        "type": format!("about:blank#{}", status.as_u16()),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    })
}

/// A response with `body` as `application/problem+json` (used for stored and replayed errors too).
pub fn problem_response(status: StatusCode, body: Value) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(e) => tracing::error!(error = %e, "request failed"),
            ApiError::Unavailable(e) => tracing::warn!(error = %e, "database unavailable"),
            _ => {}
        }
        let mut resp = problem_response(self.status(), self.to_problem());
        if matches!(self, ApiError::Unavailable(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        resp
    }
}

/// Whether a SQLSTATE means "the database or the connection failed, not this request": the
/// transaction did not commit, so a retry is safe.
fn transient(code: &str) -> bool {
    // 08: connection exceptions; 57P01-57P03: admin shutdown, crash shutdown, cannot connect now
    // (a terminated backend, a failover); 40001/40P01: serialization failure, deadlock.
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => ApiError::Unavailable(e.to_string()),
            // A connection that died mid-message (a terminated backend) surfaces as a protocol
            // error when the server's last words were cut short.
            sqlx::Error::Protocol(m) if m.contains("closed") || m.contains("EOF") => {
                ApiError::Unavailable(e.to_string())
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some(c) if transient(c) => ApiError::Unavailable(e.to_string()),
                // Class 22, data exception: a value the database cannot take (a NUL in text,
                // an out-of-range number). The request is at fault, whatever check missed it.
                Some(c) if c.starts_with("22") => ApiError::Unprocessable(format!(
                    "a value of the request cannot be stored: {}; correct it and retry",
                    db.message()
                )),
                _ => ApiError::Internal(e.to_string()),
            },
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<outbox::OutboxError> for ApiError {
    fn from(e: outbox::OutboxError) -> Self {
        match e {
            outbox::OutboxError::Database(d) => d.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Shorthand for results of request handling.
pub type ApiResult<T> = Result<T, ApiError>;
