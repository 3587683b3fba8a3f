//! The relay against a 3-node JetStream cluster with an R3 stream (testkit's `NatsCluster`).
//!
//! The drain test runs the `outbox relay` binary with every node's URL and
//! `--nats-stream-replicas 3` over a backlog while writers keep committing on a few hot
//! aggregates. At seeded moments (the seed is printed; `SOAK_SEED` replays it) it SIGKILLs the
//! stream's leader while a batch is in flight, then, with the new leader serving, stops a second
//! node so that the stream loses its quorum, and brings both back. Afterwards every committed
//! event is in the stream exactly once (the stream dropped the relay's re-publishes by
//! `Nats-Msg-Id`), in commit order per aggregate, nothing is in the stream that nobody committed,
//! nothing was dead-lettered and no attempt was spent: elections and lost quorum are outages.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::RelayProcess;
use outbox::nats::{NatsConfig, NatsPublisher};
use outbox::{NewEvent, Outbox, OutboxError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use testkit::faults::soak_seed;
use testkit::nats_cluster::NatsCluster;
use testkit::{TestDb, TestStream};
use uuid::Uuid;

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
const HOT: usize = 5;
const WRITERS: u64 = 4;
const BACKLOG: i64 = 6000;

/// What one writer committed, in commit order: (eventId, "tenant/aggregate").
type Ledger = Vec<(Uuid, String)>;

/// Transactions of 1-6 events, mostly on the hot aggregates, a tenth rolled back, until `stop`.
async fn writer(
    pool: sqlx::PgPool,
    seed: u64,
    idx: u64,
    stop: tokio_util::sync::CancellationToken,
) -> Ledger {
    let mut rng = StdRng::seed_from_u64(seed ^ (idx + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let outbox = Outbox::new("cluster-test");
    let mut ledger = Vec::new();
    while !stop.is_cancelled() {
        let aggs: Vec<(&str, String)> = (0..rng.random_range(1..=6))
            .map(|_| {
                if rng.random_bool(0.8) {
                    let h = rng.random_range(0..HOT);
                    (TENANTS[h % TENANTS.len()], format!("hot{h}"))
                } else {
                    (
                        TENANTS[rng.random_range(0..TENANTS.len())],
                        format!("cold{}", rng.random_range(0..500)),
                    )
                }
            })
            .collect();
        let events: Vec<NewEvent> = aggs
            .iter()
            .map(|(t, a)| {
                NewEvent::new(
                    *t,
                    "ProductVariant",
                    a.as_str(),
                    "StockLevelChangedEvent",
                    "inventory.stock.changed",
                    json!({ "writer": idx }),
                )
            })
            .collect();
        let rollback = rng.random_bool(0.1);
        let mut tx = pool.begin().await.expect("begin");
        let ids = outbox.enqueue(&mut tx, &events).await.expect("enqueue");
        if rollback {
            tx.rollback().await.expect("rollback");
        } else {
            tx.commit().await.expect("commit");
            ledger.extend(
                ids.into_iter()
                    .zip(aggs.iter().map(|(t, a)| format!("{t}/{a}"))),
            );
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(2..=15))).await;
    }
    ledger
}

async fn scalar(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

/// Published rows: the relay moves a row to `outbox_published` once the broker acknowledged it.
async fn published(db: &TestDb) -> i64 {
    scalar(db, "SELECT count(*) FROM outbox_published").await
}

/// Waits until at least `n` more rows than `from` are published, at most `within`.
async fn wait_published(db: &TestDb, from: i64, n: i64, within: Duration) -> bool {
    testkit::eventually(within, || async { published(db).await >= from + n }).await
}

/// `outbox_events_duplicate_total` from the relay's `/metrics` (plain HTTP/1.0 on loopback).
async fn duplicates_reported(port: u16) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return f64::NAN;
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body).await;
    body.lines()
        .filter(|l| l.starts_with("outbox_events_duplicate_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // An empty f64 sum is -0.0: no counter yet means none.
        .sum::<f64>()
        + 0.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r3_stream_through_leader_kill_and_lost_quorum_loses_nothing_and_spends_no_attempt() {
    let seed = soak_seed();
    eprintln!("nats cluster seed={seed} (replay: SOAK_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let mut cluster = NatsCluster::start().await;
    let db = TestDb::new().await;
    let stream = TestStream::new();
    common::insert_backlog(&db, BACKLOG, 40).await;
    let batch = rng.random_range(50..=200).to_string();
    let metrics_port = common::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut relay = RelayProcess::spawn_via(
        &db,
        &stream,
        &cluster.urls(),
        &[
            "--nats-stream-replicas",
            "3",
            "--nats-ack-timeout-secs",
            "2",
            "--batch-size",
            &batch,
            "--retry-cap-ms",
            "1000",
            "--metrics-addr",
            &metrics_addr,
        ],
    );
    let stop_writers = tokio_util::sync::CancellationToken::new();
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| tokio::spawn(writer(db.pool.clone(), seed, i, stop_writers.clone())))
        .collect();

    // The relay created the stream with three replicas.
    let leader = cluster
        .wait_leader(&stream.name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("seed={seed}: the relay's stream never got a leader"));
    let js = cluster.jetstream().await;
    let replicas = js
        .get_stream(&stream.name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .num_replicas;
    assert_eq!(
        replicas, 3,
        "seed={seed}: the relay must create an R3 stream"
    );

    // 1. Kill the stream leader with a batch in flight: at a seeded point of the backlog.
    let at = rng.random_range(BACKLOG / 10..BACKLOG / 2);
    assert!(
        wait_published(&db, 0, at, Duration::from_secs(30)).await,
        "seed={seed}: the relay did not publish {at} events before the fault"
    );
    let before_kill = published(&db).await;
    cluster.kill(leader);
    eprintln!(
        "seed={seed}: killed leader {} at {before_kill} published (batch {batch})",
        cluster.name(leader)
    );
    let new_leader = cluster
        .wait_leader(&stream.name, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("seed={seed}: no new leader after killing the old one"));
    assert_ne!(new_leader, leader);
    // The relay carries on with the new leader (it may have to reconnect to another node).
    let after_election = published(&db).await;
    assert!(
        wait_published(&db, after_election, 200, Duration::from_secs(30)).await,
        "seed={seed}: the relay made no progress after the election"
    );

    // 2. Stop a second node: one of three is left, the stream has no quorum.
    tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
    let second = if rng.random_bool(0.5) {
        new_leader
    } else {
        (0..3).find(|&i| i != leader && i != new_leader).unwrap()
    };
    let kill_second = rng.random_bool(0.5);
    if kill_second {
        cluster.kill(second);
    } else {
        cluster.stop(second).await;
    }
    let at_loss = published(&db).await;
    eprintln!(
        "seed={seed}: {} node {} (quorum lost) at {at_loss} published",
        if kill_second { "killed" } else { "stopped" },
        cluster.name(second)
    );
    let down = Duration::from_millis(rng.random_range(2000..5000));
    tokio::time::sleep(down).await;
    // Without quorum the stream acknowledges nothing: only what was already acknowledged, or
    // in flight, when the node went can be settled (a batch being sent and one being settled).
    let during_loss = published(&db).await - at_loss;
    let batch_n: i64 = batch.parse().unwrap();
    assert!(
        during_loss <= 2 * batch_n,
        "seed={seed}: {during_loss} events settled as published while the stream had no quorum"
    );
    cluster.start_node(second).await;
    cluster.start_node(leader).await;
    eprintln!(
        "seed={seed}: nodes back after {down:?}; {during_loss} published while quorum was lost"
    );
    cluster
        .wait_leader(&stream.name, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("seed={seed}: no leader after the nodes came back"));

    // Writers go on a moment after the faults, then stop; the relay drains everything.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_writers.cancel();
    let mut ledgers = Vec::new();
    for w in writers {
        ledgers.push(w.await.expect("writer"));
    }
    let drained = testkit::eventually(Duration::from_secs(60), || async {
        scalar(
            &db,
            "SELECT count(*) FROM outbox_event WHERE status <> 'published'",
        )
        .await
            == 0
    })
    .await;
    let dead = scalar(
        &db,
        "SELECT count(*) FROM outbox_event WHERE status = 'dead'",
    )
    .await;
    assert_eq!(dead, 0, "seed={seed}: an outage dead-lettered events");
    assert!(
        drained,
        "seed={seed}: the relay did not drain the outbox after the faults"
    );
    // Re-publishes after lost acknowledgements, which the stream dropped by `Nats-Msg-Id`.
    let duplicates = duplicates_reported(metrics_port).await;
    relay.sigterm_and_wait();
    let attempts = scalar(
        &db,
        "SELECT (SELECT coalesce(sum(attempts), 0) FROM outbox_event)
              + (SELECT coalesce(sum(attempts), 0) FROM outbox_published)",
    )
    .await;
    assert_eq!(
        attempts, 0,
        "seed={seed}: elections / lost quorum spent attempts"
    );

    // What was committed: the backlog (one statement, committed before the relay started) and
    // every writer's committed transactions.
    let mut committed: HashMap<String, String> = sqlx::query_as::<_, (Uuid, String, String)>(
        "SELECT event_id, tenant_id, aggregate_id FROM outbox_published WHERE aggregate_id LIKE 'a%'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, t, a)| (id.to_string(), format!("{t}/{a}")))
    .collect();
    assert_eq!(committed.len() as i64, BACKLOG, "seed={seed}: backlog rows");
    for l in &ledgers {
        for (id, agg) in l {
            committed.insert(id.to_string(), agg.clone());
        }
    }
    let msgs = cluster
        .read_stream(&stream.name, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("seed={seed}: reading the stream took over 30 s"));
    let mut seen = HashSet::new();
    let mut next: HashMap<String, i64> = HashMap::new();
    let mut phantom = 0;
    for m in &msgs {
        let h = m.headers.clone();
        let get = |k: &str| h.get(k).map(|v| v.to_string()).unwrap_or_default();
        let id = get("Nats-Msg-Id");
        assert_eq!(
            id,
            get("Outbox-Event-Id"),
            "seed={seed}: Nats-Msg-Id is the eventId"
        );
        assert!(
            seen.insert(id.clone()),
            "seed={seed}: event {id} twice in the stream"
        );
        let agg = format!("{}/{}", get("Outbox-Tenant-Id"), get("Outbox-Aggregate-Id"));
        match committed.get(&id) {
            Some(a) if *a == agg => {}
            _ => phantom += 1,
        }
        let seq: i64 = get("Outbox-Seq").parse().unwrap_or(-1);
        let n = next.entry(agg.clone()).or_insert(1);
        assert_eq!(
            seq, *n,
            "seed={seed}: aggregate {agg} out of order in the stream"
        );
        *n += 1;
    }
    let lost = committed.keys().filter(|id| !seen.contains(*id)).count();
    let writes: usize = ledgers.iter().map(Vec::len).sum();
    eprintln!(
        "seed={seed}: {} backlog + {writes} written events, {} in the stream, lost {lost}, phantom {phantom}, \
         {duplicates} re-publishes dropped by the stream as duplicates, {:.1} s",
        BACKLOG,
        msgs.len(),
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(phantom, 0, "seed={seed}: messages nobody committed");
    assert_eq!(
        lost, 0,
        "seed={seed}: committed events missing from the stream"
    );
    assert_eq!(msgs.len(), committed.len());
}

#[tokio::test]
async fn refuses_a_stream_with_another_replica_count_and_r3_on_a_single_server() {
    let mut cluster = NatsCluster::start().await;
    let stream = TestStream::new();
    let cfg = NatsConfig {
        url: cluster.urls(),
        replicas: Some(3),
        ..stream.nats_config()
    };
    NatsPublisher::connect(cfg.clone(), Duration::from_secs(60))
        .await
        .expect("creates the R3 stream");
    assert_eq!(
        cluster
            .jetstream()
            .await
            .get_stream(&stream.name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .num_replicas,
        3
    );
    // The same stream checked by a relay configured for one replica: refused at start-up.
    let err = NatsPublisher::connect(
        NatsConfig {
            replicas: Some(1),
            ..cfg.clone()
        },
        Duration::from_secs(60),
    )
    .await
    .err()
    .expect("a replica mismatch is refused");
    assert!(
        matches!(&err, OutboxError::Config(m) if m.contains("3 replica(s)") && m.contains("--replicas 1")),
        "unexpected error: {err}"
    );
    // Unset: any existing stream is taken as it is.
    NatsPublisher::connect(
        NatsConfig {
            replicas: None,
            ..cfg
        },
        Duration::from_secs(60),
    )
    .await
    .expect("no replica count configured: the R3 stream is accepted");

    // An R3 stream cannot exist on the single shared server: a configuration error, not a
    // broker outage the relay would wait out forever.
    let single = TestStream::new();
    let err = NatsPublisher::connect(
        NatsConfig {
            replicas: Some(3),
            ..single.nats_config()
        },
        Duration::from_secs(60),
    )
    .await
    .err()
    .expect("R3 on one server is refused");
    assert!(
        matches!(&err, OutboxError::Config(m) if m.contains("3 replica(s)")),
        "unexpected error: {err}"
    );
}
