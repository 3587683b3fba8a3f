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
/// Counter: RabbitMQ returned a `mandatory` message no queue took (`exchange`). Named here so
/// that its zero can be exported with the others; recorded by the RabbitMQ adapter.
pub const UNROUTABLE: &str = "outbox_events_unroutable_total";
/// Counter: published rows removed by retention.
pub const CLEANED: &str = "outbox_events_cleaned_total";
/// Counter: idle aggregates whose sequence row was compacted away (`outbox_aggregate`).
pub const AGGREGATES_COMPACTED: &str = "outbox_aggregates_compacted_total";
/// Gauge: pending events.
pub const PENDING: &str = "outbox_pending_events";
/// Gauge: events held behind a blocking dead letter of their aggregate (`held`).
pub const HELD: &str = "outbox_held_events";
/// Gauge: held events with no blocking dead letter ahead of them in their aggregate: nothing will
/// release them (an orphan; migration `20261207000001_held_orphans.sql` prevents the known way).
pub const HELD_ORPHANED: &str = "outbox_held_orphaned_events";
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
/// Histogram: seconds one claim took (every claim, those that find nothing too). Rising while
/// the backlog stays small means the claim steps over published rows autovacuum has not yet
/// removed (docs/outbox-table.md, "Vacuum").
pub const CLAIM_SECONDS: &str = "outbox_claim_duration_seconds";
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
    UNROUTABLE,
    CLEANED,
    AGGREGATES_COMPACTED,
    PENDING,
    HELD,
    HELD_ORPHANED,
    OLDEST_PENDING_AGE,
    PARTITIONS_OWNED,
    BROKER_UP,
    DATABASE_UP,
    SINCE_PROGRESS,
    STALLED,
    ROUTES_REFUSED,
    OLDEST_ROUTE_HELD_AGE,
    PUBLISH_SECONDS,
    CLAIM_SECONDS,
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
    describe_counter!(
        UNROUTABLE,
        "Messages RabbitMQ returned because no queue took them (mandatory)"
    );
    describe_counter!(CLEANED, "Published events removed by retention");
    describe_counter!(
        AGGREGATES_COMPACTED,
        "Sequence rows of idle aggregates removed (their next event starts a new seq_epoch)"
    );
    describe_gauge!(PENDING, "Events waiting for delivery");
    describe_gauge!(
        HELD,
        "Events held behind a blocking dead letter of their aggregate"
    );
    describe_gauge!(
        HELD_ORPHANED,
        "Held events with no blocking dead letter ahead of them (nothing will release them)"
    );
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
    describe_histogram!(
        CLAIM_SECONDS,
        Unit::Seconds,
        "Time one claim of pending events took"
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

/// The `reason` values a broker's failures carry, by `kind` (label values of [`FAILED`],
/// [`RETRIED`] and [`DEAD_LETTERED`]). Kept next to the names so that every value is exported at
/// zero from the start ([`register_relay_zeros`]); a unit test below checks them against the
/// publishers' code.
#[derive(Debug, Clone, Copy)]
pub struct FailureReasons {
    /// `kind="unavailable"`: outages, no attempt spent.
    pub unavailable: &'static [&'static str],
    /// `kind="retryable"`: this message, retried.
    pub retryable: &'static [&'static str],
    /// `kind="permanent"`: this message, dead-lettered at once.
    pub permanent: &'static [&'static str],
    /// `kind="route_refused"`: one route (routing key, subject) refused; only it is held back.
    pub route_refused: &'static [&'static str],
}

/// Reasons of the NATS JetStream adapter and of the pipeline shared by both adapters.
pub const NATS_REASONS: FailureReasons = FailureReasons {
    unavailable: &[
        "disconnected",
        "timeout",
        "no_responders",
        "broker_refused",
        "stream",
    ],
    retryable: &["rejected", "held_back"],
    permanent: &["too_large", "no_stream", "bad_header"],
    route_refused: &["subject_full"],
};

/// Reasons of the RabbitMQ adapter and of the pipeline shared by both adapters.
pub const RABBITMQ_REASONS: FailureReasons = FailureReasons {
    unavailable: &[
        "disconnected",
        "timeout",
        "send_timeout",
        "blocked",
        "exchange",
    ],
    retryable: &["unroutable", "held_back"],
    permanent: &["too_large", "bad_routing_key"],
    route_refused: &["nack"],
};

/// Reasons of the Redis Streams adapter and of the pipeline shared by the adapters. Redis has
/// no per-key refusal, so no route is ever refused.
pub const REDIS_REASONS: FailureReasons = FailureReasons {
    unavailable: &["disconnected", "timeout", "broker_refused", "durability"],
    retryable: &["rejected", "held_back"],
    permanent: &["too_large"],
    route_refused: &[],
};

/// Reasons of the Kafka adapter and of the pipeline shared by the adapters.
pub const KAFKA_REASONS: FailureReasons = FailureReasons {
    unavailable: &[
        "disconnected",
        "timeout",
        "not_enough_replicas",
        "leader_change",
        "unknown_topic",
        "queue_full",
        "broker_refused",
        "fatal",
        "topic",
        "unconfirmed",
    ],
    retryable: &["rejected", "held_back"],
    permanent: &["too_large", "rejected"],
    route_refused: &[],
};

/// Reasons of a broker this module does not know (a test adapter): the pipeline's own.
const OTHER_REASONS: FailureReasons = FailureReasons {
    unavailable: &["disconnected"],
    retryable: &["held_back"],
    permanent: &["too_large"],
    route_refused: &[],
};

