"""``Patient.linkedRecords`` over the edge's ``/graphql``: the linked records of other facilities,
shared by consent or under break-the-glass, each marked with its source facility, audited in the
source's chain, never cached — on every backend, through the federated gateway and its response
cache exactly as clients use them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.graphql_app import GraphQLEdge
from gateway.graphql_cache import GraphQLCache
from subgraphs.store.database import Database
from tests.conftest import token_for
from tests.helpers import create, observation, patient, treatment_consent
from tests.test_audit import chain, seal

NID = "https://unihealth.dev/fhir/sid/national-id"
RESTRICTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}
LINKED = """query($id: ID!) {
  patient(id: $id) {
    id
    linkedRecords { sourceFacility resourceType id breakTheGlass resource }
  }
}"""
WARD = """query($name: String) {
  patients(first: 50, name: $name) {
    nodes { id linkedRecords { sourceFacility resourceType id breakTheGlass resource } }
  }
}"""


def _rest(app: Starlette, facility: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://t/fhir/r5",
        headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
        timeout=60,
    )


@dataclass
class World:
    app: Starlette
    home: str  # B: asks
    away: str  # A: holds the linked records
    family: str  # B's linked patients' family name (the ward query's filter)
    mine: str  # B's patient, linked to ``theirs``
    theirs: str  # A's patient (same national id)
    shared_ids: set[str]  # A's summary of ``theirs`` without the restricted Observation
    restricted: str  # A's Observation of ``theirs`` labelled R
    mine2: str  # B's second patient, linked to ``theirs2``
    theirs2: str  # A's second patient: no consent for B, ever
    theirs2_ids: set[str]
    clinician: str  # B's clinician
    owner: str  # A's admin

    async def ask(
        self, query: str, variables: dict[str, Any], token: str | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False), base_url="http://t", timeout=60
        ) as c:
            r = await c.post(
                "/graphql",
                json={"query": query, "variables": variables},
                headers={
                    "X-Facility-Id": self.home,
                    "Authorization": f"Bearer {token or self.clinician}",
                    **(headers or {}),
                },
            )
        assert r.status_code == 200, r.text
        assert "Traceback" not in r.text
        return r

    async def linked(self, token: str | None = None, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """``linkedRecords`` of B's patient ``mine`` (asserting an answer without errors)."""
        body = (await self.ask(LINKED, {"id": self.mine}, token, headers)).json()
        assert "errors" not in body, body
        records: list[dict[str, Any]] = body["data"]["patient"]["linkedRecords"]
        return records

    async def consent(self, decision: str = "deny", subject: str | None = None, **provision: Any) -> str:
        """A Consent of A for ``subject`` (default ``theirs``): a provision for B, for treatment."""
        body = treatment_consent(subject or self.theirs, self.home, decision, **provision)
        async with _rest(self.app, self.away, self.owner) as away:
            return str((await create(away, body))["id"])


async def _chart(away: httpx.AsyncClient, nid: str) -> tuple[str, set[str]]:
    """A's patient with national id ``nid``: its id and its summary's ids (vitals, an encounter)."""
    theirs = (await create(away, patient("Away", identifier=[{"system": NID, "value": nid}])))["id"]
    ids = {theirs, (await create(away, observation(theirs, code="8867-4")))["id"]}
    enc = {"resourceType": "Encounter", "status": "completed", "subject": {"reference": f"Patient/{theirs}"}}
    ids.add((await create(away, enc))["id"])
    return theirs, ids


@pytest.fixture
async def world(app: Starlette, facility: str, other_facility: str) -> AsyncIterator[World]:
    settings = app.state.backends.settings
    home, away = facility, other_facility
    owner = token_for(settings, [away])
    family = f"Home{facility.replace('-', '')}"
    async with _rest(app, home, token_for(settings, [home])) as b:
        mine = (await create(b, patient(family, identifier=[{"system": NID, "value": f"NID-{home}"}])))["id"]
        await create(b, observation(mine, code="8310-5"))
        mine2 = (await create(b, patient(family, identifier=[{"system": NID, "value": f"NID2-{home}"}])))["id"]
        await create(b, patient(family))  # linked to no one
    async with _rest(app, away, owner) as a:
        theirs, ids = await _chart(a, f"NID-{home}")
        labelled = observation(theirs, code="2339-0", category="laboratory", meta={"security": [RESTRICTED]})
        restricted = (await create(a, labelled))["id"]
        theirs2, ids2 = await _chart(a, f"NID2-{home}")
    clinician = token_for(settings, [home], roles=["clinician"])
    yield World(app, home, away, family, mine, theirs, ids, restricted, mine2, theirs2, ids2, clinician, owner)


