"""Custom SearchParameter resources posted at runtime (issue 3), on every backend: each parameter
type becomes searchable in the posting facility only, new writes are indexed with it, ``unihealth
reindex`` (a separate process) brings older data in, a definition written by another process is
picked up by the running server, retiring or deleting stops its use, and bad definitions are a 400
that stores nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.helpers import LOINC, assert_outcome, create, observation, patient

ROOT = Path(__file__).resolve().parent.parent
STRICT = {"Prefer": "handling=strict"}
NICKNAME = "Patient.name.where(use='nickname').given"


def definition(
    code: str, ptype: str, expression: str | None, base: str = "Observation", **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "SearchParameter",
        "url": f"https://example.org/fhir/SearchParameter/{base}-{code}",
        "name": code.replace("-", "_"),
        "status": "active",
        "description": f"test parameter {code}",
        "code": code,
        "base": [base],
        "type": ptype,
        **extra,
    }
    if expression is not None:
        body["expression"] = expression
    return body


async def ids(client: httpx.AsyncClient, resource_type: str, params: list[tuple[str, str]], **kw: Any) -> set[str]:
    r = await client.get(f"/{resource_type}", params=tuple(params), **kw)
    assert r.status_code == 200, r.text
    return {e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"}


def _env(app: Starlette) -> dict[str, str]:
    settings = app.state.backends.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIHEALTH_")}
    env.update(
        PYTHONPATH=str(ROOT),
        UNIHEALTH_DATA_DIR=str(settings.data_dir),
        UNIHEALTH_DATABASE_URL=settings.database_url,
        UNIHEALTH_RELAY="off",
    )
    if settings.migration_database_url:
        env["UNIHEALTH_MIGRATION_DATABASE_URL"] = settings.migration_database_url
    return env


def cli(app: Starlette, *args: str) -> str:
    """Run ``unihealth ARGS`` as its own process against the test database."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=_env(app),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


