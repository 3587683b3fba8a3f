//! Redis Streams adapter (feature `redis`). Single node: Sentinel and Cluster are not supported
//! (not tested, and the de-duplication script touches keys of several hash slots).
//!
//! - **Streams.** Each event is one `XADD` entry of the stream named by the stream template
//!   (`{tenant}`, `{topic}`, `{event_type}`, `{aggregate_type}`; default
//!   `outbox:{tenant}:{topic}`): the field `envelope` holds the bytes the producer's transaction
//!   wrote, the other fields the metadata that JetStream and RabbitMQ carry as headers
//!   (`Outbox-Event-Id`, `Outbox-Seq`, `Outbox-Producer-Id`, `Outbox-Skip`, ...). With
//!   [`RedisConfig::header_encoding`] compact, those fields are replaced by one, `Outbox-Meta`
//!   ([`crate::meta`]), beside `envelope`, `Outbox-Event-Id` (a stream entry has no message id
//!   of its own: this field is the de-duplication key consumers read) and `traceparent`.
//! - **Discovery.** Streams are created by their first event, one per tenant and topic. The same
//!   script that adds an entry adds its stream's name to the registry set (default
//!   `outbox:streams`), atomically: a consumer reads the set, creates its group on every stream
//!   it lists *from the start* (`XGROUP CREATE ... 0`), and reads it again every few seconds, so a
//!   stream created later, or a group created late, misses no event still in the stream.
//! - **Duplicates.** Redis does not de-duplicate. With `dedup` on (the default) the script first
//!   looks for the key `<dedup_prefix><eventId>`: when it exists the entry was added before and the
//!   script answers "duplicate"; otherwise it adds the entry and sets the key with a time-to-live
//!   of the relay's re-publish horizon. The script runs atomically and writes nothing before the
//!   `XADD` succeeds (a script is not rolled back on an error). Off, duplicates after a relay
//!   crash or an ambiguous time-out reach the stream and consumers drop them (inbox).
//! - **Durability.** An `XADD` acknowledged by a Redis with `appendonly no` (Debian's default), or
//!   with `appendfsync everysec`, is lost by a crash; a `maxmemory-policy` other than `noeviction`
//!   may evict a whole stream. The adapter reads the three settings at start-up and every minute
//!   and refuses to publish unless they are `yes`, `always` and `noeviction`; `allow_loss_window`
//!   publishes anyway and logs the loss window the settings leave.
//! - **Failures.** `OOM`, `MISCONF`, `READONLY`, `LOADING`, `BUSY` (and the other server-wide
//!   refusals in `OUTAGE_CODES`), time-outs and connection loss are outages: no attempt spent.
//!   `WRONGTYPE` (the stream's key holds another type) and other errors are the message's:
//!   retried, then dead-lettered. Redis has no per-key refusal (a capped stream trims, it does
//!   not refuse), so this adapter never reports `RouteRefused`.
//! - **Connection.** A `redis` `ConnectionManager` (one multiplexed connection). On a lost
//!   connection its in-flight commands fail with an I/O error and are not resent by the client
//!   (it reconnects in the background for the next ones); whether the server applied them is
//!   unknown, so they are retried by the relay and the script drops the copy. The shared
//!   pipeline keeps one entry per aggregate in flight, so a lost command cannot be overtaken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use tokio::sync::Mutex;

use crate::error::{OutboxError, Result};
use crate::meta::{self, HeaderEncoding, META_HEADER};
use crate::publisher::{
    Delivery, FailureKind, OutboundMessage, PublishFailure, Publisher, SKIP_HEADER,
};

/// The stream field that holds the envelope bytes; every other field is metadata.
pub const ENVELOPE_FIELD: &str = "envelope";

/// Settings of the Redis Streams adapter.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `redis://:password@host:port`).
    pub url: String,
    /// Stream per event: `{tenant}`, `{topic}`, `{event_type}`, `{aggregate_type}`.
    pub stream_template: String,
    /// The set every stream the relay writes to is added to (consumers discover streams by it).
    pub registry_key: String,
    /// De-duplicate at the broker by `eventId` (see the module doc).
    pub dedup: bool,
    /// Prefix of the de-duplication keys.
    pub dedup_prefix: String,
    /// Publish even when Redis may lose or evict acknowledged entries (logs the loss window).
    pub allow_loss_window: bool,
    /// How long one command may take before it counts as an outage.
    pub command_timeout: Duration,
    /// Most commands outstanding at once.
    pub max_in_flight: usize,
    /// Which fields carry each event's metadata ([`HeaderEncoding`]; default: one per field).
    pub header_encoding: HeaderEncoding,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            stream_template: "outbox:{tenant}:{topic}".into(),
            registry_key: "outbox:streams".into(),
            dedup: true,
            dedup_prefix: "outbox:dedup:".into(),
            allow_loss_window: false,
            command_timeout: Duration::from_secs(5),
            max_in_flight: 1024,
            header_encoding: HeaderEncoding::Full,
        }
    }
}

