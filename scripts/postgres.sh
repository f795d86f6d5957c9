#!/usr/bin/env bash
# Start a throw-away PostgreSQL for tests: installs Debian's server package if no server binaries
# exist, initializes a cluster in a temporary directory, starts it on a free loopback port and
# prints the SQLAlchemy URL on stdout. Stop it with: scripts/postgres.sh stop DIR
#
# scripts/postgres.sh keep DIR [PORT]: the same server, but its cluster lives in DIR and survives
# (benchmark databases to measure again): initialized on first use, (re)started on PORT (default:
# the port it last used, else a free one), printing the URL and DIR; stop it, keeping the data,
# with: scripts/postgres.sh halt DIR. Extra server settings: UNIHEALTH_PG_OPTS (e.g.
# "-c shared_buffers=1GB").
set -euo pipefail

if [ "${1:-}" = "stop" ]; then
  dir="$2"
  bin=$(cat "$dir/.bindir")
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  else "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$dir"
  exit 0
fi

if [ "${1:-}" = "halt" ]; then
  dir="$2"
  bin=$(cat "$dir/.bindir")
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
  else "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true; fi
  exit 0
fi

find_bindir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

bin=$(find_bindir || true)
if [ -z "$bin" ]; then
  echo "PostgreSQL server not found; installing Debian's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  bin=$(find_bindir)
fi

keep=""
if [ "${1:-}" = "keep" ]; then
  keep=1
  dir="$2"
  mkdir -p "$dir"
  port="${3:-$(cat "$dir/.port" 2>/dev/null || true)}"
else
  dir=$(mktemp -d /tmp/unihealth-pg.XXXXXX)
  port=""
fi
echo "$bin" > "$dir/.bindir"
[ -n "$port" ] || port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
echo "$port" > "$dir/.port"
run=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --home "$dir" postgres
  chown postgres "$dir"
  run=(runuser -u postgres --)
fi
fresh=""
if [ ! -f "$dir/data/PG_VERSION" ]; then
  fresh=1
  "${run[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
fi
if [ -n "$keep" ] && "${run[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  : # already running (on the port in DIR/.port)
else
  "${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 ${UNIHEALTH_PG_OPTS:-}" \
    start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
fi
[ -z "$fresh" ] || "${run[@]}" "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -q -c "CREATE DATABASE unihealth" >/dev/null
echo "postgresql+asyncpg://postgres@127.0.0.1:$port/unihealth $dir"
