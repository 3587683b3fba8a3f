//! The relay's promises at the edges (issue 9), each against the real PostgreSQL and NATS
//! JetStream: batches larger than the client's in-flight limit, a broker that refuses one
//! message of a pipelined batch, a broker that refuses everything for a while, and a relay whose
//! lease lapsed. Every test here failed before the fix it names.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use outbox::store::{Fence, RelayStore, Settlement};
use outbox::{Outbox, OutboxError, PgStore};
use serde_json::json;
use testkit::{eventually, TestDb, TestStream};

/// Creates `stream` up front with the given limits (the relay then only checks it).
async fn create_stream(stream: &TestStream, tweak: impl FnOnce(&mut jetstream::stream::Config)) {
    let js = jetstream::new(async_nats::connect(testkit::nats_url()).await.unwrap());
    let mut config = jetstream::stream::Config {
        name: stream.name.clone(),
        subjects: vec![format!("{}.>", stream.prefix)],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    tweak(&mut config);
    js.create_stream(config).await.expect("create stream");
}

/// Per aggregate, the sequence numbers in stream order.
fn per_aggregate(msgs: &[Seen]) -> HashMap<String, Vec<i64>> {
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    for m in msgs {
        out.entry(m.aggregate.clone()).or_default().push(m.seq);
    }
    out
}

/// Before: the claim gave every tenant with pending events at least one row, so 6,000 tenants
/// with one event each made a batch of 6,000 for `--batch-size 1000`; the NATS adapter sent all
/// of it before reading an acknowledgement, and async-nats' 4,097th send waited forever for one
/// of its 4,096 in-flight permits. Now the batch size bounds the whole batch, and
/// acknowledgements are read while sending through a bounded window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_tenants_than_the_batch_size_and_batches_over_the_in_flight_limit_are_delivered() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 'tenant' || g, 'V', 'a', 'Bulk', 'bulk.created', '\\x7b7d'::bytea
         FROM generate_series(1, 6000) AS g ORDER BY g",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    // The claim alone: never more than the batch size, whatever the number of tenants.
    let store = PgStore::new(db.pool.clone());
    let lease = store
        .lease_round("claimer", "i1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(lease.owned.len(), 64);
    let batch = store
        .claim("claimer", 1000, true, &[], Duration::ZERO)
        .await
        .unwrap()
        .messages;
    assert_eq!(batch.len(), 1000, "the batch size bounds the whole batch");
    store.release_all("claimer", "i1").await.unwrap();

    // A relay with a batch larger than the client's 4,096 in-flight permits.
    let stream = TestStream::new();
    let mut nats = stream.nats_config();
    nats.max_in_flight = 4096;
    let config = outbox::RelayConfig {
        batch_size: 6000,
        ..test_config()
    };
    let relay = start_relay(&db, nats, config).await;
    let done = eventually(Duration::from_secs(60), || async {
        count(&db, "published").await == 6000
    })
    .await;
    relay.shutdown().await;
    assert!(
        done,
        "all 6,000 delivered (published: {})",
        count(&db, "published").await
    );
    assert_eq!(assert_once_and_in_order(&seen(&stream).await), 6000);
}

/// Before: a stream whose `max_msg_size` is below the server's refused event 3 of an aggregate
/// (dead-lettered) while event 4 of the same aggregate, pipelined in the same batch, was stored
/// ahead of it; a replay then gave 1 2 4 3. Now at most one event per aggregate is
/// unacknowledged, so event 4 is never sent before the broker has event 3: it waits behind the
/// dead letter, and the stream holds 1 2 only. Other aggregates flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_stream_refuses_is_never_overtaken_by_its_successor() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    create_stream(&stream, |c| c.max_message_size = 2_000).await;
    let outbox = Outbox::new("Test");
    let big = "x".repeat(4_000);
    let mut events = Vec::new();
    for i in 1..=6 {
        // Event 3 of `poisoned` is larger than the stream accepts.
        let data = if i == 3 {
            json!({ "blob": big })
        } else {
            json!({ "n": i })
        };
        events.push(stock_event("acme", "poisoned", data));
        events.push(stock_event(
            "acme",
            &format!("healthy{}", i % 3),
            json!({ "n": i }),
        ));
    }
    let mut tx = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();

    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    let settled = eventually(Duration::from_secs(30), || async {
        count(&db, "dead").await == 1 && count(&db, "published").await == 8
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.shutdown().await;
    assert!(
        settled,
        "the poison is dead, everything else but its successors published"
    );
    let (seq, error): (i64, String) =
        sqlx::query_as("SELECT seq, last_error FROM outbox_event WHERE status = 'dead'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(seq, 3);
    assert!(error.contains("maximum"), "{error}");
    let order = per_aggregate(&seen(&stream).await);
    assert_eq!(
        order["acme/poisoned"],
        vec![1, 2],
        "nothing of the aggregate after its refused event reached the stream"
    );
    for h in 0..3 {
        assert_eq!(order[&format!("acme/healthy{h}")], vec![1, 2]);
    }
}

/// Before: a full stream (`discard new`) answered every publish with "maximum messages
/// exceeded", each event spent its attempts, and every aggregate's first event ended dead and
/// blocking. A full stream is the broker's state, not the events' fault: no attempt is spent,
/// nothing is dead-lettered, and once the stream has room everything is delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_is_an_outage_not_a_dead_letter() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    create_stream(&stream, |c| {
        c.max_messages = 5;
        c.discard = jetstream::stream::DiscardPolicy::New;
    })
    .await;
    insert_backlog(&db, 40, 4).await;
    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == 5
        })
        .await
    );
    // Several retry budgets' worth of time (test_config: 4 attempts, 50-500 ms apart).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        count(&db, "dead").await,
        0,
        "a full stream dead-letters nothing"
    );
    let spent = attempts_spent(&db).await;
    assert_eq!(spent, 0, "a full stream spends no attempt");
    assert_eq!(count(&db, "published").await, 5);

    // Room again: everything flows, in order.
    let js = jetstream::new(async_nats::connect(testkit::nats_url()).await.unwrap());
    let mut info = js
        .get_stream(&stream.name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    info.max_messages = -1;
    js.update_stream(info).await.unwrap();
    let done = eventually(Duration::from_secs(30), || async {
        count(&db, "published").await == 40
    })
    .await;
    relay.shutdown().await;
    assert!(done, "delivered once the stream had room");
    assert_eq!(assert_once_and_in_order(&seen(&stream).await), 40);
}

