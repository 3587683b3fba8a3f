//! The service's operations, each run inside the caller's transaction.
//!
//! State-changing POST operations are [`Command`]s executed by [`execute`], which returns the
//! HTTP answer as data ([`Outcome`]) so that the idempotency layer can store it in the same
//! transaction. An `Err` means "roll everything back"; an `Ok` with a 4xx status (a failed
//! reservation) means "commit what was written", here the failure events.

use std::collections::HashSet;

use axum::http::StatusCode;
use chrono::{DateTime, Duration, Utc};
use outbox::Outbox;
use serde_json::{json, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::{problem, ApiError, ApiResult};
use crate::model::*;
use crate::stock::{self, topics, Cause, Locked, Movement, Reference, Work};

/// Everything an operation needs to know about its request.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The caller's tenant.
    pub tenant: String,
    /// Who and why, for events and ledger.
    pub cause: Cause,
}

/// A state-changing operation.
#[derive(Debug, Clone)]
pub enum Command {
    /// `POST /variants`.
    CreateVariant(CreateVariant),
    /// `POST /variants/{id}/adjustments`.
    Adjust(Uuid, Adjustment),
    /// `POST /variants/{id}/discontinue`.
    Discontinue(Uuid),
    /// `POST /receipts`.
    CreateReceipt(CreateReceipt),
    /// `POST /receipts/{id}/validate`.
    ValidateReceipt(Uuid),
    /// `POST /reservations`.
    Reserve(CreateReservation),
    /// `POST /reservations/{id}/cancel`.
    Cancel(Uuid),
    /// `POST /reservations/{id}/ship`.
    Ship(Uuid),
}

/// The answer of an operation: status and JSON body (a problem document when status >= 400).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: Value,
}

fn ok(status: StatusCode, body: impl serde::Serialize) -> ApiResult<Outcome> {
    Ok(Outcome {
        status,
        body: serde_json::to_value(body).map_err(|e| ApiError::Internal(e.to_string()))?,
    })
}

/// Runs `cmd` in `conn`'s open transaction.
pub async fn execute(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ctx: &Ctx,
    cmd: Command,
) -> ApiResult<Outcome> {
    match cmd {
        Command::CreateVariant(c) => create_variant(conn, ctx, c).await,
        Command::Adjust(id, a) => adjust(conn, outbox, ctx, id, a).await,
        Command::Discontinue(id) => discontinue(conn, outbox, ctx, id).await,
        Command::CreateReceipt(c) => create_receipt(conn, ctx, c).await,
        Command::ValidateReceipt(id) => validate_receipt(conn, outbox, ctx, id).await,
        Command::Reserve(c) => reserve(conn, outbox, ctx, c).await,
        Command::Cancel(id) => close_reservation(conn, outbox, ctx, id, Close::Cancel).await,
        Command::Ship(id) => close_reservation(conn, outbox, ctx, id, Close::Ship).await,
    }
}

fn not_found(what: &str, id: Uuid) -> ApiError {
    ApiError::NotFound(format!("{what} {id} does not exist"))
}

async fn create_variant(
    conn: &mut PgConnection,
    ctx: &Ctx,
    c: CreateVariant,
) -> ApiResult<Outcome> {
    let id = c.product_variant_id.unwrap_or_else(Uuid::now_v7);
    if !stock::insert(conn, &ctx.tenant, id, c.low_stock_threshold).await? {
        return Err(ApiError::Conflict(format!(
            "variant {id} already exists; use PUT /variants/{id} to update it"
        )));
    }
    let v = stock::get(conn, &ctx.tenant, id)
        .await?
        .ok_or_else(|| ApiError::Internal("variant vanished after insert".into()))?;
    ok(StatusCode::CREATED, v.view())
}

