//! NATS JetStream adapter.
//!
//! `Nats-Msg-Id` is the `eventId`, so the stream drops re-publishes inside its duplicate window;
//! the window is checked against the relay's re-publish horizon before anything is published.
//! On a cluster the adapter takes every server's URL (comma-separated) and can create or check an
//! R3 stream ([`NatsConfig::replicas`]); leader elections and lost quorum reach it as "no
//! responders", time-outs or the cluster error codes listed in `BROKER_WIDE`, all outages.
//! Built without async-nats' `server_2_10` features: Debian ships nats-server 2.9, which would
//! reject the 2.10-only stream fields.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, message::PublishMessage, stream, ErrorCode};
use async_nats::{connection::State, HeaderMap, HeaderValue};
use async_trait::async_trait;
use futures::future::FutureExt;
use std::sync::RwLock;
use std::time::Instant;

use tokio::sync::Mutex;

use crate::error::{OutboxError, Result};
use crate::meta::{self, HeaderEncoding, META_HEADER};
use crate::publisher::{
    Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher, SKIP_HEADER,
};

/// Settings of the JetStream adapter.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated: the client starts with any one that answers and fails
    /// over to the others (and to the cluster members the servers announce).
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Subjects the stream captures (used when the adapter creates it).
    pub subjects: Vec<String>,
    /// Subject per event: `{tenant}`, `{topic}`, `{event_type}`, `{aggregate_type}`.
    pub subject_template: String,
    /// Duplicate window of a stream the adapter creates.
    pub duplicate_window: Duration,
    /// Replicas of the stream: a stream the adapter creates gets this many (default 1), and an
    /// existing stream with another number is refused at start-up. `None` accepts any existing
    /// stream and creates R1.
    pub replicas: Option<usize>,
    /// Create the stream when it does not exist (otherwise only check it).
    pub create_stream: bool,
    /// How long to wait for one acknowledgement.
    pub ack_timeout: Duration,
    /// Most acknowledgements outstanding at once (async-nats' in-flight permits are set to the
    /// same number; acknowledgements are read while sending, so a larger batch never waits on them).
    pub max_in_flight: usize,
    /// Which headers carry each event's metadata ([`HeaderEncoding`]; default: one per field).
    pub header_encoding: HeaderEncoding,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "OUTBOX".into(),
            subjects: vec!["outbox.>".into()],
            subject_template: "outbox.{tenant}.{topic}".into(),
            duplicate_window: Duration::from_secs(120),
            replicas: None,
            create_stream: true,
            ack_timeout: Duration::from_secs(5),
            max_in_flight: 1024,
            header_encoding: HeaderEncoding::Full,
        }
    }
}

/// Publishes to a JetStream stream.
pub struct NatsPublisher {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: NatsConfig,
    horizon: Duration,
    /// When the stream was last checked: it is checked again every [`RECHECK`], so that an
    /// operator's change (subjects, duplicate window) is seen without a restart.
    stream_checked: Mutex<Option<Instant>>,
    /// The subjects the stream captures, as of the last check.
    stream_subjects: RwLock<Vec<String>>,
}

/// How often the stream's configuration is read again.
const RECHECK: Duration = Duration::from_secs(60);