/// Before: nothing fenced a relay whose lease had lapsed. Now (1) a relay id held by another
/// live instance is refused, (2) a relay whose partitions were taken over can no longer record
/// retries or dead letters for what it claimed (the epoch it claimed under is gone), while an
/// acknowledgement is still recorded (the broker has the event, whoever says so), and (3) a
/// relay claims nothing from a partition whose lease is about to run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_past_its_lease_is_fenced_out() {
    let db = TestDb::new().await;
    insert_backlog(&db, 30, 3).await;
    let store = PgStore::new(db.pool.clone());
    let lease = Duration::from_secs(30);

    // (1) Same relay id, another live instance.
    let a = store
        .lease_round("relay-a", "instance-1", lease)
        .await
        .unwrap();
    match store.lease_round("relay-a", "instance-2", lease).await {
        Err(OutboxError::RelayIdInUse { relay_id, pid, .. }) => {
            assert_eq!(relay_id, "relay-a");
            assert_eq!(pid, std::process::id() as i32);
        }
        other => panic!("a second instance with the same relay id must be refused: {other:?}"),
    }

    // (2) A claims, stalls; its lease lapses and B takes the partitions.
    let batch = store
        .claim("relay-a", 30, true, &[], Duration::ZERO)
        .await
        .unwrap()
        .messages;
    assert_eq!(batch.len(), 30);
    let fence_a = Fence {
        relay_id: "relay-a".into(),
        partitions: a.owned.clone(),
        epochs: a.epochs.clone(),
    };
    for stale in [
        "UPDATE outbox_partition SET lease_until = now() - interval '1 second'",
        "UPDATE outbox_relay SET heartbeat_at = now() - interval '1 hour'",
    ] {
        sqlx::query(stale).execute(&db.pool).await.unwrap();
    }
    let b = store
        .lease_round("relay-b", "instance-3", lease)
        .await
        .unwrap();
    assert_eq!(b.owned.len(), 64, "B took every lapsed partition");
    assert!(b.epochs.iter().zip(&a.epochs).all(|(eb, ea)| eb > ea));
    let settlements = vec![
        Settlement::Published(batch[0].event_id),
        Settlement::Retry {
            id: batch[1].event_id,
            delay: Duration::from_secs(60),
            error: "stale".into(),
        },
        Settlement::Dead {
            id: batch[2].event_id,
            error: "stale".into(),
        },
    ];
    store.settle(&settlements, false, &fence_a).await.unwrap();
    let (attempts, dead): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(attempts), 0), count(*) FILTER (WHERE status = 'dead') FROM outbox_event",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (attempts, dead),
        (0, 0),
        "a fenced-out relay records no retry and no dead letter"
    );
    assert_eq!(
        count(&db, "published").await,
        1,
        "an acknowledgement still counts"
    );
    // A's claim now finds nothing: the partitions are B's.
    let again = store
        .claim("relay-a", 30, true, &[], Duration::ZERO)
        .await
        .unwrap()
        .messages;
    assert!(again.is_empty());

    // (3) B's lease has 30 s left: a margin longer than that claims nothing.
    let none = store
        .claim("relay-b", 30, true, &[], Duration::from_secs(40))
        .await
        .unwrap()
        .messages;
    assert!(
        none.is_empty(),
        "nothing is claimed from a lease about to run out"
    );
    let some = store
        .claim("relay-b", 30, true, &[], Duration::from_secs(5))
        .await
        .unwrap()
        .messages;
    assert_eq!(some.len(), 29);
}

