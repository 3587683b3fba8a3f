-- The console (issue 21) groups dead letters by failure: a raw error text holds ids, counts and
-- quoted values, so each dead letter gets a group key, `<reason code>: <normalized message>`,
-- written once when the row is dead-lettered (a trigger on that rare UPDATE only) and indexed, so
-- that grouping 100,000 dead letters is an index-only scan rather than 100,000 regex runs per
-- page view. The same function groups consumers' parked events (computed on read: those tables
-- are small).

-- The reason code: what the relay's metrics call the failure where its text says so
-- (`outbox_events_dead_lettered_total{reason}`), else `permanent`.
CREATE FUNCTION outbox_error_group(e TEXT) RETURNS TEXT
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE
       WHEN e IS NULL OR e = '' THEN 'unknown: (no error recorded)'
       ELSE
         CASE
           WHEN e ~ '^purged: ' THEN 'purge_marker'
           WHEN e ~ '^gave up after [0-9]+ attempts' THEN 'retries_exhausted'
           WHEN e ~ '^dead-lettered by migration' OR e ~* '(control character|cannot be decoded|infinite or out of range)'
             THEN 'undeliverable_row'
           WHEN e ~* '(too large|maximum payload|max_payload)' THEN 'too_large'
           ELSE 'permanent'
         END || ': ' ||
         left(btrim(regexp_replace(
           regexp_replace(
             regexp_replace(
               regexp_replace(
                 regexp_replace(
                   regexp_replace(
                     regexp_replace(e, '^(gave up after [0-9]+ attempts|purged): ', ''),
                     '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}', '<id>', 'g'),
                   '"[^"]*"', '"…"', 'g'),
                 '''[^'']*''', '''…''', 'g'),
               '\m[0-9a-fA-F]*[0-9][0-9a-fA-F]*[a-fA-F][0-9a-fA-F]*\M|\m[0-9a-fA-F]*[a-fA-F][0-9a-fA-F]*[0-9][0-9a-fA-F]*\M', '<hex>', 'g'),
             '[0-9]+', '<n>', 'g'),
           '[[:cntrl:][:space:]]+', ' ', 'g')), 300)
   END $$;

ALTER TABLE outbox_event ADD COLUMN error_group TEXT;

CREATE FUNCTION outbox_event_error_group() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.error_group := outbox_error_group(NEW.last_error);
    RETURN NEW;
END $$;
-- Only when a row becomes dead (or a dead row's error changes): the relay's hot updates and
-- deletes never call it.
CREATE TRIGGER outbox_event_error_group BEFORE UPDATE ON outbox_event
    FOR EACH ROW WHEN (NEW.status = 'dead'
                       AND (OLD.status <> 'dead' OR NEW.last_error IS DISTINCT FROM OLD.last_error
                            OR NEW.error_group IS NULL))
    EXECUTE FUNCTION outbox_event_error_group();

UPDATE outbox_event SET error_group = outbox_error_group(last_error) WHERE status = 'dead';

-- Groups with their counts and time range, index-only.
CREATE INDEX outbox_event_dead_group ON outbox_event (error_group, dead_at) WHERE status = 'dead';
