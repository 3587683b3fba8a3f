//! The stock engine: locked variant rows, movements applied to them, and the events and ledger
//! entries each movement yields, written together in the caller's transaction.
//!
//! Every change follows the same steps: lock the variant rows it touches (`FOR NO KEY UPDATE`, sorted by
//! tenant and id, so that two transactions touching the same variants always wait in the same
//! order and cannot deadlock), apply the movements in memory (each checked: no negative stock, no
//! over-reservation, no absurd quantity), then [`Work::flush`] writes the rows, the ledger, the
//! command's own rows ([`Extra`]) and the events in one statement of the same transaction. Because a variant's row lock is held from the read to the
//! commit, the `oldQuantity` of one `StockLevelChangedEvent` is the `newQuantity` of the previous
//! one, and the outbox delivers them in that (commit) order.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use outbox::{NewEvent, Outbox, PreparedEvents};
use serde_json::{json, Map, Value};
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::model::{ChangeType, StockStatus, VariantView, MAX_QUANTITY};

/// Aggregate type of every event about a variant the tenant has: the product variant.
pub const AGGREGATE: &str = "ProductVariant";

/// Aggregate type of the events about a variant the tenant does **not** have (an
/// `InventoryReservationFailedEvent` with `PRODUCT_NOT_FOUND`); the aggregate id is the tenant.
///
/// Why not the variant: the id is the caller's, not a variant of ours, and every consumer keeps
/// one position row per aggregate for good, so keying these events to the named id would let any
/// authenticated client grow every consumer's tables (and the outbox's `outbox_aggregate`) by one
/// row per invented id, and would show a consumer a variant that does not exist. Keyed to the
/// tenant, they cost one row per tenant; their order relative to one another is kept, and they
/// have no order to keep with any variant's events (there is no such variant).
pub const TENANT_AGGREGATE: &str = "Tenant";

/// The six event types of the seed, with their routing keys (seed section 4).
pub mod topics {
    /// `StockLevelChangedEvent`.
    pub const STOCK_CHANGED: (&str, &str) = ("StockLevelChangedEvent", "inventory.stock.changed");
    /// `StockStatusChangedEvent`.
    pub const STATUS_CHANGED: (&str, &str) =
        ("StockStatusChangedEvent", "inventory.stock.status.changed");
    /// `InventoryReservedEvent`.
    pub const RESERVED: (&str, &str) = ("InventoryReservedEvent", "inventory.reservation.created");
    /// `InventoryReservationFailedEvent`.
    pub const RESERVATION_FAILED: (&str, &str) = (
        "InventoryReservationFailedEvent",
        "inventory.reservation.failed",
    );
    /// `InventoryReleasedEvent`.
    pub const RELEASED: (&str, &str) = ("InventoryReleasedEvent", "inventory.reservation.released");
    /// `LowStockThresholdReachedEvent`.
    pub const LOW_STOCK: (&str, &str) = (
        "LowStockThresholdReachedEvent",
        "inventory.stock.low_threshold_reached",
    );
}

/// Who and what caused a change: put into every event and ledger entry it yields.
#[derive(Debug, Clone)]
pub struct Cause {
    /// Ledger actor: the token's `sub`, or `system:...` for the service's own tasks.
    pub actor: String,
    /// `userId` of events (`null` for the service's own tasks).
    pub user_id: Option<String>,
    /// Correlation id of the request or process.
    pub correlation_id: String,
    /// W3C trace context of the request, when it had a valid one.
    pub traceparent: Option<String>,
}

/// A variant row, locked by the current transaction.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Tenant.
    pub tenant_id: String,
    /// Id.
    pub id: Uuid,
    /// Physical quantity.
    pub quantity: i64,
    /// Reserved part of the quantity.
    pub reserved: i64,
    /// Low-stock threshold.
    pub low_stock_threshold: i64,
    /// Whether the variant is discontinued.
    pub discontinued: bool,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    dirty: bool,
}

impl Variant {
    /// `quantity - reserved`.
    pub fn available(&self) -> i64 {
        self.quantity - self.reserved
    }