impl NatsPublisher {
    /// Connects (in the background: the relay starts while NATS is down) and, if the server
    /// answers, makes sure the stream exists with a duplicate window of at least `horizon`.
    /// Fails at once on a configuration error, including a window shorter than `horizon`.
    pub async fn connect(cfg: NatsConfig, horizon: Duration) -> Result<Self> {
        if !cfg.subject_template.contains("{tenant}") {
            return Err(OutboxError::Config(format!(
                "subject template {:?} must contain {{tenant}}: the tenant is part of every subject",
                cfg.subject_template
            )));
        }
        if cfg.max_in_flight == 0 {
            return Err(OutboxError::Config(
                "max in-flight acknowledgements must be at least 1".into(),
            ));
        }
        let urls = server_urls(&cfg.url)?;
        let client = async_nats::ConnectOptions::new()
            .name("outbox-relay")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2000))
            })
            .connect(urls)
            .await
            .map_err(|e| OutboxError::Broker(format!("cannot use NATS URL {:?}: {e}", cfg.url)))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.ack_timeout)
            .max_ack_inflight(cfg.max_in_flight)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let me = Self {
            client,
            js,
            cfg,
            horizon,
            stream_checked: Mutex::new(None),
            stream_subjects: RwLock::new(Vec::new()),
        };
        // Give a reachable server a moment, so that a bad stream is reported at start-up.
        for _ in 0..20 {
            if me.client.connection_state() == State::Connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if me.client.connection_state() == State::Connected {
            match me.ensure_stream().await {
                // A cluster electing its leaders, or a stream whose quorum is down, answers late
                // or not at all: the relay starts and the events wait, as when NATS is down.
                Err(OutboxError::Broker(e)) => {
                    tracing::warn!(error = %e, "JetStream stream not usable yet; events wait in the outbox until it is")
                }
                other => other?,
            }
        } else {
            tracing::warn!(url = %me.cfg.url, "NATS not reachable yet; events wait in the outbox until it is");
        }
        Ok(me)
    }

    /// The underlying client (tests and benchmarks subscribe with it).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Creates the stream if configured and absent; checks its duplicate window and learns its
    /// subjects. Does the work at most once per [`RECHECK`].
    pub async fn ensure_stream(&self) -> Result<()> {
        let mut checked = self.stream_checked.lock().await;
        if checked.is_some_and(|at| at.elapsed() < RECHECK) {
            return Ok(());
        }
        let info = match self.js.get_stream(&self.cfg.stream).await {
            Ok(mut s) => s
                .info()
                .await
                .map_err(|e| OutboxError::Broker(e.to_string()))?
                .clone(),
            Err(e) if is_not_found(&e) && self.cfg.create_stream => {
                let config = stream::Config {
                    name: self.cfg.stream.clone(),
                    subjects: self.cfg.subjects.clone(),
                    duplicate_window: self.cfg.duplicate_window,
                    storage: stream::StorageType::File,
                    num_replicas: self.cfg.replicas.unwrap_or(1),
                    ..Default::default()
                };
                let mut s = self
                    .js
                    .create_stream(config)
                    .await
                    .map_err(|e| create_error(&self.cfg, e))?;
                tracing::info!(stream = %self.cfg.stream, replicas = self.cfg.replicas.unwrap_or(1), "created JetStream stream");
                s.info()
                    .await
                    .map_err(|e| OutboxError::Broker(e.to_string()))?
                    .clone()
            }
            Err(e) if is_not_found(&e) => {
                return Err(OutboxError::Config(format!(
                "stream {} does not exist and stream creation is off: create it or allow creation",
                self.cfg.stream
            )))
            }
            Err(e) => {
                return Err(OutboxError::Broker(format!(
                    "cannot look up stream {}: {e}",
                    self.cfg.stream
                )))
            }
        };
        if let Some(want) = self.cfg.replicas {
            let have = info.config.num_replicas.max(1);
            if have != want {
                return Err(OutboxError::Config(format!(
                    "stream {} has {have} replica(s) but the relay is configured for {want}: change the \
                     stream (nats stream edit {} --replicas {want}) or the relay's stream replicas setting",
                    self.cfg.stream, self.cfg.stream
                )));
            }
        }
        let window = info.config.duplicate_window;
        if window < self.horizon {
            return Err(OutboxError::Config(format!(
                "stream {} drops duplicates for {:?} only, but the relay may re-publish an event up to {:?} \
                 after its first publish; raise the stream's duplicate window (nats stream edit {} --dupe-window) \
                 or lower the retry budget / lease",
                self.cfg.stream, window, self.horizon, self.cfg.stream
            )));
        }
        *self
            .stream_subjects
            .write()
            .unwrap_or_else(|p| p.into_inner()) = info.config.subjects.clone();
        *checked = Some(Instant::now());
        Ok(())
    }

    /// The headers an event is published with (also used by the benchmark's raw baseline, so
    /// that it sends byte-for-byte the messages the relay sends). Fails, instead of panicking as
    /// async-nats' `From<&str>` does, when a value cannot be carried in a NATS header (CR or LF):
    /// such a row is the event's problem, dead-lettered at once, never the relay's.
    pub fn headers(m: &OutboundMessage) -> std::result::Result<HeaderMap, PublishFailure> {
        Self::headers_for(m, HeaderEncoding::Full)
    }

    /// [`NatsPublisher::headers`] in the given encoding: [`HeaderEncoding::Compact`] sends
    /// `Nats-Msg-Id` (JetStream de-duplicates on it), [`META_HEADER`] and `traceparent`.
    pub fn headers_for(
        m: &OutboundMessage,
        encoding: HeaderEncoding,
    ) -> std::result::Result<HeaderMap, PublishFailure> {
        let mut h = HeaderMap::new();
        let mut put = |name: &'static str,
                       value: &str|
         -> std::result::Result<(), PublishFailure> {
            let v = value.parse::<HeaderValue>().map_err(|_| {
                PublishFailure::new(
                    FailureKind::Permanent,
                    "bad_header",
                    format!("{name} {value:?} cannot be sent as a NATS header (CR or LF in it)"),
                )
            })?;
            h.insert(name, v);
            Ok(())
        };
        let id = m.event_id.to_string();
        put("Nats-Msg-Id", &id)?;
        if encoding == HeaderEncoding::Compact {
            put(META_HEADER, &meta::encode(m))?;
            if let Some(tp) = m.header("traceparent") {
                put("traceparent", tp)?;
            }
            return Ok(h);
        }
        put("Outbox-Event-Id", &id)?;
        put("Outbox-Event-Type", &m.event_type)?;
        put("Outbox-Tenant-Id", &m.tenant_id)?;
        put("Outbox-Aggregate-Type", &m.aggregate_type)?;
        put("Outbox-Aggregate-Id", &m.aggregate_id)?;
        put("Outbox-Seq", &m.seq.to_string())?;
        put("Outbox-Seq-Epoch", &m.seq_epoch.to_string())?;
        if let Some(c) = m.header("correlationId") {
            put("Outbox-Correlation-Id", c)?;
        }
        if let Some(tp) = m.header("traceparent") {
            put("traceparent", tp)?;
        }
        if let Some(p) = m.producer_id {
            put("Outbox-Producer-Id", &p.to_string())?;
        }
        if let Some(skip) = m.header(SKIP_HEADER) {
            put("Outbox-Skip", skip)?;
        }
        put(
            "Content-Type",
            m.header("contentType").unwrap_or("application/json"),
        )?;
        Ok(h)
    }

    /// How a failure to send, or a negative or missing acknowledgement, is handled. The rule:
    /// only what is specific to *this message* spends its attempts or dead-letters it; anything
    /// that says the broker as a whole cannot take messages now is an outage (`Unavailable`): no
    /// attempt is spent, nothing is dead-lettered, the relay backs off and catches up later.
    pub(crate) fn classify(client: &async_nats::Client, e: &PublishError) -> PublishFailure {
        let err = match jetstream_error(e) {
            Some(j) => format!("{e}: {j}"),
            None => e.to_string(),
        };
        let outage = |reason| PublishFailure::new(FailureKind::Unavailable, reason, err.clone());
        if client.connection_state() != State::Connected {
            return outage("disconnected");
        }
        match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => {
                PublishFailure::new(FailureKind::Permanent, "too_large", err)
            }
            // No responders: no stream captures the subject *right now*. During a stream leader
            // election or a restart this is transient; when the subject is truly not captured it
            // is the operator's to fix (stream subjects vs. subject template): either way the
            // events wait rather than die.
            PublishErrorKind::StreamNotFound => outage("no_responders"),
            // No answer in time: the server or its stream is not answering, which says nothing
            // about this message.
            PublishErrorKind::TimedOut => outage("timeout"),
            PublishErrorKind::BrokenPipe | PublishErrorKind::MaxAckPending => {
                outage("disconnected")
            }
            _ => match jetstream_error(e).map(|j| j.error_code()) {
                Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => {
                    PublishFailure::new(FailureKind::Permanent, "too_large", err)
                }
                // Same code as a full stream (10077, a store failure), told apart by the
                // server's words: a stream with `discard_new_per_subject` (nats-server 2.9.2+)
                // refuses only the subjects at their `max_msgs_per_subject`, "maximum messages
                // per subject exceeded", while a full stream says "maximum messages exceeded" or
                // "maximum bytes exceeded". A full subject is an outage of that route only; a full
                // stream is the outage of the one stream this relay publishes to.
                Some(ErrorCode::STREAM_STORE_FAILED) if is_subject_full(e) => {
                    PublishFailure::new(FailureKind::RouteRefused, "subject_full", err)
                }
                Some(code) if BROKER_WIDE.contains(&code) => outage("broker_refused"),
                _ => PublishFailure::new(FailureKind::Retryable, "rejected", err),
            },
        }
    }
}

