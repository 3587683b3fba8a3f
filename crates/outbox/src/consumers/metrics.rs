//! Metric names of the consumer runtime (documented in `docs/metrics.md`), each labelled with
//! `consumer` (the configured name).

/// Counter: events whose handler committed.
pub const HANDLED: &str = "outbox_consumer_events_handled_total";
/// Counter: deliveries acknowledged without running the handler (already applied).
pub const DUPLICATES: &str = "outbox_consumer_duplicates_skipped_total";
/// Counter: deliveries sent back for later (`reason`: handler, gap, database).
pub const RETRIES: &str = "outbox_consumer_retries_total";
/// Counter: events parked in `outbox_consumer_dead_letter` (`reason`: handler, gap, held,
/// unreadable).
pub const PARKED: &str = "outbox_consumer_parked_total";
/// Counter: producer skip markers (purged events) the position moved over without a handler.
pub const SKIPPED: &str = "outbox_consumer_skipped_total";
/// Counter: parked events applied by a replay.
pub const REPLAYED: &str = "outbox_consumer_replayed_total";
/// Counter: transactions that settled several events at once (a batch; `HANDLED` over this
/// and the single-event transactions is the batching achieved under load).
pub const BATCHES: &str = "outbox_consumer_batches_total";
/// Gauge: messages waiting at the broker for this consumer.
pub const LAG: &str = "outbox_consumer_lag";
/// Gauge: events parked now, read from the consumer's database (`reason`: handler, gap, held,
/// unreadable, late). State, not a counter: it survives restarts and drops when an operator acts.
pub const PARKED_NOW: &str = "outbox_consumer_parked_events";
/// Gauge: aggregates with an event waiting for its predecessor now (sent back to the broker
/// meanwhile), from the consumer's database.
pub const GAP_AGGREGATES: &str = "outbox_consumer_gap_aggregates";
/// Gauge: seconds the oldest of those events has waited (0: none waits).
pub const GAP_OLDEST: &str = "outbox_consumer_gap_oldest_seconds";

/// Every reason a parked event can have (each exported, at 0 when none is parked so).
pub const PARK_REASONS: &[&str] = &["handler", "gap", "held", "unreadable", "late"];

/// Gauge (`consumer`): Redis Streams, the largest group lag (entries not yet delivered) over the
/// streams.
pub const REDIS_MAX_LAG: &str = "outbox_consumer_redis_max_lag";
/// Gauge (`consumer`): Redis Streams, age in seconds of the oldest entry not yet delivered.
pub const REDIS_OLDEST_UNREAD: &str = "outbox_consumer_redis_oldest_unread_seconds";
/// Gauge (`consumer`): Redis Streams, the operator's length cap (0: none declared).
pub const REDIS_CAP_ENTRIES: &str = "outbox_consumer_redis_cap_entries";
/// Gauge (`consumer`): Redis Streams, the operator's age cap in seconds (0: none declared).
pub const REDIS_CAP_SECONDS: &str = "outbox_consumer_redis_cap_seconds";

/// Every consumer metric name above (alert rules may use these and `crate::telemetry::ALL`).
pub const ALL: &[&str] = &[
    HANDLED,
    DUPLICATES,
    RETRIES,
    PARKED,
    SKIPPED,
    REPLAYED,
    BATCHES,
    LAG,
    PARKED_NOW,
    GAP_AGGREGATES,
    GAP_OLDEST,
    REDIS_MAX_LAG,
    REDIS_OLDEST_UNREAD,
    REDIS_CAP_ENTRIES,
    REDIS_CAP_SECONDS,
];

/// Reasons a delivery is sent back for later ([`RETRIES`]).
pub const RETRY_REASONS: &[&str] = &["handler", "gap", "database"];

/// Exports every counter of the consumer `consumer` with every label value at zero when it starts
/// running, so that the first scrape already has every series (a series that appears with its
/// first increment makes `rate()` miss that increment). The gauges are not: they are state read
/// from the database and the broker, and a 0 before the first read would be a claim nobody made.
/// Registering again is harmless (adds 0).
pub fn register_zeros(consumer: &str) {
    use metrics::counter;
    let c = consumer.to_string();
    for name in [HANDLED, DUPLICATES, SKIPPED, REPLAYED, BATCHES] {
        counter!(name, "consumer" => c.clone()).increment(0);
    }
    for reason in RETRY_REASONS {
        counter!(RETRIES, "consumer" => c.clone(), "reason" => *reason).increment(0);
    }
    for reason in PARK_REASONS {
        counter!(PARKED, "consumer" => c.clone(), "reason" => *reason).increment(0);
    }
}