/// `kind="lease_expired"` always carries this reason.
pub const LEASE_REASON: &str = "lease";
/// Dead-letter reasons that are no publish failure: the retry budget spent, and a row the relay
/// cannot read (written past the table contract).
pub const DEAD_LETTER_EXTRA_REASONS: &[&str] = &["retries_exhausted", "undeliverable_row"];

/// The reasons of the broker named `broker` (a [`crate::Publisher::name`]).
pub fn failure_reasons(broker: &str) -> FailureReasons {
    match broker {
        "nats" => NATS_REASONS,
        "rabbitmq" => RABBITMQ_REASONS,
        "redis" => REDIS_REASONS,
        "kafka" => KAFKA_REASONS,
        _ => OTHER_REASONS,
    }
}

/// Exports every counter and histogram of the relay with every label value it can take, at zero,
/// through the recorder in force (so a several-databases relay thread adds its `database`
/// label), so that the first scrape already has every series: a series that appears only with
/// its first increment makes `rate()` and `increase()` miss that increment, and an alert on it
/// cannot tell "none" from "not exported" (Prometheus' instrumentation advice). `broker` is the
/// adapter in use (its `broker` label value: a relay never publishes to the other one);
/// `amqp_exchange` the RabbitMQ exchange (`outbox_events_unroutable_total{exchange}`), when the
/// caller knows it. Registering again is harmless (adds 0).
pub fn register_relay_zeros(broker: &str, amqp_exchange: Option<&str>) {
    use metrics::{counter, histogram};
    let broker = broker.to_string();
    counter!(PUBLISHED, "broker" => broker.clone()).increment(0);
    counter!(DUPLICATES, "broker" => broker.clone()).increment(0);
    let reasons = failure_reasons(&broker);
    for (kind, list) in [
        ("unavailable", reasons.unavailable),
        ("retryable", reasons.retryable),
        ("permanent", reasons.permanent),
        ("route_refused", reasons.route_refused),
        ("lease_expired", &[LEASE_REASON][..]),
    ] {
        for reason in list {
            counter!(FAILED, "kind" => kind, "reason" => *reason).increment(0);
        }
    }
    for reason in reasons.retryable {
        counter!(RETRIED, "reason" => *reason).increment(0);
    }
    for reason in reasons.permanent.iter().chain(DEAD_LETTER_EXTRA_REASONS) {
        counter!(DEAD_LETTERED, "reason" => *reason).increment(0);
    }
    counter!(CLEANED).increment(0);
    counter!(AGGREGATES_COMPACTED).increment(0);
    if let Some(exchange) = amqp_exchange {
        counter!(UNROUTABLE, "exchange" => exchange.to_string()).increment(0);
    }
    // Registered without a sample: the exporter renders every bucket, `_sum` and `_count` at 0.
    let _ = histogram!(PUBLISH_SECONDS);
    let _ = histogram!(CLAIM_SECONDS);
    let _ = histogram!(BATCH_SIZE);
    let _ = histogram!(COMMIT_TO_ACK);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(kind, reason)` pairs written in a publisher's source: `FailureKind::X, "reason"` and
    /// the adapters' `outage("reason"...)` helpers (always `Unavailable`).
    fn reasons_in(src: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let literal_after = |rest: &str| -> Option<String> {
            let rest = rest.trim_start_matches([',', ' ', '\n', '\t', '\r']);
            let rest = rest.strip_prefix('"')?;
            Some(rest[..rest.find('"')?].to_string())
        };
        for (i, _) in src.match_indices("FailureKind::") {
            let rest = &src[i + "FailureKind::".len()..];
            let kind: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
            if let Some(reason) = literal_after(&rest[kind.len()..]) {
                out.push((kind, reason));
            }
        }
        for (i, _) in src.match_indices("outage(") {
            if let Some(reason) = literal_after(&src[i + "outage(".len()..]) {
                out.push(("Unavailable".into(), reason));
            }
        }
        out
    }

    fn check(broker: &str, sources: &[&str]) {
        let r = failure_reasons(broker);
        for src in sources {
            for (kind, reason) in reasons_in(src) {
                let list = match kind.as_str() {
                    "Unavailable" => r.unavailable,
                    "Retryable" => r.retryable,
                    "Permanent" => r.permanent,
                    "RouteRefused" => r.route_refused,
                    "LeaseExpired" => &[LEASE_REASON][..],
                    other => panic!("unknown failure kind {other}"),
                };
                assert!(
                    list.contains(&reason.as_str()),
                    "{broker}: reason {reason:?} of kind {kind} is not in telemetry::failure_reasons \
                     (add it there and to docs/metrics.md, so that it is exported at zero)"
                );
            }
        }
    }

    #[test]
    fn every_reason_the_publishers_use_is_exported_at_zero() {
        let pipeline = include_str!("publishers/pipeline.rs");
        let nats = include_str!("publishers/nats.rs");
        let amqp = include_str!("publishers/amqp.rs");
        assert!(reasons_in(nats).len() >= 5 && reasons_in(amqp).len() >= 5);
        check("nats", &[nats, pipeline]);
        check("rabbitmq", &[amqp, pipeline]);
        let redis = include_str!("publishers/redis.rs");
        assert!(reasons_in(redis).len() >= 4);
        check("redis", &[redis, pipeline]);
        let kafka = include_str!("publishers/kafka.rs");
        assert!(reasons_in(kafka).len() >= 10);
        check("kafka", &[kafka, pipeline]);
    }
}
