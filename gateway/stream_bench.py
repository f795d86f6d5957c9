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
3. *Kafka floor*: ``--writes`` produce -> consume round trips, one at a time, with the relay's
   producer settings (``acks=all``, idempotent) and a plain consumer: the part of step 2 no
   UniHealth code can remove.
4. *Relay throughput* over real change events: with the relay process stopped, ``unihealth
   import`` writes demo data of at least ``--events`` resources through the repository (one outbox
   row each); then :class:`streams.relay.Relay` — the relay process's code, run in the bench
   process so the clock is exact — drains them in batches of 500 as the relay login, to Kafka
   through a producer configured as the relay process's (``acks=all``, idempotent), and the bench
   waits until the worker's ``invalidate`` agent has handled them all (its processed counter on the
   worker's ``/metrics``, polled every 20 ms; timed from the start of the drain). The same is
   repeated with a second import drained to an in-process bus without subscribers (the relay's own
   cost: read, claim, mark). The relay process is started again afterwards.

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
from typing import TYPE_CHECKING, Any, Final

import httpx
import redis

from .processes import (
    ProcessError,
    Server,
    free_port,
    last_line,
    metric_sum,
    python_module,
    run_logged,
    scrape,
    tail,
)
from .topology import Topology, TopologyOptions

if TYPE_CHECKING:
    from streams.bus import Bus

JSON_SCHEMA_VERSION: Final = 1
POLL_SECONDS: Final = 0.0005
RELAY_BATCH: Final = 500  # rows per drain, as `unihealth streams relay --batch`
RESOURCES_PER_PATIENT: Final = 38.7  # what the demo data writes per patient (measured)
RELAY_SEEDS: Final = (7001, 7002)  # the two imports of the relay throughput (distinct ids)
WORKER_PROCESSED: Final = "unihealth_worker_processed_total"


class StreamBenchError(ProcessError):
    """A step of the streams bench failed; the message says which."""


@dataclass(slots=True)
class LatencyRow:
    """Write → invalidated summary on one edge: milliseconds from the write's 2xx answer until
    every cached entry of the patient's summary was gone from Redis; ``invalidated`` counts the
    writes seen invalidated in time. The Kafka floor row reuses it: ``writes`` messages produced,
    ``invalidated`` of them consumed, milliseconds from produce to consume."""

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


# --------------------------------------------------------------------------- Kafka floor


