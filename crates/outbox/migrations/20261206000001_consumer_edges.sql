-- The consumer's edges (issue 18): producer identity, start policy, skips, gap clocks, exact
-- parking. docs/architecture.md ("The consumer's positions") says why each table exists.

-- ---------------------------------------------------------------------------------------------
-- Producer side. Every outbox database has one identity, sent with each event as
-- `Outbox-Producer-Id`: an aggregate's (seq_epoch, seq) only has a meaning within one outbox
-- database, so consumers key their positions by it. A database cloned from another (a restored
-- backup used as a new shard) must be given a new one: `UPDATE outbox_producer SET id =
-- gen_random_uuid()` before its relay starts.
CREATE TABLE outbox_producer (
    id         UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    -- One row only.
    only_row   BOOLEAN NOT NULL DEFAULT true UNIQUE CHECK (only_row),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO outbox_producer DEFAULT VALUES;

-- ---------------------------------------------------------------------------------------------
-- Consumer side. `producer` is the `Outbox-Producer-Id` of the events ('' for events without one:
-- relays older than this migration, and other producers), part of every aggregate key.
ALTER TABLE outbox_consumer_position ADD COLUMN producer TEXT NOT NULL DEFAULT '';
-- Where the consumer started the aggregate (its first applied position; NULL: before this column,
-- taken as the beginning). An event below it was never applied here: it is parked as `late`, not
-- dropped as a duplicate (a compacted aggregate's old epoch arriving after its new one).
ALTER TABLE outbox_consumer_position ADD COLUMN start_epoch BIGINT, ADD COLUMN start_seq BIGINT;
ALTER TABLE outbox_consumer_position DROP CONSTRAINT outbox_consumer_position_pkey;
ALTER TABLE outbox_consumer_position
    ADD PRIMARY KEY (consumer, producer, tenant_id, aggregate_type, aggregate_id);

-- Parked rows: the producer, the headers exactly as received (JSON text as bytes: a JSONB value
-- cannot hold a NUL, which a broker header can), and an operator's "apply it although what came
-- before it never arrived" (`consumer-dead-letters replay --accept-gap`).
ALTER TABLE outbox_consumer_dead_letter
    ADD COLUMN producer    TEXT NOT NULL DEFAULT '',
    ADD COLUMN headers_raw BYTEA,
    ADD COLUMN accept_gap  BOOLEAN NOT NULL DEFAULT false,
    ALTER COLUMN headers DROP NOT NULL;
DROP INDEX outbox_consumer_dead_letter_agg;
CREATE INDEX outbox_consumer_dead_letter_agg ON outbox_consumer_dead_letter
    (consumer, producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq);
CREATE INDEX outbox_consumer_dead_letter_requested ON outbox_consumer_dead_letter (consumer, id)
    WHERE replay_requested_at IS NOT NULL;

-- A failing event's aggregate and position: an aggregate may only be started past an event that
-- is still being retried if nothing earlier of it is (the start policy's guard).
ALTER TABLE outbox_consumer_attempt
    ADD COLUMN producer       TEXT,
    ADD COLUMN tenant_id      TEXT,
    ADD COLUMN aggregate_type TEXT,
    ADD COLUMN aggregate_id   TEXT,
    ADD COLUMN seq_epoch      BIGINT,
    ADD COLUMN seq            BIGINT;
CREATE INDEX outbox_consumer_attempt_agg ON outbox_consumer_attempt
    (consumer, producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq)
    WHERE aggregate_id IS NOT NULL;

-- Events waiting for their predecessor (sent back to the broker meanwhile): when each was first
-- seen so. The gap clock survives restarts, operators and gauges see every waiting aggregate, and
-- rows whose wait is over (applied, parked, overtaken) are deleted by the consumer's replayer.
CREATE TABLE outbox_consumer_gap (
    consumer       TEXT NOT NULL,
    event_id       UUID NOT NULL,
    producer       TEXT NOT NULL,
    tenant_id      TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    seq_epoch      BIGINT NOT NULL,
    seq            BIGINT NOT NULL,
    first_seen_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX outbox_consumer_gap_agg ON outbox_consumer_gap
    (consumer, producer, tenant_id, aggregate_type, aggregate_id, seq_epoch, seq);

-- Every time a consumer's position moved without applying the events it passed: an aggregate
-- started past its beginning (start policy, or an operator's --accept-gap), a producer's skip
-- marker (a purged dead letter), an operator's purge of parked events. `from_*` NULL: the
-- aggregate was unknown. An event that arrives later inside a skipped range is parked as `late`
-- rather than dropped as a duplicate.
CREATE TABLE outbox_consumer_skip (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer       TEXT NOT NULL,
    producer       TEXT NOT NULL,
    tenant_id      TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    from_epoch     BIGINT,
    from_seq       BIGINT,
    to_epoch       BIGINT NOT NULL,
    to_seq         BIGINT NOT NULL,
    reason         TEXT NOT NULL,
    event_id       UUID,
    at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_consumer_skip_agg ON outbox_consumer_skip
    (consumer, producer, tenant_id, aggregate_type, aggregate_id);
