//! Console page latency on a large outbox (issue 21): 1,000,000 pending and 1,000,000 published
//! rows, 100,000 dead letters (10,000 events held behind some of them) over 1,000 tenants.
//! Seeds with `generate_series` through the table's triggers (docs/outbox-table.md), serves the
//! console in-process, and reports p50/p95 per page, warm, with the same-run baselines: the
//! stylesheet (same HTTP stack, no query) and a `SELECT 1` on the console's pool.
//!
//! `cargo run --release -p outbox-console --example bench_console`
//! Env: `BENCH_PG_URL` (server, default postgres://root@127.0.0.1:5432), `BENCH_DB` (database
//! name; an existing seeded one is reused, default `bench_console`), `BENCH_ROUNDS` (default 60),
//! `BENCH_SCALE` (divides every row count, default 1).

use std::time::{Duration, Instant};

use outbox_console::{ConsoleConfig, NamedPool, Operators};
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "bench-operator-token-0001";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server =
        std::env::var("BENCH_PG_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432".into());
    let name = std::env::var("BENCH_DB").unwrap_or_else(|_| "bench_console".into());
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let scale: i64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{server}/postgres"))
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&admin)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
    }
    let url = format!("{server}/{name}");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    outbox::schema::migrate(&pool).await?;
    let seeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM (SELECT 1 FROM outbox_published LIMIT 10) s")
            .fetch_one(&pool)
            .await?;
    if seeded == 0 {
        seed(&pool, scale).await?;
    } else {
        println!("reusing the seeded database {name}");
    }
    let (pending, dead, held, published): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead'),
                count(*) FILTER (WHERE status = 'held'), (SELECT count(*) FROM outbox_published)
           FROM outbox_event",
    )
    .fetch_one(&pool)
    .await?;
    println!("rows: {pending} pending, {published} published, {dead} dead, {held} held");

    let console_pool = outbox_console::console_pool("bench", &url, 2, Duration::from_secs(2))?;
    let config = ConsoleConfig {
        outboxes: vec![NamedPool {
            name: "bench".into(),
            pool: console_pool.clone(),
        }],
        consumers: vec![NamedPool {
            name: "bench".into(),
            pool: console_pool.clone(),
        }],
        operators: Operators::load(None, Some(&format!("bench:{TOKEN}")))?,
        anonymous_read: false,
        allowed_hosts: vec![],
        secure_cookie: false,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(outbox_console::serve(
        listener,
        config,
        std::future::pending(),
    ));
    let login = http(
        addr,
        "POST",
        "/login",
        None,
        Some(&format!("token={TOKEN}")),
    )
    .await?;
    let cookie = login
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("no session cookie: {login}"))?;
    let group: String =
        sqlx::query_scalar("SELECT error_group FROM outbox_event WHERE status = 'dead' LIMIT 1")
            .fetch_one(&pool)
            .await?;
    let dead_id: uuid::Uuid =
        sqlx::query_scalar("SELECT event_id FROM outbox_event WHERE status = 'dead' LIMIT 1")
            .fetch_one(&pool)
            .await?;
    let g = outbox_console::render::enc(&group);
    let pages: Vec<(&str, String)> = vec![
        (
            "baseline: stylesheet (no query)",
            "/static/console.css".into(),
        ),
        ("overview", "/".into()),
        (
            "dead letters by failure and aggregate",
            "/db/bench/dead".into(),
        ),
        (
            "aggregates of one failure group",
            format!("/db/bench/dead?group={g}"),
        ),
        (
            "dead letter list (newest 100)",
            "/db/bench/dead/list".into(),
        ),
        (
            "dead letter list of one group",
            format!("/db/bench/dead/list?group={g}"),
        ),
        (
            "dead letter list of one tenant",
            "/db/bench/dead/list?tenant=t7".into(),
        ),
        ("one dead letter", format!("/db/bench/event/{dead_id}")),
        ("consumers", "/consumers/bench".into()),
    ];
    println!("\n{rounds} requests per page after 5 warm-up requests, one at a time; machine shared and noisy");
    println!(
        "{:<42} {:>9} {:>9} {:>9} {:>14}",
        "page", "p50 ms", "p95 ms", "max ms", "p95 / css p95"
    );
    let mut css_p95 = 0.0;
    for (label, path) in &pages {
        for _ in 0..5 {
            let r = http(addr, "GET", path, Some(&cookie), None).await?;
            anyhow::ensure!(
                r.starts_with("HTTP/1.1 200"),
                "{path}: {}",
                r.lines().next().unwrap_or("")
            );
        }
        let mut ms = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            http(addr, "GET", path, Some(&cookie), None).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        let p = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        if css_p95 == 0.0 {
            css_p95 = p(0.95);
        }
        println!(
            "{label:<42} {:>9.2} {:>9.2} {:>9.2} {:>14.1}",
            p(0.5),
            p(0.95),
            ms[ms.len() - 1],
            p(0.95) / css_p95
        );
    }
    let mut ms = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        sqlx::query("SELECT 1").execute(&console_pool).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{:<42} {:>9.2} {:>9.2}",
        "baseline: SELECT 1 on the console pool",
        ms[ms.len() / 2],
        ms[ms.len() * 95 / 100]
    );
    Ok(())
}

