//! Redis Streams (issue 22) against real `redis-server` processes the tests own (the shared one
//! on 6379 runs with `appendonly no`): durability check, no loss through a Redis SIGKILL and a
//! relay SIGKILL, outages spend no attempt and keep order, a poison message is dead-lettered
//! alone, and the consumer source takes over a dead consumer's entries.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_once_and_in_order, attempts_spent, count, insert_backlog, test_config, Seen};
use outbox::consumers::redis::{RedisSource, RedisSourceConfig};
use outbox::consumers::EventSource;
use outbox::publishers::redis::{RedisConfig, RedisPublisher, ENVELOPE_FIELD};
use outbox::OutboxError;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamRangeReply;
use redis::Value;
use testkit::redis_server::PrivateRedis;
use testkit::relay::start_relay_with;
use testkit::{eventually, TestDb};

fn config(server: &PrivateRedis, prefix: &str) -> RedisConfig {
    RedisConfig {
        url: server.url(),
        stream_template: format!("{prefix}:{{tenant}}:{{topic}}"),
        registry_key: format!("{prefix}:streams"),
        dedup_prefix: format!("{prefix}:dedup:"),
        command_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

async fn conn(url: &str) -> MultiplexedConnection {
    // The client's default response timeout (500 ms) is short for a loaded machine.
    let slow =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&slow)
        .await
        .expect("redis reachable")
}

async fn publisher(cfg: RedisConfig) -> Arc<RedisPublisher> {
    Arc::new(
        RedisPublisher::connect(cfg, Duration::from_secs(120))
            .await
            .expect("redis publisher"),
    )
}

/// Every entry of every registered stream, stream by stream in entry order.
async fn read_all(url: &str, registry: &str) -> Vec<Seen> {
    let mut c = conn(url).await;
    let mut streams: Vec<String> = redis::cmd("SMEMBERS")
        .arg(registry)
        .query_async(&mut c)
        .await
        .unwrap();
    streams.sort();
    let mut out = Vec::new();
    for s in streams {
        let r: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&s)
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap();
        for e in r.ids {
            let mut headers = HashMap::new();
            let mut payload = Vec::new();
            for (k, v) in e.map {
                let Value::BulkString(b) = v else { continue };
                if k == ENVELOPE_FIELD {
                    payload = b;
                } else {
                    headers.insert(k, String::from_utf8_lossy(&b).into_owned());
                }
            }
            let get = |k: &str| headers.get(k).cloned().unwrap_or_default();
            out.push(Seen {
                event_id: get("Outbox-Event-Id"),
                aggregate: format!("{}/{}", get("Outbox-Tenant-Id"), get("Outbox-Aggregate-Id")),
                seq: get("Outbox-Seq").parse().unwrap_or(-1),
                subject: s.clone(),
                payload,
                headers,
            });
        }
    }
    out
}

#[tokio::test]
async fn a_redis_that_can_lose_acknowledged_entries_is_refused_unless_allowed() {
    let server = PrivateRedis::start_with(&["--appendonly", "no"]).await;
    let cfg = config(&server, &testkit::unique("dur"));
    let e = RedisPublisher::connect(cfg.clone(), Duration::from_secs(60))
        .await
        .err()
        .expect("refused");
    let text = e.to_string();
    assert!(matches!(e, OutboxError::Config(_)), "{text}");
    assert!(
        text.contains("appendonly") && text.contains("--redis-allow-loss-window"),
        "{text}"
    );
    // The eviction policy is checked too.
    let mut c = conn(&server.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("yes")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("always")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut c)
        .await
        .unwrap();
    let text = RedisPublisher::connect(cfg.clone(), Duration::from_secs(60))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        text.contains("maxmemory-policy") && text.contains("evict"),
        "{text}"
    );
    let allowed = RedisConfig {
        allow_loss_window: true,
        ..cfg
    };
    assert!(RedisPublisher::connect(allowed, Duration::from_secs(60))
        .await
        .is_ok());
}

