-- no-transaction
-- The purge of expired idempotency keys runs every few seconds with
-- `WHERE created_at < now() - ttl LIMIT n`: without this index each run read the whole table.
-- CONCURRENTLY (hence no transaction) so that adding it to a live table does not block requests.
CREATE INDEX CONCURRENTLY IF NOT EXISTS inv_idempotency_created_at ON inv_idempotency (created_at);
