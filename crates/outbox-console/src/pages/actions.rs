//! Replay and purge: a dry-run page (the count, a sample, a confirmation form that carries the
//! dry run's moment and count) and the result page (what was done, and the difference from what
//! was shown). Purge needs an explicit confirmation box. Every step needs an operator session and
//! the session's CSRF token.

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Form;
use chrono::{DateTime, SecondsFormat, Utc};
use maud::{html, Markup};
use outbox::console::actions::{self, Action, Applied, Preview};
use outbox::console::dead_groups;
use serde::Deserialize;
use sqlx::PgPool;

use super::filters::{Carried, DeadQuery, ParkedQuery};
use super::{consumer_db, layout, outbox_db};
use crate::guard::Ctx;
use crate::render::{self, enc, num};
use crate::sessions::Session;
use crate::AppState;

/// Replay and purge buttons posting `hidden` (a filter) to the dry run at `url`; nothing for a
/// reader without a session.
pub(crate) fn buttons(ctx: &Ctx, url: &str, hidden: Markup) -> Markup {
    html! {
        @if let Some(s) = &ctx.session {
            form.inline method="post" action=(url) {
                (hidden)
                input type="hidden" name="csrf" value=(s.csrf);
                button.replay type="submit" name="action" value="replay" { "Replay…" }
                " "
                button.purge type="submit" name="action" value="purge" { "Purge…" }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct PreviewForm<Q> {
    #[serde(flatten)]
    q: Q,
    #[serde(default)]
    action: String,
    #[serde(default)]
    csrf: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ApplyForm<Q> {
    #[serde(flatten)]
    q: Q,
    #[serde(default)]
    action: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    as_of: String,
    #[serde(default)]
    shown: String,
    confirm: Option<String>,
}

impl<Q> ApplyForm<Q> {
    /// The operator's session (CSRF token checked), the action and the dry run it confirms; a
    /// purge needs its confirmation box. `Err`: the refusal (nothing was changed).
    #[allow(clippy::result_large_err)]
    fn checked(&self, ctx: &Ctx) -> Result<(Session, Action, Preview), Response> {
        let s = ctx.actor(&self.csrf)?.clone();
        let action = parse_action(&self.action)?;
        let preview = parse_preview(&self.as_of, &self.shown)?;
        if action == Action::Purge && self.confirm.as_deref() != Some("yes") {
            return Err(bad("a purge needs its confirmation box ticked"));
        }
        Ok((s, action, preview))
    }
}

fn bad(why: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        layout::bare("Nothing was changed", why),
    )
        .into_response()
}

/// What every dry run checks first, in this order: the operator (session and CSRF token), the
/// database, the action and the filter; the first that fails answers the request.
#[allow(clippy::result_large_err)]
fn preview_start<F>(
    ctx: &Ctx,
    csrf: &str,
    pool: Result<PgPool, Response>,
    action: &str,
    filter: Result<F, String>,
) -> Result<(Session, PgPool, Action, F), Response> {
    let s = ctx.actor(csrf)?.clone();
    let pool = pool?;
    let action = parse_action(action)?;
    let filter = filter.map_err(|e| bad(&e))?;
    Ok((s, pool, action, filter))
}

/// What every apply checks first, in this order: the form (operator, CSRF token, action and the
/// dry run it applies), the database and the filter; the first that fails answers the request.
#[allow(clippy::result_large_err)]
fn apply_start<F>(
    checked: Result<(Session, Action, Preview), Response>,
    pool: Result<PgPool, Response>,
    filter: Result<F, String>,
) -> Result<(Session, Action, Preview, PgPool, F), Response> {
    let (s, action, preview) = checked?;
    let pool = pool?;
    let filter = filter.map_err(|e| bad(&e))?;
    Ok((s, action, preview, pool, filter))
}

#[allow(clippy::result_large_err)]
fn parse_action(s: &str) -> Result<Action, Response> {
    Action::parse(s).ok_or_else(|| bad("choose replay or purge"))
}

#[allow(clippy::result_large_err)]
fn parse_preview(as_of: &str, shown: &str) -> Result<Preview, Response> {
    let as_of = DateTime::parse_from_rfc3339(as_of)
        .map_err(|_| bad("the confirmation lost its dry run's time: start from the dry run again"))?
        .with_timezone(&Utc);
    let count = shown.parse().map_err(|_| {
        bad("the confirmation lost its dry run's count: start from the dry run again")
    })?;
    Ok(Preview { count, as_of })
}

fn verb(a: Action) -> &'static str {
    match a {
        Action::Replay => "Replay",
        Action::Purge => "Purge",
    }
}

fn confirm_form(
    url: &str,
    action: Action,
    hidden: Markup,
    csrf: &str,
    p: &Preview,
    what: &str,
) -> Markup {
    html! {
        form.card.confirm #confirm method="post" action=(url) {
            (hidden)
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="action" value=(action.as_str());
            input type="hidden" name="as_of" value=(p.as_of.to_rfc3339_opts(SecondsFormat::Micros, true));
            input type="hidden" name="shown" value=(p.count);
            @if action == Action::Purge {
                p { strong { "Purged events are never delivered." } " Each purged dead letter becomes a skip marker the relay publishes in its place (header Outbox-Skip: purged), so consumers move past it; its aggregate's held events then flow." }
                label { input #confirm-purge type="checkbox" name="confirm" value="yes" required; " I understand: purge these " (num(p.count)) " " (what) " for good" }
                " "
                button.danger #apply type="submit" { "Purge " (num(p.count)) " " (what) }
            } @else {
                button.primary #apply type="submit" { "Replay " (num(p.count)) " " (what) }
            }
        }
    }
}

fn result_page(
    ctx: &Ctx,
    action: Action,
    applied: &Applied,
    back: &str,
    event_link: impl Fn(&uuid::Uuid) -> String,
    note: &str,
) -> Response {
    let diff = applied.difference();
    layout::page(
        &format!("{} done", verb(action)),
        ctx,
        html! {
            p #result data-done=(applied.done.len()) data-shown=(applied.shown) {
                (verb(action)) " applied to " strong { (num(applied.done.len() as i64)) } " of the " (num(applied.shown)) " shown in the dry run."
            }
            @if diff > 0 {
                p.est #difference { (num(diff)) " of those shown were no longer there (replayed, purged or delivered meanwhile): nothing was done to them." }
            } @else if diff < 0 {
                p.est #difference { (num(-diff)) " more than shown (rows that failed before the dry run but committed after it)." }
            } @else {
                p.ok #difference { "No difference from the dry run." }
            }
            p.muted { (note) " Recorded in outbox_audit under your operator name." }
            @if !applied.done.is_empty() {
                ul {
                    @for id in applied.done.iter().take(100) { li.mono { a href=(event_link(id)) { (id) } } }
                }
            }
            p { a href=(back) { "Back" } }
        },
    )
    .into_response()
}

pub(crate) async fn dead_preview(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path(db): Path<String>,
    Form(f): Form<PreviewForm<DeadQuery>>,
) -> Response {
    let (s, pool, action, filter) = match preview_start(
        &ctx,
        &f.csrf,
        outbox_db(&state, &db),
        &f.action,
        f.q.filter(),
    ) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let p = match actions::preview_dead(&pool, &filter).await {
        Ok(p) => p,
        Err(outbox::OutboxError::Config(e)) => return bad(&e),
        Err(e) => return super::db_error(&db, &e),
    };
    let sample = dead_groups::list(
        &pool,
        &outbox::ops::DeadLetterFilter {
            limit: Some(10),
            ..filter
        },
    )
    .await
    .unwrap_or_default();
    let dbe = enc(&db);
    layout::page(
        &format!("{} dead letters: dry run", verb(action)),
        &ctx,
        html! {
            p #preview data-count=(p.count) {
                strong { (num(p.count)) } " dead letters of " code { (db) } " match " (f.q.describe()) " as of " (render::time(Some(p.as_of))) "."
            }
            @if p.count == 0 { p { "Nothing to do." } } @else {
                @if !sample.is_empty() {
                    p.muted { "The first " (sample.len()) ", newest first:" }
                    ul { @for r in &sample { li.mono { a href=(format!("/db/{dbe}/event/{}", r.event_id)) { (r.event_id) } " " (render::text(&r.aggregate_id)) " seq " (r.seq) } } }
                }
                p.muted { "Applying acts on these rows only: dead letters that fail after this dry run are left out, and the result reports any difference." }
                (confirm_form(&format!("/db/{dbe}/dead/apply"), action, f.q.hidden(), &s.csrf, &p, "dead letters"))
            }
            p { a href=(format!("/db/{dbe}/dead")) { "Cancel" } }
        },
    )
    .into_response()
}

pub(crate) async fn dead_apply(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path(db): Path<String>,
    Form(f): Form<ApplyForm<DeadQuery>>,
) -> Response {
    let (s, action, preview, pool, filter) =
        match apply_start(f.checked(&ctx), outbox_db(&state, &db), f.q.filter()) {
            Ok(x) => x,
            Err(r) => return r,
        };
    match actions::apply_dead(&pool, action, &filter, &preview, &s.operator).await {
        Ok(applied) => {
            tracing::info!(operator = %s.operator, action = action.as_str(), database = %db, done = applied.done.len(), shown = applied.shown, "console action on dead letters");
            let dbe = enc(&db);
            let note = if action == Action::Replay {
                "Replayed dead letters are pending again, in their original order, ahead of their aggregates' later events."
            } else {
                "Purged dead letters became skip markers (or were deleted when no broker could carry them)."
            };
            result_page(
                &ctx,
                action,
                &applied,
                &format!("/db/{dbe}/dead"),
                |id| format!("/db/{dbe}/event/{id}"),
                note,
            )
        }
        Err(outbox::OutboxError::Config(e)) => bad(&e),
        Err(e) => super::db_error(&db, &e),
    }
}

pub(crate) async fn parked_preview(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path(db): Path<String>,
    Form(f): Form<PreviewForm<ParkedQuery>>,
) -> Response {
    let (s, pool, action, filter) = match preview_start(
        &ctx,
        &f.csrf,
        consumer_db(&state, &db),
        &f.action,
        f.q.filter(),
    ) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let p = match actions::preview_parked(&pool, &filter).await {
        Ok(p) => p,
        Err(outbox::OutboxError::Config(e)) => return bad(&e),
        Err(e) => return super::db_error(&db, &e),
    };
    let dbe = enc(&db);
    layout::page(
        &format!("{} parked events: dry run", verb(action)),
        &ctx,
        html! {
            p #preview data-count=(p.count) {
                strong { (num(p.count)) } " parked events of " code { (db) } " match " (f.q.describe()) " as of " (render::time(Some(p.as_of))) "."
            }
            @if p.count == 0 { p { "Nothing to do." } } @else {
                @if action == Action::Replay {
                    p.muted { "A replay asks the running consumer to apply them again (within its replay poll), each aggregate in order, with the events parked behind them." }
                } @else {
                    p.muted { "A purge skips them for good: never applied, their aggregates' positions move past them (recorded in outbox_consumer_skip). Refused while an earlier parked event of the same aggregate would stay parked." }
                }
                (confirm_form(&format!("/consumers/{dbe}/apply"), action, f.q.hidden(), &s.csrf, &p, "parked events"))
            }
            p { a href=(format!("/consumers/{dbe}")) { "Cancel" } }
        },
    )
    .into_response()
}

pub(crate) async fn parked_apply(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Path(db): Path<String>,
    Form(f): Form<ApplyForm<ParkedQuery>>,
) -> Response {
    let (s, action, preview, pool, filter) =
        match apply_start(f.checked(&ctx), consumer_db(&state, &db), f.q.filter()) {
            Ok(x) => x,
            Err(r) => return r,
        };
    let consumer = filter.consumer.clone().unwrap_or_default();
    match actions::apply_parked(&pool, action, &filter, &preview, &s.operator).await {
        Ok(applied) => {
            tracing::info!(operator = %s.operator, action = action.as_str(), database = %db, done = applied.done.len(), shown = applied.shown, "console action on parked events");
            let dbe = enc(&db);
            let note = if action == Action::Replay {
                "The running consumer applies them within its replay poll."
            } else {
                "Purged parked events are skipped; their aggregates moved past them."
            };
            let ce = enc(&consumer);
            result_page(
                &ctx,
                action,
                &applied,
                &format!("/consumers/{dbe}"),
                |id| format!("/consumers/{dbe}/event/{ce}/{id}"),
                note,
            )
        }
        Err(outbox::OutboxError::Config(e)) => bad(&e),
        Err(e) => super::db_error(&db, &e),
    }
}
