//! Domain vocabulary and the JSON shapes of the API (camelCase, like the seed's payloads).
//!
//! Request bodies refuse unknown fields: a misspelt field is an error the client hears about,
//! not a silently ignored setting.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Largest quantity, threshold or change the service accepts: absurd values are input errors.
pub const MAX_QUANTITY: i64 = 1_000_000_000;
/// Most lines in one receipt or reservation.
pub const MAX_LINES: usize = 500;
/// Default reservation lifetime when `ttlSeconds` is absent.
pub const DEFAULT_TTL_SECS: i64 = 900;
/// Longest reservation lifetime (7 days).
pub const MAX_TTL_SECS: i64 = 7 * 24 * 3600;

/// `reasonForFailure` of a reservation line naming a variant the tenant does not have. Its
/// `InventoryReservationFailedEvent` is keyed to the tenant, not to the variant
/// (`stock::TENANT_AGGREGATE`).
pub const PRODUCT_NOT_FOUND: &str = "PRODUCT_NOT_FOUND";

/// Stock status of a variant (seed 2.5).
///
/// Derived from **available** stock (`quantity - reserved`), because that is what can still be
/// sold: `OUT_OF_STOCK` when nothing is available, `LOW_STOCK` when available is at or below the
/// threshold, else `IN_STOCK`; `DISCONTINUED` overrides all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StockStatus {
    /// Available above the threshold.
    InStock,
    /// Available at or below the threshold, but above zero.
    LowStock,
    /// Nothing available.
    OutOfStock,
    /// No longer sold.
    Discontinued,
}

impl StockStatus {
    /// The status of a variant with these figures.
    pub fn derive(available: i64, threshold: i64, discontinued: bool) -> Self {
        if discontinued {
            StockStatus::Discontinued
        } else if available <= 0 {
            StockStatus::OutOfStock
        } else if available <= threshold {
            StockStatus::LowStock
        } else {
            StockStatus::InStock
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            StockStatus::InStock => "IN_STOCK",
            StockStatus::LowStock => "LOW_STOCK",
            StockStatus::OutOfStock => "OUT_OF_STOCK",
            StockStatus::Discontinued => "DISCONTINUED",
        }
    }
}

/// Why a quantity changed (seed 2.1 `changeType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChangeType {
    /// Stock bought in (goods receipts).
    Purchase,
    /// Stock sold (shipments).
    Sale,
    /// Stock returned by a customer.
    Return,
    /// A manual correction (counting, damage, ...).
    Adjustment,
}

impl ChangeType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeType::Purchase => "PURCHASE",
            ChangeType::Sale => "SALE",
            ChangeType::Return => "RETURN",
            ChangeType::Adjustment => "ADJUSTMENT",
        }
    }
}

/// A variant as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VariantView {
    /// The variant's id.
    pub product_variant_id: Uuid,
    /// Physical quantity.
    pub quantity: i64,
    /// Reserved part of the quantity.
    pub reserved: i64,
    /// `quantity - reserved`.
    pub available: i64,
    /// Threshold at or below which available stock is low.
    pub low_stock_threshold: i64,
    /// Derived status.
    pub status: StockStatus,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// `PUT /variants/{id}`: create or update a variant.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpsertVariant {
    /// Threshold at or below which available stock counts as low (0..=1e9).
    pub low_stock_threshold: i64,
}

/// `POST /variants`: create a variant, with a chosen id or a generated one.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVariant {
    /// The id to use; generated (UUID v7) when absent.
    #[serde(default)]
    pub product_variant_id: Option<Uuid>,
    /// Threshold at or below which available stock counts as low (0..=1e9).
    #[serde(default)]
    pub low_stock_threshold: i64,
}

/// `POST /variants/{id}/adjustments`.
///
/// `quantity` is the **signed change**: `PURCHASE` and `RETURN` must be positive, `SALE`
/// negative, `ADJUSTMENT` either sign but not zero.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Adjustment {
    /// Why the quantity changes.
    pub change_type: ChangeType,
    /// Signed change of the physical quantity.
    pub quantity: i64,
    /// Free text recorded in the ledger (at most 500 characters, no U+0000).
    #[serde(default)]
    #[schema(max_length = 500)]
    pub reason: Option<String>,
}

/// A line of a goods receipt.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReceiptLine {
    /// Receiving warehouse (recorded; stock is kept per variant, not per warehouse).
    pub warehouse_id: Uuid,
    /// The variant received.
    pub product_variant_id: Uuid,
    /// Units received (> 0).
    pub quantity: i64,
}

