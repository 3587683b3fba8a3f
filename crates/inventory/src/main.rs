//! `inventory`: the inventory HTTP service (default command `serve`) and a token minter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use inventory::auth::{Minter, TokenRules, Verifier};
use inventory::AppState;
use outbox_runtime::args::{BrokerArgs, RelayArgs};
use outbox_runtime::logging::{self, LogFormat};
use sqlx::postgres::PgPoolOptions;

#[derive(Debug, Parser)]
#[command(
    name = "inventory",
    version,
    about = "Inventory service: stock, receipts, reservations and shipments, with its events through the outbox",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Settings of `serve`, which runs when no command is given.
    #[command(flatten)]
    serve: Box<ServeArgs>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (and, unless --no-relay, the outbox relay in-process) until SIGTERM.
    Serve(Box<ServeArgs>),
    /// Print a bearer token for local use.
    Token(TokenArgs),
}

#[derive(Debug, Clone, Args)]
struct ServeArgs {
    /// PostgreSQL database of the service (inventory schema and outbox tables).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://root@127.0.0.1:5432/root"
    )]
    database_url: String,
    /// Address of the HTTP API.
    #[arg(long, env = "INVENTORY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    keys: VerifyKeyArgs,
    #[command(flatten)]
    token_rules: TokenRuleArgs,
    /// Do not run the relay in-process (leave delivery to a standalone `outbox relay`).
    #[arg(long, env = "INVENTORY_NO_RELAY")]
    no_relay: bool,
    /// Address of the in-process relay's /metrics, /healthz, /readyz (empty: none).
    #[arg(long, env = "INVENTORY_METRICS_ADDR", default_value = "127.0.0.1:9188")]
    metrics_addr: String,
    /// Seconds between sweeps that release expired reservations.
    #[arg(long, env = "INVENTORY_EXPIRY_INTERVAL_SECS", default_value_t = 5)]
    expiry_interval_secs: u64,
    /// Reservations released per sweep transaction.
    #[arg(long, env = "INVENTORY_EXPIRY_BATCH", default_value_t = 100)]
    expiry_batch: i64,
    /// Hours an Idempotency-Key is remembered (a retry within it replays the first answer);
    /// older keys are removed on the sweep's schedule.
    #[arg(long, env = "INVENTORY_IDEMPOTENCY_TTL_HOURS", default_value_t = 24.0)]
    idempotency_ttl_hours: f64,
    /// Milliseconds between the notifications that wake the relays while commits keep coming
    /// (the first commit after a quiet spell wakes them at once). Wider: fewer, larger relay
    /// batches and less CPU taken from the service; narrower: events reach the broker sooner.
    #[arg(long, env = "INVENTORY_WAKE_WINDOW_MS", default_value_t = inventory::WAKE_WINDOW.as_millis() as u64)]
    wake_window_ms: u64,
    /// Database connections of the HTTP API.
    #[arg(long, env = "INVENTORY_DB_POOL", default_value_t = 16)]
    db_pool: u32,
    /// Log format.
    #[arg(long, env = "INVENTORY_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    relay: RelayArgs,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// The key the bearer tokens are verified with: exactly one of the two.
#[derive(Debug, Clone, Args)]
struct VerifyKeyArgs {
    /// HS256 secret the bearer tokens are signed with (at least 32 bytes). Whoever holds it can
    /// mint tokens for every tenant: prefer --jwt-public-key-file when another service (the read
    /// model) verifies the same tokens.
    #[arg(long, env = "INVENTORY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM file of the public key the bearer tokens are verified with: Ed25519 (EdDSA) or RSA
    /// (RS256), told apart by the key. `inventory token --jwt-private-key-file` mints them.
    #[arg(long, env = "INVENTORY_JWT_PUBLIC_KEY_FILE")]
    jwt_public_key_file: Option<PathBuf>,
}

impl VerifyKeyArgs {
    fn verifier(&self, rules: TokenRules) -> anyhow::Result<Verifier> {
        Verifier::from_settings(
            self.jwt_secret.as_deref(),
            self.jwt_public_key_file.as_deref(),
            rules,
        )
        .context(
            "the token key: set INVENTORY_JWT_PUBLIC_KEY_FILE (--jwt-public-key-file) or \
             INVENTORY_JWT_SECRET (--jwt-secret)",
        )
    }
}

/// Optional claim checks of the bearer tokens.
#[derive(Debug, Clone, Args)]
struct TokenRuleArgs {
    /// Required `iss` of the bearer tokens (unset: not checked).
    #[arg(long, env = "INVENTORY_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud` of the bearer tokens (unset: not checked).
    #[arg(long, env = "INVENTORY_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
}

impl TokenRuleArgs {
    fn rules(&self) -> TokenRules {
        let set = |o: &Option<String>| o.clone().filter(|s| !s.is_empty());
        TokenRules {
            issuer: set(&self.jwt_issuer),
            audience: set(&self.jwt_audience),
        }
    }
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// Tenant claim.
    #[arg(long)]
    tenant: String,
    /// User id (`sub` claim).
    #[arg(long, default_value = "local-user")]
    sub: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_secs: u64,
    /// HS256 secret to sign with (the service's INVENTORY_JWT_SECRET); or --jwt-private-key-file.
    #[arg(long, env = "INVENTORY_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// PEM file of the private key (PKCS#8, Ed25519 or RSA) whose public half the services
    /// verify with (INVENTORY_JWT_PUBLIC_KEY_FILE, READ_MODEL_JWT_PUBLIC_KEY_FILE).
    #[arg(long, env = "INVENTORY_JWT_PRIVATE_KEY_FILE")]
    jwt_private_key_file: Option<PathBuf>,
    #[command(flatten)]
    token_rules: TokenRuleArgs,
}