/// The add script: KEYS = stream, registry set, de-duplication key; ARGV = TTL in ms (0: no
/// de-duplication), then field, value, ... Answers `{1, id}` when added, `{0, first id}` for a
/// duplicate. Nothing is written before `XADD` succeeded: Redis does not roll a script back.
const ADD_SCRIPT: &str = r"
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  local prior = redis.call('GET', KEYS[3])
  if prior then return {0, prior} end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
if ttl > 0 then redis.call('SET', KEYS[3], id, 'PX', ttl) end
redis.call('SADD', KEYS[2], KEYS[1])
return {1, id}
";

/// Server error codes that concern the server, never one message: out of memory under
/// `noeviction`, a failed RDB/AOF write (`MISCONF`), a replica or a demoted primary, a server
/// loading its data set, a script running too long, and the replication / cluster refusals.
const OUTAGE_CODES: &[&str] = &[
    "OOM",
    "MISCONF",
    "READONLY",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
];

/// How often the durability settings are read again.
const RECHECK: Duration = Duration::from_secs(60);

/// Publishes to Redis Streams.
pub struct RedisPublisher {
    inner: Arc<Inner>,
    /// When the durability settings were last found acceptable.
    checked: Mutex<Option<Instant>>,
}

/// What a spawned add needs.
struct Inner {
    conn: ConnectionManager,
    cfg: RedisConfig,
    script: Script,
    /// TTL of a de-duplication key in ms (0: off).
    dedup_ttl_ms: u64,
    connected: AtomicBool,
}

