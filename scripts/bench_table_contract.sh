#!/usr/bin/env bash
# Issue 10: what the table contract costs producers and the relay's settlement, before (the first two
# migrations) and after (all three), same run, same machine. PostgreSQL only, through psql.
#   scripts/bench_table_contract.sh [rows] [rounds]      (defaults 50000 and 3)
# Prints, per schema, the best of `rounds`:
#   - inserts/s of one multi-row INSERT of `rows` events, each of a new aggregate (the trigger's
#     upsert inserts a row into outbox_aggregate per event), and of `rows` events over 5000 existing
#     aggregates;
#   - moved rows/s of the published-row move (the relay's settlement, batches of 1000 event ids).
set -euo pipefail
ROWS=${1:-50000}
ROUNDS=${2:-3}
PG=${TEST_PG_URL:-postgres://root@127.0.0.1:5432}
HERE=$(cd "$(dirname "$0")/.." && pwd)
"$HERE/scripts/ensure-services.sh"
MIG="$HERE/crates/outbox/migrations"
run() { psql "$PG/$1" -X -q -v ON_ERROR_STOP=1 -At "${@:2}"; }

timed() { # db sql -> milliseconds
  local db=$1 sql=$2
  run "$db" -c "SELECT extract(epoch FROM clock_timestamp())" -c "$sql" -c "SELECT extract(epoch FROM clock_timestamp())" \
    | grep -E '^[0-9.]+$' | paste -sd' ' | awk '{printf "%.0f", ($2-$1)*1000}'
}

insert_sql() { # aggregate expression
  echo "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers)
        SELECT gen_random_uuid(), 't' || (g % 10), 'V', $1, 'E', 'x.y', '\\x7b7d', '{\"correlationId\":\"c\"}'
        FROM generate_series(1, $ROWS) g ORDER BY g"
}

# The relay's settle (crates/outbox/src/pg.rs, published branch), 1000 ids at a time; $1 is the
# extra column of the new schema.
settle_sql() { echo "DO \$\$ DECLARE ids uuid[]; BEGIN LOOP
  SELECT array_agg(event_id) INTO ids FROM (SELECT event_id FROM outbox_event WHERE status = 'pending' ORDER BY id LIMIT 1000) s;
  EXIT WHEN ids IS NULL;
  WITH moved AS (DELETE FROM outbox_event WHERE event_id = ANY(ids) AND status = 'pending'
       RETURNING id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers, seq, partition, attempts, created_at$1)
  INSERT INTO outbox_published (id, event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload, headers, seq, partition, attempts, created_at$1)
  SELECT * FROM moved;
END LOOP; END \$\$"; }

for schema in before after; do
  extra=""; [ "$schema" = after ] && extra=", seq_epoch"
  best_new=999999; best_old=999999; best_settle=999999
  for r in $(seq 1 "$ROUNDS"); do
    db="bench_contract_${schema}_$$_$r"
    run postgres -c "CREATE DATABASE $db"
    for f in "$MIG"/*.sql; do
      if [ "$schema" = before ] && [[ "$f" == *20261201000001* ]]; then continue; fi
      run "$db" -1 -f "$f"
    done
    run "$db" -c "CHECKPOINT" >/dev/null
    t=$(timed "$db" "$(insert_sql "'n' || g")"); [ "$t" -lt "$best_new" ] && best_new=$t
    run "$db" -c "VACUUM ANALYZE"
    t=$(timed "$db" "$(settle_sql "$extra")"); [ "$t" -lt "$best_settle" ] && best_settle=$t
    run "$db" -c "$(insert_sql "'a' || (g % 5000)")" >/dev/null   # the 5000 aggregates exist now
    run "$db" -c "DELETE FROM outbox_event" -c "VACUUM ANALYZE" >/dev/null
    t=$(timed "$db" "$(insert_sql "'a' || (g % 5000)")"); [ "$t" -lt "$best_old" ] && best_old=$t
    run postgres -c "DROP DATABASE $db"
  done
  printf '%-6s  new aggregates: %7.0f inserts/s   existing aggregates: %7.0f inserts/s   settle (move): %7.0f rows/s\n' \
    "$schema" "$(echo "$ROWS*1000/$best_new" | bc -l)" "$(echo "$ROWS*1000/$best_old" | bc -l)" "$(echo "$ROWS*1000/$best_settle" | bc -l)"
done
