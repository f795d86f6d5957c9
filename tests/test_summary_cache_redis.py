"""The production path of the summary cache: the edge caches in Redis, a separate Faust worker
invalidates. Real Redis, real Kafka, the worker as a real subprocess, both backends.

REST write → outbox → relay (run here) → Kafka → worker's invalidation agent → Redis: the edge's
cached summary is gone and the next read serves the new data; another patient's entry stays.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from streams.cache import RedisCache
from streams.events import AUDIT_TOPIC, message_key, topic_for
from streams.invalidation import resource_key
from streams.processing import DEAD_LETTER_TOPIC
from streams.worker import CHANGE_TOPICS
from subgraphs.store.database import Database
from tests.conftest import token_for
from tests.helpers import create, observation, patient
from tests.test_streams_worker import (
    StreamProcess,
    app_database_url,
    change,
    drain_to_kafka,
    eventually,
    free_port,
    group_at_end,
    produce,
    stream_env,
)
from tests.test_summary_cache import BASE, summary_cache_key

pytest_plugins = ["tests.streams_services"]  # the kafka_bootstrap and redis_url session fixtures


@pytest.fixture(scope="module")
def own_redis(redis_url: str) -> str:
    """A Redis database of this module's own: workers of other tests (or other test sessions on a
    shared broker) invalidate the shared one, and must not do this test's worker's job."""
    base, _, _db = redis_url.rpartition("/")
    return f"{base}/7"


@pytest.fixture(scope="module")
async def redis_app(backend: str, settings_for: Any, own_redis: str, kafka_bootstrap: str) -> AsyncIterator[Starlette]:
    """The edge as the production profile runs it: Redis cache, Kafka bus, no inline relay."""
    application = create_app(
        settings_for(backend, cache_url=own_redis, bus="kafka", kafka_bootstrap=kafka_bootstrap, relay="off")
    )
    async with application.router.lifespan_context(application):
        yield application


def _codes(bundle: dict[str, Any]) -> set[str]:
    return {
        e["resource"]["code"]["coding"][0]["code"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Observation"
    }


async def processed(probe: RedisCache, bootstrap: str, facility: str, streams: list[tuple[str, str]]) -> None:
    """Wait until the worker has processed everything published so far on the partitions that
    carry ``(resource type, patient)``'s events: a canary sent there with the same key (so after
    them, in order) drops a canary entry no real change touches."""
    canaries: list[str] = []  # cache keys
    for resource_type, patient_id in streams:
        canary = f"canary-{uuid.uuid4().hex[:12]}"
        await probe.set(resource_key(facility, resource_type, canary), b"x", 300)
        key = message_key(facility, resource_type, patient_id, patient_id)
        await produce(
            bootstrap, [(topic_for(resource_type), key, change(facility, resource_type, canary, None).to_json())]
        )
        canaries.append(resource_key(facility, resource_type, canary))

    async def all_dropped() -> bool:
        return all([await probe.get(c) is None for c in canaries])

    await eventually(all_dropped, "the worker to reach the canaries")


async def test_worker_invalidates_the_edges_redis_summary(
    redis_app: Starlette,
    relay_database: Database,
    facility: str,
    kafka_bootstrap: str,
    own_redis: str,
    tmp_path: Path,
) -> None:
    backends = redis_app.state.backends
    assert isinstance(getattr(backends.cache, "inner", backends.cache), RedisCache), "the edge must cache in Redis"
    group = f"edge-redis-{uuid.uuid4().hex[:8]}"
    port = free_port()
    await drain_to_kafka(relay_database, kafka_bootstrap)  # earlier tests' rows: not this worker's
    await group_at_end(kafka_bootstrap, group, [AUDIT_TOPIC, *CHANGE_TOPICS, DEAD_LETTER_TOPIC])
    worker = StreamProcess(
        "worker",
        [
            "worker",
            *("--group-id", group, "--cache-url", own_redis),
            *("--metrics-port", str(port), "--lag-interval", "0.5"),
        ],
        stream_env(app_database_url(redis_app), kafka_bootstrap, tmp_path),
        tmp_path,
    ).start()
    probe = RedisCache.from_url(own_redis)  # a separate connection: what Redis really holds
    token = token_for(backends.settings, [facility], roles=["clinician"])
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=redis_app),
            base_url=BASE,
            headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
        ) as c:
            pid = (await create(c, patient()))["id"]
            other = (await create(c, patient("Other")))["id"]
            await create(c, observation(pid, code="8867-4", value=70))
            await drain_to_kafka(relay_database, kafka_bootstrap)
            # the worker has seen those writes, so their invalidations cannot land after the reads
            await processed(
                probe, kafka_bootstrap, facility, [("Patient", pid), ("Patient", other), ("Observation", pid)]
            )

            for who in (pid, other):
                r = await c.get(f"/Patient/{who}/summary")
                assert r.status_code == 200, r.text
            first = (await c.get(f"/Patient/{pid}/summary")).json()
            assert _codes(first) == {"8867-4"}
            keys = {who: summary_cache_key(redis_app, facility, token, who) for who in (pid, other)}
            assert await probe.get(keys[pid]) is not None, "the first read filled Redis"
            assert await probe.get(keys[other]) is not None

            await create(c, observation(pid, code="8310-5", value=37.5))
            assert await probe.get(keys[pid]) is not None, "nothing but the worker drops entries here"
            await drain_to_kafka(relay_database, kafka_bootstrap)

            async def dropped() -> bool:
                return await probe.get(keys[pid]) is None

            await eventually(dropped, "the worker to drop the changed patient's summary from Redis")
            assert await probe.get(keys[other]) is not None, "another patient's summary stays cached"
            fresh = (await c.get(f"/Patient/{pid}/summary")).json()
            assert _codes(fresh) == {"8867-4", "8310-5"}, "the next read serves the new data"
            assert await probe.get(keys[pid]) is not None, "and caches it again"
        assert worker.alive, worker.tail()
    finally:
        await probe.close()
        code = worker.stop()
    assert code == 0, f"the worker did not stop cleanly (exit {code}):\n{worker.tail()}"
