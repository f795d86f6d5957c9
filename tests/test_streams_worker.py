"""Slice 2 of the change streams: the stream worker (Faust) and its agents, the cache, the embedded twin.

Real Kafka (``kafka_bootstrap``), real Redis (``redis_url``), and the contract backends (SQLite and
a real PostgreSQL). The worker runs as a real subprocess (``python -m streams.cli worker``). The
helpers at the top are shared with ``test_streams_crash.py`` and ``test_deidentify.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from sqlalchemy import select
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.security.audit import AccessAudit, audit_event
from streams import audit_chain
from streams.bus import InProcessBus, KafkaBus, Message
from streams.cache import Cache, MemoryCache, RedisCache, ancestors
from streams.embedded import subscribe_embedded
from streams.events import AUDIT_TOPIC, TOPIC_PREFIX, AuditRecord, ChangeEvent, topic_for
from streams.invalidation import CacheInvalidator, affected, graphql_prefix, resource_key, search_prefix, summary_key
from streams.processing import DEAD_LETTER_TOPIC, DeadLetter, Processor, Record
from streams.relay import Relay
from streams.worker import CHANGE_TOPICS, WorkerOptions, build_services, ensure_topics
from subgraphs.store.access import AccessPolicy
from subgraphs.store.database import Database
from subgraphs.store.repository import ResourceRepository
from subgraphs.store.schema import audit_log, outbox
from tests.conftest import DEV_JWT_KEY, SECRET, token_for
from tests.helpers import observation, patient

pytest_plugins = ["tests.streams_services"]  # the kafka_bootstrap and redis_url session fixtures

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0  # bound on every wait
POISONED_CHANGE_TOPIC = topic_for("Provenance")


# ------------------------------------------------------------------------------------------ shared helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream_env(database_url: str, bootstrap: str, data_dir: Path, relay_url: str | None = None) -> dict[str, str]:
    """The environment of a relay or worker subprocess: only these UNIHEALTH_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIHEALTH_")}
    env.update(
        UNIHEALTH_DATABASE_URL=database_url,
        UNIHEALTH_BUS="kafka",
        UNIHEALTH_KAFKA_BOOTSTRAP=bootstrap,
        UNIHEALTH_SECRET_KEY=SECRET.decode(),
        UNIHEALTH_DEV_JWT_KEY=DEV_JWT_KEY.decode(),
        UNIHEALTH_DATA_DIR=str(data_dir),
        UNIHEALTH_RELAY="off",
        PYTHONUNBUFFERED="1",
    )
    if relay_url:
        env["UNIHEALTH_RELAY_DATABASE_URL"] = relay_url
    return env


class StreamProcess:
    """``python -m streams.cli <args>`` as a real subprocess in its own session, logging to a file."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = list(args)
        self.env = env
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> StreamProcess:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts}: {' '.join(self.args)}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", *self.args],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL, as a crash: no shutdown code runs."""
        assert self.proc is not None and self.alive, f"{self.name} is not running:\n{self.tail()}"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (bounded), SIGKILL past ``timeout``; the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


async def eventually(check: Callable[[], Awaitable[bool]], what: str, limit: float = WAIT, every: float = 0.05) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit:.0f}s waiting for {what}")
        await asyncio.sleep(every)


async def partitions(bootstrap: str, topics: Sequence[str]) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    async with asyncio.timeout(WAIT):
        await admin.start()
        try:
            described = await admin.describe_topics(list(topics))
        finally:
            await admin.close()
    return [
        TopicPartition(t["topic"], p["partition"]) for t in described if t["error_code"] == 0 for p in t["partitions"]
    ]


