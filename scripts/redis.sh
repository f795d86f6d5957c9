#!/usr/bin/env bash
# Start a throw-away Redis for tests: installs Debian's redis-server package if `redis-server` is not
# found, starts it on a free loopback port with its working directory in a temporary directory and no
# persistence (no RDB snapshots, no AOF), waits (bounded) until it answers PING, and prints
# `URL DIR` on stdout (URL like redis://127.0.0.1:PORT/0). Stop it with: scripts/redis.sh stop DIR
set -euo pipefail

if [ "${1:-}" = "stop" ]; then
  dir="${2:?usage: redis.sh stop DIR}"
  if [ -f "$dir/redis.pid" ]; then
    pid=$(cat "$dir/redis.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  case "$dir" in /tmp/unihealth-redis.*) rm -rf "$dir" ;; *) echo "not removing $dir (not ours)" >&2 ;; esac
  exit 0
fi

timeout_s="${REDIS_START_TIMEOUT:-30}"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found; installing Debian's redis-server package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends redis-server >&2
fi

dir=$(mktemp -d /tmp/unihealth-redis.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
cat >"$dir/redis.conf" <<EOF
bind 127.0.0.1
port $port
protected-mode yes
daemonize yes
pidfile $dir/redis.pid
dir $dir
logfile $dir/redis.log
save ""
appendonly no
databases 16
EOF
redis-server "$dir/redis.conf" || { cat "$dir/redis.log" >&2 2>/dev/null; rm -rf "$dir"; exit 1; }

# Ready = a PING over the wire gets +PONG (stdlib only; no redis-cli needed).
if ! python3 - "$port" "$timeout_s" <<'EOF'
import socket, sys, time

port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.05)
sys.exit(1)
EOF
then
  echo "Redis did not answer PING on 127.0.0.1:$port within ${timeout_s}s" >&2
  tail -n 40 "$dir/redis.log" >&2 2>/dev/null || true
  [ -f "$dir/redis.pid" ] && kill -KILL "$(cat "$dir/redis.pid")" 2>/dev/null || true
  rm -rf "$dir"
  exit 1
fi
echo "redis://127.0.0.1:$port/0 $dir"
