"""The GraphQL response cache (``gateway/graphql_cache.py``) of the edge's ``/graphql``, on every
backend, over the embedded in-process cache and over a real Redis, with the outbox relay, the
in-process bus and its invalidation handler running as the embedded default runs them.

Also the race the cache generations close (``streams/cache.py``, Races), deterministically: a
reader reads the generation, a change's invalidation runs, the reader stores → nothing is stored —
for the cache contract, the GraphQL cache and the REST summary cache.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy import select
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.backends import Backends
from gateway.context import RequestContext
from gateway.federation.executor import RESERVED_VARIABLE_PREFIX
from gateway.federation.gateway import GraphQLRequest, fingerprint
from gateway.federation.transport import Forwarded, SubgraphResponse
from gateway.graphql_app import GraphQLEdge
from gateway.graphql_cache import GraphQLCache
from gateway.security.policy import access_level, policy_for
from gateway.summary_service import cache_key as summary_cache_key
from streams.cache import Cache, MemoryCache, RedisCache
from streams.events import ChangeEvent
from streams.invalidation import graphql_prefix, invalidate, summary_prefix
from subgraphs.store.schema import audit_log
from tests.conftest import token_for
from tests.helpers import create, observation, patient
from tests.streams_services import redis_url  # noqa: F401

SUMMARY = """query Summary($id: ID!) {
  patient(id: $id) {
    id name { family }
    latestVitals { code { code } valueQuantity { value unit } }
  }
}"""


# ---------------------------------------------------------------------------------- plumbing
class Counting:
    """The edge's own transport, recording the subgraph requests the gateway sends through it:
    per request the subgraph and how many ``_entities`` representations it carried."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[tuple[str, int]] = []

    @property
    def sent(self) -> int:
        return len(self.requests)

    async def send(
        self, subgraph: str, query: str, variables: Mapping[str, Any], operation_name: str | None, forwarded: Forwarded
    ) -> SubgraphResponse:
        reps = sum(len(v) for k, v in variables.items() if k.startswith(f"{RESERVED_VARIABLE_PREFIX}r"))
        self.requests.append((subgraph, reps))
        response: SubgraphResponse = await self.inner.send(subgraph, query, variables, operation_name, forwarded)
        return response

    async def close(self) -> None:
        await self.inner.close()

    def since(self, mark: int) -> dict[str, int]:
        """Representations sent per subgraph since request number ``mark`` (root requests count 0)."""
        out: dict[str, int] = {}
        for subgraph, reps in self.requests[mark:]:
            out[subgraph] = out.get(subgraph, 0) + reps
        return out


class InvalidatedWhileComputing:
    """A real cache through which every generation read is followed by a change's invalidation of
    ``patient`` — as when a write commits and is invalidated while the reader computes."""

    def __init__(self, inner: Cache, facility: str, patient_id: str) -> None:
        self.inner, self.facility, self.patient_id = inner, facility, patient_id
        self.invalidations = 0

    async def generation(self, prefix: str) -> str:
        token = await self.inner.generation(prefix)
        await invalidate(self.inner, change(self.facility, self.patient_id))
        self.invalidations += 1
        return token

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def change(facility: str, patient_id: str) -> ChangeEvent:
    return ChangeEvent(
        event_id=str(uuid.uuid4()),
        facility=facility,
        resource_type="Observation",
        resource_id=str(uuid.uuid4()),
        version=1,
        operation="create",
        patient_id=patient_id,
        occurred_at=datetime.now(UTC).isoformat(),
    )


@pytest.fixture(scope="module", params=["memory", "redis"])
def cache_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
async def edge_app(
    backend: str, cache_kind: str, settings_for: Any, request: pytest.FixtureRequest
) -> AsyncIterator[Starlette]:
    extra: dict[str, object] = {}
    if backend == "postgresql":
        extra["relay_database_url"] = request.getfixturevalue("postgres_relay_url")
    if cache_kind == "redis":
        extra["cache_url"] = request.getfixturevalue("redis_url")
    application = create_app(settings_for(backend, relay="inline", **extra))
    async with application.router.lifespan_context(application):
        yield application


def graphql_edge(app: Starlette) -> GraphQLEdge:
    for route in app.routes:
        if getattr(route, "path", None) == "/graphql":
            edge = route.endpoint.__self__  # type: ignore[attr-defined]
            assert isinstance(edge, GraphQLEdge)
            return edge
    raise AssertionError("the edge app does not serve /graphql")