async def test_every_parameter_type_is_searchable_once_posted(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient("Custom", name=[{"use": "nickname", "given": ["Bobby"]}])))["id"]
    other_pid = (await create(client, patient("Plain")))["id"]
    before = (await create(client, observation(pid, value=72)))["id"]
    params = [
        definition("nickname", "string", NICKNAME, base="Patient"),
        definition("x-method", "token", "Observation.method"),
        definition("x-performer", "reference", "Observation.performer", target=["Practitioner"]),
        definition("x-issued", "date", "Observation.issued"),
        definition("x-value", "quantity", "Observation.value.ofType(Quantity)"),
        definition("x-count", "number", "Observation.value.ofType(integer)"),
        definition("x-source", "uri", "Patient.meta.source", base="Patient"),
        definition(
            "x-code-value",
            "composite",
            "Observation",
            component=[
                {"definition": "http://hl7.org/fhir/SearchParameter/clinical-code", "expression": "code"},
                {
                    "definition": "http://hl7.org/fhir/SearchParameter/Observation-value-quantity",
                    "expression": "value.ofType(Quantity)",
                },
            ],
        ),
    ]
    for body in params:
        r = await client.post("/SearchParameter", json=body)
        assert r.status_code == 201, r.text
    # data written from now on is indexed with them
    pid2 = (await create(client, patient("Later", name=[{"use": "nickname", "given": ["Bob"]}])))["id"]
    sourced = (await create(client, patient("Sourced", meta={"source": "https://lab.example.org/feed"})))["id"]
    obs = observation(
        pid2,
        value=72,
        method={"coding": [{"system": "http://snomed.info/sct", "code": "37931006"}]},
        performer=[{"reference": "Practitioner/doc-1"}],
        issued="2024-03-05T10:00:00Z",
    )
    oid = (await create(client, obs))["id"]
    counted = {**observation(pid2), "valueInteger": 7}
    counted.pop("valueQuantity")
    cid = (await create(client, counted))["id"]
    cases: list[tuple[str, list[tuple[str, str]], set[str]]] = [
        ("Patient", [("nickname", "bob")], {pid2}),  # Bobby was written before the parameter existed
        ("Patient", [("nickname:exact", "Bob")], {pid2}),
        ("Patient", [("nickname", "alice")], set()),
        ("Observation", [("x-method", "http://snomed.info/sct|37931006")], {oid}),
        ("Observation", [("x-method", "other")], set()),
        ("Observation", [("x-method:not", "37931006")], {cid, before}),
        ("Observation", [("x-performer", "Practitioner/doc-1")], {oid}),
        ("Observation", [("x-performer", "doc-2")], set()),
        ("Observation", [("x-issued", "ge2024-03")], {oid}),
        ("Observation", [("x-issued", "lt2024-03-05")], set()),
        ("Observation", [("x-value", "gt70")], {oid}),
        ("Observation", [("x-value", "lt70")], set()),
        ("Observation", [("x-count", "7")], {cid}),
        ("Observation", [("x-count", "gt7")], set()),
        ("Patient", [("x-source", "https://lab.example.org/feed")], {sourced}),
        ("Patient", [("x-source:below", "https://lab.example.org")], {sourced}),
        ("Patient", [("x-source", "https://other.example.org")], set()),
        ("Observation", [("x-code-value", f"{LOINC}|8867-4$gt70")], {oid}),
        ("Observation", [("x-code-value", f"{LOINC}|8867-4$lt70")], set()),
        ("Observation", [("x-value:missing", "true")], {cid, before}),  # not reindexed yet
        ("Observation", [("subject:Patient.nickname", "bob")], {oid, cid}),  # chained into a custom one
        ("Patient", [("_has:Observation:subject:x-count", "7")], {pid2}),
    ]
    failures = []
    for resource_type, query, expected in cases:
        got = await ids(client, resource_type, query, headers=STRICT)
        if got != expected:
            failures.append(f"{resource_type}?{query}: {got} != {expected}")
    assert not failures, failures
    assert before not in await ids(client, "Observation", [("x-value", "gt0")])
    assert other_pid not in await ids(client, "Patient", [("nickname", "b")])
    # sort by a custom date parameter (missing values last)
    r = await client.get("/Observation", params={"_sort": "-x-issued", "subject": f"Patient/{pid2}"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [oid, cid]
    # the definitions themselves are searchable
    assert len(await ids(client, "SearchParameter", [("code", "nickname"), ("status", "active")])) == 1


async def test_another_facility_neither_sees_nor_uses_it(
    client: httpx.AsyncClient, facility: str, other_facility: str
) -> None:
    sp = (await create(client, definition("nickname", "string", NICKNAME, base="Patient")))["id"]
    mine = (await create(client, patient("Mine", name=[{"use": "nickname", "given": ["Bobby"]}])))["id"]
    other = {"X-Facility-Id": other_facility}
    theirs = (
        await client.post("/Patient", json=patient("T", name=[{"use": "nickname", "given": ["Bobby"]}]), headers=other)
    ).json()["id"]
    assert await ids(client, "Patient", [("nickname", "bobby")]) == {mine}
    assert_outcome(await client.get("/Patient", params={"nickname": "bobby"}, headers={**other, **STRICT}), 400)
    lenient = await client.get("/Patient", params={"nickname": "bobby"}, headers=other)
    assert lenient.status_code == 200 and "nickname" in lenient.text  # ignored, and said so
    assert (await client.get(f"/SearchParameter/{sp}", headers=other)).status_code == 404
    assert await ids(client, "SearchParameter", [], headers=other) == set()
    # the other facility may define the same code for itself: its own, independent parameter
    r = await client.post(
        "/SearchParameter", json=definition("nickname", "string", NICKNAME, base="Patient"), headers=other
    )
    assert r.status_code == 201, r.text
    assert await ids(client, "Patient", [("nickname", "bobby")], headers=other) == set()  # written before it
    newer = (
        await client.post("/Patient", json=patient("U", name=[{"use": "nickname", "given": ["Bobby"]}]), headers=other)
    ).json()["id"]
    assert await ids(client, "Patient", [("nickname", "bobby")], headers=other) == {newer}
    assert theirs != newer
    assert await ids(client, "Patient", [("nickname", "bobby")]) == {mine}


async def test_reindex_in_another_process_makes_older_data_findable(
    app: Starlette, client: httpx.AsyncClient, facility: str, other_facility: str
) -> None:
    old = (await create(client, patient("Old", name=[{"use": "nickname", "given": ["Bobby"]}])))["id"]
    other = {"X-Facility-Id": other_facility}
    await client.post("/Patient", json=patient("O", name=[{"use": "nickname", "given": ["Bobby"]}]), headers=other)
    await create(client, definition("nickname", "string", NICKNAME, base="Patient"))
    assert await ids(client, "Patient", [("nickname", "bobby")]) == set()
    out = cli(app, "reindex", "--facility", facility, "--type", "Patient")
    assert "reindexed 1 resources" in out, out  # this facility's Patient only: reindex is per facility
    assert await ids(client, "Patient", [("nickname", "bobby")]) == {old}


async def test_a_definition_written_by_another_process_is_picked_up(
    app: Starlette, client: httpx.AsyncClient, facility: str, tmp_path: Path
) -> None:
    await create(client, definition("x-issued", "date", "Observation.issued"))  # the server caches a registry
    pid = (await create(client, patient("P")))["id"]
    assert_outcome(await client.get("/Observation", params={"x-value": "gt1"}, headers=STRICT), 400)
    ndjson = tmp_path / "definitions.ndjson"
    ndjson.write_text(json.dumps(definition("x-value", "quantity", "Observation.value.ofType(Quantity)")) + "\n")
    assert "imported 1 resources" in cli(app, "import", str(ndjson), "--facility", facility)
    oid = (await create(client, observation(pid, value=5)))["id"]  # indexed with the other process's definition
    assert await ids(client, "Observation", [("x-value", "gt1")], headers=STRICT) == {oid}


async def test_retiring_or_deleting_stops_its_use(client: httpx.AsyncClient) -> None:
    body = definition("nickname", "string", NICKNAME, base="Patient")
    sp = (await create(client, body))["id"]
    pid = (await create(client, patient("P", name=[{"use": "nickname", "given": ["Bobby"]}])))["id"]
    assert await ids(client, "Patient", [("nickname", "bobby")], headers=STRICT) == {pid}
    r = await client.put(f"/SearchParameter/{sp}", json={**body, "id": sp, "status": "retired"})
    assert r.status_code == 200, r.text
    assert_outcome(await client.get("/Patient", params={"nickname": "bobby"}, headers=STRICT), 400, "not-supported")
    assert_outcome(await client.get("/Patient", params={"_sort": "nickname"}), 400)
    # active again: its old index rows went with the retirement, so only data written since counts
    assert (await client.put(f"/SearchParameter/{sp}", json={**body, "id": sp})).status_code == 200
    assert await ids(client, "Patient", [("nickname", "bobby")], headers=STRICT) == set()
    later = (await create(client, patient("Q", name=[{"use": "nickname", "given": ["Bobby"]}])))["id"]
    assert await ids(client, "Patient", [("nickname", "bobby")], headers=STRICT) == {later}
    assert (await client.delete(f"/SearchParameter/{sp}")).status_code in (200, 204)
    assert_outcome(await client.get("/Patient", params={"nickname": "bobby"}, headers=STRICT), 400, "not-supported")
    # a draft is stored but does nothing
    await create(client, {**body, "status": "draft", "url": body["url"] + "-draft"})
    assert_outcome(await client.get("/Patient", params={"nickname": "bobby"}, headers=STRICT), 400, "not-supported")


BAD: list[tuple[str, dict[str, Any]]] = [
    ("unparsable expression", definition("x-a", "string", "Patient.name.(given", base="Patient")),
    ("trailing text", definition("x-a2", "string", "Patient.name.given)", base="Patient")),
    ("empty step", definition("x-a3", "string", "Patient..name", base="Patient")),
    ("unknown function", definition("x-b", "string", "Patient.name.frobnicate()", base="Patient")),
    ("unknown base", definition("x-c", "string", "Foo.name", base="Foo")),
    ("base not stored here", definition("x-d", "string", "Appointment.description", base="Appointment")),
    ("clash with a built-in", definition("name", "string", "Patient.name.given", base="Patient")),
    ("clash with a common one", definition("_tag", "token", "Patient.meta.tag", base="Patient")),
    ("special type", definition("x-e", "special", "Patient.address", base="Patient")),
    ("unknown type", definition("x-f", "fancy", "Patient.address", base="Patient")),
    ("no expression", definition("x-g", "string", None, base="Patient")),
    ("expression of another type", definition("x-h", "token", "Observation.code", base="Patient")),
    ("code with a dot", definition("x.i", "string", "Patient.name.given", base="Patient")),
    (
        "official url",
        {
            **definition("x-j", "string", "Patient.name.given", base="Patient"),
            "url": "http://hl7.org/fhir/SearchParameter/individual-given",
        },
    ),
    (
        "composite with an unknown component",
        definition(
            "x-k",
            "composite",
            "Observation",
            component=[
                {"definition": "https://example.org/nothing", "expression": "code"},
                {"definition": "http://hl7.org/fhir/SearchParameter/Observation-value-quantity", "expression": "value"},
            ],
        ),
    ),
    ("not R5", {**definition("x-l", "string", "Patient.name.given", base="Patient"), "base": "Patient"}),
]


@pytest.mark.parametrize("label", [label for label, _ in BAD])
async def test_bad_definitions_are_400_and_store_nothing(client: httpx.AsyncClient, label: str) -> None:
    body = dict(BAD)[label]
    body_ok = definition("nickname", "string", NICKNAME, base="Patient")
    await create(client, body_ok)
    assert_outcome(await client.post("/SearchParameter", json=body), 400)
    assert_outcome(await client.put("/SearchParameter/bad-one", json={**body, "id": "bad-one"}), 400)
    stored = await ids(client, "SearchParameter", [])
    assert len(stored) == 1 and "bad-one" not in stored


async def test_duplicate_code_or_url_in_one_facility_is_400(client: httpx.AsyncClient) -> None:
    body = definition("nickname", "string", NICKNAME, base="Patient")
    sp = (await create(client, body))["id"]
    assert_outcome(await client.post("/SearchParameter", json={**body, "url": body["url"] + "-2"}), 400)
    assert_outcome(await client.post("/SearchParameter", json={**body, "code": "nick"}), 400)  # same url
    # updating the same definition is not a clash with itself
    r = await client.put(f"/SearchParameter/{sp}", json={**body, "id": sp, "expression": "Patient.name.given"})
    assert r.status_code == 200, r.text
    assert len(await ids(client, "SearchParameter", [])) == 1


async def test_conditional_create_may_use_a_custom_parameter(client: httpx.AsyncClient) -> None:
    await create(client, definition("nickname", "string", NICKNAME, base="Patient"))
    body = patient("C", name=[{"use": "nickname", "given": ["Bobby"]}])
    first = await client.post("/Patient", json=body, headers={"If-None-Exist": "nickname:exact=Bobby"})
    assert first.status_code == 201, first.text
    again = await client.post("/Patient", json=body, headers={"If-None-Exist": "nickname:exact=Bobby"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
