//! A private RabbitMQ node for tests that must stop and restart the broker: the shared node on
//! 5672 serves other tests at the same time and is never touched.
//!
//! The node gets its own name, AMQP and distribution ports, data and log directories, an empty
//! plugin list and a config file of its own (the system one binds 5672), and its own Erlang
//! cookie (`HOME` is the node's directory). It runs in a process group of its own, so that
//! dropping the value ends the node and its Erlang helpers by that group's id, and removes the
//! directory, also when the test panics.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directory of RabbitMQ's own scripts: `RABBITMQ_SBIN`, otherwise Debian's
/// `/usr/lib/rabbitmq/bin`. The `/usr/sbin` wrappers switch to the `rabbitmq` user when run as
/// root, which would lose our `HOME` and therefore the node's cookie.
fn sbin() -> PathBuf {
    std::env::var("RABBITMQ_SBIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/lib/rabbitmq/bin"))
}

/// A RabbitMQ node run by this test, stopped and removed on drop.
pub struct RabbitNode {
    /// Erlang node name, `soak_<random>@localhost`.
    pub node: String,
    /// AMQP port on 127.0.0.1 (stable across restarts).
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RabbitNode {
    /// Starts a node and waits at most `within` for its AMQP port; an error (with the end of the
    /// node's log) when RabbitMQ is not installed or does not come up in time.
    pub async fn start(within: Duration) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(crate::unique("soak_rabbit"));
        std::fs::create_dir_all(dir.join("mnesia")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.join("log")).map_err(|e| e.to_string())?;
        let mut me = Self {
            node: format!("{}@localhost", crate::unique("soak")),
            port: crate::relay::free_port(),
            dist_port: crate::relay::free_port(),
            dir,
            child: None,
        };
        let write = |name: &str, text: String| {
            std::fs::write(me.dir.join(name), text).map_err(|e| e.to_string())
        };
        write(
            "rabbitmq.conf",
            format!("listeners.tcp.local = 127.0.0.1:{}\n", me.port),
        )?;
        write("enabled_plugins", "[].\n".into())?;
        write("rabbitmq-env.conf", String::new())?;
        me.spawn(within).await?;
        Ok(me)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` (guest may log in over loopback).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `127.0.0.1:<port>`, for a proxy in front of the node.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the node cleanly (`rabbitmqctl stop`: durable queues and confirmed persistent
    /// messages survive), killing its process group if it has not exited after 20 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut ctl = self.ctl(&["stop"]);
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            let ctl_done = !matches!(ctl.as_mut().map(|c| c.try_wait()), Ok(Ok(None)));
            if ctl_done && matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Ok(mut c) = ctl {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_group(&mut child);
    }

    /// Stops the node and starts it again on the same ports and data directory, waiting at
    /// most `within` for it.
    pub async fn restart(&mut self, within: Duration) -> Result<(), String> {
        self.stop().await;
        self.spawn(within).await
    }

    /// Kills the node with SIGKILL (a crash: nothing flushed beyond what it had synced) and starts
    /// it again on the same ports and data directory, waiting at most `within` for it.
    pub async fn crash_and_restart(&mut self, within: Duration) -> Result<(), String> {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
        self.spawn(within).await
    }

    /// Runs `rabbitmqctl -n <node> <args>` against this node, at most `within`.
    pub async fn ctl_run(&self, args: &[&str], within: Duration) -> Result<(), String> {
        let mut c = self
            .ctl(args)
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        let end = Instant::now() + within;
        while Instant::now() < end {
            match c.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => return Err(format!("rabbitmqctl {args:?}: {st}")),
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(e.to_string()),
            }
        }
        let _ = c.kill();
        let _ = c.wait();
        Err(format!("rabbitmqctl {args:?} took over {within:?}"))
    }

    fn env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .current_dir(d);
    }

    fn ctl(&self, args: &[&str]) -> std::io::Result<Child> {
        let mut cmd = Command::new(sbin().join("rabbitmqctl"));
        self.env(&mut cmd);
        cmd.args(["-n", &self.node])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    }

    async fn spawn(&mut self, within: Duration) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.out"))
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(sbin().join("rabbitmq-server"));
        self.env(&mut cmd);
        let child = cmd
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {:?}: {e}", sbin().join("rabbitmq-server")))?;
        self.child = Some(child);
        let end = Instant::now() + within;
        loop {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                return Ok(());
            }
            let exited = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
            if exited || Instant::now() > end {
                if let Some(mut c) = self.child.take() {
                    kill_group(&mut c);
                }
                return Err(format!(
                    "node {} {} within {within:?}: {}",
                    self.node,
                    if exited { "exited" } else { "did not come up" },
                    tail(&self.dir.join("server.out"))
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// SIGKILL to the child's process group (the node's script, the Erlang VM and its helpers).
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .join(" | ")
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A clean stop first, so that the node deregisters from epmd; bounded by the kill.
            if let Ok(mut ctl) = self.ctl(&["stop"]) {
                let end = Instant::now() + Duration::from_secs(15);
                while Instant::now() < end && matches!(ctl.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = ctl.kill();
                let _ = ctl.wait();
            }
            kill_group(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
