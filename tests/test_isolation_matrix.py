"""The cross-facility probe matrix: every access path, probed by facility B with facility A's ids,
identifiers and names, on every backend.

Oracle: each probe runs twice as B — once aimed at A's data (the *target*) and once aimed at a
*ghost* of the same shape that never existed anywhere. The two answers must be indistinguishable:
the same status (and GraphQL error codes), and each of A's values must occur in the answer exactly
as often as the ghost's corresponding value occurs in the ghost's answer (so echoing the request
is fine, revealing anything is not). A route, GraphQL root field, entity type or ``Patient`` field
reaching resources without a probe fails :func:`test_every_route_and_field_has_a_probe`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from graphql import GraphQLObjectType, get_named_type
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from gateway.app import create_app
from gateway.federation.composition import compose
from gateway.security.consent import FACILITY_SYSTEM
from gateway.security.tokens import mint
from subgraphs.graphql import SUBGRAPHS
from subgraphs.graphql.app import schema_for
from subgraphs.store.database import Database
from tests.conftest import token_for
from tests.graphql_support import subgraph_client
from tests.helpers import create, observation, patient
from tests.test_audit import seal

NID = "https://unihealth.dev/fhir/sid/national-id"
MRN = "urn:unihealth:test:mrn"
KEYS = ("Patient", "Observation", "Observation2", "Encounter", "Condition", "AllergyIntolerance")
KEYS += ("MedicationRequest", "Medication", "Consent", "Practitioner", "AuditEvent")
KEYS += ("mrn", "obs_identifier", "family", "pr_family")
ID_KEYS = ("Patient", "Observation", "Encounter", "Condition", "AllergyIntolerance", "MedicationRequest")
ID_KEYS += ("Medication", "Consent", "Practitioner", "AuditEvent")


def _letters() -> str:
    return "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:12])


def ghost_target() -> dict[str, str]:
    """Values of A's shape that exist nowhere."""
    t = {k: str(uuid.uuid4()) for k in KEYS}
    t.update(mrn=f"MRN-{uuid.uuid4().hex}", obs_identifier=f"OBS-{uuid.uuid4().hex}")
    t.update(family="Zq" + _letters(), pr_family="Zp" + _letters())
    return t


# ------------------------------------------------------------------------------------ probes
@dataclass
class Probe:
    """One request, parameterised by a target; ``routes``: the (path, method) it covers."""

    label: str
    routes: list[tuple[str, str]]
    send: Callable[[httpx.AsyncClient, dict[str, str]], Awaitable[httpx.Response]]
    writes: bool = False


@dataclass
class Answer:
    status: int
    text: str
    codes: list[str] = field(default_factory=list)


def _get(path: str, **params: str) -> Callable[[dict[str, str]], tuple[str, dict[str, str]]]:
    def build(t: dict[str, str]) -> tuple[str, dict[str, str]]:
        return path.format(**t), {k.replace("__", ":").replace("_dot_", "."): v.format(**t) for k, v in params.items()}

    return build


