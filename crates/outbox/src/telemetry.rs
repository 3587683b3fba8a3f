//! Metric names (documented in `docs/metrics.md`). The library records through the `metrics`
//! facade; the binary chooses the exporter. Label values are fixed sets, never ids.

/// Counter: events the broker acknowledged (`broker`).
pub const PUBLISHED: &str = "outbox_events_published_total";
/// Counter: acknowledgements that reported a duplicate (`broker`).
pub const DUPLICATES: &str = "outbox_events_duplicate_total";
/// Counter: events scheduled for another attempt (`reason`).
pub const RETRIED: &str = "outbox_events_retried_total";
/// Counter: events dead-lettered (`reason`).
pub const DEAD_LETTERED: &str = "outbox_events_dead_lettered_total";
/// Counter: failed publishes of any kind (`kind`: unavailable, retryable, permanent; `reason`).
pub const FAILED: &str = "outbox_publish_failures_total";
/// Counter: published rows removed by retention.
pub const CLEANED: &str = "outbox_events_cleaned_total";
/// Counter: idle aggregates whose sequence row was compacted away (`outbox_aggregate`).
pub const AGGREGATES_COMPACTED: &str = "outbox_aggregates_compacted_total";
/// Gauge: pending events.
pub const PENDING: &str = "outbox_pending_events";
/// Gauge: age in seconds of the oldest pending event.
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
/// Gauge: partitions this relay holds.
pub const PARTITIONS_OWNED: &str = "outbox_relay_partitions_owned";
/// Gauge: 1 when the broker connection is up (sampled every 2 s, and after each publish).
pub const BROKER_UP: &str = "outbox_broker_up";
/// Gauge: 1 when the last database operation succeeded.
pub const DATABASE_UP: &str = "outbox_database_up";
/// Gauge: seconds since the relay's loop last made progress (settled a batch or found no work).
pub const SINCE_PROGRESS: &str = "outbox_relay_seconds_since_progress";
/// Gauge: 1 when work has been pending and nothing settled for longer than the stall timeout.
pub const STALLED: &str = "outbox_relay_stalled";
/// Gauge: routes (routing keys / subjects) this relay holds back because the broker refused them
/// (a full `reject-publish` queue, a subject at its limit). No route label: routes carry tenants.
pub const ROUTES_REFUSED: &str = "outbox_refused_routes";
/// Gauge: age in seconds of the oldest event held back by a refused route (0 when none).
pub const OLDEST_ROUTE_HELD_AGE: &str = "outbox_oldest_route_held_age_seconds";
/// Histogram: seconds to publish one batch and receive its acknowledgements.
pub const PUBLISH_SECONDS: &str = "outbox_publish_duration_seconds";
/// Histogram: events per claimed batch.
pub const BATCH_SIZE: &str = "outbox_batch_size";
/// Histogram: seconds from an event's commit to the broker's acknowledgement.
pub const COMMIT_TO_ACK: &str = "outbox_commit_to_ack_seconds";

/// Every metric name above (alert rules may use only these).
pub const ALL: &[&str] = &[
    PUBLISHED,
    DUPLICATES,
    RETRIED,
    DEAD_LETTERED,
    FAILED,
    CLEANED,
    AGGREGATES_COMPACTED,
    PENDING,
    OLDEST_PENDING_AGE,
    PARTITIONS_OWNED,
    BROKER_UP,
    DATABASE_UP,
    SINCE_PROGRESS,
    STALLED,
    ROUTES_REFUSED,
    OLDEST_ROUTE_HELD_AGE,
    PUBLISH_SECONDS,
    BATCH_SIZE,
    COMMIT_TO_ACK,
];

/// Registers descriptions for every metric (shown as `# HELP` by the Prometheus exporter).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(PUBLISHED, "Events acknowledged by the broker");
    describe_counter!(
        DUPLICATES,
        "Acknowledgements that reported a duplicate message id"
    );
    describe_counter!(
        RETRIED,
        "Events scheduled for a retry after a failed publish"
    );
    describe_counter!(DEAD_LETTERED, "Events moved to the dead letters");
    describe_counter!(FAILED, "Failed publishes, by kind and reason");
    describe_counter!(CLEANED, "Published events removed by retention");
    describe_counter!(
        AGGREGATES_COMPACTED,
        "Sequence rows of idle aggregates removed (their next event starts a new seq_epoch)"
    );
    describe_gauge!(PENDING, "Events waiting for delivery");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "Age of the oldest pending event"
    );
    describe_gauge!(PARTITIONS_OWNED, "Partitions leased by this relay");
    describe_gauge!(BROKER_UP, "1 when the broker connection is up");
    describe_gauge!(DATABASE_UP, "1 when the database answered the last query");
    describe_gauge!(
        SINCE_PROGRESS,
        Unit::Seconds,
        "Time since the relay loop last settled a batch or found nothing to do"
    );
    describe_gauge!(
        STALLED,
        "1 when work is pending and nothing was settled for longer than the stall timeout"
    );
    describe_routes();
    describe_histogram!(
        PUBLISH_SECONDS,
        Unit::Seconds,
        "Time to publish a batch and receive its acknowledgements"
    );
    describe_histogram!(BATCH_SIZE, "Events per claimed batch");
    describe_histogram!(
        COMMIT_TO_ACK,
        Unit::Seconds,
        "Time from an event's commit to its broker acknowledgement"
    );
}

/// The refused-route gauges (issue 19); the relay sets them to zero when it starts.
fn describe_routes() {
    use metrics::{describe_gauge, Unit};
    describe_gauge!(
        ROUTES_REFUSED,
        "Routes (routing keys / subjects) held back because the broker refused them"
    );
    describe_gauge!(
        OLDEST_ROUTE_HELD_AGE,
        Unit::Seconds,
        "Age of the oldest event held back by a refused route"
    );
}
