"""The gateway's entity cache (``gateway/graphql_cache.py``, the executor's ``EntityCache`` hook):
a ward page's per-patient ``_entities`` answers served from the edge's cache (in-process and a
real Redis), on every backend, with the relay and invalidation running as the embedded default
runs them. Which patients are on the page is never cached: the patient subgraph is always asked.

The edge app, Redis and REST fixtures are ``tests/test_graphql_cache.py``'s (imported, hence F811).
"""
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from starlette.applications import Starlette

from gateway.graphql_cache import GraphQLCache, entity_cacheable
from streams.cache import Cache
from streams.invalidation import graphql_prefix, invalidate
from tests.conftest import token_for
from tests.helpers import create, observation, patient
from tests.streams_services import redis_url  # noqa: F401  (fixture)
from tests.test_graphql_cache import (  # noqa: F401  (fixtures)
    Counting,
    ask,
    bare_cache,
    cache_kind,
    change,
    counted,
    edge_app,
    graphql_edge,
    request_of,
    rest,
    sealed,
    settle,
)

WARD = """query Ward {
  patients(first: 50) {
    nodes {
      id name { family }
      latestVitals { code { code } valueQuantity { value unit } }
      medicationRequests(status: "active") { id status }
    }
  }
}"""


async def ward_of(rest: httpx.AsyncClient, edge_app: Starlette, size: int) -> list[str]:
    ids = []
    for n in range(size):
        pid = (await create(rest, patient(f"Ward{n}")))["id"]
        await create(rest, observation(pid, code="8867-4", value=60 + n))
        ids.append(pid)
    await settle(edge_app.state.backends)
    return ids


def vitals(body: dict[str, Any]) -> dict[str, set[str]]:
    return {node["id"]: {v["code"]["code"] for v in node["latestVitals"]} for node in body["data"]["patients"]["nodes"]}


async def test_the_second_ward_asks_only_for_the_page(
    edge_app: Starlette, cache_kind: str, counted: Counting, rest: httpx.AsyncClient, facility: str
) -> None:
    gateway = graphql_edge(edge_app).gateway
    assert gateway is not None and isinstance(gateway.cache, GraphQLCache)
    assert gateway.executor.entity_cache is gateway.cache, "the edge's response cache is its entity cache"
    ids = await ward_of(rest, edge_app, 4)
    token = token_for(edge_app.state.backends.settings, [facility], roles=["clinician"])
    mark = counted.sent
    first = await ask(edge_app, token, facility, {}, query=WARD)
    assert "errors" not in first and set(vitals(first)) == set(ids)
    assert counted.since(mark) == {"patient": 0, "observation": 4, "medication": 4}, "cold: every patient asked"

    mark = counted.sent
    second = await ask(edge_app, token, facility, {}, query=WARD)
    assert second == first, "the same answer"
    assert counted.since(mark) == {"patient": 0}, "warm: only the page itself, no _entities request at all"


async def test_a_change_refetches_only_that_patient(
    edge_app: Starlette, counted: Counting, rest: httpx.AsyncClient, facility: str
) -> None:
    ids = await ward_of(rest, edge_app, 3)
    token = token_for(edge_app.state.backends.settings, [facility], roles=["clinician"])
    await ask(edge_app, token, facility, {}, query=WARD)
    await ask(edge_app, token, facility, {}, query=WARD)

    await create(rest, observation(ids[1], code="8310-5", value=37.5))
    await settle(edge_app.state.backends)
    mark = counted.sent
    fresh = await ask(edge_app, token, facility, {}, query=WARD)
    assert vitals(fresh)[ids[1]] == {"8867-4", "8310-5"}, "the new observation is in the answer"
    assert vitals(fresh)[ids[0]] == {"8867-4"}
    assert counted.since(mark) == {"patient": 0, "observation": 1, "medication": 1}, "only the changed patient"


async def test_another_access_level_or_facility_does_not_share_entities(
    edge_app: Starlette, counted: Counting, rest: httpx.AsyncClient, facility: str, other_facility: str
) -> None:
    ids = await ward_of(rest, edge_app, 2)
    backends = edge_app.state.backends
    wide = token_for(backends.settings, [facility, other_facility], roles=["clinician"])
    await ask(edge_app, wide, facility, {}, query=WARD)
    narrow = token_for(
        backends.settings,
        [facility],
        roles=["clinician"],
        scopes=["user/Patient.rs", "user/MedicationRequest.rs", "user/Observation.rs?category=laboratory"],
    )
    mark = counted.sent
    labs = await ask(edge_app, narrow, facility, {}, query=WARD)
    assert counted.since(mark).get("observation") == 2, "another access level: asked again"
    assert vitals(labs) == {pid: set() for pid in ids}, "and it sees only what its scopes allow"

    mark = counted.sent
    elsewhere = await ask(edge_app, wide, other_facility, {}, query=WARD)
    assert elsewhere["data"]["patients"]["nodes"] == [], "another facility's page is its own (empty)"
    assert counted.since(mark) == {"patient": 0}