impl TokenArgs {
    fn minter(&self) -> anyhow::Result<Minter> {
        let secret = self.jwt_secret.as_deref().filter(|s| !s.is_empty());
        let file = self
            .jwt_private_key_file
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty());
        let rules = self.token_rules.rules();
        match (secret, file) {
            (Some(_), Some(_)) => anyhow::bail!(
                "both INVENTORY_JWT_SECRET (--jwt-secret) and INVENTORY_JWT_PRIVATE_KEY_FILE \
                 (--jwt-private-key-file) are set; set the one the service verifies with"
            ),
            (None, None) => anyhow::bail!(
                "set INVENTORY_JWT_PRIVATE_KEY_FILE (--jwt-private-key-file) or \
                 INVENTORY_JWT_SECRET (--jwt-secret) to sign the token with"
            ),
            (Some(s), None) => {
                inventory::auth::check_secret(s.as_bytes())
                    .context("INVENTORY_JWT_SECRET (--jwt-secret)")?;
                Ok(Minter::hs256(s.as_bytes(), rules))
            }
            (None, Some(path)) => Ok(Minter::private_key_file(path, rules)?),
        }
    }
}

/// The seed's RabbitMQ contract as the defaults of `serve`: exchange `inventory.events`, routing
/// key = the event's topic, tenant in the `Outbox-Tenant-Id` header. Set here, not in the shared
/// relay flags, so `outbox relay` keeps its generic defaults.
fn seed_defaults(cmd: clap::Command) -> clap::Command {
    cmd.mut_arg("amqp_exchange", |a| {
        a.default_value(inventory::SEED_EXCHANGE)
    })
    .mut_arg("amqp_routing_key", |a| {
        a.default_value(inventory::SEED_ROUTING_KEY)
    })
    .mut_arg("amqp_tenant_in_header_only", |a| a.default_value("true"))
}

// mimalloc instead of glibc's malloc: the relay's hot path allocates per event (rows, headers,
// acknowledgement futures), and glibc's malloc took about a fifth of its CPU at a steady load
// (docs/benchmarks.md, "Issue 20, fourth pass").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cmd = seed_defaults(Cli::command()).mut_subcommand("serve", seed_defaults);
    let cli = Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Some(Command::Token(t)) => {
            let token = t
                .minter()?
                .mint(&t.tenant, &t.sub, t.ttl_secs)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{token}");
            Ok(())
        }
        Some(Command::Serve(s)) => serve(*s).await,
        None => serve(*cli.serve).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    logging::init(args.log_format);
    let verifier = args.keys.verifier(args.token_rules.rules())?;
    let metrics_addr: Option<SocketAddr> =
        if args.metrics_addr.is_empty() {
            None
        } else {
            Some(args.metrics_addr.parse().with_context(|| {
                format!("--metrics-addr {:?} is not host:port", args.metrics_addr)
            })?)
        };
    if !(args.idempotency_ttl_hours.is_finite() && args.idempotency_ttl_hours > 0.0) {
        anyhow::bail!("--idempotency-ttl-hours must be more than 0");
    }
    // Validate the relay flags before binding anything, so a typo fails at start.
    if !args.no_relay {
        args.relay.config()?;
    }
    let pool = inventory::pool_options(args.db_pool.max(2))
        .connect(&args.database_url)
        .await
        .with_context(|| {
            "cannot connect to PostgreSQL (check DATABASE_URL and that the server runs)".to_string()
        })?;
    inventory::migrate(&pool)
        .await
        .context("applying the outbox and inventory migrations")?;
    let state = AppState::with_keys_and_wake_window(
        pool.clone(),
        verifier,
        Duration::from_millis(args.wake_window_ms),
    );
    let stop = outbox_runtime::relay_cmd::shutdown_signal();

    let expiry = tokio::spawn(inventory::expiry::run(
        state.clone(),
        Duration::from_secs(args.expiry_interval_secs.max(1)),
        args.expiry_batch.max(1),
        Duration::from_secs_f64(args.idempotency_ttl_hours * 3600.0),
        stop.child_token(),
    ));

    // The relay gets its own pool so that a burst of requests cannot starve delivery.
    let relay = if args.no_relay {
        tracing::info!("no in-process relay: run `outbox relay` to deliver the events");
        None
    } else {
        let relay_pool = PgPoolOptions::new()
            .max_connections(args.relay.db_connections.max(2))
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(outbox::pg::relay_connect_options(&args.database_url)?);
        let (r, b, s) = (args.relay.clone(), args.broker.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            outbox_runtime::relay_cmd::run(relay_pool, &r, &b, metrics_addr, s).await
        });
        // An end by error or panic stops the service with a non-zero exit (crate::supervise).
        Some(tokio::spawn(inventory::supervise::supervise_relay(
            handle,
            stop.clone(),
            state.relay.clone(),
        )))
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is the port taken?)", args.listen))?;
    tracing::info!(addr = %args.listen, "inventory service listening");
    let s = stop.clone();
    axum::serve(listener, inventory::router(state))
        .with_graceful_shutdown(async move { s.cancelled().await })
        .await
        .context("serving HTTP")?;
    stop.cancel();
    let _ = expiry.await;
    if let Some(r) = relay {
        r.await.context("relay supervisor")??;
    }
    tracing::info!("stopped");
    Ok(())
}
