#!/usr/bin/env bash
# Start a throw-away single-node Apache Kafka broker (KRaft, broker+controller in one JVM) for tests:
# fetches org.apache.kafka:kafka_2.13 and its runtime jars from Maven Central with
# `mvn dependency:copy-dependencies` on first use (cached in $XDG_CACHE_HOME/unihealth/kafka-VERSION),
# formats a KRaft store in a temporary directory, starts the broker on a free loopback port with the
# machine's Java 17, waits (bounded) until it answers a Metadata request listing itself, and prints
# `BOOTSTRAP DIR` on stdout (BOOTSTRAP is host:port). Stop it with: scripts/kafka.sh stop DIR
#
# Java 17+ and Maven come from Debian's packages when missing (Maven only for the first fetch).
# Environment: KAFKA_VERSION (default below), KAFKA_NUM_PARTITIONS (partitions of auto-created
# topics, default 3 so per-key ordering is exercised), KAFKA_START_TIMEOUT (seconds, default 90),
# JAVA (the java binary, default `java`).
# On failure the broker log tail goes to stderr and the exit status is non-zero.
#
# Crash tests: `scripts/kafka.sh kill DIR` kills the broker with SIGKILL and keeps DIR (its data);
# `scripts/kafka.sh start-again DIR` starts that broker again on the same port with the same data
# (no formatting), waits until it is ready and prints `BOOTSTRAP DIR` like a first start.
set -euo pipefail

if [ "${1:-}" = "kill" ]; then
  dir="${2:?usage: kafka.sh kill DIR}"
  if [ -f "$dir/broker.pid" ]; then
    pid=$(cat "$dir/broker.pid")
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  fi
  exit 0
fi

again=""
if [ "${1:-}" = "start-again" ]; then
  again="${2:?usage: kafka.sh start-again DIR}"
  [ -f "$again/server.properties" ] || { echo "$again has no server.properties" >&2; exit 1; }
fi

if [ "${1:-}" = "stop" ]; then
  dir="${2:?usage: kafka.sh stop DIR}"
  if [ -f "$dir/broker.pid" ]; then
    pid=$(cat "$dir/broker.pid")
    # TERM, then KILL after 5 s: the data is thrown away, a clean shutdown is only a courtesy.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  case "$dir" in /tmp/unihealth-kafka.*) rm -rf "$dir" ;; *) echo "not removing $dir (not ours)" >&2 ;; esac
  exit 0
fi

version="${KAFKA_VERSION:-4.2.1}"
log4j_version="${KAFKA_LOG4J_VERSION:-2.25.4}"   # the log4j-core version this Kafka depends on
partitions="${KAFKA_NUM_PARTITIONS:-3}"
timeout_s="${KAFKA_START_TIMEOUT:-90}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/unihealth/kafka-$version"

