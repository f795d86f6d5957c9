"""The transactional outbox drained to a bus (slice 1 of the change-streams issue).

Real Kafka (``scripts/kafka.sh``), real Redis (``scripts/redis.sh``), and the contract backends of
``conftest.py`` (SQLite and a real PostgreSQL). The only fakes are tiny implementations of our own
:class:`streams.bus.Bus` protocol that fail on purpose.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import func, select, update
from starlette.applications import Starlette

from streams.bus import Bus, Handler, InProcessBus, KafkaBus, Message, PublishError, matches
from streams.events import SCHEMA_VERSION, TOPIC_PREFIX, ChangeEvent, message_key, topic_for
from streams.relay import Relay, event_from_row, wait_stopped
from streams.relay_service import listen_for_commits
from subgraphs.store.database import Database, open_database
from subgraphs.store.schema import outbox
from tests.helpers import observation, patient

pytest_plugins = ["tests.streams_services"]  # the kafka_bootstrap and redis_url session fixtures

TOPICS = [topic_for(t) for t in ("Patient", "Observation")]
WAIT = 60.0  # bound on every wait for the broker


# ------------------------------------------------------------------------------------------ helpers
@dataclass(frozen=True)
class Consumed:
    topic: str
    partition: int
    offset: int
    key: bytes
    event: ChangeEvent


async def consume_all(bootstrap: str, topics: Sequence[str], facility: str) -> list[Consumed]:
    """Every message now on ``topics`` (from offset 0 up to the current end) of ``facility``."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    records: list[Any] = []
    async with asyncio.timeout(WAIT):
        await consumer.start()
        try:
            while {tp.topic for tp in consumer.assignment()} != set(topics):
                records.extend(r for rs in (await consumer.getmany(timeout_ms=100)).values() for r in rs)
            assignment = list(consumer.assignment())
            ends = await consumer.end_offsets(assignment)
            while any([await consumer.position(tp) < ends[tp] for tp in assignment]):
                records.extend(r for rs in (await consumer.getmany(timeout_ms=200)).values() for r in rs)
        finally:
            await consumer.stop()
    out = [Consumed(r.topic, r.partition, r.offset, r.key, ChangeEvent.from_json(r.value)) for r in records]
    return sorted((c for c in out if c.event.facility == facility), key=lambda c: (c.topic, c.partition, c.offset))


def assert_once_in_key_order(consumed: list[Consumed], expected: list[ChangeEvent]) -> None:
    """Each expected event exactly once, as published, and each key's events in ``expected`` order."""
    counts = Counter(c.event.event_id for c in consumed)
    assert {e for e, n in counts.items() if n > 1} == set(), "an event was published twice"
    assert set(counts) == {e.event_id for e in expected}
    by_id = {c.event.event_id: c for c in consumed}
    want: dict[tuple[str, bytes], list[str]] = defaultdict(list)
    for event in expected:
        got = by_id[event.event_id]
        assert got.event == event
        assert (got.topic, got.key) == (topic_for(event.resource_type), event.key)
        want[(got.topic, got.key)].append(event.event_id)
    seen: dict[tuple[str, bytes], list[str]] = defaultdict(list)
    partitions: dict[tuple[str, bytes], set[int]] = defaultdict(set)
    for c in consumed:  # sorted by (topic, partition, offset)
        seen[(c.topic, c.key)].append(c.event.event_id)
        partitions[(c.topic, c.key)].add(c.partition)
    assert all(len(p) == 1 for p in partitions.values()), "one key's events must share one partition"
    assert seen == want, "per-key (per-patient) order must follow the outbox order"


async def outbox_rows(db: Database, facility: str) -> list[Any]:
    async with db.transaction(write=False) as conn:
        changes = select(outbox).where(outbox.c.facility == facility, outbox.c.operation != "audit")
        return list(await conn.execute(changes.order_by(outbox.c.seq)))


async def unpublished(db: Database) -> int:
    async with db.transaction(write=False) as conn:
        stmt = select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
        return int((await conn.execute(stmt)).scalar_one())


