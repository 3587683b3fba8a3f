-- The table contract cannot be broken by a writer (issue 10). Every rule is stated, with what the
-- database does when it is broken, in docs/outbox-table.md. In short:
--   1. rows no broker can carry are refused at INSERT (CHECKs below); the trigger sets created_at;
--   2. the trigger sets next_attempt_at ('-infinity': due at once), so a new event can never wait
--      behind its own due time while a later event of its aggregate overtakes it;
--   3. an event id already published is refused (AFTER INSERT trigger + index on outbox_published);
--   4. rows behind a blocking dead letter are `held` (out of the pending index), so a stuck
--      aggregate costs the claim nothing;
--   5. `outbox_aggregate` rows of idle aggregates can be compacted; a compacted aggregate that
--      comes back starts a new sequence epoch (`seq_epoch`), consumers order by (seq_epoch, seq).

-- Taken first so that no writer inserts between the data fixes and the new constraints.
LOCK TABLE outbox_event, outbox_aggregate IN ACCESS EXCLUSIVE MODE;

-- ---------------------------------------------------------------------------------------------
-- New columns. Fast defaults: no table rewrite.
ALTER TABLE outbox_event
    ADD COLUMN seq_epoch BIGINT NOT NULL DEFAULT 0,
    -- True on a dead letter written by a relay whose dead letters block their aggregate: new
    -- rows of its aggregate are then inserted `held` (see the trigger).
    ADD COLUMN blocks_aggregate BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE outbox_published ADD COLUMN seq_epoch BIGINT NOT NULL DEFAULT 0;
-- Legacy aggregates are epoch 0; an aggregate first seen after this migration has the id of its
-- first event as epoch, so epochs of one aggregate only grow.
ALTER TABLE outbox_aggregate
    ADD COLUMN seq_epoch BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN last_id   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN last_at   TIMESTAMPTZ NOT NULL DEFAULT now();

UPDATE outbox_aggregate a SET last_id = m.id
FROM (SELECT tenant_id, aggregate_type, aggregate_id, max(id) AS id FROM outbox_event
      GROUP BY 1, 2, 3) m
WHERE a.tenant_id = m.tenant_id AND a.aggregate_type = m.aggregate_type
  AND a.aggregate_id = m.aggregate_id;

-- ---------------------------------------------------------------------------------------------
-- 1. Poison rows.

