//! The handler: one event, applied to the read model in the consumer runtime's transaction.

use async_trait::async_trait;
use outbox::consumers::{Handler, HandlerError, InboundEvent};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// Why an event cannot be applied (the runtime retries, then parks it).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The body is not the envelope the inventory writes.
    #[error("event {0}: {1} (is the producer the inventory service?)")]
    Malformed(Uuid, String),
}

/// Applies the inventory's events to `rm_variant` and `rm_low_stock_alert`.
#[derive(Debug, Default, Clone)]
pub struct ReadModel;

fn num(data: &Value, field: &str, e: &InboundEvent) -> Result<i64, ApplyError> {
    data.get(field)
        .and_then(Value::as_i64)
        .ok_or_else(|| ApplyError::Malformed(e.event_id, format!("data.{field} is missing")))
}

#[async_trait]
impl Handler for ReadModel {
    async fn handle(&self, tx: &mut PgConnection, e: &InboundEvent) -> Result<(), HandlerError> {
        let env = e.json()?;
        let bad = |what: &str| ApplyError::Malformed(e.event_id, what.to_string());
        let event_type = env
            .get("eventType")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no eventType"))?;
        let tenant = env
            .get("tenantId")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no tenantId"))?;
        let data = env.get("data").ok_or_else(|| bad("no data"))?;
        if !about_a_variant_it_has(e, event_type, data) {
            // A variant the inventory does not have gets no row here (it would answer 200 where
            // the inventory answers 404); the runtime records the event's position as usual.
            return Ok(());
        }
        let variant: Uuid = e
            .aggregate
            .as_ref()
            .map(|a| a.aggregate_id.as_str())
            .or_else(|| data.get("productVariantId").and_then(Value::as_str))
            .ok_or_else(|| bad("no variant id"))?
            .parse()
            .map_err(|_| bad("the variant id is not a UUID"))?;
        // Every event counts as applied on its variant's row (created on first sight).
        let (set, arg): (&str, Arg) = match event_type {
            "StockLevelChangedEvent" => (
                "quantity = $3::bigint",
                Arg::Int(num(data, "newQuantity", e)?),
            ),
            "InventoryReservedEvent" => (
                "reserved = rm_variant.quantity - $3::bigint",
                Arg::Int(num(data, "availableQuantityAfterReservation", e)?),
            ),
            "InventoryReleasedEvent" => (
                "reserved = rm_variant.quantity - $3::bigint",
                Arg::Int(num(data, "availableQuantityAfterRelease", e)?),
            ),
            "StockStatusChangedEvent" => {
                let s = data
                    .get("newStatus")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("data.newStatus is missing"))?;
                if matches!(s, "IN_STOCK" | "DISCONTINUED") {
                    sqlx::query(
                        "DELETE FROM rm_low_stock_alert WHERE tenant_id = $1 AND variant_id = $2",
                    )
                    .bind(tenant)
                    .bind(variant)
                    .execute(&mut *tx)
                    .await?;
                }
                ("status = $3::text", Arg::Text(s.to_string()))
            }
            "LowStockThresholdReachedEvent" => {
                sqlx::query(
                    "INSERT INTO rm_low_stock_alert
                         (tenant_id, variant_id, current_quantity, low_stock_threshold)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (tenant_id, variant_id) DO UPDATE
                        SET current_quantity = $3, low_stock_threshold = $4, opened_at = now()",
                )
                .bind(tenant)
                .bind(variant)
                .bind(num(data, "currentQuantity", e)?)
                .bind(num(data, "lowStockThreshold", e)?)
                .execute(&mut *tx)
                .await?;
                ("status = rm_variant.status", Arg::None)
            }
            "InventoryReservationFailedEvent" => (
                "reservation_failures = rm_variant.reservation_failures + 1",
                Arg::None,
            ),
            // An event type this model does not know: counted, nothing else changes.
            _ => ("status = rm_variant.status", Arg::None),
        };
        sqlx::query(
            "INSERT INTO rm_variant (tenant_id, variant_id) VALUES ($1, $2)
             ON CONFLICT (tenant_id, variant_id) DO NOTHING",
        )
        .bind(tenant)
        .bind(variant)
        .execute(&mut *tx)
        .await?;
        let update = format!(
            "UPDATE rm_variant SET {set}, events_applied = events_applied + 1, updated_at = now()
              WHERE tenant_id = $1 AND variant_id = $2"
        );
        let q = sqlx::query(&update).bind(tenant).bind(variant);
        let q = match arg {
            Arg::Int(n) => q.bind(n),
            Arg::Text(s) => q.bind(s),
            Arg::None => q,
        };
        q.execute(&mut *tx).await?;
        Ok(())
    }
}

/// The inventory's aggregate of events about one of its variants.
const VARIANT_AGGREGATE: &str = "ProductVariant";

/// Whether `e` is about a variant the inventory has. The inventory keys a failed reservation of a
/// variant it does not have (`PRODUCT_NOT_FOUND`) to the tenant (aggregate type `Tenant`), not to
/// the variant; an inventory from before that change keyed it to the variant, so the reason is
/// checked too. Events without aggregate headers are taken as variant events.
fn about_a_variant_it_has(e: &InboundEvent, event_type: &str, data: &Value) -> bool {
    let on_variant = e
        .aggregate
        .as_ref()
        .is_none_or(|a| a.aggregate_type == VARIANT_AGGREGATE);
    let not_found = event_type == "InventoryReservationFailedEvent"
        && data.get("reasonForFailure").and_then(Value::as_str) == Some("PRODUCT_NOT_FOUND");
    on_variant && !not_found
}

/// The value an update statement takes as `$3`, if any.
enum Arg {
    None,
    Int(i64),
    Text(String),
}
