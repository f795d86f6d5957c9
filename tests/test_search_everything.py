"""``Patient/{id}/$everything`` (the interaction; the route is wired in fhir_rest/routes.py) and the
reindex path, on every backend."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette

from fhir_rest.interactions.search import everything
from gateway.context import RequestContext
from subgraphs.store import engine
from subgraphs.store.access import AccessPolicy
from subgraphs.store.errors import FhirError
from subgraphs.store.registry import SearchParam, default_registry
from tests.helpers import create, observation, patient


async def _everything(app: Starlette, facility: str, pid: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    backends = app.state.backends
    ctx = RequestContext(facility=facility, base="http://t/fhir/r5", policy=AccessPolicy.unrestricted("test"))
    async with backends.session(ctx, write=False) as repo:
        result = await everything(
            ctx, repo, backends.settings.secret_key, pid, pairs, f"{ctx.base}/Patient/{pid}/$everything", 50, 1000
        )
    assert result.status == 200
    body: dict[str, Any] = orjson.loads(orjson.dumps(result.body))
    return body


def _entries(bundle: dict[str, Any], mode: str = "match") -> list[tuple[str, str]]:
    return [
        (e["resource"]["resourceType"], e["resource"]["id"]) for e in bundle["entry"] if e["search"]["mode"] == mode
    ]


def _page_token(bundle: dict[str, Any]) -> str | None:
    url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return url.split("_page=")[1] if url else None


async def test_everything_returns_the_compartment_in_pages(
    app: Starlette, client: httpx.AsyncClient, facility: str, other_facility: str
) -> None:
    doc = (await create(client, {"resourceType": "Practitioner", "name": [{"family": "Doc"}]}))["id"]
    pid = (await create(client, patient("Every")))["id"]
    stranger = (await create(client, patient("Stranger")))["id"]
    ref = {"reference": f"Patient/{pid}"}
    enc = (await create(client, {"resourceType": "Encounter", "status": "completed", "subject": ref}))["id"]
    obs = []
    for _ in range(3):
        o = observation(pid, encounter={"reference": f"Encounter/{enc}"})
        o["performer"] = [{"reference": f"Practitioner/{doc}"}]
        obs.append((await create(client, o))["id"])
    active = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}
    condition = {"resourceType": "Condition", "subject": ref, "code": {"text": "x"}, "clinicalStatus": active}
    cond = (await create(client, condition))["id"]
    await create(client, observation(stranger))
    # the same patient id in another facility, with its own observation: never part of this
    there = {"X-Facility-Id": other_facility}
    assert (await client.put(f"/Patient/{pid}", json=patient("There", id=pid), headers=there)).status_code == 201
    assert (await client.post("/Observation", json=observation(pid), headers=there)).status_code == 201

    expected = sorted([("Patient", pid), ("Encounter", enc), ("Condition", cond), *(("Observation", o) for o in obs)])
    whole = await _everything(app, facility, pid, [])
    assert sorted(_entries(whole)) == expected and whole["total"] == len(expected)
    assert _entries(whole, "include") == [("Practitioner", doc)]
    # pages of 2, in (type, id) order, no gaps, no repeats
    seen: list[tuple[str, str]] = []
    token: str | None = None
    for _ in range(10):
        page = await _everything(app, facility, pid, [("_count", "2"), *([("_page", token)] if token else [])])
        seen += _entries(page)
        token = _page_token(page)
        if token is None:
            break
    assert seen == expected
    only = await _everything(app, facility, pid, [("_type", "Observation,Condition")])
    assert sorted(_entries(only)) == sorted([("Condition", cond), *(("Observation", o) for o in obs)])
    later = await _everything(app, facility, pid, [("_since", "2999-01-01T00:00:00Z")])
    assert _entries(later) == []
    # a cursor of one patient's $everything is not valid for another's, or another facility
    first = await _everything(app, facility, pid, [("_count", "1")])
    token = _page_token(first)
    assert token
    for target, where in ((stranger, facility), (pid, other_facility)):
        try:
            await _everything(app, where, target, [("_count", "1"), ("_page", token)])
        except FhirError as exc:
            assert exc.status == 400
        else:
            raise AssertionError("a foreign cursor was accepted")
    for bad in ([("_type", "Nope")], [("_since", "yesterday")], [("_count", "0")]):
        try:
            await _everything(app, facility, pid, bad)
        except FhirError as exc:
            assert exc.status == 400
        else:
            raise AssertionError(f"{bad} was accepted")
    try:
        await _everything(app, facility, "no-such-patient", [])
    except FhirError as exc:
        assert exc.status == 404
    else:
        raise AssertionError("an unknown patient had everything")


async def test_reindex_applies_a_new_search_parameter(app: Starlette, client: httpx.AsyncClient, facility: str) -> None:
    pid = (await create(client, patient("Reindex")))["id"]
    body = observation(pid)
    body.pop("valueQuantity")
    body["valueInteger"] = 7
    oid = (await create(client, body))["id"]
    code = f"test-value-integer-{uuid.uuid4().hex[:8]}"  # the registry is process-wide
    default_registry().add(
        SearchParam(
            code,
            "number",
            "Observation.value.ofType(integer)",
            url=f"urn:unihealth:test:{code}",
            base=("Observation",),
            comparators=("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"),
            modifiers=("missing",),
        )
    )
    before = (await client.get("/Observation", params={code: "7"})).json()
    assert [e["resource"]["id"] for e in before["entry"]] == [], "stored before the parameter existed"
    async with app.state.backends.repository(facility, write=True) as repo:
        assert await engine.reindex(repo, "Observation") == 1
    for params, hit in (({code: "7"}, True), ({code: "gt6.5"}, True), ({code: "ne7"}, False), ({code: "8"}, False)):
        got = (await client.get("/Observation", params=params)).json()
        assert [e["resource"]["id"] for e in got["entry"]] == ([oid] if hit else []), params
    # new writes are indexed with it from now on
    body["valueInteger"] = 9
    nine = (await create(client, body))["id"]
    got = (await client.get("/Observation", params={code: "ge8"})).json()
    assert [e["resource"]["id"] for e in got["entry"]] == [nine]
    async with app.state.backends.repository(facility, write=True) as repo:
        assert await engine.reindex(repo) == 3  # every type: the Patient and both Observations
        assert await engine.reindex(repo, "Observation", batch_size=1) == 2
        n, position = await engine.reindex_step(repo, limit=2)
        assert n == 2 and position is not None
        n, position = await engine.reindex_step(repo, after=position, limit=2)
        assert n == 1 and position is None
