-- Writers pay less for the same rules (issue 20, goal 5; figures in docs/benchmarks.md, "Writers
-- and the archive, second pass"). Nothing a writer may or may not do changes: every rule of
-- docs/outbox-table.md holds as before, a row that breaks one is refused with the same SQLSTATE,
-- constraint name and message.

-- ---------------------------------------------------------------------------------------------
-- 1. The name formats, without bounded repetitions.
-- PostgreSQL's regex engine expands `{1,64}` into 64 copies of the bracket in its automaton:
-- `event_type ~ '^[A-Za-z0-9_.-]{1,128}$'` cost about 8 µs per row, the tenant and aggregate type
-- formats about 1.6 µs each, together some 40% of what a multi-row INSERT cost (perf on the
-- backend: `textregexeq` under `ExecConstraints`), before and after the table contract alike. The
-- same rule as an unbounded class plus a length test costs about 0.2 µs. Same names, so a broken
-- rule is refused as before: `23514`, `outbox_event_<column>_check`. Equivalence: `length`
-- counts characters as the regex bound does, and the class holds only one-byte characters; the
-- test `the_cheaper_name_checks_decide_as_the_rules_as_written` compares both forms. The topic's
-- format has no bound and costs as little: unchanged.
ALTER TABLE outbox_event
    DROP CONSTRAINT outbox_event_tenant_id_check,
    ADD CONSTRAINT outbox_event_tenant_id_check
        CHECK (tenant_id ~ '^[A-Za-z0-9_-]+$' AND length(tenant_id) <= 64),
    DROP CONSTRAINT outbox_event_aggregate_type_check,
    ADD CONSTRAINT outbox_event_aggregate_type_check
        CHECK (aggregate_type ~ '^[A-Za-z0-9_-]+$' AND length(aggregate_type) <= 64),
    DROP CONSTRAINT outbox_event_event_type_check,
    ADD CONSTRAINT outbox_event_event_type_check
        CHECK (event_type ~ '^[A-Za-z0-9_.-]+$' AND length(event_type) <= 128);

-- ---------------------------------------------------------------------------------------------
-- 2. "Held?" once per statement, not once per row.
-- The insert trigger probed `outbox_event_holding` for every row, one executor start each (about
-- 10% of a multi-row INSERT). The probe now runs in the statement-level AFTER INSERT trigger
-- that already checks the ids, as one query over the statement's new rows; the rows whose
-- aggregate has a held row or a blocking dead letter are then updated to `held` (none in a healthy
-- system, so nothing is updated). Same decision as before:
--   * it is taken after every aggregate lock of the statement is held (the row triggers take them
--     in the upsert below, held until commit), so a replay or purge of the aggregate either
--     committed before (and at READ COMMITTED the query's new snapshot sees it; at REPEATABLE READ
--     the upsert already failed with 40001, migration 20261207000001) or waits for this commit and
--     then releases these rows too;
--   * rows inserted by the same statement are `pending` when it runs and so never hold each other,
--     as before (a new row was held only because of an older held row or dead letter, which the
--     set-based query sees for every row of the statement alike).
-- The rows are `pending` for the rest of their own statement only, invisible to every other
-- transaction. No lock is taken beyond the rows this statement inserted, so lock order is what it
-- was: aggregates in the order of the rows, then nothing.
-- The row trigger's only query is now the upsert into `outbox_aggregate`, which reaches its row
-- through the conflict arbiter (the primary key) whatever the planner thinks: it no longer needs
-- `SET enable_seqscan = off` (whose per-row GUC save and restore, `fmgr_security_definer`, cost
-- about 2%). The statement trigger sets it instead: its probes must use their indexes on an outbox whose
-- statistics said "empty" when the session planned them.
CREATE OR REPLACE FUNCTION outbox_event_assign() RETURNS trigger LANGUAGE plpgsql AS $$
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
    -- `held` is decided by the statement trigger `outbox_event_id_unused` below.
    NEW.status := 'pending';
    RETURN NEW;
END $$;

-- Same function (and trigger) as rule 4's: one call and one query per statement for both checks.
-- The "held?" probe is a correlated subquery with LIMIT, which the planner keeps as a per-row
-- index lookup (`outbox_event_holding`, leading columns tenant, type, id) instead of a join: the
-- plan is made once per session, for whatever statement came first, and a join planned for a
-- 10,000-row statement (a hash over every held row and blocking dead letter, behind three bitmap
-- scans) would then be re-run by every single-row INSERT, its cost growing with the dead letters.
-- `enable_seqscan = off` for the same reason: an index lookup per new row, whatever the
-- statistics said when the session planned it (an empty outbox makes a sequential scan look free).
CREATE OR REPLACE FUNCTION outbox_event_id_unused() RETURNS trigger LANGUAGE plpgsql
    SET enable_seqscan = off AS $$
DECLARE
    used UUID;
    holding BOOLEAN;
BEGIN
    SELECT (SELECT n.event_id FROM new_rows n
            WHERE EXISTS (SELECT 1 FROM outbox_published p WHERE p.event_id = n.event_id) LIMIT 1),
           EXISTS (SELECT 1 FROM new_rows n
                   WHERE (SELECT true FROM outbox_event b
                          WHERE b.tenant_id = n.tenant_id AND b.aggregate_type = n.aggregate_type
                            AND b.aggregate_id = n.aggregate_id
                            AND (b.status = 'held' OR (b.status = 'dead' AND b.blocks_aggregate))
                          LIMIT 1))
    INTO used, holding;
    IF used IS NOT NULL THEN
        RAISE EXCEPTION 'event id % was already used by an event that was published; an event id is unique for the life of the outbox', used
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'outbox_published_event_id',
                  HINT = 'generate a new UUID (v7) for every event';
    END IF;
    IF holding THEN
        UPDATE outbox_event e SET status = 'held'
        FROM new_rows n
        WHERE e.event_id = n.event_id AND e.status = 'pending'
          AND (SELECT true FROM outbox_event b
               WHERE b.tenant_id = n.tenant_id AND b.aggregate_type = n.aggregate_type
                 AND b.aggregate_id = n.aggregate_id
                 AND (b.status = 'held' OR (b.status = 'dead' AND b.blocks_aggregate))
               LIMIT 1);
    END IF;
    RETURN NULL;
END $$;

-- ---------------------------------------------------------------------------------------------
-- 3. Room for HOT updates of `outbox_aggregate`.
-- Every event updates its aggregate's row (last_seq, last_id, last_at; none indexed). On a full
-- page that update cannot be HOT: the new version goes to another page and its primary key gets a
-- new entry (perf: `_bt_doinsert` and `_bt_bottomupdel_pass` under the upsert). Half-empty pages
-- keep the new versions on the row's page, pruned by later writers. The table has one small row
-- per aggregate, so twice its size is cheap. Applies to pages written from now on (no rewrite
-- here: that would lock the writers out for its duration).
ALTER TABLE outbox_aggregate SET (fillfactor = 50);
