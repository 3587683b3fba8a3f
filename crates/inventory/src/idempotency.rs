//! `Idempotency-Key`: the first answer to a POST is stored with its effect, in one transaction.
//!
//! The key row is inserted *first* in the request's transaction. A concurrent duplicate's insert
//! then waits on the primary key until the first transaction ends: if it committed, the duplicate
//! replays the stored answer; if it rolled back (an error: nothing happened), the duplicate goes
//! ahead as a first request. So a key is applied at most once, whatever the concurrency.
//! A key reused with a different request (method, path or body) answers 422.
//!
//! Keys are kept for a retention window (24 h by default, `INVENTORY_IDEMPOTENCY_TTL_HOURS`), the
//! usual promise of such APIs: a retry within it replays, and the table does not grow without
//! bound. [`purge_expired`] removes older keys in bounded batches.

use axum::http::StatusCode;
use serde_json::Value;
use sqlx::PgConnection;

use crate::error::{ApiError, ApiResult};

/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 200;

/// What the key row says about this request.
#[derive(Debug)]
pub enum Claim {
    /// First use of the key: go ahead, then [`store`] the answer.
    New,
    /// The key was used before for this very request: here is its answer.
    Replay(StatusCode, Value),
}

/// Checks a key's syntax: 1-200 visible ASCII characters.
pub fn check_key(key: &str) -> ApiResult<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1-{MAX_KEY_LEN} visible ASCII characters"
        )));
    }
    Ok(())
}

/// Claims `key` for `request` in `conn`'s transaction (see the module docs).
pub async fn claim(
    conn: &mut PgConnection,
    tenant: &str,
    key: &str,
    request: &Value,
) -> ApiResult<Claim> {
    let inserted = sqlx::query(
        "INSERT INTO inv_idempotency (tenant_id, key, request) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(tenant)
    .bind(key)
    .bind(request)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(Claim::New);
    }
    let (stored, status, body): (Value, Option<i32>, Option<Value>) = sqlx::query_as(
        "SELECT request, status, body FROM inv_idempotency WHERE tenant_id = $1 AND key = $2",
    )
    .bind(tenant)
    .bind(key)
    .fetch_one(&mut *conn)
    .await?;
    if &stored != request {
        return Err(ApiError::Unprocessable(format!(
            "Idempotency-Key {key:?} was already used for a different request; use a new key"
        )));
    }
    let status = status
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .ok_or_else(|| ApiError::Internal(format!("idempotency key {key:?} has no answer")))?;
    Ok(Claim::Replay(status, body.unwrap_or(Value::Null)))
}

/// Stores the answer of a claimed key, in the same transaction as the effect.
pub async fn store(
    conn: &mut PgConnection,
    tenant: &str,
    key: &str,
    status: StatusCode,
    body: &Value,
) -> ApiResult<()> {
    sqlx::query(
        "UPDATE inv_idempotency SET status = $3, body = $4 WHERE tenant_id = $1 AND key = $2",
    )
    .bind(tenant)
    .bind(key)
    .bind(status.as_u16() as i32)
    .bind(body)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The purge statement: `$1` the TTL in seconds, `$2` the batch. The index on `created_at`
/// (migration `20270101000002`) lets it read only the expired keys.
pub const PURGE_SQL: &str = "DELETE FROM inv_idempotency WHERE (tenant_id, key) IN (
     SELECT tenant_id, key FROM inv_idempotency
     WHERE created_at < now() - make_interval(secs => $1)
     LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Deletes keys older than `ttl` in statements of at most `batch` rows (`SKIP LOCKED`, so a purge
/// never waits on a request that is using a key); returns how many were deleted.
pub async fn purge_expired(
    pool: &sqlx::PgPool,
    ttl: std::time::Duration,
    batch: i64,
) -> ApiResult<u64> {
    let mut total = 0;
    loop {
        let n = sqlx::query(PURGE_SQL)
            .bind(ttl.as_secs_f64())
            .bind(batch.max(1))
            .execute(pool)
            .await?
            .rows_affected();
        total += n;
        if n < batch.max(1) as u64 {
            return Ok(total);
        }
    }
}
