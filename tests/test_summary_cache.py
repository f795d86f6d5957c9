"""The summary cache: served from cache until a change in the patient's compartment, then fresh —
through the outbox, the relay and the invalidation handler, as the embedded default runs them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.summary_service import cache_key
from tests.conftest import token_for
from tests.helpers import create, observation, patient

BASE = "http://t/fhir/r5"


@pytest.fixture(scope="module")
async def inline_app(backend: str, settings_for: Any, request: pytest.FixtureRequest) -> AsyncIterator[Starlette]:
    extra = {"relay_database_url": request.getfixturevalue("postgres_relay_url")} if backend == "postgresql" else {}
    application = create_app(settings_for(backend, relay="inline", **extra))
    async with application.router.lifespan_context(application):
        yield application


async def test_write_invalidates_the_cached_summary(inline_app: Starlette, facility: str) -> None:
    backends = inline_app.state.backends
    token = token_for(backends.settings, [facility], roles=["clinician"])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=inline_app),
        base_url=BASE,
        headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
    ) as c:
        pid = (await create(c, patient()))["id"]
        other = (await create(c, patient("Other")))["id"]
        await create(c, observation(pid, code="8867-4", value=70))
        assert backends.relay is not None
        while await backends.relay.drain_once(1000):  # the writes' invalidations are behind us
            pass
        for who in (pid, other):
            assert (await c.get(f"/Patient/{who}/summary")).status_code == 200
        keys = {who: summary_cache_key(inline_app, facility, token, who) for who in (pid, other)}
        assert await backends.cache.get(keys[pid]) is not None, "the first read filled the cache"
        assert await backends.cache.get(keys[other]) is not None
        await create(c, observation(pid, code="8310-5", value=37.5))
        for _ in range(100):  # the relay publishes, the in-process handler invalidates
            if await backends.cache.get(keys[pid]) is None:
                break
            await asyncio.sleep(0.05)
        assert await backends.cache.get(keys[pid]) is None, "the change dropped that patient's summary"
        assert await backends.cache.get(keys[other]) is not None, "and no one else's"
        codes = {
            e["resource"]["code"]["coding"][0]["code"]
            for e in (await c.get(f"/Patient/{pid}/summary")).json()["entry"]
            if e["resource"]["resourceType"] == "Observation"
        }
        assert codes == {"8867-4", "8310-5"}, "the new data is served"


def summary_cache_key(app: Starlette, facility: str, token: str, patient_id: str) -> str:
    """The cache key of ``patient_id``'s summary (5 encounters) as the caller with ``token`` reads it at BASE."""
    from gateway.context import RequestContext
    from gateway.security.policy import policy_for

    principal = app.state.backends.verifier.verify(token)
    ctx = RequestContext(facility=facility, base=BASE, policy=policy_for(principal), principal=principal)
    return cache_key(ctx, patient_id, 5)


async def test_a_summary_cached_for_one_base_url_is_not_served_under_another(
    inline_app: Starlette, facility: str
) -> None:
    """The entries' fullUrls come from the request's Host (no UNIHEALTH_BASE_URL here): another Host
    (a client, or someone poisoning the cache with a forged one) never gets them."""
    token = token_for(inline_app.state.backends.settings, [facility], roles=["clinician"])
    headers = {"X-Facility-Id": facility, "Authorization": f"Bearer {token}"}
    urls: dict[str, set[str]] = {}
    for host in ("a.example", "b.example", "a.example"):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=inline_app), base_url=f"http://{host}/fhir/r5", headers=headers
        ) as c:
            if not urls:
                pid = (await create(c, patient()))["id"]
                await asyncio.sleep(0.2)  # let the relay drain the write
            r = await c.get(f"/Patient/{pid}/summary")
            assert r.status_code == 200
            urls.setdefault(host, set()).update(e["fullUrl"].split("/")[2] for e in r.json()["entry"])
    assert urls == {"a.example": {"a.example"}, "b.example": {"b.example"}}


async def test_moving_a_resource_to_another_patient_invalidates_both(inline_app: Starlette, facility: str) -> None:
    """A corrected subject moves an Observation out of one compartment into another: the change
    event names both patients, so neither summary is served stale."""
    from sqlalchemy import select

    from subgraphs.store.schema import outbox

    backends = inline_app.state.backends
    token = token_for(backends.settings, [facility], roles=["clinician"])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=inline_app),
        base_url=BASE,
        headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
    ) as c:
        left, joined = (await create(c, patient("Left")))["id"], (await create(c, patient("Joined")))["id"]
        obs = await create(c, observation(left, code="8867-4", value=70))

        async def observations(who: str) -> set[str]:
            bundle = (await c.get(f"/Patient/{who}/summary")).json()
            return {e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"}

        await asyncio.sleep(0.2)  # let the relay drain the writes
        assert await observations(left) == {obs["id"]} and await observations(joined) == set()
        keys = {who: summary_cache_key(inline_app, facility, token, who) for who in (left, joined)}
        assert all([await backends.cache.get(k) is not None for k in keys.values()]), "both summaries cached"
        moved = {**obs, "subject": {"reference": f"Patient/{joined}"}}
        assert (await c.put(f"/Observation/{obs['id']}", json=moved)).status_code == 200
        for _ in range(100):
            if all([await backends.cache.get(k) is None for k in keys.values()]):
                break
            await asyncio.sleep(0.05)
        assert await backends.cache.get(keys[left]) is None, "the patient it left"
        assert await backends.cache.get(keys[joined]) is None, "the patient it joined"
        assert await observations(left) == set() and await observations(joined) == {obs["id"]}
        async with backends.db.transaction(write=False, facility=facility) as conn:
            row = (
                await conn.execute(
                    select(outbox.c.patient_id, outbox.c.previous_patient_id).where(
                        outbox.c.facility == facility, outbox.c.id == obs["id"], outbox.c.version == 2
                    )
                )
            ).one()
        assert (row.patient_id, row.previous_patient_id) == (joined, left)
