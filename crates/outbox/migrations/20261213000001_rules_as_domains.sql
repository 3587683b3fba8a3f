-- The table's per-column rules are checked through domains (issue 20, goal 5; figures in
-- docs/benchmarks.md, "Issue 20, fifth pass"). Every rule of docs/outbox-table.md holds as before,
-- with the same SQLSTATE (23514) and the same constraint name; only the message's first words
-- change ("value for domain outbox_tenant_id violates check constraint ..." instead of "new row for
-- relation "outbox_event" violates check constraint ...").
--
-- Why: PostgreSQL 15 reads every table CHECK's stored expression again (`stringToNode` of
-- `pg_constraint.conbin`) and plans it for every statement that writes the table (`ExecRelCheck`
-- builds them per executor run, prepared statements included). For a one-row INSERT that was the
-- largest part of what the table contract added (profile of the fourth pass: the 11 CHECKs' 9,330
-- characters of stored text, about 20% of a single-row INSERT's backend time). A domain's CHECKs
-- are read and planned once per session, kept in the type cache, and run when the value is
-- assigned to the column. Eight of the eleven rules move (6,514 characters): the six on the
-- writer's names and the two on `headers`. Three stay table CHECKs: `unfailed_rows_are_due` spans
-- three columns; `status` appears in the WHEN clauses of three triggers and in the predicates of
-- the partial indexes the relay's queries are planned against, which a type change would have to
-- rebuild; and a domain on `created_at` would refuse a writer's undecodable value at assignment,
-- before the row trigger overwrites it, where the contract says it is overwritten silently.
--
-- What changes for writers, beyond the message:
--   * a domain is checked when the value is assigned, before the row triggers; so a row breaking
--     several rules is reported for the first broken one in column order (tenant_id,
--     aggregate_type, aggregate_id, event_type, topic, headers; within a column by name, as
--     before), then the table CHECKs;
--   * an UPDATE checks the columns it assigns (the others' values were checked when written);
--   * the column types read `outbox_tenant_id`, ... in the catalogue. Values are still `text` and
--     `jsonb`: parameters of those types and `unnest($1::text[])` are assigned without a cast,
--     and the wire protocol describes a domain column as its base type, so clients decode as
--     before. The view `outbox_event_all` keeps the base types. Indexes on these columns are used
--     as before (PostgreSQL looks through a domain to its base type's operators).
--
-- Sessions open across the migration: see the end of this file for the trigger functions, and
-- docs/outbox-table.md, "Upgrading to 20261213000001", for statements prepared before it that
-- return these columns (relays of earlier versions must be stopped first).
--
-- Existing rows: the rules added VALID hold for every row, so the type change (one rewrite of
-- `outbox_event` and its indexes, under an ACCESS EXCLUSIVE lock: the table holds unpublished and
-- dead rows only, so it is short) cannot fail on them. The two rules added NOT VALID (control
-- characters in `aggregate_id` and in header values: rows older than them may break them, and the
-- relay dead-letters those, docs/outbox-table.md) are added to the domains after the type change,
-- NOT VALID again, which checks new values only.
CREATE DOMAIN outbox_tenant_id AS text
    CONSTRAINT outbox_event_tenant_id_check
        CHECK (VALUE ~ '^[A-Za-z0-9_-]+$' AND length(VALUE) <= 64);
CREATE DOMAIN outbox_aggregate_type AS text
    CONSTRAINT outbox_event_aggregate_type_check
        CHECK (VALUE ~ '^[A-Za-z0-9_-]+$' AND length(VALUE) <= 64);
CREATE DOMAIN outbox_aggregate_id AS text
    CONSTRAINT outbox_event_aggregate_id_check
        CHECK (length(VALUE) >= 1 AND length(VALUE) <= 200);
CREATE DOMAIN outbox_event_type AS text
    CONSTRAINT outbox_event_event_type_check
        CHECK (VALUE ~ '^[A-Za-z0-9_.-]+$' AND length(VALUE) <= 128);
CREATE DOMAIN outbox_topic AS text
    CONSTRAINT outbox_event_topic_check
        CHECK (VALUE ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$' AND length(VALUE) <= 200);
CREATE DOMAIN outbox_headers AS jsonb
    CONSTRAINT outbox_event_headers_check
        CHECK (jsonb_typeof(VALUE) = 'object');

-- The view depends on the columns' types: dropped and created again as it was (20261201000001).
DROP VIEW outbox_event_all;

ALTER TABLE outbox_event
    DROP CONSTRAINT outbox_event_tenant_id_check,
    DROP CONSTRAINT outbox_event_aggregate_type_check,
    DROP CONSTRAINT outbox_event_aggregate_id_check,
    DROP CONSTRAINT outbox_event_event_type_check,
    DROP CONSTRAINT outbox_event_topic_check,
    DROP CONSTRAINT outbox_event_headers_check,
    ALTER COLUMN tenant_id TYPE outbox_tenant_id,
    ALTER COLUMN aggregate_type TYPE outbox_aggregate_type,
    ALTER COLUMN aggregate_id TYPE outbox_aggregate_id,
    ALTER COLUMN event_type TYPE outbox_event_type,
    ALTER COLUMN topic TYPE outbox_topic,
    ALTER COLUMN headers TYPE outbox_headers;

ALTER DOMAIN outbox_aggregate_id
    ADD CONSTRAINT outbox_event_aggregate_id_no_control_chars
        CHECK (VALUE !~ '[[:cntrl:]]') NOT VALID;
ALTER DOMAIN outbox_headers
    ADD CONSTRAINT outbox_event_headers_are_strings_without_control_chars
        CHECK (outbox_headers_valid(VALUE)) NOT VALID;
ALTER TABLE outbox_event
    DROP CONSTRAINT outbox_event_aggregate_id_no_control_chars,
    DROP CONSTRAINT outbox_event_headers_are_strings_without_control_chars;

-- Sessions that ran the trigger functions before this migration hold them compiled against the
-- old column types, and their next INSERT would fail ("type of parameter 15 (outbox_tenant_id)
-- does not match that when preparing the plan (text)") until they reconnect. PL/pgSQL compiles a
-- function again when its catalogue row has changed: altering each (COST 100 is what each has)
-- makes every session do so at its next call.
ALTER FUNCTION outbox_event_assign() COST 100;
ALTER FUNCTION outbox_event_id_unused() COST 100;
ALTER FUNCTION outbox_event_release() COST 100;
ALTER FUNCTION outbox_event_error_group() COST 100;

CREATE VIEW outbox_event_all AS
    SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers,
           seq, partition, status, attempts, next_attempt_at, last_error, created_at,
           NULL::timestamptz AS published_at, dead_at, seq_epoch
    FROM outbox_event
    UNION ALL
    SELECT id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers,
           seq, partition, 'published', attempts, NULL, NULL, created_at, published_at, NULL, seq_epoch
    FROM outbox_published;
