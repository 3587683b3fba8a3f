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
use crate::stock::{self, topics, Cause, Extra, Locked, Movement, Reference, Work};

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
    let wh: Vec<Uuid> = c.lines.iter().map(|l| l.warehouse_id).collect();
    let qs: Vec<i64> = c.lines.iter().map(|l| l.quantity).collect();
    // The receipt and its lines in one statement; the answer is what was written.
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "WITH receipt_inserted AS (
           INSERT INTO inv_receipt (tenant_id, id, reference, status, created_by)
           VALUES ($1, $2, $3, 'DRAFT', $4) RETURNING 1),
         lines_inserted AS (
           INSERT INTO inv_receipt_line (tenant_id, receipt_id, line_no, warehouse_id, variant_id, quantity)
           SELECT $1, $2, u.ord::int, u.w, u.v, u.q
           FROM unnest($5::uuid[], $6::uuid[], $7::int8[]) WITH ORDINALITY AS u(w, v, q, ord)
           RETURNING 1)
         SELECT now()",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .bind(&c.reference)
    .bind(&ctx.cause.actor)
    .bind(&wh)
    .bind(&ids)
    .bind(&qs)
    .fetch_one(&mut *conn)
    .await?;
    let view = ReceiptView {
        id,
        reference: c.reference,
        status: "DRAFT".into(),
        lines: c.lines,
        created_at,
        validated_at: None,
    };
    ok(StatusCode::CREATED, view)
}

/// Reads a receipt with its lines.
pub async fn get_receipt(
    conn: &mut PgConnection,
    tenant: &str,
    id: Uuid,
) -> ApiResult<Option<ReceiptView>> {
    read_receipt(conn, tenant, id, false).await
}

/// A receipt with its lines in one statement, the receipt row locked (`FOR UPDATE`) if `lock`.
async fn read_receipt(
    conn: &mut PgConnection,
    tenant: &str,
    id: Uuid,
    lock: bool,
) -> ApiResult<Option<ReceiptView>> {
    type R = (
        Option<String>,
        String,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        Vec<Uuid>,
        Vec<Uuid>,
        Vec<i64>,
    );
    let lines = |col: &str| {
        format!(
            "ARRAY(SELECT l.{col} FROM inv_receipt_line l
                   WHERE l.tenant_id = r.tenant_id AND l.receipt_id = r.id ORDER BY l.line_no)"
        )
    };
    let r: Option<R> = sqlx::query_as(&format!(
        "SELECT r.reference, r.status, r.created_at, r.validated_at, {}, {}, {}
         FROM inv_receipt r WHERE r.tenant_id = $1 AND r.id = $2 {}",
        lines("warehouse_id"),
        lines("variant_id"),
        lines("quantity"),
        if lock { "FOR UPDATE OF r" } else { "" }
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((reference, status, created_at, validated_at, w, v, q)) = r else {
        return Ok(None);
    };
    Ok(Some(ReceiptView {
        id,
        reference,
        status,
        lines: w
            .into_iter()
            .zip(v)
            .zip(q)
            .map(|((w, v), q)| ReceiptLine {
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
    let mut view = read_receipt(conn, &ctx.tenant, id, true)
        .await?
        .ok_or_else(|| not_found("receipt", id))?;
    if view.status != "DRAFT" {
        return Err(ApiError::Conflict(format!(
            "receipt {id} is already validated; its stock was added once"
        )));
    }
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
            },
            None,
            Reference {
                kind: "RECEIPT",
                id: Some(id),
            },
        )?;
    }
    let p = stock::EXTRA_FIRST_PARAM;
    let extra = Extra::new(
        format!(
            "receipt_validated AS (
               UPDATE inv_receipt SET status = 'VALIDATED', validated_by = ${a}, validated_at = now()
               WHERE tenant_id = ${t} AND id = ${r}
               RETURNING 1)",
            t = p,
            r = p + 1,
            a = p + 2,
        ),
        {
            let (tenant, actor) = (ctx.tenant.clone(), ctx.cause.actor.clone());
            move |q| q.bind(tenant).bind(id).bind(actor)
        },
    );
    let now = work
        .flush_with(conn, outbox, locked.values(), extra)
        .await?;
    view.status = "VALIDATED".into();
    view.validated_at = Some(now);
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
            None => (PRODUCT_NOT_FOUND, 0),
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
            if f.reason == PRODUCT_NOT_FOUND {
                // Not keyed to a variant we do not have (see stock::TENANT_AGGREGATE).
                work.unknown_variant_event(
                    &ctx.tenant,
                    f.product_variant_id,
                    topics::RESERVATION_FAILED,
                    data,
                );
            } else {
                work.event(
                    &ctx.tenant,
                    f.product_variant_id,
                    topics::RESERVATION_FAILED,
                    data,
                );
            }
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
    // The reservation and its lines go in the statement that writes the stock, the ledger and
    // the events: lock, write, commit are the transaction's only round trips.
    let p = stock::EXTRA_FIRST_PARAM;
    let extra = Extra::new(
        format!(
            "reservation_inserted AS (
               INSERT INTO inv_reservation (tenant_id, id, order_id, status, expires_at, created_by)
               VALUES (${t}, ${r}, ${o}, 'ACTIVE', now() + ${ttl}::int8 * interval '1 second', ${a})
               RETURNING 1),
             lines_inserted AS (
               INSERT INTO inv_reservation_line (tenant_id, reservation_id, line_no, variant_id, quantity)
               SELECT ${t}, ${r}, u.ord::int, u.v, u.q
               FROM unnest(${v}::uuid[], ${q}::int8[]) WITH ORDINALITY AS u(v, q, ord)
               RETURNING 1)",
            t = p,
            r = p + 1,
            o = p + 2,
            ttl = p + 3,
            a = p + 4,
            v = p + 5,
            q = p + 6,
        ),
        {
            let (tenant, order, actor) = (ctx.tenant.clone(), c.order_id, ctx.cause.actor.clone());
            let qs: Vec<i64> = c.lines.iter().map(|l| l.quantity).collect();
            move |query| {
                query
                    .bind(tenant)
                    .bind(id)
                    .bind(order)
                    .bind(ttl)
                    .bind(actor)
                    .bind(ids)
                    .bind(qs)
            }
        },
    );
    let created_at = work
        .flush_with(conn, outbox, locked.values(), extra)
        .await?;
    // The answer is what was written, not read back: `created_at` is the transaction's `now()`,
    // which is also what the row's `DEFAULT now()` and `expires_at` were computed from.
    let view = ReservationView {
        id,
        order_id: c.order_id,
        status: "ACTIVE".into(),
        lines: c
            .lines
            .iter()
            .map(|l| ReservationLine {
                product_variant_id: l.product_variant_id,
                quantity: l.quantity,
            })
            .collect(),
        expires_at: created_at + Duration::seconds(ttl),
        created_at,
        closed_at: None,
    };
    ok(StatusCode::CREATED, view)
}

/// Reads a reservation with its lines, in one statement.
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
        Vec<Uuid>,
        Vec<i64>,
    );
    let r: Option<R> = sqlx::query_as(
        "SELECT r.order_id, r.status, r.expires_at, r.created_at, r.closed_at,
                ARRAY(SELECT l.variant_id FROM inv_reservation_line l
                      WHERE l.tenant_id = r.tenant_id AND l.reservation_id = r.id ORDER BY l.line_no),
                ARRAY(SELECT l.quantity FROM inv_reservation_line l
                      WHERE l.tenant_id = r.tenant_id AND l.reservation_id = r.id ORDER BY l.line_no)
         FROM inv_reservation r WHERE r.tenant_id = $1 AND r.id = $2",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((order_id, status, expires_at, created_at, closed_at, v, q)) = r else {
        return Ok(None);
    };
    Ok(Some(ReservationView {
        id,
        order_id,
        status,
        lines: reservation_lines(v, q),
        expires_at,
        created_at,
        closed_at,
    }))
}

