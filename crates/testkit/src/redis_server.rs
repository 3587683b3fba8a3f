//! A private `redis-server` for tests that stop, kill or reconfigure the broker: the shared
//! server on 6379 runs with `appendonly no` (Debian's default) and serves other tests.
//!
//! The server runs as a child process on a free loopback port with its data in a directory of
//! its own, configured to keep what it acknowledged (`appendonly yes`, `appendfsync always`,
//! `maxmemory-policy noeviction`) unless the test asks otherwise. [`PrivateRedis::kill`] sends
//! SIGKILL; [`PrivateRedis::restart`] brings it back on the same port and data. Dropping the
//! value kills the server and removes the directory.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `redis-server` binary: `REDIS_SERVER_BIN`, otherwise `/usr/bin/redis-server` or
/// `redis-server` on the `PATH`.
pub fn redis_server_bin() -> String {
    if let Ok(b) = std::env::var("REDIS_SERVER_BIN") {
        return b;
    }
    if std::path::Path::new("/usr/bin/redis-server").exists() {
        return "/usr/bin/redis-server".into();
    }
    "redis-server".into()
}

/// A redis-server child process, killed and its directory removed on drop.
pub struct PrivateRedis {
    /// Loopback port the server listens on (stable across restarts).
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// A durable server (`appendonly yes`, `appendfsync always`, `noeviction`).
    pub async fn start() -> Self {
        Self::start_with(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--maxmemory-policy",
            "noeviction",
        ])
        .await
    }

    /// A server with these extra `redis-server` flags (e.g. `--appendonly no`).
    pub async fn start_with(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(crate::unique("test_redis"));
        std::fs::create_dir_all(&dir).expect("create the redis directory");
        let mut me = Self {
            port: crate::relay::free_port(),
            dir,
            args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        me.spawn().await;
        me
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL: whatever Redis had not written to its append-only file is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Starts the server again after [`PrivateRedis::kill`].
    pub async fn spawn(&mut self) {
        let child = Command::new(redis_server_bin())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--daemonize", "no", "--logfile", "server.log"])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (set REDIS_SERVER_BIN if it is not in /usr/bin)");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            // Up and done loading its append-only file: PING answers PONG, not LOADING.
            if self.ping().await {
                return;
            }
            if !self.is_running() || Instant::now() > end {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                panic!(
                    "private redis-server on port {} did not come up: {}",
                    self.port,
                    log.lines().rev().take(10).collect::<Vec<_>>().join(" | ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
            Ok(Ok(n)) if buf[..n].starts_with(b"+PONG")
        )
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
