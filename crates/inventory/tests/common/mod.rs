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

pub const SECRET: &[u8] = b"test-secret-of-at-least-32-bytes-for-hs256";
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The service over its own database. Every answer it gives is recorded as (method, route,
/// status), and when the app is dropped at the end of a test each must be declared for its
/// route in the served OpenAPI document: the document cannot fall behind what the API does.
pub struct App {
    pub db: TestDb,
    pub state: AppState,
    pub router: Router,
    pub seen: std::sync::Mutex<Vec<Seen>>,
}

impl Drop for App {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let missing = undeclared(&self.seen.lock().unwrap());
        assert!(
            missing.is_empty(),
            "answers the OpenAPI document does not declare: {missing:?}"
        );
    }
}

/// One answer of the service: method, path as sent, status, media type of a non-empty body,
/// and the names of its top-level fields that its declared schema does not list (filled in by
/// [`undeclared`]; empty when recorded).
pub type Seen = (String, String, u16, Option<String>, Vec<String>);

/// The (method, route template, status, media type) of `seen` that the document does not
/// declare (the status, or the body's media type for it); calls to paths or methods the
/// document does not have (404 and 405 probes) are not counted.
pub fn undeclared(seen: &[Seen]) -> Vec<Seen> {
    let doc = inventory::openapi::document();
    let paths = doc["paths"].as_object().unwrap();
    let mut out = Vec::new();
    for (method, path, status, media, fields) in seen {
        let path = path.split('?').next().unwrap();
        let segs: Vec<&str> = path.split('/').collect();
        let Some((template, item)) = paths.iter().find(|(t, _)| {
            let ts: Vec<&str> = t.split('/').collect();
            ts.len() == segs.len()
                && ts
                    .iter()
                    .zip(&segs)
                    .all(|(a, b)| a.starts_with('{') || a == b)
        }) else {
            continue;
        };
        let Some(op) = item.get(method.to_ascii_lowercase()) else {
            continue;
        };
        let response = op["responses"].get(status.to_string());
        let content = match (response, media) {
            (None, _) => None,
            (Some(_), None) => Some(&Value::Null),
            (Some(r), Some(m)) => r["content"].get(m.as_str()),
        };
        let Some(content) = content else {
            out.push((
                method.clone(),
                template.clone(),
                *status,
                media.clone(),
                vec![],
            ));
            continue;
        };
        // Every top-level field of the body must be a property of the declared schema.
        let schema = match content["schema"]["$ref"].as_str() {
            Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap()],
            None => &content["schema"],
        };
        if let Some(props) = schema["properties"].as_object() {
            let extra: Vec<String> = fields
                .iter()
                .filter(|f| !props.contains_key(f.as_str()))
                .cloned()
                .collect();
            if !extra.is_empty() {
                out.push((
                    method.clone(),
                    template.clone(),
                    *status,
                    media.clone(),
                    extra,
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

impl App {
    pub async fn new() -> Self {
        Self::with_keys(JwtKeys::new(SECRET)).await
    }

    /// The service verifying tokens with `keys` ([`App::token`] mints HS256 tokens of [`SECRET`]).
    pub async fn with_keys(keys: impl Into<inventory::auth::Verifier>) -> Self {
        let db = TestDb::new().await;
        inventory::migrate(&db.pool).await.expect("migrations");
        let state = AppState::with_keys(db.pool.clone(), keys);
        let router = inventory::router(state.clone());
        Self {
            db,
            state,
            router,
            seen: Default::default(),
        }
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
        let mut b = Request::builder().method(method.clone()).uri(path);
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
        self.send(method, path, req).await
    }

    /// Sends a ready-made request (any body); records its answer like [`App::call`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        req: Request<Body>,
    ) -> (StatusCode, HeaderMap, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let media = (!bytes.is_empty())
            .then(|| headers.get("content-type"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string());
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        let fields = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        self.seen.lock().unwrap().push((
            method.to_string(),
            path.to_string(),
            status.as_u16(),
            media,
            fields,
        ));
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

    /// Every outbox event not yet published, in outbox order.
    pub async fn events(&self) -> Vec<Event> {
        self.events_in("outbox_event").await
    }

    /// Every event, published or not, in outbox order.
    pub async fn all_events(&self) -> Vec<Event> {
        self.events_in("outbox_event_all").await
    }

    async fn events_in(&self, table: &str) -> Vec<Event> {
        let rows: Vec<(String, String, String, String, Vec<u8>, Value)> = sqlx::query_as(&format!(
            "SELECT tenant_id, aggregate_type, aggregate_id, topic, payload, headers FROM {table} ORDER BY id",
        ))
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
        assert_seed_event(&e.envelope);
        assert_eq!(e.topic, seed_topic(&e.event_type));
        if e.data["reasonForFailure"] == "PRODUCT_NOT_FOUND" {
            // A variant the tenant does not have: keyed to the tenant, never to that id.
            assert_eq!(e.aggregate_type, "Tenant");
            assert_eq!(e.aggregate_id, e.tenant);
        } else {
            assert_eq!(e.aggregate_type, "ProductVariant");
            assert_eq!(e.data["productVariantId"].as_str().unwrap(), e.aggregate_id);
        }
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

/// The type of one field of the seed's section 2.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    /// `string` (UUID).
    Uuid,
    /// `number` (integer).
    Int,
    /// `string` (ISO 8601 datetime).
    DateTime,
    /// `string`, one of these.
    Enum(&'static [&'static str]),
    /// `string` (free).
    Str,
}

/// The seed's fields of `event_type`: name, type, optional. `correlationId` is a UUID when the
/// service generates it; a caller's X-Correlation-Id is passed through as given (a string).
pub fn seed_schema(event_type: &str) -> Vec<(&'static str, Ty, bool)> {
    const STATUS: &[&str] = &["IN_STOCK", "LOW_STOCK", "OUT_OF_STOCK", "DISCONTINUED"];
    let mut f = vec![
        ("productVariantId", Ty::Uuid, false),
        ("timestamp", Ty::DateTime, false),
        ("correlationId", Ty::Str, false),
    ];
    f.extend(match event_type {
        "StockLevelChangedEvent" => vec![
            ("newQuantity", Ty::Int, false),
            ("oldQuantity", Ty::Int, false),
            ("quantityChanged", Ty::Int, false),
            (
                "changeType",
                Ty::Enum(&["PURCHASE", "SALE", "RETURN", "ADJUSTMENT"]),
                false,
            ),
        ],
        "InventoryReservedEvent" => vec![
            ("quantityReserved", Ty::Int, false),
            ("availableQuantityAfterReservation", Ty::Int, false),
            ("orderId", Ty::Uuid, false),
            ("userId", Ty::Str, true),
            ("reservationId", Ty::Uuid, true),
        ],
        "InventoryReservationFailedEvent" => vec![
            ("quantityAttempted", Ty::Int, false),
            (
                "reasonForFailure",
                Ty::Enum(&[
                    "INSUFFICIENT_STOCK",
                    "PRODUCT_NOT_FOUND",
                    "PRODUCT_DISCONTINUED",
                ]),
                false,
            ),
            ("orderId", Ty::Uuid, false),
            ("userId", Ty::Str, true),
        ],
        "InventoryReleasedEvent" => vec![
            ("quantityReleased", Ty::Int, false),
            ("availableQuantityAfterRelease", Ty::Int, false),
            ("orderId", Ty::Uuid, false),
            ("userId", Ty::Str, true),
            ("reservationId", Ty::Uuid, true),
            (
                "reasonForRelease",
                Ty::Enum(&[
                    "ORDER_CANCELLED",
                    "RESERVATION_EXPIRED",
                    "ORDER_COMPLETED_ADJUSTMENT",
                ]),
                false,
            ),
        ],
        "StockStatusChangedEvent" => vec![
            ("newStatus", Ty::Enum(STATUS), false),
            ("oldStatus", Ty::Enum(STATUS), false),
            ("currentQuantity", Ty::Int, false),
        ],
        "LowStockThresholdReachedEvent" => vec![
            ("currentQuantity", Ty::Int, false),
            ("lowStockThreshold", Ty::Int, false),
        ],
        other => panic!("unknown event type {other}"),
    });
    f
}

fn check_type(what: &str, v: &Value, ty: Ty) {
    match ty {
        Ty::Uuid => assert!(
            v.as_str().is_some_and(|s| Uuid::parse_str(s).is_ok()),
            "{what} must be a UUID string: {v}"
        ),
        Ty::Int => assert!(v.is_i64(), "{what} must be an integer: {v}"),
        Ty::DateTime => assert!(
            v.as_str().is_some_and(
                |s| chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.ends_with('Z')
            ),
            "{what} must be an RFC 3339 UTC datetime: {v}"
        ),
        Ty::Enum(vals) => assert!(
            v.as_str().is_some_and(|s| vals.contains(&s)),
            "{what} must be one of {vals:?}: {v}"
        ),
        Ty::Str => assert!(
            v.as_str().is_some_and(|s| !s.is_empty()),
            "{what} must be a non-empty string: {v}"
        ),
    }
}

/// Checks an envelope against the seed's section 3 and its `data` against section 2, field by
/// field: no field the seed does not list, every required one present, every type right, an
/// optional field absent rather than `null`.
pub fn assert_seed_event(env: &Value) {
    let mut top = keys(env);
    top.retain(|k| k != "tenantId");
    assert_eq!(
        top,
        [
            "correlationId",
            "data",
            "eventId",
            "eventType",
            "eventVersion",
            "sourceService",
            "timestamp"
        ],
        "the envelope of seed section 3 (plus tenantId): {env}"
    );
    assert!(env["tenantId"].as_str().is_some_and(|t| !t.is_empty()));
    check_type("eventId", &env["eventId"], Ty::Uuid);
    check_type("timestamp", &env["timestamp"], Ty::DateTime);
    check_type("correlationId", &env["correlationId"], Ty::Str);
    assert_eq!(env["eventVersion"], "1.0");
    assert_eq!(env["sourceService"], "InventoryService");
    let event_type = env["eventType"].as_str().unwrap();
    let data = env["data"].as_object().expect("data is an object");
    let schema = seed_schema(event_type);
    for k in data.keys() {
        assert!(
            schema.iter().any(|(n, _, _)| n == k),
            "{event_type}.{k} is not in the seed"
        );
    }
    for (name, ty, optional) in schema {
        match data.get(name) {
            None => assert!(optional, "{event_type}.{name} is required: {env}"),
            Some(v) => check_type(&format!("{event_type}.{name}"), v, ty),
        }
    }
    assert_eq!(data["correlationId"], env["correlationId"]);
}