async def drain_all(relay: Relay, limit: int = 500) -> int:
    total = 0
    async with asyncio.timeout(WAIT * 2):
        while n := await relay.drain_once(limit):
            total += n
    return total


async def drain_to_kafka(db: Database, bootstrap: str) -> int:
    bus = KafkaBus(bootstrap)
    await bus.start()
    try:
        return await drain_all(Relay(db, bus))
    finally:
        await bus.stop()


def version_of(response: httpx.Response) -> tuple[str, str, int]:
    assert response.status_code in (200, 201), response.text
    body = response.json()
    return body["resourceType"], body["id"], int(body["meta"]["versionId"])


class Collector:
    """A subscriber that keeps the events of one facility (or all) and lets a test wait for them."""

    def __init__(self, facility: str | None = None) -> None:
        self.facility = facility
        self.events: list[ChangeEvent] = []
        self._changed = asyncio.Event()

    async def __call__(self, e: ChangeEvent) -> None:
        if self.facility is None or e.facility == self.facility:
            self.events.append(e)
            self._changed.set()

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.events) < n:
                self._changed.clear()
                await self._changed.wait()


class FailingBus:
    """Our Bus protocol, failing on purpose: forwards the first ``accept_first`` messages to ``inner``
    (so they really reach the broker), then raises; ``fail_times`` calls fail, later ones all forward."""

    def __init__(self, inner: Bus | None = None, *, accept_first: int = 0, fail_times: int = 1_000_000) -> None:
        self.inner = inner
        self.accept_first = accept_first
        self.fail_times = fail_times
        self.calls = 0

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        await self.publish_many([Message(topic, key, value)])

    async def publish_many(self, messages: Sequence[Message]) -> None:
        self.calls += 1
        if self.calls > self.fail_times and self.inner is not None:
            await self.inner.publish_many(messages)
            return
        if self.inner is not None and self.accept_first:
            await self.inner.publish_many(messages[: self.accept_first])
        raise PublishError("broker unavailable (on purpose)")

    def subscribe(self, topic_or_prefix: str, handler: Handler) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def event(n: int, resource_type: str = "Observation", patient_id: str | None = "p1") -> ChangeEvent:
    return ChangeEvent(
        event_id=str(uuid.uuid4()),
        facility="fac-x",
        resource_type=resource_type,
        resource_id=f"r{n}",
        version=1,
        operation="create",
        patient_id=patient_id,
        occurred_at="2026-01-31T10:00:00.123Z",
    )


