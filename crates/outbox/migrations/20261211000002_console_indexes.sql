-- Two small partial indexes for the console's pages on a large outbox (issue 21; figures in
-- docs/benchmarks.md, "Console (issue 21)"):
-- 1. Held rows alone. The held count walked `outbox_event_holding`, which also holds every
--    blocking dead letter: with 100,000 dead letters, counting 10,000 held rows took 170 ms.
--    Keyed by tenant, not id: the only index ordered by id stays the pending one (see the first
--    migration). Held rows are rare and already leave `status` on release (no HOT update lost).
CREATE INDEX outbox_event_held ON outbox_event (tenant_id) WHERE status = 'held';
-- 2. A failure group's aggregates in key order, with their dead-letter times: one page of them is
--    an index range that stops after 100 aggregates, rather than a bitmap scan of every dead
--    letter of the group and a sort (100 ms for a group of 10,000).
CREATE INDEX outbox_event_dead_group_aggregate
    ON outbox_event (error_group, tenant_id, aggregate_type, aggregate_id) INCLUDE (dead_at)
    WHERE status = 'dead';
