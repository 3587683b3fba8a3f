//! Redis Streams source (feature `redis`): one consumer group over every stream the relay
//! registered, single node.
//!
//! - **Discovery.** The relay adds each stream's name to the registry set atomically with its
//!   first entry ([`crate::publishers::redis`]). The source reads the set at start and every
//!   `discover_every`, and creates its group on each new stream from the start
//!   (`XGROUP CREATE <stream> <group> 0 MKSTREAM`), so a late group or a late stream misses no
//!   entry still in the stream.
//! - **Reading.** A background task reads with `XREADGROUP` on a connection of its own (a
//!   blocking read would hold a multiplexed connection's other commands), first this consumer's
//!   own pending entries (from `0`: what a previous run of the same consumer name read and did
//!   not acknowledge), each read going on after the last entry the previous one returned, then
//!   new ones (`>`), and hands them over through a channel, which keeps
//!   [`EventSource::next`] cancel-safe.
//! - **Dead consumers.** Every `claim_idle / 2` the task takes over entries idle longer than
//!   `claim_idle` in the group (`XAUTOCLAIM`): those of a consumer that died, or was renamed.
//!   Entries this process holds (handled, or waiting for a retry) are kept from that by
//!   claiming them again without delivery (`XCLAIM ... JUSTID`), the analogue of JetStream's
//!   progress acknowledgements, every `claim_idle / 3`.
//! - **Settling.** `ack` is `XACK`. A retry is a local redelivery after the delay (the entry
//!   stays pending in the group meanwhile: a crash leaves it to `XAUTOCLAIM`).
//! - **Lag against the cap.** A length or age cap is the operator's (`XTRIM`, `XADD MAXLEN` /
//!   `MINID` by another writer): once a group's lag reaches it, trimming removes entries the
//!   group never read. `lag` reads `XINFO GROUPS` per stream and exports the largest group lag
//!   over the streams and the age of the oldest entry not yet delivered, next to the caps the
//!   operator declares (`cap_entries`, `cap_age`); the alerts `OutboxRedisLagNearLengthCap` and
//!   `OutboxRedisLagNearAgeCap` compare them. No per-stream label: stream names carry tenants.
//!   A lag Redis cannot tell (nil: entries deleted or trimmed past the group) counts as the
//!   whole stream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::Value;
use tokio::sync::mpsc;

use super::event::InboundEvent;
use super::source::{Acknowledger, EventSource, Received};
use crate::error::{OutboxError, Result};
use crate::publishers::redis::ENVELOPE_FIELD;

use super::metrics::{REDIS_CAP_ENTRIES, REDIS_CAP_SECONDS, REDIS_MAX_LAG, REDIS_OLDEST_UNREAD};

/// Where a Redis source reads.
#[derive(Debug, Clone)]
pub struct RedisSourceConfig {
    /// `redis://host:port`.
    pub url: String,
    /// The registry set of stream names the relay writes (its `--redis-registry-key`).
    pub registry_key: String,
    /// Consumer group (one per consuming service).
    pub group: String,
    /// Consumer name within the group: stable across restarts of one instance, so that a
    /// restarted instance reads its own pending entries first.
    pub consumer: String,
    /// Entries read per `XREADGROUP` and held in the hand-over channel.
    pub batch: usize,
    /// How long one `XREADGROUP` blocks waiting for entries.
    pub block: Duration,
    /// Idle time after which another consumer's pending entry is taken over.
    pub claim_idle: Duration,
    /// How often the registry set is read for new streams.
    pub discover_every: Duration,
    /// The length cap (`MAXLEN`) the operator trims the streams to, for the lag gauges.
    pub cap_entries: Option<u64>,
    /// The age cap (`MINID`) the operator trims the streams to, for the lag gauges.
    pub cap_age: Option<Duration>,
}

impl Default for RedisSourceConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            registry_key: "outbox:streams".into(),
            group: "read-model".into(),
            consumer: "read-model-1".into(),
            batch: 256,
            block: Duration::from_millis(500),
            claim_idle: Duration::from_secs(30),
            discover_every: Duration::from_secs(2),
            cap_entries: None,
            cap_age: None,
        }
    }
}

/// Entries handed out and not settled yet: `(stream, id)`.
type Held = Arc<Mutex<HashSet<(String, String)>>>;

