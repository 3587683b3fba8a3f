//! One `outbox relay` process serving three outbox databases (`--database-url NAME=URL` three
//! times), one of which it reaches through a proxy that is cut at a seeded moment while that
//! database is being drained, with writers still committing to every database (a few hot
//! aggregates each). The other two must drain fully and in order while the third is away, the
//! third must drain once it is back, nothing may be lost, and metrics, health and `outbox status`
//! must show each database by its name. `SOAK_SEED` replays a run's schedule.
//! Also: a second PostgreSQL server (run by the test) crashed and restarted mid-drain, and a busy
//! database beside a quiet one (fair time sharing).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::faults::soak_seed;
use testkit::proxy::Proxy;
use testkit::{eventually, TestDb, TestStream};

/// Plain HTTP/1.0 GET on loopback: status code and body.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

async fn get_json(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
    let (code, body) = get(port, path).await?;
    Some((code, serde_json::from_str(&body).ok()?))
}

/// The value of `name{...database="db"...}` summed over its other labels.
fn metric(body: &str, name: &str, db: &str) -> Option<f64> {
    let label = format!("database=\"{db}\"");
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Inserts `n` events of tenant `{prefix}{0..2}` over `aggregates` aggregates in one statement.
async fn backlog(db: &TestDb, prefix: &str, n: i64, aggregates: i64) {
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), $3 || (g % 3), 'V', 'a' || (g % $2), 'Bulk', 'bulk.created',
                convert_to(json_build_object('g', g)::text, 'UTF8')
         FROM generate_series(1, $1) AS g ORDER BY g",
    )
    .bind(n)
    .bind(aggregates)
    .bind(prefix)
    .execute(&db.pool)
    .await
    .expect("insert backlog");
}

/// Commits one event at a time on 3 hot aggregates of tenant `{prefix}hot` until `until`;
/// returns how many it committed.
async fn writer(pool: sqlx::PgPool, prefix: String, seed: u64, until: Instant) -> i64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let outbox = outbox::Outbox::new("many-databases-test");
    let tenant = format!("{prefix}hot");
    let mut n = 0;
    while Instant::now() < until {
        let agg = format!("h{}", rng.random_range(0..3));
        let mut tx = pool.begin().await.expect("begin");
        outbox
            .enqueue(
                &mut tx,
                &[stock_event(&tenant, &agg, serde_json::json!({ "n": n }))],
            )
            .await
            .expect("enqueue");
        tx.commit().await.expect("commit");
        n += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
    }
    n
}

