#!/usr/bin/env bash
# Issue 11, part 3: what this machine's PostgreSQL can do with a reservation's writes when nothing
# else is in the way (no HTTP, no JSON, no token, no relay): pgbench, a C client, over the same
# schema (both crates' migrations), the same 64 hot variants and the same concurrency as
# `bench_reservations`' API pool. Interleaved rounds; prints every round and the medians.
#   scripts/bench_db_limit.sh [seconds per run] [rounds] [clients]      (defaults 10, 3 and 16)
# The transactions (docs/benchmarks.md):
#   two-row   BEGIN; UPDATE a variant; INSERT a reservation; COMMIT   (the issue's comparison)
#   raw       bench_reservations' raw baseline: BEGIN; lock read; one write of the six rows; COMMIT
#   service   the service's own two statements for POST /reservations, as tests/statements.rs
#             counts them (lock, write CTEs with unnest, the outbox insert), in BEGIN/COMMIT
#   one-stmt  raw's rows in a single statement (lock and writes as CTEs, implicit transaction):
#             what folding the lock read into the write would gain
#   no-outbox raw without the outbox event (and so without its aggregate row): the outbox's share
set -euo pipefail
SECS=${1:-10}
ROUNDS=${2:-3}
CLIENTS=${3:-16}
PG=${TEST_PG_URL:-postgres://root@127.0.0.1:5432}
HERE=$(cd "$(dirname "$0")/.." && pwd)
"$HERE/scripts/ensure-services.sh"
command -v pgbench >/dev/null || { echo "pgbench not found: it ships with the PostgreSQL server package (Debian: postgresql, which scripts/ensure-services.sh installs)" >&2; exit 1; }
run() { psql "$PG/$1" -X -q -v ON_ERROR_STOP=1 -At "${@:2}"; }
DB="bench_db_limit_$$"
WORK=$(mktemp -d)
trap 'run postgres -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

run postgres -c "CREATE DATABASE $DB"
for f in "$HERE"/crates/outbox/migrations/*.sql "$HERE"/crates/inventory/migrations/*.sql; do
  if head -1 "$f" | grep -q -- '-- no-transaction'; then run "$DB" -f "$f"; else run "$DB" -1 -f "$f"; fi
done
run "$DB" -c "INSERT INTO inv_variant (tenant_id, id, quantity, low_stock_threshold, status)
              SELECT 'bench', ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 1000000000, 10, 'IN_STOCK'
              FROM generate_series(1, 64) g"

V="('00000000-0000-0000-0000-' || lpad(:v::text, 12, '0'))::uuid"
PAYLOAD="convert_to(repeat('x', 700), 'UTF8')"
HEADERS="'{\"correlationId\":\"c-1\",\"contentType\":\"application/json\"}'"

cat > "$WORK/two-row.sql" <<EOF
\set v random(1, 64)
BEGIN;
UPDATE inv_variant SET updated_at = now() WHERE tenant_id = 'bench' AND id = $V;
INSERT INTO inv_reservation (tenant_id, id, order_id, status, expires_at, created_by)
VALUES ('bench', gen_random_uuid(), gen_random_uuid(), 'ACTIVE', now() + interval '1 hour', 'u');
COMMIT;
EOF

# The six rows: reservation, line, variant, ledger entry, outbox event (and, by its trigger, the
# aggregate's sequence row).
rows_ctes() { # $1: how the CTEs read the locked row (a FROM item); $2: "no-outbox" leaves it out
  cat <<EOF
 r AS (INSERT INTO inv_reservation (tenant_id, id, order_id, status, expires_at, created_by)
       SELECT 'bench', k.r, gen_random_uuid(), 'ACTIVE', now() + interval '1 hour', 'u' FROM k$1 RETURNING 1),
 l AS (INSERT INTO inv_reservation_line (tenant_id, reservation_id, line_no, variant_id, quantity)
       SELECT 'bench', k.r, 1, k.v, 1 FROM k$1 RETURNING 1),
 vv AS (UPDATE inv_variant SET reserved = inv_variant.reserved + 1, updated_at = now() FROM k$1
        WHERE inv_variant.tenant_id = 'bench' AND inv_variant.id = k.v RETURNING 1),
 g AS (INSERT INTO inv_ledger (tenant_id, variant_id, actor, movement, quantity_before, quantity_after,
                               reserved_before, reserved_after, correlation_id)
       SELECT 'bench', k.v, 'u', 'RESERVE', 5, 5, 1, 2, 'c' FROM k$1 RETURNING 1)
EOF
  if [ "${2:-}" = no-outbox ]; then return; fi
  cat <<EOF
,e AS (INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers)
       SELECT gen_random_uuid(), 'bench', 'ProductVariant', k.v::text, 'InventoryReservedEvent',
              'inventory.reservation.created', $PAYLOAD, $HEADERS FROM k$1 RETURNING 1)
EOF
}

locked_tx() { # BEGIN, the lock read, one write of the rows, COMMIT; $1 as for rows_ctes' $2
  cat <<EOF
\set v random(1, 64)
BEGIN;
SELECT quantity, reserved FROM inv_variant WHERE tenant_id = 'bench' AND id = $V FOR NO KEY UPDATE;
WITH k AS (SELECT $V AS v, gen_random_uuid() AS r),
$(rows_ctes "" "${1:-}")
SELECT 1;
COMMIT;
EOF
}
locked_tx >"$WORK/raw.sql"
locked_tx no-outbox >"$WORK/no-outbox.sql"

cat > "$WORK/one-stmt.sql" <<EOF
\set v random(1, 64)
WITH k AS (SELECT $V AS v, gen_random_uuid() AS r),
 lk AS (SELECT 1 FROM inv_variant, k WHERE tenant_id = 'bench' AND id = k.v FOR NO KEY UPDATE OF inv_variant),
$(rows_ctes ", lk")
SELECT 1;
EOF

# crates/inventory/src/stock.rs (lock_keys, FLUSH_CTES), crates/outbox/src/enqueue.rs (insert_cte)
# and ops.rs (reserve's extra CTEs), with literals where the service binds arrays, and `reserved + 1`
# where it binds the value it computed under the lock.
cat > "$WORK/service.sql" <<EOF
\set v random(1, 64)
BEGIN;
SELECT tenant_id, id, quantity, reserved, low_stock_threshold, discontinued, created_at, updated_at
FROM inv_variant WHERE (tenant_id, id) IN (SELECT * FROM unnest(ARRAY['bench']::text[], ARRAY[$V]))
ORDER BY tenant_id, id FOR NO KEY UPDATE;
WITH k AS MATERIALIZED (SELECT $V AS v, gen_random_uuid() AS r),
 variants_updated AS (
   UPDATE inv_variant v SET quantity = u.q, reserved = v.reserved + 1, low_stock_threshold = u.t,
          discontinued = u.d, status = u.s, updated_at = now()
   FROM k, unnest(ARRAY['bench']::text[], ARRAY[k.v]::uuid[], ARRAY[1000000000]::int8[], ARRAY[0]::int8[],
                  ARRAY[10]::int8[], ARRAY[false]::bool[], ARRAY['IN_STOCK']::text[]) AS u(tenant_id, id, q, r, t, d, s)
   WHERE v.tenant_id = u.tenant_id AND v.id = u.id RETURNING 1),
 ledger_inserted AS (
   INSERT INTO inv_ledger (tenant_id, variant_id, actor, movement, reason, quantity_before, quantity_after,
          reserved_before, reserved_after, correlation_id, reference_type, reference_id)
   SELECT u.tenant_id, u.variant_id, 'user-1', u.movement, u.reason, u.qb, u.qa, u.rb, u.ra, 'c-1', u.rk, u.rid
   FROM k, unnest(ARRAY['bench']::text[], ARRAY[k.v]::uuid[], ARRAY['RESERVE']::text[], ARRAY[NULL]::text[],
                  ARRAY[1000000000]::int8[], ARRAY[1000000000]::int8[], ARRAY[1]::int8[], ARRAY[2]::int8[],
                  ARRAY['RESERVATION']::text[], ARRAY[k.r]::uuid[])
        WITH ORDINALITY AS u(tenant_id, variant_id, movement, reason, qb, qa, rb, ra, rk, rid, ord)
   ORDER BY u.ord RETURNING 1),
 outbox_inserted AS (
   INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers)
   SELECT u.event_id, u.tenant_id, u.aggregate_type, u.aggregate_id, u.event_type, u.topic, u.payload, u.headers
   FROM k, unnest(ARRAY[gen_random_uuid()], ARRAY['bench'], ARRAY['ProductVariant'], ARRAY[k.v::text],
                  ARRAY['InventoryReservedEvent'], ARRAY['inventory.reservation.created'], ARRAY[$PAYLOAD],
                  ARRAY[$HEADERS::jsonb])
        WITH ORDINALITY AS u(event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers, ord)
   ORDER BY u.ord RETURNING id),
 reservation_inserted AS (
   INSERT INTO inv_reservation (tenant_id, id, order_id, status, expires_at, created_by)
   SELECT 'bench', k.r, gen_random_uuid(), 'ACTIVE', now() + 3600 * interval '1 second', 'user-1' FROM k RETURNING 1),
 lines_inserted AS (
   INSERT INTO inv_reservation_line (tenant_id, reservation_id, line_no, variant_id, quantity)
   SELECT 'bench', k.r, u.ord::int, u.v, u.q FROM k, unnest(ARRAY[k.v], ARRAY[1::int8]) WITH ORDINALITY AS u(v, q, ord)
   RETURNING 1)
SELECT now(), NULL;
COMMIT;
EOF

KINDS="two-row raw service one-stmt no-outbox"
for kind in $KINDS; do # each script must run before it is timed
  pgbench "$PG/$DB" -n -M prepared -c 1 -t 2 -f "$WORK/$kind.sql" >"$WORK/check.log" 2>&1 \
    || { cat "$WORK/check.log" >&2; exit 1; }
done
echo "machine: $(nproc) cores; $CLIENTS clients, $SECS s per run, $ROUNDS rounds, 64 variants"
for r in $(seq 1 "$ROUNDS"); do
  line="round $r:"
  for kind in $KINDS; do
    # The same starting point for every run: empty tables, fresh statistics, a checkpoint behind.
    run "$DB" -c "TRUNCATE outbox_event, outbox_aggregate, inv_ledger, inv_reservation_line, inv_reservation" \
              -c "VACUUM ANALYZE" -c "CHECKPOINT"
    tps=$(pgbench "$PG/$DB" -n -M prepared -c "$CLIENTS" -j 2 -T "$SECS" -f "$WORK/$kind.sql" 2>&1 \
          | awk '/^tps/ {printf "%.0f", $3}')
    echo "$kind $tps" >>"$WORK/results"
    line="$line  $kind ${tps} tx/s"
  done
  echo "$line"
done
printf 'median:'
for kind in $KINDS; do
  printf '  %s %s tx/s' "$kind" "$(awk -v k="$kind" '$1 == k {print $2}' "$WORK/results" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
done
echo
