//! `outbox status` over several databases: each one by its name, one unreachable database
//! reported without hiding the others.

use std::time::Duration;

use anyhow::bail;
use sqlx::postgres::PgPoolOptions;

use crate::databases::Database;

/// Prints the status of every database in `databases`, one section each (`--json`: an object
/// keyed by name, with `error` for a database that cannot be read). Fails, after printing the
/// others, when any database could not be read.
pub async fn status_all(databases: &[Database], json: bool) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    let mut out = serde_json::Map::new();
    for (i, d) in databases.iter().enumerate() {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&d.url)
            .await;
        let pool = match pool {
            Ok(p) => p,
            Err(e) => {
                failed.push(d.name.clone());
                if json {
                    out.insert(
                        d.name.clone(),
                        serde_json::json!({ "error": format!("{e:#}") }),
                    );
                } else {
                    section(i, &d.name);
                    println!("unreachable: {e:#}");
                }
                continue;
            }
        };
        if json {
            match crate::ops_cmd::status_json(&pool).await {
                Ok(v) => {
                    out.insert(d.name.clone(), v);
                }
                Err(e) => {
                    failed.push(d.name.clone());
                    out.insert(
                        d.name.clone(),
                        serde_json::json!({ "error": format!("{e:#}") }),
                    );
                }
            }
        } else {
            section(i, &d.name);
            if let Err(e) = crate::ops_cmd::status(&pool, false).await {
                failed.push(d.name.clone());
                println!("cannot read its outbox: {e:#}");
            }
        }
        pool.close().await;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "databases": out }))?
        );
    }
    if !failed.is_empty() {
        bail!(
            "cannot read the outbox of {}: check that the database runs and the URL is right",
            failed.join(", ")
        );
    }
    Ok(())
}

fn section(i: usize, name: &str) {
    if i > 0 {
        println!();
    }
    println!("== database {name} ==");
}
