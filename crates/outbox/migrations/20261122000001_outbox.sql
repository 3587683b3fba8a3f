-- The outbox table contract: see docs/outbox-table.md. Writers in any language INSERT rows;
-- the trigger below gives every row its per-aggregate sequence, partition and id.

CREATE SEQUENCE outbox_event_id_seq AS BIGINT;

CREATE TABLE outbox_event (
    -- Assigned by the trigger *after* the aggregate lock is taken, so that within one aggregate
    -- id order is commit order (a column default would be drawn before the lock). Deliberately
    -- without an index of its own: the only index ordered by id is the pending one below, so the
    -- planner cannot choose to walk published rows in id order, however stale its statistics.
    id              BIGINT NOT NULL,
    event_id        UUID PRIMARY KEY,
    tenant_id       TEXT NOT NULL CHECK (tenant_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    aggregate_type  TEXT NOT NULL CHECK (aggregate_type ~ '^[A-Za-z0-9_-]{1,64}$'),
    aggregate_id    TEXT NOT NULL CHECK (length(aggregate_id) BETWEEN 1 AND 200),
    event_type      TEXT NOT NULL CHECK (event_type ~ '^[A-Za-z0-9_.-]{1,128}$'),
    topic           TEXT NOT NULL CHECK (topic ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND length(topic) <= 200),
    payload         BYTEA NOT NULL,
    headers         JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(headers) = 'object'),
    seq             BIGINT NOT NULL DEFAULT 0,
    partition       SMALLINT NOT NULL DEFAULT 0,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    published_at    TIMESTAMPTZ,
    dead_at         TIMESTAMPTZ
);

-- The claim query: per tenant, pending rows in id order (tenant-fair claims walk the tenants that
-- have pending events with a loose index scan over it, then take a share from each).
CREATE INDEX outbox_event_pending_tenant ON outbox_event (tenant_id, id)
    INCLUDE (partition, next_attempt_at) WHERE status = 'pending';
-- Rows that can hold back their aggregate (failing or dead); tiny in a healthy system.
CREATE INDEX outbox_event_blocking ON outbox_event (tenant_id, aggregate_type, aggregate_id, id)
    WHERE status = 'dead' OR (status = 'pending' AND attempts > 0);
-- Retention pass and dead-letter listings.
CREATE INDEX outbox_event_published ON outbox_event (published_at) WHERE status = 'published';
CREATE INDEX outbox_event_dead ON outbox_event (dead_at) WHERE status = 'dead';

-- One row per aggregate: its last sequence number. Its row lock serialises the writers of one
-- aggregate from their first event to their commit, which is what makes seq = commit order.
CREATE TABLE outbox_aggregate (
    tenant_id      TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id   TEXT NOT NULL,
    last_seq       BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, aggregate_type, aggregate_id)
);

-- Fixed partition count: the unit of relay ownership. Changing it would move aggregates between
-- partitions, so it is part of the schema rather than configuration.
CREATE FUNCTION outbox_partition_of(tenant TEXT, agg_type TEXT, agg_id TEXT) RETURNS SMALLINT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT ((hashtextextended(tenant || '/' || agg_type || '/' || agg_id, 0) & 9223372036854775807) % 64)::SMALLINT $$;

CREATE FUNCTION outbox_event_assign() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_aggregate AS a (tenant_id, aggregate_type, aggregate_id, last_seq)
    VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, 1)
    ON CONFLICT (tenant_id, aggregate_type, aggregate_id) DO UPDATE SET last_seq = a.last_seq + 1
    RETURNING last_seq INTO NEW.seq;
    NEW.id := nextval('outbox_event_id_seq');
    NEW.partition := outbox_partition_of(NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id);
    NEW.status := 'pending';
    NEW.attempts := 0;
    RETURN NEW;
END $$;

CREATE TRIGGER outbox_event_assign BEFORE INSERT ON outbox_event
    FOR EACH ROW EXECUTE FUNCTION outbox_event_assign();

-- Relays and the partitions they lease.
CREATE TABLE outbox_relay (
    relay_id     TEXT PRIMARY KEY,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    host         TEXT NOT NULL DEFAULT '',
    pid          INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE outbox_partition (
    partition   SMALLINT PRIMARY KEY,
    owner       TEXT,
    lease_until TIMESTAMPTZ,
    epoch       BIGINT NOT NULL DEFAULT 0
);
INSERT INTO outbox_partition (partition) SELECT g FROM generate_series(0, 63) AS g;

-- What operators did to dead letters (purge, replay): never removed by retention.
CREATE TABLE outbox_audit (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    action     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    event_ids  UUID[] NOT NULL,
    detail     JSONB NOT NULL DEFAULT '{}'::jsonb
);