async def _kafka_round_trips(bootstrap: str, count: int, wait: float) -> list[float]:
    """``count`` produce -> consume round trips (ms), one at a time, through a producer configured
    as the relay's (:class:`streams.bus.KafkaBus`: ``acks=all``, idempotent, ``linger_ms=2``) and
    a plain consumer already positioned at the end of a one-partition topic of its own."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.bus import KafkaBus
    from streams.worker import ensure_topics

    topic = f"unihealth.bench.floor.{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, [topic], 1, 1)
    bus = KafkaBus(bootstrap, client_id="unihealth-streams-bench", connect_timeout=30.0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, fetch_max_wait_ms=500)
    samples: list[float] = []
    await bus.start()
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_end(partition)
        for n in range(count):
            value = str(n).encode()
            began = time.perf_counter()
            await bus.publish(topic, b"floor", value)
            async with asyncio.timeout(wait):
                while (await consumer.getone()).value != value:
                    pass
            samples.append((time.perf_counter() - began) * 1000)
    finally:
        await consumer.stop()
        await bus.stop()
    return samples


def measure_kafka_floor(bootstrap: str, count: int, timeout: float = 10.0) -> LatencyRow:
    """The floor under the production latency: Kafka alone, produce (acknowledged) -> consumed."""
    samples = asyncio.run(_kafka_round_trips(bootstrap, count, timeout))
    return LatencyRow(
        "Kafka floor",
        "produce (acks=all, idempotent) -> consume, one at a time",
        count,
        len(samples),
        percentile(samples, 0.50),
        percentile(samples, 0.95),
        percentile(samples, 0.99),
        round(max(samples), 2) if samples else None,
    )


# --------------------------------------------------------------------------- relay throughput


def _wait_for(read: Callable[[], float | None], done: Callable[[float], bool], began: float, limit: float) -> float:
    """Poll ``read`` every 20 ms until ``done`` holds for it; seconds since ``began`` (or raise)."""
    while True:
        value = read()
        if value is not None and done(value):
            return time.perf_counter() - began
        if time.perf_counter() - began > limit:
            raise StreamBenchError(f"not done within {limit:.0f}s (last reading {value})")
        time.sleep(0.02)


def import_demo_data(topology: Topology, work: Path, events: int, seed: int) -> None:
    """Real change events: demo data of enough patients for at least ``events`` resources (one
    facility, ``seed``), written through the repository by ``unihealth import`` (a subprocess, as
    the owner, relay off: :meth:`Topology.import_env`), so each resource commits one outbox row."""
    from .demo_data import write_ndjson

    ndjson = work / f"relay-{seed}.ndjson"
    patients = max(1, math.ceil(events / RESOURCES_PER_PATIENT))
    while (written := write_ndjson(ndjson, patients, 1, seed)) < events:  # patients vary in size
        patients = math.ceil(patients * events / written) + 1
    log_file = work / f"relay-{seed}.import.log"
    status = run_logged(
        python_module("gateway.cli", "import", str(ndjson)), topology.import_env(), log_file, 900.0, "unihealth import"
    )
    if status != 0:
        raise StreamBenchError(f"unihealth import failed (status {status}): {last_line(log_file)}\n{tail(log_file)}")


async def drain(relay_url: str, bus: Bus, limit: float) -> tuple[int, float]:
    """Publish every unpublished outbox row with :class:`streams.relay.Relay` (batches of 500, as
    ``unihealth streams relay``) to the started ``bus``: (rows published, seconds)."""
    from streams.relay import Relay
    from subgraphs.store.database import open_database

    db = open_database(relay_url, pool_size=2)
    try:
        relay = Relay(db, bus)
        began = time.perf_counter()
        async with asyncio.timeout(limit):
            while await relay.drain_once(RELAY_BATCH):
                pass
        return relay.published, time.perf_counter() - began
    finally:
        await db.dispose()


async def _drain_to(relay_url: str, kafka_bootstrap: str | None, limit: float) -> tuple[int, float]:
    """:func:`drain` to Kafka (a bus configured as the relay process's), or to an in-process bus
    without subscribers when ``kafka_bootstrap`` is None."""
    from streams.bus import InProcessBus, KafkaBus

    bus: Bus = (
        KafkaBus(kafka_bootstrap, client_id="unihealth-relay", connect_timeout=30.0)
        if kafka_bootstrap
        else InProcessBus()
    )
    await bus.start()
    try:
        return await drain(relay_url, bus, limit)
    finally:
        await bus.stop()


def _throughput(stage: str, published: int, seconds: float) -> ThroughputRow:
    return ThroughputRow(stage, published, round(seconds, 2), round(published / seconds) if seconds > 0 else None)


def _relay_to_kafka(topology: Topology, relay_url: str, limit: float) -> list[ThroughputRow]:
    """Drain the outbox to Kafka, then wait for the worker's ``invalidate`` agent to handle it all."""
    worker_metrics = topology.servers["worker"].health.replace("/healthz", "/metrics")

    def invalidated() -> float | None:
        return metric_sum(scrape(worker_metrics), WORKER_PROCESSED, agent="invalidate")

    before = invalidated() or 0.0
    began = time.perf_counter()
    published, seconds = asyncio.run(_drain_to(relay_url, topology.kafka_bootstrap, limit))
    rows = [_throughput("relay: outbox -> Kafka (acks=all, idempotent)", published, seconds)]
    stage = "worker: Kafka -> invalidate agent done"
    try:
        rows.append(
            _throughput(stage, published, _wait_for(invalidated, lambda v: v >= before + published, began, limit))
        )
    except StreamBenchError:
        rows.append(ThroughputRow(stage, published, None, None))
    return rows


def measure_relay(topology: Topology, work: Path, events: int, limit: float = 600.0) -> list[ThroughputRow]:
    """Step 4 of the module contract: the relay to Kafka (and the worker's catch-up) and to the
    in-process bus, each over its own import of real change events. The relay process is stopped
    meanwhile (so the bench's relay owns the backlog) and started again at the end."""
    from streams.relay_service import relay_database_url

    from .settings import load_settings

    relay_process = topology.servers["relay"]
    relay_metrics = relay_process.health.replace("/healthz", "/metrics")
    _wait_for(
        lambda: metric_sum(scrape(relay_metrics), "unihealth_outbox_unpublished"),
        lambda v: v == 0,
        time.perf_counter(),
        60,
    )
    relay_url = relay_database_url(load_settings(topology.service_env["relay"]))
    relay_process.stop()
    try:
        import_demo_data(topology, work, events, seed=RELAY_SEEDS[0])
        rows = _relay_to_kafka(topology, relay_url, limit)
        import_demo_data(topology, work, events, seed=RELAY_SEEDS[1])
        published, seconds = asyncio.run(_drain_to(relay_url, None, limit))
        rows.append(_throughput("relay: outbox -> in-process bus (baseline)", published, seconds))
    finally:
        relay_process.start(120.0)
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
        print(f"[streams bench] Kafka floor: {options.writes} round trips", flush=True)
        report.latency.append(measure_kafka_floor(topology.kafka_bootstrap, options.writes))
        print(f"[streams bench] relay throughput: at least {options.events} outbox rows, twice", flush=True)
        report.throughput.extend(measure_relay(topology, work, options.events))
    report.load_after = [round(x, 2) for x in os.getloadavg()]
    return report


def _cell(value: float | int | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def format_table(report: StreamBenchReport) -> str:
    lines = [
        f"UniHealth streams bench: {report.writes} sequential writes per edge, "
        f">= {report.events} outbox rows per drain; "
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
