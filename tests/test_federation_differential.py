"""Differential suite: our gateway and Apollo's ``@apollo/gateway`` 2.x answer the same corpus alike.

Both gateways run over the SAME subgraph processes (``unihealth subgraph patient|observation|
medication`` on free loopback ports, over this backend's store) and the same data:

* Apollo: ``scripts/apollo/gateway.mjs`` — IntrospectAndCompose for the main gateway; for the
  "subgraph down" cases a second one from the supergraph SDL Apollo's composition wrote, with the
  observation subgraph's URL pointing at a closed port;
* ours: the edge's ``/graphql`` app (:func:`gateway.graphql_app.create_gateway_app`) over HTTP
  subgraphs — composed from ``_service { sdl }`` for the main gateway; the "down" one loads
  Apollo's supergraph SDL (``UNIHEALTH_SUPERGRAPH``) with the same URL override.

Every operation in ``tests/federation_corpus/*.graphql`` (its leading ``#`` comment is a JSON
header: variables, caller, method, gateway, normalizations) is sent to both; the HTTP status and
the JSON answers must be equal. Normalized — and only there — is what Apollo legitimately words
differently:

* always: the order of ``errors`` (fetches of one level run in parallel; neither gateway promises
  an order) — both lists are sorted; JSON numbers are compared as numbers (Apollo's JavaScript
  prints the stored ``5.10`` as ``5.1``; we keep the stored digits, see
  :func:`test_decimals_keep_their_digits_through_our_gateway`);
* ``request-error-wording``: the ``message`` of request errors the gateway itself raises
  (syntax, validation, variable coercion: graphql-core's words vs graphql-js's); code, locations
  and number of errors are still compared;
* ``subgraph-unavailable``: the path-less error for a subgraph that cannot be reached — Apollo
  says ``request to http://... failed, reason: connect ECONNREFUSED`` with code
  ``INTERNAL_SERVER_ERROR``; we say which subgraph, with ``SUBREQUEST_HTTP_ERROR`` and
  ``serviceName``. Its presence, count and lack of a path are compared; data must be equal.

Node and npm come from the machine; ``npm ci --prefix scripts/apollo`` runs when
``node_modules`` lacks ``@apollo/gateway``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from graphql import print_schema
from starlette.applications import Starlette

from gateway.federation.composition import compose
from gateway.federation.gateway import FederatedGateway, GraphQLRequest
from gateway.federation.harness import (
    apollo_gateway,
    compose_with_apollo,
    free_port,
    subgraph_processes,
)
from gateway.federation.supergraph import load_supergraph
from gateway.federation.transport import Forwarded, HttpTransport
from gateway.graphql_app import FederationSettings, create_gateway_app, fetch_sdls
from tests.conftest import token_for
from tests.helpers import create, patient
from tests.test_graphql_subgraphs import _patients_with_charts

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "tests" / "federation_corpus").glob("*.graphql"))
WARD = 30


@dataclass
class World:
    values: dict[str, Any]
    headers: dict[str, dict[str, str]]
    apollo: dict[str, str]  # gateway kind -> URL
    ours: dict[str, httpx.AsyncClient]
    subgraphs: dict[str, str]
    supergraph_sdl: str
    settings: Any
    facility: str
    token: str
    notes: dict[str, Any] = field(default_factory=dict)


async def _data(rest: httpx.AsyncClient, other: str) -> dict[str, Any]:
    """The corpus's data: a 30-patient ward with charts, and the odd cases the corpus names."""
    family = f"Ward{uuid.uuid4().hex[:8]}"
    ward = await _patients_with_charts(rest, WARD, family)
    values: dict[str, Any] = {"family": family, "absent": str(uuid.uuid4())}
    for n, chart in enumerate(ward):
        values[f"ward.{n}"] = chart["id"]
    values["obs.lab"] = ward[0]["Observation"][3]
    values["lonely"] = (await create(rest, patient("Lonely")))["id"]
    med = await create(
        rest,
        {
            "resourceType": "Medication",
            "status": "active",
            "code": {
                "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}],
                "text": "amlodipine",
            },
            "doseForm": {"text": "tablet"},
        },
    )
    values["med"] = med["id"]
    request = await create(
        rest,
        {
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{ward[0]['id']}"},
            "requester": {"reference": "Practitioner/p1"},
            "medication": {"reference": {"reference": f"Medication/{med['id']}"}},
            "authoredOn": "2024-06-01",
        },
    )
    values["medreq.ref"] = request["id"]
    raw = (
        '{"resourceType":"Observation","status":"final","category":[{"coding":[{"system":'
        '"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory"}]}],'
        '"code":{"coding":[{"system":"http://loinc.org","code":"2339-0"}]},'
        '"subject":{"reference":"Patient/' + ward[1]["id"] + '"},'
        '"effectiveDateTime":"2024-05-01T08:00:00+02:00","valueQuantity":{"value":5.10,"unit":"mmol/L"},'
        '"interpretation":[{"coding":[{"code":"N"}]}],'
        '"component":[{"code":{"text":"x"},"valueString":"y"},{"code":{"text":"z"},"valueQuantity":{"value":1.250}}]}'
    )
    r = await rest.post("/Observation", content=raw.encode())
    assert r.status_code == 201, r.text
    values["obs.decimal"] = r.json()["id"]
    theirs = await rest.post("/Patient", json=patient("Theirs"), headers={"X-Facility-Id": other})
    assert theirs.status_code == 201, theirs.text
    values["theirs"] = theirs.json()["id"]
    return values