apt_install() {
  echo "installing Debian's $* (needed for the test Kafka broker)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "$@" >&2
}
java_major() { "$1" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'; }

java_bin="${JAVA:-java}"
major=0
command -v "$java_bin" >/dev/null 2>&1 && major=$(java_major "$java_bin")
if [ "${major:-0}" -lt 17 ]; then
  apt_install openjdk-17-jre-headless
  java_bin=$(ls -d /usr/lib/jvm/java-17-openjdk-*/bin/java | head -n 1)
fi

# ---------------------------------------------------------------- jars (cached)
if [ ! -f "$cache/.complete" ]; then
  command -v mvn >/dev/null 2>&1 || apt_install maven
  echo "fetching Apache Kafka $version from Maven Central into $cache" >&2
  mkdir -p "$(dirname "$cache")"
  work=$(mktemp -d "$(dirname "$cache")/.fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>unihealth.dev</groupId>
  <artifactId>kafka-broker-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$version</version>
      <scope>runtime</scope>
    </dependency>
    <!-- slf4j 1.x binding to log4j2, so the broker log is written (Kafka's own distribution ships it) -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$log4j_version</version>
      <scope>runtime</scope>
    </dependency>
  </dependencies>
</project>
EOF
  if ! mvn -B -q -f "$work/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$work/libs" >"$work/mvn.log" 2>&1; then
    tail -n 40 "$work/mvn.log" >&2
    exit 1
  fi
  rm -rf "$cache"
  mkdir -p "$cache"
  mv "$work/libs" "$cache/libs"
  touch "$cache/.complete"
  rm -rf "$work"
  trap - EXIT
fi

# ---------------------------------------------------------------- config
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
if [ -n "$again" ]; then
  dir="$again"
  port=$(sed -n 's|^listeners=PLAINTEXT://127.0.0.1:\([0-9]*\),.*|\1|p' "$dir/server.properties")
else
port=$(free_port)
cport=$(free_port)
while [ "$cport" = "$port" ]; do cport=$(free_port); done
dir=$(mktemp -d /tmp/unihealth-kafka.XXXXXX)

cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
auto.create.topics.enable=true
num.partitions=$partitions
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.segment.bytes=1048576
offsets.topic.segment.bytes=1048576
transaction.state.log.segment.bytes=1048576
log.retention.hours=1
num.network.threads=2
num.io.threads=4
EOF

cat >"$dir/log4j2.properties" <<EOF
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = OUT
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
EOF

fi

classpath="$cache/libs/*"
jvm=("$java_bin" -Xms128m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$dir/log4j2.properties" -cp "$classpath")

fail() {
  echo "$1" >&2
  [ -f "$dir/broker.log" ] && tail -n 60 "$dir/broker.log" >&2
  [ -f "$dir/broker.pid" ] && kill -KILL "$(cat "$dir/broker.pid")" 2>/dev/null || true
  [ -n "$again" ] || rm -rf "$dir"
  exit 1
}

# A KRaft cluster id is 16 random bytes, base64url without padding.
if [ -z "$again" ]; then
cluster_id=$(python3 -c 'import base64, uuid
while True:
    c = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not c.startswith("-"):  # a leading dash would parse as an option
        break
print(c)')
"${jvm[@]}" kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$dir/server.properties" \
  >"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; fail "formatting the KRaft store failed"; }
fi

# ---------------------------------------------------------------- start and wait
setsid nohup "${jvm[@]}" kafka.Kafka "$dir/server.properties" >>"$dir/broker.log" 2>&1 </dev/null &
echo $! >"$dir/broker.pid"

# Ready = a Metadata v4 request (the oldest version Kafka 4 still serves) lists this broker.
python3 - "$port" "$timeout_s" "$(cat "$dir/broker.pid")" <<'EOF' || fail "Kafka $version did not become ready on 127.0.0.1:$port within ${timeout_s}s"
import os, socket, struct, sys, time

port, timeout, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout


def alive() -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def brokers_listed() -> int:
    client = b"unihealth-ready"
    # header v1: api_key=3 (Metadata), version=4, correlation id, client id; body: topics=[] , auto-create=false
    body = struct.pack(">hhih", 3, 4, 1, len(client)) + client + struct.pack(">i?", 0, False)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.settimeout(2)
        s.sendall(struct.pack(">i", len(body)) + body)
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            if not chunk:
                raise OSError("closed")
            head += chunk
        (size,) = struct.unpack(">i", head)
        data = b""
        while len(data) < size:
            chunk = s.recv(size - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
    # response: correlation id, throttle_time_ms, brokers array length
    _corr, _throttle, count = struct.unpack(">iii", data[:12])
    return count


while time.monotonic() < deadline:
    if not alive():
        sys.exit("the broker process exited")
    try:
        if brokers_listed() > 0:
            sys.exit(0)
    except (OSError, struct.error):
        pass
    time.sleep(0.2)
sys.exit(1)
EOF

echo "127.0.0.1:$port $dir"