# ------------------------------------------------------------------------------------------ (a)
async def test_rest_changes_reach_kafka_once_each_in_patient_order(
    app: Starlette, relay_database: Database, client: httpx.AsyncClient, facility: str, kafka_bootstrap: str
) -> None:
    db: Database = relay_database
    made: list[tuple[str, str, int, str]] = []
    p1 = version_of(await client.post("/Patient", json=patient("One")))
    p2 = version_of(await client.post("/Patient", json=patient("Two")))
    made += [(*p1, "create"), (*p2, "create")]
    o1 = version_of(await client.post("/Observation", json=observation(p1[1])))
    o2 = version_of(await client.post("/Observation", json=observation(p2[1])))
    made += [(*o1, "create"), (*o2, "create")]
    o1b = version_of(await client.put(f"/Observation/{o1[1]}", json=observation(p1[1], value=80, id=o1[1])))
    made.append((*o1b, "update"))
    doc = {"resourceType": "Practitioner", "name": [{"family": "Who"}]}
    pr = version_of(await client.post("/Practitioner", json=doc))
    pr2 = version_of(await client.put(f"/Practitioner/{pr[1]}", json=doc | {"id": pr[1], "active": True}))
    made += [(*pr, "create"), (*pr2, "update")]
    bundle = {  # three changes in one commit
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation(p2[1], id=f"{p2[1]}-b{i}"),
                "request": {"method": "PUT", "url": f"Observation/{p2[1]}-b{i}"},
            }
            for i in range(2)
        ]
        + [{"resource": patient("Two-b", id=p2[1]), "request": {"method": "PUT", "url": f"Patient/{p2[1]}"}}],
    }
    r = await client.post("/", json=bundle)
    assert r.status_code == 200, r.text
    made += [("Observation", f"{p2[1]}-b0", 1, "create"), ("Observation", f"{p2[1]}-b1", 1, "create")]
    made.append(("Patient", p2[1], 2, "update"))
    assert (
        await client.post("/Observation", json=observation(p1[1]) | {"valueQuantity": "seventy"})
    ).status_code == 400
    assert (await client.delete(f"/Observation/{o2[1]}")).status_code == 204
    made.append(("Observation", o2[1], 2, "delete"))
    o3 = version_of(await client.post("/Observation", json=observation(p1[1], code="8310-5", value=37)))
    made.append((*o3, "create"))

    bus = KafkaBus(kafka_bootstrap)
    await bus.start()
    try:
        relay = Relay(db, bus)
        assert await drain_all(relay) >= len(made)
        assert await relay.drain_once() == 0, "a second drain publishes nothing"
    finally:
        await bus.stop()

    rows = await outbox_rows(db, facility)
    assert sorted((r.type, r.id, r.version, r.operation) for r in rows) == sorted(made), "one row per committed change"
    assert all(r.published_at is not None for r in rows)
    expected = [event_from_row(r) for r in rows]
    consumed = await consume_all(kafka_bootstrap, [*TOPICS, topic_for("Practitioner")], facility)
    assert_once_in_key_order(consumed, expected)
    p1_key = f"{facility}|{p1[1]}".encode()
    p1_observations = [c.event.resource_id for c in consumed if c.key == p1_key and c.topic == topic_for("Observation")]
    assert p1_observations == [o1[1], o1[1], o3[1]], "one patient's changes arrive in commit order"
    assert all(c.event.schema == SCHEMA_VERSION for c in consumed)


# ------------------------------------------------------------------------------------------ (b)
@pytest.mark.parametrize("backend", ["postgresql"], scope="session")  # row claiming is PostgreSQL's
async def test_concurrent_relays_on_postgresql_publish_each_row_once_in_key_order(
    app: Starlette, relay_database: Database, client: httpx.AsyncClient, facility: str, kafka_bootstrap: str
) -> None:
    assert relay_database.dialect == "postgresql"
    url = relay_database.url
    patients = [f"{facility}-p{i}" for i in range(8)]

    async def put_bundle(kind: str, entries: list[dict[str, Any]]) -> None:
        r = await client.post("/", json={"resourceType": "Bundle", "type": kind, "entry": entries})
        assert r.status_code == 200, r.text

    def put(resource: dict[str, Any]) -> dict[str, Any]:
        return {
            "resource": resource,
            "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"},
        }

    for pid in patients:  # one commit per patient: that patient's rows are contiguous
        await put_bundle(
            "transaction", [put(patient(id=pid))] + [put(observation(pid, id=f"{pid}-o{j}")) for j in range(12)]
        )
    await put_bundle(  # one commit interleaving all patients
        "batch", [put(observation(pid, id=f"{pid}-o{j}", value=90 + j)) for j in range(3) for pid in patients]
    )

    dbs = [open_database(url, pool_size=2), open_database(url, pool_size=2)]
    buses = [KafkaBus(kafka_bootstrap), KafkaBus(kafka_bootstrap)]
    relays = [Relay(db, bus) for db, bus in zip(dbs, buses, strict=True)]
    writes_done = asyncio.Event()

    async def writer() -> None:  # more commits while the relays run
        try:
            for j in range(16):
                pid = patients[j % len(patients)]
                r = await client.put(f"/Observation/{pid}-o5", json=observation(pid, id=f"{pid}-o5", value=j))
                assert r.status_code == 200, r.text
        finally:
            writes_done.set()

    async def pump(relay: Relay) -> None:
        while True:
            if await relay.drain_once(limit=20) == 0:
                if writes_done.is_set() and await unpublished(relay.db) == 0:
                    return
                await asyncio.sleep(0.005)

    try:
        for bus in buses:
            await bus.start()
        async with asyncio.timeout(WAIT * 2):
            await asyncio.gather(writer(), pump(relays[0]), pump(relays[1]))
    finally:
        for bus in buses:
            await bus.stop()
        for db in dbs:
            await db.dispose()

    rows = await outbox_rows(relay_database, facility)
    assert len(rows) == len(patients) * 13 + 3 * len(patients) + 16
    assert all(r.published_at is not None for r in rows)
    assert relays[0].published > 0 and relays[1].published > 0, "both relays took part"
    consumed = await consume_all(kafka_bootstrap, TOPICS, facility)
    assert_once_in_key_order(consumed, [event_from_row(r) for r in rows])