def _callers(settings: Any, mine: str, other: str) -> dict[str, dict[str, str]]:
    def bearer(token: str) -> str:
        return f"Bearer {token}"

    clinician = token_for(settings, [mine], roles=["clinician"])
    both = token_for(settings, [mine, other], roles=["clinician"])
    return {
        "clinician": {"Authorization": bearer(clinician), "X-Facility-Id": mine},
        "both-facilities": {"Authorization": bearer(both), "X-Facility-Id": mine},
        "other-facility-header": {"Authorization": bearer(both), "X-Facility-Id": other},
        "forbidden": {
            "Authorization": bearer(token_for(settings, [other], roles=["clinician"])),
            "X-Facility-Id": mine,
        },
        "anonymous": {"X-Facility-Id": mine},
        "lab-only": {
            "Authorization": bearer(
                token_for(
                    settings,
                    [mine],
                    roles=["clinician"],
                    scopes=["user/Patient.rs", "user/Observation.rs?category=laboratory"],
                )
            ),
            "X-Facility-Id": mine,
        },
        "registrar": {"Authorization": bearer(token_for(settings, [mine], roles=["registrar"])), "X-Facility-Id": mine},
    }


@pytest.fixture(scope="module")
async def world(app: Starlette, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    settings = app.state.backends.settings
    mine = f"t-{uuid.uuid4().hex[:16]}"
    other = mine + "-other"
    admin = token_for(settings, [mine, other])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver/fhir/r5",
        headers={"X-Facility-Id": mine, "Content-Type": "application/fhir+json", "Authorization": f"Bearer {admin}"},
        timeout=60,
    ) as rest:
        values = await _data(rest, other)
    workdir = tmp_path_factory.mktemp("federation")
    with subgraph_processes(settings, workdir) as urls:
        sdls = await fetch_sdls(urls, 30)
        composed = compose_with_apollo(sdls, urls)
        assert composed["errors"] == [] and composed["hints"] == [], composed
        supergraph = composed["supergraphSdl"]
        dead = f"http://127.0.0.1:{free_port()}/graphql"
        (workdir / "supergraph.graphql").write_text(supergraph)
        with (
            apollo_gateway(workdir, subgraphs=urls) as apollo_main,
            apollo_gateway(workdir, supergraph=supergraph, override={"observation": dead}) as apollo_down,
        ):
            main_app = create_gateway_app(settings, config=FederationSettings(subgraphs=dict(urls)))
            down_app = create_gateway_app(
                settings,
                config=FederationSettings(
                    supergraph_path=str(workdir / "supergraph.graphql"), subgraphs={"observation": dead}
                ),
            )
            async with (
                main_app.router.lifespan_context(main_app),
                down_app.router.lifespan_context(down_app),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=main_app), base_url="http://ours", timeout=60
                ) as ours,
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=down_app), base_url="http://ours", timeout=60
                ) as down,
            ):
                yield World(
                    values=values,
                    headers=_callers(settings, mine, other),
                    apollo={"main": apollo_main, "down": apollo_down},
                    ours={"main": ours, "down": down},
                    subgraphs=dict(urls),
                    supergraph_sdl=supergraph,
                    settings=settings,
                    facility=mine,
                    token=token_for(settings, [mine], roles=["clinician"]),
                )


