//! Sessions: a successful login gets a random session id (the cookie) and a random CSRF token
//! (put into every form). Kept in memory: a restart logs everyone out, which is the safe side.
//! Ids are compared in constant time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "outbox_console_session";
/// How long a session lasts.
pub const TTL: Duration = Duration::from_secs(12 * 3600);

/// A logged-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    /// Session id (cookie value).
    pub id: String,
    /// Operator name (the audit's actor).
    pub operator: String,
    /// CSRF token of this session.
    pub csrf: String,
    expires: Instant,
}

/// The live sessions.
#[derive(Debug, Default)]
pub struct Sessions(Mutex<Vec<Session>>);

/// 32 random bytes from the OS-seeded generator, as hex.
pub fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Sessions {
    /// Opens a session for `operator`.
    pub fn open(&self, operator: &str) -> Session {
        let s = Session {
            id: random_hex(),
            operator: operator.into(),
            csrf: random_hex(),
            expires: Instant::now() + TTL,
        };
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        all.retain(|s| s.expires > now);
        all.push(s.clone());
        s
    }

    /// The live session with id `id`.
    pub fn find(&self, id: &str) -> Option<Session> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut found = None;
        for s in all.iter() {
            if bool::from(s.id.as_bytes().ct_eq(id.as_bytes())) && s.expires > now {
                found = Some(s.clone());
            }
        }
        found
    }

    /// Ends the session `id`.
    pub fn close(&self, id: &str) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|s| !bool::from(s.id.as_bytes().ct_eq(id.as_bytes())));
    }
}

/// Whether `given` is the session's CSRF token (constant time).
pub fn csrf_ok(session: &Session, given: &str) -> bool {
    bool::from(session.csrf.as_bytes().ct_eq(given.as_bytes()))
}
