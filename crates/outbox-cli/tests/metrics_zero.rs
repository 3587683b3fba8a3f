//! Issue 19, item 3: metrics from the first scrape. A fresh relay's `/metrics`, scraped before
//! any event exists, has every counter and histogram of `docs/metrics.md` with every label value
//! it can take at zero (Prometheus' advice: a series that appears with its first increment makes
//! `rate()` miss that increment). Before the fix, the first scrape had none of the labelled
//! counters and none of the histograms. Real `outbox relay` processes, real PostgreSQL, NATS and
//! RabbitMQ.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use outbox::telemetry as m;
use testkit::{eventually, TestDb, TestStream};

/// Plain HTTP/1.0 GET on loopback: the body of a 200.
async fn get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_string())
}

/// The first `/metrics` body the relay on `port` answers with (polled every 20 ms).
async fn first_scrape(port: u16) -> String {
    for _ in 0..1500 {
        if let Some(body) = get(port, "/metrics").await {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the relay did not serve /metrics within 30 s");
}

/// The value of the sample `name` whose labels include every one of `labels` (`k="v"`), if any.
fn sample(body: &str, name: &str, labels: &[String]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.iter().all(|want| rest.contains(want.as_str()))
        })
        .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
}

/// Counters and histograms of the relay documented in docs/metrics.md (the consumer's are
/// exported by consumers, not by relays).
fn documented_relay_series() -> Vec<(String, String)> {
    let doc = include_str!("../../../docs/metrics.md");
    doc.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.trim_matches('`');
            let kind = *cells.get(2)?;
            (name.starts_with("outbox_")
                && !name.starts_with("outbox_consumer_")
                && (kind == "counter" || kind == "histogram"))
                .then(|| (name.to_string(), kind.to_string()))
        })
        .collect()
}

/// Every documented counter and histogram with every label value, at zero; `extra` is a label
/// every series must carry (`database="NAME"` in a several-databases relay).
fn assert_all_zero(body: &str, broker: &str, exchange: Option<&str>, extra: &[String]) {
    let with = |more: &[String]| -> Vec<String> { extra.iter().chain(more).cloned().collect() };
    let l = |k: &str, v: &str| format!("{k}=\"{v}\"");
    let documented = documented_relay_series();
    assert!(documented.len() >= 10, "docs/metrics.md table read");
    for (name, kind) in &documented {
        if name == m::UNROUTABLE && exchange.is_none() {
            continue; // RabbitMQ only.
        }
        let series = if kind == "histogram" {
            format!("{name}_count")
        } else {
            name.clone()
        };
        let value = sample(body, &series, &with(&[]));
        if name == m::CLAIM_SECONDS {
            // The relay claims at once, events or not: present from the first scrape, and
            // already counting when the scrape comes after the first claim.
            assert!(
                value.is_some(),
                "{broker}: {series} {extra:?} on the first scrape:\n{body}"
            );
            continue;
        }
        assert_eq!(
            value,
            Some(0.0),
            "{broker}: {series} {extra:?} at 0 on the first scrape:\n{body}"
        );
    }
    let r = m::failure_reasons(broker);
    for (kind, reasons) in [
        ("unavailable", r.unavailable),
        ("retryable", r.retryable),
        ("permanent", r.permanent),
        ("lease_expired", &[m::LEASE_REASON][..]),
    ] {
        for reason in reasons {
            let labels = with(&[l("kind", kind), l("reason", reason)]);
            assert_eq!(
                sample(body, m::FAILED, &labels),
                Some(0.0),
                "{broker}: {} {labels:?}",
                m::FAILED
            );
        }
    }
    for reason in r.retryable {
        let labels = with(&[l("reason", reason)]);
        assert_eq!(sample(body, m::RETRIED, &labels), Some(0.0), "{labels:?}");
    }
    for reason in r.permanent.iter().chain(m::DEAD_LETTER_EXTRA_REASONS) {
        let labels = with(&[l("reason", reason)]);
        assert_eq!(
            sample(body, m::DEAD_LETTERED, &labels),
            Some(0.0),
            "{labels:?}"
        );
    }
    for name in [m::PUBLISHED, m::DUPLICATES] {
        let labels = with(&[l("broker", broker)]);
        assert_eq!(sample(body, name, &labels), Some(0.0), "{name} {labels:?}");
    }
    if let Some(x) = exchange {
        let labels = with(&[l("exchange", x)]);
        assert_eq!(sample(body, m::UNROUTABLE, &labels), Some(0.0));
    }
    // Every value is documented, so that an alert author finds it.
    let doc = include_str!("../../../docs/metrics.md");
    for reason in r
        .unavailable
        .iter()
        .chain(r.retryable)
        .chain(r.permanent)
        .chain(m::DEAD_LETTER_EXTRA_REASONS)
    {
        assert!(
            doc.contains(&format!("`{reason}`")),
            "reason {reason} in docs/metrics.md"
        );
    }
}

