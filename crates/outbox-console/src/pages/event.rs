//! One outbox event: its fields, headers, payload (cut at 64 KiB, the rest as a download), error
//! and history, with replay and purge when it is a dead letter.

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use outbox::console::event::{self, PAYLOAD_PREVIEW_BYTES};
use uuid::Uuid;

use super::actions::buttons;
use super::filters::{Carried, DeadQuery};
use super::{db_error, layout, not_found, outbox_db};
use crate::guard::Ctx;
use crate::render::{self, enc, num};
use crate::AppState;

/// The payload as shown on a page: the head, and a download link when it was cut.
pub(crate) fn payload_block(head: &[u8], total: i32, download: &str) -> Markup {
    let cut = total > PAYLOAD_PREVIEW_BYTES;
    // A cut can split a UTF-8 character: show the head's valid prefix as text in that case.
    let shown: &[u8] = if cut {
        match std::str::from_utf8(head) {
            Ok(_) => head,
            Err(e) if e.error_len().is_none() => &head[..e.valid_up_to()],
            Err(_) => head,
        }
    } else {
        head
    };
    html! {
        @if cut {
            p.est #payload-truncated {
                "Payload of " (num(total as i64)) " bytes: the first " (num(shown.len() as i64)) " are shown. "
                a #payload-download href=(download) download { "Download the whole payload" }
            }
        } @else {
            p.muted { (num(total as i64)) " bytes. " a href=(download) download { "Download" } }
        }
        (render::payload(shown))
    }
}

pub(crate) async fn page(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path((db, id)): Path<(String, Uuid)>,
) -> Response {
    let pool = match outbox_db(&state, &db) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let e = match event::event(&pool, id).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            return not_found(
                "no event with that id (never written, or published and past retention)",
            )
        }
        Err(e) => return db_error(&db, &e),
    };
    let dbe = enc(&db);
    let headers = serde_json::to_string_pretty(&e.headers).unwrap_or_default();
    let agg = DeadQuery {
        tenant: Some(e.tenant_id.clone()),
        aggregate_type: Some(e.aggregate_type.clone()),
        aggregate_id: Some(e.aggregate_id.clone()),
        ..Default::default()
    };
    layout::page(
        &format!("Event {id}"),
        &ctx,
        html! {
            dl.kv {
                dt { "state" } dd { span class=(format!("tag {}", e.status)) #status { (e.status) } }
                dt { "aggregate" } dd.mono { (render::text(&e.tenant_id)) " / " (render::text(&e.aggregate_type)) " / " (render::text(&e.aggregate_id)) }
                dt { "position" } dd { "epoch " (e.seq_epoch) ", seq " (e.seq) }
                dt { "event type" } dd.mono { (render::text(&e.event_type)) }
                dt { "topic" } dd.mono { (render::text(&e.topic)) }
                dt { "written" } dd { (render::time(Some(e.created_at))) }
                dt { "attempts" } dd { (e.attempts) }
                @if e.next_attempt_at.is_some_and(|t| t.timestamp() > 0) { dt { "next attempt" } dd { (render::time(e.next_attempt_at)) } }
                @if e.dead_at.is_some() { dt { "dead-lettered" } dd { (render::time(e.dead_at)) } }
                @if e.published_at.is_some() { dt { "published" } dd { (render::time(e.published_at)) } }
                dt { "error" } dd #error { (render::opt(e.last_error.as_deref())) }
                @if let Some(g) = &e.error_group { dt { "failure group" } dd.mono { (render::text(g)) } }
                dt { "held in its aggregate" } dd { (num(e.held_in_aggregate)) }
            }
            @if e.status == "dead" {
                p {
                    "This event: " (buttons(&ctx, &format!("/db/{dbe}/dead/preview"), DeadQuery { event_id: Some(id.to_string()), ..Default::default() }.hidden()))
                    " · its aggregate's dead letters: " (buttons(&ctx, &format!("/db/{dbe}/dead/preview"), agg.hidden()))
                }
            }
            h2 { "Headers" }
            pre.payload #headers { (render::text_with(&headers, true)) }
            h2 { "Payload" }
            (payload_block(&e.payload_head, e.payload_bytes, &format!("/db/{dbe}/event/{id}/payload")))
            h2 { "History" }
            @if e.history.is_empty() { p.muted { "No operator action named this event." } } @else {
                table #history {
                    tr { th { "when" } th { "action" } th { "operator" } th.n { "events in the action" } }
                    @for h in &e.history {
                        tr { td { (render::time(Some(h.at))) } td { (render::text(&h.action)) } td { (render::text(&h.actor)) } td.n { (h.event_ids.len()) } }
                    }
                }
            }
        },
    )
    .into_response()
}

pub(crate) async fn payload(
    State(state): State<Arc<AppState>>,
    Path((db, id)): Path<(String, Uuid)>,
) -> Response {
    let pool = match outbox_db(&state, &db) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match event::payload(&pool, id).await {
        Ok(Some(b)) => download(id, b),
        Ok(None) => not_found("no event with that id"),
        Err(e) => db_error(&db, &e),
    }
}

/// Bytes as an attachment the browser saves, never renders.
pub(crate) fn download(id: Uuid, bytes: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.payload\""),
            ),
        ],
        bytes,
    )
        .into_response()
}
