//! `outbox relay`: run the relay until SIGTERM / Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use outbox::{PgStore, Relay};
use tokio_util::sync::CancellationToken;

use crate::args::{BrokerArgs, RelayArgs};
use crate::http::{self, Probe};

/// Starts a relay over `pool`, serving metrics and health on `metrics_addr` when given, until
/// `stop` is cancelled. Returns when the relay has finished its batch and released its partitions.
pub async fn run(
    pool: sqlx::PgPool,
    relay: &RelayArgs,
    broker: &BrokerArgs,
    metrics_addr: Option<SocketAddr>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let config = relay.config()?;
    let publisher = crate::broker::connect(broker, &config)
        .await
        .context("setting up the broker")?;
    let relay = Relay::new(
        Arc::new(PgStore::new(pool.clone())),
        publisher.clone(),
        config,
    )?;
    let listener_stop = stop.child_token();
    let listener = tokio::spawn(outbox::wake::listen(
        pool.clone(),
        relay.waker(),
        listener_stop.clone(),
    ));
    let server = match metrics_addr {
        Some(addr) => {
            let handle = http::install_metrics()?;
            broker.register_metric_zeros();
            let app = http::router(Probe {
                metrics: handle,
                health: relay.health(),
                publisher,
                pool,
            });
            let sock = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} for metrics (is the port taken?)")
            })?;
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
            let s = stop.clone();
            Some(tokio::spawn(async move {
                axum::serve(sock, app)
                    .with_graceful_shutdown(async move { s.cancelled().await })
                    .await
            }))
        }
        None => None,
    };
    relay.run(stop.clone()).await?;
    listener_stop.cancel();
    let _ = listener.await;
    if let Some(s) = server {
        let _ = s.await;
    }
    Ok(())
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested; finishing the batch in flight");
        t.cancel();
    });
    token
}
