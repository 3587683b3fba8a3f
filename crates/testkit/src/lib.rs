//! Test support shared by the workspace's integration tests: every test gets its own database and
//! its own stream, and both are removed when the test ends, so tests run in parallel and leave
//! nothing behind.

pub mod faults;
pub mod nats_cluster;
pub mod nats_server;
pub mod pg_cluster;
pub mod proxy;
pub mod rabbit;
pub mod rabbit_node;
pub mod redis_server;
pub mod relay;
pub mod tansu;

use std::time::Duration;

use async_nats::jetstream;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Base URL of the PostgreSQL server (`TEST_PG_URL`, default the local trust-auth server).
pub fn pg_server_url() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432".into())
}

/// NATS URL (`TEST_NATS_URL`, default the local server).
pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A name no other test uses: `prefix` plus a random suffix (letters, digits, `_`).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A database created for one test, dropped (with its connections) when this value is dropped.
pub struct TestDb {
    /// Pool on the test database.
    pub pool: PgPool,
    /// URL of the test database, for child processes.
    pub url: String,
    name: String,
}

impl TestDb {
    /// Creates a fresh database with the outbox schema applied.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        outbox::schema::migrate(&db.pool)
            .await
            .expect("outbox migrations apply");
        db
    }

    /// Creates a fresh database with no schema.
    pub async fn empty() -> Self {
        let name = unique("t");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", pg_server_url()))
            .await
            .expect("PostgreSQL reachable (run scripts/ensure-services.sh)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = format!("{}/{name}", pg_server_url());
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect test database");
        Self { pool, url, name }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Applies the outbox's migrations (those embedded in the library) whose version `which`
    /// accepts, in version order, one transaction each, without recording them as applied: for
    /// tests and benchmarks that need the schema as it was before a given migration, or another
    /// chosen set of them, and may then apply the rest.
    pub async fn apply_outbox_migrations(&self, which: impl Fn(i64) -> bool) {
        let migrator = outbox::schema::migrator();
        for m in migrator
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && which(m.version))
        {
            let mut tx = self.pool.begin().await.expect("begin a migration");
            sqlx::raw_sql(&m.sql)
                .execute(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("migration {} ({}): {e}", m.version, m.description));
            tx.commit().await.expect("commit a migration");
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        block_on_own_thread(async move {
            if let Ok(admin) = PgPoolOptions::new()
                .max_connections(1)
                .connect(&format!("{}/postgres", pg_server_url()))
                .await
            {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&admin)
                    .await;
            }
        });
    }
}

/// Runs clean-up to completion from `Drop`, which may run inside or outside a Tokio runtime: a
/// private runtime on a thread of its own works in both cases.
fn block_on_own_thread<F: std::future::Future<Output = ()> + Send + 'static>(f: F) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("clean-up runtime")
            .block_on(f)
    })
    .join();
}

/// A JetStream stream name and subject prefix for one test; the stream is deleted on drop.
pub struct TestStream {
    /// Stream name.
    pub name: String,
    /// Subject prefix: the stream captures `<prefix>.>`.
    pub prefix: String,
}

impl TestStream {
    /// A unique stream name and prefix (the stream itself is created by the relay under test).
    pub fn new() -> Self {
        let id = unique("s");
        Self {
            name: id.to_uppercase(),
            prefix: id,
        }
    }

    /// The relay's NATS settings for this stream.
    pub fn nats_config(&self) -> outbox::nats::NatsConfig {
        outbox::nats::NatsConfig {
            url: nats_url(),
            stream: self.name.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            subject_template: format!("{}.{{tenant}}.{{topic}}", self.prefix),
            ..Default::default()
        }
    }

    /// Every message in the stream, in stream order.
    pub async fn messages(&self) -> Vec<async_nats::jetstream::message::StreamMessage> {
        read_stream(&self.name).await
    }
}

impl Default for TestStream {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.name.clone();
        block_on_own_thread(async move {
            if let Ok(c) = async_nats::connect(nats_url()).await {
                let _ = jetstream::new(c).delete_stream(&name).await;
            }
        });
    }
}

/// Reads every message of `stream` in order (direct gets: works on nats-server 2.9).
pub async fn read_stream(stream: &str) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let client = async_nats::connect(nats_url())
        .await
        .expect("NATS reachable");
    let js = jetstream::new(client);
    let mut s = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(_) => return Vec::new(),
    };
    let state = s.info().await.expect("stream info").state.clone();
    let mut out = Vec::with_capacity(state.messages as usize);
    for seq in state.first_sequence..=state.last_sequence {
        if state.messages == 0 {
            break;
        }
        out.push(stream_message(&s, seq).await);
    }
    out
}

/// The stream's message `seq`, read again while the server fails to answer (a time-out on a
/// loaded machine, a leader being elected): a failed read must not look like a missing event.
/// Panics, naming the sequence, after 30 s of failures.
pub async fn stream_message(
    s: &jetstream::stream::Stream,
    seq: u64,
) -> jetstream::message::StreamMessage {
    let mut last = None;
    for _ in 0..300 {
        match s.get_raw_message(seq).await {
            Ok(m) => return m,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("stream message {seq} could not be read for 30 s: {last:?}")
}

/// Polls `f` until it returns true or `timeout` passes; returns the last answer.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Moves the pending rows of `outbox_event` that match `filter` (an SQL condition) into
/// `outbox_published` with `published_at` = `at` (an SQL expression), as the relay does when the
/// broker acknowledges them: for tests and benchmarks that need published rows of a given age.
pub async fn mark_published(pool: &sqlx::PgPool, filter: &str, at: &str) -> u64 {
    sqlx::query(&format!(
        "WITH moved AS (
             DELETE FROM outbox_event WHERE status = 'pending' AND ({filter})
             RETURNING id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic,
                       payload, headers, seq, partition, attempts, created_at, seq_epoch)
         INSERT INTO outbox_published (id, event_id, tenant_id, aggregate_type, aggregate_id,
                event_type, topic, payload, headers, seq, partition, attempts, created_at, seq_epoch,
                published_at)
         SELECT *, {at} FROM moved"
    ))
    .execute(pool)
    .await
    .expect("move rows to outbox_published")
    .rows_affected()
}
