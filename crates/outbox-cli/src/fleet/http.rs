//! `/metrics`, `/healthz` and `/readyz` of a relay serving several databases: the same paths and
//! port as a single-database relay, with one entry per database in the health bodies.
//!
//! - `/healthz` (liveness): 503 only when a database's relay has had work and settled nothing
//!   for longer than the stall timeout *while its database answers*: a hung loop or a broken
//!   broker connection, which a restart may cure. A database that is away is not a reason to
//!   restart the process (that cannot bring it back, and would interrupt the other databases);
//!   it shows in the body and in `outbox_database_up{database=...}`.
//! - `/readyz` (readiness): 200 while at least one database is being served (its relay runs and
//!   its database answered the last query), 503 when none is. "All" would take every replica
//!   out of service, stall rollouts and block node drains (PodDisruptionBudget) whenever a single
//!   tenant database is down; the body lists each database so that nothing is hidden.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Map, Value};

use super::DatabaseState;

#[derive(Clone)]
struct Fleet {
    metrics: PrometheusHandle,
    states: Arc<Vec<Arc<DatabaseState>>>,
}

/// The routes, over the state of every database's relay.
pub fn router(metrics: PrometheusHandle, states: Vec<Arc<DatabaseState>>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .with_state(Fleet {
            metrics,
            states: Arc::new(states),
        })
}

fn up(b: bool) -> &'static str {
    if b {
        "up"
    } else {
        "down"
    }
}

async fn scrape(State(f): State<Fleet>) -> impl IntoResponse {
    // Computed at scrape time (as for one database), so that they agree with `/healthz`.
    for s in f.states.iter() {
        if let Some(r) = s.running() {
            let name = s.name.clone();
            metrics::gauge!(outbox::telemetry::SINCE_PROGRESS, "database" => name.clone())
                .set(r.health.since_progress().as_secs_f64());
            metrics::gauge!(outbox::telemetry::STALLED, "database" => name)
                .set(if r.health.stalled() { 1.0 } else { 0.0 });
        }
    }
    f.metrics.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4")],
        f.metrics.render(),
    )
}

async fn live(State(f): State<Fleet>) -> impl IntoResponse {
    let mut dbs = Map::new();
    let mut hung = false;
    for s in f.states.iter() {
        let entry = match s.running() {
            Some(r) => {
                let db = r.health.database_up();
                let stalled = r.health.stalled();
                hung |= stalled && db;
                json!({
                    "status": if !stalled { "ok" } else if db { "stalled" } else { "database_down" },
                    "seconds_since_progress": r.health.since_progress().as_secs_f64(),
                    "database": up(db),
                    "broker": up(r.publisher.is_connected()),
                })
            }
            None => json!({ "status": "starting", "error": s.problem() }),
        };
        dbs.insert(s.name.clone(), entry);
    }
    let code = if hung {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = json!({ "status": if hung { "stalled" } else { "ok" }, "databases": dbs });
    (code, Json(body))
}

async fn ready(State(f): State<Fleet>) -> impl IntoResponse {
    let mut dbs = Map::new();
    let mut serving = 0usize;
    for s in f.states.iter() {
        let entry: Value = match s.running() {
            Some(r) => {
                let db = r.health.database_up();
                serving += usize::from(db);
                json!({
                    "database": up(db),
                    "broker": { "name": r.publisher.name(), "state": up(r.publisher.is_connected()) },
                    "partitions": r.health.partitions(),
                })
            }
            None => json!({ "database": "unknown", "state": "starting", "error": s.problem() }),
        };
        dbs.insert(s.name.clone(), entry);
    }
    let code = if serving > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "serving": serving,
        "of": f.states.len(),
        "databases": dbs,
    });
    (code, Json(body))
}
