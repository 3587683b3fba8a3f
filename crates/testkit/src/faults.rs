//! Fault injection for soak tests: a TCP proxy that can be cut and that counts the bytes it
//! forwards (so a test can cut *while* the relay is publishing, not between batches), a tally of
//! the faults a run injected, and the seed / duration settings of a soak run.
//!
//! The proxy is separate from [`crate::proxy::Proxy`] because it forwards each direction by hand
//! to count bytes; the simpler proxy stays as it is for the tests that only need an outage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A loopback TCP proxy to one upstream that a test can cut (every open connection is dropped
/// and new ones are refused) and restore, and that counts the bytes it forwards.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts forwarding 127.0.0.1:<random port> to `upstream` (host:port).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (tx, _) = watch::channel(true);
        let up = Arc::new(tx);
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let (up2, sent2, received2) = (up.clone(), sent.clone(), received.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !*up2.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = up2.subscribe();
                let (upstream, sent, received) =
                    (upstream.clone(), sent2.clone(), received2.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    // Small writes must reach the other side as they come, as they would without us.
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, &sent) => {}
                        _ = pump(sr, cw, &received) => {}
                        _ = async { while cut.changed().await.is_ok() { if !*cut.borrow() { break; } } } => {}
                    }
                });
            }
        });
        Self {
            addr,
            up,
            sent,
            received,
            task,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    /// Whether the proxy accepts connections.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Bytes forwarded from clients to the upstream so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the upstream to clients so far.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until at least `min_bytes` more go from clients to the upstream (a relay started
    /// sending a batch), at most `within`. Returns whether they did.
    pub async fn wait_for_traffic(&self, min_bytes: u64, within: Duration) -> bool {
        let start = self.bytes_sent();
        let end = tokio::time::Instant::now() + within;
        // Polling every millisecond: a batch of a hundred small events is sent in a few.
        while tokio::time::Instant::now() < end {
            if self.bytes_sent() >= start + min_bytes {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        false
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn pump(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, counter: &AtomicU64) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// How many faults of each kind a run injected (shared between the injector and the report).
#[derive(Debug, Clone, Default)]
pub struct FaultTally(Arc<Mutex<BTreeMap<&'static str, u64>>>);

impl FaultTally {
    /// An empty tally.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one fault of `kind`.
    pub fn record(&self, kind: &'static str) {
        *self.0.lock().expect("tally lock").entry(kind).or_insert(0) += 1;
    }

    /// Faults of `kind` so far.
    pub fn get(&self, kind: &str) -> u64 {
        self.0
            .lock()
            .expect("tally lock")
            .get(kind)
            .copied()
            .unwrap_or(0)
    }

    /// Every kind with its count, `kind=n` separated by spaces, in name order.
    pub fn summary(&self) -> String {
        self.0
            .lock()
            .expect("tally lock")
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The seed of a soak run: `SOAK_SEED` when set (to replay a failure), otherwise a random one.
pub fn soak_seed() -> u64 {
    match std::env::var("SOAK_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SOAK_SEED must be an unsigned integer, got {s:?}")),
        Err(_) => rand::random(),
    }
}

/// How long the fault phase of a soak runs: `SOAK_SECONDS`, otherwise `default_secs`.
pub fn soak_duration(default_secs: u64) -> Duration {
    let secs = std::env::var("SOAK_SECONDS")
        .ok()
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("SOAK_SECONDS must be a whole number, got {s:?}"))
        })
        .unwrap_or(default_secs);
    Duration::from_secs(secs.max(1))
}
