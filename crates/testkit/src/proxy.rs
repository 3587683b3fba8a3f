//! A TCP proxy a test can cut, stall and restore: a broker outage without stopping the shared
//! broker (other tests run against it in parallel). Hand-written because it is a few dozen lines
//! over tokio, and no maintained crate offers a cuttable, stallable loopback proxy.

use std::net::SocketAddr;
use std::sync::Arc;

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
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:<random port> to `upstream` (host:port).
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (tx, _) = watch::channel(Mode::Up);
        let mode = Arc::new(tx);
        let upstream = upstream.to_string();
        let mode2 = mode.clone();
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
                let mode = mode2.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let mut cut = mode.subscribe();
                    tokio::select! {
                        _ = pump(cr, sw, mode.subscribe()) => {}
                        _ = pump(sr, cw, mode.subscribe()) => {}
                        _ = async { while cut.changed().await.is_ok() { if *cut.borrow() == Mode::Cut { break; } } } => {}
                    }
                });
            }
        });
        Self { addr, mode, task }
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
}

/// Copies `from` to `to` while the mode allows; waits (reading nothing) while stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
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
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