/// Redis Streams as an [`EventSource`].
pub struct RedisSource {
    rx: mpsc::Receiver<Received>,
    conn: ConnectionManager,
    group: String,
    caps: (Option<u64>, Option<Duration>),
    streams: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RedisSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn broker(what: &str, e: impl std::fmt::Display) -> OutboxError {
    OutboxError::Broker(format!("Redis: {what}: {e}"))
}

fn manager(url: &str, response: Duration) -> Result<(redis::Client, ConnectionManagerConfig)> {
    let client = redis::Client::open(url).map_err(|e| {
        OutboxError::Config(format!(
            "Redis URL {url:?} is not valid ({e}): give redis://host:port"
        ))
    })?;
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    Ok((client, cfg))
}

impl RedisSource {
    /// Connects, creates the group on every registered stream and starts reading.
    pub async fn connect(cfg: RedisSourceConfig) -> Result<Self> {
        let (client, mcfg) = manager(&cfg.url, Duration::from_secs(5))?;
        let conn = ConnectionManager::new_with_config(client, mcfg)
            .await
            .map_err(|e| broker("cannot connect (check the URL and that Redis runs)", e))?;
        let (client, mcfg) = manager(&cfg.url, cfg.block + Duration::from_secs(5))?;
        let reader = ConnectionManager::new_with_config(client, mcfg)
            .await
            .map_err(|e| broker("cannot connect", e))?;
        let (tx, rx) = mpsc::channel(cfg.batch.max(1));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let mut task = Reader {
            cfg: cfg.clone(),
            conn: conn.clone(),
            reader,
            tx,
            held: Arc::new(Mutex::new(HashSet::new())),
            streams: streams.clone(),
            cursors: HashMap::new(),
        };
        task.discover().await?;
        let task = tokio::spawn(task.run());
        Ok(Self {
            rx,
            conn,
            group: cfg.group,
            caps: (cfg.cap_entries, cfg.cap_age),
            streams,
            task,
        })
    }

    /// The streams this source reads, as of its last discovery.
    pub fn streams(&self) -> Vec<String> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The background reader.
struct Reader {
    cfg: RedisSourceConfig,
    conn: ConnectionManager,
    reader: ConnectionManager,
    tx: mpsc::Sender<Received>,
    held: Held,
    streams: Arc<Mutex<Vec<String>>>,
    /// Per stream, while this consumer's own pending entries are being read the id after which
    /// the next read goes on (from `0`), then `>`.
    cursors: HashMap<String, String>,
}

impl Reader {
    /// Reads the registry and creates the group on streams not seen before, from the start.
    async fn discover(&mut self) -> Result<()> {
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&self.cfg.registry_key)
            .query_async(&mut self.conn)
            .await
            .map_err(|e| broker("reading the stream registry", e))?;
        for s in names {
            if self.cursors.contains_key(&s) {
                continue;
            }
            let r: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&s)
                .arg(&self.cfg.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn)
                .await;
            match r {
                Ok(()) => {
                    tracing::info!(stream = %s, group = %self.cfg.group, "created consumer group from the stream's start")
                }
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(broker(&format!("creating group on {s}"), e)),
            }
            self.cursors.insert(s, "0".into());
        }
        let mut names: Vec<String> = self.cursors.keys().cloned().collect();
        names.sort();
        *self.streams.lock().unwrap_or_else(|p| p.into_inner()) = names;
        Ok(())
    }