# ---------------------------------------------------------------------------------- the corpus
@dataclass
class Case:
    name: str
    query: str
    variables: dict[str, Any] | None
    operation_name: str | None
    caller: str
    method: str
    gateway: str
    normalize: set[str]


_PLACEHOLDER = re.compile(r"\{\{([a-z0-9_.]+)\}\}")


def _substitute(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = _PLACEHOLDER.fullmatch(value)
        if whole:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), value)
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    return value


def load_case(path: Path, values: dict[str, Any]) -> Case:
    text = path.read_text()
    header_lines = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    header = json.loads(" ".join(header_lines)) if header_lines else {}
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return Case(
        name=path.stem,
        query=_substitute(body, values),
        variables=_substitute(header.get("variables"), values),
        operation_name=header.get("operationName"),
        caller=header.get("caller", "clinician"),
        method=header.get("method", "POST"),
        gateway=header.get("gateway", "main"),
        normalize=set(header.get("normalize", [])),
    )


async def ask(client: httpx.AsyncClient, url: str, case: Case, headers: dict[str, str]) -> httpx.Response:
    if case.method == "GET":
        params = {"query": case.query}
        if case.variables is not None:
            params["variables"] = json.dumps(case.variables)
        if case.operation_name:
            params["operationName"] = case.operation_name
        return await client.get(url, params=params, headers=headers)
    payload: dict[str, Any] = {"query": case.query}
    if case.variables is not None:
        payload["variables"] = case.variables
    if case.operation_name:
        payload["operationName"] = case.operation_name
    return await client.post(url, json=payload, headers=headers)


def normalized(response: httpx.Response, flags: set[str]) -> tuple[int, Any]:
    body = json.loads(response.text)  # numbers as floats: 5.10 == 5.1
    errors = body.get("errors") if isinstance(body, dict) else None
    if errors is not None:
        out = []
        for error in errors:
            error = dict(error)
            if "path" not in error and "request-error-wording" in flags:
                error.pop("message", None)
            if "path" not in error and "subgraph-unavailable" in flags:
                error = {"message": "<a subgraph is unavailable>"}
            out.append(error)
        body["errors"] = sorted(out, key=lambda e: json.dumps(e, sort_keys=True))
    return response.status_code, body


def test_the_corpus_has_at_least_thirty_operations() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
async def test_same_answer_as_apollo_gateway(world: World, path: Path) -> None:
    case = load_case(path, world.values)
    headers = world.headers[case.caller]
    async with httpx.AsyncClient(timeout=60) as apollo:
        theirs = await ask(apollo, world.apollo[case.gateway], case, headers)
    ours = await ask(world.ours[case.gateway], "/graphql", case, headers)
    assert "Traceback" not in ours.text
    assert normalized(ours, case.normalize) == normalized(theirs, case.normalize), (
        f"{case.name}\n ours:   {ours.status_code} {ours.text[:3000]}\n"
        f" apollo: {theirs.status_code} {theirs.text[:3000]}"
    )