/// JetStream refusals that concern the stream or the server, never one message: a full stream
/// (`discard new`: "maximum messages/bytes exceeded" is a store failure), storage or memory
/// exhausted, JetStream off or temporarily unavailable, a cluster without a leader, a stream
/// deleted under the relay.
const BROKER_WIDE: &[ErrorCode] = &[
    ErrorCode::STREAM_STORE_FAILED,
    ErrorCode::INSUFFICIENT_RESOURCES,
    ErrorCode::STORAGE_RESOURCES_EXCEEDED,
    ErrorCode::MEMORY_RESOURCES_EXCEEDED,
    ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
    ErrorCode::CLUSTER_NOT_AVAILABLE,
    ErrorCode::CLUSTER_NOT_LEADER,
    ErrorCode::CLUSTER_NO_PEERS,
    // A cluster still forming or re-assigning the stream after a node loss (issue 13): never
    // seen on a publish in the cluster test, where elections answered "no responders" or not at
    // all, but they concern the cluster, not the message.
    ErrorCode::CLUSTER_INCOMPLETE,
    ErrorCode::CLUSTER_NOT_ACTIVE,
    ErrorCode::CLUSTER_NOT_ASSIGNED,
    ErrorCode::RAFT_GENERAL,
    ErrorCode::JETSTREAM_NOT_ENABLED,
    ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
    ErrorCode::STREAM_NOT_FOUND,
    ErrorCode::TEMP_STORAGE_FAILED,
];