/// A relay process killed with SIGKILL mid-backlog and Redis killed with SIGKILL (appendfsync
/// always) and restarted: every event reaches its stream exactly once (the de-duplication
/// script drops what the second relay publishes again), in order per aggregate.
#[tokio::test]
async fn no_loss_through_a_redis_sigkill_and_a_relay_sigkill() {
    let db = TestDb::new().await;
    let mut server = PrivateRedis::start().await;
    let prefix = testkit::unique("loss");
    let total = 3000;
    insert_backlog(&db, total, 60).await;
    let spawn = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["relay", "--broker", "redis", "--metrics-addr", ""])
            .args(["--redis-stream", &format!("{prefix}:{{tenant}}:{{topic}}")])
            .args(["--redis-registry-key", &format!("{prefix}:streams")])
            .args(["--redis-dedup-prefix", &format!("{prefix}:dedup:")])
            .args([
                "--lease-ms",
                "1500",
                "--poll-interval-ms",
                "100",
                "--batch-size",
                "200",
            ])
            .env("DATABASE_URL", &db.url)
            .env("REDIS_URL", url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outbox relay")
    };
    let mut relay = spawn(&server.url());
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await >= 300
        })
        .await
    );
    server.restart().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await >= 1200
        })
        .await,
        "the relay resumes after Redis came back"
    );
    let _ = relay.kill();
    let _ = relay.wait();
    let mut relay = spawn(&server.url());
    let done = eventually(Duration::from_secs(40), || async {
        count(&db, "published").await == total
    })
    .await;
    let _ = relay.kill();
    let _ = relay.wait();
    assert!(done, "published {}", count(&db, "published").await);
    let seen = read_all(&server.url(), &format!("{prefix}:streams")).await;
    assert_eq!(assert_once_and_in_order(&seen), total as usize);
    assert_eq!(seen.len(), total as usize, "no duplicate entry");
    // The fields carry what consumers read.
    let m = &seen[0];
    for h in [
        "Outbox-Producer-Id",
        "Outbox-Seq-Epoch",
        "Outbox-Event-Type",
    ] {
        assert!(m.headers.contains_key(h), "{h} missing: {:?}", m.headers);
    }
    assert!(m.subject.starts_with(&prefix));
}

async fn set(c: &mut MultiplexedConnection, args: &[&str]) {
    let _: Value = redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(c)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

/// OOM (maxmemory under noeviction), READONLY (the server made a replica), BUSY (a script
/// running past its time limit) and a lost connection (SIGKILL and restart) each hold the relay
/// back without spending an attempt or dead-lettering anything, and each aggregate's events
/// reach the stream in order once Redis accepts again.
#[tokio::test]
async fn outages_spend_no_attempt_and_keep_order() {
    let db = TestDb::new().await;
    let mut server = PrivateRedis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--maxmemory-policy",
        "noeviction",
        "--busy-reply-threshold",
        "100",
    ])
    .await;
    let prefix = testkit::unique("out");
    let cfg = config(&server, &prefix);
    let relay = start_relay_with(db.pool.clone(), publisher(cfg).await, test_config());
    let mut c = conn(&server.url()).await;
    let mut expected = 0;
    let phases: [(&str, &[&str], &[&str]); 3] = [
        (
            "oom",
            &["CONFIG", "SET", "maxmemory", "1"],
            &["CONFIG", "SET", "maxmemory", "0"],
        ),
        (
            "readonly",
            &["REPLICAOF", "127.0.0.1", "1"],
            &["REPLICAOF", "NO", "ONE"],
        ),
        ("busy", &[], &[]),
    ];
    for (name, refuse, accept) in phases {
        let busy = if name == "busy" {
            // A script spinning past busy-reply-threshold: every other client gets BUSY until
            // SCRIPT KILL.
            let mut b = conn(&server.url()).await;
            let t = tokio::spawn(async move {
                let _: redis::RedisResult<Value> = redis::cmd("EVAL")
                    .arg("local i = 0 while true do i = i + 1 end")
                    .arg(0)
                    .query_async(&mut b)
                    .await;
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some(t)
        } else {
            set(&mut c, refuse).await;
            None
        };
        insert_backlog(&db, 200, 20).await;
        expected += 200;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            count(&db, "published").await,
            expected - 200,
            "{name}: nothing published"
        );
        assert_eq!(
            attempts_spent(&db).await,
            0,
            "{name}: an outage spends no attempt"
        );
        assert_eq!(count(&db, "dead").await, 0, "{name}");
        match busy {
            Some(t) => {
                let mut k = redis::Client::open(server.url().as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let _: redis::RedisResult<Value> =
                    redis::cmd("SCRIPT").arg("KILL").query_async(&mut k).await;
                let _ = t.await;
            }
            None => set(&mut c, accept).await,
        }
        assert!(
            eventually(Duration::from_secs(20), || async {
                count(&db, "published").await == expected
            })
            .await,
            "{name}: published after Redis accepts again"
        );
    }
    // A lost connection: events written while Redis is down wait and follow in order.
    server.kill();
    insert_backlog(&db, 200, 20).await;
    expected += 200;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(attempts_spent(&db).await, 0, "disconnected: no attempt");
    server.spawn().await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == expected
        })
        .await,
        "published after the restart"
    );
    relay.shutdown().await;
    assert_eq!(count(&db, "dead").await, 0);
    let seen = read_all(&server.url(), &format!("{prefix}:streams")).await;
    assert_eq!(assert_once_and_in_order(&seen), expected as usize);
}

