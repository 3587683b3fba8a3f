//! The OpenAPI 3.1 document served at `/openapi.json`, written by hand next to the routes it
//! describes (a test checks that every route of the router is in it).

use serde_json::{json, Value};

fn problem_ref() -> Value {
    json!({"description": "problem", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

fn ok_ref(schema: &str) -> Value {
    json!({"description": "ok", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}})
}

fn idem_param() -> Value {
    json!({"name": "Idempotency-Key", "in": "header", "required": false,
           "description": "A retry with the same key and request returns the first answer with no second effect; a different request with the key answers 422.",
           "schema": {"type": "string", "maxLength": 200}})
}

fn op(
    summary: &str,
    params: Vec<Value>,
    req: Option<&str>,
    ok: (&str, Value),
    errors: &[&str],
) -> Value {
    let mut responses = serde_json::Map::new();
    responses.insert(ok.0.into(), ok.1);
    for e in errors {
        responses.insert((*e).into(), problem_ref());
    }
    responses.insert("401".into(), problem_ref());
    let mut o = json!({"summary": summary, "parameters": params, "responses": responses, "security": [{"bearer": []}]});
    if let Some(r) = req {
        o["requestBody"] = body(r);
    }
    o
}

/// The document.
pub fn document() -> Value {
    let int = |d: &str| json!({"type": "integer", "format": "int64", "description": d});
    let uuid = json!({"type": "string", "format": "uuid"});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Inventory service", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Stock, goods receipts, reservations and shipments per tenant. Every change commits its events (StockLevelChangedEvent, StockStatusChangedEvent, InventoryReservedEvent, InventoryReservationFailedEvent, InventoryReleasedEvent, LowStockThresholdReachedEvent) through the transactional outbox. Every response carries X-Correlation-Id (taken from the request or generated)."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (HS256; claims tenant, sub, exp)"}},
            "schemas": {
                "Problem": {"type": "object", "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"},
                            "failures": {"type": "array", "items": {"$ref": "#/components/schemas/LineFailure"}}, "orderId": uuid}},
                "Variant": {"type": "object", "properties": {"productVariantId": uuid, "quantity": int("physical"), "reserved": int("reserved"), "available": int("quantity - reserved"),
                            "lowStockThreshold": int("threshold"), "status": {"enum": ["IN_STOCK", "LOW_STOCK", "OUT_OF_STOCK", "DISCONTINUED"]},
                            "createdAt": {"type": "string", "format": "date-time"}, "updatedAt": {"type": "string", "format": "date-time"}}},
                "VariantList": {"type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/components/schemas/Variant"}}}},
                "CreateVariant": {"type": "object", "additionalProperties": false, "properties": {"productVariantId": uuid, "lowStockThreshold": int("0..=1000000000")}},
                "UpsertVariant": {"type": "object", "additionalProperties": false, "required": ["lowStockThreshold"], "properties": {"lowStockThreshold": int("0..=1000000000")}},
                "Adjustment": {"type": "object", "additionalProperties": false, "required": ["changeType", "quantity"], "properties": {
                    "changeType": {"enum": ["PURCHASE", "SALE", "RETURN", "ADJUSTMENT"]},
                    "quantity": int("signed change: PURCHASE/RETURN > 0, SALE < 0, ADJUSTMENT != 0; |quantity| <= 1000000000"),
                    "reason": {"type": "string", "maxLength": 500}}},
                "ReceiptLine": {"type": "object", "additionalProperties": false, "required": ["warehouseId", "productVariantId", "quantity"],
                                "properties": {"warehouseId": uuid, "productVariantId": uuid, "quantity": int("1..=1000000000")}},
                "CreateReceipt": {"type": "object", "additionalProperties": false, "required": ["lines"], "properties": {"reference": {"type": "string", "maxLength": 200},
                                  "lines": {"type": "array", "minItems": 1, "maxItems": 500, "items": {"$ref": "#/components/schemas/ReceiptLine"}}}},
                "Receipt": {"type": "object", "properties": {"id": uuid, "reference": {"type": ["string", "null"]}, "status": {"enum": ["DRAFT", "VALIDATED"]},
                            "lines": {"type": "array", "items": {"$ref": "#/components/schemas/ReceiptLine"}}, "createdAt": {"type": "string"}, "validatedAt": {"type": ["string", "null"]}}},
                "ReservationLine": {"type": "object", "additionalProperties": false, "required": ["productVariantId", "quantity"], "properties": {"productVariantId": uuid, "quantity": int("1..=1000000000")}},
                "CreateReservation": {"type": "object", "additionalProperties": false, "required": ["orderId", "lines"], "properties": {"orderId": uuid,
                                      "lines": {"type": "array", "minItems": 1, "maxItems": 500, "items": {"$ref": "#/components/schemas/ReservationLine"}},
                                      "ttlSeconds": int("1..=604800, default 900")}},
                "Reservation": {"type": "object", "properties": {"id": uuid, "orderId": uuid, "status": {"enum": ["ACTIVE", "RELEASED", "EXPIRED", "SHIPPED"]},
                                "lines": {"type": "array", "items": {"$ref": "#/components/schemas/ReservationLine"}}, "expiresAt": {"type": "string"}, "createdAt": {"type": "string"}, "closedAt": {"type": ["string", "null"]}}},
                "LineFailure": {"type": "object", "properties": {"productVariantId": uuid, "quantityAttempted": int("asked"), "available": int("available then"),
                                "reason": {"enum": ["INSUFFICIENT_STOCK", "PRODUCT_NOT_FOUND", "PRODUCT_DISCONTINUED"]}}},
                "Ledger": {"type": "object", "properties": {"productVariantId": uuid, "entries": {"type": "array", "items": {"type": "object", "properties": {
                    "id": int("cursor"), "at": {"type": "string"}, "actor": {"type": "string"}, "movement": {"enum": ["PURCHASE", "SALE", "RETURN", "ADJUSTMENT", "RESERVE", "RELEASE"]},
                    "reason": {"type": ["string", "null"]}, "quantityBefore": int(""), "quantityAfter": int(""), "reservedBefore": int(""), "reservedAfter": int(""),
                    "correlationId": {"type": "string"}, "referenceType": {"type": ["string", "null"]}, "referenceId": {"type": ["string", "null"]}}}}}}
            }
        },
        "paths": {
            "/variants": {
                "post": op("Create a variant (409 if the id exists)", vec![idem_param()], Some("CreateVariant"), ("201", ok_ref("Variant")), &["400", "409", "422"]),
                "get": op("List variants by id", vec![json!({"name": "limit", "in": "query", "schema": {"type": "integer"}}), json!({"name": "after", "in": "query", "schema": uuid})], None, ("200", ok_ref("VariantList")), &["400"])
            },
            "/variants/{id}": {
                "get": op("Read a variant", vec![id_param()], None, ("200", ok_ref("Variant")), &["400", "404"]),
                "put": op("Create (201) or update (200) a variant's threshold", vec![id_param()], Some("UpsertVariant"), ("200", ok_ref("Variant")), &["400", "422"])
            },
            "/variants/{id}/adjustments": {"post": op("Manual stock change", vec![id_param(), idem_param()], Some("Adjustment"), ("200", ok_ref("Variant")), &["400", "404", "409", "422"])},
            "/variants/{id}/discontinue": {"post": op("Discontinue a variant", vec![id_param(), idem_param()], None, ("200", ok_ref("Variant")), &["400", "404"])},
            "/variants/{id}/ledger": {"get": op("Stock movements of a variant, oldest first", vec![id_param(), json!({"name": "limit", "in": "query", "schema": {"type": "integer"}}), json!({"name": "after", "in": "query", "schema": {"type": "integer"}})], None, ("200", ok_ref("Ledger")), &["400", "404"])},
            "/receipts": {"post": op("Create a draft goods receipt", vec![idem_param()], Some("CreateReceipt"), ("201", ok_ref("Receipt")), &["400", "422"])},
            "/receipts/{id}": {"get": op("Read a receipt", vec![id_param()], None, ("200", ok_ref("Receipt")), &["400", "404"])},
            "/receipts/{id}/validate": {"post": op("Validate a receipt: stock rises (PURCHASE); a second validation answers 409", vec![id_param(), idem_param()], None, ("200", ok_ref("Receipt")), &["400", "404", "409", "422"])},
            "/reservations": {"post": op("Reserve all lines or none; 409 lists the failing lines (and their InventoryReservationFailedEvents are committed)", vec![idem_param()], Some("CreateReservation"), ("201", ok_ref("Reservation")), &["400", "409", "422"])},
            "/reservations/{id}": {"get": op("Read a reservation", vec![id_param()], None, ("200", ok_ref("Reservation")), &["400", "404"])},
            "/reservations/{id}/cancel": {"post": op("Release an active reservation (ORDER_CANCELLED)", vec![id_param(), idem_param()], None, ("200", ok_ref("Reservation")), &["400", "404", "409"])},
            "/reservations/{id}/ship": {"post": op("Ship an active reservation: reserved stock leaves (SALE)", vec![id_param(), idem_param()], None, ("200", ok_ref("Reservation")), &["400", "404", "409"])},
            "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"summary": "Readiness: the database answers", "security": [], "responses": {"200": {"description": "ready"}, "503": problem_ref()}}},
            "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.1"}}}}
        }
    })
}