    async fn run(mut self) {
        let mut discovered = Instant::now();
        let mut claimed = Instant::now();
        let mut refreshed = Instant::now();
        loop {
            if self.tx.is_closed() {
                return;
            }
            let step = async {
                if discovered.elapsed() >= self.cfg.discover_every {
                    self.discover().await?;
                    discovered = Instant::now();
                }
                if refreshed.elapsed() >= self.cfg.claim_idle / 3 {
                    self.keep_held().await?;
                    refreshed = Instant::now();
                }
                if claimed.elapsed() >= self.cfg.claim_idle / 2 {
                    self.autoclaim().await?;
                    claimed = Instant::now();
                }
                self.read().await
            };
            if let Err(e) = step.await {
                tracing::warn!(error = %e, "Redis consumer: retrying in 1 s");
                if e.to_string().contains("NOGROUP") {
                    // A stream (and its group) deleted under us: create the group again.
                    self.cursors.clear();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    async fn read(&mut self) -> Result<()> {
        if self.cursors.is_empty() {
            tokio::time::sleep(self.cfg.block).await;
            return Ok(());
        }
        let (names, ids): (Vec<String>, Vec<String>) = self
            .cursors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .unzip();
        let history = ids.iter().any(|i| i != ">");
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.cfg.group)
            .arg(&self.cfg.consumer)
            .arg("COUNT")
            .arg(self.cfg.batch.max(1));
        if !history {
            cmd.arg("BLOCK").arg(self.cfg.block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&names).arg(&ids);
        let reply: Option<StreamReadReply> = cmd
            .query_async(&mut self.reader)
            .await
            .map_err(|e| broker("XREADGROUP", e))?;
        let reply = reply.unwrap_or_default();
        let mut last: HashMap<String, String> = HashMap::new();
        let mut entries = Vec::new();
        for key in reply.keys {
            if let Some(e) = key.ids.last() {
                last.insert(key.key.clone(), e.id.clone());
            }
            entries.extend(key.ids.into_iter().map(|e| (key.key.clone(), e)));
        }
        // In entry-id (time) order across the streams, not stream after stream: an aggregate's
        // events that went to several streams (one per topic) were added one after the other,
        // so this hands them over nearly in order, instead of making each wait (a gap retry)
        // for its predecessor in a stream handed over later.
        entries.sort_by_cached_key(|(_, e)| entry_time(&e.id));
        for (stream, entry) in entries {
            self.deliver(&stream, entry).await;
        }
        if history {
            // A history read goes on after the last pending entry it returned (reading from
            // `0` again would return the same entries over and over, all held, and never let
            // the stream's new entries through while any of them waits); a stream with no
            // pending entry left switches to new entries.
            for (name, id) in self.cursors.iter_mut() {
                if id != ">" {
                    *id = last.remove(name).unwrap_or_else(|| ">".into());
                }
            }
        }
        Ok(())
    }

    /// Hands an entry to the runtime unless this process already holds it.
    async fn deliver(&mut self, stream: &str, entry: StreamId) {
        let key = (stream.to_string(), entry.id.clone());
        if !self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key)
        {
            return;
        }
        let received = received(
            stream.to_string(),
            entry,
            self.conn.clone(),
            self.cfg.group.clone(),
            self.held.clone(),
            self.tx.clone(),
        );
        let _ = self.tx.send(received).await;
    }

    /// Takes over the group's entries idle longer than `claim_idle` (a dead consumer's).
    async fn autoclaim(&mut self) -> Result<()> {
        let names: Vec<String> = self.cursors.keys().cloned().collect();
        for s in names {
            let mut start = "0-0".to_string();
            loop {
                let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(&s)
                    .arg(&self.cfg.group)
                    .arg(&self.cfg.consumer)
                    .arg(self.cfg.claim_idle.as_millis() as u64)
                    .arg(&start)
                    .arg("COUNT")
                    .arg(self.cfg.batch.max(1))
                    .query_async(&mut self.conn)
                    .await
                    .map_err(|e| broker("XAUTOCLAIM", e))?;
                if !reply.deleted_ids.is_empty() {
                    tracing::error!(stream = %s, entries = ?reply.deleted_ids, "pending entries were trimmed or deleted from the stream before they were handled: raise the stream's cap");
                    let _: redis::RedisResult<i64> = redis::cmd("XACK")
                        .arg(&s)
                        .arg(&self.cfg.group)
                        .arg(&reply.deleted_ids)
                        .query_async(&mut self.conn)
                        .await;
                }
                for entry in reply.claimed {
                    self.deliver(&s, entry).await;
                }
                if reply.next_stream_id == "0-0" || reply.next_stream_id.is_empty() {
                    break;
                }
                start = reply.next_stream_id;
            }
        }
        Ok(())
    }

    /// Resets the idle time of the entries this process holds, so that no other consumer
    /// takes them over while they are being handled or wait for a retry.
    async fn keep_held(&mut self) -> Result<()> {
        let mut by_stream: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (s, id) in self.held.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            by_stream.entry(s.clone()).or_default().push(id.clone());
        }
        for (s, ids) in by_stream {
            for chunk in ids.chunks(500) {
                let _: Vec<String> = redis::cmd("XCLAIM")
                    .arg(&s)
                    .arg(&self.cfg.group)
                    .arg(&self.cfg.consumer)
                    .arg(0)
                    .arg(chunk)
                    .arg("JUSTID")
                    .query_async(&mut self.conn)
                    .await
                    .map_err(|e| broker("XCLAIM", e))?;
            }
        }
        Ok(())
    }
}

/// An entry id (`<ms>-<n>`) as numbers, for ordering entries of several streams.
fn entry_time(id: &str) -> (u64, u64) {
    let (ms, n) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(u64::MAX), n.parse().unwrap_or(0))
}

/// A stream entry as an event: the [`ENVELOPE_FIELD`] is the body, the other fields headers.
fn received(
    stream: String,
    entry: StreamId,
    conn: ConnectionManager,
    group: String,
    held: Held,
    tx: mpsc::Sender<Received>,
) -> Received {
    let mut headers = BTreeMap::new();
    let mut payload = bytes::Bytes::new();
    for (k, v) in &entry.map {
        let bytes = match v {
            Value::BulkString(b) => b.clone(),
            Value::SimpleString(s) => s.clone().into_bytes(),
            Value::Int(n) => n.to_string().into_bytes(),
            _ => continue,
        };
        if k == ENVELOPE_FIELD {
            payload = bytes::Bytes::from(bytes);
        } else {
            headers.insert(k.clone(), String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    let (event, unreadable) = InboundEvent::read(stream.clone(), headers, None, payload);
    Received {
        event,
        unreadable,
        acker: Box::new(RedisAck {
            stream,
            entry,
            conn,
            group,
            held,
            tx,
        }),
    }
}

struct RedisAck {
    stream: String,
    entry: StreamId,
    conn: ConnectionManager,
    group: String,
    held: Held,
    tx: mpsc::Sender<Received>,
}

#[async_trait]
impl Acknowledger for RedisAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<i64> = redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.entry.id)
            .query_async(&mut conn)
            .await;
        // Released either way: an entry whose XACK failed stays pending and comes back through
        // XAUTOCLAIM, and the inbox knows it was applied.
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.stream.clone(), self.entry.id.clone()));
        r.map(|_| ()).map_err(|e| broker("XACK", e))
    }

    async fn retry_after(self: Box<Self>, delay: Duration) -> Result<()> {
        // The worker must not wait out the delay (it would hold back other aggregates).
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let me = *self;
            let tx = me.tx.clone();
            let again = received(me.stream, me.entry, me.conn, me.group, me.held, me.tx);
            let _ = tx.send(again).await;
        });
        Ok(())
    }
}

