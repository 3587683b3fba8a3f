//! A consumer database: its consumers, their parked events grouped by failure and by aggregate,
//! a filtered list, and one parked event with its stored message.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;
use outbox::console::parked;
use outbox::consumers::dead_letters;
use uuid::Uuid;

use super::actions::buttons;
use super::event::{download, payload_block};
use super::filters::{Carried, ParkedQuery};
use super::{consumer_db, db_error, layout, not_found};
use crate::guard::Ctx;
use crate::render::{self, enc, num};
use crate::AppState;

pub(crate) async fn page(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path(db): Path<String>,
) -> Response {
    let pool = match consumer_db(&state, &db) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (summary, groups, aggs) = match tokio::try_join!(
        parked::consumers(&pool),
        parked::by_error(&pool),
        parked::by_aggregate(&pool)
    ) {
        Ok(x) => x,
        Err(e) => return db_error(&db, &e),
    };
    let dbe = enc(&db);
    let preview = format!("/consumers/{dbe}/preview");
    layout::page(
        &format!("Consumers of {db}"),
        &ctx,
        html! {
            h2 { "Consumers" }
            table #consumers {
                tr { th { "consumer" } th.n { "parked" } th { "by reason" } th { "last applied" } }
                @for s in &summary {
                    tr {
                        td.mono { a href=(format!("/consumers/{dbe}/list?consumer={}", enc(&s.consumer))) { (render::text(&s.consumer)) } }
                        td.n { (num(s.parked())) }
                        td { @for (r, n) in &s.parked_by_reason { span.tag.parked { (render::text(r)) " " (num(*n)) } " " } }
                        td { (render::time(s.last_applied_at)) }
                    }
                }
            }
            h2 { "Parked by failure" }
            @if groups.is_empty() { p.muted #no-parked { "No parked events." } } @else {
                table #parked-groups {
                    tr { th { "consumer" } th { "reason" } th { "failure" } th.n { "parked" } th { "first" } th { "last" } th { "" } }
                    @for g in &groups {
                        @let q = ParkedQuery { consumer: Some(g.consumer.clone()), reason: Some(g.reason.clone()), group: Some(g.error_group.clone()), ..Default::default() };
                        tr {
                            td.mono { (render::text(&g.consumer)) }
                            td { span.tag.parked { (render::text(&g.reason)) } }
                            td.mono { a href=(format!("/consumers/{dbe}/list?{}", q.query())) { (render::text(&g.error_group)) } }
                            td.n { (num(g.count)) }
                            td { (render::time(Some(g.first_parked_at))) }
                            td { (render::time(Some(g.last_parked_at))) }
                            td { (buttons(&ctx, &preview, q.hidden())) }
                        }
                    }
                }
            }
            h2 { "Parked by aggregate" }
            @if aggs.is_empty() { p.muted { "None." } } @else {
                table #parked-aggregates {
                    tr { th { "consumer" } th { "producer" } th { "aggregate" } th.n { "parked" } th { "reasons" } th { "first" } th { "" } }
                    @for a in &aggs {
                        @let q = ParkedQuery { consumer: Some(a.consumer.clone()), tenant: a.tenant_id.clone(), aggregate_type: a.aggregate_type.clone(), aggregate_id: a.aggregate_id.clone(), ..Default::default() };
                        tr {
                            td.mono { (render::text(&a.consumer)) }
                            td.mono { (render::text(&a.producer)) }
                            td.mono { a href=(format!("/consumers/{dbe}/list?{}", q.query())) {
                                (render::opt(a.tenant_id.as_deref())) "/" (render::opt(a.aggregate_type.as_deref())) "/" (render::opt(a.aggregate_id.as_deref())) } }
                            td.n { (num(a.count)) }
                            td { @for r in &a.reasons { span.tag.parked { (render::text(r)) } " " } }
                            td { (render::time(Some(a.first_parked_at))) }
                            td { (buttons(&ctx, &preview, q.hidden())) }
                        }
                    }
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
    Query(q): Query<ParkedQuery>,
) -> Response {
    let pool = match consumer_db(&state, &db) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let filter = match q.filter() {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, layout::bare("Bad filter", &e)).into_response(),
    };
    let rows = match dead_letters::list(&pool, &filter, 100).await {
        Ok(r) => r,
        Err(e) => return db_error(&db, &e),
    };
    let dbe = enc(&db);
    layout::page(
        &format!("Parked events of {db}"),
        &ctx,
        html! {
            p { "Filter: " (q.describe()) }
            @if !filter.is_empty() {
                p { "Act on every parked event of this filter (a dry run first): " (buttons(&ctx, &format!("/consumers/{dbe}/preview"), q.hidden())) }
            }
            @if rows.is_empty() { p.muted #no-parked { "No parked events match." } } @else {
                p.muted { "Oldest first, at most 100." }
                table #parked {
                    tr { th { "event" } th { "consumer" } th { "aggregate" } th { "seq" } th { "reason" } th.n { "attempts" } th { "parked" } th { "error" } }
                    @for r in &rows {
                        tr {
                            td.mono { a href=(format!("/consumers/{dbe}/event/{}/{}", enc(&r.consumer), r.event_id)) { (r.event_id) } }
                            td.mono { (render::text(&r.consumer)) }
                            td.mono { (render::opt(r.tenant_id.as_deref())) "/" (render::opt(r.aggregate_type.as_deref())) "/" (render::opt(r.aggregate_id.as_deref())) }
                            td { (r.seq_epoch.map(|e| e.to_string()).unwrap_or("-".into())) ":" (r.seq.map(|e| e.to_string()).unwrap_or("-".into())) }
                            td { span.tag.parked { (render::text(&r.reason)) } @if r.replay_requested_at.is_some() { " " span.tag { "replay asked" } } }
                            td.n { (r.attempts) }
                            td { (render::time(Some(r.parked_at))) }
                            td { (render::opt(r.last_error.as_deref())) }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

pub(crate) async fn event(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path((db, consumer, id)): Path<(String, String, Uuid)>,
) -> Response {
    let pool = match consumer_db(&state, &db) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let e = match parked::parked_event(&pool, &consumer, id).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            return not_found(
                "no parked event with that id for this consumer (applied or purged meanwhile?)",
            )
        }
        Err(e) => return db_error(&db, &e),
    };
    let dbe = enc(&db);
    let one = ParkedQuery {
        consumer: Some(consumer.clone()),
        event_id: Some(id.to_string()),
        ..Default::default()
    };
    layout::page(
        &format!("Parked event {id}"),
        &ctx,
        html! {
            dl.kv {
                dt { "consumer" } dd.mono { (render::text(&e.consumer)) }
                dt { "reason" } dd { span.tag.parked #status { (render::text(&e.reason)) } @if e.replay_requested_at.is_some() { " replay asked " (render::time(e.replay_requested_at)) } }
                dt { "producer" } dd.mono { (render::text(&e.producer)) }
                dt { "aggregate" } dd.mono { (render::opt(e.tenant_id.as_deref())) " / " (render::opt(e.aggregate_type.as_deref())) " / " (render::opt(e.aggregate_id.as_deref())) }
                dt { "position" } dd { (e.seq_epoch.map(|x| x.to_string()).unwrap_or("-".into())) ":" (e.seq.map(|x| x.to_string()).unwrap_or("-".into())) }
                dt { "event type" } dd.mono { (render::opt(e.event_type.as_deref())) }
                dt { "subject" } dd.mono { (render::text(&e.subject)) }
                dt { "parked" } dd { (render::time(Some(e.parked_at))) }
                dt { "attempts" } dd { (e.attempts) }
                dt { "error" } dd #error { (render::opt(e.last_error.as_deref())) }
                dt { "failure group" } dd.mono { (render::text(&e.error_group)) }
            }
            p { "This event: " (buttons(&ctx, &format!("/consumers/{dbe}/preview"), one.hidden())) }
            h2 { "Headers (as received)" }
            pre.payload #headers { (render::text_with(&e.headers_text, true)) }
            h2 { "Payload" }
            (payload_block(&e.payload_head, e.payload_bytes, &format!("/consumers/{dbe}/event/{}/{id}/payload", enc(&consumer))))
        },
    )
    .into_response()
}

pub(crate) async fn payload(
    State(state): State<Arc<AppState>>,
    Path((db, consumer, id)): Path<(String, String, Uuid)>,
) -> Response {
    let pool = match consumer_db(&state, &db) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match parked::parked_payload(&pool, &consumer, id).await {
        Ok(Some(b)) => download(id, b),
        Ok(None) => not_found("no parked event with that id"),
        Err(e) => db_error(&db, &e),
    }
}
