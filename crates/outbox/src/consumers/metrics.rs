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
/// Counter: parked events applied by a replay.
pub const REPLAYED: &str = "outbox_consumer_replayed_total";
/// Counter: transactions that settled several events at once (a batch; `HANDLED` over this
/// and the single-event transactions is the batching achieved under load).
pub const BATCHES: &str = "outbox_consumer_batches_total";
/// Gauge: messages waiting at the broker for this consumer.
pub const LAG: &str = "outbox_consumer_lag";

/// Every consumer metric name above (alert rules may use these and `crate::telemetry::ALL`).
pub const ALL: &[&str] = &[HANDLED, DUPLICATES, RETRIES, PARKED, REPLAYED, BATCHES, LAG];