fn outbox_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    c.args(args)
        .env_remove("DATABASE_URL")
        .env_remove("OUTBOX_DATABASES_FILE")
        .env("RUST_LOG", "warn");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_databases_one_cut_mid_drain_the_others_flow_and_nothing_is_lost() {
    let seed = soak_seed();
    eprintln!("many_databases seed={seed} (SOAK_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let (a, b, c) = (
        TestDb::new().await,
        TestDb::new().await,
        TestDb::new().await,
    );
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let c_via_proxy = format!("postgres://root@{}/{}", proxy.addr, c.name());
    let stream = TestStream::new();
    let port = free_port();
    let (subjects, template) = (
        format!("{}.>", stream.prefix),
        format!("{}.{{tenant}}.{{topic}}", stream.prefix),
    );
    let urls = [
        format!("alpha={}", a.url),
        format!("beta={}", b.url),
        format!("gamma={c_via_proxy}"),
    ];
    let addr = format!("127.0.0.1:{port}");
    let mut relay = RelayProcess(
        outbox_cmd(&[
            "relay",
            "--database-url",
            &urls[0],
            "--database-url",
            &urls[1],
            "--database-url",
            &urls[2],
            "--nats-stream",
            &stream.name,
            "--nats-stream-subjects",
            &subjects,
            "--nats-subject",
            &template,
            "--lease-ms",
            "1500",
            "--poll-interval-ms",
            "100",
            "--batch-size",
            "200",
            "--stall-timeout-secs",
            "2",
            "--metrics-addr",
            &addr,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start outbox relay"),
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            matches!(get_json(port, "/readyz").await, Some((200, v)) if v["serving"] == 3)
        })
        .await,
        "seed={seed}: all three databases served: {:?}",
        get(port, "/readyz").await
    );

    let per_db = 3000;
    for (db, p) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        backlog(db, p, per_db, 60).await;
    }
    let until = Instant::now() + Duration::from_millis(rng.random_range(3000..5000));
    let writers: Vec<_> = [(&a, "a"), (&b, "b"), (&c, "c")]
        .into_iter()
        .flat_map(|(db, p)| {
            (0..2).map(|i| {
                tokio::spawn(writer(
                    db.pool.clone(),
                    p.to_string(),
                    seed ^ (i + 1) ^ u64::from(p.as_bytes()[0]),
                    until,
                ))
            })
        })
        .collect::<Vec<_>>();

    // Cut gamma while its relay is working through its backlog.
    let cut_after = rng.random_range(100..1500);
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&c, "published").await >= cut_after
        })
        .await,
        "seed={seed}: gamma drains before the cut"
    );
    proxy.cut();
    let at_cut = count(&c, "published").await;
    eprintln!("seed={seed}: gamma cut after {at_cut} published (aimed at {cut_after})");

    let mut committed = 0;
    for w in writers {
        committed += w.await.expect("writer");
    }
    let total = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT (SELECT count(*) FROM outbox_event) + (SELECT count(*) FROM outbox_published)",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let totals = [total(&a).await, total(&b).await, total(&c).await];
    assert_eq!(totals.iter().sum::<i64>(), 3 * per_db + committed);

    // The two reachable databases drain completely while gamma is away.
    for (db, name, t) in [(&a, "alpha", totals[0]), (&b, "beta", totals[1])] {
        assert!(
            eventually(Duration::from_secs(40), || async {
                count(db, "published").await == t
            })
            .await,
            "seed={seed}: {name} drains while gamma is away: {} of {t}",
            count(db, "published").await
        );
    }
    assert!(
        count(&c, "pending").await > 0,
        "seed={seed}: gamma keeps its backlog while away"
    );

    // Health and metrics name each database; gamma's outage fails readiness of nothing and
    // liveness not at all (a restart cannot bring a database back).
    assert!(
        eventually(Duration::from_secs(15), || async {
            matches!(get_json(port, "/readyz").await,
                Some((200, v)) if v["serving"] == 2 && v["databases"]["gamma"]["database"] == "down"
                    && v["databases"]["alpha"]["database"] == "up")
        })
        .await,
        "seed={seed}: ready with two of three, gamma shown down: {:?}",
        get(port, "/readyz").await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(get_json(port, "/healthz").await,
                Some((200, v)) if v["databases"]["gamma"]["status"] == "database_down"
                    && v["databases"]["beta"]["status"] == "ok")
        })
        .await,
        "seed={seed}: alive, gamma's relay reported as waiting for its database: {:?}",
        get(port, "/healthz").await
    );
    let m = get(port, "/metrics").await.expect("metrics").1;
    assert_eq!(metric(&m, "outbox_database_up", "gamma"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "outbox_database_up", "alpha"), Some(1.0), "{m}");
    for (name, t) in [("alpha", totals[0]), ("beta", totals[1])] {
        let published = metric(&m, "outbox_events_published_total", name).unwrap_or(0.0);
        assert!(published >= t as f64, "{name}: {published} < {t}: {m}");
        assert!(
            metric(&m, "outbox_pending_events", name).is_some(),
            "{name} has its own pending gauge: {m}"
        );
    }

    // `outbox status` shows each database by name, gamma as unreachable, and fails for it.
    let out = outbox_cmd(&[
        "status",
        "--database-url",
        &urls[0],
        "--database-url",
        &urls[1],
        "--database-url",
        &urls[2],
    ])
    .output()
    .expect("outbox status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "status fails while gamma is away");
    for want in [
        "== database alpha ==",
        "== database beta ==",
        "== database gamma ==",
        "unreachable",
    ] {
        assert!(text.contains(want), "status shows {want:?}: {text}");
    }
    assert!(
        text.contains(&format!("{} published", totals[0])),
        "status of alpha: {text}"
    );

    // Gamma back: it drains too.
    proxy.restore();
    assert!(
        eventually(Duration::from_secs(40), || async {
            count(&c, "published").await == totals[2]
        })
        .await,
        "seed={seed}: gamma drains once back: {} of {}",
        count(&c, "published").await,
        totals[2]
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            matches!(get_json(port, "/readyz").await, Some((200, v)) if v["serving"] == 3)
        })
        .await,
        "seed={seed}: gamma served again"
    );
    for db in [&a, &b, &c] {
        assert_eq!(count(db, "dead").await, 0, "seed={seed}: nothing dead");
        assert_eq!(attempts_spent(db).await, 0, "seed={seed}: no attempt spent");
    }

    // 0 lost, each once (re-sends after the cut dropped by the stream), in order per aggregate.
    let seen = seen(&stream).await;
    let distinct = assert_once_and_in_order(&seen);
    assert_eq!(
        distinct as i64,
        totals.iter().sum::<i64>(),
        "seed={seed}: every committed event of every database in the stream"
    );
    assert_eq!(
        relay.sigterm_and_wait().code(),
        Some(0),
        "stops cleanly on SIGTERM"
    );
}

