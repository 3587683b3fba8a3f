//! A relay running inside the test process, and a free loopback port.

use std::sync::Arc;
use std::time::Duration;

use outbox::nats::{NatsConfig, NatsPublisher};
use outbox::{PgStore, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

/// A relay running in this test process; [`InProcessRelay::shutdown`] stops it cleanly.
pub struct InProcessRelay {
    /// Cancelling it asks the relay to finish its batch and stop.
    pub stop: CancellationToken,
    /// The relay's task (and its LISTEN task).
    pub task: tokio::task::JoinHandle<()>,
}

impl InProcessRelay {
    /// Stops the relay and waits (at most 15 s) for it to give its partitions back.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

/// Starts a relay over `pool` (which may reach the database through a proxy) publishing to
/// JetStream with `nats`, woken by LISTEN/NOTIFY like a production relay.
pub async fn start_relay_on(
    pool: sqlx::PgPool,
    nats: NatsConfig,
    config: RelayConfig,
) -> InProcessRelay {
    let horizon = config.dedup_horizon(nats.ack_timeout);
    let publisher = NatsPublisher::connect(nats, horizon)
        .await
        .expect("publisher");
    start_relay_with(pool, Arc::new(publisher), config).await
}

/// Starts a relay over `pool` publishing through `publisher` (any broker adapter), woken by
/// LISTEN/NOTIFY like a production relay.
pub async fn start_relay_with(
    pool: sqlx::PgPool,
    publisher: Arc<dyn outbox::Publisher>,
    config: RelayConfig,
) -> InProcessRelay {
    // RUST_LOG=debug shows the relay's own logs when a test needs explaining.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let relay = Relay::new(Arc::new(PgStore::new(pool.clone())), publisher, config).expect("relay");
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let l = tokio::spawn(outbox::wake::listen(pool, relay.waker(), s.child_token()));
        relay.run(s).await.expect("relay runs");
        l.abort();
    });
    InProcessRelay { stop, task }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("its address")
        .port()
}
