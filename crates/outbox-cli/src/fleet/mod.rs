//! One relay process for several outbox databases (`--database-url NAME=URL` repeated, or
//! `--databases-file`).
//!
//! Each database gets a relay engine of its own, exactly as if it ran alone: its own leases and
//! order (kept in that database), its own connection pool, LISTEN connection, broker connection
//! and batch limit. Each runs on an OS thread of its own with a single-threaded Tokio runtime:
//! - **Fair time sharing.** No database's loop can hold up another's: they are separate threads
//!   the kernel schedules fairly, and each does at most `--batch-size` events per turn of its
//!   loop, so a database with a large backlog gets one thread's share of the CPU and no more,
//!   while a quiet one is served as soon as its events commit.
//! - **Isolation.** A database that is unreachable keeps only its own relay retrying (the engine
//!   retries claims and leases with backoff; a failing set-up, such as migrations or the broker
//!   connection, is retried here with backoff up to 30 s). The others never wait on it.
//! - **Labels without touching the engine.** The thread installs a metrics recorder that adds
//!   `database="NAME"` to everything the engine records, so every metric carries the name.
//!
//! Health (`fleet::http`): `/healthz` fails only for a relay that is stalled while its database
//! answers (a restart may cure a hung loop or a broken broker connection; it cannot bring a
//! database back, and would interrupt the others); `/readyz` is 200 while at least one database
//! is served, so one tenant database's outage neither takes every replica out of a rollout nor
//! blocks node drains through the PodDisruptionBudget. Per-database state is in both bodies and
//! in `outbox_database_up{database=...}`, which is what alerts should use.

pub mod http;
pub mod metrics_label;
pub mod status;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use outbox::relay::RelayHealth;
use outbox::{PgStore, Publisher, Relay};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::args::{BrokerArgs, RelayArgs};
use crate::databases::Database;

/// Longest pause between two set-up attempts of one database's relay.
const SETUP_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// What the HTTP endpoints know of one database's relay.
pub struct DatabaseState {
    /// The operator's name for the database.
    pub name: String,
    running: Mutex<Option<Running>>,
    problem: Mutex<Option<String>>,
}

/// A relay that was set up and is running.
#[derive(Clone)]
pub struct Running {
    /// The engine's own view of its health.
    pub health: Arc<RelayHealth>,
    /// Its broker adapter.
    pub publisher: Arc<dyn Publisher>,
}

impl DatabaseState {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            running: Mutex::new(None),
            problem: Mutex::new(None),
        }
    }
    /// The running relay, if its set-up succeeded.
    pub fn running(&self) -> Option<Running> {
        self.running.lock().expect("state lock").clone()
    }
    /// Why the relay is not running (the last set-up or run error), if it is not.
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().expect("state lock").clone()
    }
    fn set_running(&self, r: Option<Running>) {
        *self.running.lock().expect("state lock") = r;
    }
    fn set_problem(&self, p: Option<String>) {
        *self.problem.lock().expect("state lock") = p;
    }
}

