"""The patient, observation and medication GraphQL subgraphs, in-process, on every backend.

Data is created through FHIR REST (the ``client`` fixture); the subgraphs are queried over HTTP
through their own ASGI apps (httpx ``ASGITransport``) on the same backends as REST.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.backends import Backends
from subgraphs.cli import add_subgraph_parser
from subgraphs.graphql import SUBGRAPHS
from subgraphs.graphql.app import create_standalone_app, schema_for
from subgraphs.graphql.schema import SubgraphSchema
from tests.conftest import token_for
from tests.graphql_support import (
    checked_out,
    codes,
    count_statements,
    entities_query,
    gql,
    reps,
    subgraph_client,
)
from tests.helpers import LOINC, OBS_CAT, create, observation, patient

ALLERGY_STATUS = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
CONDITION_STATUS = "http://terminology.hl7.org/CodeSystem/condition-clinical"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


@pytest.fixture(scope="session")
def schemas() -> dict[str, SubgraphSchema]:
    return {name: schema_for(name) for name in SUBGRAPHS}


@pytest.fixture
def store(app: Starlette) -> Backends:
    backends: Backends = app.state.backends
    return backends


@pytest.fixture
def token(store: Backends, facility: str, other_facility: str) -> str:
    return token_for(store.settings, [facility, other_facility])


class Graph:
    """Ask one subgraph as one caller."""

    def __init__(self, schemas: dict[str, SubgraphSchema], store: Backends, facility: str | None, token: str | None):
        self.schemas, self.store, self.facility, self.token = schemas, store, facility, token

    async def __call__(self, name: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        async with subgraph_client(self.schemas[name], self.store, self.facility, self.token) as c:
            return await gql(c, query, variables)

    def as_(self, token: str | None, facility: str | None = None) -> Graph:
        return Graph(self.schemas, self.store, facility or self.facility, token)


@pytest.fixture
def graph(schemas: dict[str, SubgraphSchema], store: Backends, facility: str, token: str) -> Graph:
    return Graph(schemas, store, facility, token)


# ---------------------------------------------------------------------------------- data
def _status(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _post(resource: dict[str, Any], full_url: str | None = None) -> dict[str, Any]:
    entry = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


async def _transaction(client: httpx.AsyncClient, entries: list[dict[str, Any]]) -> list[str]:
    """Create ``entries`` atomically; their ids in order."""
    r = await client.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert r.status_code == 200, r.text
    return [e["response"]["location"].split("/")[1] for e in r.json()["entry"]]


def _chart(pref: str, n: int) -> list[dict[str, Any]]:
    """A small chart for patient ``pref`` (a urn:uuid or Patient/id), tagged ``n`` for dates."""
    ref = {"reference": pref}
    pid = pref.rsplit("/", 1)[-1] if pref.startswith("Patient/") else pref
    return [
        *(
            {
                "resourceType": "Encounter",
                "status": "completed",
                "class": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}]}],
                "subject": ref,
                "actualPeriod": {"start": f"2024-01-0{day}T09:00:00Z", "end": f"2024-01-0{day}T10:00:00Z"},
            }
            for day in (1, 2, 3)
        ),
        {
            "resourceType": "AllergyIntolerance",
            "patient": ref,
            "clinicalStatus": _status(ALLERGY_STATUS, "active"),
            "criticality": "high",
            "code": {"coding": [{"system": RXNORM, "code": "7980", "display": "Penicillin G"}], "text": "penicillin"},
            "recordedDate": "2023-05-01",
        },
        {
            "resourceType": "AllergyIntolerance",
            "patient": ref,
            "clinicalStatus": _status(ALLERGY_STATUS, "resolved"),
            "code": {"text": "peanuts"},
            "recordedDate": "2020-05-01",
        },
        {
            "resourceType": "Condition",
            "subject": ref,
            "clinicalStatus": _status(CONDITION_STATUS, "active"),
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006", "display": "Diabetes"}]},
            "onsetDateTime": "2019-03-04",
            "recordedDate": "2019-03-05",
        },
        {
            "resourceType": "Condition",
            "subject": ref,
            "clinicalStatus": _status(CONDITION_STATUS, "resolved"),
            "code": {"text": "sinusitis"},
            "recordedDate": "2021-01-01",
        },
        observation(pid, when="2024-01-01T00:00:00Z", value=70) | {"subject": ref},
        observation(pid, when=f"2024-02-0{n % 9 + 1}T00:00:00Z", value=72) | {"subject": ref},
        observation(pid, when="2024-03-01T00:00:00Z", status="entered-in-error") | {"subject": ref},
        observation(pid, code="4548-4", category="laboratory", when="2024-01-15T00:00:00Z", value=6) | {"subject": ref},
        observation(pid, code="1111-1", category="survey", when="2024-04-01T00:00:00Z") | {"subject": ref},
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": ref,
            "medication": {"concept": {"coding": [{"system": RXNORM, "code": "860975", "display": "Metformin"}]}},
            "authoredOn": "2024-01-01",
            "dosageInstruction": [{"text": "500 mg twice daily"}],
        },
        {
            "resourceType": "MedicationRequest",
            "status": "completed",
            "intent": "order",
            "subject": ref,
            "medication": {"concept": {"text": "amoxicillin"}},
            "authoredOn": "2024-02-01",
        },
    ]


CHART_TYPES = [r["resourceType"] for r in _chart("Patient/x", 0)]


async def _patients_with_charts(client: httpx.AsyncClient, count: int, family: str = "Ward") -> list[dict[str, Any]]:
    """``count`` patients with charts, in one transaction: [{"id", type: [ids in chart order]}]."""
    entries, urns = [], []
    for n in range(count):
        urn = f"urn:uuid:{uuid.uuid4()}"
        urns.append(urn)
        entries.append(_post(patient(family, identifier=[{"system": "urn:test:mrn", "value": f"MRN-{n}"}]), urn))
        entries += [_post(r) for r in _chart(urn, n)]
    ids = await _transaction(client, entries)
    per = 1 + len(CHART_TYPES)
    out = []
    for n in range(count):
        chunk = ids[n * per : (n + 1) * per]
        chart: dict[str, Any] = {"id": chunk[0]}
        for t, rid in zip(CHART_TYPES, chunk[1:], strict=True):
            chart.setdefault(t, []).append(rid)
        out.append(chart)
    return out


# ---------------------------------------------------------------------------------- SDL
@pytest.mark.parametrize("name", SUBGRAPHS)
async def test_service_sdl_is_federation_v2_without_a_token(graph: Graph, schemas: dict[str, Any], name: str) -> None:
    body = await graph.as_(None)(name, "{ _service { sdl } }")
    assert "errors" not in body, body
    sdl = body["data"]["_service"]["sdl"]
    assert '@link(url: "https://specs.apollo.dev/federation/v2.' in sdl
    assert 'type Patient @key(fields: "id")' in sdl
    assert sdl == schemas[name].as_str()


async def test_get_queries_work(graph: Graph, store: Backends, schemas: dict[str, Any]) -> None:
    async with subgraph_client(schemas["patient"], store, None, None) as c:
        r = await c.get("/graphql", params={"query": "{ __typename }"})
        assert r.status_code == 200 and r.json() == {"data": {"__typename": "Query"}}
        assert (await c.get("/healthz")).json() == {"status": "ok"}


# ---------------------------------------------------------------------------------- patient subgraph
PATIENT_FIELDS = """
  id versionId lastUpdated resource birthDate gender active
  name { family given text } identifiers { system value }
  encounters(first: 2) { id status classCode period { start end } }
  allergies { id clinicalStatus criticality code { system code display text } }
  allAllergies: allergies(activeOnly: false) { id }
  conditions { id clinicalStatus onset code { code display } }
  allConditions: conditions(activeOnly: false) { id }