/// Seeds the outbox: pending, dead (with held rows behind some), published.
async fn seed(pool: &sqlx::PgPool, scale: i64) -> anyhow::Result<()> {
    let t = Instant::now();
    let pending = 1_000_000 / scale;
    let dead = 100_000 / scale;
    let held = 10_000 / scale;
    let published = 1_000_000 / scale;
    // Pending: 1,000 tenants, 100,000 aggregates, 5 event types, through the insert trigger,
    // in statements of 100,000 rows.
    let mut from = 0;
    while from < pending {
        let to = (from + 100_000).min(pending);
        sqlx::query(
            "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
             SELECT gen_random_uuid(), 't' || (g % 1000), 'ProductVariant', 'v' || (g % 100000),
                    (ARRAY['StockLevelChanged', 'StockReserved', 'StockReleased', 'PriceChanged', 'VariantCreated'])[1 + g % 5],
                    'inventory.stock.changed', convert_to(json_build_object('g', g, 'qty', g % 17)::text, 'UTF8')
               FROM generate_series($1::int8, $2::int8 - 1) g ORDER BY g",
        )
        .bind(from)
        .bind(to)
        .execute(pool)
        .await?;
        from = to;
    }
    println!(
        "seeded {pending} pending in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Dead letters: their own aggregates, dead-lettered by an UPDATE as the relay does (the
    // trigger files each under its failure group), with 10 kinds of errors carrying ids.
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 't' || (g % 1000), 'ProductVariant', 'd' || g, 'StockLevelChanged',
                'inventory.stock.changed', convert_to(json_build_object('g', g)::text, 'UTF8')
           FROM generate_series(0, $1::int8 - 1) g ORDER BY g",
    )
    .bind(dead)
    .execute(pool)
    .await?;
    sqlx::query(
        "UPDATE outbox_event SET status = 'dead', dead_at = now() - make_interval(secs => (id % 86400)::float8),
                attempts = 5, blocks_aggregate = true,
                last_error = CASE id % 10
                    WHEN 0 THEN 'gave up after 5 attempts: nats: no responders for subject inv.' || tenant_id || '.' || event_id
                    WHEN 1 THEN 'message too large: ' || (1048576 + id % 1000) || ' > 1048576'
                    WHEN 2 THEN 'gave up after 5 attempts: nats: timed out waiting for ack of ' || event_id
                    WHEN 3 THEN 'gave up after 5 attempts: rabbitmq: unroutable: routing key \"' || aggregate_id || '\"'
                    ELSE 'gave up after 5 attempts: broker rejected message ' || event_id || ' (code ' || (id % 7) || ')'
                END
          WHERE aggregate_id LIKE 'd%' AND status = 'pending'",
    )
    .execute(pool)
    .await?;
    // Held: later events of the first dead letters' aggregates.
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 't' || (g % 1000), 'ProductVariant', 'd' || g, 'StockLevelChanged',
                'inventory.stock.changed', '\\x7b7d'
           FROM generate_series(0, $1::int8 - 1) g ORDER BY g",
    )
    .bind(held)
    .execute(pool)
    .await?;
    println!(
        "seeded {dead} dead and {held} held in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Published: straight into the archive table (no trigger there), spread over a day.
    let mut from = 0;
    while from < published {
        let to = (from + 250_000).min(published);
        sqlx::query(
            "INSERT INTO outbox_published (id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic,
                                           payload, headers, seq, partition, attempts, created_at, published_at, seq_epoch)
             SELECT 10000000 + g, gen_random_uuid(), 't' || (g % 1000), 'ProductVariant', 'p' || (g % 100000),
                    'StockLevelChanged', 'inventory.stock.changed', '\\x7b7d', '{}', g / 100000 + 1, (g % 64)::int2, 0,
                    now() - make_interval(secs => ($2::int8 - g) * 86400.0 / $2::int8) - interval '1 second',
                    now() - make_interval(secs => ($2::int8 - g) * 86400.0 / $2::int8), 0
               FROM generate_series($1::int8, $3::int8 - 1) g",
        )
        .bind(from)
        .bind(published)
        .bind(to)
        .execute(pool)
        .await?;
        from = to;
    }
    println!(
        "seeded {published} published in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    sqlx::query("VACUUM ANALYZE outbox_event")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE outbox_published")
        .execute(pool)
        .await?;
    sqlx::query("VACUUM ANALYZE outbox_aggregate")
        .execute(pool)
        .await?;
    println!("seeded and vacuumed in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// One HTTP/1.1 request (Connection: close); the whole response as text.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nOrigin: http://{addr}\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    match form {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