/// Whether a store failure is a subject at its per-subject limit (see `classify`).
fn is_subject_full(e: &PublishError) -> bool {
    jetstream_error(e).is_some_and(|j| j.to_string().to_ascii_lowercase().contains("per subject"))
}

/// The server's JetStream error behind a publish error, if the server sent one.
fn jetstream_error(e: &PublishError) -> Option<&jetstream::Error> {
    std::error::Error::source(e)?.downcast_ref::<jetstream::Error>()
}

impl NatsPublisher {
    /// A subject the stream does not capture is this event's problem (its topic or tenant), not
    /// an outage: dead-lettered at once. Checked before sending because the broker's answer, "no
    /// responders", is the same as during a stream leader election, which is an outage.
    pub(crate) fn captured(&self, subject: &str) -> std::result::Result<(), PublishFailure> {
        let subjects = self
            .stream_subjects
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if subjects.is_empty() || subjects.iter().any(|f| subject_matches(f, subject)) {
            return Ok(());
        }
        Err(PublishFailure::new(
            FailureKind::Permanent,
            "no_stream",
            format!(
                "no stream captures subject {subject:?} (stream {} captures {:?}): fix the subject template or the stream's subjects, then replay",
                self.cfg.stream, *subjects
            ),
        ))
    }
}

