//! Operator commands: `status`, `dead-letters ...`, `cleanup`. Human output by default, `--json`
//! for machines.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use outbox::ops::{self, DeadLetterFilter};
use sqlx::PgPool;
use uuid::Uuid;

/// Which dead letters a command acts on.
#[derive(Debug, Clone, Args)]
pub struct FilterArgs {
    /// One event id.
    #[arg(long)]
    pub id: Option<Uuid>,
    /// Tenant id.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Aggregate type.
    #[arg(long)]
    pub aggregate_type: Option<String>,
    /// Aggregate id.
    #[arg(long)]
    pub aggregate_id: Option<String>,
    /// Dead-lettered at or after this time (RFC 3339, e.g. 2026-11-22T10:00:00Z).
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// Dead-lettered before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
}

impl FilterArgs {
    fn filter(&self, limit: Option<i64>) -> DeadLetterFilter {
        DeadLetterFilter {
            event_id: self.id,
            tenant_id: self.tenant.clone(),
            aggregate_type: self.aggregate_type.clone(),
            aggregate_id: self.aggregate_id.clone(),
            since: self.since,
            until: self.until,
            limit,
            ..Default::default()
        }
    }
}

/// `outbox dead-letters ...`
#[derive(Debug, Subcommand)]
pub enum DeadLetterCmd {
    /// List dead letters (oldest first) with their last error.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its payload.
    Show {
        /// The event id.
        event_id: Uuid,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back into delivery, in their original order.
    Replay {
        #[command(flatten)]
        filter: FilterArgs,
        /// Who does this (recorded in the audit trail).
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters for good (their aggregates' later events then flow).
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Who does this (recorded in the audit trail).
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `outbox status`.
pub async fn status(pool: &PgPool, json: bool) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status_json(pool).await?)?
        );
        return Ok(());
    }
    let s = ops::status(pool).await?;
    let refused = outbox::storage::route_holds::list(pool).await?;
    println!(
        "events: {} pending, {} published (kept for retention), {} dead, {} held behind a dead letter",
        s.counts.pending, s.counts.published, s.counts.dead, s.counts.held
    );
    // Always shown: 0 is the answer an operator looks for after the orphan alert.
    println!(
        "held with no dead letter ahead of them (orphaned, nothing releases them): {}{}",
        s.counts.held_orphaned,
        if s.counts.held_orphaned > 0 {
            " -- see docs/outbox-table.md, \"Writers' isolation level\""
        } else {
            ""
        }
    );
    match s.oldest_pending_age_seconds {
        Some(a) => println!("oldest pending event: {a:.1} s old"),
        None => println!("oldest pending event: none pending"),
    }
    for (title, rows) in [
        ("by tenant", &s.by_tenant),
        ("by event type", &s.by_event_type),
    ] {
        if !rows.is_empty() {
            println!("{title}:");
            for b in rows {
                println!(
                    "  {:<40} {:>10} pending {:>8} dead",
                    b.key, b.pending, b.dead
                );
            }
        }
    }
    println!("relays ({}):", s.relays.len());
    for r in &s.relays {
        println!(
            "  {} on {} (pid {}), heartbeat {}, {} partitions: {}",
            r.relay_id,
            r.host,
            r.pid,
            r.heartbeat_at.format("%Y-%m-%dT%H:%M:%SZ"),
            r.partitions.len(),
            ranges(&r.partitions)
        );
    }
    if !s.unowned_partitions.is_empty() {
        println!(
            "partitions held by no relay: {}",
            ranges(&s.unowned_partitions)
        );
    }
    print_refused_routes(&refused);
    Ok(())
}

/// `outbox status --json` of one database: [`ops::status`] with `refused_routes`, the routes
/// relays hold back because the broker refused them (issue 19).
pub async fn status_json(pool: &PgPool) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(ops::status(pool).await?)?;
    v["refused_routes"] = serde_json::to_value(outbox::storage::route_holds::list(pool).await?)?;
    Ok(v)
}

/// The routes relays hold back because the broker refused them (issue 19), as the relays last
/// wrote them.
fn print_refused_routes(refused: &[outbox::storage::route_holds::RouteHold]) {
    if refused.is_empty() {
        println!("refused routes: none");
        return;
    }
    println!(
        "refused routes ({}): their events wait, the other routes flow",
        refused.len()
    );
    let now = chrono::Utc::now();
    for r in refused {
        println!(
            "  {} (relay {}): refused {} time(s) in a row since {}, next try {}, oldest held event {:.1} s old: {}",
            r.route,
            r.relay_id,
            r.refusals,
            r.since.format("%Y-%m-%dT%H:%M:%SZ"),
            r.until.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            (now - r.oldest_event_at).num_milliseconds() as f64 / 1000.0,
            r.last_error
        );
    }
}