# ------------------------------------------------------------------------------------------ (c)
async def test_failed_publish_leaves_rows_unpublished_and_a_retry_delivers_at_least_once(
    app: Starlette, relay_database: Database, client: httpx.AsyncClient, facility: str, kafka_bootstrap: str
) -> None:
    db: Database = relay_database
    await drain_to_kafka(db, kafka_bootstrap)  # only this test's rows are pending from here on
    # written through the store, not REST, so no access records interleave with the three changes
    async with app.state.backends.repository(facility, write=True) as repo:
        pid = (await repo.create("Patient", patient())).id
        await repo.create("Observation", observation(pid))
        await repo.create("Observation", observation(pid, code="8310-5"))
    rows = await outbox_rows(db, facility)
    assert len(rows) == 3

    with pytest.raises(PublishError):
        await Relay(db, FailingBus()).drain_once()
    assert all(r.published_at is None for r in await outbox_rows(db, facility))

    bus = KafkaBus(kafka_bootstrap)
    await bus.start()
    try:
        with pytest.raises(PublishError):  # two messages really reach the broker, then the bus fails
            await Relay(db, FailingBus(bus, accept_first=2)).drain_once()
        assert all(r.published_at is None for r in await outbox_rows(db, facility))
        assert await drain_all(Relay(db, bus)) == 3
    finally:
        await bus.stop()
    assert all(r.published_at is not None for r in await outbox_rows(db, facility))
    consumed = await consume_all(kafka_bootstrap, TOPICS, facility)
    first, second, third = (r.event_id for r in rows)
    assert Counter(c.event.event_id for c in consumed) == {first: 2, second: 2, third: 1}, "at least once"
    on_observation_topic = [c.event.event_id for c in consumed if c.topic == topic_for("Observation")]
    assert on_observation_topic == [second, second, third]
    assert list(dict.fromkeys(on_observation_topic)) == [second, third], "deduplicated, the order holds"


async def test_run_retries_after_failures_and_delivers_in_order(
    app: Starlette, relay_database: Database, client: httpx.AsyncClient, facility: str
) -> None:
    db: Database = relay_database
    inner = InProcessBus()
    got = Collector(facility)
    inner.subscribe(TOPIC_PREFIX, got)
    pid = version_of(await client.post("/Patient", json=patient()))[1]
    for value in range(5):
        await client.put(f"/Observation/{pid}-o", json=observation(pid, id=f"{pid}-o", value=value))
    flaky = FailingBus(inner, fail_times=2)
    relay = Relay(db, flaky)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop_event=stop, poll_interval=0.01))
    try:
        await got.wait_for(6)
        await client.delete(f"/Observation/{pid}-o")
        relay.wake()
        await got.wait_for(7)
    finally:
        stop.set()
        await wait_stopped(task)
    assert task.done() and not task.cancelled()
    assert flaky.calls >= 3
    assert [(e.resource_type, e.version, e.operation) for e in got.events] == [
        ("Patient", 1, "create"),
        *[("Observation", v, "create" if v == 1 else "update") for v in range(1, 6)],
        ("Observation", 6, "delete"),
    ]
    assert all(r.published_at is not None for r in await outbox_rows(db, facility))


