//! `outbox console`: serves the browser console (crate `outbox-console`) over the outbox
//! databases the other commands take and the consumer databases given here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use outbox_console::{ConsoleConfig, NamedPool, Operators};

use crate::databases::{self, Database};

/// `outbox console` flags. Operators' tokens come from `--tokens-file` and/or the variable
/// `OUTBOX_CONSOLE_TOKENS` (`NAME:TOKEN,NAME:TOKEN`; never a flag, so that no token shows in a
/// process list).
#[derive(Debug, Clone, Args)]
pub struct ConsoleArgs {
    /// Address to serve on. Loopback by default: put a TLS proxy in front to reach it from
    /// elsewhere (and add its host name with --allowed-host).
    #[arg(long, env = "OUTBOX_CONSOLE_ADDR", default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// File of operators, one NAME:TOKEN a line (# comments); NAME is recorded in the audit
    /// trail, TOKEN (16 characters or more) is what the operator types to log in.
    #[arg(long, env = "OUTBOX_CONSOLE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Let anyone who reaches the console read it without logging in (acting still needs an
    /// operator).
    #[arg(long, env = "OUTBOX_CONSOLE_ANONYMOUS_READ")]
    pub anonymous_read: bool,
    /// Another Host name the console answers to (e.g. the proxy's name); repeatable. Requests
    /// for any other host are refused (DNS rebinding).
    #[arg(long, env = "OUTBOX_CONSOLE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_host: Vec<String>,
    /// A consumer database whose consumers and parked events to show, as URL or NAME=URL;
    /// repeatable.
    #[arg(long, env = "OUTBOX_CONSUMER_DATABASE_URL", value_delimiter = ',')]
    pub consumer_database_url: Vec<String>,
    /// Connections of the console's own pool per database.
    #[arg(long, env = "OUTBOX_CONSOLE_POOL_SIZE", default_value_t = 2)]
    pub pool_size: u32,
    /// Every console query is cancelled by PostgreSQL after this many milliseconds.
    #[arg(
        long,
        env = "OUTBOX_CONSOLE_STATEMENT_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub statement_timeout_ms: u64,
    /// Mark the session cookie Secure (when the console is reached over HTTPS through a proxy).
    #[arg(long, env = "OUTBOX_CONSOLE_SECURE_COOKIE")]
    pub secure_cookie: bool,
}

/// Runs the console until SIGTERM or Ctrl-C.
pub async fn run(outboxes: &[Database], args: &ConsoleArgs) -> anyhow::Result<()> {
    let env_tokens = std::env::var("OUTBOX_CONSOLE_TOKENS").ok();
    let operators = Operators::load(args.tokens_file.as_deref(), env_tokens.as_deref())?;
    if operators.is_empty() && !args.anonymous_read {
        bail!("no operator is configured, so nobody could use the console: list NAME:TOKEN entries in --tokens-file or OUTBOX_CONSOLE_TOKENS (or pass --anonymous-read for a read-only console)");
    }
    let timeout = Duration::from_millis(args.statement_timeout_ms.max(1));
    let pools = |list: &[Database]| -> anyhow::Result<Vec<NamedPool>> {
        list.iter()
            .map(|d| {
                Ok(NamedPool {
                    name: d.name.clone(),
                    pool: outbox_console::console_pool(&d.name, &d.url, args.pool_size, timeout)?,
                })
            })
            .collect()
    };
    let consumers = if args.consumer_database_url.is_empty() {
        Vec::new()
    } else {
        databases::resolve(&args.consumer_database_url, None).context("--consumer-database-url")?
    };
    let config = ConsoleConfig {
        outboxes: pools(outboxes)?,
        consumers: pools(&consumers)?,
        operators,
        anonymous_read: args.anonymous_read,
        allowed_hosts: args.allowed_host.clone(),
        secure_cookie: args.secure_cookie,
    };
    if args.anonymous_read && !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "anonymous reading on a non-loopback address: anyone who reaches it sees payloads");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    tracing::info!(listen = %args.listen, operators = config.operators.len(), anonymous_read = args.anonymous_read, "outbox console serving");
    println!("outbox console on http://{}", listener.local_addr()?);
    let stop = crate::relay_cmd::shutdown_signal();
    outbox_console::serve(listener, config, async move { stop.cancelled().await })
        .await
        .context("console server")?;
    Ok(())
}
