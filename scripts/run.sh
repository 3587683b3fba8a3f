#!/usr/bin/env bash
# The main job: makes sure PostgreSQL, NATS (JetStream) and RabbitMQ run, builds, and starts the
# inventory service with its relay in-process against DATABASE_URL (default: the local `root`
# database), publishing to the local NATS. It applies the migrations itself, serves the API on
# 127.0.0.1:8080 and the relay's /metrics, /healthz, /readyz on 127.0.0.1:9188, and prints a
# bearer token for the tenant `demo`, good for both services (an Ed25519 key pair made for the run
# unless INVENTORY_JWT_SECRET or INVENTORY_JWT_PUBLIC_KEY_FILE is set). Beside it runs the
# read-model service (the consumer runtime's example: the inventory's events into a read model,
# `GET 127.0.0.1:8090/tenants/demo/variants` with that token). The two are a unit
# (scripts/lib/supervise.sh): when either ends, the script says which one and with what exit code,
# stops the other and exits with that code; Ctrl-C (or SIGTERM) stops both. Both migrate the same
# database at start; they take turns (outbox::schema::migrate_all). Extra arguments go to
# `inventory serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
export DATABASE_URL="${DATABASE_URL:-postgres://root@127.0.0.1:5432/root}"
# Token keys. Both services verify the same tokens; only the inventory's `token` command mints.
# Default: an Ed25519 key pair for this run, so that the read model gets the public half only
# (it cannot mint). With INVENTORY_JWT_SECRET set (HS256), the read model gets that secret too,
# and so could mint tokens for every tenant: prefer a key pair outside a demo.
keys=
if [ -n "${INVENTORY_JWT_SECRET:-}" ]; then
  export READ_MODEL_JWT_SECRET="${READ_MODEL_JWT_SECRET:-$INVENTORY_JWT_SECRET}"
  echo "run: HS256 (INVENTORY_JWT_SECRET): the read model holds the secret and could mint tokens" >&2
elif [ -z "${INVENTORY_JWT_PUBLIC_KEY_FILE:-}" ]; then
  keys=$(mktemp -d)
  if openssl genpkey -algorithm ed25519 -out "$keys/private.pem" 2>/dev/null &&
     openssl pkey -in "$keys/private.pem" -pubout -out "$keys/public.pem" 2>/dev/null; then
    # A key pair for this run only: tokens minted below stop working when the services restart.
    export INVENTORY_JWT_PUBLIC_KEY_FILE="$keys/public.pem"
    export INVENTORY_JWT_PRIVATE_KEY_FILE="$keys/private.pem"
    echo "run: an Ed25519 key pair for this run in $keys (mint more tokens: inventory token --jwt-private-key-file $keys/private.pem)" >&2
  else
    # No openssl: a random HS256 secret for this run (the read model holds it too).
    INVENTORY_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export INVENTORY_JWT_SECRET READ_MODEL_JWT_SECRET="$INVENTORY_JWT_SECRET"
    echo "run: no openssl for a key pair; using a random HS256 secret for this run" >&2
  fi
fi
if [ -n "${INVENTORY_JWT_PUBLIC_KEY_FILE:-}" ]; then
  export READ_MODEL_JWT_PUBLIC_KEY_FILE="${READ_MODEL_JWT_PUBLIC_KEY_FILE:-$INVENTORY_JWT_PUBLIC_KEY_FILE}"
fi
source scripts/lib/supervise.sh
cargo build --release --locked -p inventory -p outbox-cli -p read-model
bin="${CARGO_TARGET_DIR:-target}/release"
if [ -n "${INVENTORY_JWT_SECRET:-}" ] || [ -n "${INVENTORY_JWT_PRIVATE_KEY_FILE:-}" ]; then
  token=$("$bin"/inventory token --tenant demo --sub demo-user --ttl-secs 86400)
  echo "run: a bearer token for tenant 'demo' (24 h), for both services:" >&2
  echo "$token"
else
  echo "run: INVENTORY_JWT_PRIVATE_KEY_FILE is not set: no token printed (mint with your issuer's private key)" >&2
fi
"$bin"/read-model &
read_model=$!
# Should this shell itself fail, the services do not outlive it.
trap 'kill "$read_model" ${inventory:-} 2>/dev/null || true; [ -z "$keys" ] || rm -rf "$keys"' EXIT
"$bin"/inventory serve "$@" &
inventory=$!
echo "run: read model on http://127.0.0.1:8090/tenants/demo/variants (pid $read_model; send the token)" >&2
echo "run: inventory on http://127.0.0.1:8080 (pid $inventory); Ctrl-C stops both" >&2
supervise read-model "$read_model" inventory "$inventory"