"""


async def test_patient_with_encounters_allergies_conditions(client: httpx.AsyncClient, graph: Graph) -> None:
    (chart,) = await _patients_with_charts(client, 1, "Typed")
    pid = chart["id"]
    body = await graph("patient", f"query($id: ID!) {{ patient(id: $id) {{ {PATIENT_FIELDS} }} }}", {"id": pid})
    assert "errors" not in body, body
    p = body["data"]["patient"]
    rest = (await client.get(f"/Patient/{pid}")).json()
    assert p["resource"] == rest
    assert p["versionId"] == rest["meta"]["versionId"] and p["lastUpdated"] == rest["meta"]["lastUpdated"]
    assert p["name"] == {"family": "Typed", "given": ["Ann"], "text": "Ann Typed"}
    assert (p["birthDate"], p["gender"], p["active"]) == ("1970-01-01", "female", None)
    assert p["identifiers"] == [{"system": "urn:test:mrn", "value": "MRN-0"}]
    enc = chart["Encounter"]
    assert [e["id"] for e in p["encounters"]] == [enc[2], enc[1]]  # newest first, first: 2
    assert p["encounters"][0] == {
        "id": enc[2],
        "status": "completed",
        "classCode": "AMB",
        "period": {"start": "2024-01-03T09:00:00Z", "end": "2024-01-03T10:00:00Z"},
    }
    active_allergy, resolved_allergy = chart["AllergyIntolerance"]
    assert p["allergies"] == [
        {
            "id": active_allergy,
            "clinicalStatus": "active",
            "criticality": "high",
            "code": {"system": RXNORM, "code": "7980", "display": "Penicillin G", "text": "penicillin"},
        }
    ]
    assert [a["id"] for a in p["allAllergies"]] == [active_allergy, resolved_allergy]
    active_cond, resolved_cond = chart["Condition"]
    assert p["conditions"] == [
        {
            "id": active_cond,
            "clinicalStatus": "active",
            "onset": "2019-03-04",
            "code": {"code": "44054006", "display": "Diabetes"},
        }
    ]
    assert [c["id"] for c in p["allConditions"]] == [resolved_cond, active_cond]  # newest recorded first


async def test_patients_connection_pages_with_opaque_facility_bound_cursors(
    client: httpx.AsyncClient, graph: Graph, facility: str, other_facility: str
) -> None:
    family = f"Pager{uuid.uuid4().hex[:8]}"
    ids = sorted([(await create(client, patient(family)))["id"] for _ in range(5)])
    await create(client, patient("Someone"))
    query = """query($after: String, $name: String) {
      patients(first: 2, after: $after, name: $name) { edges { cursor node { id name { family } } }
                                                       nodes { id } pageInfo { hasNextPage endCursor } } }"""
    seen, after, pages = [], None, 0
    while True:
        body = await graph("patient", query, {"after": after, "name": family})
        assert "errors" not in body, body
        conn = body["data"]["patients"]
        seen += [e["node"]["id"] for e in conn["edges"]]
        assert [n["id"] for n in conn["nodes"]] == [e["node"]["id"] for e in conn["edges"]]
        pages += 1
        if not conn["pageInfo"]["hasNextPage"]:
            break
        after = conn["pageInfo"]["endCursor"]
        assert after == conn["edges"][-1]["cursor"]
    assert seen == ids and pages == 3
    by_identifier = await graph("patient", '{ patients(identifier: "urn:none|x") { nodes { id } } }')
    assert by_identifier["data"]["patients"]["nodes"] == []
    # a cursor is bound to the facility and the query: elsewhere or altered it is bad input, never data
    first = (await graph("patient", query, {"name": family}))["data"]["patients"]["pageInfo"]["endCursor"]
    elsewhere = await graph.as_(graph.token, other_facility)("patient", query, {"after": first, "name": family})
    assert codes(elsewhere) == ["BAD_USER_INPUT"] and elsewhere["data"] is None
    other_query = await graph("patient", query, {"after": first, "name": "Someone"})
    assert codes(other_query) == ["BAD_USER_INPUT"]
    tampered = await graph("patient", query, {"after": first[:-2] + ("A" if first[-2] != "A" else "B") + first[-1]})
    assert codes(tampered) == ["BAD_USER_INPUT"]


async def test_other_entities_resolve_by_id(client: httpx.AsyncClient, graph: Graph) -> None:
    (chart,) = await _patients_with_charts(client, 1)
    enc, cond = chart["Encounter"][0], chart["Condition"][0]
    body = await graph(
        "patient",
        """query($reps: [_Any!]!) { _entities(representations: $reps) {
             ... on Encounter { id status } ... on Condition { id clinicalStatus } } }""",
        {"reps": [{"__typename": "Encounter", "id": enc}, {"__typename": "Condition", "id": cond}]},
    )
    assert body["data"]["_entities"] == [{"id": enc, "status": "completed"}, {"id": cond, "clinicalStatus": "active"}]


# ---------------------------------------------------------------------------------- observation subgraph
OBS_FIELDS = "id status categories code { system code } effective valueQuantity { value valueFloat unit }"


async def test_observations_filters_and_latest_vitals(client: httpx.AsyncClient, graph: Graph) -> None:
    (chart,) = await _patients_with_charts(client, 1)
    pid = chart["id"]
    hr_old, hr_new, hr_bad, lab, survey = chart["Observation"]
    query = (
        "query($reps: [_Any!]!, $code: String, $category: String, $since: String, $first: Int!) {"
        " _entities(representations: $reps) { ... on Patient { id"
        " observations(code: $code, category: $category, since: $since, first: $first) { " + OBS_FIELDS + " }"
        " latestVitals { id } } } }"
    )

    async def obs(**kw: Any) -> list[str]:
        body = await graph("observation", query, {**reps([pid]), "first": 20, **kw})
        assert "errors" not in body, body
        return [o["id"] for o in body["data"]["_entities"][0]["observations"]]

    assert await obs() == [survey, hr_bad, hr_new, lab, hr_old]  # newest effective first
    assert await obs(first=2) == [survey, hr_bad]
    assert await obs(code="8867-4") == [hr_bad, hr_new, hr_old]
    assert await obs(code=f"{LOINC}|4548-4") == [lab]
    assert await obs(code="4548-4,1111-1") == [survey, lab]
    assert await obs(category="laboratory") == [lab]
    assert await obs(category=f"{OBS_CAT}|vital-signs", since="2024-01-02") == [hr_bad, hr_new]
    assert await obs(since="2024-03-01T00:00:00Z") == [survey, hr_bad]
    body = await graph("observation", query, {**reps([pid]), "first": 1, "code": "4548-4"})
    (got,) = body["data"]["_entities"][0]["observations"]
    assert got == {
        "id": lab,
        "status": "final",
        "categories": ["laboratory"],
        "code": {"system": LOINC, "code": "4548-4"},
        "effective": "2024-01-15T00:00:00Z",
        "valueQuantity": {"value": "6", "valueFloat": 6.0, "unit": "/min"},
    }
    # latestVitals is what the REST summary shows: newest per code, vital signs + lab, no entered-in-error
    latest = sorted(o["id"] for o in body["data"]["_entities"][0]["latestVitals"])
    summary = (await client.get(f"/Patient/{pid}/summary")).json()
    in_summary = sorted(e["resource"]["id"] for e in summary["entry"] if e["resource"]["resourceType"] == "Observation")
    assert latest == in_summary == sorted([hr_new, lab])


async def test_observation_values_keep_their_digits(client: httpx.AsyncClient, graph: Graph) -> None:
    pid = (await create(client, patient()))["id"]
    raw = (
        '{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org",'
        '"code":"2339-0"}]},"subject":{"reference":"Patient/' + pid + '"},'
        '"effectiveDateTime":"2024-05-01T08:00:00+02:00","valueQuantity":{"value":5.10,"unit":"mmol/L"},'
        '"component":[{"code":{"text":"x"},"valueString":"y"}]}'
    )
    r = await client.post("/Observation", content=raw.encode())
    assert r.status_code == 201, r.text
    oid = r.json()["id"]
    async with subgraph_client(graph.schemas["observation"], graph.store, graph.facility, graph.token) as c:
        resp = await c.post(
            "/graphql",
            json={
                "query": "query($id: ID!) { observation(id: $id) { effective resource"
                " valueQuantity { value valueFloat } components { code { text } valueString } } }",
                "variables": {"id": oid},
            },
        )
    assert '"value":5.10' in resp.text  # the stored resource, byte for byte
    o = resp.json()["data"]["observation"]
    assert o["valueQuantity"] == {"value": "5.10", "valueFloat": 5.1}
    assert o["effective"] == "2024-05-01T08:00:00+02:00"
    assert o["components"] == [{"code": {"text": "x"}, "valueString": "y"}]


# ---------------------------------------------------------------------------------- medication subgraph
async def test_medication_requests(client: httpx.AsyncClient, graph: Graph) -> None:
    (chart,) = await _patients_with_charts(client, 1)
    pid = chart["id"]
    active, completed = chart["MedicationRequest"]
    med = await create(
        client,
        {
            "resourceType": "Medication",
            "code": {"coding": [{"system": RXNORM, "code": "197361"}], "text": "amlodipine"},
        },
    )
    by_ref = await create(
        client,
        {
            "resourceType": "MedicationRequest",
            "status": "on-hold",
            "intent": "order",
            "subject": {"reference": f"Patient/{pid}"},
            "medication": {"reference": {"reference": f"Medication/{med['id']}"}},
            "authoredOn": "2023-01-01",
        },
    )
    query = """query($reps: [_Any!]!, $status: String, $first: Int!) { _entities(representations: $reps) {
      ... on Patient { medicationRequests(status: $status, first: $first) {
        id status intent authoredOn dosageText medication { code display text }
        medicationReference { id code { code text } } } } } }"""

    async def requests(**kw: Any) -> list[dict[str, Any]]:
        body = await graph("medication", query, {**reps([pid]), "first": 20, **kw})
        assert "errors" not in body, body
        found: list[dict[str, Any]] = body["data"]["_entities"][0]["medicationRequests"]
        return found

    everything = await requests()
    assert [m["id"] for m in everything] == [completed, active, by_ref["id"]]  # newest authoredOn first
    assert everything[1] == {
        "id": active,
        "status": "active",
        "intent": "order",
        "authoredOn": "2024-01-01",
        "dosageText": "500 mg twice daily",
        "medication": {"code": "860975", "display": "Metformin", "text": None},
        "medicationReference": None,
    }
    assert everything[2]["medication"] is None
    assert everything[2]["medicationReference"] == {"id": med["id"], "code": {"code": "197361", "text": "amlodipine"}}
    assert [m["id"] for m in await requests(status="active")] == [active]
    assert [m["id"] for m in await requests(status="active,on-hold")] == [active, by_ref["id"]]
    assert [m["id"] for m in await requests(first=1)] == [completed]
    root = await graph("medication", "query($id: ID!) { medication(id: $id) { id code { text } } }", {"id": med["id"]})
    assert root["data"]["medication"] == {"id": med["id"], "code": {"text": "amlodipine"}}


# ---------------------------------------------------------------------------------- batching
WARD = 30


async def test_entities_for_thirty_patients_take_one_select_per_loader_batch(
    client: httpx.AsyncClient, graph: Graph, store: Backends
) -> None:
    charts = await _patients_with_charts(client, WARD)
    ids = [c["id"] for c in charts]
    cases = [
        # (subgraph, selection, loader batches: one SELECT each)
        ("patient", "name { family } encounters { id } allergies { id } conditions { id }", 4),
        ("observation", "observations { id } latestVitals { id }", 3),  # Patient visible, observations, latest
        ("medication", "medicationRequests { id }", 2),  # Patient visible, requests
    ]
    for name, selection, batches in cases:
        for some in (ids[:1], ids):
            with count_statements(store) as log:
                body = await graph(name, entities_query(selection), reps(some))
            assert "errors" not in body, body
            assert len(body["data"]["_entities"]) == len(some)
            assert len(log.selects) == batches, (name, len(some), log.selects)
    body = await graph("observation", entities_query("observations { id } latestVitals { id }"), reps(ids))
    for chart, got in zip(charts, body["data"]["_entities"], strict=True):
        assert got["id"] == chart["id"]
        assert sorted(o["id"] for o in got["observations"]) == sorted(chart["Observation"])
        assert sorted(o["id"] for o in got["latestVitals"]) == sorted(chart["Observation"][1:4:2])
    body = await graph("medication", entities_query("medicationRequests { id }"), reps(ids))
    assert [sorted(m["id"] for m in e["medicationRequests"]) for e in body["data"]["_entities"]] == [
        sorted(c["MedicationRequest"]) for c in charts
    ]


async def test_huge_batches_are_split_to_bound_in_lists(graph: Graph, store: Backends) -> None:
    absent = [str(uuid.uuid4()) for _ in range(600)]
    with count_statements(store) as log:
        body = await graph("observation", entities_query("observations { id }"), reps(absent))
    assert body["data"]["_entities"] == [None] * 600 and set(codes(body)) == {"NOT_FOUND"}
    assert len(log.selects) == 2  # 500 + 100 keys


# ---------------------------------------------------------------------------------- isolation and policy
async def test_another_facility_is_not_found_like_an_absent_id(
    client: httpx.AsyncClient, graph: Graph, other_facility: str
) -> None:
    mine = (await create(client, patient("Mine")))["id"]
    theirs = (await client.post("/Patient", json=patient("Theirs"), headers={"X-Facility-Id": other_facility})).json()
    await client.post("/Observation", json=observation(theirs["id"]), headers={"X-Facility-Id": other_facility})
    absent = str(uuid.uuid4())
    for pid in (theirs["id"], absent):
        body = await graph("patient", "query($id: ID!) { patient(id: $id) { id resource } }", {"id": pid})
        assert body["data"] == {"patient": None}
        assert codes(body) == ["NOT_FOUND"] and body["errors"][0]["path"] == ["patient"]
        assert body["errors"][0]["message"] == f"Patient/{pid} is not known"
    for name, selection in (
        ("patient", "resource"),
        ("observation", "observations { id resource } latestVitals { id }"),
        ("medication", "medicationRequests { id }"),
    ):
        body = await graph(name, entities_query(selection), reps([mine, theirs["id"], absent]))
        entities = body["data"]["_entities"]
        assert entities[0]["id"] == mine and entities[1:] == [None, None], (name, body)
        assert codes(body) == ["NOT_FOUND", "NOT_FOUND"]
        assert sorted(e["path"] for e in body["errors"]) == [["_entities", 1], ["_entities", 2]]
        assert theirs["id"] not in str(entities)


async def test_authentication_and_facility(graph: Graph, store: Backends, facility: str, other_facility: str) -> None:
    query = '{ patient(id: "x") { id } }'
    for token in (None, "not-a-jwt", token_for(store.settings, [facility]) + "x"):
        body = await graph.as_(token)("patient", query)
        assert body["data"] is None and codes(body) == ["UNAUTHENTICATED"], body
    elsewhere = token_for(store.settings, [other_facility])
    for name in SUBGRAPHS:
        body = await graph.as_(elsewhere)(name, entities_query("id"), reps(["x"]))
        assert body["data"] is None and codes(body) == ["FORBIDDEN"], body
    no_facility = Graph(graph.schemas, store, None, token_for(store.settings, [facility]))
    assert codes(await no_facility("patient", query)) == ["BAD_USER_INPUT"]


async def test_patient_scoped_token_sees_only_its_patient(
    client: httpx.AsyncClient, graph: Graph, store: Backends
) -> None:
    (me, other) = await _patients_with_charts(client, 2, "Scoped")
    settings = store.settings
    own = graph.as_(
        token_for(settings, [graph.facility or ""], roles=["clinician"], scopes=["patient/*.rs"], patient=me["id"])
    )
    selection = "observations { id } latestVitals { id }"
    body = await own("observation", entities_query(selection), reps([me["id"], other["id"]]))
    assert sorted(o["id"] for o in body["data"]["_entities"][0]["observations"]) == sorted(me["Observation"])
    assert body["data"]["_entities"][1] is None and codes(body) == ["NOT_FOUND"]
    listed = await own("patient", "{ patients(first: 50) { nodes { id } } }")
    assert listed["data"]["patients"]["nodes"] == [{"id": me["id"]}]
    # may read every patient but only its own patient's observations: the others' lists are empty
    mixed = graph.as_(
        token_for(
            settings,
            [graph.facility or ""],
            roles=["clinician"],
            scopes=["user/Patient.rs", "patient/Observation.rs"],
            patient=me["id"],
        )
    )
    body = await mixed("observation", entities_query(selection), reps([me["id"], other["id"]]))
    assert "errors" not in body, body
    mine, theirs = body["data"]["_entities"]
    assert len(mine["observations"]) == 5 and len(mine["latestVitals"]) == 2
    assert theirs == {"id": other["id"], "observations": [], "latestVitals": []}
    # a query-constrained scope is compiled into the batched SQL too
    labs = graph.as_(
        token_for(
            settings,
            [graph.facility or ""],
            roles=["clinician"],
            scopes=["user/Patient.rs", "user/Observation.rs?category=laboratory"],
        )
    )
    body = await labs("observation", entities_query(selection), reps([me["id"], other["id"]]))
    assert [[o["id"] for o in e["observations"]] for e in body["data"]["_entities"]] == [
        [me["Observation"][3]],
        [other["Observation"][3]],
    ]
    # a role without Observation access: the field is FORBIDDEN, the patient still resolves
    registrar = graph.as_(token_for(settings, [graph.facility or ""], roles=["registrar"]))
    body = await registrar("observation", entities_query("observations { id }"), reps([me["id"]]))
    assert body["data"]["_entities"] == [None] and codes(body) == ["FORBIDDEN"]


# ---------------------------------------------------------------------------------- errors
async def test_bad_input_is_bad_user_input_never_a_500(client: httpx.AsyncClient, graph: Graph) -> None:
    pid = (await create(client, patient()))["id"]
    for args in ("first: 0", "first: 1001", 'since: "yesterday"', 'code: ""', 'category: "a,,b"'):
        body = await graph("observation", entities_query(f"observations({args}) {{ id }}"), reps([pid]))
        assert codes(body) == ["BAD_USER_INPUT"], (args, body)
        assert body["errors"][0]["path"] == ["_entities", 0, "observations"]
    body = await graph("patient", entities_query("encounters(first: 51) { id }"), reps([pid]))
    assert codes(body) == ["BAD_USER_INPUT"]
    body = await graph("medication", entities_query("medicationRequests(first: -1) { id }"), reps([pid]))
    assert codes(body) == ["BAD_USER_INPUT"]
    assert codes(await graph("patient", '{ patient(id: "not an id!") { id } }')) == ["BAD_USER_INPUT"]
    assert codes(await graph("patient", '{ patients(after: "garbage") { nodes { id } } }')) == ["BAD_USER_INPUT"]
    assert codes(await graph("patient", "{ patients(first: 100000) { nodes { id } } }")) == ["BAD_USER_INPUT"]
    assert codes(await graph("patient", "query($n: Int!) { patients(first: $n) { nodes { id } } }", {"n": "x"})) == [
        "BAD_USER_INPUT"
    ]
    for bad in ([{"__typename": "Nope", "id": pid}], [{"__typename": "Concept", "code": "x"}], ["text"]):
        body = await graph("patient", entities_query("id"), {"reps": bad})
        assert codes(body) == ["BAD_USER_INPUT"], body
    assert codes(await graph("patient", "{ patient(id: ")) == ["GRAPHQL_PARSE_FAILED"]
    assert codes(await graph("patient", "{ nope }")) == ["GRAPHQL_VALIDATION_FAILED"]


async def test_transaction_is_closed_after_errors(
    client: httpx.AsyncClient, graph: Graph, store: Backends, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = (await create(client, patient()))["id"]

    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database exploded: SELECT secret FROM somewhere")

    monkeypatch.setattr("subgraphs.graphql.queries.compartments", boom)
    body = await graph("observation", entities_query("observations { id }"), reps([pid]))
    assert codes(body) == ["INTERNAL_SERVER_ERROR"]
    assert body["errors"][0]["message"] == "internal error" and "secret" not in str(body)
    assert checked_out(store) == 0
    await graph("observation", entities_query("observations(first: 0) { id }"), reps([pid]))
    assert checked_out(store) == 0


# ---------------------------------------------------------------------------------- processes
def test_cli_parser() -> None:
    parser = argparse.ArgumentParser()
    add_subgraph_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["subgraph", "observation", "--host", "0.0.0.0", "--port", "4102"])
    assert (args.name, args.host, args.port) == ("observation", "0.0.0.0", 4102)
    with pytest.raises(SystemExit):
        parser.parse_args(["subgraph", "billing"])


@pytest.fixture
async def standalone(backend: str, settings_for: Any) -> AsyncIterator[Starlette]:
    application = create_standalone_app(schema_for("medication"), settings_for(backend))
    async with application.router.lifespan_context(application):
        yield application


async def test_standalone_app_opens_its_own_backends(
    standalone: Starlette, client: httpx.AsyncClient, store: Backends, facility: str
) -> None:
    pid = (await create(client, patient()))["id"]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=standalone),
        base_url="http://medication",
        headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token_for(store.settings, [facility])}"},
    ) as c:
        body = await gql(c, entities_query("medicationRequests { id }"), reps([pid]))
    assert body == {"data": {"_entities": [{"id": pid, "medicationRequests": []}]}}


# ---------------------------------------------------------------------------------- audit
async def test_every_graphql_access_is_audited_once(
    app: Starlette, relay_database: Any, client: httpx.AsyncClient, graph: Graph, store: Backends, facility: str
) -> None:
    from tests.test_audit import chain, seal

    (chart,) = await _patients_with_charts(client, 1)
    pid = chart["id"]
    await seal(app, relay_database)  # earlier records out of the way
    before = len(await chain(app, facility))
    body = await graph("observation", entities_query("observations { id }"), reps([pid]))
    assert len(body["data"]["_entities"][0]["observations"]) == 5
    assert codes(await graph("patient", '{ patient(id: "nobody") { id } }')) == ["NOT_FOUND"]
    assert codes(await graph.as_("forged")("patient", '{ patient(id: "x") { id } }')) == ["UNAUTHENTICATED"]
    await graph("patient", "{ _service { sdl } }")  # the schema is not data: no record
    await seal(app, relay_database)
    events = (await chain(app, facility))[before:]
    assert [(e["code"]["coding"][0]["code"], e["action"], e["outcome"]["code"]["code"]) for e in events] == [
        ("graphql", "E", "0"),
        ("graphql", "E", "4"),
        ("graphql", "E", "4"),
    ]
    assert events[0]["patient"] == {"reference": f"Patient/{pid}"}
    assert events[0]["agent"][0]["who"]["identifier"]["value"].endswith(f"@{facility}")
    assert events[2]["agent"][0]["who"] == {"display": "unauthenticated"}
    assert "HTTP 404" in events[1]["outcome"]["detail"][0]["text"]