# ---------------------------------------------------------------------------------- beyond equality
async def test_the_corpus_answers_are_not_vacuous(world: World) -> None:
    """The equal answers hold real data: the ward has 30 patients, each with vitals and meds."""
    case = load_case(ROOT / "tests" / "federation_corpus" / "03_ward_30_patients.graphql", world.values)
    body = (await ask(world.ours["main"], "/graphql", case, world.headers["clinician"])).json()
    assert "errors" not in body, body
    nodes = body["data"]["patients"]["nodes"]
    assert len(nodes) == WARD  # the facility's first 30 patients by id: the ward and maybe "Lonely"
    charted = [n for n in nodes if n["name"]["family"] == world.values["family"]]
    assert len(charted) >= WARD - 1
    assert all(n["latestVitals"] and n["medicationRequests"] and n["allergies"] for n in charted)
    isolation = load_case(ROOT / "tests" / "federation_corpus" / "18_other_facility_patient.graphql", world.values)
    body = (await ask(world.ours["main"], "/graphql", isolation, world.headers["both-facilities"])).json()
    assert body["data"] == {"patient": None} and [e["extensions"]["code"] for e in body["errors"]] == ["NOT_FOUND"]
    assert world.values["theirs"] in body["errors"][0]["message"]
    assert "Theirs" not in json.dumps(body)


async def test_decimals_keep_their_digits_through_our_gateway(world: World) -> None:
    """The stored 5.10 stays 5.10 through our gateway (HTTP subgraphs); Apollo's JavaScript prints 5.1."""
    case = load_case(
        ROOT / "tests" / "federation_corpus" / "25_observation_decimals_and_components.graphql", world.values
    )
    ours = await ask(world.ours["main"], "/graphql", case, world.headers["clinician"])
    async with httpx.AsyncClient(timeout=60) as client:
        theirs = await ask(client, world.apollo["main"], case, world.headers["clinician"])
    assert '"value":5.10' in ours.text and '"value":1.250' in ours.text
    assert '"value":5.1,' in theirs.text


async def test_our_composition_equals_apollos(world: World) -> None:
    """The API schema we compose from the SDLs is Apollo's, printed; and so is the one we load from
    Apollo's supergraph SDL, with the same federation facts."""
    sdls = await fetch_sdls(world.subgraphs, 30)
    ours = compose(sdls, world.subgraphs)
    loaded = load_supergraph(world.supergraph_sdl)
    assert print_schema(ours.api_schema) == print_schema(loaded.api_schema)
    assert ours.urls == loaded.urls
    for name, meta in ours.types.items():
        assert loaded.types[name].keys == meta.keys and loaded.types[name].graphs == meta.graphs, name
        for field_name, fmeta in meta.fields.items():
            assert loaded.types[name].fields[field_name] == fmeta, (name, field_name)


async def test_ward_is_one_http_request_per_subgraph_per_level(world: World) -> None:
    """Over real HTTP subgraphs: the 30-patient ward is 3 requests — patient (level 0), then
    observation and medication (level 1, concurrently) — counted on the wire."""
    sent: list[str] = []

    async def count(session: Any, context: Any, params: aiohttp.TraceRequestStartParams) -> None:
        sent.append(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(count)
    supergraph = compose(await fetch_sdls(world.subgraphs, 30), world.subgraphs)
    gateway = FederatedGateway(supergraph, HttpTransport(supergraph.urls, trace_configs=[trace]))
    try:
        case = load_case(ROOT / "tests" / "federation_corpus" / "03_ward_30_patients.graphql", world.values)
        forwarded = Forwarded.from_headers({k.lower(): v for k, v in world.headers["clinician"].items()})
        result = await gateway.execute(GraphQLRequest(case.query), forwarded)
    finally:
        await gateway.close()
    assert result.status == 200 and "errors" not in result.body
    assert len(result.body["data"]["patients"]["nodes"]) == WARD
    by_subgraph = {name: sent.count(url) for name, url in world.subgraphs.items()}
    assert by_subgraph == {"patient": 1, "observation": 1, "medication": 1}, sent
    assert [(r.level, r.subgraph, r.representations) for r in result.requests] == [
        (0, "patient", 0),
        (1, "observation", WARD),
        (1, "medication", WARD),
    ]
