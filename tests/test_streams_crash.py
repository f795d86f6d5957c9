"""Crash tests: ``kill -9`` of the relay, of the worker and of the broker in the middle of a stream of
writes. After the restarts: every acknowledged write has its event on Kafka (0 lost), no access
record is sealed twice (the chain verifies), and the cache holds no stale entry.

The relay and the worker are real subprocesses (``python -m streams.cli relay|worker``); the broker
is this module's own (``scripts/kafka.sh``, killed and started again on the same port and data
with ``kafka.sh kill DIR`` / ``kafka.sh start-again DIR``), so the session's broker is untouched.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from starlette.applications import Starlette

from streams import audit_chain
from streams.cache import RedisCache
from streams.events import AUDIT_TOPIC, ChangeEvent
from streams.processing import DEAD_LETTER_TOPIC
from streams.worker import CHANGE_TOPICS
from subgraphs.store.database import Database
from subgraphs.store.schema import outbox, resources
from tests.helpers import observation, patient
from tests.test_streams_worker import (
    ROOT,
    StreamProcess,
    app_database_url,
    audit_outbox_ids,
    cache_keys,
    caught_up,
    chained_ids,
    change_outbox_rows,
    drain_to_kafka,
    eventually,
    free_port,
    group_at_end,
    read_topics,
    stream_env,
)

pytest_plugins = ["tests.streams_services"]

WRITES = 200
PATIENTS = 8
KAFKA = str(ROOT / "scripts" / "kafka.sh")


@pytest.fixture(scope="module")
def crash_broker() -> Iterator[tuple[str, str]]:
    """A broker of this module only: ``(bootstrap, data directory)``."""
    out = subprocess.run([KAFKA], capture_output=True, text=True, timeout=600, check=False)
    fields = out.stdout.split()
    if out.returncode != 0 or len(fields) != 2:
        pytest.fail(f"could not start Kafka for the crash tests:\n{out.stderr[-3000:]}")
    try:
        yield fields[0], fields[1]
    finally:
        subprocess.run([KAFKA, "stop", fields[1]], check=False, timeout=60)


async def healthy(port: int) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        except httpx.TransportError:
            return False


async def unpublished(db: Database) -> int:
    async with db.transaction(write=False) as conn:
        stmt = select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
        return int((await conn.execute(stmt)).scalar_one())


async def sealed_auditevents(db: Database, facility: str) -> int:
    async with db.transaction(write=False, facility=facility) as conn:
        stmt = (
            select(func.count())
            .select_from(resources)
            .where(resources.c.facility == facility, resources.c.type == "AuditEvent")
        )
        return int((await conn.execute(stmt)).scalar_one())


async def test_kill9_relay_worker_and_broker_mid_stream(
    app: Starlette,
    relay_database: Database,
    client: httpx.AsyncClient,
    facility: str,
    crash_broker: tuple[str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    bootstrap, broker_dir = crash_broker
    db: Database = app.state.backends.db
    group = f"crash-{uuid.uuid4().hex[:8]}"
    await drain_to_kafka(relay_database, bootstrap)  # the session's backlog: not part of this stream
    await group_at_end(bootstrap, group, [AUDIT_TOPIC, *CHANGE_TOPICS, DEAD_LETTER_TOPIC])
    env = stream_env(app_database_url(app), bootstrap, tmp_path, relay_url=relay_database.url)
    wport = hport = free_port()
    relay = StreamProcess("relay", ["relay", "--poll-interval", "0.01"], env, tmp_path)
    worker = StreamProcess(
        "worker",
        [
            "worker",
            "--group-id",
            group,
            "--cache-url",
            redis_url,
            "--session-timeout",
            "6",
            "--metrics-port",
            str(wport),
            "--lag-interval",
            "0.5",
        ],
        env,
        tmp_path,
    )
    cache = RedisCache.from_url(redis_url)
    restart: asyncio.Task[subprocess.CompletedProcess[str]] | None = None
    started = time.monotonic()
    phases: dict[str, float] = {}
    try:
        relay.start()
        worker.start()
        patients = []
        for i in range(PATIENTS):
            r = await client.post("/Patient", json=patient(f"Crash{i}"))
            assert r.status_code == 201, r.text
            patients.append(r.json()["id"])
        acked: list[tuple[str, str, int]] = []
        last_write: dict[str, int] = {}
        for i in range(WRITES):
            pid = patients[i % PATIENTS]
            r = await client.post("/Observation", json=observation(pid, value=i))
            assert r.status_code == 201, r.text
            body = r.json()
            acked.append(("Observation", body["id"], int(body["meta"]["versionId"])))
            last_write[pid] = i
            for key in cache_keys(facility, pid):  # a reader caches the view it now sees
                await cache.set(key, str(i).encode(), 300)
            if i == 40:
                relay.kill9()
            elif i == 55:
                relay.start()
            elif i == 90:
                worker.kill9()
            elif i == 100:
                worker.start()
            elif i == 140:  # the restarted worker runs (consumes) before the broker goes
                await eventually(lambda: healthy(hport), "the restarted worker to be up", limit=60)
                await asyncio.to_thread(subprocess.run, [KAFKA, "kill", broker_dir], check=True, timeout=30)
                phases["broker killed"] = time.monotonic() - started
            elif i == 150:
                restart = asyncio.create_task(
                    asyncio.to_thread(
                        subprocess.run, [KAFKA, "start-again", broker_dir], capture_output=True, text=True, timeout=120
                    )
                )
            await asyncio.sleep(0.01)
        phases["writes done"] = time.monotonic() - started
        assert restart is not None
        async with asyncio.timeout(130):
            again = await restart
        assert again.returncode == 0, again.stderr[-2000:]
        assert again.stdout.split()[0] == bootstrap, "the broker came back on the same port"
        phases["broker back"] = time.monotonic() - started

        async def everything_through() -> bool:
            return (
                set(await chained_ids(db, facility)) >= set(await audit_outbox_ids(db, facility))
                and await unpublished(relay_database) == 0
            )

        await eventually(everything_through, "the backlog to be published and sealed", limit=90, every=0.2)
        await eventually(lambda: caught_up(wport, time.time()), "the worker to catch up", limit=30)
        phases["caught up"] = time.monotonic() - started

        # 0 lost: every acknowledged write (and every committed change) has its event on Kafka
        consumed = [ChangeEvent.from_json(r.value) for r in await read_topics(bootstrap, list(CHANGE_TOPICS))]
        mine = {e.event_id: e for e in consumed if e.facility == facility}
        on_kafka = {(e.resource_type, e.resource_id, e.version) for e in mine.values()}
        lost = [w for w in acked if w not in on_kafka]
        assert lost == [], f"{len(lost)} acknowledged writes have no event on Kafka"
        committed = {row.event_id for row in await change_outbox_rows(db, facility)}
        assert committed == set(mine), "every committed change, and nothing else, is on Kafka"
        audit_on_kafka = {r.value for r in await read_topics(bootstrap, [AUDIT_TOPIC])}
        assert len(audit_on_kafka) >= len(await audit_outbox_ids(db, facility))

        # 0 duplicate AuditEvents: one chain record and one sealed AuditEvent per access record
        chain = await chained_ids(db, facility)
        expected = await audit_outbox_ids(db, facility)
        assert len(chain) == len(set(chain)), "an access record was sealed twice"
        assert set(chain) == set(expected) and len(chain) >= WRITES + PATIENTS
        assert await sealed_auditevents(db, facility) == len(chain)
        verdict = await audit_chain.verify(db, facility)
        assert verdict.ok, verdict.problem

        # no stale cache entry: what is left of a patient's views was cached after its last change
        for pid in patients:
            for key in cache_keys(facility, pid):
                value = await cache.get(key)
                assert value is None or int(value) == last_write[pid], f"stale {key}: {value!r}"

        # after the restarts the worker still invalidates exactly the changed patients
        for pid in patients:
            for key in cache_keys(facility, pid):
                await cache.set(key, b"final", 300)
        changed, untouched = patients[: PATIENTS // 2], patients[PATIENTS // 2 :]
        for pid in changed:
            assert (await client.post("/Observation", json=observation(pid))).status_code == 201

        async def changed_dropped() -> bool:
            return all([await cache.get(k) is None for pid in changed for k in cache_keys(facility, pid)])

        await eventually(changed_dropped, "the changed patients' entries to be dropped", limit=30)
        await eventually(lambda: caught_up(wport, time.time()), "the worker to catch up again", limit=30)
        assert all([await cache.get(k) == b"final" for pid in untouched for k in cache_keys(facility, pid)])
        assert relay.alive and worker.alive, relay.tail() + worker.tail()
        assert (relay.starts, worker.starts) == (2, 2)
    finally:
        if restart is not None and not restart.done():
            async with asyncio.timeout(130):
                await restart
        await cache.close()
        codes = (relay.stop(), worker.stop())
        print(f"crash test phases (s): {phases}, total {time.monotonic() - started:.1f}")
    assert codes == (0, 0), f"clean SIGTERM shutdown expected:\n{relay.tail()}\n{worker.tail()}"