/// `POST /receipts`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateReceipt {
    /// Supplier reference, free text (at most 200 characters, no U+0000).
    #[serde(default)]
    #[schema(max_length = 200)]
    pub reference: Option<String>,
    /// 1 to 500 lines.
    #[schema(min_items = 1, max_items = 500)]
    pub lines: Vec<ReceiptLine>,
}

/// A goods receipt as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptView {
    /// The receipt's id.
    pub id: Uuid,
    /// Supplier reference.
    pub reference: Option<String>,
    /// `DRAFT` or `VALIDATED`.
    pub status: String,
    /// The lines.
    pub lines: Vec<ReceiptLine>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Validation time.
    pub validated_at: Option<DateTime<Utc>>,
}

/// A line of a reservation request.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReservationLine {
    /// The variant to reserve.
    pub product_variant_id: Uuid,
    /// Units to reserve (> 0).
    pub quantity: i64,
}

/// `POST /reservations`: all lines or none.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateReservation {
    /// The order the stock is held for.
    pub order_id: Uuid,
    /// 1 to 500 lines, each variant at most once.
    #[schema(min_items = 1, max_items = 500)]
    pub lines: Vec<ReservationLine>,
    /// Lifetime in seconds (1..=604800, default 900); then the service releases it.
    #[serde(default)]
    pub ttl_seconds: Option<i64>,
}

/// A reservation as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReservationView {
    /// The reservation's id.
    pub id: Uuid,
    /// The order.
    pub order_id: Uuid,
    /// `ACTIVE`, `RELEASED` (cancelled), `EXPIRED` or `SHIPPED`.
    pub status: String,
    /// The lines.
    pub lines: Vec<ReservationLine>,
    /// When an active reservation is released by the service.
    pub expires_at: DateTime<Utc>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it stopped being active.
    pub closed_at: Option<DateTime<Utc>>,
}

/// Why one line of a reservation could not be reserved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LineFailure {
    /// The variant.
    pub product_variant_id: Uuid,
    /// Units asked for.
    pub quantity_attempted: i64,
    /// Units available at the time (0 when the variant does not exist).
    pub available: i64,
    /// `INSUFFICIENT_STOCK`, `PRODUCT_NOT_FOUND` or `PRODUCT_DISCONTINUED`.
    pub reason: String,
}

/// One ledger entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    /// Position in the ledger (ascending; use as the `after` cursor).
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// Who: the token's `sub`, or `system:expiry` for the expiry sweep.
    pub actor: String,
    /// `PURCHASE`, `SALE`, `RETURN`, `ADJUSTMENT` (quantity changes), `RESERVE`, `RELEASE`.
    pub movement: String,
    /// Free-text or coded reason (adjustment reason, `ORDER_CANCELLED`, ...).
    pub reason: Option<String>,
    /// Quantity before.
    pub quantity_before: i64,
    /// Quantity after.
    pub quantity_after: i64,
    /// Reserved before.
    pub reserved_before: i64,
    /// Reserved after.
    pub reserved_after: i64,
    /// Correlation id of the request or process.
    pub correlation_id: String,
    /// `RECEIPT`, `RESERVATION` or `ADJUSTMENT`.
    pub reference_type: Option<String>,
    /// Id of the receipt or reservation.
    pub reference_id: Option<Uuid>,
}

/// `GET /variants`: one page of variants, by id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct VariantList {
    /// The variants; the last one's id is the `after` cursor of the next page.
    pub items: Vec<VariantView>,
}

/// `GET /variants/{id}/ledger`: one page of a variant's ledger.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerPage {
    /// The variant.
    pub product_variant_id: Uuid,
    /// Entries, oldest first; the last one's id is the `after` cursor of the next page.
    pub entries: Vec<LedgerEntry>,
}

/// An error answer (RFC 9457 `application/problem+json`). Only described here: the service
/// builds it in [`crate::error`].
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// `about:blank#<status>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong and what to do.
    pub detail: String,
    /// A failed reservation (409): why each failing line could not be reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<Vec<LineFailure>>,
    /// A failed reservation (409): its order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<Uuid>,
}

/// `/healthz` and `/readyz` when the service is up.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok` (alive) or `ready` (the database answers).
    pub status: String,
}