def _by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in records}


def _revealed(text: str, ids: set[str]) -> set[str]:
    return {i for i in ids if i in text}


# ---------------------------------------------------------------------------------- consent
async def test_no_consent_no_linked_records(world: World) -> None:
    r = await world.ask(LINKED, {"id": world.mine})
    assert r.json()["data"]["patient"]["linkedRecords"] == []
    assert not _revealed(r.text, {*world.shared_ids, world.restricted, *world.theirs2_ids}), r.text
    assert world.away not in r.text, "not even the source facility is hinted at"


async def test_consent_permits_present_with_source_facility(world: World, relay_database: Database) -> None:
    await seal(world.app, relay_database)  # earlier records out of the way
    cid = await world.consent()  # deny, except B for treatment
    records = _by_id(await world.linked())
    assert set(records) == {*world.shared_ids, world.restricted}, "the summary of A's record: all permitted"
    assert cid not in records, "the Consent is not part of the summary"
    for rid, rec in records.items():
        assert rec["sourceFacility"] == world.away
        assert rec["breakTheGlass"] is False
        assert rec["resource"]["id"] == rid and rec["resource"]["resourceType"] == rec["resourceType"]
    assert records[world.theirs]["resourceType"] == "Patient"
    assert records[world.theirs]["resource"]["identifier"] == [{"system": NID, "value": f"NID-{world.home}"}]
    # the ward: both linked patients in one batch; the one without consent shares nothing
    r = await world.ask(WARD, {"name": world.family})
    nodes = {n["id"]: n["linkedRecords"] for n in r.json()["data"]["patients"]["nodes"]}
    assert len(nodes) == 3 and {x["id"] for x in nodes[world.mine]} == set(records)
    assert nodes[world.mine2] == [], "theirs2 has no consent for B"
    assert not _revealed(r.text, world.theirs2_ids), "another linked record's ids never leak"
    # the owner's chain records each sharing, naming its patient
    await seal(world.app, relay_database)
    events = [e for e in await chain(world.app, world.away) if "linked GraphQL patient" in str(e)]
    assert len(events) == 2, "one per answer that shared A's data (the ward's second patient shared nothing)"
    for e in events:
        assert e["patient"] == {"reference": f"Patient/{world.theirs}"}
        assert f"for facility {world.home} under consent" in str(e)
    assert all(world.theirs2 not in str(e) for e in await chain(world.app, world.away) if "linked" in str(e))


async def test_deny_provisions_and_security_labels(world: World) -> None:
    await world.consent(decision="permit", securityLabel=[RESTRICTED])  # permit, except R-labelled data for B
    records = _by_id(await world.linked())
    assert set(records) == world.shared_ids, "the R-labelled Observation stays home"
    r = await world.ask(LINKED, {"id": world.mine})
    assert world.restricted not in r.text
    await world.consent(decision="permit")  # permit, except B for treatment: the deny wins
    r = await world.ask(LINKED, {"id": world.mine})
    assert r.json()["data"]["patient"]["linkedRecords"] == []
    assert not _revealed(r.text, {*world.shared_ids, world.restricted}), r.text


