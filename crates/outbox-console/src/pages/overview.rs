//! The first page: every outbox database's state and every consumer database's consumers.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use futures::future::join_all;
use maud::{html, Markup};
use outbox::console::estimate::Count;
use outbox::console::overview::{self, Backlog, MinuteCount, Overview};
use outbox::console::parked::{self, ConsumerSummary};

use super::{db_error_text, layout};
use crate::guard::Ctx;
use crate::render::{self, enc, num};
use crate::AppState;

pub(crate) async fn page(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
) -> Response {
    let outboxes = join_all(
        state
            .config
            .outboxes
            .iter()
            .map(|d| async move { (d.name.clone(), overview::overview(&d.pool).await) }),
    )
    .await;
    let consumers = join_all(
        state
            .config
            .consumers
            .iter()
            .map(|d| async move { (d.name.clone(), parked::consumers(&d.pool).await) }),
    )
    .await;
    layout::page(
        "Overview",
        &ctx,
        html! {
            @for (name, o) in &outboxes {
                section.card.outbox data-db=(name) {
                    h2 { "Outbox database " code { (name) } }
                    @match o {
                        Ok(o) => (outbox_card(name, o)),
                        Err(e) => p.error { (db_error_text(name, e)) },
                    }
                }
            }
            @for (name, c) in &consumers {
                section.card.consumers data-db=(name) {
                    h2 { "Consumer database " code { (name) } }
                    @match c {
                        Ok(c) => (consumers_table(name, c)),
                        Err(e) => p.error { (db_error_text(name, e)) },
                    }
                }
            }
        },
    )
    .into_response()
}

fn count(id: &str, label: &str, c: Count, class: &str) -> Markup {
    html! {
        div class=(format!("count {class}")) id=(id) {
            div.v {
                @if c.is_estimate() { "≈ " }
                (num(c.value()))
            }
            div.k { (label) @if c.is_estimate() { " " span.est title="more rows than are counted on a page view: the planner's estimate" { "(estimate)" } } }
        }
    }
}

fn outbox_card(name: &str, o: &Overview) -> Markup {
    let dead_class = if o.dead.value() > 0 { "bad" } else { "" };
    let held_class = if o.held.value() > 0 { "warn" } else { "" };
    html! {
        div.counts {
            (count(&format!("pending-{name}"), "pending", o.pending, ""))
            (count(&format!("held-{name}"), "held behind a dead letter", o.held, held_class))
            (count(&format!("dead-{name}"), "dead letters", o.dead, dead_class))
            (count(&format!("published-{name}"), "published (kept)", o.published, ""))
            div.count {
                div.v { @match o.oldest_pending_age_seconds { Some(a) => (render::seconds(a)), None => "-" } }
                div.k { "oldest pending" }
            }
        }
        p {
            a href=(format!("/db/{}/dead", enc(name))) { "Dead letters by failure and by aggregate" }
            " · "
            a href=(format!("/db/{}/dead/list", enc(name))) { "all dead letters" }
        }
        @match o.held_orphaned {
            Some(0) => {},
            Some(n) => p.error { (num(n)) " held events have no dead letter ahead of them: nothing releases them (docs/outbox-table.md, \"Writers' isolation level\")." },
            None => p.muted { "Orphaned held events are not checked at this size; the relay's gauge outbox_held_orphaned_events has them." },
        }
        h3 { "Published per minute, last " (overview::CHART_MINUTES) " minutes" }
        (chart(&o.published_per_minute))
        p.muted {
            "From outbox_published.published_at (rows kept for retention); with --retention-hours 0 nothing is kept and the chart stays empty: use the relay's outbox_events_published_total. "
            "Last publish in this database: " (render::time(o.last_published_at))
        }
        h3 { "Relays" }
        @if o.relays.is_empty() {
            p.muted { "No relay has a heartbeat row." }
        } @else {
            table.relays {
                tr { th { "relay" } th { "host / pid" } th { "started" } th { "heartbeat" } th { "partitions" } }
                @for r in &o.relays {
                    tr {
                        td.mono { (render::text(&r.relay_id)) }
                        td { (render::text(&r.host)) " / " (r.pid) }
                        td { (render::time(Some(r.started_at))) }
                        td { (render::time(Some(r.heartbeat_at))) }
                        td { (r.partitions.len()) ": " span.mono.muted { (ranges(&r.partitions)) } }
                    }
                }
            }
        }
        p.muted {
            "Per-relay progress is not stored in the database: the last publish above is the database's; each relay's /metrics has outbox_relay_seconds_since_progress. "
            @if !o.unowned_partitions.is_empty() {
                "Partitions without a live lease: " (ranges(&o.unowned_partitions)) "."
            }
        }
        @if !o.route_holds.is_empty() {
            h3 { "Routes held back (the broker refuses them)" }
            table {
                tr { th { "route" } th { "relay" } th.n { "refusals" } th { "since" } th { "oldest event" } th { "last error" } }
                @for h in &o.route_holds {
                    tr {
                        td.mono { (render::text(&h.route)) }
                        td.mono { (render::text(&h.relay_id)) }
                        td.n { (h.refusals) }
                        td { (render::time(Some(h.since))) }
                        td { (render::time(Some(h.oldest_event_at))) }
                        td { (render::text(&h.last_error)) }
                    }
                }
            }
        }
        h3 { "Backlog per tenant" }
        (backlog(name, &o.by_tenant, "tenant"))
        h3 { "Backlog per event type" }
        (backlog(name, &o.by_event_type, "event type"))
    }
}