/// Two relay processes given the same `--relay-id`: the second is refused with a clear error
/// (before, both ran, each believing it held the same partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_with_the_same_id_is_refused() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let store = Arc::new(PgStore::new(db.pool.clone()));
    let _first = RelayProcess::spawn(&db, &stream, &["--relay-id", "twin"]);
    assert!(
        eventually(Duration::from_secs(15), || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox_partition WHERE owner = 'twin'")
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
            n == 64
        })
        .await
    );
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args([
            "relay",
            "--relay-id",
            "twin",
            "--metrics-addr",
            "",
            "--nats-stream",
            &stream.name,
            "--nats-stream-subjects",
            &format!("{}.>", stream.prefix),
            "--nats-subject",
            &format!("{}.{{tenant}}.{{topic}}", stream.prefix),
        ])
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", testkit::nats_url())
        .output()
        .expect("run a second relay");
    assert!(!second.status.success(), "the second relay must not run");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn the_duplicate_window_horizon_counts_an_ack_timeout_per_attempt() {
    let config = test_config();
    let short = config.dedup_horizon(Duration::from_secs(1));
    let long = config.dedup_horizon(Duration::from_secs(5));
    assert_eq!(
        long - short,
        Duration::from_secs(4) * config.retry.max_attempts
    );
}

/// A claim says whether it left deliverable rows behind, which is what lets the relay wait for a
/// wake-up after a batch without stalling a backlog: a batch cut by the batch size, or by a
/// tenant's share of it, is not drained, whatever its length.
#[tokio::test]
async fn a_claim_says_whether_it_left_deliverable_rows_behind() {
    let db = TestDb::new().await;
    // Tenant `a`: 50 events over 5 aggregates; tenant `b`: 1 event.
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), CASE WHEN g <= 50 THEN 'a' ELSE 'b' END, 'V', 'v' || (g % 5),
                'Bulk', 'bulk.created', '\\x7b7d'::bytea
         FROM generate_series(1, 51) AS g ORDER BY g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // A pool shared with an application (reads in a transaction with the settings) and the
    // relay's own pool (session settings, one statement per read) must claim the same.
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(outbox::pg::relay_connect_options(&db.url).unwrap())
        .await
        .unwrap();
    for store in [PgStore::new(db.pool.clone()), PgStore::new(own)] {
        claims_say_whether_they_left_rows_behind(&db, store).await;
    }
}

async fn claims_say_whether_they_left_rows_behind(db: &TestDb, store: PgStore) {
    store
        .lease_round("claimer", "i1", Duration::from_secs(30))
        .await
        .unwrap();
    let claim = |limit: i64, exclude: Vec<uuid::Uuid>| {
        let store = store.clone();
        async move {
            let c = store
                .claim("claimer", limit, true, &exclude, Duration::ZERO)
                .await
                .unwrap();
            (c.messages.len(), c.drained)
        }
    };
    // Shares of 10, then 26: `a` fills its share, so the batches of 11 and 27 are not drained.
    assert_eq!(claim(20, vec![]).await, (11, false));
    assert_eq!(claim(51, vec![]).await, (27, false));
    // Cut by the batch size (one row from each tenant's share of one, then the final limit).
    assert_eq!(claim(1, vec![]).await, (1, false));
    // Everything fits with room to spare.
    assert_eq!(claim(200, vec![]).await, (51, true));
    // Nothing deliverable (all in flight) is drained too.
    let all: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM outbox_event")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(claim(200, all).await, (0, true));
    store.release_all("claimer", "i1").await.unwrap();
}

/// The relay's own pool starts every connection with JIT and parallel workers off, which is what
/// lets its store read in one statement instead of a transaction of four (docs/benchmarks.md,
/// "The relay at steady load"): a setting missing here would let a large claim be JIT-compiled.
#[tokio::test]
async fn the_relays_own_pool_reads_without_jit_or_parallel_workers() {
    let db = TestDb::new().await;
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(outbox::pg::relay_connect_options(&db.url).unwrap())
        .await
        .unwrap();
    let (jit, workers): (String, String) = sqlx::query_as(
        "SELECT current_setting('jit'), current_setting('max_parallel_workers_per_gather')",
    )
    .fetch_one(&own)
    .await
    .unwrap();
    assert_eq!((jit.as_str(), workers.as_str()), ("off", "0"));
    // And generic plans: the claim was planned afresh on every execution (0.375 ms against 0.07
    // ms running it, at a steady 1,000 events/s).
    let plans: String = sqlx::query_scalar("SELECT current_setting('plan_cache_mode')")
        .fetch_one(&own)
        .await
        .unwrap();
    assert_eq!(plans, "force_generic_plan");
    // The gauges read through the same path.
    let store = PgStore::new(own);
    assert_eq!(store.backlog().await.unwrap().0, 0);
    assert_eq!(store.held().await.unwrap().held, 0);
}

