//! `read-model`: consumes the inventory's events into a read model and serves it over HTTP.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use outbox::consumers::Consumer;
use outbox_runtime::consumer::{self, ConsumerArgs};
use outbox_runtime::logging::{self, LogFormat};
use read_model::apply::ReadModel;
use read_model::http::{router, ReadState};
use sqlx::postgres::PgPoolOptions;

#[derive(Debug, Parser)]
#[command(
    name = "read-model",
    version,
    about = "Read model of the inventory's events (quantity, reserved, status, low-stock alerts per variant)"
)]
struct Cli {
    /// The read model's own PostgreSQL database (its tables and the consumer inbox).
    #[arg(
        long,
        env = "READ_MODEL_DATABASE_URL",
        default_value = "postgres://root@127.0.0.1:5432/root"
    )]
    database_url: String,
    /// Address of the HTTP API (`GET /tenants/{tenant}/variants`), `/healthz` and `/metrics`.
    #[arg(long, env = "READ_MODEL_LISTEN", default_value = "127.0.0.1:8090")]
    listen: String,
    /// Log format.
    #[arg(long, env = "OUTBOX_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    consumer: ConsumerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let pool = PgPoolOptions::new()
        .max_connections(cli.consumer.concurrency as u32 + 4)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(&cli.database_url)
        .await
        .context("cannot connect to READ_MODEL_DATABASE_URL: check it and that PostgreSQL runs")?;
    read_model::migrate(&pool)
        .await
        .context("applying the read model's migrations")?;
    let consumer = Consumer::new(pool.clone(), ReadModel, cli.consumer.config())?;
    let metrics = outbox_runtime::http::install_metrics()?;
    let state = ReadState {
        pool,
        health: consumer.health(),
        metrics: Some(Arc::new(move || metrics.render())),
    };
    let stop = outbox_runtime::relay_cmd::shutdown_signal();
    let sock = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is the port taken?)", cli.listen))?;
    tracing::info!(addr = %cli.listen, "serving the read model");
    let s = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(sock, router(state))
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
    });
    consumer::run(&consumer, &cli.consumer, stop.clone()).await?;
    stop.cancel();
    let _ = server.await;
    Ok(())
}