fn outbox(args: &[&str]) -> RelayProcess {
    RelayProcess(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("OUTBOX_DATABASES_FILE")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outbox relay"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_nats_relay_exports_every_counter_and_histogram_at_zero() {
    let db = TestDb::new().await;
    let stream = TestStream::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _relay = RelayProcess::spawn(&db, &stream, &["--metrics-addr", &addr]);
    let body = first_scrape(port).await;
    assert_eq!(
        count(&db, "pending").await + count(&db, "published").await,
        0
    );
    assert_all_zero(&body, "nats", None, &[]);
    // The held gauges join the others once the gauge task has read the table.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let b = get(port, "/metrics").await.unwrap_or_default();
            sample(&b, m::HELD, &[]) == Some(0.0) && sample(&b, m::HELD_ORPHANED, &[]) == Some(0.0)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_rabbitmq_relay_exports_every_counter_and_histogram_at_zero() {
    let db = TestDb::new().await;
    let exchange = testkit::unique("zeros");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _relay = outbox(&[
        "relay",
        "--database-url",
        &db.url,
        "--broker",
        "rabbitmq",
        "--amqp-exchange",
        &exchange,
        "--metrics-addr",
        &addr,
    ]);
    let body = first_scrape(port).await;
    assert_all_zero(&body, "rabbitmq", Some(&exchange), &[]);
}

/// Several databases in one relay: every series once per database, also for a database the
/// relay cannot reach (its relay never starts; its zeros are there all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_relay_of_several_databases_exports_zeros_per_database() {
    let a = TestDb::new().await;
    let stream = TestStream::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let unreachable = format!("postgres://root@127.0.0.1:{}/nowhere", free_port());
    let (subjects, template) = (
        format!("{}.>", stream.prefix),
        format!("{}.{{tenant}}.{{topic}}", stream.prefix),
    );
    let urls = [format!("alpha={}", a.url), format!("beta={unreachable}")];
    let _relay = outbox(&[
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
        "--metrics-addr",
        &addr,
    ]);
    // The relay threads register their zeros as they start, as the port starts serving: wait
    // for every documented series of both (a thread may be between two registrations).
    let documented = documented_relay_series();
    let has_both = |b: &str| {
        ["alpha", "beta"].iter().all(|d| {
            documented.iter().all(|(name, kind)| {
                let series = if kind == "histogram" {
                    format!("{name}_count")
                } else {
                    name.clone()
                };
                name == m::UNROUTABLE
                    || sample(b, &series, &[format!("database=\"{d}\"")]).is_some()
            })
        })
    };
    let mut body = first_scrape(port).await;
    for _ in 0..100 {
        if has_both(&body) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        body = get(port, "/metrics").await.unwrap_or_default();
    }
    assert!(has_both(&body), "both databases' zeros:\n{body}");
    for d in ["alpha", "beta"] {
        assert_all_zero(&body, "nats", None, &[format!("database=\"{d}\"")]);
    }
}

/// A subscription that has ended: the consumer starts, finds nothing and returns.
struct Ended;

#[async_trait::async_trait]
impl outbox::consumers::source::EventSource for Ended {
    fn broker(&self) -> &'static str {
        "test"
    }
    async fn next(&mut self) -> outbox::error::Result<Option<outbox::consumers::source::Received>> {
        Ok(None)
    }
    async fn lag(&mut self) -> Option<u64> {
        None
    }
}

struct Nothing;

#[async_trait::async_trait]
impl outbox::consumers::runtime::Handler for Nothing {
    async fn handle(
        &self,
        _tx: &mut sqlx::PgConnection,
        _event: &outbox::consumers::event::InboundEvent,
    ) -> Result<(), outbox::consumers::runtime::HandlerError> {
        Ok(())
    }
}

/// The consumer runtime's counters, per consumer and with every reason, at 0 once a consumer
/// runs, before it has received anything. Current-thread runtime: the recorder set for this
/// thread sees everything the consumer records.
#[tokio::test]
async fn a_consumer_exports_its_counters_at_zero_when_it_starts() {
    use outbox::consumers::metrics as cm;
    let db = TestDb::new().await;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let name = testkit::unique("zeros");
    let cfg = outbox::consumers::runtime::ConsumerConfig::new(&name);
    let consumer =
        outbox::consumers::runtime::Consumer::new(db.pool.clone(), Nothing, cfg).expect("consumer");
    consumer
        .run(Ended, tokio_util::sync::CancellationToken::new())
        .await
        .expect("run");
    let body = handle.render();
    let c = format!("consumer=\"{name}\"");
    for n in [
        cm::HANDLED,
        cm::DUPLICATES,
        cm::SKIPPED,
        cm::REPLAYED,
        cm::BATCHES,
    ] {
        assert_eq!(
            sample(&body, n, std::slice::from_ref(&c)),
            Some(0.0),
            "{n}:\n{body}"
        );
    }
    for r in cm::RETRY_REASONS {
        let labels = [c.clone(), format!("reason=\"{r}\"")];
        assert_eq!(sample(&body, cm::RETRIES, &labels), Some(0.0), "{labels:?}");
    }
    for r in cm::PARK_REASONS {
        let labels = [c.clone(), format!("reason=\"{r}\"")];
        assert_eq!(sample(&body, cm::PARKED, &labels), Some(0.0), "{labels:?}");
    }
    // Every counter of the consumer documented in docs/metrics.md is among those above.
    let doc = include_str!("../../../docs/metrics.md");
    for l in doc.lines().filter(|l| l.contains("| counter |")) {
        let name = l.split('|').nth(1).unwrap().trim().trim_matches('`');
        if name.starts_with("outbox_consumer_") {
            assert!(
                [
                    cm::HANDLED,
                    cm::DUPLICATES,
                    cm::SKIPPED,
                    cm::REPLAYED,
                    cm::BATCHES,
                    cm::RETRIES,
                    cm::PARKED
                ]
                .contains(&name),
                "{name} is exported at zero"
            );
        }
    }
}
