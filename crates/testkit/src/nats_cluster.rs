//! A private 3-node nats-server cluster with clustered JetStream, for tests of replicated (R3)
//! streams through leader elections and lost quorum.
//!
//! Each node is a child process with its own client port, route port and store directory, all
//! on loopback; the routes name every node, so any two nodes form a quorum. Debian's nats-server
//! 2.9 is enough: clustered JetStream, R3 streams, Raft elections and de-duplication by
//! `Nats-Msg-Id` replicated with the stream have been there since 2.2, and the relay uses no 2.10
//! feature. Dropping the value kills every node and removes the directories, also on panic.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;

use crate::nats_server::nats_server_bin;

/// One node of a [`NatsCluster`].
struct Node {
    name: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Three nats-server processes routed into one JetStream cluster.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    bin: String,
}

impl NatsCluster {
    /// Starts three nodes on free loopback ports and waits (at most 30 s) until the cluster has
    /// elected its JetStream meta leader and can place a stream with three replicas.
    pub async fn start() -> Self {
        Self::start_with(&nats_server_bin()).await
    }

    /// Like [`NatsCluster::start`] with the nats-server binary at `bin` (another release).
    pub async fn start_with(bin: impl AsRef<std::path::Path>) -> Self {
        let bin = bin.as_ref().to_string_lossy().into_owned();
        let dir = std::env::temp_dir().join(crate::unique("nats_cluster"));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let route_ports: Vec<u16> = (0..3).map(|_| crate::relay::free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, route_port) in route_ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let node_dir = dir.join(&name);
            std::fs::create_dir_all(&node_dir).expect("create a node's directory");
            let port = crate::relay::free_port();
            let conf = format!(
                "server_name: {name}\n\
                 listen: 127.0.0.1:{port}\n\
                 jetstream {{ store_dir: {store:?} }}\n\
                 cluster {{\n  name: outbox_test\n  listen: 127.0.0.1:{route_port}\n  routes: [{routes}]\n}}\n",
                store = node_dir.join("store"),
            );
            std::fs::write(node_dir.join("server.conf"), conf).expect("write a node's config");
            nodes.push(Node {
                name,
                port,
                dir: node_dir,
                child: None,
            });
        }
        let mut me = Self { nodes, dir, bin };
        for i in 0..3 {
            me.spawn(i);
        }
        for i in 0..3 {
            me.wait_listening(i).await;
        }
        me.wait_jetstream(Duration::from_secs(30)).await;
        me
    }

    /// Every node's URL, comma-separated: what `--nats-url` takes.
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `nats://127.0.0.1:<port>` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The server name of node `i` (`n1`, `n2`, `n3`), as stream info reports leaders.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Process ids of the running nodes (benchmarks read their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    /// Whether node `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        matches!(
            self.nodes[i].child.as_mut().map(|c| c.try_wait()),
            Some(Ok(None))
        )
    }

    /// Kills node `i` with SIGKILL: a crash, nothing flushed.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops node `i` with SIGTERM (SIGKILL after 10 s): an orderly shutdown, as for maintenance.
    pub async fn stop(&mut self, i: usize) {
        let Some(mut child) = self.nodes[i].child.take() else {
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

    /// Starts node `i` again on its ports and store, and waits until it accepts connections.
    pub async fn start_node(&mut self, i: usize) {
        if self.is_running(i) {
            return;
        }
        self.spawn(i);
        self.wait_listening(i).await;
    }

    /// The index of the node that leads `stream` now, asked of any running node; `None` while
    /// the stream has no leader (an election, lost quorum) or no node answers within 2 s.
    pub async fn leader_of(&mut self, stream: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                continue;
            }
            let url = self.url(i);
            let leader = tokio::time::timeout(Duration::from_secs(2), async {
                let client = async_nats::connect(url).await.ok()?;
                let js = jetstream::new(client);
                let mut s = js.get_stream(stream).await.ok()?;
                let info = s.info().await.ok()?;
                info.cluster.as_ref()?.leader.clone()
            })
            .await
            .ok()
            .flatten();
            if let Some(name) = leader {
                return self.nodes.iter().position(|n| n.name == name);
            }
        }
        None
    }

    /// Waits (at most `within`) until `stream` has a leader; returns its index.
    pub async fn wait_leader(&mut self, stream: &str, within: Duration) -> Option<usize> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(l) = self.leader_of(stream).await {
                return Some(l);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// A JetStream context on the running nodes (the client fails over between them).
    pub async fn jetstream(&mut self) -> jetstream::Context {
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.is_running(i))
            .collect();
        let urls: Vec<String> = running.into_iter().map(|i| self.url(i)).collect();
        let client = async_nats::connect(urls)
            .await
            .expect("a running cluster node is reachable");
        jetstream::new(client)
    }

    /// Every message of `stream` in stream order, read from the running nodes, at most `within`
    /// for the whole read; `None` when the read did not finish in time.
    pub async fn read_stream(
        &mut self,
        stream: &str,
        within: Duration,
    ) -> Option<Vec<jetstream::message::StreamMessage>> {
        let js = self.jetstream().await;
        let stream = stream.to_string();
        tokio::time::timeout(within, async move {
            let mut s = js.get_stream(&stream).await.expect("the stream exists");
            let state = s.info().await.expect("stream info").state.clone();
            if state.messages == 0 {
                return Vec::new();
            }
            let s = &s;
            // A failed read is retried, never skipped (`crate::stream_message`): after the nodes
            // come back a leader may still be being elected.
            futures::stream::iter(state.first_sequence..=state.last_sequence)
                .map(|seq| crate::stream_message(s, seq))
                .buffered(64)
                .collect::<Vec<_>>()
                .await
        })
        .await
        .ok()
    }

    fn spawn(&mut self, i: usize) {
        let bin = self.bin.clone();
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("server.log"))
            .expect("open a node's log");
        let child = Command::new(bin)
            .arg("-c")
            .arg(node.dir.join("server.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (set NATS_SERVER_BIN if it is not in /usr/sbin)");
        node.child = Some(child);
    }

    async fn wait_listening(&mut self, i: usize) {
        // The port may still be held by the previous process for a moment: retry.
        let end = Instant::now() + Duration::from_secs(15);
        let addr = format!("127.0.0.1:{}", self.nodes[i].port);
        loop {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return;
            }
            if !self.is_running(i) || Instant::now() > end {
                panic!(
                    "cluster node {} on port {} did not come up: {}",
                    self.nodes[i].name,
                    self.nodes[i].port,
                    self.log_tail(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every node answers a JetStream API request (the meta leader is elected).
    async fn wait_jetstream(&mut self, within: Duration) {
        let end = Instant::now() + within;
        for i in 0..self.nodes.len() {
            let url = self.url(i);
            loop {
                let ok = tokio::time::timeout(Duration::from_secs(2), async {
                    let Ok(c) = async_nats::connect(url.clone()).await else {
                        return false;
                    };
                    // "Stream not found" comes from the meta leader: before one is elected
                    // the request times out or has no responders.
                    match jetstream::new(c).get_stream("READINESS_PROBE").await {
                        Err(e) => matches!(e.kind(),
                            jetstream::context::GetStreamErrorKind::JetStream(j)
                                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND),
                        Ok(_) => true,
                    }
                })
                .await
                .unwrap_or(false);
                if ok {
                    break;
                }
                if Instant::now() > end {
                    panic!(
                        "JetStream cluster did not elect a meta leader within {within:?}: {}",
                        self.log_tail(i)
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // A meta leader is not enough for a replicated stream: until every node has joined the
        // meta group as a current peer, creating an R3 stream fails with "no suitable peers for
        // placement" (a CI run saw a relay get that for 20 s after start() had returned, on a
        // loaded machine). So the cluster is ready when an R3 stream can be created.
        let url = self.url(0);
        loop {
            let created = tokio::time::timeout(Duration::from_secs(5), async {
                let c = async_nats::connect(url.clone()).await.ok()?;
                let js = jetstream::new(c);
                let name = crate::unique("READINESS_R3").to_uppercase();
                let made = js
                    .create_stream(jetstream::stream::Config {
                        name: name.clone(),
                        subjects: vec![format!("{}.probe", name.to_lowercase())],
                        num_replicas: 3,
                        storage: jetstream::stream::StorageType::Memory,
                        ..Default::default()
                    })
                    .await;
                let _ = js.delete_stream(&name).await;
                made.err().map(|e| e.to_string())
            })
            .await;
            match created {
                Ok(None) => return,
                Ok(Some(e)) if Instant::now() > end => {
                    panic!("JetStream cluster cannot place an R3 stream within {within:?}: {e}")
                }
                Err(_) if Instant::now() > end => {
                    panic!(
                        "JetStream cluster did not answer an R3 stream creation within {within:?}"
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The last lines of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(self.nodes[i].dir.join("server.log")).unwrap_or_default();
        log.lines().rev().take(10).collect::<Vec<_>>().join(" | ")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