/// `0-3, 7, 9-12`.
fn ranges(p: &[i16]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let mut j = i;
        while j + 1 < p.len() && p[j + 1] == p[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            p[i].to_string()
        } else {
            format!("{}-{}", p[i], p[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

fn chart(m: &[MinuteCount]) -> Markup {
    let max = m.iter().map(|c| c.published).max().unwrap_or(0).max(1) as f64;
    let w = 36.0;
    html! {
        svg.chart viewBox=(format!("0 0 {} 100", m.len() as f64 * w)) preserveAspectRatio="none" role="img" aria-label="published per minute" {
            @for (i, c) in m.iter().enumerate() {
                @let h = (c.published as f64 / max * 96.0).max(if c.published > 0 { 1.0 } else { 0.0 });
                rect x=(i as f64 * w + 3.0) y=(100.0 - h) width=(w - 6.0) height=(h) {
                    title { (c.minute.format("%H:%M")) ": " (num(c.published)) " published (" (format!("{:.1}", c.published as f64 / 60.0)) "/s)" }
                }
            }
        }
        p.muted.mono {
            @for (i, c) in m.iter().enumerate() {
                @if i > 0 { " · " }
                (c.minute.format("%H:%M")) " " (format!("{:.1}/s", c.published as f64 / 60.0))
            }
        }
    }
}

fn backlog(db: &str, b: &Backlog, what: &str) -> Markup {
    html! {
        @if let Some(n) = b.sampled_rows {
            p.est { "Estimate: counted in a sample of " (num(n)) " rows and scaled to the table's size." }
        }
        @if b.rows.is_empty() {
            p.muted { "Nothing pending, held or dead." }
        } @else {
            table {
                tr { th { (what) } th.n { "pending" } th.n { "held" } th.n { "dead" } }
                @for r in &b.rows {
                    tr {
                        td.mono {
                            @if what == "tenant" && r.dead > 0 {
                                a href=(format!("/db/{}/dead/list?tenant={}", enc(db), enc(&r.key))) { (render::text(&r.key)) }
                            } @else { (render::text(&r.key)) }
                        }
                        td.n { (num(r.pending)) } td.n { (num(r.held)) } td.n { (num(r.dead)) }
                    }
                }
            }
        }
    }
}

fn consumers_table(db: &str, c: &[ConsumerSummary]) -> Markup {
    html! {
        @if c.is_empty() {
            p.muted { "No consumer has recorded anything in this database." }
        } @else {
            table {
                tr { th { "consumer" } th.n { "parked" } th { "by reason" } th.n { "replay asked" } th.n { "waiting for a gap" } th { "last applied" } }
                @for s in c {
                    tr {
                        td.mono { (render::text(&s.consumer)) }
                        td.n.parked { (num(s.parked())) }
                        td { @for (r, n) in &s.parked_by_reason { span.tag.parked { (render::text(r)) " " (num(*n)) } " " } }
                        td.n { (num(s.replay_requested)) }
                        td.n { (num(s.waiting_for_gap)) }
                        td { (render::time(s.last_applied_at)) }
                    }
                }
            }
        }
        p { a href=(format!("/consumers/{}", enc(db))) { "Parked events by failure and by aggregate" } }
    }
}
