//! What the message headers cost a raw JetStream publish (issue 20, goal 3): the same messages
//! with 0, 1, 5, 10 and the relay's 11 headers, and in the compact encoding, published the way
//! the raw baseline of `bench_nats` publishes, with the CPU time of this process and of
//! nats-server per message.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use async_nats::HeaderMap;
use outbox::meta::HeaderEncoding;
use outbox::nats::NatsPublisher;
use outbox::OutboundMessage;
use testkit::TestStream;

use super::cpu;

/// The relay's full header set in a fixed order: the first `n` make the `n`-header variant
/// (`Nats-Msg-Id` first: without it JetStream cannot de-duplicate).
const FULL_ORDER: [&str; 11] = [
    "Nats-Msg-Id",
    "Outbox-Event-Id",
    "Outbox-Event-Type",
    "Outbox-Tenant-Id",
    "Outbox-Aggregate-Type",
    "Outbox-Aggregate-Id",
    "Outbox-Seq",
    "Outbox-Seq-Epoch",
    "Outbox-Correlation-Id",
    "Content-Type",
    "Outbox-Producer-Id",
];

/// One way of sending the messages' headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headers {
    /// The first `n` of the relay's full set (0: none at all, 11: all the relay sends).
    First(usize),
    /// The compact encoding: `Nats-Msg-Id` and `Outbox-Meta`.
    Compact,
}

impl Headers {
    /// The variants of the sweep.
    pub const SWEEP: [Headers; 6] = [
        Headers::First(0),
        Headers::First(1),
        Headers::First(5),
        Headers::First(10),
        Headers::First(11),
        Headers::Compact,
    ];

    /// Name in the printed table.
    pub fn label(self) -> String {
        match self {
            Headers::First(11) => "11 (relay, full)".into(),
            Headers::First(n) => format!("{n}"),
            Headers::Compact => "2 (relay, compact)".into(),
        }
    }

    /// The headers of `m` in this variant (`None`: a plain publish without headers).
    pub fn of(self, m: &OutboundMessage) -> Option<HeaderMap> {
        match self {
            Headers::First(0) => None,
            // The relay's own function for its full set; the smaller sets built the same way
            // (one `HeaderValue` parsed per header), so that each variant's building cost is real.
            Headers::First(11) => Some(NatsPublisher::headers(m).unwrap()),
            Headers::First(n) => {
                let id = m.event_id.to_string();
                let values = [
                    id.clone(),
                    id,
                    m.event_type.clone(),
                    m.tenant_id.clone(),
                    m.aggregate_type.clone(),
                    m.aggregate_id.clone(),
                    m.seq.to_string(),
                    m.seq_epoch.to_string(),
                    m.header("correlationId").unwrap_or_default().to_string(),
                    m.header("contentType")
                        .unwrap_or("application/json")
                        .to_string(),
                ];
                let mut h = HeaderMap::new();
                for (name, v) in FULL_ORDER.iter().zip(values).take(n) {
                    h.insert(*name, v.parse::<async_nats::HeaderValue>().unwrap());
                }
                Some(h)
            }
            Headers::Compact => {
                Some(NatsPublisher::headers_for(m, HeaderEncoding::Compact).unwrap())
            }
        }
    }
}

/// Bytes of a header block as NATS sends it (`NATS/1.0\r\n`, `Name: value\r\n` each, `\r\n`).
fn block_len(h: &HeaderMap) -> usize {
    12 + h
        .iter()
        .map(|(k, vs)| {
            let name: &str = k.as_ref();
            vs.iter()
                .map(|v| name.len() + 4 + v.as_str().len())
                .sum::<usize>()
        })
        .sum::<usize>()
}

/// Publishes `msgs` to a fresh stream in chunks of 1,000 asynchronous publishes, each chunk's
/// acknowledgements awaited before the next (the raw baseline of `bench_nats`); messages/s.
pub async fn raw_rate(
    client: &async_nats::Client,
    msgs: &[OutboundMessage],
    headers: impl Fn(&OutboundMessage) -> Option<HeaderMap>,
) -> f64 {
    let stream = TestStream::new();
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: stream.name.clone(),
        subjects: vec![format!("{}.>", stream.prefix)],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let template = format!("{}.{{tenant}}.{{topic}}", stream.prefix);
    let t = Instant::now();
    for chunk in msgs.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut p = PublishMessage::build().payload(m.payload.clone());
            if let Some(h) = headers(m) {
                p = p.headers(h);
            }
            acks.push(js.send_publish(m.render(&template), p).await.unwrap());
        }
        for a in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            a.unwrap();
        }
    }
    msgs.len() as f64 / t.elapsed().as_secs_f64()
}

