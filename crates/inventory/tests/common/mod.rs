//! Helpers shared by the inventory's integration tests: an app over a fresh database per test,
//! requests through the router without a socket, and the outbox rows read back.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use inventory::auth::JwtKeys;
use inventory::AppState;
use serde_json::Value;
use testkit::TestDb;
use tower::ServiceExt;
use uuid::Uuid;

pub const SECRET: &[u8] = b"test-secret";
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The service over its own database.
pub struct App {
    pub db: TestDb,
    pub state: AppState,
    pub router: Router,
}

impl App {
    pub async fn new() -> Self {
        let db = TestDb::new().await;
        inventory::migrate(&db.pool).await.expect("migrations");
        let state = AppState::new(db.pool.clone(), SECRET);
        let router = inventory::router(state.clone());
        Self { db, state, router }
    }

    pub fn token(&self, tenant: &str) -> String {
        JwtKeys::new(SECRET).mint(tenant, "user-1", 3600).unwrap()
    }

    /// Sends a request; returns status, headers and the JSON body (Null when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Value) {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&v).unwrap()))
                .unwrap(),
            None => b.body(Body::empty()).unwrap(),
        };
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, v)
    }

    pub async fn get(&self, t: &str, path: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Method::GET, path, Some(t), None, &[]).await;
        (s, v)
    }

    pub async fn post(&self, t: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, v) = self
            .call(Method::POST, path, Some(t), Some(body), &[])
            .await;
        (s, v)
    }

    pub async fn post_empty(&self, t: &str, path: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Method::POST, path, Some(t), None, &[]).await;
        (s, v)
    }

    /// Creates a variant with `threshold` and, when `stock > 0`, a PURCHASE adjustment.
    pub async fn variant(&self, t: &str, threshold: i64, stock: i64) -> Uuid {
        let id = Uuid::now_v7();
        let (s, _, v) = self
            .call(
                Method::PUT,
                &format!("/variants/{id}"),
                Some(t),
                Some(serde_json::json!({ "lowStockThreshold": threshold })),
                &[],
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        if stock > 0 {
            let (s, v) = self
                .post(
                    t,
                    &format!("/variants/{id}/adjustments"),
                    serde_json::json!({"changeType": "PURCHASE", "quantity": stock}),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
        id
    }

    /// Every outbox event, in outbox order.
    pub async fn events(&self) -> Vec<Event> {
        let rows: Vec<(String, String, String, String, Vec<u8>, Value)> = sqlx::query_as(
            "SELECT tenant_id, aggregate_type, aggregate_id, topic, payload, headers FROM outbox_event ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(tenant, atype, aid, topic, payload, headers)| {
                let env: Value = serde_json::from_slice(&payload).unwrap();
                Event {
                    tenant,
                    aggregate_type: atype,
                    aggregate_id: aid,
                    topic,
                    event_type: env["eventType"].as_str().unwrap().to_string(),
                    data: env["data"].clone(),
                    envelope: env,
                    headers,
                }
            })
            .collect()
    }

    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

#[derive(Debug, Clone)]
pub struct Event {
    pub tenant: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub topic: String,
    pub event_type: String,
    pub data: Value,
    pub envelope: Value,
    pub headers: Value,
}

/// The sorted keys of a JSON object.
pub fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

/// The sorted field names the seed lists for `event_type`.
pub fn seed_fields(event_type: &str) -> Vec<String> {
    let f: &[&str] = match event_type {
        "StockLevelChangedEvent" => &[
            "productVariantId",
            "newQuantity",
            "oldQuantity",
            "quantityChanged",
            "changeType",
            "timestamp",
            "correlationId",
        ],
        "InventoryReservedEvent" => &[
            "productVariantId",
            "quantityReserved",
            "availableQuantityAfterReservation",
            "orderId",
            "userId",
            "reservationId",
            "timestamp",
            "correlationId",
        ],
        "InventoryReservationFailedEvent" => &[
            "productVariantId",
            "quantityAttempted",
            "reasonForFailure",
            "orderId",
            "userId",
            "timestamp",
            "correlationId",
        ],
        "InventoryReleasedEvent" => &[
            "productVariantId",
            "quantityReleased",
            "availableQuantityAfterRelease",
            "orderId",
            "userId",
            "reservationId",
            "reasonForRelease",
            "timestamp",
            "correlationId",
        ],
        "StockStatusChangedEvent" => &[
            "productVariantId",
            "newStatus",
            "oldStatus",
            "currentQuantity",
            "timestamp",
            "correlationId",
        ],
        "LowStockThresholdReachedEvent" => &[
            "productVariantId",
            "currentQuantity",
            "lowStockThreshold",
            "timestamp",
            "correlationId",
        ],
        other => panic!("unknown event type {other}"),
    };
    let mut v: Vec<String> = f.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// The seed's routing key of `event_type`.
pub fn seed_topic(event_type: &str) -> &'static str {
    match event_type {
        "StockLevelChangedEvent" => "inventory.stock.changed",
        "InventoryReservedEvent" => "inventory.reservation.created",
        "InventoryReservationFailedEvent" => "inventory.reservation.failed",
        "InventoryReleasedEvent" => "inventory.reservation.released",
        "StockStatusChangedEvent" => "inventory.stock.status.changed",
        "LowStockThresholdReachedEvent" => "inventory.stock.low_threshold_reached",
        other => panic!("unknown event type {other}"),
    }
}

/// Checks every event's envelope, payload fields, routing key and aggregate.
pub fn assert_well_formed(events: &[Event]) {
    for e in events {
        assert_eq!(
            keys(&e.data),
            seed_fields(&e.event_type),
            "fields of {}: {}",
            e.event_type,
            e.data
        );
        assert_eq!(e.topic, seed_topic(&e.event_type));
        assert_eq!(e.aggregate_type, "ProductVariant");
        assert_eq!(e.data["productVariantId"].as_str().unwrap(), e.aggregate_id);
        assert_eq!(
            e.envelope["data"]["correlationId"],
            e.envelope["correlationId"]
        );
        assert_eq!(e.envelope["sourceService"], "InventoryService");
        assert_eq!(e.envelope["tenantId"].as_str().unwrap(), e.tenant);
        assert_eq!(e.envelope["eventVersion"], "1.0");
        let id = Uuid::parse_str(e.envelope["eventId"].as_str().unwrap()).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert!(e.data["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
