//! `GET /tenants/{tenant}/variants` and `GET /tenants/{tenant}/variants/{id}`: the read model;
//! `/healthz` (503 when messages wait and nothing was handled for a minute), `/metrics`.
//!
//! The variants routes hold callers to the inventory's tenancy: they take the inventory's bearer
//! tokens, verified by the same code (`tenant-auth`), and a path naming another tenant than the
//! token's answers 404, as the inventory answers for another tenant's variant (nothing says
//! whether that tenant exists). `/healthz` and `/metrics` take no token: they say nothing of any
//! tenant's stock (bind the port where only operators and the scraper reach it).

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use outbox::consumers::ConsumerHealth;
use serde::Serialize;
use sqlx::PgPool;
use tenant_auth::Verifier;
use uuid::Uuid;

/// One variant as the read model knows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VariantRead {
    /// The variant.
    pub product_variant_id: Uuid,
    /// Units on hand.
    pub quantity: i64,
    /// Units reserved.
    pub reserved: i64,
    /// IN_STOCK, LOW_STOCK, OUT_OF_STOCK or DISCONTINUED.
    pub status: String,
    /// Failed reservation lines seen for it.
    pub reservation_failures: i64,
    /// Events applied to it.
    pub events_applied: i64,
    /// The open low-stock alert's threshold, if an alert is open.
    pub low_stock_alert_threshold: Option<i64>,
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct ReadState {
    /// The read model's database.
    pub pool: PgPool,
    /// The consumer's liveness.
    pub health: Arc<ConsumerHealth>,
    /// Prometheus exposition, when installed.
    pub metrics: Option<metrics_handle::Handle>,
    /// Verifies the callers' bearer tokens (the inventory's).
    pub verifier: Arc<Verifier>,
}

/// The tenant of a request's verified bearer token.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's tenant.
    pub tenant: String,
}

impl FromRequestParts<ReadState> for Caller {
    type Rejection = axum::response::Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ReadState,
    ) -> Result<Self, Self::Rejection> {
        match state
            .verifier
            .verify_authorization(parts.headers.get(AUTHORIZATION))
        {
            Ok(c) => Ok(Caller { tenant: c.tenant }),
            Err(e) => Err((
                StatusCode::UNAUTHORIZED,
                [(WWW_AUTHENTICATE, "Bearer")],
                format!("{e} (send the inventory's bearer token of your tenant)"),
            )
                .into_response()),
        }
    }
}

impl Caller {
    /// The 404 answer when `tenant` is not the caller's own; `None` when it is.
    fn not_own(&self, tenant: &str) -> Option<axum::response::Response> {
        (self.tenant != tenant).then(|| {
            (
                StatusCode::NOT_FOUND,
                format!("no tenant {tenant} for this token (a token reads only its own tenant)"),
            )
                .into_response()
        })
    }
}

/// The metrics handle type, re-exported so that callers need not name the exporter crate.
pub mod metrics_handle {
    /// A rendered-on-demand Prometheus registry.
    pub type Handle = Arc<dyn Fn() -> String + Send + Sync>;
    use std::sync::Arc;
}

const SELECT: &str = "SELECT v.variant_id AS product_variant_id, v.quantity, v.reserved, v.status,
                             v.reservation_failures, v.events_applied,
                             a.low_stock_threshold AS low_stock_alert_threshold
                        FROM rm_variant v
                        LEFT JOIN rm_low_stock_alert a USING (tenant_id, variant_id)
                       WHERE v.tenant_id = $1";

/// Reads one tenant's variants.
pub async fn variants(pool: &PgPool, tenant: &str) -> Result<Vec<VariantRead>, sqlx::Error> {
    sqlx::query_as(&format!("{SELECT} ORDER BY v.variant_id"))
        .bind(tenant)
        .fetch_all(pool)
        .await
}

async fn list(
    caller: Caller,
    State(s): State<ReadState>,
    Path(tenant): Path<String>,
) -> impl IntoResponse {
    if let Some(r) = caller.not_own(&tenant) {
        return r;
    }
    match variants(&s.pool, &tenant).await {
        Ok(items) => Json(serde_json::json!({ "items": items })).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn one(
    caller: Caller,
    State(s): State<ReadState>,
    Path((tenant, id)): Path<(String, Uuid)>,
) -> impl IntoResponse {
    if let Some(r) = caller.not_own(&tenant) {
        return r;
    }
    let r: Result<Option<VariantRead>, _> =
        sqlx::query_as(&format!("{SELECT} AND v.variant_id = $2"))
            .bind(&tenant)
            .bind(id)
            .fetch_optional(&s.pool)
            .await;
    match r {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("no event of variant {id} of tenant {tenant} has been applied yet"),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

fn unavailable(e: sqlx::Error) -> axum::response::Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("read model database unavailable: {e}; retry shortly"),
    )
        .into_response()
}

async fn healthz(State(s): State<ReadState>) -> impl IntoResponse {
    // Messages waiting and nothing handled for a minute: the consumer is stuck.
    let stalled = s.health.stalled(std::time::Duration::from_secs(60));
    let body = Json(serde_json::json!({
        "status": if stalled { "stalled" } else { "ok" },
        "secondsSinceProgress": s.health.since_progress().as_secs_f64(),
        "lag": s.health.lag(),
    }));
    let code = if stalled {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, body)
}

async fn metrics(State(s): State<ReadState>) -> impl IntoResponse {
    match &s.metrics {
        Some(render) => render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not installed").into_response(),
    }
}

/// The read model's HTTP API.
pub fn router(state: ReadState) -> Router {
    Router::new()
        .route("/tenants/{tenant}/variants", get(list))
        .route("/tenants/{tenant}/variants/{id}", get(one))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}