    /// The derived status.
    pub fn status(&self) -> StockStatus {
        StockStatus::derive(
            self.available(),
            self.low_stock_threshold,
            self.discontinued,
        )
    }

    /// The API view.
    pub fn view(&self) -> VariantView {
        VariantView {
            product_variant_id: self.id,
            quantity: self.quantity,
            reserved: self.reserved,
            available: self.available(),
            low_stock_threshold: self.low_stock_threshold,
            status: self.status(),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

type Row = (
    String,
    Uuid,
    i64,
    i64,
    i64,
    bool,
    DateTime<Utc>,
    DateTime<Utc>,
);

const COLUMNS: &str =
    "tenant_id, id, quantity, reserved, low_stock_threshold, discontinued, created_at, updated_at";

fn from_row(r: Row) -> Variant {
    Variant {
        tenant_id: r.0,
        id: r.1,
        quantity: r.2,
        reserved: r.3,
        low_stock_threshold: r.4,
        discontinued: r.5,
        created_at: r.6,
        updated_at: r.7,
        dirty: false,
    }
}

/// Locked variants, keyed by (tenant, id).
pub type Locked = BTreeMap<(String, Uuid), Variant>;

/// Reads one variant without locking it.
pub async fn get(conn: &mut PgConnection, tenant: &str, id: Uuid) -> ApiResult<Option<Variant>> {
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM inv_variant WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(from_row))
}

/// Locks the variants `ids` of `tenant` that exist, in id order.
pub async fn lock(conn: &mut PgConnection, tenant: &str, ids: &[Uuid]) -> ApiResult<Locked> {
    let keys: Vec<(String, Uuid)> = ids.iter().map(|id| (tenant.to_string(), *id)).collect();
    lock_keys(conn, &keys).await
}

/// Locks the variants named by (tenant, id) that exist, in (tenant, id) order: the one lock order
/// every transaction of the service uses.
pub async fn lock_keys(conn: &mut PgConnection, keys: &[(String, Uuid)]) -> ApiResult<Locked> {
    if keys.is_empty() {
        return Ok(Locked::new());
    }
    let tenants: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let ids: Vec<Uuid> = keys.iter().map(|k| k.1).collect();
    // LockRows sits above the Sort in the plan, so rows are locked in ORDER BY order.
    // NO KEY UPDATE, not UPDATE: the key never changes, and this mode does not conflict with the
    // KEY SHARE locks that foreign-key checks (ledger, receipt and reservation lines) take in
    // their own order, which would otherwise deadlock against these sorted locks.
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM inv_variant
         WHERE (tenant_id, id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
         ORDER BY tenant_id, id FOR NO KEY UPDATE"
    ))
    .bind(&tenants)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let v = from_row(r);
            ((v.tenant_id.clone(), v.id), v)
        })
        .collect())
}