/// NATS subject matching: `*` matches one token, `>` one or more trailing tokens.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for f in filter.split('.') {
        match (f, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

/// The comma-separated server URLs of `url`, each checked, so that a typo is reported at start-up
/// instead of as an endless reconnect.
fn server_urls(url: &str) -> Result<Vec<async_nats::ServerAddr>> {
    let urls = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>().map_err(|e| {
                OutboxError::Config(format!(
                    "NATS URL {u:?} is not valid ({e}): give nats://host:port, several separated by commas"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if urls.is_empty() {
        return Err(OutboxError::Config(
            "no NATS URL given: give nats://host:port, several separated by commas".into(),
        ));
    }
    Ok(urls)
}

/// Why a stream could not be created: a request the servers can never grant (more replicas than
/// servers, subjects another stream holds) is a configuration error that stops the start; a
/// cluster that cannot answer now is an outage.
fn create_error(cfg: &NatsConfig, e: jetstream::context::CreateStreamError) -> OutboxError {
    let code = match e.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(j) => Some(j.error_code()),
        _ => None,
    };
    match code {
        Some(ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED) | Some(ErrorCode::INSUFFICIENT_RESOURCES) => {
            OutboxError::Config(format!(
                "cannot create stream {} with {} replica(s): {e}; a stream needs as many JetStream \
                 servers in the cluster as replicas: lower the stream replicas setting or add servers",
                cfg.stream,
                cfg.replicas.unwrap_or(1)
            ))
        }
        Some(ErrorCode::STREAM_SUBJECT_OVERLAP) => OutboxError::Config(format!(
            "cannot create stream {}: its subjects {:?} overlap another stream's: {e}; choose other \
             subjects or point the relay at that stream",
            cfg.stream, cfg.subjects
        )),
        _ => OutboxError::Broker(format!("cannot create stream {}: {e}", cfg.stream)),
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

#[async_trait]
impl Publisher for NatsPublisher {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn route_template(&self) -> &str {
        &self.cfg.subject_template
    }

    async fn publish(
        &self,
        batch: &[OutboundMessage],
        deadline: tokio::time::Instant,
    ) -> Vec<Result<Delivery, PublishFailure>> {
        let all = |f: PublishFailure| batch.iter().map(|_| Err(f.clone())).collect::<Vec<_>>();
        if !self.is_connected() {
            return all(PublishFailure::new(
                FailureKind::Unavailable,
                "disconnected",
                "not connected to NATS",
            ));
        }
        if let Err(e) = self.ensure_stream().await {
            // A stream problem is the operator's to fix; the events wait rather than die.
            tracing::error!(error = %e, "JetStream stream not usable");
            return all(PublishFailure::new(
                FailureKind::Unavailable,
                "stream",
                e.to_string(),
            ));
        }
        let template = self.cfg.subject_template.as_str();
        crate::pipeline::run(
            batch,
            template,
            self.cfg.max_in_flight,
            deadline,
            |m| async move {
                let subject = m.render(&self.cfg.subject_template);
                self.captured(&subject)?;
                let msg = PublishMessage::build()
                    .payload(m.payload.clone())
                    .headers(Self::headers_for(m, self.cfg.header_encoding)?);
                let ack = self
                    .js
                    .send_publish(subject, msg)
                    .await
                    .map_err(|e| Self::classify(&self.client, &e))?;
                // A failed acknowledgement is classified when it arrives: the connection state then
                // says whether the broker went away.
                let client = self.client.clone();
                Ok(async move {
                    match ack.await {
                        Ok(a) if a.duplicate => Ok(Delivery::Duplicate),
                        Ok(_) => Ok(Delivery::Stored),
                        Err(e) => Err(Self::classify(&client, &e)),
                    }
                }
                .boxed())
            },
        )
        .await
    }
}

impl NatsPublisher {
    /// The JetStream context and settings, for the atomic batch mode (`nats_batch`), which sends
    /// through the same connection.
    pub(crate) fn parts(&self) -> (&jetstream::Context, &NatsConfig) {
        (&self.js, &self.cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::{server_urls, subject_matches};

    #[test]
    fn several_server_urls_are_split_and_checked() {
        let urls = server_urls("nats://a:4222, nats://b:4223,,nats://c:4224").unwrap();
        assert_eq!(urls.len(), 3);
        assert!(server_urls("").is_err());
        // Why the split: async-nats parses a `&str` as one URL, so a list used to be refused.
        assert!("nats://a:4222,nats://b:4223"
            .parse::<async_nats::ServerAddr>()
            .is_err());
        let e = server_urls("nats://a:4222,nats://b:notaport")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nats://b:notaport") && e.contains("separated by commas"),
            "{e}"
        );
    }

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("outbox.>", "outbox.acme.stock.changed"));
        assert!(!subject_matches("outbox.>", "outbox"));
        assert!(subject_matches("outbox.*.x", "outbox.acme.x"));
        assert!(!subject_matches("outbox.*.x", "outbox.acme.y.x"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("other.>", "outbox.acme.x"));
    }
}
