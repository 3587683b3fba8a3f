//! Errors of the outbox library.

use thiserror::Error;

/// Everything the outbox library can fail with. Each message says what went wrong and what to do.
#[derive(Debug, Error)]
pub enum OutboxError {
    /// An event given to [`crate::Outbox::enqueue`] does not satisfy the table contract.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    /// The event data could not be serialised to JSON.
    #[error("event data is not serialisable to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The database refused or could not be reached.
    #[error("database error: {0} (check DATABASE_URL and that PostgreSQL is running)")]
    Database(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("schema migration failed: {0} (run `outbox migrate` against a database you own)")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A configuration value makes no sense; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The broker adapter could not be set up; the message says why.
    #[error("broker: {0}")]
    Broker(String),
    /// Another live relay process uses this relay id.
    #[error("relay id {relay_id:?} is in use by a live relay on host {host:?} (pid {pid}): give each relay its own --relay-id (or leave it unset for a unique one)")]
    RelayIdInUse {
        /// The contested id.
        relay_id: String,
        /// Host of the relay holding it.
        host: String,
        /// Its process id.
        pid: i32,
    },
    /// An operator command named something that does not exist.
    #[error("not found: {0}")]
    NotFound(String),
}

impl OutboxError {
    /// The SQLSTATE of a database error, if the database answered with one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            OutboxError::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            _ => None,
        }
    }

    /// Whether the database refused a statement for the data it was given (SQLSTATE classes 22,
    /// data exception, and 23, integrity constraint violation): that data's fault, which trying
    /// again cannot mend, unlike a lost connection, a shutdown or a lack of resources (classes
    /// 08, 57, 53), a lock conflict (40) or anything else about the database as a whole.
    pub fn is_data_error(&self) -> bool {
        matches!(self, OutboxError::Serialize(_))
            || self
                .sqlstate()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = OutboxError> = std::result::Result<T, E>;