async def test_withdrawn_consent_is_never_served_from_cache(world: World) -> None:
    cid = await world.consent()
    edge = next(r.endpoint.__self__ for r in world.app.routes if getattr(r, "path", None) == "/graphql")  # type: ignore[attr-defined]
    assert isinstance(edge, GraphQLEdge) and edge.gateway is not None
    cache = edge.gateway.cache
    assert isinstance(cache, GraphQLCache), "the edge's response cache is on"
    # the control: the same patient without linkedRecords is cached (a second ask is a hit)
    plain = "query($id: ID!) { patient(id: $id) { id name { family } } }"
    await world.ask(plain, {"id": world.mine})
    hits = cache.hits
    await world.ask(plain, {"id": world.mine})
    assert cache.hits == hits + 1, "the plain patient query is served from the cache"
    # linkedRecords: never stored, never served from it
    stores, hits = cache.stores, cache.hits
    first = await world.linked()
    assert {r["id"] for r in first} == {*world.shared_ids, world.restricted}
    assert await world.linked() == first
    assert (cache.stores, cache.hits) == (stores, hits), "neither stored nor served from the cache"
    # A withdraws the consent: nothing at B is invalidated (and the relay is off), yet it is gone
    async with _rest(world.app, world.away, world.owner) as away:
        current = (await away.get(f"/Consent/{cid}")).json()
        assert (await away.put(f"/Consent/{cid}", json={**current, "status": "inactive"})).status_code == 200
    assert await world.linked() == []


# ---------------------------------------------------------------------------------- break-the-glass
async def test_break_the_glass_opened_over_rest_shares_and_flags(world: World, relay_database: Database) -> None:
    await seal(world.app, relay_database)
    settings = world.app.state.backends.settings
    # GraphQL cannot break the glass: neither the header nor a BTG token opens a session
    assert await world.linked(headers={"X-Break-Glass-Reason": "unconscious in ED"}) == []
    btg_token = token_for(settings, [world.home], roles=["clinician"], purpose_of_use="BTG")
    assert await world.linked(token=btg_token) == []
    await seal(world.app, relay_database)
    assert not [e for e in await chain(world.app, world.home) if "110127" in str(e)], "no session was started"
    # started over REST, for this patient, by this clinician
    async with _rest(world.app, world.home, world.clinician) as b:
        r = await b.get(f"/Patient/{world.mine}/summary", headers={"X-Break-Glass-Reason": "unconscious in ED"})
        assert r.status_code == 200 and r.json()["meta"]["security"][0]["code"] == "BTG", r.text
    records = _by_id(await world.linked())
    assert set(records) == {*world.shared_ids, world.restricted}, "everything, the R-labelled record too"
    assert all(x["breakTheGlass"] is True and x["sourceFacility"] == world.away for x in records.values())
    # only for that patient and that clinician
    r = await world.ask(WARD, {"name": world.family})
    nodes = {n["id"]: n["linkedRecords"] for n in r.json()["data"]["patients"]["nodes"]}
    assert nodes[world.mine2] == [] and not _revealed(r.text, world.theirs2_ids)
    colleague = token_for(settings, [world.home], roles=["clinician"], subject="another-clinician")
    assert await world.linked(token=colleague) == []
    await seal(world.app, relay_database)
    assert len([e for e in await chain(world.app, world.home) if "110127" in str(e)]) == 1
    owner_events = [e for e in await chain(world.app, world.away) if "linked GraphQL patient" in str(e)]
    assert owner_events and all("under break-the-glass" in str(e) for e in owner_events)


# ---------------------------------------------------------------------------------- who gets nothing
async def test_patient_scoped_token_gets_nothing(world: World) -> None:
    await world.consent()
    settings = world.app.state.backends.settings
    launch = token_for(settings, [world.home], roles=["clinician"], patient=world.mine, scopes=["patient/Patient.rs"])
    body = (await world.ask(LINKED, {"id": world.mine}, token=launch)).json()
    assert "errors" not in body and body["data"]["patient"] == {"id": world.mine, "linkedRecords": []}
    assert len(await world.linked()) > 1, "the same consent shares with a user/-scoped clinician"


async def test_bad_encounters_argument_is_a_clear_error(world: World) -> None:
    for bad in (0, 51):
        q = "query($id: ID!, $n: Int!) { patient(id: $id) { id linkedRecords(encounters: $n) { id } } }"
        body = (await world.ask(q, {"id": world.mine, "n": bad})).json()
        assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"], body
        assert "encounters must be an integer from 1 to 50" in body["errors"][0]["message"]