/// Inserts a new variant (quantity 0) unless it exists; returns whether it was created.
pub async fn insert(
    conn: &mut PgConnection,
    tenant: &str,
    id: Uuid,
    threshold: i64,
) -> ApiResult<bool> {
    check_threshold(threshold)?;
    let status = StockStatus::derive(0, threshold, false);
    let created = sqlx::query(
        "INSERT INTO inv_variant (tenant_id, id, low_stock_threshold, status)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(tenant)
    .bind(id)
    .bind(threshold)
    .bind(status.as_str())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(created == 1)
}

/// Checks a low-stock threshold.
pub fn check_threshold(t: i64) -> ApiResult<()> {
    if !(0..=MAX_QUANTITY).contains(&t) {
        return Err(ApiError::Unprocessable(format!(
            "lowStockThreshold must be between 0 and {MAX_QUANTITY}, got {t}"
        )));
    }
    Ok(())
}

/// A kind of ledger movement with what it needs.
#[derive(Debug, Clone)]
pub enum Movement {
    /// Change of the physical quantity alone (an adjustment, a receipt); a shipment, which also
    /// takes reserved stock, is [`Movement::Ship`].
    Quantity {
        /// Why.
        change_type: ChangeType,
        /// Signed change of `quantity`.
        dq: i64,
    },
    /// Stock set aside for an order.
    Reserve {
        /// Units.
        qty: i64,
        /// The order.
        order_id: Uuid,
        /// The reservation.
        reservation_id: Uuid,
    },
    /// A reservation's stock leaves: the reservation is released
    /// (`InventoryReleasedEvent`, `ORDER_COMPLETED_ADJUSTMENT`) and its units are sold
    /// (`StockLevelChangedEvent`, `SALE`), in that order, so that a consumer following the
    /// events sees `reserved` fall as well as `quantity`.
    Ship {
        /// Units.
        qty: i64,
        /// The order.
        order_id: Uuid,
        /// The reservation.
        reservation_id: Uuid,
    },
    /// Reserved stock given back.
    Release {
        /// Units.
        qty: i64,
        /// The order.
        order_id: Uuid,
        /// The reservation.
        reservation_id: Uuid,
        /// `ORDER_CANCELLED` or `RESERVATION_EXPIRED`.
        reason: &'static str,
    },
}

/// What a movement refers to, for the ledger.
#[derive(Debug, Clone, Copy)]
pub struct Reference {
    /// `RECEIPT`, `RESERVATION` or `ADJUSTMENT`.
    pub kind: &'static str,
    /// The receipt's or reservation's id (none for manual adjustments).
    pub id: Option<Uuid>,
}

struct LedgerRow {
    tenant_id: String,
    variant_id: Uuid,
    movement: &'static str,
    reason: Option<String>,
    q_before: i64,
    q_after: i64,
    r_before: i64,
    r_after: i64,
    reference: Reference,
}

/// The events and ledger entries of one transaction, written by [`Work::flush`].
pub struct Work {
    cause: Cause,
    timestamp: String,
    events: Vec<NewEvent>,
    ledger: Vec<LedgerRow>,
}

impl Work {
    /// An empty unit of work for `cause`.
    pub fn new(cause: Cause) -> Self {
        Self {
            cause,
            timestamp: Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            events: Vec::new(),
            ledger: Vec::new(),
        }
    }

    /// The cause of this work.
    pub fn cause(&self) -> &Cause {
        &self.cause
    }

    /// Number of events collected so far.
    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// Adds an event about variant `variant_id` of `tenant`; `timestamp` and `correlationId` are
    /// added to `data` here so that every payload carries them.
    pub fn event(&mut self, tenant: &str, variant_id: Uuid, kind: (&str, &str), data: Value) {
        self.event_keyed(
            tenant,
            (AGGREGATE, variant_id.to_string()),
            variant_id,
            kind,
            data,
        );
    }

    /// Adds an event about `variant_id`, which `tenant` does not have: keyed to the tenant's
    /// aggregate ([`TENANT_AGGREGATE`]), not to the variant; `data` still names the variant
    /// (`productVariantId`, as the seed asks).
    pub fn unknown_variant_event(
        &mut self,
        tenant: &str,
        variant_id: Uuid,
        kind: (&str, &str),
        data: Value,
    ) {
        self.event_keyed(
            tenant,
            (TENANT_AGGREGATE, tenant.to_string()),
            variant_id,
            kind,
            data,
        );
    }

    fn event_keyed(
        &mut self,
        tenant: &str,
        (aggregate_type, aggregate_id): (&str, String),
        variant_id: Uuid,
        kind: (&str, &str),
        data: Value,
    ) {
        let mut data: Map<String, Value> = match data {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        data.insert("productVariantId".into(), variant_id.to_string().into());
        data.insert("timestamp".into(), self.timestamp.clone().into());
        data.insert(
            "correlationId".into(),
            self.cause.correlation_id.clone().into(),
        );
        let mut e = NewEvent::new(
            tenant,
            aggregate_type,
            aggregate_id,
            kind.0,
            kind.1,
            Value::Object(data),
        )
        .correlation_id(self.cause.correlation_id.clone());
        if let Some(tp) = &self.cause.traceparent {
            e = e.traceparent(tp.clone());
        }
        self.events.push(e);
    }

    /// Adds `userId` to `data` when the cause has a user: the seed marks it optional, so the
    /// service's own tasks leave it out rather than send `null`.
    fn with_user(&self, mut data: Value) -> Value {
        if let (Some(u), Some(m)) = (&self.cause.user_id, data.as_object_mut()) {
            m.insert("userId".into(), u.clone().into());
        }
        data
    }

    /// Applies `m` to the locked variant `v`, recording the ledger entry and the events it yields:
    /// the movement's own event (`StockLevelChangedEvent`, `InventoryReservedEvent` or
    /// `InventoryReleasedEvent`), then what [`Work::status_changed`] records.
    /// Fails, changing nothing, when the movement would break an invariant.
    pub fn apply(
        &mut self,
        v: &mut Variant,
        m: &Movement,
        reason: Option<String>,
        reference: Reference,
    ) -> ApiResult<()> {
        let (dq, dr) = match m {
            Movement::Quantity { dq, .. } => (*dq, 0),
            Movement::Ship { qty, .. } => (-*qty, -*qty),
            Movement::Reserve { qty, .. } => (0, *qty),
            Movement::Release { qty, .. } => (0, -*qty),
        };
        let (q0, r0) = (v.quantity, v.reserved);
        let (q1, r1) = (q0 + dq, r0 + dr);
        if q1 > MAX_QUANTITY {
            return Err(ApiError::Unprocessable(format!(
                "variant {}: quantity would be {q1}, above the limit of {MAX_QUANTITY}",
                v.id
            )));
        }
        if q1 < 0 {
            return Err(ApiError::Conflict(format!(
                "variant {}: not enough stock: quantity is {q0}, the change is {dq}",
                v.id
            )));
        }
        if r1 < 0 || r1 > q1 {
            return Err(ApiError::Conflict(format!(
                "variant {}: {r0} of {q0} units are reserved; the change would leave {r1} reserved of {q1}",
                v.id
            )));
        }
        let old_status = v.status();
        v.quantity = q1;
        v.reserved = r1;
        v.updated_at = Utc::now();
        v.dirty = true;
        let tenant = v.tenant_id.clone();
        let movement = match m {
            Movement::Quantity { change_type, .. } => change_type.as_str(),
            Movement::Ship { .. } => ChangeType::Sale.as_str(),
            Movement::Reserve { .. } => "RESERVE",
            Movement::Release { .. } => "RELEASE",
        };
        let reason = match m {
            Movement::Release { reason, .. } => Some(reason.to_string()),
            _ => reason,
        };
        self.ledger.push(LedgerRow {
            tenant_id: tenant.clone(),
            variant_id: v.id,
            movement,
            reason,
            q_before: q0,
            q_after: q1,
            r_before: r0,
            r_after: r1,
            reference,
        });
        if let Movement::Ship {
            qty,
            order_id,
            reservation_id,
        } = m
        {
            // Available after the release alone: the units are still on hand at that point.
            let data = self.with_user(json!({
                "quantityReleased": qty,
                "availableQuantityAfterRelease": q0 - r1,
                "orderId": order_id,
                "reservationId": reservation_id,
                "reasonForRelease": "ORDER_COMPLETED_ADJUSTMENT",
            }));
            self.event(&tenant, v.id, topics::RELEASED, data);
        }
        if dq != 0 {
            self.event(
                &tenant,
                v.id,
                topics::STOCK_CHANGED,
                json!({
                    "newQuantity": q1,
                    "oldQuantity": q0,
                    "quantityChanged": dq,
                    "changeType": movement,
                }),
            );
        }
        match m {
            Movement::Reserve {
                qty,
                order_id,
                reservation_id,
            } => {
                let data = self.with_user(json!({
                    "quantityReserved": qty,
                    "availableQuantityAfterReservation": v.available(),
                    "orderId": order_id,
                    "reservationId": reservation_id,
                }));
                self.event(&tenant, v.id, topics::RESERVED, data);
            }
            Movement::Release {
                qty,
                order_id,
                reservation_id,
                reason,
            } => {
                let data = self.with_user(json!({
                    "quantityReleased": qty,
                    "availableQuantityAfterRelease": v.available(),
                    "orderId": order_id,
                    "reservationId": reservation_id,
                    "reasonForRelease": reason,
                }));
                self.event(&tenant, v.id, topics::RELEASED, data);
            }
            Movement::Quantity { .. } | Movement::Ship { .. } => {}
        }
        self.status_changed(v, old_status);
        Ok(())
    }

    /// Records `StockStatusChangedEvent` when `v`'s status differs from `old`, and with it
    /// `LowStockThresholdReachedEvent` when the change leaves `IN_STOCK` for `LOW_STOCK` or
    /// `OUT_OF_STOCK` under a threshold above 0.
    ///
    /// One rule for both events, whatever moved (stock, reservations or the threshold itself):
    /// both are computed from **available** stock and both report it as `currentQuantity`, so a
    /// consumer can check `newStatus` against `currentQuantity` and `lowStockThreshold`. A
    /// threshold of 0 means "no low-stock warning": selling out is `OUT_OF_STOCK`, not a
    /// threshold reached. Raising the threshold above available stock is a crossing like any
    /// other: a reordering consumer listening for the threshold hears about it.
    pub fn status_changed(&mut self, v: &mut Variant, old: StockStatus) {
        let new = v.status();
        if new == old {
            return;
        }
        v.dirty = true;
        let tenant = v.tenant_id.clone();
        self.event(
            &tenant,
            v.id,
            topics::STATUS_CHANGED,
            json!({
                "newStatus": new.as_str(),
                "oldStatus": old.as_str(),
                "currentQuantity": v.available(),
            }),
        );
        let t = v.low_stock_threshold;
        if old == StockStatus::InStock
            && matches!(new, StockStatus::LowStock | StockStatus::OutOfStock)
            && t > 0
        {
            self.event(
                &tenant,
                v.id,
                topics::LOW_STOCK,
                json!({
                    "currentQuantity": v.available(),
                    "lowStockThreshold": t,
                }),
            );
        }
    }

    /// Marks `v` as changed without a movement (threshold, discontinuation).
    pub fn touch(&mut self, v: &mut Variant) {
        v.dirty = true;
        v.updated_at = Utc::now();
    }

    /// Writes the changed variants, the ledger entries and the events in `conn`'s transaction, in
    /// one statement; returns the transaction's timestamp (`now()`, what `DEFAULT now()` columns
    /// of the same transaction hold).
    pub async fn flush<'a>(
        self,
        conn: &mut PgConnection,
        outbox: &Outbox,
        variants: impl IntoIterator<Item = &'a Variant>,
    ) -> ApiResult<DateTime<Utc>> {
        self.flush_with(conn, outbox, variants, Extra::none()).await
    }

    /// [`Work::flush`], with the command's own rows written by the same statement: `extra`'s
    /// common table expressions. One round trip for everything a command writes.
    pub async fn flush_with<'a>(
        self,
        conn: &mut PgConnection,
        outbox: &Outbox,
        variants: impl IntoIterator<Item = &'a Variant>,
        extra: Extra,
    ) -> ApiResult<DateTime<Utc>> {
        let dirty: Vec<&Variant> = variants.into_iter().filter(|v| v.dirty).collect();
        // One enqueue per transaction: the outbox takes its per-aggregate locks in one sorted
        // pass, after all variant locks (taken by `lock_keys` before this statement), so
        // producers cannot deadlock on them.
        let events = outbox.prepare(&self.events)?;
        let sql = format!(
            "WITH {FLUSH_CTES}, {events_cte}{sep}{extra_ctes} SELECT now(), {notify}",
            events_cte = events.insert_cte(FLUSH_PARAMS + 1),
            sep = if extra.ctes.is_empty() { "" } else { ", " },
            extra_ctes = extra.ctes,
            notify = events.notify_sql(),
        );
        let l = &self.ledger;
        let q = sqlx::query(&sql)
            .bind(
                dirty
                    .iter()
                    .map(|v| v.tenant_id.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(dirty.iter().map(|v| v.id).collect::<Vec<_>>())
            .bind(dirty.iter().map(|v| v.quantity).collect::<Vec<_>>())
            .bind(dirty.iter().map(|v| v.reserved).collect::<Vec<_>>())
            .bind(
                dirty
                    .iter()
                    .map(|v| v.low_stock_threshold)
                    .collect::<Vec<_>>(),
            )
            .bind(dirty.iter().map(|v| v.discontinued).collect::<Vec<_>>())
            .bind(
                dirty
                    .iter()
                    .map(|v| v.status().as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(l.iter().map(|e| e.tenant_id.clone()).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.variant_id).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.movement).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.reason.clone()).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.q_before).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.q_after).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.r_before).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.r_after).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.reference.kind).collect::<Vec<_>>())
            .bind(l.iter().map(|e| e.reference.id).collect::<Vec<_>>())
            .bind(self.cause.actor.clone())
            .bind(self.cause.correlation_id.clone());
        let q = (extra.bind)(events.bind(q));
        let now: DateTime<Utc> = q.fetch_one(&mut *conn).await?.try_get(0)?;
        Ok(now)
    }
}

