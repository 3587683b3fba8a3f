//! `read-model`: consumes the inventory's events into a read model and serves it over HTTP.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use outbox::consumers::Consumer;
use outbox_runtime::consumer::{self, ConsumerArgs};
use outbox_runtime::logging::{self, LogFormat};
use read_model::apply::ReadModel;
use read_model::http::{router, ReadState};
use sqlx::postgres::PgPoolOptions;
use tenant_auth::{TokenRules, Verifier};

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
    /// PEM file of the public key the inventory's bearer tokens are verified with: Ed25519
    /// (EdDSA) or RSA (RS256), the inventory's INVENTORY_JWT_PUBLIC_KEY_FILE. Preferred: the read
    /// model then cannot mint tokens.
    #[arg(long, env = "READ_MODEL_JWT_PUBLIC_KEY_FILE")]
    jwt_public_key_file: Option<PathBuf>,
    /// Or the inventory's HS256 secret (INVENTORY_JWT_SECRET). Risk: whoever holds it can mint a
    /// token for every tenant, of the inventory as of the read model.
    #[arg(long, env = "READ_MODEL_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Required `iss` of the bearer tokens (unset: not checked; set it as the inventory's).
    #[arg(long, env = "READ_MODEL_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud` of the bearer tokens (unset: not checked; set it as the inventory's).
    #[arg(long, env = "READ_MODEL_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    #[command(flatten)]
    consumer: ConsumerArgs,
}

impl Cli {
    fn verifier(&self) -> anyhow::Result<Verifier> {
        let set = |o: &Option<String>| o.clone().filter(|s| !s.is_empty());
        let rules = TokenRules {
            issuer: set(&self.jwt_issuer),
            audience: set(&self.jwt_audience),
        };
        Verifier::from_settings(
            self.jwt_secret.as_deref(),
            self.jwt_public_key_file.as_deref(),
            rules,
        )
        .context(
            "the key the read model verifies the inventory's bearer tokens with: set \
             READ_MODEL_JWT_PUBLIC_KEY_FILE (--jwt-public-key-file) or READ_MODEL_JWT_SECRET \
             (--jwt-secret)",
        )
    }
}

// The allocator of the relay binaries (`outbox`, `inventory`: docs/benchmarks.md, "Issue 20,
// fourth pass"), so that every binary of the workspace runs on the same one.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    // Before connecting anything: a service that cannot check tokens must not start.
    let verifier = Arc::new(cli.verifier()?);
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
        verifier,
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
