-- Each running relay process has an instance id of its own (random, per start). The heartbeat of
-- a relay id is renewed only by the instance that holds it, or taken over once it is older than a
-- lease: two live processes can never share a relay id, and a relay that was paused past its lease
-- (a stopped VM, CPU starvation) finds its id and partitions taken and stops (docs/architecture.md).
ALTER TABLE outbox_relay ADD COLUMN instance TEXT NOT NULL DEFAULT '';