-- Header values a broker can carry: strings of at most 1024 characters without control
-- characters (a CR/LF would end a NATS or AMQP header line). IMMUTABLE so that it may serve in a
-- CHECK constraint; CASE guards jsonb_each against non-objects.
CREATE FUNCTION outbox_headers_valid(h JSONB) RETURNS BOOLEAN
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN jsonb_typeof(h) IS DISTINCT FROM 'object' THEN false
               ELSE NOT EXISTS (
                   SELECT 1 FROM jsonb_each(h) AS kv(k, v)
                   WHERE jsonb_typeof(kv.v) <> 'string'
                      OR (kv.v #>> '{}') ~ '[[:cntrl:]]'
                      OR length(kv.v #>> '{}') > 1024
                      OR kv.k ~ '[[:cntrl:]]' OR kv.k = '')
          END $$;

-- Existing rows that break the new rules cannot be delivered: they become dead letters now, with
-- the reason, visible to `outbox dead-letters list` and purgeable. (Fixing them in place would
-- change an id or a header the producer wrote; deleting them would lose them silently.)
-- A created_at the relay cannot decode is replaced by now(), the original kept in last_error.
UPDATE outbox_event SET status = 'dead', dead_at = now(),
       last_error = 'dead-lettered by migration 20261201000001 (table contract): '
           || concat_ws('; ',
                CASE WHEN aggregate_id ~ '[[:cntrl:]]' THEN 'aggregate_id contains a control character' END,
                CASE WHEN NOT outbox_headers_valid(headers) THEN 'a header value is not a string, too long or contains a control character' END,
                CASE WHEN NOT (isfinite(created_at) AND created_at < '10000-01-01')
                     THEN 'created_at ' || created_at::text || ' cannot be decoded' END),
       created_at = CASE WHEN isfinite(created_at) AND created_at < '10000-01-01' THEN created_at ELSE now() END
WHERE status = 'pending'
  AND (aggregate_id ~ '[[:cntrl:]]' OR NOT outbox_headers_valid(headers)
       OR NOT (isfinite(created_at) AND created_at < '10000-01-01'));
UPDATE outbox_event SET created_at = now()
WHERE NOT (isfinite(created_at) AND created_at < '10000-01-01');

-- NOT VALID: checked for every INSERT and UPDATE from now on, but not for the dead letters kept
-- above (an operator purges them; replaying one fails on the constraint, which names the rule).
ALTER TABLE outbox_event
    ADD CONSTRAINT outbox_event_aggregate_id_no_control_chars
        CHECK (aggregate_id !~ '[[:cntrl:]]') NOT VALID,
    ADD CONSTRAINT outbox_event_headers_are_strings_without_control_chars
        CHECK (outbox_headers_valid(headers)) NOT VALID,
    -- The trigger sets created_at; this keeps a later UPDATE from planting a value the relay
    -- cannot decode (chrono stops at year 262143, PostgreSQL allows 'infinity').
    ADD CONSTRAINT outbox_event_created_at_decodable
        CHECK (isfinite(created_at) AND created_at < '10000-01-01');

-- ---------------------------------------------------------------------------------------------
-- 2. Order. A pending row that has never failed is due at once ('-infinity'), whatever the writer
-- gave and whenever its transaction started; only the relay's retry path sets a due time in the
-- future, and then attempts > 0, which puts the row into `outbox_event_blocking`. So "every
-- earlier pending row that is not itself claimable" is exactly what that small index holds, and
-- the claim's NOT EXISTS over it holds back the later rows.
UPDATE outbox_event SET next_attempt_at = '-infinity'
WHERE status = 'pending' AND attempts = 0 AND next_attempt_at <> '-infinity';
ALTER TABLE outbox_event ALTER COLUMN next_attempt_at SET DEFAULT '-infinity';
ALTER TABLE outbox_event
    ADD CONSTRAINT outbox_event_unfailed_rows_are_due
        CHECK (status <> 'pending' OR attempts > 0 OR next_attempt_at = '-infinity');

-- ---------------------------------------------------------------------------------------------
-- 4. Held rows: behind a dead letter that blocks its aggregate. They are not in the pending index,
-- so the claim never walks them, however many there are.
ALTER TABLE outbox_event DROP CONSTRAINT outbox_event_status_check;
ALTER TABLE outbox_event ADD CONSTRAINT outbox_event_status_check
    CHECK (status IN ('pending', 'held', 'dead'));
-- What holds an aggregate: its held rows and its blocking dead letters. Probed by the insert
-- trigger (one probe per event, on an index that is empty in a healthy system) and by
-- replay/purge/compaction.
CREATE INDEX outbox_event_holding ON outbox_event (tenant_id, aggregate_type, aggregate_id, id)
    WHERE status = 'held' OR (status = 'dead' AND blocks_aggregate);

-- However a blocking dead letter goes away (purge, replay, a DELETE or UPDATE by hand), the rows
-- it held flow again, in their order, unless another blocking dead letter is still ahead of them.
-- The aggregate's sequence row is locked first, as producers take it: a producer that decided
-- `held` under that lock has committed when the lock is granted, and the UPDATE (a new statement,
-- a new snapshot) releases its row too; a producer after this commit sees no blocking dead letter.
-- The WHEN clauses keep the relay's own deletes (published rows) free of any trigger call.
CREATE FUNCTION outbox_event_release() RETURNS trigger LANGUAGE plpgsql
    SET enable_seqscan = off AS $$
BEGIN
    PERFORM 1 FROM outbox_aggregate a
    WHERE a.tenant_id = OLD.tenant_id AND a.aggregate_type = OLD.aggregate_type
      AND a.aggregate_id = OLD.aggregate_id
    FOR UPDATE;
    UPDATE outbox_event e SET status = 'pending'
    WHERE e.status = 'held' AND e.tenant_id = OLD.tenant_id
      AND e.aggregate_type = OLD.aggregate_type AND e.aggregate_id = OLD.aggregate_id
      AND NOT EXISTS (
          SELECT 1 FROM outbox_event b
          WHERE b.status = 'dead' AND b.blocks_aggregate AND b.tenant_id = e.tenant_id
            AND b.aggregate_type = e.aggregate_type AND b.aggregate_id = e.aggregate_id
            AND b.id < e.id);
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_event_release_on_delete AFTER DELETE ON outbox_event
    FOR EACH ROW WHEN (OLD.status = 'dead' AND OLD.blocks_aggregate)
    EXECUTE FUNCTION outbox_event_release();
CREATE TRIGGER outbox_event_release_on_update AFTER UPDATE ON outbox_event
    FOR EACH ROW WHEN (OLD.status = 'dead' AND OLD.blocks_aggregate
                       AND (NEW.status <> 'dead' OR NOT NEW.blocks_aggregate))
    EXECUTE FUNCTION outbox_event_release();

-- Dead letters default to blocking (the relay's default); their later pending rows become held.
UPDATE outbox_event SET blocks_aggregate = true WHERE status = 'dead';
UPDATE outbox_event e SET status = 'held'
WHERE e.status = 'pending' AND EXISTS (
    SELECT 1 FROM outbox_event b
    WHERE b.status = 'dead' AND b.tenant_id = e.tenant_id AND b.aggregate_type = e.aggregate_type
      AND b.aggregate_id = e.aggregate_id AND b.id < e.id);

-- ---------------------------------------------------------------------------------------------
-- 3. An event id is unique for the life of the outbox (as long as published rows are kept).
-- Not UNIQUE: the AFTER INSERT trigger below is what refuses a re-used id, and a unique index
-- could only make the relay's settlement fail in a loop.
CREATE INDEX outbox_published_event_id ON outbox_published (event_id);

-- AFTER, not BEFORE: the primary key check of outbox_event waits for a relay that is moving the
-- same id to outbox_published; only after that wait does this check see the moved row.
-- A statement-level trigger: one probe per inserted row in one query, whatever the batch size.
CREATE FUNCTION outbox_event_id_unused() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    used UUID;
BEGIN
    SELECT n.event_id INTO used FROM new_rows n
    WHERE EXISTS (SELECT 1 FROM outbox_published p WHERE p.event_id = n.event_id) LIMIT 1;
    IF used IS NOT NULL THEN
        RAISE EXCEPTION 'event id % was already used by an event that was published; an event id is unique for the life of the outbox', used
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'outbox_published_event_id',
                  HINT = 'generate a new UUID (v7) for every event';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_event_id_unused AFTER INSERT ON outbox_event
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_event_id_unused();

-- ---------------------------------------------------------------------------------------------
-- The insert trigger, replacing the first migration's.
-- SET enable_seqscan = off: the trigger's plans are made once per session and kept, and an outbox
-- is often empty when they are made (statistics say 0 rows): the "held?" probe was then planned
-- as a sequential scan and re-run for every row of a large INSERT as the table grew (10,000 events
-- in one statement took 6.3 s instead of 0.49 s). The probes must use their indexes whatever the
-- statistics say.
CREATE OR REPLACE FUNCTION outbox_event_assign() RETURNS trigger LANGUAGE plpgsql
    SET enable_seqscan = off AS $$
DECLARE
    first_id BIGINT := nextval('outbox_event_id_seq');
BEGIN
    -- Takes the aggregate's row lock until commit (seq = commit order). For an aggregate seen
    -- before, the id is drawn in DO UPDATE, i.e. under that lock; a new aggregate (or one
    -- compacted away) has no earlier event to be ordered against, and its first id is its epoch.
    INSERT INTO outbox_aggregate AS a (tenant_id, aggregate_type, aggregate_id, last_seq, last_id,
                                       seq_epoch, last_at)
    VALUES (NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id, 1, first_id, first_id, clock_timestamp())
    ON CONFLICT (tenant_id, aggregate_type, aggregate_id) DO UPDATE
        SET last_seq = a.last_seq + 1, last_id = nextval('outbox_event_id_seq'), last_at = clock_timestamp()
    RETURNING last_seq, last_id, seq_epoch INTO NEW.seq, NEW.id, NEW.seq_epoch;
    NEW.partition := outbox_partition_of(NEW.tenant_id, NEW.aggregate_type, NEW.aggregate_id);
    NEW.attempts := 0;
    NEW.next_attempt_at := '-infinity';
    NEW.created_at := clock_timestamp();
    NEW.last_error := NULL;
    NEW.dead_at := NULL;
    NEW.blocks_aggregate := false;
    -- After the lock: a replay or purge of this aggregate (which takes the same lock) either
    -- finished before, and then this sees no blocking dead letter, or waits for this commit and
    -- then releases this row too.
    NEW.status := CASE WHEN EXISTS (
        SELECT 1 FROM outbox_event b
        WHERE b.tenant_id = NEW.tenant_id AND b.aggregate_type = NEW.aggregate_type
          AND b.aggregate_id = NEW.aggregate_id
          AND (b.status = 'held' OR (b.status = 'dead' AND b.blocks_aggregate)))
        THEN 'held' ELSE 'pending' END;
    RETURN NEW;
END $$;

-- ---------------------------------------------------------------------------------------------
-- The view gains the new column (at the end: CREATE OR REPLACE VIEW can only append).
CREATE OR REPLACE VIEW outbox_event_all AS
    SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers,
           seq, partition, status, attempts, next_attempt_at, last_error, created_at,
           NULL::timestamptz AS published_at, dead_at, seq_epoch
    FROM outbox_event
    UNION ALL
    SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers,
           seq, partition, 'published', attempts, NULL, NULL, created_at, published_at, NULL, seq_epoch
    FROM outbox_published;
