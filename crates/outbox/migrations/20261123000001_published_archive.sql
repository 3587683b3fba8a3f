-- Published events leave the hot table: the relay moves an acknowledged row from `outbox_event`
-- into `outbox_published` (DELETE ... RETURNING into INSERT) instead of updating it in place.
-- Why: marking a row published in place can never be a HOT update (`status` is in the partial
-- indexes' predicates), so it wrote a new row version plus two index entries into the table the
-- claim walks; the move writes one append-only row and one append-only index entry elsewhere, and
-- leaves `outbox_event` holding only pending and dead rows (docs/benchmarks.md has the figures).
-- Retention deletes from `outbox_published` only, so it never touches a table producers insert into.

CREATE TABLE outbox_published (
    id             BIGINT NOT NULL,
    event_id       UUID NOT NULL,
    tenant_id      TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    event_type     TEXT NOT NULL,
    topic          TEXT NOT NULL,
    payload        BYTEA NOT NULL,
    headers        JSONB NOT NULL,
    seq            BIGINT NOT NULL,
    partition      SMALLINT NOT NULL,
    attempts       INTEGER NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    published_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Retention pass (oldest first) and "what was published lately".
CREATE INDEX outbox_published_at ON outbox_published (published_at);

WITH moved AS (
    DELETE FROM outbox_event WHERE status = 'published'
    RETURNING id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload,
              headers, seq, partition, attempts, created_at, published_at)
INSERT INTO outbox_published (id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic,
                              payload, headers, seq, partition, attempts, created_at, published_at)
SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers, seq,
       partition, attempts, created_at, COALESCE(published_at, now())
FROM moved;

DROP INDEX outbox_event_published;
ALTER TABLE outbox_event DROP COLUMN published_at;
ALTER TABLE outbox_event DROP CONSTRAINT outbox_event_status_check;
ALTER TABLE outbox_event ADD CONSTRAINT outbox_event_status_check CHECK (status IN ('pending', 'dead'));

-- Every event, wherever it lives now, with its state: for operators ("what happened to event X?")
-- and for anyone who read `outbox_event` expecting published rows in it.
CREATE VIEW outbox_event_all AS
    SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers,
           seq, partition, status, attempts, next_attempt_at, last_error, created_at,
           NULL::timestamptz AS published_at, dead_at
    FROM outbox_event
    UNION ALL
    SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers,
           seq, partition, 'published', attempts, NULL, NULL, created_at, published_at, NULL
    FROM outbox_published;