@pytest.fixture
async def counted(edge_app: Starlette) -> AsyncIterator[Counting]:
    gateway = graphql_edge(edge_app).gateway
    assert gateway is not None, "the lifespan started the gateway"
    assert isinstance(gateway.cache, GraphQLCache), "the edge has the response cache by default"
    original = gateway.transport
    counting = Counting(original)
    gateway.transport = gateway.executor.transport = counting
    try:
        yield counting
    finally:
        gateway.transport = gateway.executor.transport = original


@pytest.fixture
async def rest(edge_app: Starlette, facility: str, other_facility: str) -> AsyncIterator[httpx.AsyncClient]:
    token = token_for(edge_app.state.backends.settings, [facility, other_facility])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=edge_app),
        base_url="http://t/fhir/r5",
        headers={
            "X-Facility-Id": facility,
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/fhir+json",
        },
        timeout=60,
    ) as c:
        yield c


async def settle(backends: Backends) -> None:
    """Every committed change published and invalidated (the inline relay, drained now)."""
    assert backends.relay is not None
    while await backends.relay.drain_once(1000):
        pass


async def ask(
    app: Starlette,
    token: str | None,
    facility: str,
    variables: dict[str, Any],
    request_id: str = "",
    query: str = SUMMARY,
) -> dict[str, Any]:
    headers = {"X-Facility-Id": facility, "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if request_id:
        headers["X-Request-Id"] = request_id
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
        r = await c.post("/graphql", json={"query": query, "variables": variables}, headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def key_of(backends: Backends, token: str, facility: str, pid: str) -> str:
    level = access_level(policy_for(backends.verifier.verify(token)))
    return f"{graphql_prefix(facility, pid)}{level}|{fingerprint(GraphQLRequest(SUMMARY, {'id': pid}))}"


async def in_redis(app: Starlette, key: str) -> bool:
    """Whether ``key`` exists in the Redis server itself (not through our client class)."""
    url = app.state.backends.settings.cache_url
    facility, _, rest = key.partition("|")
    client = aioredis.from_url(url)
    try:
        return bool(await client.exists(f"uh:{{{facility}}}:c:{rest}"))
    finally:
        await client.aclose()


async def chart(rest: httpx.AsyncClient, backends: Backends) -> str:
    pid = (await create(rest, patient("Cached")))["id"]
    await create(rest, observation(pid, code="8867-4", value=70))
    await create(rest, observation(pid, code="2345-7", value=5.10, category="laboratory"))
    await settle(backends)
    return pid


def codes_of(body: dict[str, Any]) -> set[str]:
    return {v["code"]["code"] for v in body["data"]["patient"]["latestVitals"]}


# ---------------------------------------------------------------------------------- the cache
async def test_a_second_identical_query_is_served_from_cache(
    edge_app: Starlette, cache_kind: str, counted: Counting, rest: httpx.AsyncClient, facility: str
) -> None:
    backends = edge_app.state.backends
    pid = await chart(rest, backends)
    token = token_for(backends.settings, [facility], roles=["clinician"])
    first = await ask(edge_app, token, facility, {"id": pid})
    assert "errors" not in first and codes_of(first) == {"8867-4", "2345-7"}
    asked = counted.sent
    assert asked >= 2, "the miss asked the patient and observation subgraphs"
    key = key_of(backends, token, facility, pid)
    assert await backends.cache.get(key) is not None, "the answer was stored under facility|graphql|patient|level|fp"
    if cache_kind == "redis":
        assert await in_redis(edge_app, key), "and it is in Redis"
    second = await ask(edge_app, token, facility, {"id": pid})
    assert second == first
    assert counted.sent == asked, "served from cache: no subgraph was asked"
    assert json.loads(await backends.cache.get(key)) == first["data"], "what is stored is the answer's data"


async def test_another_access_level_or_facility_never_gets_the_cached_answer(
    edge_app: Starlette, counted: Counting, rest: httpx.AsyncClient, facility: str, other_facility: str
) -> None:
    backends = edge_app.state.backends
    pid = await chart(rest, backends)
    wide = token_for(backends.settings, [facility, other_facility], roles=["clinician"])
    full = await ask(edge_app, wide, facility, {"id": pid})
    assert codes_of(full) == {"8867-4", "2345-7"} and await ask(edge_app, wide, facility, {"id": pid}) == full
    asked = counted.sent

    narrow = token_for(
        backends.settings,
        [facility],
        roles=["clinician"],
        scopes=["user/Patient.rs", "user/Observation.rs?category=laboratory"],
    )
    labs = await ask(edge_app, narrow, facility, {"id": pid})
    assert codes_of(labs) == {"2345-7"}, "the narrower scopes' own answer, not the cached one"
    assert counted.sent > asked, "a different access level is a miss"
    assert key_of(backends, narrow, facility, pid) != key_of(backends, wide, facility, pid)

    asked = counted.sent
    elsewhere = await ask(edge_app, wide, other_facility, {"id": pid})
    assert elsewhere["data"] == {"patient": None}
    assert [e["extensions"]["code"] for e in elsewhere["errors"]] == ["NOT_FOUND"]
    assert counted.sent > asked, "another facility is a miss (and its NOT_FOUND is not cached)"
    assert await backends.cache.get(key_of(backends, wide, other_facility, pid)) is None

    asked = counted.sent
    stranger = token_for(backends.settings, [other_facility], roles=["clinician"])
    refused = await ask(edge_app, stranger, facility, {"id": pid})
    assert refused["data"] == {"patient": None} and "errors" in refused, "a facility not in the token: refused"
    anonymous = await ask(edge_app, None, facility, {"id": pid})
    assert anonymous["data"] == {"patient": None} and "errors" in anonymous, "no token: refused by the subgraphs"
    assert counted.sent > asked + 1, "neither was answered from the cache"


NOT_CACHED = {
    "several patients": "{ patients(first: 5) { nodes { id name { family } } } }",
    "two roots": "query($id: ID!) { a: patient(id: $id) { id } b: patient(id: $id) { name { family } } }",
    "a resource outside the compartment": (
        "query($id: ID!) { patient(id: $id) { id medicationRequests { id medicationReference { id } } } }"
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_CACHED))
async def test_only_one_patients_compartment_is_cached(
    edge_app: Starlette, counted: Counting, rest: httpx.AsyncClient, facility: str, case: str
) -> None:
    """What a change to that one patient does not invalidate is never cached: ward pages (their
    members change with other patients' writes), several roots, a Medication (reference data)."""
    backends = edge_app.state.backends
    pid = await chart(rest, backends)
    token = token_for(backends.settings, [facility], roles=["clinician"])
    query = NOT_CACHED[case]
    variables = {"id": pid} if "$id" in query else {}
    first = await ask(edge_app, token, facility, variables, query=query)
    asked = counted.sent
    assert "errors" not in first and asked > 0
    assert await ask(edge_app, token, facility, variables, query=query) == first
    assert counted.sent > asked, f"{case}: asked the subgraphs again"


async def test_a_write_to_the_patient_invalidates_and_the_next_answer_is_fresh(
    edge_app: Starlette, cache_kind: str, counted: Counting, rest: httpx.AsyncClient, facility: str
) -> None:
    backends = edge_app.state.backends
    pid = await chart(rest, backends)
    other = await chart(rest, backends)
    token = token_for(backends.settings, [facility], roles=["clinician"])
    for who in (pid, other):
        await ask(edge_app, token, facility, {"id": who})
    key, other_key = key_of(backends, token, facility, pid), key_of(backends, token, facility, other)
    assert await backends.cache.get(key) is not None and await backends.cache.get(other_key) is not None

    await create(rest, observation(pid, code="8310-5", value=37.5))
    for _ in range(100):  # the inline relay publishes, the in-process handler invalidates
        if await backends.cache.get(key) is None:
            break
        await asyncio.sleep(0.05)
    assert await backends.cache.get(key) is None, "the change dropped that patient's answers"
    if cache_kind == "redis":
        assert not await in_redis(edge_app, key)
    assert await backends.cache.get(other_key) is not None, "and no one else's"

    asked = counted.sent
    fresh = await ask(edge_app, token, facility, {"id": pid})
    assert codes_of(fresh) == {"8867-4", "2345-7", "8310-5"}, "the new data is served"
    assert counted.sent > asked
    assert await backends.cache.get(key) is not None, "and cached again"


async def test_a_cache_hit_writes_its_own_access_record(
    edge_app: Starlette, counted: Counting, rest: httpx.AsyncClient, facility: str
) -> None:
    backends = edge_app.state.backends
    pid = await chart(rest, backends)
    token = token_for(backends.settings, [facility], roles=["clinician"], subject="dr-hit")
    await ask(edge_app, token, facility, {"id": pid}, request_id="miss-" + uuid.uuid4().hex)
    asked = counted.sent
    hit_id = "hit-" + uuid.uuid4().hex
    await ask(edge_app, token, facility, {"id": pid}, request_id=hit_id)
    assert counted.sent == asked, "a hit"
    records: list[dict[str, Any]] = []
    for _ in range(100):  # relayed and sealed by the in-process handlers
        await settle(backends)
        records = [r for r in await sealed(backends, facility) if request_of(r) == hit_id]
        if records:
            break
        await asyncio.sleep(0.05)
    assert len(records) == 1, "one access record for the operation served from cache"
    (record,) = records
    assert record["code"]["coding"][0]["code"] == "graphql"
    assert record["patient"] == {"reference": f"Patient/{pid}"}
    assert record["agent"][0]["who"] == {"identifier": {"system": "urn:unihealth:subject", "value": "dr-hit"}}
    assert record["outcome"]["code"]["code"] == "0"


async def sealed(backends: Backends, facility: str) -> list[dict[str, Any]]:
    import orjson

    async with backends.db.transaction(write=False, facility=facility) as conn:
        rows = await conn.execute(select(audit_log.c.content).where(audit_log.c.facility == facility))
        return [orjson.loads(r.content) for r in rows]


def request_of(event: dict[str, Any]) -> str | None:
    for entity in event.get("entity", []):
        identifier = entity.get("what", {}).get("identifier", {})
        if identifier.get("system") == "urn:unihealth:request":
            return str(identifier["value"])
    return None


# ---------------------------------------------------------------------------------- the race
@pytest.fixture(params=["memory", "redis"])
async def bare_cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    cache: Cache
    if request.param == "memory":
        cache = MemoryCache(max_entries=100)
    else:
        cache = RedisCache.from_url(request.getfixturevalue("redis_url"), namespace=f"t{uuid.uuid4().hex[:8]}:")
    try:
        yield cache
    finally:
        await cache.close()


async def test_a_store_after_the_invalidation_of_a_read_generation_is_refused(bare_cache: Cache) -> None:
    f, pid = f"f{uuid.uuid4().hex[:8]}", "p1"
    for prefix in (graphql_prefix(f, pid), summary_prefix(f, pid)):
        key = prefix + "level|fp"
        token = await bare_cache.generation(prefix)
        assert await bare_cache.generation(prefix) == token, "stable until invalidated"
        await invalidate(bare_cache, change(f, pid))  # the change lands while the reader computes
        assert not await bare_cache.set_if_current(key, b"stale", 30, prefix, token)
        assert await bare_cache.get(key) is None, "nothing stale was stored"
        fresh = await bare_cache.generation(prefix)
        assert fresh != token
        assert await bare_cache.set_if_current(key, b"fresh", 30, prefix, fresh)
        assert await bare_cache.get(key) == b"fresh", "a reader that started after the change stores"
    other = graphql_prefix(f, "p2")
    token = await bare_cache.generation(other)
    await invalidate(bare_cache, change(f, pid))
    assert await bare_cache.set_if_current(other + "l|q", b"v", 30, other, token), "another patient is unaffected"
    with pytest.raises(ValueError):
        await bare_cache.set_if_current(f"{f}|graphql|p3|l|q", b"v", 30, other, token)  # not its prefix


async def test_an_answer_computed_across_an_invalidation_is_not_stored(
    edge_app: Starlette, counted: Counting, rest: httpx.AsyncClient, facility: str
) -> None:
    """GraphQL and the REST summary: generation read, then the change's invalidation, then the store."""
    backends = edge_app.state.backends
    pid = await chart(rest, backends)
    token = token_for(backends.settings, [facility], roles=["clinician"])
    real = backends.cache
    racing = InvalidatedWhileComputing(real, facility, pid)
    backends.cache = racing
    try:
        answer = await ask(edge_app, token, facility, {"id": pid})
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=edge_app),
            base_url="http://t/fhir/r5",
            headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
        ) as c:
            assert (await c.get(f"/Patient/{pid}/summary")).status_code == 200
    finally:
        backends.cache = real
    assert codes_of(answer) == {"8867-4", "2345-7"} and racing.invalidations == 2
    principal = backends.verifier.verify(token)
    ctx = RequestContext(facility=facility, base="http://t/fhir/r5", policy=policy_for(principal), principal=principal)
    assert await real.get(key_of(backends, token, facility, pid)) is None, "the GraphQL answer was not stored"
    assert await real.get(summary_cache_key(ctx, pid, 5)) is None, "nor the REST summary"

    await ask(edge_app, token, facility, {"id": pid})  # without a change in between, both are stored
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=edge_app),
        base_url="http://t/fhir/r5",
        headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
    ) as c:
        assert (await c.get(f"/Patient/{pid}/summary")).status_code == 200
    assert await real.get(key_of(backends, token, facility, pid)) is not None
    assert await real.get(summary_cache_key(ctx, pid, 5)) is not None
