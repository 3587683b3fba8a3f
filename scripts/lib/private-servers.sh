# Sourced by scripts/profile-drain.sh and scripts/profile-steady.sh: a PostgreSQL and a nats-server
# of the run's own on free loopback ports, so that their processes' CPU is that run's only (the
# shared servers serve other tests at the same time). The PostgreSQL copies the shared server's
# settings (128 MB shared buffers, fsync and synchronous commit on, SSL on as sqlx prefers it) with
# autovacuum off unless AUTOVACUUM=on, and preloads pg_stat_statements.
#
# In: DIR (an empty directory of the run's), PG_EXTRA_CONF (more postgresql.conf lines, optional).
# Out: PGPORT, NPORT, PGPID, NPID, SSL, and the functions as_pg and stop_private_servers.
PGBIN=${TEST_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
NATS=${NATS_SERVER_BIN:-$(command -v nats-server || echo /usr/sbin/nats-server)}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PGPORT=$(free_port)
NPORT=$(free_port)

stop_private_servers() {
  [ -n "${NPID:-}" ] && kill -TERM "$NPID" 2>/dev/null && wait "$NPID" 2>/dev/null || true
  [ -f "$DIR/pg/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/pg" -m immediate stop >/dev/null 2>&1 || true
}

start_private_servers() {
  [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
  as_pg "$PGBIN/initdb" -D "$DIR/pg" -U root --auth=trust >/dev/null
  SSL=off
  if as_pg test -r /etc/ssl/private/ssl-cert-snakeoil.key; then SSL=on; fi
  cat >>"$DIR/pg/postgresql.conf" <<CONF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_buffers = 128MB
max_connections = 100
autovacuum = ${AUTOVACUUM:-off}
ssl = $SSL
ssl_cert_file = '/etc/ssl/certs/ssl-cert-snakeoil.pem'
ssl_key_file = '/etc/ssl/private/ssl-cert-snakeoil.key'
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track_utility = on
${PG_EXTRA_CONF:-}
CONF
  as_pg "$PGBIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg/log" -w start >/dev/null
  PGPID=$(head -1 "$DIR/pg/postmaster.pid")
  "$NATS" -js -sd "$DIR/nats" -a 127.0.0.1 -p "$NPORT" >"$DIR/nats.log" 2>&1 &
  NPID=$!
  for _ in $(seq 50); do (echo >"/dev/tcp/127.0.0.1/$NPORT") 2>/dev/null && break; sleep 0.1; done
}
