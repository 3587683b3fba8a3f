//! Dead letters: grouped by failure and by aggregate, and listed under a filter.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;
use outbox::console::dead_groups;
use serde::Deserialize;

use super::actions::buttons;
use super::filters::{Carried, DeadQuery};
use super::{db_error, layout, outbox_db};
use crate::guard::Ctx;
use crate::render::{self, enc, num};
use crate::AppState;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct GroupsQuery {
    group: Option<String>,
    tenant: Option<String>,
    after_tenant: Option<String>,
    after_type: Option<String>,
    after_id: Option<String>,
}

pub(crate) async fn groups(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path(db): Path<String>,
    Query(q): Query<GroupsQuery>,
) -> Response {
    let pool = match outbox_db(&state, &db) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let by_error = match dead_groups::by_error(&pool).await {
        Ok(g) => g,
        Err(e) => return db_error(&db, &e),
    };
    let after = match (&q.after_tenant, &q.after_type, &q.after_id) {
        (Some(t), Some(ty), Some(id)) => Some((t.as_str(), ty.as_str(), id.as_str())),
        _ => None,
    };
    let group = q.group.as_deref().filter(|g| !g.is_empty());
    let tenant = q.tenant.as_deref().filter(|t| !t.is_empty());
    let by_agg = match dead_groups::by_aggregate(&pool, group, tenant, after).await {
        Ok(g) => g,
        Err(e) => return db_error(&db, &e),
    };
    let dbe = enc(&db);
    let preview = format!("/db/{dbe}/dead/preview");
    layout::page(
        &format!("Dead letters of {db}"),
        &ctx,
        html! {
            p { a href=(format!("/db/{dbe}/dead/list")) { "List all dead letters" } " (newest first, with a filter by time window)" }
            h2 { "By failure" }
            p.muted { "Grouped by reason code and normalized message (ids, numbers and quoted values replaced), so one failure with many ids is one group." }
            @if by_error.is_empty() { p.muted #no-dead { "No dead letters." } } @else {
                table #groups {
                    tr { th { "reason: message" } th.n { "dead" } th { "first" } th { "last" } th { "" } }
                    @for g in &by_error {
                        @let dq = DeadQuery { group: Some(g.error_group.clone()), ..Default::default() };
                        tr.group {
                            td.mono { a href=(format!("/db/{dbe}/dead/list?{}", dq.query())) { (render::text(&g.error_group)) } }
                            td.n { (num(g.count)) }
                            td { (render::time(g.first_dead_at)) }
                            td { (render::time(g.last_dead_at)) }
                            td {
                                a href=(format!("/db/{dbe}/dead?group={}", enc(&g.error_group))) { "aggregates" } " "
                                (buttons(&ctx, &preview, dq.hidden()))
                            }
                        }
                    }
                }
            }
            h2 { "By aggregate" @if let Some(g) = group { " with failure " code { (render::text(g)) } } }
            p.muted { "An aggregate's dead letter holds back its later events (held). In key order, " (dead_groups::PAGE) " a page." }
            @if by_agg.is_empty() { p.muted { "None." } } @else {
                table #aggregates {
                    tr { th { "tenant" } th { "aggregate type" } th { "aggregate id" } th.n { "dead" } th.n { "held behind" } th { "first dead" } th { "" } }
                    @for a in &by_agg {
                        @let dq = DeadQuery { tenant: Some(a.tenant_id.clone()), aggregate_type: Some(a.aggregate_type.clone()), aggregate_id: Some(a.aggregate_id.clone()), ..Default::default() };
                        tr.aggregate {
                            td.mono { (render::text(&a.tenant_id)) }
                            td.mono { (render::text(&a.aggregate_type)) }
                            td.mono { a href=(format!("/db/{dbe}/dead/list?{}", dq.query())) { (render::text(&a.aggregate_id)) } }
                            td.n { (num(a.dead)) }
                            td.n { (num(a.held)) }
                            td { (render::time(a.first_dead_at)) }
                            td { (buttons(&ctx, &preview, dq.hidden())) }
                        }
                    }
                }
                @if let Some(last) = by_agg.last().filter(|_| by_agg.len() as i64 == dead_groups::PAGE) {
                    p { a href=(format!("/db/{dbe}/dead?{}after_tenant={}&after_type={}&after_id={}",
                        group.map(|g| format!("group={}&", enc(g))).unwrap_or_default(),
                        enc(&last.tenant_id), enc(&last.aggregate_type), enc(&last.aggregate_id))) { "Next page" } }
                }
            }
        },
    )
    .into_response()
}

pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path(db): Path<String>,
    Query(q): Query<DeadQuery>,
) -> Response {
    let pool = match outbox_db(&state, &db) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, layout::bare("Bad filter", &e)).into_response(),
    };
    let rows = match dead_groups::list(&pool, &filter).await {
        Ok(r) => r,
        Err(e) => return db_error(&db, &e),
    };
    let dbe = enc(&db);
    let v = |s: &Option<String>| super::filters::attr_value(s.as_deref().unwrap_or_default());
    layout::page(
        &format!("Dead letters of {db}"),
        &ctx,
        html! {
            p { a href=(format!("/db/{dbe}/dead")) { "Grouped by failure and aggregate" } }
            form.filters method="get" action=(format!("/db/{dbe}/dead/list")) {
                @if let Some(g) = &q.group { input type="hidden" name="group" value=(v(&Some(g.clone()))); }
                label { "tenant" input name="tenant" value=(v(&q.tenant)); }
                label { "aggregate type" input name="aggregate_type" value=(v(&q.aggregate_type)); }
                label { "aggregate id" input name="aggregate_id" value=(v(&q.aggregate_id)); }
                label { "dead since (UTC)" input name="since" placeholder="2026-12-06T04:00" value=(v(&q.since)); }
                label { "until (UTC)" input name="until" placeholder="2026-12-06T05:00" value=(v(&q.until)); }
                button type="submit" { "Filter" }
            }
            p { "Filter: " (q.describe()) }
            p { "Act on every dead letter of this filter (a dry run shows the count first): " (buttons(&ctx, &format!("/db/{dbe}/dead/preview"), q.hidden())) }
            @if rows.is_empty() { p.muted #no-dead { "No dead letters match." } } @else {
                p.muted { "Newest first, at most " (dead_groups::PAGE) "." }
                table #dead {
                    tr { th { "event" } th { "aggregate" } th.n { "seq" } th { "type" } th.n { "attempts" } th { "dead" } th { "error" } th.n { "bytes" } }
                    @for r in &rows {
                        tr.dead-letter {
                            td.mono { a href=(format!("/db/{dbe}/event/{}", r.event_id)) { (r.event_id) } }
                            td.mono { (render::text(&r.tenant_id)) "/" (render::text(&r.aggregate_type)) "/" (render::text(&r.aggregate_id)) }
                            td.n { (r.seq_epoch) ":" (r.seq) }
                            td.mono { (render::text(&r.event_type)) }
                            td.n { (r.attempts) }
                            td { (render::time(r.dead_at)) }
                            td { (render::opt(r.last_error.as_deref())) }
                            td.n { (num(r.payload_bytes as i64)) }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}