async def _age(db: Database, seqs: Sequence[int], days: int) -> None:
    """Pretend the rows ``seqs`` were published ``days`` ago."""
    async with db.transaction(write=True) as conn:
        await conn.execute(
            update(outbox).where(outbox.c.seq.in_(seqs)).values(published_at=datetime.now(UTC) - timedelta(days=days))
        )


async def _remaining(db: Database) -> list[Any]:
    async with db.transaction(write=False) as conn:
        return list(await conn.execute(select(outbox.c.seq, outbox.c.published_at).order_by(outbox.c.seq)))


async def test_purge_deletes_old_published_rows_oldest_first_and_never_an_unpublished_one(
    app: Starlette, relay_database: Database, facility: str
) -> None:
    db: Database = relay_database
    relay = Relay(db, InProcessBus())
    await drain_all(relay)
    await _age(db, [r.seq for r in await _remaining(db)], days=2)  # every earlier row: published long ago
    async with app.state.backends.repository(facility, write=True) as repo:
        pid = (await repo.create("Patient", patient())).id
        await repo.create("Observation", observation(pid))
        await repo.create("Observation", observation(pid, code="8310-5"))
    fresh = [r.seq for r in await outbox_rows(db, facility)][-3:]

    await relay.purge(timedelta(days=1))  # stops at the first unpublished row
    assert [r.seq for r in await _remaining(db)] == fresh
    assert await drain_all(relay) == 3
    assert await relay.purge(timedelta(days=1)) == 0, "published just now: kept"
    await _age(db, fresh[1:], days=2)  # the oldest row is young: nothing behind it goes either
    assert await relay.purge(timedelta(days=1)) == 0
    await _age(db, fresh[:1], days=2)
    assert await relay.purge(timedelta(days=1), batch=1) == 3, "oldest first, batch after batch"
    assert await _remaining(db) == []

    async with app.state.backends.repository(facility, write=True) as repo:  # run() purges on its own
        await repo.create("Patient", patient())
    stop = asyncio.Event()
    task = asyncio.create_task(
        relay.run(stop_event=stop, poll_interval=0.01, retention=timedelta(0), purge_interval=0.01)
    )
    try:
        for _ in range(500):  # up to 10 s
            if not await _remaining(db):
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await wait_stopped(task)
    assert await _remaining(db) == [] and relay.purged >= 4


async def test_a_commit_wakes_a_listening_relay_at_once(
    app: Starlette, relay_database: Database, facility: str, backend: str
) -> None:
    """PostgreSQL: writers NOTIFY on commit and a relay process LISTENs, so a change is published
    long before the next poll (here 10 minutes away); SQLite has no listener (one process, it wakes itself)."""
    db: Database = relay_database
    inner = InProcessBus()
    got = Collector(facility)
    inner.subscribe(TOPIC_PREFIX, got)
    relay = Relay(db, inner)
    await drain_all(relay)
    close = await listen_for_commits(db.url, relay)
    if backend == "sqlite":
        assert close is None
        return
    assert close is not None
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop_event=stop, poll_interval=600.0))
    try:
        await asyncio.sleep(0.2)  # the first drain found nothing: the relay sleeps for its 600 s poll
        async with app.state.backends.repository(facility, write=True) as repo:
            pid = (await repo.create("Patient", patient())).id
        await got.wait_for(1)  # WAIT (well under the poll) bounds it
    finally:
        stop.set()
        await wait_stopped(task)
        await close()
    assert [(e.resource_type, e.resource_id) for e in got.events] == [("Patient", pid)]


