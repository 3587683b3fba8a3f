//! What every request passes before a page sees it: the `Host` check (no DNS rebinding), the
//! `Origin` check (no cross-site request changes anything), the session lookup, the access rule
//! (a session, or `anonymous_read` for reading), and the security headers on every response.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use crate::sessions::{self, Session};
use crate::AppState;

/// No script at all (none is served), styles from the console only, forms only to the console,
/// never framed.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";

/// `Host` header values the console answers to.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    /// The listening address itself; for a loopback or unspecified address also `localhost`,
    /// `127.0.0.1` and `[::1]` with its port; and each of `extra` (as given, and with the port
    /// appended when it has none).
    pub fn new(addr: SocketAddr, extra: &[String]) -> Self {
        let port = addr.port();
        let mut v = vec![addr.to_string()];
        if addr.ip().is_loopback() || addr.ip().is_unspecified() {
            v.push(format!("localhost:{port}"));
            v.push(format!("127.0.0.1:{port}"));
            v.push(format!("[::1]:{port}"));
        }
        for h in extra {
            let h = h.trim().to_ascii_lowercase();
            if h.is_empty() {
                continue;
            }
            if !h.contains(':') || h.ends_with(']') {
                v.push(format!("{h}:{port}"));
            }
            v.push(h);
        }
        Self(v)
    }

    /// Whether `host` (a `Host` header value) is one of them.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.0.contains(&host)
    }
}

/// What a page knows about who asks.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The operator's session, if logged in.
    pub session: Option<Session>,
    /// Reading without a session is allowed.
    pub anonymous_read: bool,
}

impl Ctx {
    /// The session of an operator allowed to act with the form's CSRF token `csrf`; `Err` is the
    /// response refusing it (nothing was changed).
    #[allow(clippy::result_large_err)]
    pub(crate) fn actor(&self, csrf: &str) -> Result<&Session, Response> {
        let Some(s) = &self.session else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "log in as an operator to act: nothing was changed",
            ));
        };
        if !sessions::csrf_ok(s, csrf) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or not this session's: nothing was changed; reload the page and try again",
            ));
        }
        Ok(s)
    }
}

pub(crate) fn refuse(status: StatusCode, why: &str) -> Response {
    let body = crate::pages::layout::bare("Refused", why);
    (status, body).into_response()
}

/// The session id in the request's `Cookie` header.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == sessions::COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The middleware.
pub(crate) async fn guard(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let mut resp = check(&state, &mut req).await;
    let resp = match resp.take() {
        Some(r) => r,
        None => next.run(req).await,
    };
    secure_headers(resp)
}

async fn check(state: &AppState, req: &mut Request) -> Option<Response> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !state.hosts.allows(host) {
        return Some(refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this console does not answer to that host name (start it with --allowed-host to add one)",
        ));
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    match headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or(""))
    {
        Some(origin) => {
            let same = origin.eq_ignore_ascii_case(&format!("http://{host}"))
                || origin.eq_ignore_ascii_case(&format!("https://{host}"));
            if !same {
                return Some(refuse(
                    StatusCode::FORBIDDEN,
                    "request from another origin: nothing was changed",
                ));
            }
        }
        None if !safe => {
            return Some(refuse(
                StatusCode::FORBIDDEN,
                "a request that changes something must carry its Origin header: nothing was changed",
            ));
        }
        None => {}
    }
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "cross-site request: nothing was changed",
        ));
    }
    let session = session_cookie(headers).and_then(|id| state.sessions.find(&id));
    let path = req.uri().path();
    let open = path == "/login" || path.starts_with("/static/");
    if !open && session.is_none() {
        if !safe {
            return Some(refuse(
                StatusCode::UNAUTHORIZED,
                "log in as an operator to act: nothing was changed",
            ));
        }
        if !state.config.anonymous_read {
            return Some(Redirect::to("/login").into_response());
        }
    }
    req.extensions_mut().insert(Ctx {
        session,
        anonymous_read: state.config.anonymous_read,
    });
    None
}

fn secure_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, "content-security-policy", CSP);
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    // Not `no-referrer`: under it Chromium sends `Origin: null` with a form POST, which the
    // Origin check must refuse (found by the browser test).
    set(h, "referrer-policy", "same-origin");
    set(h, "cross-origin-opener-policy", "same-origin");
    set(h, "cross-origin-resource-policy", "same-origin");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let a = AllowedHosts::new(
            "127.0.0.1:8089".parse().unwrap(),
            &["console.example".into()],
        );
        assert!(a.allows("127.0.0.1:8089"));
        assert!(a.allows("LOCALHOST:8089"));
        assert!(a.allows("console.example:8089"));
        assert!(a.allows("console.example"));
        assert!(!a.allows("evil.example:8089"));
        assert!(!a.allows("localhost:8090"));
        assert!(!a.allows(""));
    }
}
