//! Metrics and health endpoints of a relay: `/metrics` (Prometheus text), `/healthz` (alive: the
//! relay's loop is making progress), `/readyz` (ready when the database answers; reports the
//! broker either way).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use outbox::relay::RelayHealth;
use outbox::Publisher;

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = prometheus_builder()?.install_recorder()?;
    outbox::telemetry::describe();
    let _ = HANDLE.set(handle.clone());
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

/// The exporter with the relay's histogram buckets (also used for the several-databases relay).
pub fn prometheus_builder() -> anyhow::Result<PrometheusBuilder> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(outbox::telemetry::BATCH_SIZE.into()),
            &[
                1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
            ],
        )?)
}

/// What the endpoints read.
#[derive(Clone)]
pub struct Probe {
    /// Prometheus handle.
    pub metrics: PrometheusHandle,
    /// The relay's own view of its health.
    pub health: Arc<RelayHealth>,
    /// The broker adapter (connection state).
    pub publisher: Arc<dyn Publisher>,
    /// Database pool, pinged by `/readyz`.
    pub pool: sqlx::PgPool,
}

/// The relay's HTTP routes.
pub fn router(probe: Probe) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .with_state(probe)
}

async fn metrics(State(p): State<Probe>) -> impl IntoResponse {
    // The progress gauges are computed at scrape time, so that they agree with `/healthz`.
    metrics::gauge!(outbox::telemetry::SINCE_PROGRESS).set(p.health.since_progress().as_secs_f64());
    metrics::gauge!(outbox::telemetry::STALLED).set(if p.health.stalled() { 1.0 } else { 0.0 });
    p.metrics.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4")],
        p.metrics.render(),
    )
}

/// 503 once the loop has had work and settled nothing for longer than the stall timeout: a hung
/// publish, a broker or database away for that long. Read from timestamps the loop leaves, so a
/// loop that hangs cannot keep this green.
async fn live(State(p): State<Probe>) -> impl IntoResponse {
    let since = p.health.since_progress().as_secs_f64();
    if p.health.stalled() {
        let body = serde_json::json!({
            "status": "stalled",
            "seconds_since_progress": since,
            "stall_timeout_seconds": p.health.stall_timeout().as_secs_f64(),
            "database": if p.health.database_up() { "up" } else { "down" },
            "broker": if p.publisher.is_connected() { "up" } else { "down" },
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body))
    } else {
        let body = serde_json::json!({ "status": "ok", "seconds_since_progress": since });
        (StatusCode::OK, Json(body))
    }
}

async fn ready(State(p): State<Probe>) -> impl IntoResponse {
    let database = sqlx::query("SELECT 1").execute(&p.pool).await.is_ok();
    let broker = p.publisher.is_connected();
    let body = serde_json::json!({
        "database": if database { "up" } else { "down" },
        "broker": { "name": p.publisher.name(), "state": if broker { "up" } else { "down" } },
        "partitions": p.health.partitions(),
    });
    let code = if database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