/// The stream key of one topic holds a string (WRONGTYPE): that topic's first event is
/// retried, then dead-lettered, its aggregate's later events wait behind it, and every other
/// aggregate's events flow.
#[tokio::test]
async fn a_poison_message_is_dead_lettered_alone() {
    let db = TestDb::new().await;
    let server = PrivateRedis::start().await;
    let prefix = testkit::unique("poison");
    let mut c = conn(&server.url()).await;
    set(
        &mut c,
        &["SET", &format!("{prefix}:t0:bad.topic"), "not a stream"],
    )
    .await;
    let relay = start_relay_with(
        db.pool.clone(),
        publisher(config(&server, &prefix)).await,
        test_config(),
    );
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 't0', 'V', CASE WHEN g <= 3 THEN 'p' ELSE 'h' || (g % 10) END, 'E',
                CASE WHEN g = 1 THEN 'bad.topic' ELSE 'ok.topic' END, convert_to('{}', 'UTF8')
         FROM generate_series(1, 103) AS g ORDER BY g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "dead").await == 1 && count(&db, "published").await == 100
        })
        .await,
        "dead {} published {}",
        count(&db, "dead").await,
        count(&db, "published").await
    );
    relay.shutdown().await;
    let (agg, err): (String, String) = sqlx::query_as(
        "SELECT aggregate_id, coalesce(last_error, '') FROM outbox_event WHERE status = 'dead'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(agg, "p");
    assert!(err.contains("WRONGTYPE"), "{err}");
}

/// A consumer that read entries and died without acknowledging them: another instance of the
/// group takes them over after the idle time (XAUTOCLAIM); a group created after the events
/// were published still gets every one of them (groups start at the stream's beginning).
#[tokio::test]
async fn a_dead_consumers_entries_are_taken_over() {
    let db = TestDb::new().await;
    let server = PrivateRedis::start().await;
    let prefix = testkit::unique("cons");
    let relay = start_relay_with(
        db.pool.clone(),
        publisher(config(&server, &prefix)).await,
        test_config(),
    );
    insert_backlog(&db, 300, 30).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == 300
        })
        .await
    );
    relay.shutdown().await;
    let source_cfg = |consumer: &str| RedisSourceConfig {
        url: server.url(),
        registry_key: format!("{prefix}:streams"),
        group: "g".into(),
        consumer: consumer.into(),
        batch: 64,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_secs(1),
        discover_every: Duration::from_millis(200),
        cap_entries: None,
        cap_age: None,
    };
    let mut a = RedisSource::connect(source_cfg("a")).await.unwrap();
    let mut taken = 0;
    while taken < 50 {
        let r = tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .expect("a reads")
            .unwrap()
            .unwrap();
        assert!(r.unreadable.is_none());
        taken += 1;
    }
    drop(a); // dies holding its entries unacknowledged
    let mut b = RedisSource::connect(source_cfg("b")).await.unwrap();
    let mut ids = std::collections::HashSet::new();
    let start = Instant::now();
    while ids.len() < 300 && start.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(Ok(Some(r)))) = tokio::time::timeout(Duration::from_millis(500), b.next())
            .await
            .map(Some)
        {
            ids.insert(r.event.event_id);
            r.acker.ack().await.unwrap();
        }
    }
    assert_eq!(
        ids.len(),
        300,
        "every event, a's unacknowledged ones included"
    );
    let mut c = conn(&server.url()).await;
    for s in b.streams() {
        let pending: Vec<Value> = redis::cmd("XPENDING")
            .arg(&s)
            .arg("g")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(
            pending.first(),
            Some(&Value::Int(0)),
            "{s}: nothing pending"
        );
    }
    assert_eq!(b.lag().await, Some(0));
}

