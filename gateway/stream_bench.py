"""``unihealth streams bench``: the change streams measured end to end (issue 5's benchmark).

Contract (prints one table and writes it as JSON; asserts nothing about speed):

1. Starts the production topology as processes (:class:`gateway.topology.Topology`: PostgreSQL,
   Redis, Kafka, the edge with ``UNIHEALTH_RELAY=off``, the relay process, the Faust worker; servers
   given with ``--postgres-url``/``--redis-url``/``--kafka`` are reused) and, as the baseline, an
   embedded edge (SQLite, in-process bus, inline relay) whose summary cache is the same Redis.
2. *Write → invalidated summary*, on each edge in turn, ``--writes`` times, one write at a time:
   read a patient's summary (cached in Redis), find its cache entries, POST an Observation for that
   patient, and from the moment the 2xx answer arrived poll Redis (``EXISTS``, every 0.5 ms) until
   every entry is gone — through outbox, relay process, Kafka, the worker and Redis on the
   production edge; through the inline relay and the in-process bus on the embedded one. A write
   whose entries are still there after ``--timeout`` seconds counts as *not invalidated*.
3. *Relay throughput*: commits ``--events`` outbox rows in one transaction (synthetic ``delete``
   change events of one facility, 500 patients, as a burst of writes would leave them), then
   measures until the relay process has published them all to Kafka (``acks=all``, idempotent
   producer; the unpublished count polled every 20 ms), and until the worker has consumed them
   (its change-topic consumer lag back to where it was).

Nothing runs at import time; everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import redis

from .processes import ProcessError, Server, free_port, python_module
from .topology import Topology, TopologyOptions

JSON_SCHEMA_VERSION: Final = 1
POLL_SECONDS: Final = 0.0005
SYNTHETIC_FACILITY: Final = "bench-streams"


class StreamBenchError(ProcessError):
    """A step of the streams bench failed; the message says which."""


@dataclass(slots=True)
class LatencyRow:
    """Write → invalidated summary on one edge: milliseconds from the write's 2xx answer until
    every cached entry of the patient's summary was gone from Redis."""

    target: str
    path: str
    writes: int
    invalidated: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    to_kafka_p50_ms: float | None = None  # the part until the relay produced the event (Kafka's timestamp)
    to_kafka_p95_ms: float | None = None


@dataclass(slots=True)
class ThroughputRow:
    """``events`` outbox rows committed at once, and how long until they were through a stage."""

    stage: str
    events: int
    seconds: float | None
    events_per_second: float | None


@dataclass(slots=True)
class StreamBenchReport:
    started: str
    writes: int
    events: int
    latency: list[LatencyRow] = field(default_factory=list)
    throughput: list[ThroughputRow] = field(default_factory=list)
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": JSON_SCHEMA_VERSION,
            "started": self.started,
            "cpus": os.cpu_count(),
            "load_average": {"before": self.load_before, "after": self.load_after},
            "writes": self.writes,
            "events": self.events,
            "latency": [asdict(r) for r in self.latency],
            "throughput": [asdict(r) for r in self.throughput],
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of ``values`` by the nearest-rank method; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return round(ordered[rank - 1], 2)


def _patient(i: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": f"Stream{i}", "given": ["Bench"]}], "gender": "unknown"}


def _observation(patient_id: str, value: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}
                ]
            }
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "valueQuantity": {"value": value, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }


def _summary_keys(cache: redis.Redis, facility: str, patient_id: str) -> list[bytes]:
    return list(cache.scan_iter(match=f"uh:{{{facility}}}:c:summary|{patient_id}|*", count=1000))