# ------------------------------------------------------------------------------------------ (d)
async def test_in_process_bus_delivers_in_order_and_records_handler_failures() -> None:
    bus = InProcessBus(handler_timeout=1.0)
    everything: list[str] = []
    observations: list[str] = []

    async def all_changes(e: ChangeEvent) -> None:
        everything.append(e.resource_id)

    async def broken(e: ChangeEvent) -> None:
        raise RuntimeError(f"cannot handle {e.resource_id}")

    async def only_observations(e: ChangeEvent) -> None:
        await asyncio.sleep(0)  # yields: order must still hold
        observations.append(e.resource_id)

    async def never(e: ChangeEvent) -> None:
        raise AssertionError("a prefix without a trailing dot is a topic name, not a prefix")

    bus.subscribe(TOPIC_PREFIX, all_changes)
    bus.subscribe(TOPIC_PREFIX, broken)
    bus.subscribe(topic_for("Observation"), only_observations)
    bus.subscribe("unihealth.changes.Obs", never)
    await bus.start()
    events = [event(i, "Observation" if i % 3 else "Patient") for i in range(30)]
    await bus.publish(events[0].topic, events[0].key, events[0].to_json())
    await bus.publish_many([Message(e.topic, e.key, e.to_json()) for e in events[1:]])
    await bus.stop()
    assert everything == [e.resource_id for e in events]
    assert observations == [e.resource_id for e in events if e.resource_type == "Observation"]
    assert len(bus.failures) == 30 and all("cannot handle" in f.error for f in bus.failures)
    assert bus.failures[0].handler.endswith("broken") and bus.failures[0].value == events[0].to_json()
    with pytest.raises(ValueError):
        await bus.publish(topic_for("Patient"), b"k", b"not an event")


async def test_relay_with_in_process_bus_delivers_per_patient_order(
    app: Starlette, relay_database: Database, client: httpx.AsyncClient, facility: str
) -> None:
    db: Database = relay_database
    bus = InProcessBus()
    seen: list[tuple[str, str, int]] = []

    async def collect(e: ChangeEvent) -> None:
        if e.facility == facility:
            seen.append((e.resource_type, e.resource_id, e.version))

    bus.subscribe(TOPIC_PREFIX, collect)
    pid = version_of(await client.post("/Patient", json=patient()))[1]
    oid = version_of(await client.post("/Observation", json=observation(pid)))[1]
    await client.put(f"/Observation/{oid}", json=observation(pid, id=oid, value=99))
    await drain_all(Relay(db, bus), limit=1)
    assert seen == [("Patient", pid, 1), ("Observation", oid, 1), ("Observation", oid, 2)]
    assert bus.failures == []


async def test_kafka_bus_subscriber_gets_events_and_survives_a_poison_message(kafka_bootstrap: str) -> None:
    topic = f"unihealth.test.{uuid.uuid4().hex}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    async with asyncio.timeout(WAIT):
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"{not json", key=b"k")
        finally:
            await producer.stop()
    bus = KafkaBus(kafka_bootstrap, group_id=f"test-{uuid.uuid4().hex}")
    got = Collector()
    bus.subscribe(topic, got)
    await bus.start()
    try:
        events = [event(i) for i in range(5)]
        await bus.publish_many([Message(topic, e.key, e.to_json()) for e in events])
        await got.wait_for(5)
    finally:
        await bus.stop()
    assert got.events == events
    assert [f.handler for f in bus.failures] == ["decode"] and bus.failures[0].value == b"{not json"


