#!/usr/bin/env bash
# The main job: makes sure PostgreSQL, NATS (JetStream) and RabbitMQ run, builds, and starts the
# inventory service with its relay in-process against DATABASE_URL (default: the local `root`
# database), publishing to the local NATS. It applies the migrations itself, serves the API on
# 127.0.0.1:8080 and the relay's /metrics, /healthz, /readyz on 127.0.0.1:9188, and prints a
# bearer token for the tenant `demo`. Beside it runs the read-model service (the consumer runtime's
# example: the inventory's events into a read model, `GET 127.0.0.1:8090/tenants/demo/variants`).
# The two are a unit (scripts/lib/supervise.sh): when either ends, the script says which one and
# with what exit code, stops the other and exits with that code; Ctrl-C (or SIGTERM) stops both.
# Both migrate the same database at start; they take turns (outbox::schema::migrate_all). Extra
# arguments go to `inventory serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
export DATABASE_URL="${DATABASE_URL:-postgres://root@127.0.0.1:5432/root}"
if [ -z "${INVENTORY_JWT_SECRET:-}" ]; then
  # A secret for this run only: tokens minted below stop working when the service restarts.
  INVENTORY_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  export INVENTORY_JWT_SECRET
  echo "run: INVENTORY_JWT_SECRET is not set; using a random secret for this run" >&2
fi
source scripts/lib/supervise.sh
cargo build --release --locked -p inventory -p outbox-cli -p read-model
bin="${CARGO_TARGET_DIR:-target}/release"
token=$("$bin"/inventory token --tenant demo --sub demo-user --ttl-secs 86400)
echo "run: a bearer token for tenant 'demo' (24 h):" >&2
echo "$token"
"$bin"/read-model &
read_model=$!
# Should this shell itself fail, the services do not outlive it.
trap 'kill "$read_model" ${inventory:-} 2>/dev/null || true' EXIT
"$bin"/inventory serve "$@" &
inventory=$!
echo "run: read model on http://127.0.0.1:8090/tenants/demo/variants (pid $read_model)" >&2
echo "run: inventory on http://127.0.0.1:8080 (pid $inventory); Ctrl-C stops both" >&2
supervise read-model "$read_model" inventory "$inventory"
