//! The consumer's fault soak (issue 18): two outbox databases publishing the same aggregate keys
//! through their relays into one stream, writers on hot and cold aggregates of three tenants
//! (some transactions rolled back, some events too large for the stream: producer dead letters,
//! replayed and then purged into skip markers), sequence epochs changing under load (compaction
//! at once, a test-only horizon of 0), and two consumers as child processes killed with SIGKILL
//! at random moments: `strict` (its epoch starts accepted by an operator loop that checks the
//! producer's tables) and `after-gap-timeout` (joins late). Their handler fails at random,
//! swallows a database error at random, and fails for good on some events until an operator
//! "fixes" it and replays them; some parked events are purged by the operator instead. One
//! producer's relay sends the full headers, the other's the compact `Outbox-Meta` encoding
//! (issue 20), so the skip markers and epochs of both reach the consumers in both.
//!
//! At the end each consumer's effects equal a model computed from the producer tables: every
//! committed event (not a skip marker, not purged by that consumer's operator) applied exactly
//! once, in (epoch, seq) order per producer and aggregate; nothing from a rolled-back
//! transaction; nothing left parked.
//!
//! Seeded: `SOAK_SEED` replays a run, `SOAK_SECS` (default 25) sets the traffic's length.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use outbox::consumers::dead_letters::{self, ParkedFilter};
use outbox::consumers::nats::{NatsSource, NatsSourceConfig};
use outbox::consumers::{
    Consumer, ConsumerConfig, Handler, HandlerError, InboundEvent, StartPolicy,
};
use outbox::meta::HeaderEncoding;
use outbox::{NewEvent, Outbox};
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use testkit::{TestDb, TestStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TENANTS: [&str; 3] = ["t1", "t2", "t3"];
/// Consumer name, start policy, gap timeout.
const CONSUMERS: [(&str, &str, u64); 2] = [("strict", "strict", 3), ("late", "after", 8)];

fn h64(parts: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// The soak's handler: one effect row per event, with failures injected by the event's hash.
struct SoakHandler {
    seed: u64,
    fixed: Arc<AtomicBool>,
    fix_file: String,
    tries: Mutex<HashMap<Uuid, u32>>,
}

#[async_trait]
impl Handler for SoakHandler {
    async fn handle(&self, tx: &mut PgConnection, e: &InboundEvent) -> Result<(), HandlerError> {
        let n = {
            let mut t = self.tries.lock().unwrap();
            let n = t.entry(e.event_id).or_default();
            *n += 1;
            *n
        };
        let h = h64((self.seed, e.event_id));
        if h % 120 == 7 {
            if !self.fixed.load(Ordering::Relaxed) && std::path::Path::new(&self.fix_file).exists()
            {
                self.fixed.store(true, Ordering::Relaxed);
            }
            if !self.fixed.load(Ordering::Relaxed) {
                return Err("cursed event: fails until the operator fixes the handler".into());
            }
        }
        if h % 23 == 3 && n == 1 {
            // A handler bug: the failed statement is swallowed.
            let _ = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
            return Ok(());
        }
        if h64((self.seed, e.event_id, n)) % 10 == 0 {
            return Err("random failure".into());
        }
        let (agg, pos) = e.sequenced().ok_or("an event without a sequence")?;
        sqlx::query(
            "INSERT INTO soak_effect (consumer, producer, tenant_id, aggregate_id, seq_epoch, seq, event_id)
             VALUES (current_setting('soak.consumer'), $1, $2, $3, $4, $5, $6)",
        )
        .bind(&e.producer)
        .bind(&agg.tenant_id)
        .bind(&agg.aggregate_id)
        .bind(pos.epoch)
        .bind(pos.seq)
        .bind(e.event_id)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Run only as a child of the soak: one consumer process.
#[tokio::test]
#[ignore = "child process of the consumer soak"]
async fn soak_consumer_child() {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the soak"));
    let name = env("SOAK_CONSUMER");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .after_connect({
            let name = name.clone();
            move |c, _| {
                let name = name.clone();
                Box::pin(async move {
                    sqlx::query("SELECT set_config('soak.consumer', $1, false)")
                        .bind(name)
                        .execute(&mut *c)
                        .await?;
                    Ok(())
                })
            }
        })
        .connect(&env("SOAK_DB"))
        .await
        .expect("db");
    let mut cfg = ConsumerConfig::new(&name);
    cfg.concurrency = 4;
    cfg.batch_size = 8;
    cfg.max_attempts = 3;
    cfg.retry_base = Duration::from_millis(50);
    cfg.retry_max = Duration::from_millis(300);
    cfg.gap_retry = Duration::from_millis(100);
    cfg.gap_timeout = Duration::from_secs(env("SOAK_GAP_SECS").parse().unwrap());
    cfg.replay_poll = Duration::from_millis(200);
    cfg.start_policy = match env("SOAK_POLICY").as_str() {
        "strict" => StartPolicy::Strict,
        _ => StartPolicy::AfterGapTimeout,
    };
    let handler = SoakHandler {
        seed: env("SOAK_SEED").parse().unwrap(),
        fixed: Arc::default(),
        fix_file: env("SOAK_FIX_FILE"),
        tries: Mutex::default(),
    };
    let consumer = Consumer::new(pool, handler, cfg).expect("consumer");
    let source = NatsSource::connect(NatsSourceConfig {
        url: testkit::nats_url(),
        stream: env("SOAK_STREAM"),
        durable: name.clone(),
        ack_wait: Duration::from_secs(2),
        max_ack_pending: 256,
        ..Default::default()
    })
    .await
    .expect("source");
    consumer
        .run(source, CancellationToken::new())
        .await
        .expect("runs");
}

/// The consumer processes of one consumer name, restarted after each kill.
struct Children {
    name: &'static str,
    policy: &'static str,
    gap_secs: u64,
    procs: Vec<Child>,
}

struct Setup {
    db: String,
    stream: String,
    seed: u64,
    fix_file: String,
}

impl Children {
    fn spawn(&mut self, s: &Setup) {
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["soak_consumer_child", "--exact", "--ignored", "--nocapture"])
            .env("SOAK_DB", &s.db)
            .env("SOAK_STREAM", &s.stream)
            .env("SOAK_CONSUMER", self.name)
            .env("SOAK_POLICY", self.policy)
            .env("SOAK_GAP_SECS", self.gap_secs.to_string())
            .env("SOAK_SEED", s.seed.to_string())
            .env("SOAK_FIX_FILE", &s.fix_file)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn a soak consumer");
        self.procs.push(child);
    }

    /// SIGKILL of one process (a random one), replaced at once.
    fn kill_one(&mut self, s: &Setup, rng: &mut impl Rng) {
        if self.procs.is_empty() {
            return;
        }
        let i = rng.random_range(0..self.procs.len());
        let mut c = self.procs.remove(i);
        let _ = c.kill();
        let _ = c.wait();
        self.spawn(s);
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One producer database: its outbox writer and its identity.
struct Producer {
    db: TestDb,
    id: Uuid,
}

async fn write_some(p: &Producer, rng: &mut rand::rngs::StdRng, rolled_back: &mut u64) {
    let outbox = Outbox::new("Soak");
    let tenant = TENANTS[rng.random_range(0..TENANTS.len())];
    let agg = if rng.random_bool(0.6) {
        format!("hot{}", rng.random_range(0..2))
    } else {
        format!("cold{}", rng.random_range(0..30))
    };
    let n = rng.random_range(1..=3);
    let events: Vec<NewEvent> = (0..n)
        .map(|_| {
            let body = if rng.random_bool(0.01) {
                // Larger than the stream's largest message: a producer dead letter.
                json!({ "blob": "x".repeat(1_100_000) })
            } else {
                json!({ "n": rng.random::<u32>() })
            };
            NewEvent::new(tenant, "Item", agg.clone(), "Changed", "item.changed", body)
        })
        .collect();
    let Ok(mut tx) = p.db.pool.begin().await else {
        return;
    };
    if outbox.enqueue(&mut tx, &events).await.is_err() {
        return;
    }
    if rng.random_bool(0.05) {
        *rolled_back += 1;
        let _ = tx.rollback().await;
    } else {
        let _ = tx.commit().await;
    }
}

/// The producer's operator: a dead letter seen for the first time is replayed (it dies again:
/// it is too large), the second time purged (a skip marker takes its place).
async fn producer_operator(p: &Producer, replayed: &mut HashSet<Uuid>, purged: &mut u64) {
    let Ok(dead) = outbox::ops::dead_letters(&p.db.pool, &Default::default()).await else {
        return;
    };
    for d in dead {
        let filter = outbox::ops::DeadLetterFilter {
            event_id: Some(d.event_id),
            ..Default::default()
        };
        if replayed.insert(d.event_id) {
            let _ = outbox::ops::replay(&p.db.pool, &filter, "soak").await;
        } else if let Ok(ids) = outbox::ops::purge(&p.db.pool, &filter, "soak").await {
            *purged += ids.len() as u64;
        }
    }
}

/// Compaction at once (a test-only horizon of 0, so that epochs change under load), of the
/// aggregates idle at the producer that every running consumer has applied to their last event:
/// what a horizon longer than the consumers' lag does. (An aggregate compacted while a consumer
/// still has its old epoch in flight can have its old tail arrive after the new epoch's seq 1:
/// the consumer parks it as `late`, visibly, but cannot apply it in order; docs/architecture.md.)
async fn compact(p: &Producer, cdb: &PgPool, consumers: &[&str]) -> u64 {
    let Ok(idle) = sqlx::query_as::<_, (String, String, String, i64, i64)>(
        "SELECT tenant_id, aggregate_type, aggregate_id, seq_epoch, last_seq FROM outbox_aggregate a
          WHERE NOT EXISTS (SELECT 1 FROM outbox_event e
                             WHERE e.tenant_id = a.tenant_id AND e.aggregate_type = a.aggregate_type
                               AND e.aggregate_id = a.aggregate_id)",
    )
    .fetch_all(&p.db.pool)
    .await
    else {
        return 0;
    };
    let Ok(positions) = sqlx::query_as::<_, (String, String, String, i64, i64)>(
        "SELECT consumer, tenant_id, aggregate_id, seq_epoch, seq FROM outbox_consumer_position
          WHERE producer = $1",
    )
    .bind(p.id.to_string())
    .fetch_all(cdb)
    .await
    else {
        return 0;
    };
    let at: HashSet<(String, String, String, i64, i64)> = positions.into_iter().collect();
    let mut n = 0;
    for (t, ty, a, epoch, last) in idle {
        let everywhere = consumers
            .iter()
            .all(|c| at.contains(&(c.to_string(), t.clone(), a.clone(), epoch, last)));
        if !everywhere {
            continue;
        }
        // The same conditions again under the row's lock: a writer may have added an event.
        n += sqlx::query(
            "DELETE FROM outbox_aggregate a
              WHERE tenant_id = $1 AND aggregate_type = $2 AND aggregate_id = $3 AND last_seq = $4
                AND NOT EXISTS (SELECT 1 FROM outbox_event e
                                 WHERE e.tenant_id = a.tenant_id AND e.aggregate_type = a.aggregate_type
                                   AND e.aggregate_id = a.aggregate_id)",
        )
        .bind(&t)
        .bind(&ty)
        .bind(&a)
        .bind(last)
        .execute(&p.db.pool)
        .await
        .map_or(0, |r| r.rows_affected());
    }
    n
}

/// The producer's events of one aggregate, in order, without skip markers.
type Model = BTreeMap<(String, String, String), Vec<(i64, i64, Uuid)>>;

async fn model(producers: &[Producer]) -> Model {
    let mut m = Model::new();
    for p in producers {
        let rows: Vec<(String, String, i64, i64, Uuid)> = sqlx::query_as(
            "SELECT tenant_id, aggregate_id, seq_epoch, seq, event_id FROM outbox_event_all
              WHERE NOT headers ? 'outboxSkip' ORDER BY seq_epoch, seq",
        )
        .fetch_all(&p.db.pool)
        .await
        .unwrap();
        for (t, a, e, s, id) in rows {
            m.entry((p.id.to_string(), t, a))
                .or_default()
                .push((e, s, id));
        }
    }
    m
}

/// The consumer's operator, one round: replays handler-parked events once the handler is fixed,
/// purges some of them before (recorded: the model leaves them out), and for the strict consumer
/// accepts an epoch start once the producer's tables show that the consumer applied the whole
/// previous epoch.
async fn consumer_operator(
    cdb: &PgPool,
    producers: &[Producer],
    fixed: bool,
    rng: &mut rand::rngs::StdRng,
    purged: &mut HashMap<String, HashSet<Uuid>>,
    accepted: &mut u64,
) {
    for (name, policy, _) in CONSUMERS {
        let filter = ParkedFilter {
            consumer: Some(name.into()),
            ..Default::default()
        };
        let Ok(rows) = dead_letters::list(cdb, &filter, 1000).await else {
            continue;
        };
        for r in &rows {
            let one = ParkedFilter {
                consumer: Some(name.into()),
                event_id: Some(r.event_id),
                ..Default::default()
            };
            if r.reason == "handler" && r.replay_requested_at.is_none() {
                if fixed {
                    let _ = dead_letters::request_replay(cdb, &one, "soak", false).await;
                } else if rng.random_bool(0.3) {
                    if let Ok(ids) = dead_letters::purge(cdb, &one, "soak").await {
                        purged.entry(name.into()).or_default().extend(ids);
                    }
                }
            }
            if policy == "strict"
                && r.seq == Some(1)
                && r.replay_requested_at.is_none()
                && epoch_start_is_due(cdb, producers, name, r).await
            {
                let _ = dead_letters::request_replay(cdb, &one, "soak", true).await;
                *accepted += 1;
            }
        }
    }
}

/// Whether seq 1 of `r`'s epoch follows, at its producer, the position `name` has applied.
async fn epoch_start_is_due(
    cdb: &PgPool,
    producers: &[Producer],
    name: &str,
    r: &dead_letters::ParkedEvent,
) -> bool {
    let Some(p) = producers.iter().find(|p| p.id.to_string() == r.producer) else {
        return false;
    };
    let position: Option<(i64, i64)> = sqlx::query_as(
        "SELECT seq_epoch, seq FROM outbox_consumer_position
          WHERE consumer = $1 AND producer = $2 AND tenant_id = $3 AND aggregate_id = $4",
    )
    .bind(name)
    .bind(&r.producer)
    .bind(&r.tenant_id)
    .bind(&r.aggregate_id)
    .fetch_optional(cdb)
    .await
    .ok()
    .flatten();
    let previous: Option<(i64, i64)> = sqlx::query_as(
        "SELECT seq_epoch, seq FROM outbox_event_all
          WHERE tenant_id = $1 AND aggregate_id = $2 AND seq_epoch < $3
          ORDER BY seq_epoch DESC, seq DESC LIMIT 1",
    )
    .bind(&r.tenant_id)
    .bind(&r.aggregate_id)
    .bind(r.seq_epoch)
    .fetch_optional(&p.db.pool)
    .await
    .ok()
    .flatten();
    previous.is_some() && position == previous
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_killed_under_faults_apply_every_committed_event_once_in_order() {
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    eprintln!("consumer soak: seed {seed}, {secs} s of traffic (SOAK_SEED={seed} to replay)");
    let t0 = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let stream = TestStream::new();
    let mut producers = Vec::new();
    let mut relays = Vec::new();
    for i in 0..2 {
        let db = TestDb::new().await;
        let id: Uuid = sqlx::query_scalar("SELECT id FROM outbox_producer")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        // One producer's relay sends the full headers, the other's the compact encoding: the
        // consumers read both from one stream (issue 20).
        let nats = outbox::nats::NatsConfig {
            header_encoding: [HeaderEncoding::Full, HeaderEncoding::Compact][i],
            ..stream.nats_config()
        };
        relays.push(start_relay(&db, nats, test_config()).await);
        producers.push(Producer { db, id });
    }
    let cdb = TestDb::new().await;
    sqlx::query(
        "CREATE TABLE soak_effect (n BIGSERIAL PRIMARY KEY, consumer TEXT NOT NULL, producer TEXT NOT NULL,
             tenant_id TEXT NOT NULL, aggregate_id TEXT NOT NULL, seq_epoch BIGINT NOT NULL,
             seq BIGINT NOT NULL, event_id UUID NOT NULL)",
    )
    .execute(&cdb.pool)
    .await
    .unwrap();
    let fix_file = std::env::temp_dir().join(testkit::unique("soak-fix"));
    let setup = Setup {
        db: cdb.url.clone(),
        stream: stream.name.clone(),
        seed,
        fix_file: fix_file.to_string_lossy().into_owned(),
    };
    // The stream exists once a relay published; the strict consumer starts with the traffic,
    // the other one joins late.
    let mut tx = producers[0].db.pool.begin().await.unwrap();
    let first = NewEvent::new("t1", "Item", "hot0", "Changed", "item.changed", json!({}));
    Outbox::new("Soak")
        .enqueue(&mut tx, &[first])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(
        testkit::eventually(Duration::from_secs(20), || async {
            count(&producers[0].db, "published").await > 0
        })
        .await
    );
    let mut children: Vec<Children> = CONSUMERS
        .iter()
        .map(|(name, policy, gap)| Children {
            name,
            policy,
            gap_secs: *gap,
            procs: Vec::new(),
        })
        .collect();
    children[0].spawn(&setup);
    children[0].spawn(&setup);

    let (mut rolled_back, mut producer_purged, mut kills, mut accepted) = (0u64, 0u64, 0u64, 0u64);
    let mut compacted = 0u64;
    let mut replayed = HashSet::new();
    let mut consumer_purged: HashMap<String, HashSet<Uuid>> = HashMap::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut next_kill = Instant::now() + Duration::from_millis(rng.random_range(300..2500));
    let mut next_ops = Instant::now();
    while Instant::now() < end {
        for _ in 0..4 {
            let p = &producers[rng.random_range(0..producers.len())];
            write_some(p, &mut rng, &mut rolled_back).await;
        }
        if children[1].procs.is_empty() && Instant::now() + Duration::from_secs(secs * 2 / 3) > end
        {
            children[1].spawn(&setup);
        }
        if Instant::now() >= next_kill {
            let c = rng.random_range(0..children.len());
            if !children[c].procs.is_empty() {
                children[c].kill_one(&setup, &mut rng);
                kills += 1;
            }
            next_kill = Instant::now() + Duration::from_millis(rng.random_range(300..2500));
        }
        if Instant::now() >= next_ops {
            next_ops = Instant::now() + Duration::from_millis(1500);
            let started: Vec<&str> = children
                .iter()
                .filter(|c| !c.procs.is_empty())
                .map(|c| c.name)
                .collect();
            for p in &producers {
                producer_operator(p, &mut replayed, &mut producer_purged).await;
                compacted += compact(p, &cdb.pool, &started).await;
            }
            consumer_operator(
                &cdb.pool,
                &producers,
                false,
                &mut rng,
                &mut consumer_purged,
                &mut accepted,
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..15))).await;
    }
    eprintln!("traffic over after {:?}; draining", t0.elapsed());
    std::fs::write(&fix_file, b"fixed").unwrap();
    let settle = Instant::now() + Duration::from_secs(90);
    let mut converged = false;
    while Instant::now() < settle {
        for p in &producers {
            producer_operator(p, &mut replayed, &mut producer_purged).await;
        }
        consumer_operator(
            &cdb.pool,
            &producers,
            true,
            &mut rng,
            &mut consumer_purged,
            &mut accepted,
        )
        .await;
        if outcome(&cdb.pool, &producers, &consumer_purged)
            .await
            .is_ok()
        {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(children);
    for r in relays {
        r.shutdown().await;
    }
    let _ = std::fs::remove_file(&fix_file);
    let figures: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM soak_effect), (SELECT count(*) FROM outbox_consumer_skip)",
    )
    .fetch_one(&cdb.pool)
    .await
    .unwrap();
    eprintln!(
        "consumer soak (seed {seed}): {} effects, {} skips recorded, {kills} SIGKILLs, {rolled_back} transactions rolled back, \
         {producer_purged} producer purges, {} consumer purges, {compacted} aggregates compacted, {accepted} epoch starts accepted, {:?}",
        figures.0,
        figures.1,
        consumer_purged.values().map(HashSet::len).sum::<usize>(),
        t0.elapsed()
    );
    if !converged {
        if let Err(why) = outcome(&cdb.pool, &producers, &consumer_purged).await {
            panic!("seed {seed}: {why}");
        }
    }
}

/// `Ok` when every consumer's effects equal the model and nothing is parked; else what differs.
async fn outcome(
    cdb: &PgPool,
    producers: &[Producer],
    consumer_purged: &HashMap<String, HashSet<Uuid>>,
) -> Result<(), String> {
    for p in producers {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM outbox_event WHERE status IN ('pending', 'held', 'dead')",
        )
        .fetch_one(&p.db.pool)
        .await
        .map_err(|e| e.to_string())?;
        if left > 0 {
            return Err(format!("producer {} has {left} events not published", p.id));
        }
    }
    let model = model(producers).await;
    for (name, _, _) in CONSUMERS {
        let parked: Vec<(String, Option<i64>, String)> = sqlx::query_as(
            "SELECT aggregate_id, seq, reason FROM outbox_consumer_dead_letter WHERE consumer = $1",
        )
        .bind(name)
        .fetch_all(cdb)
        .await
        .map_err(|e| e.to_string())?;
        if !parked.is_empty() {
            return Err(format!("{name}: still parked {parked:?}"));
        }
        let rows: Vec<(String, String, String, i64, i64, Uuid)> = sqlx::query_as(
            "SELECT producer, tenant_id, aggregate_id, seq_epoch, seq, event_id FROM soak_effect
              WHERE consumer = $1 ORDER BY n",
        )
        .bind(name)
        .fetch_all(cdb)
        .await
        .map_err(|e| e.to_string())?;
        let mut got = Model::new();
        for (p, t, a, e, s, id) in rows {
            got.entry((p, t, a)).or_default().push((e, s, id));
        }
        let none = HashSet::new();
        let purged = consumer_purged.get(name).unwrap_or(&none);
        for (key, want) in &model {
            let want: Vec<_> = want.iter().filter(|w| !purged.contains(&w.2)).collect();
            let have: Vec<_> = got.get(key).map(|v| v.iter().collect()).unwrap_or_default();
            if want != have {
                let missing: Vec<_> = want.iter().filter(|w| !have.contains(w)).collect();
                let extra: Vec<_> = have.iter().filter(|h| !want.contains(h)).collect();
                let mut seen = HashSet::new();
                let twice: Vec<_> = have.iter().filter(|h| !seen.insert(h.2)).collect();
                return Err(format!(
                    "{name}: {key:?}: applied {} of {} events; missing {missing:?}, not expected \
                     {extra:?} (purged by the operator: {:?}), applied twice {twice:?}, in order: {}",
                    have.len(),
                    want.len(),
                    extra.iter().map(|e| purged.contains(&e.2)).collect::<Vec<_>>(),
                    missing.is_empty() && extra.is_empty() && twice.is_empty()
                ));
            }
        }
        if let Some(extra) = got.keys().find(|k| !model.contains_key(*k)) {
            return Err(format!(
                "{name}: effects of an aggregate no producer has: {extra:?}"
            ));
        }
    }
    Ok(())
}