impl RedisPublisher {
    /// Connects (lazily: the relay starts while Redis is down) and, if Redis answers, checks its
    /// durability settings. Fails at once on a configuration error, including settings that can
    /// lose acknowledged entries unless `allow_loss_window` is set. `horizon` is the relay's
    /// re-publish horizon: how long de-duplication keys live.
    pub async fn connect(cfg: RedisConfig, horizon: Duration) -> Result<Self> {
        if !cfg.stream_template.contains("{tenant}") && !cfg.stream_template.contains("{topic}") {
            return Err(OutboxError::Config(format!(
                "stream template {:?} names neither {{tenant}} nor {{topic}}: give e.g. outbox:{{tenant}}:{{topic}}",
                cfg.stream_template
            )));
        }
        if cfg.max_in_flight == 0 {
            return Err(OutboxError::Config(
                "max in-flight commands must be at least 1".into(),
            ));
        }
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| {
            OutboxError::Config(format!(
                "Redis URL {:?} is not valid ({e}): give redis://host:port",
                cfg.url
            ))
        })?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(cfg.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_cfg)
            .map_err(|e| OutboxError::Config(format!("Redis URL {:?}: {e}", cfg.url)))?;
        let me = Self {
            inner: Arc::new(Inner {
                conn,
                script: Script::new(ADD_SCRIPT),
                dedup_ttl_ms: if cfg.dedup {
                    horizon.as_millis().max(1) as u64
                } else {
                    0
                },
                cfg,
                connected: AtomicBool::new(false),
            }),
            checked: Mutex::new(None),
        };
        match me.check_durability().await {
            Err(OutboxError::Broker(e)) => {
                tracing::warn!(url = %me.inner.cfg.url, error = %e, "Redis not reachable yet; events wait in the outbox until it is")
            }
            other => other?,
        }
        Ok(me)
    }

    /// A connection to the same server (tests and benchmarks read the streams with it).
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// Reads `appendonly`, `appendfsync`, `maxmemory-policy` (and `save`, for the message) and
    /// refuses settings that can lose acknowledged entries, unless `allow_loss_window`. At most
    /// once per [`RECHECK`] after a success. `Broker` when Redis does not answer.
    pub async fn check_durability(&self) -> Result<()> {
        let mut checked = self.checked.lock().await;
        if checked.is_some_and(|at| at.elapsed() < RECHECK) {
            return Ok(());
        }
        let inner = &*self.inner;
        let mut conn = inner.conn.clone();
        let get = |name: &'static str| {
            let mut conn = conn.clone();
            async move {
                let v: Vec<String> = tokio::time::timeout(
                    inner.cfg.command_timeout,
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg(name)
                        .query_async(&mut conn),
                )
                .await
                .map_err(|_| OutboxError::Broker("Redis did not answer CONFIG GET".into()))?
                .map_err(|e| config_error(&e))?;
                Ok::<_, OutboxError>(v.get(1).cloned().unwrap_or_default())
            }
        };
        let appendonly = get("appendonly").await;
        inner.connected.store(appendonly.is_ok(), Ordering::Relaxed);
        let appendonly = appendonly?;
        let (fsync, policy, save) = (
            get("appendfsync").await?,
            get("maxmemory-policy").await?,
            get("save").await?,
        );
        let _ = redis::cmd("PING").query_async::<String>(&mut conn).await;
        let problems = durability_problems(&appendonly, &fsync, &policy, &save);
        if !problems.is_empty() {
            let text = problems.join("; ");
            if !inner.cfg.allow_loss_window {
                return Err(OutboxError::Config(format!(
                    "Redis at {} can lose events it acknowledged: {text}. Set `appendonly yes`, \
                     `appendfsync always` and `maxmemory-policy noeviction` (redis.conf or CONFIG SET), \
                     or accept the loss window with --redis-allow-loss-window",
                    inner.cfg.url
                )));
            }
            tracing::warn!(url = %inner.cfg.url, loss_window = %text, "publishing to a Redis that can lose acknowledged events (--redis-allow-loss-window)");
        }
        *checked = Some(Instant::now());
        Ok(())
    }

    /// The fields of an event's entry: [`ENVELOPE_FIELD`] with the envelope bytes, then the
    /// metadata under the header names JetStream and RabbitMQ use (also used by the benchmark's
    /// raw baseline, so that it sends byte-for-byte what the relay sends).
    pub fn fields(m: &OutboundMessage) -> Vec<(&'static str, Vec<u8>)> {
        Self::fields_for(m, HeaderEncoding::Full)
    }

    /// [`RedisPublisher::fields`] in the given encoding: [`HeaderEncoding::Compact`] writes
    /// [`ENVELOPE_FIELD`], `Outbox-Event-Id`, [`META_HEADER`] and `traceparent` (when the event
    /// has one).
    pub fn fields_for(
        m: &OutboundMessage,
        encoding: HeaderEncoding,
    ) -> Vec<(&'static str, Vec<u8>)> {
        let mut f: Vec<(&'static str, Vec<u8>)> = Vec::with_capacity(14);
        f.push((ENVELOPE_FIELD, m.payload.to_vec()));
        let mut put = |k: &'static str, v: &str| f.push((k, v.as_bytes().to_vec()));
        put("Outbox-Event-Id", &m.event_id.to_string());
        if encoding == HeaderEncoding::Compact {
            put(META_HEADER, &meta::encode(m));
            if let Some(tp) = m.header("traceparent") {
                put("traceparent", tp);
            }
            return f;
        }
        put("Outbox-Event-Type", &m.event_type);
        put("Outbox-Tenant-Id", &m.tenant_id);
        put("Outbox-Aggregate-Type", &m.aggregate_type);
        put("Outbox-Aggregate-Id", &m.aggregate_id);
        put("Outbox-Seq", &m.seq.to_string());
        put("Outbox-Seq-Epoch", &m.seq_epoch.to_string());
        if let Some(c) = m.header("correlationId") {
            put("Outbox-Correlation-Id", c);
        }
        if let Some(tp) = m.header("traceparent") {
            put("traceparent", tp);
        }
        if let Some(p) = m.producer_id {
            put("Outbox-Producer-Id", &p.to_string());
        }
        if let Some(skip) = m.header(SKIP_HEADER) {
            put("Outbox-Skip", skip);
        }
        put(
            "Content-Type",
            m.header("contentType").unwrap_or("application/json"),
        );
        f
    }
}

impl Inner {
    /// Adds one event's entry through the script.
    async fn add(&self, m: &OutboundMessage) -> std::result::Result<Delivery, PublishFailure> {
        let stream = m.render(&self.cfg.stream_template);
        let mut inv = self.script.prepare_invoke();
        inv.key(&stream)
            .key(&self.cfg.registry_key)
            .key(format!("{}{}", self.cfg.dedup_prefix, m.event_id))
            .arg(self.dedup_ttl_ms);
        for (k, v) in RedisPublisher::fields_for(m, self.cfg.header_encoding) {
            inv.arg(k).arg(v);
        }
        let mut conn = self.conn.clone();
        let r = tokio::time::timeout(
            self.cfg.command_timeout,
            inv.invoke_async::<(i64, String)>(&mut conn),
        )
        .await;
        let r = match r {
            Err(_) => {
                return Err(PublishFailure::new(
                    FailureKind::Unavailable,
                    "timeout",
                    format!("Redis did not answer within {:?}", self.cfg.command_timeout),
                ))
            }
            Ok(r) => r,
        };
        match r {
            Ok((1, _)) => {
                self.connected.store(true, Ordering::Relaxed);
                Ok(Delivery::Stored)
            }
            Ok(_) => {
                self.connected.store(true, Ordering::Relaxed);
                Ok(Delivery::Duplicate)
            }
            Err(e) => {
                let f = classify(&e);
                if f.reason == "disconnected" {
                    self.connected.store(false, Ordering::Relaxed);
                }
                Err(f)
            }
        }
    }
}

