//! Logging in (the token is posted in the form's body, never put into a URL) and out.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::html;
use serde::Deserialize;

use super::layout;
use crate::guard::Ctx;
use crate::sessions::{self, COOKIE};
use crate::AppState;

fn login_page(ctx: &Ctx, error: Option<&str>) -> axum::response::Html<String> {
    layout::page(
        "Log in",
        ctx,
        html! {
            @if let Some(e) = error { p.error #login-error { (e) } }
            form.card method="post" action="/login" {
                p { "Operators are listed with --tokens-file or OUTBOX_CONSOLE_TOKENS (NAME:TOKEN). Actions are recorded under the operator's name." }
                label { "Token " input type="password" name="token" autocomplete="off" required autofocus; }
                " "
                button.primary type="submit" { "Log in" }
            }
        },
    )
}

pub(crate) async fn form(Extension(ctx): Extension<Ctx>) -> Response {
    login_page(&ctx, None).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    token: String,
}

pub(crate) async fn submit(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Form(f): Form<LoginForm>,
) -> Response {
    let Some(op) = state.config.operators.authenticate(&f.token) else {
        tracing::warn!("console login refused: unknown token");
        return (
            StatusCode::UNAUTHORIZED,
            login_page(&ctx, Some("That token belongs to no operator.")),
        )
            .into_response();
    };
    let s = state.sessions.open(&op.name);
    tracing::info!(operator = %op.name, "console login");
    let secure = if state.config.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        s.id,
        sessions::TTL.as_secs()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

#[derive(Deserialize)]
pub(crate) struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn logout(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<Ctx>,
    Form(f): Form<LogoutForm>,
) -> Response {
    let s = match ctx.actor(&f.csrf) {
        Ok(s) => s,
        Err(r) => return r,
    };
    state.sessions.close(&s.id);
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}
