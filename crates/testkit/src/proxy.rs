//! A TCP proxy a test can cut, stall and restore: a broker outage without stopping the shared
//! broker (other tests run against it in parallel). It counts the bytes it forwards, so that a
//! fault test can cut *while* the relay is sending a batch rather than between batches.
//! Hand-written because it is a few dozen lines over tokio, and no maintained crate offers a
//! cuttable, stallable, counting loopback proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forwards both ways.
    Up,
    /// Keeps connections open but moves no byte and reads none, so the peers' socket buffers fill
    /// up: a broker that stopped reading (RabbitMQ under a resource alarm) or a hung network.
    Stalled,
    /// Drops every connection and refuses new ones.
    Cut,
}

/// A proxy from a local port to `upstream`.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:<random port> to `upstream` (host:port).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (tx, _) = watch::channel(Mode::Up);
        let mode = Arc::new(tx);
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let (mode2, sent2, received2) = (mode.clone(), sent.clone(), received.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if *mode2.borrow() == Mode::Cut {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let (mode, sent, received) = (mode2.clone(), sent2.clone(), received2.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    // Small writes must reach the other side as they come, as they would without us.
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let mut cut = mode.subscribe();
                    tokio::select! {
                        _ = pump(cr, sw, mode.subscribe(), &sent) => {}
                        _ = pump(sr, cw, mode.subscribe(), &received) => {}
                        _ = async { while cut.changed().await.is_ok() { if *cut.borrow() == Mode::Cut { break; } } } => {}
                    }
                });
            }
        });
        Self {
            addr,
            mode,
            sent,
            received,
            task,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Keeps connections open but forwards nothing and reads nothing until restored.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stalled);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Up);
    }

    /// Whether the proxy accepts connections (not cut).
    pub fn is_up(&self) -> bool {
        *self.mode.borrow() != Mode::Cut
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

/// Copies `from` to `to` while the mode allows, counting into `counter`; waits (reading
/// nothing) while stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    counter: &AtomicU64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while *mode.borrow_and_update() == Mode::Stalled {
            if mode.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *mode.borrow_and_update() == Mode::Stalled {
            if mode.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Ends the forwarding tasks too, so no connection outlives the test's proxy.
        self.cut();
        self.task.abort();
    }
}