/// Runs one relay per database until `stop` is cancelled, serving labelled metrics and
/// per-database health on `metrics_addr`. Returns once every relay has finished its batch and
/// given its partitions back.
pub async fn run(
    databases: Vec<Database>,
    relay: &RelayArgs,
    broker: &BrokerArgs,
    metrics_addr: Option<SocketAddr>,
    migrate: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    // Mistakes in flags or URLs are refused now, not retried forever by one thread.
    relay.config()?;
    // One relay id for the process, in every database (the default one is random per call).
    let mut relay = relay.clone();
    relay
        .relay_id
        .get_or_insert_with(outbox::relay::default_relay_id);
    for d in &databases {
        PgConnectOptions::from_str(&d.url).with_context(|| {
            format!(
                "database {:?}: {:?} is not a valid PostgreSQL URL",
                d.name, d.url
            )
        })?;
    }
    // The port is taken before any relay starts, so that a taken port fails the start cleanly.
    let listener = match metrics_addr {
        Some(addr) => {
            let sock = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} for metrics (is the port taken?)")
            })?;
            Some((addr, sock, metrics_label::install()?))
        }
        None => None,
    };
    let recorder = listener.as_ref().map(|(_, _, r)| r.clone());
    let states: Vec<Arc<DatabaseState>> = databases
        .iter()
        .map(|d| Arc::new(DatabaseState::new(&d.name)))
        .collect();
    let mut threads = Vec::new();
    for (db, state) in databases.into_iter().zip(states.iter().cloned()) {
        let (relay, broker, stop) = (relay.clone(), broker.clone(), stop.clone());
        let labelled = recorder.as_ref().map(|r| r.for_database(&db.name));
        let thread = std::thread::Builder::new()
            .name(format!("relay-{}", db.name))
            .spawn(move || {
                let _guard = labelled
                    .as_ref()
                    .map(|l| metrics::set_default_local_recorder(l));
                if labelled.is_some() {
                    // This database's zeros, labelled, before its relay (and whatever set-up
                    // fails) first records anything.
                    broker.register_metric_zeros();
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a Tokio runtime for the relay thread");
                // Every log line of this database's relay names it; at error level so that no
                // RUST_LOG filter hides the span while showing its events.
                let span = tracing::error_span!("relay", database = %db.name);
                rt.block_on(supervise(db, state, relay, broker, migrate, stop).instrument(span));
            })
            .context("starting a relay thread")?;
        threads.push(thread);
    }
    tracing::info!(databases = states.len(), "relay serving several databases");
    let server = match listener {
        Some((addr, sock, rec)) => {
            let app = http::router(rec.handle(), states.clone());
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
    for t in threads {
        // Joining blocks: do it off the runtime that serves HTTP.
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Some(s) = server {
        let _ = s.await;
    }
    Ok(())
}

/// Sets up and runs one database's relay, again and again with backoff while set-up fails or
/// the relay is refused, until `stop`.
async fn supervise(
    db: Database,
    state: Arc<DatabaseState>,
    relay: RelayArgs,
    broker: BrokerArgs,
    migrate: bool,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match run_once(&db, &state, &relay, &broker, migrate, &stop).await {
            Ok(()) => break,
            Err(e) => {
                failures += 1;
                let wait = setup_backoff(failures);
                tracing::warn!(database = %db.name, error = format!("{e:#}"), retry_in_ms = wait.as_millis() as u64,
                    "relay for this database is not running; the others are not affected");
                state.set_running(None);
                state.set_problem(Some(format!("{e:#}")));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::info!(database = %db.name, "relay for this database stopped");
}

async fn run_once(
    db: &Database,
    state: &DatabaseState,
    relay: &RelayArgs,
    broker: &BrokerArgs,
    migrate: bool,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let config = relay.config()?;
    // The relay's own pool: its reads run as single statements (relay_connect_options).
    let options =
        outbox::pg::relay_connect_options(&db.url).context("not a valid PostgreSQL URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(relay.db_connections.max(2))
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options);
    if migrate {
        outbox::schema::migrate(&pool)
            .await
            .context("applying migrations (is the database reachable?)")?;
    }
    let publisher = crate::broker::connect(broker, &config)
        .await
        .context("setting up the broker")?;
    let engine = Relay::new(
        Arc::new(PgStore::new(pool.clone())),
        publisher.clone(),
        config,
    )?;
    state.set_running(Some(Running {
        health: engine.health(),
        publisher,
    }));
    state.set_problem(None);
    let listener_stop = stop.child_token();
    let listener = tokio::spawn(outbox::wake::listen(
        pool,
        engine.waker(),
        listener_stop.clone(),
    ));
    let outcome = engine.run(stop.clone()).await;
    listener_stop.cancel();
    let _ = listener.await;
    outcome.context("relay refused")?;
    Ok(())
}

fn setup_backoff(failures: u32) -> Duration {
    let ms = 1000u64.saturating_mul(1 << failures.clamp(1, 6).saturating_sub(1));
    Duration::from_millis(ms).min(SETUP_BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    #[test]
    fn setup_backoff_grows_to_its_cap() {
        let w: Vec<u64> = (1..8).map(|f| super::setup_backoff(f).as_secs()).collect();
        assert_eq!(w, [1, 2, 4, 8, 16, 30, 30]);
    }
}