/// What the durability settings leave open, each with its loss window; empty when none.
fn durability_problems(appendonly: &str, fsync: &str, policy: &str, save: &str) -> Vec<String> {
    let mut p = Vec::new();
    if appendonly != "yes" {
        let snapshots = if save.trim().is_empty() {
            "no snapshots are configured either: a crash loses every entry".to_string()
        } else {
            format!("a crash loses every entry since the last RDB snapshot (save {save:?})")
        };
        p.push(format!("appendonly is {appendonly:?}: {snapshots}"));
    } else if fsync != "always" {
        let window = match fsync {
            "everysec" => {
                "about the last second of acknowledged entries (up to 2 s when the disk is slow)"
            }
            _ => "whatever the operating system had not written out (typically up to 30 s)",
        };
        p.push(format!(
            "appendfsync is {fsync:?}: a crash of the machine loses {window}"
        ));
    }
    if policy != "noeviction" {
        p.push(format!(
            "maxmemory-policy is {policy:?}: under memory pressure Redis may evict a whole stream"
        ));
    }
    p
}

/// A failure of the durability check: no answer is an outage, a refused `CONFIG` (renamed or
/// denied to this user) a configuration error.
fn config_error(e: &RedisError) -> OutboxError {
    if is_connection(e)
        || e.code()
            .is_some_and(|c| OUTAGE_CODES.contains(&c) && c != "NOPERM")
    {
        OutboxError::Broker(format!("Redis: {e}"))
    } else {
        OutboxError::Config(format!(
            "cannot read Redis' durability settings with CONFIG GET ({e}): allow CONFIG GET for the \
             relay's user, or run with --redis-allow-loss-window after checking them by hand"
        ))
    }
}

fn is_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
}

/// How a failed add is handled: only what is specific to this message spends its attempts.
pub(crate) fn classify(e: &RedisError) -> PublishFailure {
    let text = e.to_string();
    if is_connection(e) {
        return PublishFailure::new(FailureKind::Unavailable, "disconnected", text);
    }
    let code = e.code().unwrap_or_default();
    if OUTAGE_CODES.contains(&code) || text.contains("max number of clients") {
        return PublishFailure::new(FailureKind::Unavailable, "broker_refused", text);
    }
    PublishFailure::new(FailureKind::Retryable, "rejected", text)
}

#[async_trait]
impl Publisher for RedisPublisher {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    fn route_template(&self) -> &str {
        &self.inner.cfg.stream_template
    }

    async fn publish(
        &self,
        batch: &[OutboundMessage],
        deadline: tokio::time::Instant,
    ) -> Vec<Result<Delivery, PublishFailure>> {
        let all = |f: PublishFailure| batch.iter().map(|_| Err(f.clone())).collect::<Vec<_>>();
        match self.check_durability().await {
            Ok(()) => {}
            Err(OutboxError::Broker(e)) => {
                return all(PublishFailure::new(
                    FailureKind::Unavailable,
                    "disconnected",
                    e,
                ))
            }
            Err(e) => {
                // Settings the operator must fix: the events wait rather than die.
                tracing::error!(error = %e, "Redis refused as a broker");
                return all(PublishFailure::new(
                    FailureKind::Unavailable,
                    "durability",
                    e.to_string(),
                ));
            }
        }
        crate::pipeline::run(
            batch,
            &self.inner.cfg.stream_template,
            self.inner.cfg.max_in_flight,
            deadline,
            |m| {
                // Spawned so that the command is written now, before the lease's deadline the
                // pipeline checked, not when the acknowledgement is first polled.
                let me = self.inner.clone();
                let m = m.clone();
                let task = tokio::spawn(async move { me.add(&m).await });
                async move {
                    Ok(async move {
                        task.await.unwrap_or_else(|e| {
                            Err(PublishFailure::new(
                                FailureKind::Unavailable,
                                "disconnected",
                                format!("Redis publish task failed: {e}"),
                            ))
                        })
                    }
                    .boxed())
                }
            },
        )
        .await
    }
}
