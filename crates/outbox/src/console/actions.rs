//! Replay and purge from the console: a dry run first ([`preview_dead`], [`preview_parked`]),
//! which counts the set and fixes the moment it was shown; then the action on that set only
//! ([`apply_dead`], [`apply_parked`]): rows that failed after the dry run are left out (the
//! condition `dead_at <= as_of`, resp. `parked_at <= as_of`), and rows that left the set meanwhile
//! (replayed or purged by someone else) show as the difference between what was shown and what
//! was done. Both go through the same functions as the CLI ([`crate::ops::replay`],
//! [`crate::ops::purge`] with its skip markers; [`crate::consumers::dead_letters`] for parked
//! events), so they are audited in `outbox_audit` with the operator's name as actor.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::consumers::dead_letters::{self, ParkedFilter};
use crate::error::{OutboxError, Result};
use crate::ops::{self, DeadLetterFilter};

/// What an operator does to a set of dead letters or parked events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Deliver (dead letters) or apply (parked events) again, in order.
    Replay,
    /// Skip for good: a dead letter becomes a skip marker (`ops::purge`), a parked event is
    /// skipped and its aggregate's position moves past it.
    Purge,
}

impl Action {
    /// `replay` or `purge`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Replay => "replay",
            Action::Purge => "purge",
        }
    }

    /// Parses `replay` or `purge`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "replay" => Some(Action::Replay),
            "purge" => Some(Action::Purge),
            _ => None,
        }
    }
}

/// A dry run.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    /// Rows in the set.
    pub count: i64,
    /// The moment the set was taken: applying it leaves out what failed after.
    pub as_of: DateTime<Utc>,
}

/// What an action did.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// Rows the dry run showed.
    pub shown: i64,
    /// Rows acted on (event ids).
    pub done: Vec<Uuid>,
}

impl Applied {
    /// Rows shown but no longer there to act on (someone else replayed or purged them, or the
    /// relay delivered a replayed one): `shown - done`.
    pub fn difference(&self) -> i64 {
        self.shown - self.done.len() as i64
    }
}

fn refuse_empty(empty: bool) -> Result<()> {
    if empty {
        return Err(OutboxError::Config(
            "name what to act on: an event, an aggregate, a failure group, a tenant or a time window"
                .into(),
        ));
    }
    Ok(())
}

async fn db_now(pool: &PgPool) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?)
}

/// Counts the dead letters `filter` names, now.
pub async fn preview_dead(pool: &PgPool, filter: &DeadLetterFilter) -> Result<Preview> {
    refuse_empty(filter.is_empty())?;
    let as_of = db_now(pool).await?;
    let count = ops::count_dead_letters(
        pool,
        &DeadLetterFilter {
            as_of: Some(as_of),
            ..filter.clone()
        },
    )
    .await?;
    Ok(Preview { count, as_of })
}

/// Applies `action` to the dead letters `filter` named at `preview.as_of`, as `actor`.
pub async fn apply_dead(
    pool: &PgPool,
    action: Action,
    filter: &DeadLetterFilter,
    preview: &Preview,
    actor: &str,
) -> Result<Applied> {
    refuse_empty(filter.is_empty())?;
    let f = DeadLetterFilter {
        as_of: Some(preview.as_of),
        limit: None,
        ..filter.clone()
    };
    let done = match action {
        Action::Replay => ops::replay(pool, &f, actor).await?,
        Action::Purge => ops::purge(pool, &f, actor).await?,
    };
    Ok(Applied {
        shown: preview.count,
        done,
    })
}

/// Counts the parked events `filter` names, now.
pub async fn preview_parked(pool: &PgPool, filter: &ParkedFilter) -> Result<Preview> {
    refuse_empty(filter.is_empty())?;
    let as_of = db_now(pool).await?;
    let count = dead_letters::count(
        pool,
        &ParkedFilter {
            as_of: Some(as_of),
            ..filter.clone()
        },
    )
    .await?;
    Ok(Preview { count, as_of })
}

/// Applies `action` to the parked events `filter` named at `preview.as_of`, as `actor`. A
/// replay asks the running consumer to apply them (it does so within its replay poll); a purge
/// is refused, naming them, while an earlier parked event of the same aggregate would stay
/// parked (the consumer's skip rule, `dead_letters::purge`).
pub async fn apply_parked(
    pool: &PgPool,
    action: Action,
    filter: &ParkedFilter,
    preview: &Preview,
    actor: &str,
) -> Result<Applied> {
    refuse_empty(filter.is_empty())?;
    let f = ParkedFilter {
        as_of: Some(preview.as_of),
        ..filter.clone()
    };
    let done = match action {
        Action::Replay => dead_letters::request_replay(pool, &f, actor, false).await?,
        Action::Purge => dead_letters::purge(pool, &f, actor).await?,
    };
    Ok(Applied {
        shown: preview.count,
        done,
    })
}
