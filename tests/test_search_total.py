"""``_total`` (issue 3) on every backend: ``none`` never counts, ``accurate`` always does,
``estimate`` is the PostgreSQL planner's row estimate, or the accurate count where that plans at
most :data:`engine.EXACT_BELOW` matches (SQLite: the accurate count); counts never include
another facility's rows."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy.dialects import postgresql
from starlette.applications import Starlette

from subgraphs.store import engine
from subgraphs.store import statements as sql
from subgraphs.store.database import open_database
from subgraphs.store.records import Change, new_id
from subgraphs.store.search import parse_search, query_shape
from tests.helpers import assert_outcome, create, observation, patient

MANY = engine.EXACT_BELOW + 100


async def analyze(app: Starlette) -> None:
    """Fresh planner statistics (as autovacuum would have), by the tables' owner on PostgreSQL."""
    settings = app.state.backends.settings
    db = open_database(settings.migration_database_url or settings.database_url)
    try:
        await db.analyze()
    finally:
        await db.dispose()


async def bundle(client: httpx.AsyncClient, params: dict[str, str], **kw: Any) -> dict[str, Any]:
    r = await client.get("/Observation", params=params, **kw)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_none_accurate_and_small_estimates(client: httpx.AsyncClient, other_facility: str) -> None:
    pid = (await create(client, patient("Total")))["id"]
    for value in (60, 70, 80):
        await create(client, observation(pid, value=value))
    other = {"X-Facility-Id": other_facility}
    other_pid = (await client.post("/Patient", json=patient("T"), headers=other)).json()["id"]
    for _ in range(4):  # another facility's rows never count, however the total is made
        r = await client.post("/Observation", json=observation(other_pid), headers=other)
        assert r.status_code == 201
    assert "total" not in await bundle(client, {"patient": pid, "_total": "none"}), "none: not even the free one"
    assert "total" not in await bundle(client, {"patient": pid, "_total": "none", "_count": "1"})
    assert (await bundle(client, {"patient": pid, "_total": "accurate", "_count": "1"}))["total"] == 3
    assert (await bundle(client, {"patient": pid, "_total": "estimate", "_count": "1"}))["total"] == 3
    assert (await bundle(client, {"code": "8867-4", "_total": "estimate", "_count": "1"}))["total"] == 3
    counted = await bundle(client, {"patient": pid, "_summary": "count", "_total": "estimate"})
    assert counted["total"] == 3 and not counted.get("entry")
    assert (await bundle(client, {"patient": pid, "_count": "0", "_total": "none"}))["total"] == 3
    assert (await bundle(client, {"code": "8867-4", "_total": "accurate"}, headers=other))["total"] == 4
    assert_outcome(await client.get("/Observation", params={"_total": "roughly"}), 400)


async def test_estimate_of_a_large_result(app: Starlette, client: httpx.AsyncClient, facility: str) -> None:
    pid = (await create(client, patient("Many")))["id"]
    changes = [Change("Observation", new_id(), observation(pid, value=i % 200)) for i in range(MANY)]
    async with app.state.backends.repository(facility, write=True) as repo:
        await repo.save_many(changes)
    await analyze(app)
    accurate = await bundle(client, {"patient": pid, "_total": "accurate", "_count": "5"})
    assert accurate["total"] == MANY
    estimated = (await bundle(client, {"patient": pid, "_total": "estimate", "_count": "5"}))["total"]
    if app.state.backends.db.dialect == "postgresql":
        # the planner's figure (fresh statistics: close), or the count if it planned few
        assert MANY // 2 <= estimated <= 2 * MANY, estimated
    else:
        assert estimated == MANY
    # a small result is counted exactly, on both backends
    few = await bundle(client, {"patient": pid, "value-quantity": "lt5", "_total": "estimate", "_count": "1"})
    assert few["total"] == sum(1 for i in range(MANY) if i % 200 < 5)


def test_the_estimate_is_an_explain_with_bound_values_only() -> None:
    query = parse_search("Observation", [("code", "http://loinc.org|8867-4'; DROP TABLE resources; --")])
    text = str(sql.estimate(query_shape(query), None).compile(dialect=postgresql.dialect()))
    assert text.startswith("EXPLAIN (FORMAT JSON) SELECT resources.id")
    assert "DROP" not in text and "8867-4" not in text
    assert "%(facility)s" in text