/// Parameters `$1..$19` of [`FLUSH_CTES`]; the events' follow, then a command's [`Extra`].
const FLUSH_PARAMS: usize = 19;

/// The first parameter number of an [`Extra`]'s common table expressions.
pub const EXTRA_FIRST_PARAM: usize = FLUSH_PARAMS + PreparedEvents::PARAMS + 1;

/// The changed variants (`$1..$7`) and the ledger entries (`$8..$19`), as data-modifying common
/// table expressions: PostgreSQL runs them whether or not the statement reads them. Empty arrays
/// write nothing. The ledger keeps the order of its entries (its id is drawn row by row).
const FLUSH_CTES: &str = "
    variants_updated AS (
        UPDATE inv_variant v SET quantity = u.q, reserved = u.r, low_stock_threshold = u.t,
               discontinued = u.d, status = u.s, updated_at = now()
        FROM unnest($1::text[], $2::uuid[], $3::int8[], $4::int8[], $5::int8[], $6::bool[], $7::text[])
             AS u(tenant_id, id, q, r, t, d, s)
        WHERE v.tenant_id = u.tenant_id AND v.id = u.id
        RETURNING 1),
    ledger_inserted AS (
        INSERT INTO inv_ledger (tenant_id, variant_id, actor, movement, reason, quantity_before,
               quantity_after, reserved_before, reserved_after, correlation_id, reference_type, reference_id)
        SELECT u.tenant_id, u.variant_id, $18, u.movement, u.reason, u.qb, u.qa, u.rb, u.ra, $19, u.rk, u.rid
        FROM unnest($8::text[], $9::uuid[], $10::text[], $11::text[], $12::int8[], $13::int8[], $14::int8[],
                    $15::int8[], $16::text[], $17::uuid[])
             WITH ORDINALITY AS u(tenant_id, variant_id, movement, reason, qb, qa, rb, ra, rk, rid, ord)
        ORDER BY u.ord
        RETURNING 1)";

/// The query type a command's [`Extra`] binds its parameters to.
pub type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// A command's own rows (a reservation, its lines, a status change), written by the statement
/// that writes its stock changes and events: common table expressions numbering their
/// parameters from [`EXTRA_FIRST_PARAM`], and the function that binds them (owned values).
pub struct Extra {
    ctes: String,
    bind: Box<dyn for<'q> FnOnce(PgQuery<'q>) -> PgQuery<'q> + Send>,
}

impl Extra {
    /// Nothing else to write.
    pub fn none() -> Self {
        Self::new(String::new(), |q| q)
    }

    /// `ctes` (`name AS (INSERT ...), ...`, parameters from [`EXTRA_FIRST_PARAM`]) and `bind`,
    /// which binds them in order.
    pub fn new(
        ctes: String,
        bind: impl for<'q> FnOnce(PgQuery<'q>) -> PgQuery<'q> + Send + 'static,
    ) -> Self {
        Self {
            ctes,
            bind: Box::new(bind),
        }
    }
}