/// `PUT /variants/{id}`: creates the variant (201) or updates its threshold (200); a status change
/// caused by the new threshold yields `StockStatusChangedEvent`.
pub async fn upsert_variant(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ctx: &Ctx,
    id: Uuid,
    u: UpsertVariant,
) -> ApiResult<Outcome> {
    if stock::insert(conn, &ctx.tenant, id, u.low_stock_threshold).await? {
        let v = stock::get(conn, &ctx.tenant, id)
            .await?
            .ok_or_else(|| ApiError::Internal("variant vanished after insert".into()))?;
        return ok(StatusCode::CREATED, v.view());
    }
    let mut locked = stock::lock(conn, &ctx.tenant, &[id]).await?;
    let v = locked
        .get_mut(&(ctx.tenant.clone(), id))
        .ok_or_else(|| not_found("variant", id))?;
    let mut work = Work::new(ctx.cause.clone());
    if v.low_stock_threshold != u.low_stock_threshold {
        let old = v.status();
        v.low_stock_threshold = u.low_stock_threshold;
        work.touch(v);
        work.status_changed(v, old);
    }
    let view = v.view();
    work.flush(conn, outbox, locked.values()).await?;
    ok(StatusCode::OK, view)
}

async fn adjust(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ctx: &Ctx,
    id: Uuid,
    a: Adjustment,
) -> ApiResult<Outcome> {
    let q = a.quantity;
    if q == 0 || q.abs() > MAX_QUANTITY {
        return Err(ApiError::Unprocessable(format!(
            "quantity is the signed change and must be non-zero and at most {MAX_QUANTITY} in size, got {q}"
        )));
    }
    let sign_ok = match a.change_type {
        ChangeType::Purchase | ChangeType::Return => q > 0,
        ChangeType::Sale => q < 0,
        ChangeType::Adjustment => true,
    };
    if !sign_ok {
        return Err(ApiError::Unprocessable(format!(
            "quantity {q} has the wrong sign for {}: PURCHASE and RETURN add stock (positive), SALE removes it (negative)",
            a.change_type.as_str()
        )));
    }
    if a.reason.as_deref().is_some_and(|r| r.chars().count() > 500) {
        return Err(ApiError::Unprocessable(
            "reason must be at most 500 characters".into(),
        ));
    }
    let mut locked = stock::lock(conn, &ctx.tenant, &[id]).await?;
    let v = locked
        .get_mut(&(ctx.tenant.clone(), id))
        .ok_or_else(|| not_found("variant", id))?;
    let mut work = Work::new(ctx.cause.clone());
    work.apply(
        v,
        &Movement::Quantity {
            change_type: a.change_type,
            dq: q,
            dr: 0,
        },
        a.reason,
        Reference {
            kind: "ADJUSTMENT",
            id: None,
        },
    )?;
    let view = v.view();
    work.flush(conn, outbox, locked.values()).await?;
    ok(StatusCode::OK, view)
}

async fn discontinue(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ctx: &Ctx,
    id: Uuid,
) -> ApiResult<Outcome> {
    let mut locked = stock::lock(conn, &ctx.tenant, &[id]).await?;
    let v = locked
        .get_mut(&(ctx.tenant.clone(), id))
        .ok_or_else(|| not_found("variant", id))?;
    let mut work = Work::new(ctx.cause.clone());
    // Discontinuing a discontinued variant is a no-op (no event), not an error.
    if !v.discontinued {
        let old = v.status();
        v.discontinued = true;
        work.touch(v);
        work.status_changed(v, old);
    }
    let view = v.view();
    work.flush(conn, outbox, locked.values()).await?;
    ok(StatusCode::OK, view)
}

fn check_line_quantity(i: usize, q: i64) -> ApiResult<()> {
    if q <= 0 || q > MAX_QUANTITY {
        return Err(ApiError::Unprocessable(format!(
            "lines[{i}].quantity must be between 1 and {MAX_QUANTITY}, got {q}"
        )));
    }
    Ok(())
}

fn check_line_count(n: usize) -> ApiResult<()> {
    if n == 0 || n > MAX_LINES {
        return Err(ApiError::Unprocessable(format!(
            "lines must hold 1 to {MAX_LINES} lines, got {n}"
        )));
    }
    Ok(())
}