/// The PID of the nats-server behind `testkit::nats_url()` (`BENCH_NATS_PID`, else the only
/// `nats-server` process, else the one whose command line names the URL's port).
pub fn nats_server_pid() -> Option<u32> {
    if let Some(p) = std::env::var("BENCH_NATS_PID")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        return Some(p);
    }
    let port = testkit::nats_url()
        .rsplit(':')
        .next()
        .unwrap_or("4222")
        .to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "nats-server" {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        found.push((pid, cmd.contains(&format!(" {port}"))));
    }
    match found.as_slice() {
        [(pid, _)] => Some(*pid),
        _ => found.iter().find(|(_, port)| *port).map(|(p, _)| *p),
    }
}

/// One variant's figures.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// Messages/s.
    pub rate: f64,
    /// CPU microseconds per message of this process (the publishing client).
    pub client_us: f64,
    /// CPU microseconds per message of nats-server.
    pub server_us: f64,
}

/// Publishes `msgs` once per variant per round (rounds alternate the order, so that no variant
/// always runs first on a warming or cooling machine) and prints each run and the medians.
pub async fn sweep(client: &async_nats::Client, msgs: &[OutboundMessage], rounds: usize) {
    let server = nats_server_pid();
    let sample = |n: usize| msgs.iter().take(n).cloned().collect::<Vec<_>>();
    let first = sample(1000);
    println!(
        "message headers: payload {} B per message; nats-server pid {server:?}",
        first.iter().map(|m| m.payload.len()).sum::<usize>() / first.len()
    );
    for v in Headers::SWEEP {
        let bytes = first
            .iter()
            .map(|m| v.of(m).map(|h| block_len(&h)).unwrap_or(0))
            .sum::<usize>()
            / first.len();
        // What building the headers alone costs the client, without any network.
        let t = Instant::now();
        for m in msgs {
            std::hint::black_box(v.of(m));
        }
        let build_us = t.elapsed().as_secs_f64() * 1e6 / msgs.len() as f64;
        println!(
            "  headers {:<20} header block {bytes:>4} B   building them {build_us:.2} us/msg",
            v.label()
        );
    }
    let mut all: Vec<(Headers, Figures)> = Vec::new();
    for round in 0..rounds {
        let mut order = Headers::SWEEP.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for v in order {
            let pids: Vec<u32> = server.into_iter().collect();
            let before = cpu::Sample::take(&pids);
            let rate = raw_rate(client, msgs, |m| v.of(m)).await;
            let used = cpu::Sample::take(&pids).since(&before);
            let per = |s: f64| s * 1e6 / msgs.len() as f64;
            let f = Figures {
                rate,
                client_us: per(used.me),
                server_us: per(used.children),
            };
            println!(
                "  round {round} headers {:<20} {:>8.0} msg/s   client {:>5.1} us/msg   nats-server {:>5.1} us/msg",
                v.label(),
                f.rate,
                f.client_us,
                f.server_us
            );
            all.push((v, f));
            super::quiet().await;
        }
    }
    let full = median(&all, Headers::First(11));
    println!(
        "raw JetStream publish by headers (median of {rounds} round(s); ratio to the relay's 11):"
    );
    for v in Headers::SWEEP {
        let f = median(&all, v);
        println!(
            "  headers {:<20} {:>8.0} msg/s  x{:.2}   client {:>5.1} us/msg   nats-server {:>5.1} us/msg",
            v.label(),
            f.rate,
            f.rate / full.rate,
            f.client_us,
            f.server_us
        );
    }
}

/// The median of `xs` (the mean of the two middle values of an even count).
pub fn median_of(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// Each figure's median over the variant's runs (the machine is shared: one slow run is common).
fn median(all: &[(Headers, Figures)], v: Headers) -> Figures {
    let of = |f: fn(&Figures) -> f64| {
        median_of(
            all.iter()
                .filter(|(h, _)| *h == v)
                .map(|(_, x)| f(x))
                .collect(),
        )
    };
    Figures {
        rate: of(|f| f.rate),
        client_us: of(|f| f.client_us),
        server_us: of(|f| f.server_us),
    }
}