fn reservation_lines(variants: Vec<Uuid>, quantities: Vec<i64>) -> Vec<ReservationLine> {
    variants
        .into_iter()
        .zip(quantities)
        .map(|(v, q)| ReservationLine {
            product_variant_id: v,
            quantity: q,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Close {
    Cancel,
    Ship,
}

/// Cancels (releases, `ORDER_CANCELLED`) or ships (released as `ORDER_COMPLETED_ADJUSTMENT`,
/// then the stock leaves: `SALE`) an active reservation. The reservation row is locked before its variants, like the expiry sweep does.
async fn close_reservation(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ctx: &Ctx,
    id: Uuid,
    how: Close,
) -> ApiResult<Outcome> {
    // The reservation row and its lines in one statement: the row is locked before the
    // variants, like the expiry sweep does.
    type R = (
        Uuid,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
        Vec<Uuid>,
        Vec<i64>,
    );
    let r: Option<R> = sqlx::query_as(
        "SELECT r.order_id, r.status, r.expires_at, r.created_at,
                ARRAY(SELECT l.variant_id FROM inv_reservation_line l
                      WHERE l.tenant_id = r.tenant_id AND l.reservation_id = r.id ORDER BY l.line_no),
                ARRAY(SELECT l.quantity FROM inv_reservation_line l
                      WHERE l.tenant_id = r.tenant_id AND l.reservation_id = r.id ORDER BY l.line_no)
         FROM inv_reservation r
         WHERE r.tenant_id = $1 AND r.id = $2 FOR UPDATE OF r",
    )
    .bind(&ctx.tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let (order_id, status, expires_at, created_at, variant_ids, quantities) =
        r.ok_or_else(|| not_found("reservation", id))?;
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
    let mut locked = stock::lock(conn, &ctx.tenant, &variant_ids).await?;
    let lines = reservation_lines(variant_ids, quantities);
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
            Close::Ship => Movement::Ship {
                qty: l.quantity,
                order_id,
                reservation_id: id,
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
    let p = stock::EXTRA_FIRST_PARAM;
    let extra = Extra::new(
        format!(
            "reservation_closed AS (
               UPDATE inv_reservation SET status = ${s}, closed_at = now()
               WHERE tenant_id = ${t} AND id = ${r}
               RETURNING 1)",
            t = p,
            r = p + 1,
            s = p + 2,
        ),
        {
            let tenant = ctx.tenant.clone();
            move |q| q.bind(tenant).bind(id).bind(new_status)
        },
    );
    let closed_at = work
        .flush_with(conn, outbox, locked.values(), extra)
        .await?;
    let view = ReservationView {
        id,
        order_id,
        status: new_status.into(),
        lines,
        expires_at,
        created_at,
        closed_at: Some(closed_at),
    };
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
    let p = stock::EXTRA_FIRST_PARAM;
    let extra = Extra::new(
        format!(
            "reservations_expired AS (
               UPDATE inv_reservation r SET status = 'EXPIRED', closed_at = now()
               FROM unnest(${t}::text[], ${r}::uuid[]) AS u(t, id) WHERE r.tenant_id = u.t AND r.id = u.id
               RETURNING 1)",
            t = p,
            r = p + 1,
        ),
        {
            let tenants: Vec<String> = tenants.iter().map(|t| t.to_string()).collect();
            move |q| q.bind(tenants).bind(rids)
        },
    );
    work.flush_with(conn, outbox, locked.values(), extra)
        .await?;
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
