-- The inventory service's own schema. Its versions are 2027...: the outbox library owns 202611xx,
-- and both migrators share _sqlx_migrations, so their versions must never collide.
-- Every table is keyed by tenant first: a tenant's ids are only ever looked up together with the
-- tenant of the caller's token, which is what makes another tenant's ids answer 404. The CHECK
-- constraints are a safety net behind the service's own validation: a bug can fail a request,
-- never leave stock negative or over-reserved.

CREATE TABLE inv_variant (
    tenant_id           TEXT NOT NULL CHECK (tenant_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    id                  UUID NOT NULL,
    quantity            BIGINT NOT NULL DEFAULT 0 CHECK (quantity BETWEEN 0 AND 1000000000),
    reserved            BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0 AND reserved <= quantity),
    low_stock_threshold BIGINT NOT NULL DEFAULT 0 CHECK (low_stock_threshold BETWEEN 0 AND 1000000000),
    discontinued        BOOLEAN NOT NULL DEFAULT false,
    status              TEXT NOT NULL CHECK (status IN ('IN_STOCK', 'LOW_STOCK', 'OUT_OF_STOCK', 'DISCONTINUED')),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- Every change of quantity or reserved stock: who, why, before, after, and what caused it.
CREATE TABLE inv_ledger (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    variant_id      UUID NOT NULL,
    at              TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    actor           TEXT NOT NULL,
    movement        TEXT NOT NULL CHECK (movement IN ('PURCHASE', 'SALE', 'RETURN', 'ADJUSTMENT', 'RESERVE', 'RELEASE')),
    reason          TEXT,
    quantity_before BIGINT NOT NULL,
    quantity_after  BIGINT NOT NULL,
    reserved_before BIGINT NOT NULL,
    reserved_after  BIGINT NOT NULL,
    correlation_id  TEXT NOT NULL,
    reference_type  TEXT,
    reference_id    UUID,
    FOREIGN KEY (tenant_id, variant_id) REFERENCES inv_variant (tenant_id, id)
);
CREATE INDEX inv_ledger_variant ON inv_ledger (tenant_id, variant_id, id);

CREATE TABLE inv_receipt (
    tenant_id    TEXT NOT NULL,
    id           UUID NOT NULL,
    reference    TEXT,
    status       TEXT NOT NULL CHECK (status IN ('DRAFT', 'VALIDATED')),
    created_by   TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    validated_by TEXT,
    validated_at TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE inv_receipt_line (
    tenant_id    TEXT NOT NULL,
    receipt_id   UUID NOT NULL,
    line_no      INTEGER NOT NULL,
    warehouse_id UUID NOT NULL,
    variant_id   UUID NOT NULL,
    quantity     BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (tenant_id, receipt_id, line_no),
    FOREIGN KEY (tenant_id, receipt_id) REFERENCES inv_receipt (tenant_id, id),
    FOREIGN KEY (tenant_id, variant_id) REFERENCES inv_variant (tenant_id, id)
);

CREATE TABLE inv_reservation (
    tenant_id  TEXT NOT NULL,
    id         UUID NOT NULL,
    order_id   UUID NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('ACTIVE', 'RELEASED', 'EXPIRED', 'SHIPPED')),
    expires_at TIMESTAMPTZ NOT NULL,
    created_by TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at  TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, id)
);
-- The expiry sweep's queue: only active reservations, by deadline.
CREATE INDEX inv_reservation_expiry ON inv_reservation (expires_at) WHERE status = 'ACTIVE';

CREATE TABLE inv_reservation_line (
    tenant_id      TEXT NOT NULL,
    reservation_id UUID NOT NULL,
    line_no        INTEGER NOT NULL,
    variant_id     UUID NOT NULL,
    quantity       BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (tenant_id, reservation_id, line_no),
    FOREIGN KEY (tenant_id, reservation_id) REFERENCES inv_reservation (tenant_id, id),
    FOREIGN KEY (tenant_id, variant_id) REFERENCES inv_variant (tenant_id, id)
);

-- Idempotency keys: the first answer to a POST, stored in the transaction of its effect. The
-- primary key makes a concurrent duplicate wait for the first request's commit (then replay its
-- answer) or rollback (then proceed itself).
CREATE TABLE inv_idempotency (
    tenant_id   TEXT NOT NULL,
    key         TEXT NOT NULL,
    request     JSONB NOT NULL,
    status      INTEGER,
    body        JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);