#[async_trait]
impl EventSource for RedisSource {
    fn broker(&self) -> &'static str {
        "redis"
    }

    async fn next(&mut self) -> Result<Option<Received>> {
        Ok(self.rx.recv().await)
    }

    async fn lag(&mut self) -> Option<u64> {
        let (mut total, mut max_lag, mut oldest_ms) = (0u64, 0u64, None::<u64>);
        for s in self.streams() {
            let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&s)
                .query_async(&mut self.conn)
                .await
                .ok()?;
            let Some(g) = groups
                .into_iter()
                .find(|g| g.get("name").and_then(text).as_deref() == Some(self.group.as_str()))
            else {
                continue;
            };
            let lag = match g
                .get("lag")
                .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
            {
                Some(lag) => lag,
                // Redis cannot tell (entries deleted or trimmed past the group's position):
                // count the whole stream, so that the near-cap alert fires.
                None => redis::cmd("XLEN")
                    .arg(&s)
                    .query_async(&mut self.conn)
                    .await
                    .ok()?,
            };
            if lag > 0 {
                let last = g
                    .get("last-delivered-id")
                    .and_then(text)
                    .unwrap_or_else(|| "0-0".into());
                let next: Vec<(String, Value)> = redis::cmd("XRANGE")
                    .arg(&s)
                    .arg(format!("({last}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut self.conn)
                    .await
                    .unwrap_or_default();
                if let Some(ms) = next
                    .first()
                    .and_then(|(id, _)| id.split('-').next()?.parse::<u64>().ok())
                {
                    oldest_ms = Some(oldest_ms.map_or(ms, |o| o.min(ms)));
                }
            }
            max_lag = max_lag.max(lag);
            total += lag;
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let oldest = oldest_ms.map_or(0.0, |ms| now_ms.saturating_sub(ms) as f64 / 1000.0);
        let c = self.group.clone();
        metrics::gauge!(REDIS_MAX_LAG, "consumer" => c.clone()).set(max_lag as f64);
        metrics::gauge!(REDIS_OLDEST_UNREAD, "consumer" => c.clone()).set(oldest);
        metrics::gauge!(REDIS_CAP_ENTRIES, "consumer" => c.clone())
            .set(self.caps.0.unwrap_or(0) as f64);
        metrics::gauge!(REDIS_CAP_SECONDS, "consumer" => c)
            .set(self.caps.1.map_or(0.0, |d| d.as_secs_f64()));
        Some(total)
    }
}

/// A reply value as text, if it is one.
fn text(v: &Value) -> Option<String> {
    redis::from_redis_value_ref::<String>(v).ok()
}
