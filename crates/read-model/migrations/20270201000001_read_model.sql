-- The read model: per tenant and variant, what the inventory's events say.
CREATE TABLE rm_variant (
    tenant_id            TEXT NOT NULL,
    variant_id           UUID NOT NULL,
    quantity             BIGINT NOT NULL DEFAULT 0,
    reserved             BIGINT NOT NULL DEFAULT 0,
    -- A variant is created OUT_OF_STOCK (no stock) without an event.
    status               TEXT NOT NULL DEFAULT 'OUT_OF_STOCK',
    reservation_failures BIGINT NOT NULL DEFAULT 0,
    -- Events applied to this variant: the exactly-once witness (equals the events produced).
    events_applied       BIGINT NOT NULL DEFAULT 0,
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, variant_id)
);

-- Open low-stock alerts: opened by LowStockThresholdReachedEvent, closed when the variant is back
-- IN_STOCK (or discontinued).
CREATE TABLE rm_low_stock_alert (
    tenant_id           TEXT NOT NULL,
    variant_id          UUID NOT NULL,
    current_quantity    BIGINT NOT NULL,
    low_stock_threshold BIGINT NOT NULL,
    opened_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, variant_id)
);
