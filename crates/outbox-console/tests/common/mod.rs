//! Helpers of the console's tests: a console served on a free loopback port over a test
//! database, a raw HTTP/1.1 client (so that tests choose every header, `Host` and `Origin`
//! included), seeding.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use outbox_console::{ConsoleConfig, NamedPool, Operators};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub const ALICE: &str = "alice-token-0123456789";
pub const BOB: &str = "bob-token-9876543210xyz";

/// A console serving one outbox database (named `db`) and, as consumer database `cons`, the same
/// database; stopped when dropped.
pub struct Console {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Console {
    pub async fn start(url: &str, anonymous_read: bool) -> Self {
        Self::start_with(url, anonymous_read, Duration::from_secs(2)).await
    }

    pub async fn start_with(url: &str, anonymous_read: bool, timeout: Duration) -> Self {
        let pool = outbox_console::console_pool("db", url, 2, timeout).unwrap();
        let config = ConsoleConfig {
            outboxes: vec![NamedPool {
                name: "db".into(),
                pool: pool.clone(),
            }],
            consumers: vec![NamedPool {
                name: "cons".into(),
                pool,
            }],
            operators: Operators::load(None, Some(&format!("alice:{ALICE},bob:{BOB}"))).unwrap(),
            anonymous_read,
            allowed_hosts: vec![],
            secure_cookie: false,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(outbox_console::serve(listener, config, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            stop: Some(tx),
        }
    }

    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// GET `path` with the session cookie `cookie` (if any).
    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Resp {
        let mut h = vec![];
        let c;
        if let Some(v) = cookie {
            c = format!("outbox_console_session={v}");
            h.push(("Cookie", c.as_str()));
        }
        request(self.addr, "GET", path, &self.addr.to_string(), &h, None).await
    }

    /// POST a form from this console's own origin.
    pub async fn post(&self, path: &str, cookie: Option<&str>, form: &[(&str, &str)]) -> Resp {
        let origin = self.origin();
        let mut h = vec![("Origin", origin.as_str())];
        let c;
        if let Some(v) = cookie {
            c = format!("outbox_console_session={v}");
            h.push(("Cookie", c.as_str()));
        }
        request(
            self.addr,
            "POST",
            path,
            &self.addr.to_string(),
            &h,
            Some(&encode_form(form)),
        )
        .await
    }

    /// Logs in with `token`; the session id and the session's CSRF token.
    pub async fn login(&self, token: &str) -> (String, String) {
        let r = self.post("/login", None, &[("token", token)]).await;
        assert_eq!(r.status, 303, "login: {}", r.body);
        let sid = r.session_cookie().expect("a session cookie");
        let page = self.get("/", Some(&sid)).await;
        let csrf = page.field_value("csrf").expect("a CSRF token in the page");
        (sid, csrf)
    }
}

pub fn encode_form(form: &[(&str, &str)]) -> String {
    form.iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                outbox_console::render::enc(k),
                outbox_console::render::enc(v)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub raw_body: Vec<u8>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn session_cookie(&self) -> Option<String> {
        let c = self.header("set-cookie")?;
        let v = c.split(';').next()?.split_once('=')?.1;
        (!v.is_empty()).then(|| v.to_string())
    }

    /// The value of the first `<input name="NAME" value="...">`.
    pub fn field_value(&self, name: &str) -> Option<String> {
        let key = format!("name=\"{name}\" value=\"");
        let at = self.body.find(&key)? + key.len();
        let end = self.body[at..].find('"')?;
        Some(self.body[at..at + end].to_string())
    }

    /// The value of attribute `attr` of the element with id `id`.
    pub fn attr_of(&self, id: &str, attr: &str) -> Option<String> {
        let at = self.body.find(&format!("id=\"{id}\""))?;
        let tag_start = self.body[..at].rfind('<')?;
        let tag_end = at + self.body[at..].find('>')?;
        let tag = &self.body[tag_start..tag_end];
        let key = format!("{attr}=\"");
        let a = tag.find(&key)? + key.len();
        let e = tag[a..].find('"')?;
        Some(tag[a..a + e].to_string())
    }
}

/// One HTTP/1.1 request with exactly these headers (plus Host, Connection, Content-Length).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    form: Option<&str>,
) -> Resp {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = form {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut body = buf[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
        raw_body: body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

/// Inserts `per_agg` events for each of `aggs` aggregates `a0..` of tenant `t0`, then makes the
/// first event of each aggregate a blocking dead letter with `error` (their later events held).
pub async fn seed_dead(pool: &sqlx::PgPool, aggs: i64, per_agg: i64, error: &str) {
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 't0', 'V', 'a' || (g % $1), 'Bulk', 'bulk.created',
                convert_to(json_build_object('g', g)::text, 'UTF8')
           FROM generate_series(0, $1 - 1) g",
    )
    .bind(aggs)
    .execute(pool)
    .await
    .unwrap();
    dead_letter_all_pending(pool, error).await;
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 't0', 'V', 'a' || (g % $1), 'Bulk', 'bulk.created',
                convert_to(json_build_object('g', g)::text, 'UTF8')
           FROM generate_series($1, $1 * $2 - 1) g ORDER BY g",
    )
    .bind(aggs)
    .bind(per_agg)
    .execute(pool)
    .await
    .unwrap();
}

/// Dead-letters every pending row (blocking, as the relay does by default).
pub async fn dead_letter_all_pending(pool: &sqlx::PgPool, error: &str) {
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', dead_at = now(), attempts = 4, blocks_aggregate = true,
                last_error = $1 || ' ' || event_id
          WHERE status = 'pending'",
    )
    .bind(error)
    .execute(pool)
    .await
    .unwrap();
}

pub async fn count(pool: &sqlx::PgPool, status: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox_event WHERE status = $1")
        .bind(status)
        .fetch_one(pool)
        .await
        .unwrap()
}

pub async fn audit_actors(pool: &sqlx::PgPool) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT action, actor, cardinality(event_ids)::int8 FROM outbox_audit ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

pub mod browser;