# ------------------------------------------------------------------------------------------ events
def test_change_event_contract() -> None:
    e = event(1)
    wire = orjson.loads(e.to_json())
    assert wire == {
        "schema": 1,
        "event_id": e.event_id,
        "facility": "fac-x",
        "resource_type": "Observation",
        "resource_id": "r1",
        "version": 1,
        "operation": "create",
        "patient_id": "p1",
        "occurred_at": "2026-01-31T10:00:00.123Z",
        "previous_patient_id": None,
    }
    assert ChangeEvent.from_json(e.to_json()) == e
    older = {k: v for k, v in wire.items() if k != "previous_patient_id"}
    assert ChangeEvent.from_json(orjson.dumps(older)) == e, "events written before the field was added still parse"
    assert ChangeEvent.from_json(orjson.dumps(wire | {"added_later": True})) == e, "unknown fields are ignored"
    assert e.topic == "unihealth.changes.Observation" and e.key == b"fac-x|p1"
    assert message_key("f", "Practitioner", "x", None) == b"f|Practitioner/x"
    assert message_key("f", "Patient", "p9", None) == b"f|p9", "a Patient is keyed as its own patient"
    assert matches(TOPIC_PREFIX, "unihealth.changes.Patient") and not matches("unihealth.changes", "unihealth.x")
    with pytest.raises(ValueError):
        topic_for("observation; rm")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": 2}, "unsupported change event schema 2"),
        ({"schema": "1"}, "'schema' must be an integer"),
        ({"version": 0}, "'version'"),
        ({"previous_patient_id": ""}, "'previous_patient_id'"),
        ({"previous_patient_id": 3}, "'previous_patient_id'"),
        ({"version": True}, "'version'"),
        ({"operation": "upsert"}, "'operation'"),
        ({"facility": ""}, "'facility'"),
        ({"patient_id": 7}, "'patient_id'"),
        ({"occurred_at": "yesterday"}, "ISO 8601"),
        ({"occurred_at": "2026-01-31T10:00:00+02:00"}, "UTC"),
        ({"resource_type": "../x"}, "resource type"),
    ],
)
def test_change_event_rejects_bad_input(change: dict[str, Any], message: str) -> None:
    wire = orjson.loads(event(1).to_json()) | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ChangeEvent.from_json(orjson.dumps(wire))


@pytest.mark.parametrize("raw", [b"", b"[1]", b"{", b'"x"'])
def test_change_event_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(ValueError, match="change event"):
        ChangeEvent.from_json(raw)


# ------------------------------------------------------------------------------------------ (e)
async def test_redis_server_answers_ping(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        async with asyncio.timeout(10):
            assert await client.ping() is True
            await client.set("unihealth:smoke", b"1", ex=10)
            assert await client.get("unihealth:smoke") == b"1"
    finally:
        await client.aclose()


async def test_run_lets_access_records_wait_for_a_batch_but_never_changes(
    app: Starlette, relay_database: Database, facility: str
) -> None:
    """With ``audit_linger`` a change goes out at once while access records wait — until the
    oldest is ``audit_linger`` old, or until ``audit_batch`` of them are pending."""
    from gateway.security.audit import AccessAudit
    from streams.events import AUDIT_TOPIC, AuditRecord

    db: Database = relay_database
    bus = InProcessBus()
    changes = Collector(facility)
    audits: list[AuditRecord] = []
    arrived = asyncio.Event()

    async def audit(record: AuditRecord) -> None:
        if record.facility == facility:
            audits.append(record)
            arrived.set()

    async def audits_reach(n: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(audits) < n:
                arrived.clear()
                await arrived.wait()

    bus.subscribe(TOPIC_PREFIX, changes)
    bus.subscribe(AUDIT_TOPIC, audit)
    relay = Relay(db, bus)
    await drain_all(relay)
    backends = app.state.backends

    async def access() -> None:
        await backends.record_access(AccessAudit(interaction="read", facility=facility, status=200))

    async def run(linger: float, batch: int) -> tuple[asyncio.Event, asyncio.Task[None]]:
        stop = asyncio.Event()
        task = asyncio.create_task(
            relay.run(stop_event=stop, poll_interval=0.01, audit_linger=linger, audit_batch=batch)
        )
        return stop, task

    await access()
    async with backends.repository(facility, write=True) as repo:
        await repo.create("Patient", patient())
    stop, task = await run(linger=3.0, batch=5)  # far longer than the change takes on a busy machine
    try:
        await changes.wait_for(1)
        assert audits == [], "the change went out; the lone access record waits"
        await audits_reach(1)
    finally:
        stop.set()
        await wait_stopped(task)
    assert len(audits) == 1, "published once its linger passed"

    for _ in range(5):
        await access()
    stop, task = await run(linger=600.0, batch=5)  # a linger no test waits for
    try:
        await audits_reach(6)
    finally:
        stop.set()
        await wait_stopped(task)
    assert len(audits) == 6, "a full batch goes at once"
    await access()
    assert await drain_all(relay) >= 1 and len(audits) == 7, "drain_once never holds anything back"