async def group_at_end(bootstrap: str, group: str, topics: Sequence[str]) -> None:
    """Create ``topics`` if missing and commit ``group``'s offsets at their current ends, so a
    worker of that group starts with what is published from now on (not the session's backlog)."""
    await ensure_topics(bootstrap, list(topics), 3, 1)
    tps = await partitions(bootstrap, topics)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    async with asyncio.timeout(WAIT):
        await consumer.start()
        try:
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            await consumer.commit(dict(ends.items()))
        finally:
            await consumer.stop()


async def read_topics(bootstrap: str, topics: Sequence[str]) -> list[Any]:
    """Every record now on ``topics`` (offset 0 up to the current end), as aiokafka records."""
    tps = await partitions(bootstrap, topics)
    if not tps:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    records: list[Any] = []
    async with asyncio.timeout(WAIT):
        await consumer.start()
        try:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(batch)
        finally:
            await consumer.stop()
    return records


async def produce(bootstrap: str, messages: Sequence[tuple[str, bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    async with asyncio.timeout(WAIT):
        await producer.start()
        try:
            for topic, key, value in messages:
                await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()


async def drain_to_kafka(db: Database, bootstrap: str) -> int:
    """Publish every unpublished outbox row (the relay's job, run here, bounded)."""
    bus = KafkaBus(bootstrap)
    await bus.start()
    total = 0
    try:
        relay = Relay(db, bus)
        async with asyncio.timeout(WAIT * 2):
            while n := await relay.drain_once(1000):
                total += n
    finally:
        await bus.stop()
    return total


async def audit_outbox_ids(db: Database, facility: str) -> list[str]:
    """Event ids of ``facility``'s access records in the outbox (every audited request)."""
    async with db.transaction(write=False, facility=facility) as conn:
        rows = await conn.execute(
            select(outbox.c.event_id).where(outbox.c.facility == facility, outbox.c.operation == "audit")
        )
        return [r.event_id for r in rows]


async def change_outbox_rows(db: Database, facility: str) -> list[Any]:
    async with db.transaction(write=False, facility=facility) as conn:
        rows = await conn.execute(
            select(outbox).where(outbox.c.facility == facility, outbox.c.operation != "audit").order_by(outbox.c.seq)
        )
        return list(rows)


async def chained_ids(db: Database, facility: str) -> list[str]:
    """Event ids in ``facility``'s audit chain, in ``seq`` order."""
    async with db.transaction(write=False, facility=facility) as conn:
        rows = await conn.execute(
            select(audit_log.c.event_id).where(audit_log.c.facility == facility).order_by(audit_log.c.seq)
        )
        return [r.event_id for r in rows]


async def metrics_text(port: int) -> str:
    """The /metrics page on ``port`` ("" while nothing answers there yet)."""
    async with httpx.AsyncClient(timeout=10) as http:
        try:
            r = await http.get(f"http://127.0.0.1:{port}/metrics")
        except httpx.TransportError:
            return ""
        return r.text if r.status_code == 200 else ""


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text page (None if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    head = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith(head + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def app_database_url(app: Starlette) -> str:
    """The URL the edge itself uses (the runtime role on PostgreSQL): the worker's database."""
    return str(app.state.backends.settings.database_url)


@asynccontextmanager
async def api(app: Starlette, facility: str) -> AsyncIterator[httpx.AsyncClient]:
    """A REST client of ``app`` for ``facility`` (admin, integration and auditor roles)."""
    token = token_for(app.state.backends.settings, [facility])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver/fhir/r5",
        headers={
            "X-Facility-Id": facility,
            "Content-Type": "application/fhir+json",
            "Authorization": f"Bearer {token}",
        },
        timeout=60,
    ) as c:
        yield c


def change(
    facility: str, resource_type: str, resource_id: str, patient_id: str | None, version: int = 1
) -> ChangeEvent:
    return ChangeEvent(
        event_id=str(uuid.uuid4()),
        facility=facility,
        resource_type=resource_type,
        resource_id=resource_id,
        version=version,
        operation="create" if version == 1 else "update",
        patient_id=patient_id,
        occurred_at="2026-01-31T10:00:00.123Z",
    )


def cache_keys(facility: str, pid: str) -> list[str]:
    """The views of ``pid`` a reader would have cached: the summary and two GraphQL variants."""
    return [
        summary_key(facility, pid),
        graphql_prefix(facility, pid) + "q1",
        graphql_prefix(facility, pid) + "q2",
    ]


# ------------------------------------------------------------------------------------------ cache contract
@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    if request.param == "memory":
        c: Cache = MemoryCache(max_entries=1000)
    else:
        c = RedisCache.from_url(request.getfixturevalue("redis_url"), namespace=f"t{uuid.uuid4().hex[:8]}:")
    try:
        yield c
    finally:
        await c.close()


async def test_cache_contract(cache: Cache) -> None:
    f, g = f"f-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    assert await cache.get(f"{f}|x|1") is None
    await cache.set(f"{f}|x|1", b"\x00one", 30)
    await cache.set(f"{f}|x|1", b"\x00uno", 30)  # overwrite
    assert await cache.get(f"{f}|x|1") == b"\x00uno"
    await cache.set(f"{f}|search|Observation|a", b"s1", 30)
    await cache.set(f"{f}|search|Observation|b", b"s2", 30)
    await cache.set(f"{f}|search|Patient|a", b"s3", 30)
    await cache.set(f"{f}|graphql|p1|q1", b"g1", 30)
    await cache.set(f"{f}|graphql|p10|q1", b"g10", 30)  # p1| must not match p10|
    await cache.set(f"{g}|search|Observation|a", b"other facility", 30)
    assert await cache.delete_prefix(f"{f}|search|Observation|") == 2
    assert await cache.get(f"{f}|search|Observation|a") is None
    assert await cache.get(f"{f}|search|Patient|a") == b"s3"
    assert await cache.get(f"{g}|search|Observation|a") == b"other facility", "never across facilities"
    assert await cache.delete_prefix(f"{f}|graphql|p1|") == 1
    assert await cache.get(f"{f}|graphql|p10|q1") == b"g10"
    assert await cache.delete_prefix(f"{f}|search|Observation|") == 0, "idempotent"
    await cache.set(f"{f}|search|Observation|c", b"again", 30)  # a deleted tag works again
    assert await cache.get(f"{f}|search|Observation|c") == b"again"
    assert await cache.delete(f"{f}|x|1", f"{f}|x|missing") == 1
    assert await cache.delete_prefix(f"{f}|") == 3, "the whole facility"
    assert await cache.get(f"{g}|search|Observation|a") == b"other facility"
    await cache.set(f"{f}|short|1", b"v", 0.05)
    await asyncio.sleep(0.15)
    assert await cache.get(f"{f}|short|1") is None, "expired"
    for bad in ("nofacility", "|x|1", "f|", "{f}|x"):
        with pytest.raises(ValueError):
            await cache.set(bad, b"v", 1)
    for bad_prefix in ("f|search", "f", "|x|", "f||"):
        with pytest.raises(ValueError):
            await cache.delete_prefix(bad_prefix)
    with pytest.raises(ValueError):
        await cache.set(f"{f}|x|2", b"v", 0)


async def test_memory_cache_evicts_least_recently_used() -> None:
    cache = MemoryCache(max_entries=3)
    for i in range(3):
        await cache.set(f"f|k|{i}", b"v", 30)
    assert await cache.get("f|k|0") == b"v"  # now most recently used
    await cache.set("f|k|3", b"v", 30)
    assert await cache.get("f|k|1") is None and await cache.get("f|k|0") == b"v" and len(cache) == 3
    assert await cache.delete_prefix("f|k|") == 3 and len(cache) == 0
    assert ancestors("f|a|b|c") == ["f|", "f|a|", "f|a|b|"]


async def test_redis_tag_sets_do_not_outlive_their_entries(redis_url: str) -> None:
    cache = RedisCache.from_url(redis_url, namespace=f"t{uuid.uuid4().hex[:8]}:")
    try:
        await cache.set("f|search|Observation|a", b"1", 5)
        await cache.set("f|search|Observation|b", b"1", 60)
        ttl = await cache.client.pttl(cache._tag("f|search|Observation|"))
        assert 55_000 < ttl <= 60_000, "a tag set lives as long as its longest-lived entry"
        await cache.delete_prefix("f|search|Observation|")
        assert await cache.client.exists(cache._tag("f|search|Observation|")) == 0
    finally:
        await cache.close()


def test_affected_entries_of_a_change() -> None:
    obs = affected(change("fac", "Observation", "o1", "p1"))
    assert obs.keys == ("fac|Observation|o1", "fac|summary|p1")
    assert obs.prefixes == ("fac|search|Observation|", "fac|summary|p1|", "fac|graphql|p1|")
    pat = affected(change("fac", "Patient", "p1", None))
    assert "fac|summary|p1" in pat.keys and "fac|graphql|p1|" in pat.prefixes
    audit = affected(change("fac", "AuditEvent", "a1", "p1"))  # the sealer stores one per access
    assert audit.keys == ("fac|AuditEvent|a1",) and audit.prefixes == ("fac|search|AuditEvent|",)
    med = affected(change("fac", "Medication", "m1", None))
    assert med.keys == ("fac|Medication|m1",) and med.prefixes == (search_prefix("fac", "Medication"),)
    moved = affected(dataclasses.replace(change("fac", "Observation", "o1", "p2", version=2), previous_patient_id="p1"))
    assert moved.keys == ("fac|Observation|o1", "fac|summary|p2", "fac|summary|p1"), "both patients' views"
    assert {"fac|graphql|p1|", "fac|graphql|p2|", "fac|summary|p1|", "fac|summary|p2|"} <= set(moved.prefixes)


async def test_processor_retries_then_dead_letters_and_goes_on() -> None:
    letters: list[Any] = []
    calls: list[str] = []

    async def publish(message: Any) -> None:
        letters.append(message)

    async def flaky(event: ChangeEvent) -> None:
        calls.append(event.resource_id)
        if event.resource_id == "bad" or (event.resource_id == "once" and calls.count("once") == 1):
            raise RuntimeError(f"cannot handle {event.resource_id}")

    p = Processor("test", flaky, publish, attempts=3, backoff=0.001)
    topic = topic_for("Observation")
    good, once, bad = (change("f", "Observation", i, "p") for i in ("good", "once", "bad"))
    assert await p.process(Record(topic, 0, 1, b"f|p", good.to_json())) == "ok"
    assert await p.process(Record(topic, 0, 2, b"f|p", once.to_json())) == "ok"
    assert await p.process(Record(topic, 0, 3, b"f|p", bad.to_json())) == "dead-letter"
    assert await p.process(Record(topic, 1, 4, None, b"{not json")) == "dead-letter"
    assert calls == ["good", "once", "once", "bad", "bad", "bad"]
    assert (p.processed, p.retried, p.dead_lettered) == (2, 3, 2)
    assert [m.topic for m in letters] == [DEAD_LETTER_TOPIC] * 2
    first, second = (DeadLetter.from_json(m.value) for m in letters)
    assert (first.topic, first.partition, first.offset, first.attempts) == (topic, 0, 3, 3)
    assert first.value == bad.to_json() and "cannot handle bad" in first.error and letters[0].key == b"f|p"
    assert (second.offset, second.attempts, second.value, second.key) == (4, 0, b"{not json", None)


# ------------------------------------------------------------------------------------------ worker end to end
async def test_worker_end_to_end(
    app: Starlette,
    relay_database: Database,
    client: httpx.AsyncClient,
    facility: str,
    kafka_bootstrap: str,
    redis_url: str,
    tmp_path: Path,
) -> None:
    """REST writes → relay → Kafka → worker: AuditEvents sealed once per event id (the chain
    verifies), the changed patient's cache entries dropped and the others kept, poison records
    dead-lettered while the worker goes on, consumer lag on /metrics."""
    db: Database = app.state.backends.db
    group = f"worker-e2e-{uuid.uuid4().hex[:8]}"
    await drain_to_kafka(relay_database, kafka_bootstrap)  # earlier tests' rows: not this worker's
    await group_at_end(kafka_bootstrap, group, [AUDIT_TOPIC, *CHANGE_TOPICS, DEAD_LETTER_TOPIC])
    port = free_port()
    worker = StreamProcess(
        "worker",
        [
            "worker",
            "--group-id",
            group,
            "--cache-url",
            redis_url,
            "--metrics-port",
            str(port),
            "--lag-interval",
            "0.5",
            "--attempts",
            "2",
            "--session-timeout",
            "6",
        ],
        stream_env(app_database_url(app), kafka_bootstrap, tmp_path),
        tmp_path,
    ).start()
    cache = RedisCache.from_url(redis_url)
    try:
        p1 = (await client.post("/Patient", json=patient("One"))).json()["id"]
        p2 = (await client.post("/Patient", json=patient("Two"))).json()["id"]
        o2 = (await client.post("/Observation", json=observation(p2))).json()["id"]
        await drain_to_kafka(relay_database, kafka_bootstrap)
        await eventually(lambda: _sealed_all(db, facility), "the first access records to be sealed")
        await drain_to_kafka(relay_database, kafka_bootstrap)  # the sealed AuditEvents' own changes
        await eventually(lambda: caught_up(port, time.time()), "the worker to catch up")

        for pid in (p1, p2):  # a reader caches both patients' views and resources, and searches
            for key in [*cache_keys(facility, pid), resource_key(facility, "Patient", pid)]:
                await cache.set(key, b"cached", 300)
        await cache.set(resource_key(facility, "Observation", o2), b"cached", 300)
        await cache.set(search_prefix(facility, "Observation") + "patient=x", b"cached", 300)
        await cache.set(search_prefix(facility, "Patient") + "name=x", b"cached", 300)

        poison_audit = AuditRecord(
            str(uuid.uuid4()), facility, "2026-01-31T10:00:00.000Z", {"resourceType": "AuditEvent"}
        )
        await produce(
            kafka_bootstrap,
            [
                (AUDIT_TOPIC, facility.encode(), b"{not json"),  # cannot be decoded
                (AUDIT_TOPIC, facility.encode(), poison_audit.to_json()),  # not a valid AuditEvent: sealer fails
                # on a change topic no other test reads: strict readers of the shared broker would choke
                (POISONED_CHANGE_TOPIC, f"{facility}|{p1}".encode(), b'{"schema": 99}'),
            ],
        )
        r = await client.post("/Observation", json=observation(p1))
        assert r.status_code == 201, r.text
        await drain_to_kafka(relay_database, kafka_bootstrap)

        async def p1_invalidated() -> bool:
            return all([await cache.get(k) is None for k in cache_keys(facility, p1)])

        await eventually(p1_invalidated, "the changed patient's cache entries to be dropped")
        assert await cache.get(search_prefix(facility, "Observation") + "patient=x") is None
        for key in [*cache_keys(facility, p2), resource_key(facility, "Observation", o2)]:
            assert await cache.get(key) == b"cached", f"{key} belongs to another patient and must stay"
        assert await cache.get(search_prefix(facility, "Patient") + "name=x") == b"cached"
        assert await cache.get(resource_key(facility, "Patient", p1)) == b"cached", "the Patient did not change"

        await eventually(lambda: _sealed_all(db, facility), "every access record to be sealed")
        # redeliver every access record of the facility: nothing changes
        async with relay_database.transaction(write=False, facility=facility) as conn:
            rows = list(
                await conn.execute(select(outbox).where(outbox.c.facility == facility, outbox.c.operation == "audit"))
            )
        from streams.relay import message_from_row

        again = [message_from_row(row) for row in rows]
        await produce(kafka_bootstrap, [(m.topic, m.key, m.value) for m in again])
        canary = str(uuid.uuid4())
        await cache.set(resource_key(facility, "Patient", canary), b"x", 300)
        await produce(
            kafka_bootstrap, [(topic_for("Patient"), b"k", change(facility, "Patient", canary, None).to_json())]
        )
        await eventually(
            lambda: _is_none(cache, resource_key(facility, "Patient", canary)), "the worker to reach the canary"
        )
        await eventually(lambda: _lag_zero(port, AUDIT_TOPIC), "the audit topic's lag to reach 0 on /metrics")

        chain = await chained_ids(db, facility)
        expected = await audit_outbox_ids(db, facility)
        assert len(chain) == len(set(chain)), "an access record was sealed twice"
        assert set(chain) == set(expected), "every access record sealed exactly once"
        assert poison_audit.event_id not in chain
        assert (await audit_chain.verify(db, facility)).ok
        auditor = token_for(app.state.backends.settings, [facility], roles=["auditor"])
        found = await client.get("/AuditEvent", params={"_count": 1000}, headers={"Authorization": f"Bearer {auditor}"})
        sealed_ids = [e["resource"]["id"] for e in found.json()["entry"] if e["search"]["mode"] == "match"]
        assert sorted(sealed_ids) == sorted(set(sealed_ids)) and set(sealed_ids) <= set(chain)

        async def dead_letters() -> list[DeadLetter]:
            letters = [DeadLetter.from_json(r.value) for r in await read_topics(kafka_bootstrap, [DEAD_LETTER_TOPIC])]
            return [d for d in letters if d.key is not None and d.key.decode().startswith(facility)]

        async def three_letters() -> bool:
            return len(await dead_letters()) >= 3

        await eventually(three_letters, "three dead letters")
        by_value = {d.value: d for d in await dead_letters()}
        assert by_value[b"{not json"].agent == "audit" and by_value[b"{not json"].attempts == 0
        assert by_value[poison_audit.to_json()].attempts == 2, "the sealer was retried, then gave up"
        schema_99 = [d for v, d in by_value.items() if v == b'{"schema": 99}']
        assert {d.agent for d in schema_99} == {"invalidate"} and schema_99[0].topic == POISONED_CHANGE_TOPIC
        page = await metrics_text(port)
        assert (metric(page, "unihealth_worker_dead_letters_total", agent="audit") or 0) >= 2
        assert metric(page, "unihealth_consumer_lag", group=group, topic=AUDIT_TOPIC, partition="0") is not None
        assert worker.alive, worker.tail()
    finally:
        await cache.close()
        code = worker.stop()
    assert code == 0, f"the worker did not stop cleanly on SIGTERM (exit {code}):\n{worker.tail()}"


async def _sealed_all(db: Database, facility: str) -> bool:
    return set(await chained_ids(db, facility)) >= set(await audit_outbox_ids(db, facility))


async def _is_none(cache: Cache, key: str) -> bool:
    return await cache.get(key) is None


async def caught_up(port: int, since: float) -> bool:
    """The worker's lag, measured after ``since`` (unix time), is 0 on every partition."""
    page = await metrics_text(port)
    updated = metric(page, "unihealth_consumer_lag_updated_seconds", group=_group_of(page))
    return updated is not None and updated > since and _total_lag(page) == 0


def _group_of(page: str) -> str:
    for line in page.splitlines():
        if line.startswith("unihealth_consumer_lag_total{"):
            return line.split('group="', 1)[1].split('"', 1)[0]
    return ""


def _total_lag(page: str) -> float | None:
    return metric(page, "unihealth_consumer_lag_total", group=_group_of(page))


async def _lag_zero(port: int, topic: str) -> bool:
    page = await metrics_text(port)
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("unihealth_consumer_lag{") and f'topic="{topic}"' in line
    ]
    return bool(values) and sum(values) == 0


# ------------------------------------------------------------------------------------------ embedded default
async def test_embedded_default_invalidates_and_seals_without_kafka(
    backend: str, settings_for: Any, facility: str, request: pytest.FixtureRequest
) -> None:
    """The embedded profile: InProcessBus + inline relay of the app, the same handlers, no Kafka."""
    overrides: dict[str, Any] = {"relay": "inline"}
    if backend == "postgresql":
        overrides["relay_database_url"] = request.getfixturevalue("postgres_relay_url")
    application = create_app(settings_for(backend, **overrides))
    cache = MemoryCache()
    async with application.router.lifespan_context(application):
        backends = application.state.backends
        assert backends.relay is not None, "the inline relay runs in this app"
        # what gateway/backends.py does once it has a cache (its sealer is already subscribed):
        backends.bus.subscribe(TOPIC_PREFIX, CacheInvalidator(cache))
        db: Database = backends.db
        async with api(application, facility) as c:
            p1 = (await c.post("/Patient", json=patient("One"))).json()["id"]
            p2 = (await c.post("/Patient", json=patient("Two"))).json()["id"]
            await eventually(lambda: _sealed_all(db, facility), "the embedded sealer")
            for pid in (p1, p2):
                for key in cache_keys(facility, pid):
                    await cache.set(key, b"cached", 300)
            await cache.set(search_prefix(facility, "Observation") + "q", b"cached", 300)
            r = await c.post("/Observation", json=observation(p1))
            assert r.status_code == 201, r.text

            async def p1_invalidated() -> bool:
                return all([await cache.get(k) is None for k in cache_keys(facility, p1)])

            await eventually(p1_invalidated, "the changed patient's entries to be dropped in-process", limit=10)
            assert await cache.get(search_prefix(facility, "Observation") + "q") is None
            assert all([await cache.get(k) == b"cached" for k in cache_keys(facility, p2)])
            assert (await c.get(f"/Patient/{p1}/summary")).status_code == 200
            await eventually(lambda: _sealed_all(db, facility), "every access record sealed in-process", limit=10)
        chain = await chained_ids(db, facility)
        assert len(chain) == len(set(chain)) and set(chain) == set(await audit_outbox_ids(db, facility))
        assert len(chain) == 4  # 3 writes, 1 read
        assert (await audit_chain.verify(db, facility)).ok
        assert backends.bus.failures == []


async def test_subscribe_embedded_wires_the_worker_handlers() -> None:
    bus = InProcessBus()
    cache = MemoryCache()

    class NoDatabase:  # the sealer is not called here
        dialect = "sqlite"

    agents = subscribe_embedded(bus, NoDatabase(), cache=cache)  # type: ignore[arg-type]
    assert agents.invalidator is not None
    assert agents.sealer.trusted, "the in-process bus carries only this store's own outbox records"
    kafka = KafkaBus("127.0.0.1:1")  # not started: nothing connects
    assert not subscribe_embedded(kafka, NoDatabase()).sealer.trusted, "a broker's records are validated"  # type: ignore[arg-type]
    await cache.set("f|summary|p1", b"x", 30)
    event = change("f", "Observation", "o1", "p1")
    await bus.publish(event.topic, event.key, event.to_json())
    assert await cache.get("f|summary|p1") is None and agents.invalidator.events == 1
    assert bus.failures == []


async def test_worker_audit_agent_validates_what_kafka_delivers(app: Starlette, facility: str) -> None:
    """The Kafka path validates every AuditEvent (no broker needed: the worker's own audit
    processor, wired by ``build_services``, fed raw records). One the R5 model rejects — bare, or
    complete but with one wrong field — is retried, dead-lettered and never chained or stored;
    a valid one is sealed. Fails if the worker's sealer skipped validation (``trusted``)."""
    db: Database = app.state.backends.db
    letters: list[Message] = []

    async def publish(message: Message) -> None:
        letters.append(message)

    options = WorkerOptions(bootstrap="127.0.0.1:1", agents=frozenset({"audit"}), attempts=2)
    services = build_services(app.state.backends.settings, options, publish)
    try:
        processor = services.processors["audit"]
        processor.backoff = 0.001
        now = datetime.now(UTC)
        recorded = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        good = audit_event(AccessAudit("read", facility, resource_type="Patient", resource_id="p1"), now)
        subtly_bad = {**good, "agent": [{**good["agent"][0], "requestor": "maybe"}, *good["agent"][1:]]}
        records = [
            AuditRecord(str(uuid.uuid4()), facility, recorded, {"resourceType": "AuditEvent"}),
            AuditRecord(str(uuid.uuid4()), facility, recorded, subtly_bad),
            AuditRecord(str(uuid.uuid4()), facility, recorded, good),
        ]
        outcomes = [
            await processor.process(Record(AUDIT_TOPIC, 0, n, facility.encode(), r.to_json()))
            for n, r in enumerate(records)
        ]
        assert outcomes == ["dead-letter", "dead-letter", "ok"]
        dead = [DeadLetter.from_json(m.value) for m in letters]
        assert [(d.agent, d.attempts) for d in dead] == [("audit", 2), ("audit", 2)]
        assert all("not a valid R5 AuditEvent" in d.error for d in dead), [d.error for d in dead]
        assert await chained_ids(db, facility) == [records[2].event_id]
        auditor = AccessPolicy.unrestricted("test")
        async with db.transaction(write=False, facility=facility) as conn:
            stored = await ResourceRepository(db, conn, facility, auditor).read_many(
                "AuditEvent", [r.event_id for r in records]
            )
        assert [s.id for s in stored] == [records[2].event_id]
    finally:
        await services.close()


def test_cli_parses_both_commands() -> None:
    import argparse

    from streams.cli import add_streams_parser

    parser = argparse.ArgumentParser(prog="unihealth")
    add_streams_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["streams", "worker", "--agents", "audit,deidentify", "--metrics-port", "9"])
    assert args.func.__name__ == "cmd_worker" and args.agents == "audit,deidentify" and args.metrics_port == 9
    args = parser.parse_args(["streams", "relay", "--poll-interval", "0.5"])
    assert args.func.__name__ == "cmd_relay" and args.poll_interval == 0.5


async def test_relay_process_serves_metrics_and_stops_on_sigterm(
    app: Starlette, relay_database: Database, client: httpx.AsyncClient, kafka_bootstrap: str, tmp_path: Path
) -> None:
    port = free_port()
    relay = StreamProcess(
        "relay",
        ["relay", "--metrics-port", str(port), "--poll-interval", "0.05"],
        stream_env(app_database_url(app), kafka_bootstrap, tmp_path, relay_url=relay_database.url),
        tmp_path,
    ).start()
    try:
        assert (await client.post("/Patient", json=patient())).status_code == 201

        async def drained() -> bool:
            page = await metrics_text(port)
            return (
                metric(page, "unihealth_outbox_unpublished") == 0
                and (metric(page, "unihealth_relay_published_total") or 0) >= 2
            )

        await eventually(drained, "the relay process to publish the outbox")
        page = await metrics_text(port)
        assert metric(page, "unihealth_outbox_oldest_unpublished_age_seconds") == 0
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"http://127.0.0.1:{port}/healthz")).text == "ok\n"
            assert (await http.get(f"http://127.0.0.1:{port}/nope")).status_code == 404
        assert "# TYPE unihealth_relay_published_total counter" in page
    finally:
        code = relay.stop()
    assert code == 0, relay.tail()