def get_probe(label: str, route: str, path: str, **params: str) -> Probe:
    build = _get(path, **params)

    async def send(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        p, q = build(t)
        return await c.get(p, params=q)

    return Probe(label, [(route, "GET")], send)


def rest_probes(a_cursor: dict[str, str]) -> list[Probe]:
    """Every REST access path. ``a_cursor``: paging tokens A got for the same queries."""
    out: list[Probe] = [get_probe("metadata", "/metadata", "/metadata")]
    for key in ID_KEYS:
        t = key
        out += [
            get_probe(f"read {t}", "/{type}/{id}", f"/{t}/{{{key}}}"),
            get_probe(f"vread {t}", "/{type}/{id}/_history/{vid}", f"/{t}/{{{key}}}/_history/1"),
            get_probe(f"instance history {t}", "/{type}/{id}/_history", f"/{t}/{{{key}}}/_history"),
            get_probe(f"_id {t}", "/{type}", f"/{t}", _id=f"{{{key}}}"),
            get_probe(f"_id total {t}", "/{type}", f"/{t}", _id=f"{{{key}}}", _total="accurate"),
            get_probe(f"_id count {t}", "/{type}", f"/{t}", _id=f"{{{key}}}", _summary="count"),
        ]
    out += [
        get_probe("type history", "/{type}/_history", "/Patient/_history"),
        get_probe("type history obs", "/{type}/_history", "/Observation/_history"),
        get_probe("system history", "/_history", "/_history"),
        get_probe("name", "/{type}", "/Patient", name="{family}"),
        get_probe("family sorted", "/{type}", "/Patient", family="{family}", _sort="-family", _total="accurate"),
        get_probe("identifier", "/{type}", "/Patient", identifier=f"{MRN}|{{mrn}}"),
        get_probe("obs identifier", "/{type}", "/Observation", identifier="{obs_identifier}"),
        get_probe("patient param", "/{type}", "/Observation", patient="Patient/{Patient}"),
        get_probe("subject param", "/{type}", "/Condition", subject="Patient/{Patient}"),
        get_probe("consent patient", "/{type}", "/Consent", patient="{Patient}"),
        get_probe("audit patient", "/{type}", "/AuditEvent", patient="{Patient}"),
        get_probe("audit entity", "/{type}", "/AuditEvent", entity="Patient/{Patient}", _total="accurate"),
        get_probe("medreq patient", "/{type}", "/MedicationRequest", patient="{Patient}"),
        get_probe("allergy patient", "/{type}", "/AllergyIntolerance", patient="{Patient}"),
        get_probe("encounter patient", "/{type}", "/Encounter", patient="{Patient}"),
        get_probe("chain family", "/{type}", "/Observation", **{"subject:Patient_dot_family": "{family}"}),
        get_probe("chain identifier", "/{type}", "/Observation", **{"patient_dot_identifier": "{mrn}"}),
        get_probe("chain performer", "/{type}", "/Observation", **{"performer:Practitioner_dot_name": "{pr_family}"}),
        get_probe("_has", "/{type}", "/Patient", **{"_has:Observation:patient:identifier": "{obs_identifier}"}),
        get_probe("_has _id", "/{type}", "/Patient", **{"_has:Observation:patient:_id": "{Observation}"}),
        get_probe("_include", "/{type}", "/Observation", _id="{Observation}", _include="Observation:patient"),
        get_probe("_revinclude", "/{type}", "/Patient", _id="{Patient}", _revinclude="Observation:patient"),
        get_probe(
            "_include medication from B's record",
            "/{type}",
            "/MedicationRequest",
            identifier="ref-{obs_identifier}",
            _include="MedicationRequest:medication",
        ),
        get_probe(
            "_revinclude from B's record",
            "/{type}",
            "/Medication",
            _id="{Medication}",
            _revinclude="MedicationRequest:medication",
        ),
        # B's own record that refers to the target's ids (made in setup): includes must stay in B
        get_probe(
            "_include from B's record",
            "/{type}",
            "/Observation",
            identifier="ref-{obs_identifier}",
            _include="Observation:subject",
            _include__iterate="Patient:general-practitioner",
        ),
        get_probe(
            "_include has-member/performer",
            "/{type}",
            "/Observation",
            identifier="ref-{obs_identifier}",
            _include="Observation:has-member",
        ),
        get_probe(
            "_revinclude:iterate",
            "/{type}",
            "/Patient",
            name="{family}",
            _revinclude="Observation:patient",
            _revinclude__iterate="Observation:has-member",
        ),
        get_probe("cursor replay", "/{type}", "/Observation", patient="Patient/{Patient}", _count="1", _page="{page}"),
        get_probe("history cursor replay", "/{type}/_history", "/Observation/_history", _count="1", _page="{hpage}"),
        get_probe("everything", "/Patient/{id}/$everything", "/Patient/{Patient}/$everything"),
        get_probe(
            "everything cursor replay",
            "/Patient/{id}/$everything",
            "/Patient/{Patient}/$everything",
            _count="1",
            _page="{epage}",
        ),
        get_probe("summary", "/Patient/{id}/summary", "/Patient/{Patient}/summary"),
        get_probe("observations", "/Patient/{id}/observations", "/Patient/{Patient}/observations"),
        get_probe("medication-requests", "/Patient/{id}/medication-requests", "/Patient/{Patient}/medication-requests"),
    ]

    async def conditional_read(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        r1 = await c.get(f"/Patient/{t['Patient']}", headers={"If-None-Match": 'W/"2"'})
        r2 = await c.get(f"/Patient/{t['Patient']}", headers={"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"})
        r3 = await c.head(f"/Observation/{t['Observation']}")
        return _join(r1, r2, r3)

    out += [
        Probe("conditional read", [("/{type}/{id}", "GET")], conditional_read),
        get_probe("link param", "/{type}", "/Patient", link="Patient/{Patient}"),
        get_probe("_summary=true", "/{type}", "/Observation", _id="{Observation}", _summary="true"),
        get_probe(
            "_sort _lastUpdated", "/{type}", "/Observation", _id="{Observation},{Observation2}", _sort="-_lastUpdated"
        ),
        get_probe("_id:not", "/{type}", "/Encounter", **{"_id:not": "{Encounter}", "subject": "Patient/{Patient}"}),
        get_probe(
            "everything _type", "/Patient/{id}/$everything", "/Patient/{Patient}/$everything", _type="Observation"
        ),
        get_probe(
            "history _since", "/{type}/{id}/_history", "/Patient/{Patient}/_history", _since="2000-01-01T00:00:00Z"
        ),
    ]

    async def post_search(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        body = f"_id={t['Patient']}&_revinclude=Observation:patient"
        return await c.post(
            "/Patient/_search", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )

    async def batch_reads(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        urls = [f"Patient/{t['Patient']}", f"Observation/{t['Observation']}/_history/1"]
        urls += [f"Observation?patient=Patient/{t['Patient']}", f"Patient?identifier={MRN}|{t['mrn']}"]
        entries = [{"request": {"method": "GET", "url": u}} for u in urls]
        return await c.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": entries})

    out += [
        Probe("POST _search", [("/{type}/_search", "POST")], post_search),
        Probe("batch reads", [("/", "POST")], batch_reads),
    ]
    return out


def write_probes() -> list[Probe]:
    """Writes aimed at A's ids and identifiers (run last: they create B's own resources)."""

    async def conditional_create(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        body = patient("Bown", identifier=[{"system": MRN, "value": t["mrn"]}])
        return await c.post("/Patient", json=body, headers={"If-None-Exist": f"identifier={MRN}|{t['mrn']}"})

    async def transaction(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        obs = observation(t["Patient"], identifier=[{"value": "tx-" + t["obs_identifier"]}])
        obs["hasMember"] = [{"reference": f"Observation/{t['Observation']}"}]
        cond_ref = observation("x", identifier=[{"value": "tx2-" + t["obs_identifier"]}])
        cond_ref["subject"] = {"reference": f"Patient?identifier={MRN}|{t['mrn']}"}
        entries = [
            {"request": {"method": "POST", "url": "Observation"}, "resource": obs},
            {"request": {"method": "GET", "url": f"Condition/{t['Condition']}"}},
        ]
        r1 = await c.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
        conditional = [
            {"request": {"method": "POST", "url": "Observation"}, "resource": cond_ref},
            {
                "request": {"method": "PUT", "url": f"Encounter?identifier={t['obs_identifier']}"},
                "resource": {"resourceType": "Encounter", "status": "planned"},
            },
            {
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN}|{t['mrn']}"},
                "resource": patient("Bown"),
            },
        ]
        r2 = await c.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": conditional})
        return _join(r1, r2)

    async def batch_writes(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        entries = [
            {"request": {"method": "DELETE", "url": f"AllergyIntolerance/{t['AllergyIntolerance']}"}},
            {
                "request": {"method": "PUT", "url": f"Condition/{t['Condition']}", "ifMatch": 'W/"1"'},
                "resource": {
                    "resourceType": "Condition",
                    "id": t["Condition"],
                    "subject": {"reference": f"Patient/{t['Patient']}"},
                },
            },
        ]
        return await c.post("/", json={"resourceType": "Bundle", "type": "batch", "entry": entries})

    async def update_if_match(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        body = {**patient("Bown"), "id": t["Patient"]}
        return await c.put(f"/Patient/{t['Patient']}", json=body, headers={"If-Match": 'W/"2"'})

    async def update(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        body = {**observation(t["Patient"]), "id": t["Observation"]}
        return await c.put(f"/Observation/{t['Observation']}", json=body)

    async def delete(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        return await c.delete(f"/MedicationRequest/{t['MedicationRequest']}")

    async def conditional_update_delete(c: httpx.AsyncClient, t: dict[str, str]) -> httpx.Response:
        r1 = await c.put(f"/Patient?identifier={MRN}|{t['mrn']}", json=patient("Bown"))
        r2 = await c.delete(f"/Patient?identifier={MRN}|{t['mrn']}")
        return _join(r1, r2)

    return [
        Probe("PUT with If-Match to A's id", [("/{type}/{id}", "PUT")], update_if_match, writes=True),
        Probe("DELETE A's id", [("/{type}/{id}", "DELETE")], delete, writes=True),
        Probe("batch writes at A's ids", [("/", "POST")], batch_writes, writes=True),
        Probe("conditional update/delete", [], conditional_update_delete, writes=True),
        Probe("conditional create on A's identifier", [("/{type}", "POST")], conditional_create, writes=True),
        Probe("transaction referring to A", [("/", "POST")], transaction, writes=True),
        Probe("PUT to A's id", [("/{type}/{id}", "PUT")], update, writes=True),
    ]


def _join(*responses: httpx.Response) -> httpx.Response:
    """Several answers as one (statuses joined with '/', bodies concatenated)."""
    status = int("".join(str(r.status_code) for r in responses))
    return httpx.Response(status, text="\n".join(r.text for r in responses))


# ------------------------------------------------------------------------------------ GraphQL
PATIENT_FIELDS = """id resource versionId name { family } identifiers { value } encounters { id resource }
  allergies(activeOnly: false) { id resource } conditions(activeOnly: false) { id resource }
  observations { id resource } latestVitals { id resource }
  medicationRequests { id resource medicationReference { id } }
  linkedRecords { sourceFacility resourceType id resource breakTheGlass }"""
GRAPHQL_ROOT = {
    "patient": ("query($id: ID!) { patient(id: $id) { " + PATIENT_FIELDS + " } }", {"id": "{Patient}"}),
    "observation": ("query($id: ID!) { observation(id: $id) { id resource subject } }", {"id": "{Observation}"}),
    "medicationRequest": (
        "query($id: ID!) { medicationRequest(id: $id) { id resource subject medicationReference { id resource } } }",
        {"id": "{MedicationRequest}"},
    ),
    "medication": ("query($id: ID!) { medication(id: $id) { id resource } }", {"id": "{Medication}"}),
    "patients": (
        "query($name: String, $identifier: String) { a: patients(name: $name) { nodes { "
        + PATIENT_FIELDS
        + " } pageInfo { endCursor } } b: patients(identifier: $identifier) { edges { cursor node { id } } } }",
        {"name": "{family}", "identifier": f"{MRN}|{{mrn}}"},
    ),
}
GRAPHQL_EXTRA = {  # B's own records: a MedicationRequest referring to the target's Medication and Patient,
    "B's medicationRequest → medicationReference": (
        "query($id: ID!) { medicationRequest(id: $id) { id subject medicationReference { id resource } } }",
        {"id": "{BMedicationRequest}"},
    ),
    # and B's patient linked to the target by national id (the ghost's: to no one); A's Consent never names B
    "B's linked patient → linkedRecords": (
        "query($id: ID!) { patient(id: $id) { id linkedRecords { sourceFacility resourceType id resource } } }",
        {"id": "{BPatient}"},
    ),
}
GRAPHQL_CURSOR = ("query($after: String) { patients(first: 1, after: $after) { nodes { id resource } } }", "{gpage}")
ENTITY_SELECTION = {
    "Patient": "id resource",
    "Observation": "id resource",
    "MedicationRequest": "id resource",
    "Medication": "id resource",
    "Encounter": "id resource",
    "Condition": "id resource",
    "AllergyIntolerance": "id resource",
}


def _fill(value: Any, t: dict[str, str]) -> Any:
    return value.format(**t) if isinstance(value, str) else value


def subgraph_entities() -> dict[str, list[str]]:
    """Entity types of each subgraph's ``_Entity`` union."""
    out = {}
    for name in SUBGRAPHS:
        union = schema_for(name)._schema.type_map["_Entity"]
        out[name] = sorted(t.name for t in union.types)  # type: ignore[attr-defined]
    return out


def api_root_fields() -> set[str]:
    sg = compose({n: schema_for(n).as_str() for n in SUBGRAPHS})
    return set(sg.api_schema.query_type.fields)  # type: ignore[union-attr]


def patient_fields_reaching_resources() -> set[str]:
    """Fields of the composed ``Patient`` whose type carries a stored resource (``resource``)."""
    patient_type = compose({n: schema_for(n).as_str() for n in SUBGRAPHS}).api_schema.type_map["Patient"]
    assert isinstance(patient_type, GraphQLObjectType)
    out = set()
    for name, definition in patient_type.fields.items():
        named = get_named_type(definition.type)
        if isinstance(named, GraphQLObjectType) and "resource" in named.fields:
            out.add(name)
    return out


# ------------------------------------------------------------------------------------ fixtures
def _client(app: Starlette, facility: str, token: str, base: str = "http://t/fhir/r5") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url=base,
        headers={
            "X-Facility-Id": facility,
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json" if base == "http://t" else "application/fhir+json",
        },
        timeout=60,
    )


@dataclass
class World:
    app: Starlette
    a: str
    b: str
    target: dict[str, str]
    ghost: dict[str, str]
    b_patient: str
    token_b: str
    token_a: str
    versions: dict[str, str]


async def _seed_a(c: httpx.AsyncClient, a: str) -> dict[str, str]:
    t = ghost_target()  # fresh unique names and identifiers; ids are assigned below
    pr = await create(c, {"resourceType": "Practitioner", "name": [{"family": t["pr_family"]}]})
    pat = patient(
        t["family"],
        identifier=[{"system": MRN, "value": t["mrn"]}, {"system": NID, "value": f"NID-{a}"}],
        generalPractitioner=[{"reference": f"Practitioner/{pr['id']}"}],
    )
    p = await create(c, pat)
    await create(c, patient("Another"))  # so that A's patient list has a second page
    r = await c.put(f"/Patient/{p['id']}", json={**pat, "id": p["id"], "gender": "other"})  # a second version
    assert r.status_code == 200, r.text
    obs = observation(p["id"], identifier=[{"value": t["obs_identifier"]}])
    obs["performer"] = [{"reference": f"Practitioner/{pr['id']}"}]
    o = await create(c, obs)
    o2 = await create(c, observation(p["id"], code="4548-4", category="laboratory"))
    enc = await create(
        c, {"resourceType": "Encounter", "status": "completed", "subject": {"reference": f"Patient/{p['id']}"}}
    )
    cond = await create(
        c,
        {
            "resourceType": "Condition",
            "clinicalStatus": {
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
            },
            "subject": {"reference": f"Patient/{p['id']}"},
            "encounter": {"reference": f"Encounter/{enc['id']}"},
        },
    )
    allergy = await create(c, {"resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{p['id']}"}})
    med = await create(c, {"resourceType": "Medication", "status": "active"})
    medreq = await create(
        c,
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{p['id']}"},
            "medication": {"reference": {"reference": f"Medication/{med['id']}"}},
        },
    )
    consent = await create(
        c,
        {  # permits someone else, never B
            "resourceType": "Consent",
            "status": "active",
            "decision": "permit",
            "subject": {"reference": f"Patient/{p['id']}"},
            "grantee": [{"identifier": {"system": FACILITY_SYSTEM, "value": f"{a}-somebody-else"}}],
        },
    )
    t.update(Patient=p["id"], Observation=o["id"], Observation2=o2["id"], Encounter=enc["id"], Condition=cond["id"])
    t.update(AllergyIntolerance=allergy["id"], Medication=med["id"], MedicationRequest=medreq["id"])
    t.update(Consent=consent["id"], Practitioner=pr["id"])
    return t


def _page_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    nxt = next(link["url"] for link in r.json()["link"] if link["relation"] == "next")
    return parse_qs(urlparse(nxt).query)["_page"][0]


@pytest.fixture
async def world(app: Starlette, relay_database: Database, facility: str, other_facility: str) -> AsyncIterator[World]:
    settings = app.state.backends.settings
    a, b = other_facility, facility
    token_a, token_b = token_for(settings, [a]), token_for(settings, [b])
    async with _client(app, a, token_a) as ca:
        target = await _seed_a(ca, a)
        # A's paging cursors for the very queries B replays
        target["page"] = _page_of(
            await ca.get("/Observation", params={"patient": f"Patient/{target['Patient']}", "_count": "1"})
        )
        target["hpage"] = _page_of(await ca.get("/Observation/_history", params={"_count": "1"}))
        target["epage"] = _page_of(await ca.get(f"/Patient/{target['Patient']}/$everything", params={"_count": "1"}))
        for warm in ("summary", "$everything", "observations"):  # A's caches are warm when B asks
            assert (await ca.get(f"/Patient/{target['Patient']}/{warm}")).status_code == 200
        await seal(app, relay_database)  # A's access records become AuditEvents in A
        audits = (await ca.get("/AuditEvent", params={"patient": target["Patient"]})).json()
        target["AuditEvent"] = audits["entry"][0]["resource"]["id"]
        versions = {k: (await ca.get(f"/{k}/{target[k]}")).json()["meta"]["versionId"] for k in ID_KEYS}
    async with _client(app, a, token_a, base="http://t") as ga:
        q = "query { patients(first: 1) { pageInfo { endCursor hasNextPage } } }"
        info = (await ga.post("/graphql", json={"query": q})).json()["data"]["patients"]["pageInfo"]
        assert info["hasNextPage"], info
        target["gpage"] = info["endCursor"]
    ghost = ghost_target()
    ghost.update(page="not-a-cursor", hpage="not-a-cursor", epage="not-a-cursor", gpage="bm90LWEtY3Vyc29y")
    async with _client(app, b, token_b) as cb:
        mine = await create(cb, patient("Bown", identifier=[{"system": NID, "value": f"NID-{a}"}]))  # same person
        await create(cb, observation(mine["id"]))
        nobody = await create(cb, patient("Bown", identifier=[{"system": NID, "value": f"NID-{uuid.uuid4()}"}]))
        target["BPatient"], ghost["BPatient"] = mine["id"], nobody["id"]
        for t in (target, ghost):  # B's own records that point at the target's ids
            ref = observation(t["Patient"], identifier=[{"value": "ref-" + t["obs_identifier"]}])
            ref["hasMember"] = [{"reference": f"Observation/{t['Observation']}"}]
            ref["performer"] = [{"reference": f"Practitioner/{t['Practitioner']}"}]
            await create(cb, ref)
            mr = {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "identifier": [{"value": "ref-" + t["obs_identifier"]}],
                "subject": {"reference": f"Patient/{t['Patient']}"},
                "medication": {"reference": {"reference": f"Medication/{t['Medication']}"}},
            }
            t["BMedicationRequest"] = (await create(cb, mr))["id"]
    yield World(app, a, b, target, ghost, mine["id"], token_b, token_a, versions)


# ------------------------------------------------------------------------------------ the oracle
EXPECTED = {  # what B must get (so a probe that fails for another reason, e.g. 401, cannot pass)
    "read ": 404,
    "vread ": 404,
    "instance history ": 404,
    "_id ": 200,
    "everything": 404,
    "summary": 404,
    "observations": 404,
    "medication-requests": 404,
    "cursor replay": 400,
    "history cursor replay": 400,
    "chain ": 200,
    "_has": 200,
    "_include": 200,
    "_revinclude": 200,
    "POST _search": 200,
    "PUT to A's id": 201,
    "conditional create": 201,
    "graphql patient": 200,
    "graphql B's linked patient": 200,
}


def _leaks(target: dict[str, str], ghost: dict[str, str], got: Answer, expected: Answer) -> list[str]:
    out = []
    for key, value in target.items():
        if key in ("page", "hpage", "epage", "gpage", "BPatient"):  # cursors; B's own patient
            continue
        if got.text.count(value) != expected.text.count(ghost[key]):
            out.append(f"{key} ({got.text.count(value)} vs {expected.text.count(ghost[key])})")
    return out


def _answer(r: httpx.Response) -> Answer:
    text = r.text + " " + r.headers.get("location", "") + " " + r.headers.get("content-location", "")
    codes: list[str] = []
    if r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        codes = sorted(str(e.get("extensions", {}).get("code")) for e in body.get("errors") or [])
    assert "Traceback" not in r.text and r.status_code != 500, r.text
    return Answer(r.status_code, text, codes)


async def _compare(
    label: str, w: World, send: Callable[[dict[str, str]], Awaitable[httpx.Response]], failures: list[str]
) -> None:
    got = _answer(await send(w.target))
    expected = _answer(await send(w.ghost))
    want = next((status for prefix, status in EXPECTED.items() if label.startswith(prefix)), None)
    if want is not None and got.status != want:
        failures.append(f"{label}: expected {want}, got {got.status}: {got.text[:200]}")
    if (got.status, got.codes) != (expected.status, expected.codes):
        failures.append(f"{label}: A's data → {got.status} {got.codes}, absent → {expected.status} {expected.codes}")
    leaks = _leaks(w.target, w.ghost, got, expected)
    if leaks:
        failures.append(f"{label}: A's values revealed: {', '.join(leaks)}: {got.text[:300]}")


# ------------------------------------------------------------------------------------ tests
async def test_rest_probes_reveal_nothing(world: World) -> None:
    failures: list[str] = []
    async with _client(world.app, world.b, world.token_b) as cb:
        for probe in [*rest_probes({}), *write_probes()]:

            async def send(t: dict[str, str], probe: Probe = probe) -> httpx.Response:
                return await probe.send(cb, t)

            await _compare(probe.label, world, send, failures)
        # B's own linked patient: A's data has no consent for B, so nothing of it shows
        for path in (f"/Patient/{world.b_patient}/summary", f"/Patient/{world.b_patient}/$everything"):
            r = await cb.get(path)
            assert r.status_code == 200, r.text
            revealed = [k for k in (*ID_KEYS, "mrn", "family") if world.target[k] in r.text]
            if revealed:
                failures.append(f"{path} of B's linked patient reveals {revealed}")
    assert not failures, "\n".join(failures)
    async with _client(world.app, world.a, world.token_a) as ca:  # A's data is untouched
        for k in ID_KEYS:
            r = await ca.get(f"/{k}/{world.target[k]}")
            assert r.status_code == 200 and r.json()["meta"]["versionId"] == world.versions[k], (k, r.text)


async def test_graphql_probes_reveal_nothing(world: World) -> None:
    failures: list[str] = []
    async with _client(world.app, world.b, world.token_b, base="http://t") as gb:
        for name, (query, variables) in [*GRAPHQL_ROOT.items(), *GRAPHQL_EXTRA.items()]:

            async def send(t: dict[str, str], q: str = query, v: dict[str, Any] = variables) -> httpx.Response:
                return await gb.post("/graphql", json={"query": q, "variables": {k: _fill(x, t) for k, x in v.items()}})

            await _compare(f"graphql {name}", world, send, failures)

        async def replay(t: dict[str, str]) -> httpx.Response:
            q, after = GRAPHQL_CURSOR
            return await gb.post("/graphql", json={"query": q, "variables": {"after": _fill(after, t)}})

        await _compare("graphql patients cursor replay", world, replay, failures)
        replayed = (await replay(world.target)).json()
        assert replayed.get("data") is None or not replayed["data"].get("patients"), replayed
    backends = world.app.state.backends
    for sub, types in subgraph_entities().items():
        async with subgraph_client(schema_for(sub), backends, world.b, world.token_b) as c:
            for typename in types:
                selection = ENTITY_SELECTION[typename]
                if typename == "Patient" and sub != "patient":
                    selection = "id " + (
                        "observations { id resource } latestVitals { id }"
                        if sub == "observation"
                        else "medicationRequests { id resource }"
                    )
                query = (
                    "query($reps: [_Any!]!) { _entities(representations: $reps) { ... on "
                    + typename
                    + " { "
                    + selection
                    + " } } }"
                )

                async def ent(
                    t: dict[str, str], q: str = query, tn: str = typename, cl: httpx.AsyncClient = c
                ) -> httpx.Response:
                    key = "Patient" if tn == "Patient" else tn
                    return await cl.post(
                        "/graphql", json={"query": q, "variables": {"reps": [{"__typename": tn, "id": t[key]}]}}
                    )

                await _compare(f"_entities {sub}.{typename}", world, ent, failures)
    assert not failures, "\n".join(failures)


async def test_wrong_facility_header_and_no_facility_token(world: World) -> None:
    settings = world.app.state.backends.settings
    async with _client(world.app, world.a, world.token_b) as c:  # B's token, A's header
        for path in (
            f"/Patient/{world.target['Patient']}",
            "/Patient",
            "/_history",
            f"/Patient/{world.target['Patient']}/summary",
        ):
            r = await c.get(path)
            assert r.status_code == 403, (path, r.text)
            assert world.target["Patient"] not in r.text.replace(path, "") and world.target["family"] not in r.text
    async with _client(world.app, world.a, world.token_b, base="http://t") as g:
        query = '{ patient(id: "' + world.target["Patient"] + '") { id resource } }'
        body = (await g.post("/graphql", json={"query": query})).json()
        assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"], body
        assert not (body.get("data") or {}).get("patient") and world.target["family"] not in str(body), body
    no_facility = mint(settings, facilities=[], roles=["admin"], subject="nobody")
    async with _client(world.app, world.a, no_facility) as c:
        r = await c.get(f"/Patient/{world.target['Patient']}")
        assert r.status_code == 401 and world.target["family"] not in r.text, r.text
    async with _client(world.app, world.a, no_facility, base="http://t") as g:
        body = (await g.post("/graphql", json={"query": "{ patients { nodes { id } } }"})).json()
        assert [e["extensions"]["code"] for e in body["errors"]] == ["UNAUTHENTICATED"], body
        assert body["data"] is None and world.target["Patient"] not in str(body), body


async def test_the_oracle_sees_a_leak(world: World) -> None:
    """The matrix can fail: A's owner answering the same probes is flagged on each of them."""
    probes = {p.label: p for p in rest_probes({})}
    async with _client(world.app, world.a, world.token_a) as ca:
        for label in ("read Patient", "_id Observation", "_include", "chain family", "_has", "everything"):
            failures: list[str] = []

            async def send(t: dict[str, str], probe: Probe = probes[label]) -> httpx.Response:
                return await probe.send(ca, t)

            await _compare(label, world, send, failures)
            assert failures, f"{label}: the owner's answer was not told apart from an absent one"


async def test_the_oracle_sees_linked_records_shared_by_consent(world: World) -> None:
    """The linkedRecords probe can fail: once A's Consent permits B, B's linked patient shows A's data."""
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "decision": "permit",
        "subject": {"reference": f"Patient/{world.target['Patient']}"},
        "grantee": [{"identifier": {"system": FACILITY_SYSTEM, "value": world.b}}],
    }
    async with _client(world.app, world.a, world.token_a) as ca:
        await create(ca, consent)
    query, variables = GRAPHQL_EXTRA["B's linked patient → linkedRecords"]
    failures: list[str] = []
    async with _client(world.app, world.b, world.token_b, base="http://t") as gb:

        async def send(t: dict[str, str]) -> httpx.Response:
            return await gb.post(
                "/graphql", json={"query": query, "variables": {k: _fill(x, t) for k, x in variables.items()}}
            )

        await _compare("graphql B's linked patient", world, send, failures)
    assert failures and "Patient" in failures[0], "shared by consent, A's patient is told apart from a ghost"


# Routes outside /fhir/r5: public and data-free, or probed by the GraphQL tests above.
OTHER_ROUTES = {
    ("/healthz", "GET"): "public, no data",
    ("/readyz", "GET"): "public, no data: which backends answer",
    ("/metrics", "GET"): "aggregates by route template and subgraph, no ids or facilities (docs/operations.md)",
    ("/.well-known/smart-configuration", "GET"): "public, no data",
    ("/fhir/r5/.well-known/smart-configuration", "GET"): "public, no data",
    ("/graphql", "GET"): "the GraphQL probes (root fields)",
    ("/graphql", "POST"): "the GraphQL probes (root fields)",
}


def test_every_route_and_field_has_a_probe(settings_for: Any) -> None:
    """A new route of the app or a GraphQL root/entity field without a probe fails here."""
    covered = {rm for p in [*rest_probes({}), *write_probes()] for rm in p.routes}
    missing = []
    for top in create_app(settings_for("sqlite")).routes:
        if isinstance(top, Mount) and top.path == "/fhir/r5":
            for route in top.routes:
                assert isinstance(route, Route), route
                for method in sorted((route.methods or set()) - {"HEAD"}):
                    if (route.path, method) not in covered:
                        missing.append(f"{method} /fhir/r5{route.path}")
            continue
        assert isinstance(top, Route), f"an unexpected mount: {top}"
        for method in sorted((top.methods or set()) - {"HEAD"}):
            if (top.path, method) not in OTHER_ROUTES:
                missing.append(f"{method} {top.path}")
    assert not missing, f"routes without an isolation probe: {missing}"
    fields = api_root_fields() - set(GRAPHQL_ROOT)
    assert not fields, f"GraphQL root fields without an isolation probe: {fields}"
    entities = {t for types in subgraph_entities().values() for t in types} - set(ENTITY_SELECTION)
    assert not entities, f"GraphQL entity types without an isolation probe: {entities}"
    probed = set(re.findall(r"[A-Za-z_]+", PATIENT_FIELDS))
    unprobed = patient_fields_reaching_resources() - probed
    assert not unprobed, f"Patient fields reaching resources without an isolation probe (PATIENT_FIELDS): {unprobed}"
