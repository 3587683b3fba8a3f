-- The consumer runtime's inbox (crates/outbox/src/consumers/). Lives in the *consumer's* database,
-- applied by the same migration set as the relay's tables (`outbox migrate`).

-- Per consumer and aggregate: the last applied (seq_epoch, seq). One row per aggregate, updated in
-- the handler's transaction: this is what de-duplicates and orders events that carry Outbox-Seq.
CREATE TABLE outbox_consumer_position (
    consumer       TEXT NOT NULL,
    tenant_id      TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    seq_epoch      BIGINT NOT NULL,
    seq            BIGINT NOT NULL,
    applied_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, tenant_id, aggregate_type, aggregate_id)
);

-- Event ids of events handled without a sequence (producers other than this library), kept for a
-- retention period and then deleted in batches: the time-bounded de-duplication set.
CREATE TABLE outbox_consumer_seen (
    consumer  TEXT NOT NULL,
    event_id  UUID NOT NULL,
    seen_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX outbox_consumer_seen_at ON outbox_consumer_seen (seen_at);

-- Handler failures of events not parked yet: the retry budget survives restarts and does not depend
-- on the broker's redelivery counter (RabbitMQ classic queues have none).
CREATE TABLE outbox_consumer_attempt (
    consumer   TEXT NOT NULL,
    event_id   UUID NOT NULL,
    attempts   INT NOT NULL,
    last_error TEXT NOT NULL,
    failed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Parked events: the handler kept failing (reason 'handler'), the gap before it never filled
-- ('gap'), an earlier event of its aggregate is parked ('held'), or it could not be read
-- ('unreadable'). While an aggregate has a parked event, its later events are parked behind it.
-- `replay_requested_at` is set by `outbox consumer-dead-letters replay`; the running consumer
-- applies requested rows per aggregate in (seq_epoch, seq) order and deletes each one in the
-- handler's transaction.
CREATE TABLE outbox_consumer_dead_letter (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer            TEXT NOT NULL,
    event_id            UUID NOT NULL,
    event_type          TEXT,
    tenant_id           TEXT,
    aggregate_type      TEXT,
    aggregate_id        TEXT,
    seq_epoch           BIGINT,
    seq                 BIGINT,
    subject             TEXT NOT NULL,
    headers             JSONB NOT NULL,
    payload             BYTEA NOT NULL,
    reason              TEXT NOT NULL,
    attempts            INT NOT NULL DEFAULT 0,
    last_error          TEXT,
    parked_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    replay_requested_at TIMESTAMPTZ,
    UNIQUE (consumer, event_id)
);
CREATE INDEX outbox_consumer_dead_letter_agg
    ON outbox_consumer_dead_letter (consumer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq);