async fn create_receipt(
    conn: &mut PgConnection,
    ctx: &Ctx,
    c: CreateReceipt,
) -> ApiResult<Outcome> {
    check_line_count(c.lines.len())?;
    for (i, l) in c.lines.iter().enumerate() {
        check_line_quantity(i, l.quantity)?;
    }
    if c.reference
        .as_deref()
        .is_some_and(|r| r.chars().count() > 200)
    {
        return Err(ApiError::Unprocessable(
            "reference must be at most 200 characters".into(),
        ));
    }
    let ids: Vec<Uuid> = c.lines.iter().map(|l| l.product_variant_id).collect();
    let known: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM inv_variant WHERE tenant_id = $1 AND id = ANY($2)")
            .bind(&ctx.tenant)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
    let known: HashSet<Uuid> = known.into_iter().collect();
    if let Some((i, l)) = c
        .lines
        .iter()
        .enumerate()
        .find(|(_, l)| !known.contains(&l.product_variant_id))
    {
        return Err(ApiError::Unprocessable(format!(
            "lines[{i}].productVariantId {} does not exist",
            l.product_variant_id
        )));
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO inv_receipt (tenant_id, id, reference, status, created_by) VALUES ($1, $2, $3, 'DRAFT', $4)",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .bind(&c.reference)
    .bind(&ctx.cause.actor)
    .execute(&mut *conn)
    .await?;
    let wh: Vec<Uuid> = c.lines.iter().map(|l| l.warehouse_id).collect();
    let qs: Vec<i64> = c.lines.iter().map(|l| l.quantity).collect();
    sqlx::query(
        "INSERT INTO inv_receipt_line (tenant_id, receipt_id, line_no, warehouse_id, variant_id, quantity)
         SELECT $1, $2, u.ord::int, u.w, u.v, u.q
         FROM unnest($3::uuid[], $4::uuid[], $5::int8[]) WITH ORDINALITY AS u(w, v, q, ord)",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .bind(&wh)
    .bind(&ids)
    .bind(&qs)
    .execute(&mut *conn)
    .await?;
    let view = get_receipt(conn, &ctx.tenant, id)
        .await?
        .ok_or_else(|| ApiError::Internal("receipt vanished after insert".into()))?;
    ok(StatusCode::CREATED, view)
}

/// Reads a receipt with its lines.
pub async fn get_receipt(
    conn: &mut PgConnection,
    tenant: &str,
    id: Uuid,
) -> ApiResult<Option<ReceiptView>> {
    type R = (Option<String>, String, DateTime<Utc>, Option<DateTime<Utc>>);
    let r: Option<R> = sqlx::query_as(
        "SELECT reference, status, created_at, validated_at FROM inv_receipt WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((reference, status, created_at, validated_at)) = r else {
        return Ok(None);
    };
    let lines: Vec<(Uuid, Uuid, i64)> = sqlx::query_as(
        "SELECT warehouse_id, variant_id, quantity FROM inv_receipt_line
         WHERE tenant_id = $1 AND receipt_id = $2 ORDER BY line_no",
    )
    .bind(tenant)
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(ReceiptView {
        id,
        reference,
        status,
        lines: lines
            .into_iter()
            .map(|(w, v, q)| ReceiptLine {
                warehouse_id: w,
                product_variant_id: v,
                quantity: q,
            })
            .collect(),
        created_at,
        validated_at,
    }))
}

/// Validating a receipt twice answers 409 and adds nothing: the receipt row is locked first, so
/// of two concurrent validations exactly one sees `DRAFT`.
async fn validate_receipt(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ctx: &Ctx,
    id: Uuid,
) -> ApiResult<Outcome> {
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM inv_receipt WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    match status.as_deref() {
        None => return Err(not_found("receipt", id)),
        Some("DRAFT") => {}
        Some(_) => {
            return Err(ApiError::Conflict(format!(
                "receipt {id} is already validated; its stock was added once"
            )))
        }
    }
    let view = get_receipt(conn, &ctx.tenant, id)
        .await?
        .ok_or_else(|| not_found("receipt", id))?;
    let ids: Vec<Uuid> = view.lines.iter().map(|l| l.product_variant_id).collect();
    let mut locked = stock::lock(conn, &ctx.tenant, &ids).await?;
    let mut work = Work::new(ctx.cause.clone());
    for l in &view.lines {
        let v = locked
            .get_mut(&(ctx.tenant.clone(), l.product_variant_id))
            .ok_or_else(|| not_found("variant", l.product_variant_id))?;
        work.apply(
            v,
            &Movement::Quantity {
                change_type: ChangeType::Purchase,
                dq: l.quantity,
                dr: 0,
            },
            None,
            Reference {
                kind: "RECEIPT",
                id: Some(id),
            },
        )?;
    }
    sqlx::query(
        "UPDATE inv_receipt SET status = 'VALIDATED', validated_by = $3, validated_at = now()
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .bind(&ctx.cause.actor)
    .execute(&mut *conn)
    .await?;
    work.flush(conn, outbox, locked.values()).await?;
    let view = get_receipt(conn, &ctx.tenant, id)
        .await?
        .ok_or_else(|| not_found("receipt", id))?;
    ok(StatusCode::OK, view)
}

/// All lines or none. Variants are locked in id order, so concurrent reservations serialise per
/// variant and `available` is checked against committed figures: no over-reservation.
/// On failure nothing is reserved, but one `InventoryReservationFailedEvent` per failing line is
/// committed and the answer is 409 with the failures.
async fn reserve(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ctx: &Ctx,
    c: CreateReservation,
) -> ApiResult<Outcome> {
    check_line_count(c.lines.len())?;
    let mut seen = HashSet::new();
    for (i, l) in c.lines.iter().enumerate() {
        check_line_quantity(i, l.quantity)?;
        if !seen.insert(l.product_variant_id) {
            return Err(ApiError::Unprocessable(format!(
                "lines[{i}].productVariantId {} appears twice; put its whole quantity on one line",
                l.product_variant_id
            )));
        }
    }
    let ttl = c.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ApiError::Unprocessable(format!(
            "ttlSeconds must be between 1 and {MAX_TTL_SECS}, got {ttl}"
        )));
    }
    let ids: Vec<Uuid> = c.lines.iter().map(|l| l.product_variant_id).collect();
    let mut locked = stock::lock(conn, &ctx.tenant, &ids).await?;
    let mut failures = Vec::new();
    for l in &c.lines {
        let (reason, available) = match locked.get(&(ctx.tenant.clone(), l.product_variant_id)) {
            None => ("PRODUCT_NOT_FOUND", 0),
            Some(v) if v.discontinued => ("PRODUCT_DISCONTINUED", v.available()),
            Some(v) if v.available() < l.quantity => ("INSUFFICIENT_STOCK", v.available()),
            Some(_) => continue,
        };
        failures.push(LineFailure {
            product_variant_id: l.product_variant_id,
            quantity_attempted: l.quantity,
            available,
            reason: reason.into(),
        });
    }
    let mut work = Work::new(ctx.cause.clone());
    if !failures.is_empty() {
        for f in &failures {
            let mut data = json!({
                "quantityAttempted": f.quantity_attempted,
                "reasonForFailure": f.reason,
                "orderId": c.order_id,
            });
            if let Some(u) = &ctx.cause.user_id {
                data["userId"] = json!(u);
            }
            work.event(
                &ctx.tenant,
                f.product_variant_id,
                topics::RESERVATION_FAILED,
                data,
            );
        }
        // Only the failure events are written: the locked rows are unchanged.
        work.flush(conn, outbox, std::iter::empty()).await?;
        let mut body = problem(
            StatusCode::CONFLICT,
            &format!(
                "reservation for order {} failed: {} of {} lines cannot be reserved; nothing was reserved",
                c.order_id,
                failures.len(),
                c.lines.len()
            ),
        );
        body["orderId"] = json!(c.order_id);
        body["failures"] = serde_json::to_value(&failures).unwrap_or_default();
        return Ok(Outcome {
            status: StatusCode::CONFLICT,
            body,
        });
    }
    let id = Uuid::now_v7();
    let expires_at = Utc::now() + Duration::seconds(ttl);
    sqlx::query(
        "INSERT INTO inv_reservation (tenant_id, id, order_id, status, expires_at, created_by)
         VALUES ($1, $2, $3, 'ACTIVE', $4, $5)",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .bind(c.order_id)
    .bind(expires_at)
    .bind(&ctx.cause.actor)
    .execute(&mut *conn)
    .await?;
    let qs: Vec<i64> = c.lines.iter().map(|l| l.quantity).collect();
    sqlx::query(
        "INSERT INTO inv_reservation_line (tenant_id, reservation_id, line_no, variant_id, quantity)
         SELECT $1, $2, u.ord::int, u.v, u.q FROM unnest($3::uuid[], $4::int8[]) WITH ORDINALITY AS u(v, q, ord)",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .bind(&ids)
    .bind(&qs)
    .execute(&mut *conn)
    .await?;
    for l in &c.lines {
        let v = locked
            .get_mut(&(ctx.tenant.clone(), l.product_variant_id))
            .ok_or_else(|| not_found("variant", l.product_variant_id))?;
        work.apply(
            v,
            &Movement::Reserve {
                qty: l.quantity,
                order_id: c.order_id,
                reservation_id: id,
            },
            None,
            Reference {
                kind: "RESERVATION",
                id: Some(id),
            },
        )?;
    }
    work.flush(conn, outbox, locked.values()).await?;
    let view = get_reservation(conn, &ctx.tenant, id)
        .await?
        .ok_or_else(|| ApiError::Internal("reservation vanished after insert".into()))?;
    ok(StatusCode::CREATED, view)
}

/// Reads a reservation with its lines.
pub async fn get_reservation(
    conn: &mut PgConnection,
    tenant: &str,
    id: Uuid,
) -> ApiResult<Option<ReservationView>> {
    type R = (
        Uuid,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
    );
    let r: Option<R> = sqlx::query_as(
        "SELECT order_id, status, expires_at, created_at, closed_at FROM inv_reservation
         WHERE tenant_id = $1 AND id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((order_id, status, expires_at, created_at, closed_at)) = r else {
        return Ok(None);
    };
    let lines = reservation_lines(conn, tenant, id).await?;
    Ok(Some(ReservationView {
        id,
        order_id,
        status,
        lines,
        expires_at,
        created_at,
        closed_at,
    }))
}

async fn reservation_lines(
    conn: &mut PgConnection,
    tenant: &str,
    id: Uuid,
) -> ApiResult<Vec<ReservationLine>> {
    let lines: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT variant_id, quantity FROM inv_reservation_line
         WHERE tenant_id = $1 AND reservation_id = $2 ORDER BY line_no",
    )
    .bind(tenant)
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(lines
        .into_iter()
        .map(|(v, q)| ReservationLine {
            product_variant_id: v,
            quantity: q,
        })
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Close {
    Cancel,
    Ship,
}

/// Cancels (releases, `ORDER_CANCELLED`) or ships (reserved stock leaves: `SALE`) an active
/// reservation. The reservation row is locked before its variants, like the expiry sweep does.
async fn close_reservation(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ctx: &Ctx,
    id: Uuid,
    how: Close,
) -> ApiResult<Outcome> {
    let r: Option<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT order_id, status, expires_at FROM inv_reservation
         WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let (order_id, status, expires_at) = r.ok_or_else(|| not_found("reservation", id))?;
    if status != "ACTIVE" {
        return Err(ApiError::Conflict(format!(
            "reservation {id} is {status}, not ACTIVE"
        )));
    }
    if how == Close::Ship && expires_at <= Utc::now() {
        return Err(ApiError::Conflict(format!(
            "reservation {id} expired at {expires_at}; its stock is being released"
        )));
    }
    let lines = reservation_lines(conn, &ctx.tenant, id).await?;
    let ids: Vec<Uuid> = lines.iter().map(|l| l.product_variant_id).collect();
    let mut locked = stock::lock(conn, &ctx.tenant, &ids).await?;
    let mut work = Work::new(ctx.cause.clone());
    for l in &lines {
        let v = locked
            .get_mut(&(ctx.tenant.clone(), l.product_variant_id))
            .ok_or_else(|| not_found("variant", l.product_variant_id))?;
        let m = match how {
            Close::Cancel => Movement::Release {
                qty: l.quantity,
                order_id,
                reservation_id: id,
                reason: "ORDER_CANCELLED",
            },
            Close::Ship => Movement::Quantity {
                change_type: ChangeType::Sale,
                dq: -l.quantity,
                dr: -l.quantity,
            },
        };
        work.apply(
            v,
            &m,
            None,
            Reference {
                kind: "RESERVATION",
                id: Some(id),
            },
        )?;
    }
    let new_status = match how {
        Close::Cancel => "RELEASED",
        Close::Ship => "SHIPPED",
    };
    sqlx::query(
        "UPDATE inv_reservation SET status = $3, closed_at = now() WHERE tenant_id = $1 AND id = $2",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .bind(new_status)
    .execute(&mut *conn)
    .await?;
    work.flush(conn, outbox, locked.values()).await?;
    let view = get_reservation(conn, &ctx.tenant, id)
        .await?
        .ok_or_else(|| not_found("reservation", id))?;
    ok(StatusCode::OK, view)
}

/// Releases up to `batch` expired reservations (of any tenant) in one transaction, with
/// `RESERVATION_EXPIRED`; returns how many. `SKIP LOCKED` lets several service instances sweep
/// at once, and never waits for a reservation a request is cancelling or shipping.
pub async fn sweep_expired(
    conn: &mut PgConnection,
    outbox: &Outbox,
    batch: i64,
    correlation_id: &str,
) -> ApiResult<usize> {
    let due: Vec<(String, Uuid, Uuid)> = sqlx::query_as(
        "SELECT tenant_id, id, order_id FROM inv_reservation
         WHERE status = 'ACTIVE' AND expires_at <= now()
         ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(batch)
    .fetch_all(&mut *conn)
    .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let tenants: Vec<&str> = due.iter().map(|d| d.0.as_str()).collect();
    let rids: Vec<Uuid> = due.iter().map(|d| d.1).collect();
    let lines: Vec<(String, Uuid, Uuid, i64)> = sqlx::query_as(
        "SELECT l.tenant_id, l.reservation_id, l.variant_id, l.quantity
         FROM inv_reservation_line l
         JOIN unnest($1::text[], $2::uuid[]) AS u(t, r) ON l.tenant_id = u.t AND l.reservation_id = u.r
         ORDER BY l.tenant_id, l.reservation_id, l.line_no",
    )
    .bind(&tenants)
    .bind(&rids)
    .fetch_all(&mut *conn)
    .await?;
    let keys: Vec<(String, Uuid)> = lines.iter().map(|l| (l.0.clone(), l.2)).collect();
    // All variants of the batch in one sorted pass: the same global lock order as requests.
    let mut locked: Locked = stock::lock_keys(conn, &keys).await?;
    let mut work = Work::new(Cause {
        actor: "system:expiry".into(),
        user_id: None,
        correlation_id: correlation_id.to_string(),
        traceparent: None,
    });
    for (tenant, rid, order_id) in &due {
        for l in lines.iter().filter(|l| &l.0 == tenant && &l.1 == rid) {
            let v = locked
                .get_mut(&(tenant.clone(), l.2))
                .ok_or_else(|| ApiError::Internal(format!("variant {} vanished", l.2)))?;
            work.apply(
                v,
                &Movement::Release {
                    qty: l.3,
                    order_id: *order_id,
                    reservation_id: *rid,
                    reason: "RESERVATION_EXPIRED",
                },
                None,
                Reference {
                    kind: "RESERVATION",
                    id: Some(*rid),
                },
            )?;
        }
    }
    sqlx::query(
        "UPDATE inv_reservation r SET status = 'EXPIRED', closed_at = now()
         FROM unnest($1::text[], $2::uuid[]) AS u(t, id) WHERE r.tenant_id = u.t AND r.id = u.id",
    )
    .bind(&tenants)
    .bind(&rids)
    .execute(&mut *conn)
    .await?;
    work.flush(conn, outbox, locked.values()).await?;
    Ok(due.len())
}

/// Lists a variant's ledger in ascending order, after the entry `after`.
pub async fn ledger(
    conn: &mut PgConnection,
    tenant: &str,
    variant: Uuid,
    after: i64,
    limit: i64,
) -> ApiResult<Vec<LedgerEntry>> {
    type R = (
        i64,
        DateTime<Utc>,
        String,
        String,
        Option<String>,
        i64,
        i64,
        i64,
        i64,
        String,
        Option<String>,
        Option<Uuid>,
    );
    let rows: Vec<R> = sqlx::query_as(
        "SELECT id, at, actor, movement, reason, quantity_before, quantity_after, reserved_before,
                reserved_after, correlation_id, reference_type, reference_id
         FROM inv_ledger WHERE tenant_id = $1 AND variant_id = $2 AND id > $3 ORDER BY id LIMIT $4",
    )
    .bind(tenant)
    .bind(variant)
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| LedgerEntry {
            id: r.0,
            at: r.1,
            actor: r.2,
            movement: r.3,
            reason: r.4,
            quantity_before: r.5,
            quantity_after: r.6,
            reserved_before: r.7,
            reserved_after: r.8,
            correlation_id: r.9,
            reference_type: r.10,
            reference_id: r.11,
        })
        .collect())
}