/// What the soak's "full stream" fault must avoid, shown on the real server: a `max_msgs` set
/// below the stream's count drops its oldest messages at once, discard policy `new` or not. A
/// relay publishing between the soak's read of the count and its update made acknowledged events
/// vanish from the stream (soak seed 14080020807552651460), which is why the soak stalls the
/// relays' proxy while it sets the limit.
#[tokio::test]
async fn a_stream_limit_set_below_its_count_drops_the_oldest_messages() {
    let stream = TestStream::new();
    create_stream(&stream, |_| {}).await;
    let js = jetstream::new(async_nats::connect(testkit::nats_url()).await.unwrap());
    for i in 0..20 {
        js.publish(format!("{}.t.x", stream.prefix), format!("{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut s = js.get_stream(&stream.name).await.unwrap();
    let mut config = s.info().await.unwrap().config.clone();
    config.max_messages = 15;
    config.discard = jetstream::stream::DiscardPolicy::New;
    js.update_stream(&config).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    assert_eq!((state.messages, state.first_sequence), (15, 6));
}

/// Issue 19, item 2, on JetStream. Before: a stream with `discard_new_per_subject` refused one
/// subject at its `max_msgs_per_subject` with the same code as a full stream (10077), and the
/// relay treated it as a broker-wide outage: it published the refused events again and again
/// (claim, send, refuse, back off) while the other subjects moved one event per aggregate per
/// round trip. Now the subject is held back alone, one probe per back-off, no attempt spent, the
/// aggregate whose head was refused keeps its later events behind it, and `outbox_route_hold`
/// names the subject. A full stream stays an outage of the stream
/// (`a_full_stream_is_an_outage_not_a_dead_letter`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subject_holds_back_only_that_subject() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    create_stream(&stream, |c| {
        c.max_messages_per_subject = 200;
        c.discard = jetstream::stream::DiscardPolicy::New;
        c.discard_new_per_subject = true;
    })
    .await;
    // Fill the one subject: `{prefix}.{tenant}.{topic}` of tenant t0, topic full.topic.
    let full = format!("{}.t0.full.topic", stream.prefix);
    let client = async_nats::connect(testkit::nats_url()).await.unwrap();
    let js = jetstream::new(client.clone());
    for _ in 0..200 {
        js.publish(full.clone(), "filler".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // Every publish to the subject, refused or not, reaches a core subscriber.
    let mut sub = client.subscribe(full.clone()).await.unwrap();
    let publishes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = publishes.clone();
    let counting = tokio::spawn(async move {
        use futures::StreamExt;
        while sub.next().await.is_some() {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    client.flush().await.unwrap();
    insert_routes(&db, 4, 30, 10).await;
    let (refused_total, healthy_total) = (4 * 10 + 10, 30 * 10);
    let started = std::time::Instant::now();
    let relay = start_relay(&db, stream.nats_config(), test_config()).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&db, "published").await == healthy_total
        })
        .await,
        "the other subjects drain while one is refused"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let elapsed = started.elapsed();
    let sent = publishes.load(std::sync::atomic::Ordering::Relaxed);
    let bound = 5 + route_probes(elapsed) as usize;
    assert!(
        sent <= bound,
        "the refused subject got {sent} publishes in {elapsed:?}; at most {bound} (one per back-off)"
    );
    assert_route_held_back(&db, healthy_total).await;
    let held: Vec<String> = sqlx::query_scalar("SELECT route FROM outbox_route_hold")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        held,
        vec![full.clone()],
        "the refused subject is named for `outbox status`"
    );

    // Room again: everything flows, in order.
    let mut config = js
        .get_stream(&stream.name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    config.max_messages_per_subject = 100_000;
    js.update_stream(config).await.unwrap();
    let done = eventually(Duration::from_secs(20), || async {
        count(&db, "published").await == healthy_total + refused_total
    })
    .await;
    relay.shutdown().await;
    counting.abort();
    assert!(done, "delivered once the subject had room");
    let ours: Vec<Seen> = seen(&stream)
        .await
        .into_iter()
        .filter(|m| !m.event_id.is_empty())
        .collect();
    assert_eq!(
        assert_once_and_in_order(&ours) as i64,
        healthy_total + refused_total
    );
}