def measure_invalidation(
    target: str,
    path: str,
    edge_url: str,
    token: str,
    facility: str,
    cache: redis.Redis,
    *,
    writes: int,
    patients: int = 10,
    timeout: float = 10.0,
    acknowledged_at: dict[str, float] | None = None,
) -> LatencyRow:
    """Step 2 of the module contract on one edge; StreamBenchError if the edge misbehaves. With
    ``acknowledged_at``, records each written Observation's id with the wall-clock time (s) its
    write was acknowledged, for :func:`split_at_kafka`."""
    headers = {"Authorization": f"Bearer {token}", "X-Facility-Id": facility}
    fhir = f"{edge_url}/fhir/r5"
    samples: list[float] = []
    with httpx.Client(headers=headers, timeout=30) as http:
        ids = []
        for i in range(patients):
            created = http.post(f"{fhir}/Patient", json=_patient(i))
            if created.status_code != 201:
                raise StreamBenchError(f"{target}: creating a patient answered {created.status_code}: {created.text}")
            ids.append(str(created.json()["id"]))
        time.sleep(2.0)  # the creations' own invalidations land before any summary is cached
        for n in range(writes):
            pid = ids[n % len(ids)]
            keys: list[bytes] = []
            for _ in range(50):  # a store may be refused while an earlier change is invalidated
                read = http.get(f"{fhir}/Patient/{pid}/summary")
                if read.status_code != 200:
                    raise StreamBenchError(f"{target}: the summary answered {read.status_code}: {read.text}")
                if keys := _summary_keys(cache, facility, pid):
                    break
                time.sleep(0.05)
            if not keys:
                raise StreamBenchError(f"{target}: the summary of {pid} is never cached in Redis")
            written = http.post(f"{fhir}/Observation", json=_observation(pid, 60 + n % 40))
            acknowledged = time.perf_counter()
            if written.status_code != 201:
                raise StreamBenchError(f"{target}: the write answered {written.status_code}: {written.text}")
            if acknowledged_at is not None:
                acknowledged_at[str(written.json()["id"])] = time.time() - (time.perf_counter() - acknowledged)
            deadline = acknowledged + timeout
            while cache.exists(*keys):
                if time.perf_counter() > deadline:
                    break
                time.sleep(POLL_SECONDS)
            else:
                samples.append((time.perf_counter() - acknowledged) * 1000)
    return LatencyRow(
        target,
        path,
        writes,
        len(samples),
        percentile(samples, 0.50),
        percentile(samples, 0.95),
        percentile(samples, 0.99),
        round(max(samples), 2) if samples else None,
    )


