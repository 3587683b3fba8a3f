//! The frame of every page.

use axum::response::Html;
use maud::{html, Markup, DOCTYPE};

use crate::guard::Ctx;

fn head(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        meta name="referrer" content="same-origin";
        title { (title) " · outbox console" }
        link rel="stylesheet" href="/static/console.css";
    }
}

/// A full page with the navigation and the operator's state.
pub(crate) fn page(title: &str, ctx: &Ctx, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head { (head(title)) }
                body {
                    header {
                        nav {
                            a.brand href="/" { "outbox console" }
                        }
                        div.who {
                            @match &ctx.session {
                                Some(s) => {
                                    "operator " strong #operator { (s.operator) }
                                    form.inline method="post" action="/logout" {
                                        input type="hidden" name="csrf" value=(s.csrf);
                                        button type="submit" { "Log out" }
                                    }
                                }
                                None => {
                                    span.muted { "read-only (anonymous)" } " "
                                    a href="/login" { "Log in to act" }
                                }
                            }
                        }
                    }
                    main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

/// A page with a message only (errors, refusals).
pub(crate) fn bare(title: &str, message: &str) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head { (head(title)) }
                body {
                    main {
                        h1 { (title) }
                        p.message { (crate::render::text(message)) }
                        p { a href="/" { "Back to the overview" } }
                    }
                }
            }
        }
        .into_string(),
    )
}