/// Fair time sharing: while one database drains a large backlog, events committed to another are
/// delivered at once, not after the backlog (each database has its own loop on its own thread,
/// and takes at most one batch per turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_database_does_not_hold_up_a_quiet_one() {
    let (busy, quiet) = (TestDb::new().await, TestDb::new().await);
    let stream = TestStream::new();
    let (subjects, template) = (
        format!("{}.>", stream.prefix),
        format!("{}.{{tenant}}.{{topic}}", stream.prefix),
    );
    let backlog_size = 40_000;
    backlog(&busy, "busy", backlog_size, 500).await;
    let urls = [format!("busy={}", busy.url), format!("quiet={}", quiet.url)];
    let _relay = RelayProcess(
        outbox_cmd(&[
            "relay",
            "--database-url",
            &urls[0],
            "--database-url",
            &urls[1],
            "--nats-stream",
            &stream.name,
            "--nats-stream-subjects",
            &subjects,
            "--nats-subject",
            &template,
            "--lease-ms",
            "1500",
            "--poll-interval-ms",
            "100",
            "--metrics-addr",
            "",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start outbox relay"),
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&busy, "published").await > 0
        })
        .await,
        "the busy database starts draining"
    );
    let committed = Instant::now();
    backlog(&quiet, "quiet", 20, 5).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&quiet, "published").await == 20
        })
        .await,
        "the quiet database's events are delivered"
    );
    let waited = committed.elapsed();
    let busy_left = count(&busy, "pending").await;
    eprintln!(
        "quiet database delivered in {waited:?}; the busy one still had {busy_left} of {backlog_size} pending"
    );
    assert!(
        busy_left > 0,
        "the quiet database was served while the busy one still drained (it had {busy_left} left after {waited:?})"
    );
}

/// A database *server* that crashes (`pg_ctl stop -m immediate`, a second PostgreSQL the test
/// runs) at a seeded moment while its outbox drains, and comes back after crash recovery: the
/// other database drains meanwhile, the crashed one drains after, and settlements lost in the
/// crash (they are written with `synchronous_commit = off`) only cause re-publishes the stream
/// drops: each event once, in order, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_server_that_crashes_mid_drain_holds_up_only_its_own_outbox() {
    let seed = soak_seed();
    eprintln!("many_databases crash seed={seed} (SOAK_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = tokio::task::spawn_blocking(testkit::pg_cluster::PgCluster::start)
        .await
        .expect("a private PostgreSQL");
    let admin = sqlx::PgPool::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE crashing")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let crashing_url = cluster.url("crashing");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&crashing_url)
        .await
        .unwrap();
    outbox::schema::migrate(&pool).await.unwrap();
    let steady = TestDb::new().await;
    let stream = TestStream::new();
    let (subjects, template) = (
        format!("{}.>", stream.prefix),
        format!("{}.{{tenant}}.{{topic}}", stream.prefix),
    );
    let per_db = 4000;
    backlog(&steady, "s", per_db, 80).await;
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 'c' || (g % 3), 'V', 'a' || (g % 80), 'Bulk', 'bulk.created',
                convert_to(json_build_object('g', g)::text, 'UTF8')
         FROM generate_series(1, $1) AS g ORDER BY g",
    )
    .bind(per_db)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let urls = [
        format!("steady={}", steady.url),
        format!("crashing={crashing_url}"),
    ];
    let mut relay = RelayProcess(
        outbox_cmd(&[
            "relay",
            "--database-url",
            &urls[0],
            "--database-url",
            &urls[1],
            "--nats-stream",
            &stream.name,
            "--nats-stream-subjects",
            &subjects,
            "--nats-subject",
            &template,
            "--lease-ms",
            "1500",
            "--poll-interval-ms",
            "100",
            "--batch-size",
            "200",
            "--metrics-addr",
            "",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start outbox relay"),
    );
    // Counted on the shared server only while the private one runs.
    let crashing_published = || {
        let url = crashing_url.clone();
        async move {
            let Ok(p) = sqlx::PgPool::connect(&url).await else {
                return -1;
            };
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_published")
                .fetch_one(&p)
                .await
                .unwrap_or(-1);
            p.close().await;
            n
        }
    };
    let crash_after = rng.random_range(200..3000);
    assert!(
        eventually(Duration::from_secs(30), || async {
            crashing_published().await >= crash_after
        })
        .await,
        "seed={seed}: the private server's outbox drains before the crash"
    );
    let c = &cluster;
    tokio::task::block_in_place(|| c.crash());
    eprintln!("seed={seed}: server crashed after >= {crash_after} published");
    let down_until = Instant::now() + Duration::from_millis(rng.random_range(2000..4000));
    assert!(
        eventually(Duration::from_secs(40), || async {
            count(&steady, "published").await == per_db
        })
        .await,
        "seed={seed}: the other database drains while the server is down"
    );
    tokio::time::sleep(down_until.saturating_duration_since(Instant::now())).await;
    tokio::task::block_in_place(|| c.start_again());
    assert!(
        eventually(Duration::from_secs(40), || async {
            crashing_published().await == per_db
        })
        .await,
        "seed={seed}: the crashed server's outbox drains once it is back: {}",
        crashing_published().await
    );
    let seen = seen(&stream).await;
    let distinct = assert_once_and_in_order(&seen);
    assert_eq!(distinct as i64, 2 * per_db, "seed={seed}: none lost");
    assert_eq!(relay.sigterm_and_wait().code(), Some(0));
}
