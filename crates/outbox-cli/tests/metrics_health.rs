//! The relay's `/metrics`, `/healthz` and `/readyz` over HTTP, from a real `outbox relay` process.

mod common;

use std::time::Duration;

use common::*;
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

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A relay process reaching the shared NATS, serving its metrics on `port`, once it answers there.
async fn spawn_relay(db: &TestDb, stream: &TestStream, port: u16) -> RelayProcess {
    let addr = format!("127.0.0.1:{port}");
    let relay = RelayProcess::spawn_via(
        db,
        stream,
        &testkit::nats_url(),
        &["--metrics-addr", &addr, "--nats-ack-timeout-secs", "1"],
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            get(port, "/metrics").await.is_some()
        })
        .await,
        "the relay serves /metrics within 15 s"
    );
    relay
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_the_workload() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let port = free_port();
    let _relay = spawn_relay(&db, &stream, port).await;
    insert_backlog(&db, 7, 2).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            count(&db, "published").await == 7
        })
        .await
    );
    let before = get(port, "/metrics").await.unwrap().1;
    assert_eq!(
        metric(&before, "outbox_events_published_total"),
        7.0,
        "{before}"
    );

    insert_backlog(&db, 25, 5).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            count(&db, "published").await == 32
        })
        .await
    );
    let after = eventually(Duration::from_secs(5), || async {
        metric(
            &get(port, "/metrics").await.unwrap().1,
            "outbox_events_published_total",
        ) == 32.0
    })
    .await;
    let body = get(port, "/metrics").await.unwrap().1;
    assert!(after, "published counter moved by exactly 25: {body}");
    assert_eq!(metric(&body, "outbox_events_dead_lettered_total"), 0.0);
    assert_eq!(
        metric(&body, "outbox_commit_to_ack_seconds_count"),
        32.0,
        "one latency sample per event"
    );
    assert!(
        body.contains("outbox_batch_size_bucket"),
        "batch size is a histogram"
    );
    let (claims, batches) = (
        metric(&body, "outbox_claim_duration_seconds_count"),
        metric(&body, "outbox_batch_size_count"),
    );
    assert!(
        batches >= 1.0 && claims >= batches,
        "every claim is timed, those that found a batch among them: {claims} claims, {batches} batches"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(
                &get(port, "/metrics").await.unwrap().1,
                "outbox_pending_events",
            ) == 0.0
        })
        .await
    );
}

/// `outbox_broker_up` follows the connection even when nothing is published (it used to reflect
/// the last publish, so it stayed 1 with NATS down and nothing pending), and a relay with work
/// pending that settles nothing for longer than its stall timeout says so on `/healthz` (503) and
/// in `outbox_relay_stalled` (it used to answer a static "ok").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_during_a_broker_outage() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let proxy = Proxy::start("127.0.0.1:4222").await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _relay = RelayProcess::spawn_via(
        &db,
        &stream,
        &format!("nats://{}", proxy.addr),
        &[
            "--metrics-addr",
            &addr,
            "--nats-ack-timeout-secs",
            "1",
            "--stall-timeout-secs",
            "3",
        ],
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            matches!(get(port, "/readyz").await, Some((200, b)) if b.contains("\"state\":\"up\""))
        })
        .await
    );

    // Down with nothing pending: the gauge must still say so.
    proxy.cut();
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(&get(port, "/metrics").await.unwrap().1, "outbox_broker_up") == 0.0
        })
        .await,
        "outbox_broker_up follows the connection, not the last publish"
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            matches!(get(port, "/readyz").await, Some((200, b)) if b.contains("\"state\":\"down\"") && b.contains("\"database\":\"up\""))
        })
        .await,
        "ready (the database answers) and honest about the broker"
    );
    // Nothing to do is not a stall, however long the broker is away.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        get(port, "/healthz").await.map(|r| r.0),
        Some(200),
        "no work pending: alive without its broker"
    );

    // Work pending and nothing settled for longer than the stall timeout: unhealthy.
    insert_backlog(&db, 10, 2).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            matches!(get(port, "/healthz").await, Some((503, b)) if b.contains("stalled"))
        })
        .await,
        "a relay that settles nothing with work pending reports itself stalled"
    );
    let m = get(port, "/metrics").await.unwrap().1;
    assert_eq!(metric(&m, "outbox_relay_stalled"), 1.0, "{m}");
    assert!(
        metric(&m, "outbox_relay_seconds_since_progress") >= 3.0,
        "{m}"
    );
    assert_eq!(count(&db, "published").await, 0);
    assert_eq!(count(&db, "dead").await, 0);

    proxy.restore();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == 10
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(get(port, "/readyz").await, Some((200, b)) if b.contains("\"state\":\"up\""))
                && get(port, "/healthz").await.map(|r| r.0) == Some(200)
                && metric(
                    &get(port, "/metrics").await.unwrap().1,
                    "outbox_relay_stalled",
                ) == 0.0
        })
        .await,
        "healthy again once the backlog is delivered"
    );
}

/// Before: after any batch that was not empty the relay claimed again at once, so under a steady
/// stream of commits it ran back to back batches of one or two events (each with its claim,
/// publish and settle round trips) whatever the producers' wake-up window; the inventory service
/// lost a quarter of its throughput to it. Now a claim that left nothing deliverable behind makes
/// the relay wait for the next wake-up: batches follow the wake-ups, not the commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_steady_stream_of_commits_batches_follow_the_wake_ups() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let port = free_port();
    let _relay = spawn_relay(&db, &stream, port).await;
    // Producers as the inventory service writes: no NOTIFY in the transaction, one wake-up per
    // 100 ms window after the commits. Four writers, one event per transaction, ~3 s.
    let window = Duration::from_millis(100);
    let notifier = outbox::wake::CommitNotifier::spawn(db.pool.clone(), window);
    let outbox = outbox::Outbox::new("test").with_notify(false);
    let started = std::time::Instant::now();
    let until = started + Duration::from_secs(3);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (pool, outbox, notifier) = (db.pool.clone(), outbox.clone(), notifier.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while std::time::Instant::now() < until {
                    let mut tx = pool.begin().await.unwrap();
                    let e = stock_event(
                        "t1",
                        &format!("v{}", n % 8),
                        serde_json::json!({ "w": w, "n": n }),
                    );
                    outbox.enqueue(&mut tx, &[e]).await.unwrap();
                    tx.commit().await.unwrap();
                    notifier.committed();
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                n
            })
        })
        .collect();
    let mut events = 0;
    for w in writers {
        events += w.await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == events as i64
        })
        .await,
        "every event published"
    );
    let secs = started.elapsed().as_secs_f64();
    let (_, body) = get(port, "/metrics").await.expect("metrics");
    let batches = metric(&body, "outbox_batch_size_count");
    // At most one batch per wake-up (one per window) or poll (every 100 ms), with a margin.
    let bound = (secs / window.as_secs_f64() + secs / 0.1) * 1.2 + 10.0;
    eprintln!(
        "{events} events in {batches} batches over {secs:.1} s ({:.1} per batch; bound {bound:.0})",
        events as f64 / batches
    );
    assert!(
        batches <= bound,
        "{events} events took {batches} batches in {secs:.1} s, more than the wake-ups and polls \
         ({bound:.0}): the relay claims again at once instead of waiting for a wake-up"
    );
    let seen = seen(&stream).await;
    assert_eq!(assert_once_and_in_order(&seen), events as usize);
}
