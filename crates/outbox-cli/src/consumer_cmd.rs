//! `outbox consumer-dead-letters ...`: events a consumer runtime parked, in the consumer's
//! database (`DATABASE_URL` is then the consumer's database, not the producer's).

use anyhow::bail;
use clap::{Args, Subcommand};
use outbox::consumers::dead_letters::{self, ParkedFilter};
use sqlx::PgPool;
use uuid::Uuid;

/// Which parked events a command acts on.
#[derive(Debug, Clone, Args)]
pub struct ParkedArgs {
    /// Consumer name (as configured in the consumer).
    #[arg(long)]
    pub consumer: Option<String>,
    /// One event id.
    #[arg(long)]
    pub id: Option<Uuid>,
    /// Tenant id.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Why it was parked: handler, gap, held, unreadable.
    #[arg(long)]
    pub reason: Option<String>,
}

impl ParkedArgs {
    fn filter(&self) -> ParkedFilter {
        ParkedFilter {
            consumer: self.consumer.clone(),
            event_id: self.id,
            tenant_id: self.tenant.clone(),
            reason: self.reason.clone(),
            ..Default::default()
        }
    }
}

/// `outbox consumer-dead-letters ...`
#[derive(Debug, Subcommand)]
pub enum ConsumerDeadLetterCmd {
    /// List parked events (oldest first) with their reason and last error.
    List {
        #[command(flatten)]
        filter: ParkedArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running consumer to apply parked events again; the events parked behind them in
    /// their aggregates follow, in order.
    Replay {
        #[command(flatten)]
        filter: ParkedArgs,
        /// Apply them although events before them never arrived (a parked `gap`: the aggregate
        /// starts there, the skipped range is recorded in `outbox_consumer_skip`). Still refused
        /// while anything earlier of the aggregate is parked, retried or waiting.
        #[arg(long)]
        accept_gap: bool,
        /// Who does this (recorded in the audit trail).
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
    },
    /// Skip parked events for good: never applied, their aggregates move on past them (recorded
    /// in `outbox_consumer_skip`). Refused while an earlier parked event of the same aggregate
    /// would stay parked behind the moved position: purge or replay that one first.
    Purge {
        #[command(flatten)]
        filter: ParkedArgs,
        /// Who does this (recorded in the audit trail).
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
        /// Confirm: purged events are never applied.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs one `consumer-dead-letters` command.
pub async fn run(pool: &PgPool, cmd: ConsumerDeadLetterCmd) -> anyhow::Result<()> {
    match cmd {
        ConsumerDeadLetterCmd::List {
            filter,
            limit,
            json,
        } => {
            let rows = dead_letters::list(pool, &filter.filter(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            if rows.is_empty() {
                println!("no parked events");
            }
            for r in rows {
                println!(
                    "{} consumer={} type={} aggregate={}/{}/{} seq={}:{} reason={} attempts={} parked={}{} error={}",
                    r.event_id,
                    r.consumer,
                    r.event_type.as_deref().unwrap_or("-"),
                    r.tenant_id.as_deref().unwrap_or("-"),
                    r.aggregate_type.as_deref().unwrap_or("-"),
                    r.aggregate_id.as_deref().unwrap_or("-"),
                    r.seq_epoch.map(|e| e.to_string()).unwrap_or("-".into()),
                    r.seq.map(|e| e.to_string()).unwrap_or("-".into()),
                    r.reason,
                    r.attempts,
                    r.parked_at.to_rfc3339(),
                    if r.replay_requested_at.is_some() { " (replay requested)" } else { "" },
                    r.last_error.as_deref().unwrap_or("-"),
                );
            }
        }
        ConsumerDeadLetterCmd::Replay {
            filter,
            actor,
            accept_gap,
        } => {
            let ids =
                dead_letters::request_replay(pool, &filter.filter(), &actor, accept_gap).await?;
            println!(
                "replay requested for {} parked event(s); the running consumer applies them within its replay poll",
                ids.len()
            );
        }
        ConsumerDeadLetterCmd::Purge { filter, actor, yes } => {
            if !yes {
                bail!("purged events are never applied: add --yes to confirm");
            }
            let ids = dead_letters::purge(pool, &filter.filter(), &actor).await?;
            println!("purged {} parked event(s)", ids.len());
        }
    }
    Ok(())
}