async def _produced_at(bootstrap: str, facility: str, ids: set[str]) -> dict[str, float]:
    """Kafka's timestamp (the relay's produce time, s) of the change event of each Observation in ``ids``."""
    from aiokafka import AIOKafkaConsumer

    from streams.events import ChangeEvent, topic_for

    consumer = AIOKafkaConsumer(
        topic_for("Observation"), bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    found: dict[str, float] = {}
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            while len(found) < len(ids):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        event = ChangeEvent.from_json(r.value)
                        if event.facility == facility and event.resource_id in ids:
                            found.setdefault(event.resource_id, r.timestamp / 1000)
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return found


def split_at_kafka(row: LatencyRow, bootstrap: str, facility: str, acknowledged_at: dict[str, float]) -> None:
    """Fill ``row.to_kafka_*``: write acknowledged -> event produced by the relay (Kafka's clock is
    this machine's)."""
    produced = asyncio.run(_produced_at(bootstrap, facility, set(acknowledged_at)))
    parts = [max(0.0, (produced[i] - t) * 1000) for i, t in acknowledged_at.items() if i in produced]
    row.to_kafka_p50_ms, row.to_kafka_p95_ms = percentile(parts, 0.50), percentile(parts, 0.95)


# --------------------------------------------------------------------------- relay throughput


async def _insert_synthetic(owner_dsn: str, events: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(owner_dsn)
    try:
        await conn.execute(
            """INSERT INTO outbox (event_id, facility, type, id, version, operation, patient_id, occurred_at)
               SELECT gen_random_uuid()::text, $1, 'Observation', 'bench-o-' || g, 1, 'delete',
                      'bench-p-' || (g % 500), now()
               FROM generate_series(1, $2::int) AS g""",
            SYNTHETIC_FACILITY,
            events,
        )
    finally:
        await conn.close()


def _metric(url: str, name: str) -> float | None:
    """The sum of ``name``'s samples on a Prometheus text page (None: not there or unreachable)."""
    try:
        page = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith((name + " ", name + "{"))]
    return sum(values) if values else None


def _wait_for(read: Callable[[], float | None], done: Callable[[float], bool], began: float, limit: float) -> float:
    """Poll ``read`` every 20 ms until ``done`` holds for it; seconds since ``began`` (or raise)."""
    while True:
        value = read()
        if value is not None and done(value):
            return time.perf_counter() - began
        if time.perf_counter() - began > limit:
            raise StreamBenchError(f"not done within {limit:.0f}s (last reading {value})")
        time.sleep(0.02)


def measure_relay(topology: Topology, events: int, limit: float = 600.0) -> list[ThroughputRow]:
    """Step 3 of the module contract: the relay process to Kafka, and the worker's catch-up."""
    relay_metrics = topology.servers["relay"].health.replace("/healthz", "/metrics")
    worker_metrics = topology.servers["worker"].health.replace("/healthz", "/metrics")
    _wait_for(lambda: _metric(relay_metrics, "unihealth_outbox_unpublished"), lambda v: v == 0, time.perf_counter(), 60)
    lag_before = _metric(worker_metrics, "unihealth_consumer_lag_total") or 0.0
    dsn = topology.owner_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    asyncio.run(_insert_synthetic(dsn, events))
    began = time.perf_counter()
    published = _wait_for(
        lambda: _metric(relay_metrics, "unihealth_outbox_unpublished"), lambda v: v == 0, began, limit
    )
    rows = [ThroughputRow("relay: outbox -> Kafka (acks=all)", events, round(published, 2), round(events / published))]
    try:  # the worker measures its lag every few seconds: a coarse figure, reported as such
        consumed = _wait_for(
            lambda: _metric(worker_metrics, "unihealth_consumer_lag_total"), lambda v: v <= lag_before, began, limit
        )
        rows.append(ThroughputRow("worker: consumed (lag measured every 5 s)", events, round(consumed, 2), None))
    except StreamBenchError:
        rows.append(ThroughputRow("worker: consumed (lag measured every 5 s)", events, None, None))
    return rows


# --------------------------------------------------------------------------- the run


def _embedded_edge(stack: contextlib.ExitStack, work: Path, redis_url: str) -> tuple[Server, dict[str, str]]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("UNIHEALTH_")},
        "UNIHEALTH_PROFILE": "embedded",
        "UNIHEALTH_DATA_DIR": str(work / "embedded"),
        "UNIHEALTH_CACHE_URL": redis_url,
        "UNIHEALTH_SUMMARY_TTL": "3600",
    }
    port = free_port()
    server = Server(
        "unihealth serve (embedded)",
        python_module("gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        env,
        work / "embedded.serve.log",
        port,
    )
    stack.callback(server.stop)
    server.start(120.0)
    return server, env


def run(options: argparse.Namespace) -> StreamBenchReport:
    """The whole bench (see the module contract)."""
    from .security.tokens import mint
    from .settings import load_settings

    report = StreamBenchReport(datetime.now(UTC).isoformat(timespec="seconds"), options.writes, options.events)
    report.load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(options.work_dir or tempfile.mkdtemp(prefix="unihealth-streams-bench-"))
    with contextlib.ExitStack() as stack:
        topology = Topology(
            TopologyOptions(
                postgres_url=options.postgres_url,
                redis_url=options.redis_url,
                kafka_bootstrap=options.kafka,
                work_dir=work / "topology",
                ports="free",
                extra_env={"UNIHEALTH_SUMMARY_TTL": "3600"},
            )
        )
        stack.callback(topology.down)
        print(f"[streams bench] starting the topology as processes (logs in {topology.options.work_dir})", flush=True)
        topology.up()
        cache = redis.Redis.from_url(topology.redis_url, socket_timeout=5)
        stack.callback(cache.close)

        facility = f"sb-{uuid.uuid4().hex[:10]}"
        print(f"[streams bench] production: {options.writes} writes", flush=True)
        acknowledged_at: dict[str, float] = {}
        production = measure_invalidation(
            "production",
            "outbox -> relay process -> Kafka -> Faust worker -> Redis",
            topology.edge_url,
            topology.mint_token(facility),
            facility,
            cache,
            writes=options.writes,
            timeout=options.timeout,
            acknowledged_at=acknowledged_at,
        )
        split_at_kafka(production, topology.kafka_bootstrap, facility, acknowledged_at)
        report.latency.append(production)
        embedded, env = _embedded_edge(stack, work, topology.redis_url)
        facility = f"sb-{uuid.uuid4().hex[:10]}"
        token = mint(load_settings(env), facilities=[facility], roles=["clinician"], algorithm="HS256")
        print(f"[streams bench] embedded baseline: {options.writes} writes", flush=True)
        report.latency.append(
            measure_invalidation(
                "embedded (baseline)",
                "outbox -> inline relay -> in-process bus -> Redis",
                embedded.base,
                token,
                facility,
                cache,
                writes=options.writes,
                timeout=options.timeout,
            )
        )
        print(f"[streams bench] relay throughput: {options.events} outbox rows", flush=True)
        report.throughput.extend(measure_relay(topology, options.events))
    report.load_after = [round(x, 2) for x in os.getloadavg()]
    return report


def _cell(value: float | int | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def format_table(report: StreamBenchReport) -> str:
    lines = [
        f"UniHealth streams bench: {report.writes} sequential writes per edge, {report.events} outbox rows; "
        f"{os.cpu_count()} CPUs, load average {report.load_before} before / {report.load_after} after",
        "",
        f"{'write -> invalidated summary':<22} {'path':<58} {'writes':>6} {'done':>5} "
        f"{'P50 ms':>8} {'P95 ms':>8} {'P99 ms':>8} {'max ms':>8} {'to Kafka P50/P95':>17}",
    ]
    for r in report.latency:
        split = "-" if r.to_kafka_p50_ms is None else f"{_cell(r.to_kafka_p50_ms)} / {_cell(r.to_kafka_p95_ms)}"
        lines.append(
            f"{r.target:<22} {r.path:<58} {r.writes:>6} {r.invalidated:>5} {_cell(r.p50_ms):>8} "
            f"{_cell(r.p95_ms):>8} {_cell(r.p99_ms):>8} {_cell(r.max_ms):>8} "
            f"{split:>17}"
        )
    lines += ["", f"{'throughput':<46} {'events':>8} {'seconds':>8} {'events/s':>9}"]
    for t in report.throughput:
        lines.append(f"{t.stage:<46} {t.events:>8,} {_cell(t.seconds):>8} {_cell(t.events_per_second, 0):>9}")
    lines.append(
        "  latency: from the write's 2xx answer until every Redis entry of the patient's summary was gone "
        "(polled every 0.5 ms); 'done' = writes invalidated within the timeout; 'to Kafka': the part until the "
        "relay produced the event (the record's timestamp), the rest is Kafka -> worker -> Redis"
    )
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> None:
    if args.writes < 1 or args.events < 1:
        raise SystemExit("unihealth streams bench: --writes and --events must be at least 1")
    try:
        report = run(args)
    except ProcessError as exc:
        raise SystemExit(f"unihealth streams bench: {exc}") from None
    print(format_table(report))
    out: Path = (
        args.json_out or Path("bench-results") / f"streams-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    print(f"\nwrote {out}")
