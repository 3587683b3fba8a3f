//! `outbox`: the standalone relay and the operator commands.

use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_cli::args::{BrokerArgs, RelayArgs};
use outbox_cli::databases::{self, Database};
use outbox_cli::logging::{self, LogFormat};
use outbox_cli::ops_cmd::{self, DeadLetterCmd};
use sqlx::postgres::PgPoolOptions;

#[derive(Debug, Parser)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox relay and operator commands"
)]
struct Cli {
    /// PostgreSQL database holding the outbox table, as a URL or NAME=URL; repeat it for several
    /// databases (the relay serves each with its own relay engine; NAME labels metrics, health
    /// and status). Default postgres://root@127.0.0.1:5432/root when neither this nor
    /// --databases-file gives one.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Vec<String>,
    /// File listing outbox databases, one NAME=URL per line (# comments), added to --database-url.
    #[arg(long, env = "OUTBOX_DATABASES_FILE", global = true)]
    databases_file: Option<std::path::PathBuf>,
    /// Work on this one database of the list only (by name).
    #[arg(long, env = "OUTBOX_DATABASE", global = true)]
    database: Option<String>,
    /// Log format.
    #[arg(
        long,
        env = "OUTBOX_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Declare a consumer queue bound to the RabbitMQ exchange, with a dead-letter exchange and queue.
    RabbitmqTopology(Box<outbox_cli::topology_cmd::TopologyArgs>),
    /// Apply the outbox schema migrations.
    Migrate,
    /// Deliver committed events to the broker until SIGTERM.
    Relay {
        #[command(flatten)]
        relay: Box<RelayArgs>,
        #[command(flatten)]
        broker: Box<BrokerArgs>,
        /// Address for /metrics, /healthz and /readyz (empty: no HTTP server).
        #[arg(long, env = "OUTBOX_METRICS_ADDR", default_value = "127.0.0.1:9187")]
        metrics_addr: String,
        /// Apply migrations before starting.
        #[arg(long, env = "OUTBOX_MIGRATE")]
        migrate: bool,
    },
    /// Counts per state, the oldest pending event, per tenant and event type, and which relay holds
    /// which partitions.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List, show, replay or purge dead letters.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterCmd,
    },
    /// List, replay or purge events a consumer runtime parked (DATABASE_URL: the consumer's
    /// database).
    ConsumerDeadLetters {
        #[command(subcommand)]
        action: outbox_cli::consumer_cmd::ConsumerDeadLetterCmd,
    },
    /// Serve the browser console: state, dead letters and parked events, replay and purge
    /// (README, "Console").
    Console(Box<outbox_cli::console_cmd::ConsoleArgs>),
    /// Run one retention pass: delete published events older than the retention.
    Cleanup {
        /// Keep published events this many hours.
        #[arg(long, env = "OUTBOX_RETENTION_HOURS", default_value_t = 24.0)]
        retention_hours: f64,
        /// Rows deleted per statement.
        #[arg(long, env = "OUTBOX_CLEANUP_BATCH", default_value_t = 1000)]
        batch: i64,
        /// Milliseconds to pause between statements (keeps producers' latency).
        #[arg(long, env = "OUTBOX_CLEANUP_PAUSE_MS", default_value_t = 20)]
        pause_ms: u64,
        /// Compact the sequence rows of aggregates idle this many hours with nothing pending, held
        /// or dead (their next event starts a new `seq_epoch`, which ordered consumers treat as a
        /// gap: see docs/architecture.md); 0 (the default): do not compact.
        #[arg(long, env = "OUTBOX_AGGREGATE_HORIZON_HOURS", default_value_t = 0.0)]
        aggregate_horizon_hours: f64,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

// mimalloc instead of glibc's malloc: the relay's hot path allocates per event (rows, headers,
// acknowledgement futures), and glibc's malloc took about a fifth of its CPU at a steady load
// (docs/benchmarks.md, "Issue 20, fourth pass").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let databases = databases::select(
        databases::resolve(&cli.database_url, cli.databases_file.as_deref())?,
        cli.database.as_deref(),
    )?;
    match cli.command {
        Command::RabbitmqTopology(args) => outbox_cli::topology_cmd::run(&args).await?,
        Command::Migrate => {
            for d in &databases {
                let pool = connect(&d.url, 2)
                    .await
                    .with_context(|| format!("database {}", d.name))?;
                outbox::schema::migrate(&pool)
                    .await
                    .with_context(|| format!("migrating database {}", d.name))?;
                if databases::is_single_unnamed(&databases) {
                    println!("outbox schema is up to date");
                } else {
                    println!("outbox schema of {} is up to date", d.name);
                }
            }
        }
        Command::Relay {
            relay,
            broker,
            metrics_addr,
            migrate,
        } => {
            let addr: Option<SocketAddr> =
                if metrics_addr.is_empty() {
                    None
                } else {
                    Some(metrics_addr.parse().with_context(|| {
                        format!("--metrics-addr {metrics_addr:?} is not host:port")
                    })?)
                };
            if !databases::is_single_unnamed(&databases) {
                let stop = outbox_cli::relay_cmd::shutdown_signal();
                return outbox_cli::fleet::run(databases, &relay, &broker, addr, migrate, stop)
                    .await;
            }
            // The relay's own pool: its reads run as single statements (relay_connect_options).
            let options = outbox::pg::relay_connect_options(&databases[0].url)
                .context("DATABASE_URL is not a valid PostgreSQL URL")?;
            let pool = PgPoolOptions::new()
                .max_connections(relay.db_connections.max(2))
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect_lazy_with(options);
            if migrate {
                outbox::schema::migrate(&pool)
                    .await
                    .context("applying migrations")?;
            }
            let stop = outbox_cli::relay_cmd::shutdown_signal();
            outbox_cli::relay_cmd::run(pool, &relay, &broker, addr, stop).await?;
        }
        Command::Status { json } => {
            if databases::is_single_unnamed(&databases) {
                ops_cmd::status(&connect(&databases[0].url, 2).await?, json).await?
            } else {
                outbox_cli::fleet::status::status_all(&databases, json).await?
            }
        }
        Command::DeadLetters { action } => {
            ops_cmd::dead_letters(&connect(one(&databases)?, 2).await?, action).await?
        }
        Command::Console(args) => outbox_cli::console_cmd::run(&databases, &args).await?,
        Command::ConsumerDeadLetters { action } => {
            outbox_cli::consumer_cmd::run(&connect(one(&databases)?, 2).await?, action).await?
        }
        Command::Cleanup {
            retention_hours,
            batch,
            pause_ms,
            aggregate_horizon_hours,
            dry_run,
            json,
        } => {
            ops_cmd::cleanup(
                &connect(one(&databases)?, 2).await?,
                retention_hours,
                aggregate_horizon_hours,
                batch,
                pause_ms,
                dry_run,
                json,
            )
            .await?
        }
    }
    Ok(())
}

/// The URL of the one database a command that changes data works on.
fn one(databases: &[Database]) -> anyhow::Result<&str> {
    match databases {
        [d] => Ok(&d.url),
        _ => anyhow::bail!(
            "this command works on one database at a time: pick one with --database NAME (names: {})",
            databases.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    }
}

async fn connect(url: &str, n: u32) -> anyhow::Result<sqlx::PgPool> {
    PgPoolOptions::new()
        .max_connections(n)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| {
            "cannot connect to PostgreSQL: check DATABASE_URL and that the server runs".to_string()
        })
}
