-- Routes (routing keys / subjects) a relay holds back because the broker refused them: a full
-- RabbitMQ queue with `x-overflow: reject-publish`, a JetStream subject at its per-subject limit
-- (issue 19). Written by the relay when a route is refused or recovers, read by `outbox status`.
-- One row per relay and route; a relay's rows go with its heartbeat row.
CREATE TABLE outbox_route_hold (
    relay_id        TEXT NOT NULL REFERENCES outbox_relay (relay_id) ON DELETE CASCADE,
    route           TEXT NOT NULL,
    refusals        INTEGER NOT NULL,
    since           TIMESTAMPTZ NOT NULL,
    until           TIMESTAMPTZ NOT NULL,
    oldest_event_at TIMESTAMPTZ NOT NULL,
    last_error      TEXT NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (relay_id, route)
);
