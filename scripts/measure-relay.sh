#!/usr/bin/env bash
# Resident memory and CPU of the `outbox relay` binary while it drains a backlog to NATS
# JetStream: the figures behind the resource requests in deploy/. Starts the release binary against
# a fresh database (and, with DATABASES=N, N fresh databases in one relay), samples /proc every
# 200 ms until every event is published, prints the figures, and removes what it created.
#   scripts/measure-relay.sh [events per database, default 200000]   (DATABASES=1 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
N=${1:-200000}
DBS=${DATABASES:-1}
BIN=${OUTBOX_BIN:-${CARGO_TARGET_DIR:-target}/release/outbox}
PG=${TEST_PG_URL:-postgres://root@127.0.0.1:5432}
[ -x "$BIN" ] || { echo "build it first: cargo build --release -p outbox-cli --bin outbox" >&2; exit 1; }
TAG="measure_$$"
STREAM="MEASURE_$$"
PORT=$((20000 + $$ % 20000))
ARGS=()
cleanup() {
  [ -n "${PID:-}" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  for i in $(seq 1 "$DBS"); do psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS ${TAG}_$i WITH (FORCE)" >/dev/null; done
  python3 - "$STREAM" <<'PY' || true
import socket, sys, time
s = socket.create_connection(("127.0.0.1", 4222)); s.recv(4096)
s.sendall(b'CONNECT {"verbose":false}\r\nPUB $JS.API.STREAM.DELETE.' + sys.argv[1].encode() + b' 0\r\n\r\nPING\r\n')
time.sleep(0.3)
PY
}
trap cleanup EXIT
for i in $(seq 1 "$DBS"); do
  psql -q "$PG/postgres" -c "CREATE DATABASE ${TAG}_$i" >/dev/null
  "$BIN" migrate --database-url "$PG/${TAG}_$i" >/dev/null
  psql -q "$PG/${TAG}_$i" -c "INSERT INTO outbox_event (event_id, tenant_id, aggregate_type, aggregate_id, event_type, topic, payload)
    SELECT gen_random_uuid(), 't' || (g % 4), 'V', 'a' || (g % 1000), 'Bulk', 'bulk.created',
           convert_to(json_build_object('g', g, 'pad', repeat('x', 200))::text, 'UTF8')
    FROM generate_series(1, $N) AS g ORDER BY g" >/dev/null
  if [ "$DBS" -gt 1 ]; then ARGS+=(--database-url "db$i=$PG/${TAG}_$i"); else ARGS+=(--database-url "$PG/${TAG}_$i"); fi
done
psql -q "$PG/postgres" -c "CHECKPOINT" >/dev/null
TICK=$(getconf CLK_TCK)
START=$(date +%s.%N)
RUST_LOG=warn "$BIN" relay "${ARGS[@]}" --nats-stream "$STREAM" --nats-stream-subjects "measure$$.>" \
  --nats-subject "measure$$.{tenant}.{topic}" --metrics-addr "127.0.0.1:$PORT" &
PID=$!
PEAK=0; SAMPLES=0; SUM=0
pending() {
  local t=0
  for i in $(seq 1 "$DBS"); do t=$((t + $(psql -tA "$PG/${TAG}_$i" -c "SELECT count(*) FROM outbox_event"))); done
  echo $t
}
while :; do
  RSS=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
  PEAK=$(( RSS > PEAK ? RSS : PEAK )); SUM=$((SUM + RSS)); SAMPLES=$((SAMPLES + 1))
  [ $((SAMPLES % 5)) -eq 0 ] && [ "$(pending)" -eq 0 ] && break
  sleep 0.2
done
END=$(date +%s.%N)
read -r UT ST < <(awk '{print $14, $15}' /proc/$PID/stat)
HWM=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
python3 - "$N" "$DBS" "$START" "$END" "$UT" "$ST" "$TICK" "$PEAK" "$SUM" "$SAMPLES" "$HWM" <<'PY'
import sys
n, dbs, start, end, ut, st, tick, peak, s, k, hwm = sys.argv[1:]
n, dbs = int(n), int(dbs)
wall = float(end) - float(start)
cpu = (int(ut) + int(st)) / int(tick)
total = n * dbs
print(f"databases {dbs}, events {total}, drained in {wall:.1f} s ({total / wall:.0f} events/s, sampled every 5th 200 ms tick)")
print(f"relay CPU {cpu:.1f} s = {cpu / wall:.2f} cores on average, {cpu / total * 1e6:.1f} us per event")
print(f"relay RSS peak {int(hwm) / 1024:.1f} MiB (VmHWM), mean {int(s) / int(k) / 1024:.1f} MiB while draining")
PY
