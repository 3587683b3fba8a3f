-- No event stays `held` with nothing ahead of it (issue 19, item 1; docs/outbox-table.md,
-- "Writers' isolation level").
--
-- The insert trigger decides `held` from what the writer's snapshot shows. At READ COMMITTED
-- every statement of the trigger takes a new snapshot after the aggregate's row lock is granted,
-- so a purge or replay that committed before is seen. At REPEATABLE READ and SERIALIZABLE the
-- snapshot is the transaction's: a writer whose snapshot predates a purge or replay still saw the
-- dead letter and inserted its event `held` after the release had run, and nothing ever released
-- it. The release only *locked* the aggregate's row (FOR UPDATE); a lock taken and let go by a
-- committed transaction leaves the row version as it was, so the writer's upsert of that row went
-- through.
--
-- Now the release *updates* the aggregate's row (a new row version, same values). A writer at
-- REPEATABLE READ or SERIALIZABLE whose snapshot does not see that version gets
-- `40001 could not serialize access due to concurrent update` from the upsert in the insert
-- trigger, as for any concurrent update at those levels, and retries its transaction with a new
-- snapshot, which sees the released aggregate. Every writer at those levels must retry on 40001
-- anyway. A writer that locked the row first is waited for, and the release (a new statement at
-- READ COMMITTED) releases its row too, as before.
CREATE OR REPLACE FUNCTION outbox_event_release() RETURNS trigger LANGUAGE plpgsql
    SET enable_seqscan = off AS $$
BEGIN
    -- Not PERFORM .. FOR UPDATE: only a new row version makes a concurrent writer's snapshot
    -- stale in PostgreSQL's eyes. `last_at` keeps its value (compaction reads it as the time of
    -- the aggregate's last event).
    UPDATE outbox_aggregate a SET last_at = a.last_at
    WHERE a.tenant_id = OLD.tenant_id AND a.aggregate_type = OLD.aggregate_type
      AND a.aggregate_id = OLD.aggregate_id;
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