/// `0-5,9,12-13`.
fn ranges(p: &[i16]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let mut j = i;
        while j + 1 < p.len() && p[j + 1] == p[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            p[i].to_string()
        } else {
            format!("{}-{}", p[i], p[j])
        });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// `outbox dead-letters ...`.
pub async fn dead_letters(pool: &PgPool, cmd: DeadLetterCmd) -> anyhow::Result<()> {
    match cmd {
        DeadLetterCmd::List {
            filter,
            limit,
            json,
        } => {
            let rows = ops::dead_letters(pool, &filter.filter(Some(limit))).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("no dead letters match");
            } else {
                for d in rows {
                    println!(
                        "{}  {}/{}/{} #{}  {}  attempts {}  dead {}  error: {}",
                        d.event_id,
                        d.tenant_id,
                        d.aggregate_type,
                        d.aggregate_id,
                        d.seq,
                        d.event_type,
                        d.attempts,
                        d.dead_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                        d.last_error.unwrap_or_default()
                    );
                }
            }
        }
        DeadLetterCmd::Show { event_id, json } => {
            let d = ops::dead_letter(pool, event_id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!(
                    "event {} ({}), aggregate {}/{}/{} #{}",
                    d.event_id, d.event_type, d.tenant_id, d.aggregate_type, d.aggregate_id, d.seq
                );
                println!(
                    "topic {}, written {}, dead {}",
                    d.topic,
                    d.created_at.to_rfc3339(),
                    d.dead_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                );
                println!(
                    "attempts {}, last error: {}",
                    d.attempts,
                    d.last_error.unwrap_or_default()
                );
                println!(
                    "payload ({} bytes): {}",
                    d.payload.len(),
                    preview(&d.payload)
                );
            }
        }
        DeadLetterCmd::Replay {
            filter,
            actor,
            json,
        } => {
            let ids = ops::replay(pool, &filter.filter(None), &actor).await?;
            report("replayed", &ids, json)?;
        }
        DeadLetterCmd::Purge {
            filter,
            actor,
            yes,
            json,
        } => {
            let f = filter.filter(None);
            let n = ops::dead_letters(
                pool,
                &DeadLetterFilter {
                    limit: Some(100_000),
                    ..f.clone()
                },
            )
            .await?
            .len();
            if n == 0 {
                return report("purged", &[], json);
            }
            if !yes {
                confirm(&format!(
                    "Purge {n} dead letter(s){} for good? Each is replaced by a skip marker (Outbox-Skip) that consumers pass over, and their aggregates' later events are then delivered. [y/N] ",
                    if f.is_empty() { " (no filter: ALL dead letters)" } else { "" }
                ))?;
            }
            let ids = ops::purge(pool, &f, &actor).await?;
            report("purged", &ids, json)?;
        }
    }
    Ok(())
}

fn preview(s: &str) -> String {
    if s.len() > 2000 {
        format!(
            "{}... (truncated)",
            &s[..s
                .char_indices()
                .nth(2000)
                .map(|(i, _)| i)
                .unwrap_or(s.len())]
        )
    } else {
        s.to_string()
    }
}

fn report(what: &str, ids: &[Uuid], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::json!({ what: ids }));
    } else {
        println!("{what} {} dead letter(s)", ids.len());
        for id in ids {
            println!("  {id}");
        }
    }
    Ok(())
}

fn confirm(question: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to purge without confirmation: stdin is not a terminal; pass --yes to confirm");
    }
    print!("{question}");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not confirmed; nothing was purged");
    }
    Ok(())
}

/// `outbox cleanup`.
pub async fn cleanup(
    pool: &PgPool,
    retention_hours: f64,
    aggregate_horizon_hours: f64,
    batch: i64,
    pause_ms: u64,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    if !(retention_hours >= 0.0 && retention_hours.is_finite()) {
        bail!("--retention-hours must be 0 or more");
    }
    if !(aggregate_horizon_hours >= 0.0 && aggregate_horizon_hours.is_finite()) {
        bail!("--aggregate-horizon-hours must be 0 (off) or more");
    }
    let n = ops::cleanup(
        pool,
        Duration::from_secs_f64(retention_hours * 3600.0),
        batch,
        Duration::from_millis(pause_ms),
        dry_run,
    )
    .await?;
    let aggregates = if dry_run || aggregate_horizon_hours == 0.0 {
        0
    } else {
        ops::compact_aggregates(
            pool,
            Duration::from_secs_f64(aggregate_horizon_hours * 3600.0),
            batch,
            Duration::from_millis(pause_ms),
        )
        .await?
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "dryRun": dry_run, "rows": n, "aggregatesCompacted": aggregates })
        );
    } else if dry_run {
        println!("{n} published event(s) older than {retention_hours} h would be deleted");
    } else {
        println!("deleted {n} published event(s) older than {retention_hours} h");
        println!("compacted {aggregates} idle aggregate sequence row(s)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_compress() {
        assert_eq!(super::ranges(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(super::ranges(&[]), "none");
    }
}