async def test_entities_served_from_cache_have_an_access_record(
    edge_app: Starlette, counted: Counting, rest: httpx.AsyncClient, facility: str
) -> None:
    ids = await ward_of(rest, edge_app, 3)
    backends = edge_app.state.backends
    token = token_for(backends.settings, [facility], roles=["clinician"], subject="dr-ward")
    await ask(edge_app, token, facility, {}, query=WARD)
    request_id = "ward-" + uuid.uuid4().hex
    mark = counted.sent
    await ask(edge_app, token, facility, {}, request_id=request_id, query=WARD)
    assert counted.since(mark) == {"patient": 0}
    records: list[dict[str, Any]] = []
    for _ in range(100):  # relayed and sealed by the in-process handlers
        await settle(backends)
        records = [r for r in await sealed(backends, facility) if request_of(r) == request_id]
        if len(records) >= 2:
            break
        await asyncio.sleep(0.05)
    assert len(records) == 2, "the patient subgraph's record and the edge's, one request id"
    wanted = frozenset(f"Patient/{p}" for p in ids)
    assert all(_patient_refs(r) == wanted for r in records), "each names every patient of the page"
    assert all(r["agent"][0]["who"]["identifier"]["value"] == "dr-ward" for r in records)
    assert all(r["code"]["coding"][0]["code"] == "graphql" for r in records)


def _patient_refs(event: dict[str, Any]) -> frozenset[str]:
    return frozenset(
        e["what"]["reference"]
        for e in event.get("entity", [])
        if str(e.get("what", {}).get("reference", "")).startswith("Patient/")
    )


async def test_only_compartment_selections_are_entity_cached(edge_app: Starlette) -> None:
    gateway = graphql_edge(edge_app).gateway
    assert gateway is not None
    from graphql import parse

    def fetches(query: str) -> list[Any]:
        document = parse(query)
        from graphql import get_operation_ast

        from gateway.federation.operation import normalize

        definition = get_operation_ast(document)
        assert definition is not None
        operation = normalize(gateway.supergraph.api_schema, document, definition, {})
        return [f for f in gateway.planner.plan(operation).fetches if f.type_name is not None]

    ward = fetches(WARD)
    assert ward and all(entity_cacheable(f) for f in ward)
    reference_data = fetches(
        "{ patients(first: 5) { nodes { id medicationRequests { id medicationReference { id } } } } }"
    )
    assert reference_data and not any(entity_cacheable(f) for f in reference_data), (
        "a Medication is not in the patient's compartment: a change to it would not invalidate"
    )


async def test_the_batched_cache_calls_keep_the_single_calls_contract(bare_cache: Cache) -> None:
    """get_many / generations / set_many_if_current: what a ward's lookup and store use."""
    f = f"f{uuid.uuid4().hex[:8]}"
    prefixes = [graphql_prefix(f, p) for p in ("p1", "p2", "p3")]
    keys = [p + "lvl|e|d" for p in prefixes]
    assert await bare_cache.get_many(keys) == [None, None, None]
    tokens = await bare_cache.generations(prefixes)
    assert tokens == [await bare_cache.generation(p) for p in prefixes], "the same tokens as one by one"
    await invalidate(bare_cache, change(f, "p2"))  # p2 changes while the ward is computed
    items = [(k, f"v{n}".encode(), p, t) for n, (k, p, t) in enumerate(zip(keys, prefixes, tokens, strict=True))]
    assert await bare_cache.set_many_if_current(items, 30) == 2, "the invalidated patient's entry is refused"
    assert await bare_cache.get_many(keys) == [b"v0", None, b"v2"]
    await invalidate(bare_cache, change(f, "p1"))
    assert await bare_cache.get_many(keys) == [None, None, b"v2"], "an invalidation drops its patient's entries"
    assert await bare_cache.get_many([]) == [] and await bare_cache.set_many_if_current([], 30) == 0