/// `--message-headers compact` on Redis (issue 20 goal 3, issue 22): relays started in turn with
/// full, compact and full fields write one stream per tenant and topic in which every aggregate
/// has entries of both encodings; the compact entries hold only `envelope`, `Outbox-Event-Id` and
/// `Outbox-Meta`; and the consumer runtime applies every event once, in order, under the
/// outbox's producer identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_and_full_fields_in_one_stream_are_applied_in_order_with_the_producer() {
    use outbox::meta::META_HEADER;
    let db = TestDb::new().await;
    let server = PrivateRedis::start().await;
    let prefix = testkit::unique("mixed");
    let (stream, registry, dedup) = (
        format!("{prefix}:{{tenant}}:{{topic}}"),
        format!("{prefix}:streams"),
        format!("{prefix}:dedup:"),
    );
    let per_round = 200;
    for (round, encoding) in ["full", "compact", "full"].into_iter().enumerate() {
        insert_backlog(&db, per_round, 20).await;
        let mut relay = common::RelayProcess::spawn_args(
            &db,
            &[
                "relay",
                "--broker",
                "redis",
                "--message-headers",
                encoding,
                "--redis-stream",
                &stream,
                "--redis-registry-key",
                &registry,
                "--redis-dedup-prefix",
                &dedup,
                "--poll-interval-ms",
                "100",
            ],
            &[("REDIS_URL", &server.url())],
        );
        let want = per_round * (round as i64 + 1);
        assert!(
            eventually(Duration::from_secs(30), || async {
                count(&db, "published").await == want
            })
            .await,
            "{encoding} relay: published {} of {want}",
            count(&db, "published").await
        );
        relay.sigterm_and_wait();
    }
    let seen = read_all(&server.url(), &registry).await;
    assert_eq!(seen.len(), 3 * per_round as usize);
    let compact: Vec<&Seen> = seen
        .iter()
        .filter(|m| m.headers.contains_key(META_HEADER))
        .collect();
    assert_eq!(
        compact.len(),
        per_round as usize,
        "the middle relay's entries"
    );
    for m in &compact {
        let mut names: Vec<&str> = m.headers.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["Outbox-Event-Id", META_HEADER], "{m:?}");
    }
    let source = RedisSource::connect(RedisSourceConfig {
        url: server.url(),
        registry_key: registry.clone(),
        group: "g".into(),
        consumer: "c".into(),
        block: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .expect("source");
    let name = testkit::unique("mixed_redis");
    let c = common::applied::Running::start(&db, &name, source).await;
    common::applied::wait(&db, seen.len(), Duration::from_secs(30)).await;
    c.shutdown().await;
    common::applied::assert_all_once_in_order_with_the_producer(&db, &name).await;
}

/// Adds an entry as the relay's full encoding writes it (aggregate `agg` of tenant `t`, `seq`) to
/// `stream` and registers the stream.
async fn add_entry(
    c: &mut MultiplexedConnection,
    registry: &str,
    stream: &str,
    agg: &str,
    seq: i64,
) {
    let id = uuid::Uuid::now_v7().to_string();
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg(ENVELOPE_FIELD)
        .arg(format!(r#"{{"eventId":"{id}"}}"#))
        .arg("Outbox-Event-Id")
        .arg(&id)
        .arg("Outbox-Tenant-Id")
        .arg("t")
        .arg("Outbox-Aggregate-Type")
        .arg("A")
        .arg("Outbox-Aggregate-Id")
        .arg(agg)
        .arg("Outbox-Seq")
        .arg(seq)
        .query_async(c)
        .await
        .expect("XADD");
    let _: i64 = redis::cmd("SADD")
        .arg(registry)
        .arg(stream)
        .query_async(c)
        .await
        .unwrap();
}

fn source_config(server: &PrivateRedis, registry: &str, consumer: &str) -> RedisSourceConfig {
    RedisSourceConfig {
        url: server.url(),
        registry_key: registry.into(),
        group: "g".into(),
        consumer: consumer.into(),
        block: Duration::from_millis(100),
        discover_every: Duration::from_millis(200),
        ..Default::default()
    }
}

/// The next entry within `within`, as (aggregate id, seq), with its acknowledger.
async fn next_entry(
    s: &mut RedisSource,
    within: Duration,
) -> Option<((String, i64), Box<dyn outbox::consumers::Acknowledger>)> {
    let r = tokio::time::timeout(within, s.next())
        .await
        .ok()?
        .unwrap()?;
    let (a, p) = r.event.sequenced().expect("sequenced");
    Some(((a.aggregate_id.clone(), p.seq), r.acker))
}

/// A consumer restarted under its name reads its own pending entries first; one of them still
/// being handled (held, not acknowledged) must not keep the stream's new entries from it. (It
/// did: the pending entries were read from `0` again and again, the held one kept coming back,
/// and the stream never switched to new entries until it was acknowledged.)
#[tokio::test]
async fn a_held_pending_entry_does_not_keep_new_entries_from_a_restarted_consumer() {
    let server = PrivateRedis::start().await;
    let prefix = testkit::unique("hist");
    let (registry, stream) = (format!("{prefix}:streams"), format!("{prefix}:t:x"));
    let mut c = conn(&server.url()).await;
    for seq in 1..=3 {
        add_entry(&mut c, &registry, &stream, &format!("p{seq}"), 1).await;
    }
    let mut a = RedisSource::connect(source_config(&server, &registry, "c"))
        .await
        .unwrap();
    for _ in 0..3 {
        next_entry(&mut a, Duration::from_secs(5))
            .await
            .expect("read");
    }
    drop(a); // dies with its three entries pending
    let mut a = RedisSource::connect(source_config(&server, &registry, "c"))
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let (key, acker) = next_entry(&mut a, Duration::from_secs(5))
            .await
            .expect("its own pending entries again");
        if key.0 == "p1" {
            held.push(acker); // still being handled
        } else {
            acker.ack().await.unwrap();
        }
    }
    assert_eq!(held.len(), 1);
    add_entry(&mut c, &registry, &stream, "n", 1).await;
    let got = next_entry(&mut a, Duration::from_secs(5)).await;
    assert_eq!(
        got.map(|(k, _)| k),
        Some(("n".to_string(), 1)),
        "the new entry is delivered while p1 is still held"
    );
}

/// Entries of several streams returned by one read are handed over in entry-id (time) order, not
/// stream after stream: an aggregate whose events went to two topics (two streams) arrives in
/// seq order, so the runtime does not make each event wait for its predecessor (a gap retry).
#[tokio::test]
async fn entries_of_several_streams_are_handed_over_in_time_order() {
    let server = PrivateRedis::start().await;
    let prefix = testkit::unique("order");
    let registry = format!("{prefix}:streams");
    let mut c = conn(&server.url()).await;
    for seq in 1..=8 {
        let topic = if seq % 2 == 0 { "even" } else { "odd" };
        add_entry(&mut c, &registry, &format!("{prefix}:t:{topic}"), "x", seq).await;
        // Entry ids are milliseconds: within one, the two streams' ids cannot be compared.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut s = RedisSource::connect(source_config(&server, &registry, "c"))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    while let Some(((_, seq), acker)) = next_entry(&mut s, Duration::from_secs(5)).await {
        seqs.push(seq);
        acker.ack().await.unwrap();
        if seqs.len() == 8 {
            break;
        }
    }
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
}
