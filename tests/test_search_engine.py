"""The search engine (issue 3, slice 2) over REST, on every backend: each parameter type and
modifier with positive and negative cases, chains, ``_has``, includes, multi-key sort with paging,
``_elements``/``_summary``, totals, lenient/strict handling and malformed values."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest

from subgraphs.store import fhirjson
from subgraphs.store.database import libpq_dsn
from tests.helpers import LOINC, assert_outcome, create, observation, patient

UCUM = "http://unitsofmeasure.org"
pytestmark = pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning")  # e.g. a cartesian product
Params = list[tuple[str, str]] | dict[str, str]


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == mode]


def outcomes(bundle: dict[str, Any]) -> list[str]:
    return [
        issue["diagnostics"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") == "outcome"
        for issue in e["resource"]["issue"]
    ]


def next_link(bundle: dict[str, Any]) -> str | None:
    url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return url.replace("http://testserver/fhir/r5", "") if url else None


async def find(client: httpx.AsyncClient, resource_type: str, params: Params, **kwargs: Any) -> dict[str, Any]:
    pairs = list(params.items()) if isinstance(params, dict) else params
    r = await client.get(f"/{resource_type}", params=tuple(pairs), **kwargs)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return dict(body)


async def found(client: httpx.AsyncClient, resource_type: str, params: Params, **kwargs: Any) -> set[str]:
    return set(ids(await find(client, resource_type, params, **kwargs)))


async def check_table(
    client: httpx.AsyncClient, resource_type: str, cases: list[tuple[Params, set[str]]], names: dict[str, str]
) -> None:
    """Each (params, expected names) case; ``names`` maps id → name for readable failures."""
    failures = []
    for params, expected in cases:
        got = {names.get(i, i) for i in await found(client, resource_type, params)}
        if got != expected:
            failures.append(f"{params}: got {sorted(got)}, expected {sorted(expected)}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------ token


async def test_token_forms_and_modifiers(client: httpx.AsyncClient) -> None:
    mrn = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}], "text": "MRN"}
    names: dict[str, str] = {}
    people: dict[str, dict[str, Any]] = {
        "a": {"identifier": [{"system": "urn:mrn", "value": "A-1", "type": mrn}], "active": True},
        "b": {"identifier": [{"system": "urn:other", "value": "A-1"}], "active": False},
        "c": {"identifier": [{"value": "C-3"}], "gender": "male"},
    }
    for name, extra in people.items():
        names[(await create(client, patient(name, **extra)))["id"]] = name
    cases: list[tuple[Params, set[str]]] = [
        ({"identifier": "A-1"}, {"a", "b"}),
        ({"identifier": "urn:mrn|A-1"}, {"a"}),
        ({"identifier": "urn:mrn|"}, {"a"}),
        ({"identifier": "|C-3"}, {"c"}),  # no system
        ({"identifier": "|A-1"}, set()),
        ({"identifier": "urn:mrn|C-3"}, set()),
        ({"identifier": "a-1"}, set()),  # codes are case-sensitive
        ({"identifier:of-type": "http://terminology.hl7.org/CodeSystem/v2-0203|MR|A-1"}, {"a"}),
        ({"identifier:of-type": "http://terminology.hl7.org/CodeSystem/v2-0203|MR|C-3"}, set()),
        ({"identifier:text": "mr"}, {"a"}),  # Identifier.type.text
        ({"identifier:code-text": "a-"}, {"a", "b"}),
        ({"active": "true"}, {"a"}),
        ({"active": "false"}, {"b"}),
        ({"active:not": "true"}, {"b", "c"}),  # :not includes resources without a value
        ({"active:missing": "true"}, {"c"}),
        ({"active:missing": "false"}, {"a", "b"}),
        ({"gender": "female"}, {"a", "b"}),
        ({"gender:not": "female,male"}, set()),
        ({"gender": "female,male"}, {"a", "b", "c"}),
        ([("gender", "female"), ("active", "true")], {"a"}),  # repeated = AND
    ]
    await check_table(client, "Patient", cases, names)


async def test_token_text_on_codeable_concepts(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    coded = observation(pid) | {"code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]}}
    text_only = observation(pid) | {"code": {"text": "Pulse rate, résting"}}
    names = {(await create(client, coded))["id"]: "coded", (await create(client, text_only))["id"]: "text"}
    cases: list[tuple[Params, set[str]]] = [
        ({"code:text": "heart"}, {"coded"}),
        ({"code:text": "RATE"}, {"coded", "text"}),  # any word, case-insensitive
        ({"code:text": "resting"}, {"text"}),  # accent-insensitive
        ({"code:text": "eart"}, set()),  # word starts only
        ({"code": "8867-4"}, {"coded"}),
        ({"code:missing": "true"}, set()),
        ({"code:not": "8867-4"}, {"text"}),
    ]
    await check_table(client, "Observation", [({**p, "patient": pid}, e) for p, e in cases], names)  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------------ string


async def test_string_modifiers(client: httpx.AsyncClient) -> None:
    names: dict[str, str] = {}
    for family, extra in {
        "Müller": {"address": [{"city": "Zürich"}]},
        "Mullins": {"address": [{"city": "Bern"}]},
        "van Dyke": {},
        "O'Brien, Jr": {},
    }.items():
        names[(await create(client, patient(family, **extra)))["id"]] = family
    cases: list[tuple[Params, set[str]]] = [
        ({"family": "mul"}, {"Müller", "Mullins"}),
        ({"family": "MÜL"}, {"Müller", "Mullins"}),
        ({"family": "mull"}, {"Müller", "Mullins"}),  # ü matches u
        ({"family": "muller"}, {"Müller"}),
        ({"family": "ller"}, set()),  # starts-with
        ({"family:exact": "Müller"}, {"Müller"}),
        ({"family:exact": "müller"}, set()),  # exact is case- and accent-sensitive
        ({"family:exact": "Muller"}, set()),
        ({"family:contains": "LLIN"}, {"Mullins"}),
        ({"family:contains": "dyk"}, {"van Dyke"}),
        ({"family:text": "dyke"}, {"van Dyke"}),
        ({"family": r"o'brien\, jr"}, {"O'Brien, Jr"}),  # an escaped comma is part of the value
        ({"family": "o'brien,van"}, {"O'Brien, Jr", "van Dyke"}),
        ({"name": "ann"}, {"Müller", "Mullins", "van Dyke", "O'Brien, Jr"}),  # given name
        ({"address-city": "zur"}, {"Müller"}),
        ({"address": "bern"}, {"Mullins"}),
        ({"address-city:missing": "true"}, {"van Dyke", "O'Brien, Jr"}),
        ({"address-city:missing": "false"}, {"Müller", "Mullins"}),
        ({"family": "%"}, set()),  # LIKE wildcards are literal
        ({"family:contains": "_"}, set()),
    ]
    await check_table(client, "Patient", cases, names)


# ------------------------------------------------------------------------------------------ date


async def test_date_prefixes_partial_dates_and_timezones(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    when = {
        "mar1-late-est": "2024-03-01T23:30:00-05:00",  # = 2024-03-02T04:30Z
        "mar2-noon": "2024-03-02T12:00:00Z",
        "mar2-day": "2024-03-02",  # the whole day
        "mar-month": "2024-03",  # the whole month
        "feb29": "2024-02-29T10:00:00+01:00",
        "apr1-early-plus14": "2024-04-01T01:00:00+14:00",  # = 2024-03-31T11:00Z
    }
    names = {}
    for name, value in when.items():
        names[(await create(client, observation(pid, when=value)))["id"]] = name
    period = observation(pid) | {"effectivePeriod": {"start": "2024-02-28", "end": "2024-03-03"}}
    del period["effectiveDateTime"]
    names[(await create(client, period))["id"]] = "feb28-mar3"
    open_period = observation(pid) | {"effectivePeriod": {"start": "2024-03-15T00:00:00Z"}}
    del open_period["effectiveDateTime"]
    names[(await create(client, open_period))["id"]] = "mar15-open"
    no_date = observation(pid)
    del no_date["effectiveDateTime"]
    names[(await create(client, no_date))["id"]] = "none"
    dated = set(names.values()) - {"none"}
    cases: list[tuple[Params, set[str]]] = [
        ({"date": "2024-03-02"}, {"mar1-late-est", "mar2-noon", "mar2-day"}),
        ({"date": "eq2024-03-01"}, set()),  # 23:30 EST is already March 2nd in UTC
        ({"date": "2024-03"}, {"mar1-late-est", "mar2-noon", "mar2-day", "mar-month", "apr1-early-plus14"}),
        ({"date": "2024"}, dated - {"mar15-open"}),  # an open period is not within 2024
        ({"date": "2024-02-29"}, {"feb29"}),
        ({"date": "2024-03-02T12:00:00Z"}, {"mar2-noon"}),
        ({"date": "2024-03-02T13:00:00+01:00"}, {"mar2-noon"}),
        ({"date": "ne2024-03-02"}, dated - {"mar1-late-est", "mar2-noon", "mar2-day"}),
        ({"date": "gt2024-03-31"}, {"mar15-open"}),
        # ge: the range above the value overlaps, or the value contains the target (a whole March
        # that ends with the 31st does neither)
        ({"date": "ge2024-03-31"}, {"apr1-early-plus14", "mar15-open"}),
        ({"date": "lt2024-02-29T12:00:00Z"}, {"feb29", "feb28-mar3"}),
        ({"date": "le2024-02-29"}, {"feb29", "feb28-mar3"}),
        ({"date": "sa2024-03-02"}, {"apr1-early-plus14", "mar15-open"}),
        ({"date": "eb2024-03-02"}, {"feb29"}),
        ({"date": "gt2025"}, {"mar15-open"}),
        ({"date": "lt2000"}, set()),
        ({"date:missing": "true"}, {"none"}),
        ({"date:missing": "false"}, dated),
        ([("date", "ge2024-03-01"), ("date", "lt2024-03-02")], {"feb28-mar3", "mar-month"}),  # AND
        ({"date": "2024-02-29,2024-03-02T12:00:00Z"}, {"feb29", "mar2-noon"}),
        # ap: ±10% of the distance from now (years here, so every dated one) — still not "none"
        ({"date": "ap2024-03-02T12:00:00Z"}, dated),
    ]
    failures = []
    for params, expected in cases:
        query = list(params.items()) if isinstance(params, dict) else list(params)
        got = {names[i] for i in await found(client, "Observation", [*query, ("patient", pid)])}
        if got != expected:
            failures.append(f"{params}: got {sorted(got)}, expected {sorted(expected)}")
    assert not failures, "\n".join(failures)


async def test_last_updated_and_birthdate(client: httpx.AsyncClient) -> None:
    a = (await create(client, patient("Year", birthDate="1974")))["id"]
    b = (await create(client, patient("Day", birthDate="1974-06-15")))["id"]
    stamp = (await client.get(f"/Patient/{b}")).json()["meta"]["lastUpdated"]
    assert await found(client, "Patient", {"birthdate": "1974", "_id": f"{a},{b}"}) == {a, b}
    assert await found(client, "Patient", {"birthdate": "1974-06", "_id": f"{a},{b}"}) == {b}
    assert await found(client, "Patient", {"birthdate": "ge1974-06-01", "_id": f"{a},{b}"}) == {a, b}
    assert await found(client, "Patient", {"_lastUpdated": f"ge{stamp}", "_id": f"{a},{b}"}) == {b}
    assert await found(client, "Patient", {"_lastUpdated": "lt2000-01-01", "_id": f"{a},{b}"}) == set()
    assert await found(client, "Patient", {"_lastUpdated": "gt2000", "_id": f"{a},{b}"}) == {a, b}


# ------------------------------------------------------------------------------------------ quantity, number


def _with_value(pid: str, value: Decimal, code: str, **extra: Any) -> dict[str, Any]:
    obs = observation(pid, code="2345-7", category="laboratory", **extra)
    obs["valueQuantity"] = {"value": value, "system": UCUM, "code": code, "unit": code}
    return obs


async def test_quantity_prefixes_precision_and_units(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    names = {}
    for name, (value, code) in {
        "5.4mg": ("5.4", "mg"),
        "5.45mg": ("5.45", "mg"),
        "5.5mg": ("5.5", "mg"),
        "100mg/dL": ("100", "mg/dL"),
        "1g/L": ("1", "g/L"),
        "0.0054g": ("0.0054", "g"),
        "120/min": ("120", "/min"),
    }.items():
        # a JSON number with exactly these digits (the store keeps them as sent)
        r = await client.post("/Observation", content=fhirjson.dumps(_with_value(pid, Decimal(value), code)))
        assert r.status_code == 201, r.text
        names[r.json()["id"]] = name
    mg = {"5.4mg", "5.45mg", "5.5mg"}
    cases: list[tuple[Params, set[str]]] = [
        ({"value-quantity": "5.4"}, {"5.4mg"}),  # [5.35, 5.45)
        ({"value-quantity": "5.40"}, {"5.4mg"}),
        ({"value-quantity": "5"}, {"5.4mg", "5.45mg"}),  # [4.5, 5.5)
        ({"value-quantity": "ne5.4"}, set(names.values()) - {"5.4mg"}),
        ({"value-quantity": "gt5.4"}, {"5.45mg", "5.5mg", "100mg/dL", "120/min"}),
        ({"value-quantity": "ge5.45"}, {"5.45mg", "5.5mg", "100mg/dL", "120/min"}),
        ({"value-quantity": "lt1"}, {"0.0054g"}),
        ({"value-quantity": "le1"}, {"0.0054g", "1g/L"}),
        ({"value-quantity": "sa100"}, {"120/min"}),
        ({"value-quantity": "eb5.45"}, {"5.4mg", "1g/L", "0.0054g"}),
        ({"value-quantity": "ap100"}, {"100mg/dL"}),  # ±10%
        ({"value-quantity": "ap110"}, {"100mg/dL", "120/min"}),
        ({"value-quantity": f"5.4|{UCUM}|mg"}, {"5.4mg", "0.0054g"}),  # UCUM canonical: 5.4 mg = 0.0054 g
        ({"value-quantity": f"ge5|{UCUM}|mg"}, mg | {"0.0054g"}),
        ({"value-quantity": f"100|{UCUM}|mg/dL"}, {"100mg/dL", "1g/L"}),  # 100 mg/dL = 1 g/L
        ({"value-quantity": "100||mg/dL"}, {"100mg/dL"}),  # code or unit, no conversion
        ({"value-quantity": "5.4||g"}, set()),
        ({"value-quantity": f"5.4|{UCUM}|g"}, set()),
        ({"value-quantity": f"2|{UCUM}|/s"}, {"120/min"}),  # 120/min = 2/s
        ({"value-quantity": "5.4|urn:other|mg"}, set()),
        ({"value-quantity:missing": "true"}, set()),
    ]
    await check_table(client, "Observation", [({**dict(p), "patient": pid}, e) for p, e in cases], names)


async def test_composite_parameters(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]

    def bp(systolic: int, diastolic: int) -> dict[str, Any]:
        def comp(code: str, value: int) -> dict[str, Any]:
            return {
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "valueQuantity": {"value": value, "system": UCUM, "code": "mm[Hg]", "unit": "mmHg"},
            }

        obs = observation(pid, code="85354-9")
        del obs["valueQuantity"]
        obs["component"] = [comp("8480-6", systolic), comp("8462-4", diastolic)]
        return obs

    names = {
        (await create(client, bp(150, 95)))["id"]: "high",
        (await create(client, bp(118, 76)))["id"]: "normal",
        (await create(client, observation(pid, value=130)))["id"]: "hr130",
    }
    hr = f"{LOINC}|8867-4"
    cases: list[tuple[Params, set[str]]] = [
        ({"component-code-value-quantity": f"{LOINC}|8480-6$gt140"}, {"high"}),
        ({"component-code-value-quantity": "8480-6$gt100"}, {"high", "normal"}),
        ({"component-code-value-quantity": "8462-4$lt80"}, {"normal"}),
        ({"component-code-value-quantity": "8462-4$gt140"}, set()),  # the pair must be one component
        ({"component-code-value-quantity": f"8480-6$150|{UCUM}|mm[Hg]"}, {"high"}),
        ({"code-value-quantity": f"{hr}$130"}, {"hr130"}),
        ({"code-value-quantity": f"{hr}$gt130"}, set()),
        ({"combo-code-value-quantity": "8480-6$ge150"}, {"high"}),
        ({"combo-code-value-quantity": "8867-4$ge150"}, set()),
        ({"combo-code-value-quantity": "8867-4$ge100"}, {"hr130"}),
        ({"component-code-value-quantity:missing": "true"}, {"hr130"}),
    ]
    await check_table(client, "Observation", [({**dict(p), "patient": pid}, e) for p, e in cases], names)


# ------------------------------------------------------------------------------------------ reference, uri, meta


async def test_references_and_meta_parameters(client: httpx.AsyncClient) -> None:
    a = (await create(client, patient("RefA")))["id"]
    b = (await create(client, patient("RefB")))["id"]
    src = "http://example.org/fhir/source/1"
    profile = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
    tagged = observation(a) | {
        "meta": {
            "tag": [{"system": "urn:tags", "code": "red"}],
            "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
            "profile": [f"{profile}|5.0.0"],
            "source": src,
        }
    }
    names = {
        (await create(client, tagged))["id"]: "tagged",
        (await create(client, observation(b)))["id"]: "b",
    }
    logical = observation(a) | {"subject": {"identifier": {"system": "urn:mrn", "value": "X-9"}}}
    names[(await create(client, logical))["id"]] = "logical"
    cases: list[tuple[Params, set[str]]] = [
        ({"subject": f"Patient/{a}"}, {"tagged"}),
        ({"subject": a}, {"tagged"}),
        ({"subject:Patient": a}, {"tagged"}),
        ({"patient": f"{a},{b}"}, {"tagged", "b"}),
        ({"subject": f"http://testserver/fhir/r5/Patient/{b}"}, {"b"}),  # absolute URL of this server
        ({"subject:identifier": "urn:mrn|X-9"}, {"logical"}),
        ({"subject:identifier": "X-9"}, {"logical"}),
        ({"subject:identifier": "urn:other|X-9"}, set()),
        ({"subject:missing": "true"}, set()),
        ({"_tag": "urn:tags|red"}, {"tagged"}),
        ({"_tag": "red"}, {"tagged"}),
        ({"_tag": "urn:tags|blue"}, set()),
        ({"_tag:not": "red"}, {"b", "logical"}),
        ({"_security": "R"}, {"tagged"}),
        ({"_profile": profile}, {"tagged"}),
        ({"_profile": f"{profile}|5.0.0"}, {"tagged"}),
        ({"_profile": f"{profile}|4.0.1"}, set()),
        ({"_source": src}, {"tagged"}),
        ({"_source:below": "http://example.org/fhir"}, {"tagged"}),
        ({"_source:below": "http://example.org/other"}, set()),
        ({"_source:above": f"{src}/more/parts"}, {"tagged"}),
        ({"_source:above": "http://example.org/fhir"}, set()),
        ({"_source:contains": "source/"}, {"tagged"}),
        ({"_source:missing": "true"}, {"b", "logical"}),
    ]
    await check_table(client, "Observation", [({**dict(p), "code": "8867-4"}, e) for p, e in cases], names)
    assert_outcome(await client.get("/Observation", params={"patient": "Practitioner/x"}), 400)
    assert_outcome(await client.get("/Observation", params={"subject:Patient": "Group/x"}), 400)


# ------------------------------------------------------------------------------------------ chains and _has


async def _org(client: httpx.AsyncClient, name: str, **headers: str) -> str:
    r = await client.post("/Organization", json={"resourceType": "Organization", "name": name}, headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def test_chains(client: httpx.AsyncClient) -> None:
    acme = await _org(client, "Acme Clinic")
    other = await _org(client, "Other Org")
    ann = (await create(client, patient("Chainley", managingOrganization={"reference": f"Organization/{acme}"})))["id"]
    bob = (await create(client, patient("Bobson", managingOrganization={"reference": f"Organization/{other}"})))["id"]
    names = {
        (await create(client, observation(ann)))["id"]: "ann-hr",
        (await create(client, observation(ann, code="4548-4")))["id"]: "ann-a1c",
        (await create(client, observation(bob)))["id"]: "bob-hr",
    }
    cases: list[tuple[Params, set[str]]] = [
        ({"subject:Patient.name": "chainley"}, {"ann-hr", "ann-a1c"}),
        ({"patient.name": "chainley"}, {"ann-hr", "ann-a1c"}),
        ({"patient.family:exact": "Bobson"}, {"bob-hr"}),
        ({"patient.name": "nobody"}, set()),
        ({"patient.name": "chainley,bobson"}, {"ann-hr", "ann-a1c", "bob-hr"}),
        ([("patient.name", "chainley"), ("code", "4548-4")], {"ann-a1c"}),
        ({"patient.organization.name": "acme"}, {"ann-hr", "ann-a1c"}),  # two links
        ({"subject:Patient.organization:Organization.name": "other"}, {"bob-hr"}),
        ({"patient.organization._id": other}, {"bob-hr"}),
        ({"patient._id": ann}, {"ann-hr", "ann-a1c"}),
        ({"patient.gender:not": "female"}, set()),
        ({"patient.birthdate": "1970"}, {"ann-hr", "ann-a1c", "bob-hr"}),
    ]
    by_name = {v: k for k, v in names.items()}
    both = f"{by_name['ann-hr']},{by_name['bob-hr']}"
    cases += [  # _id leads: the chain is checked row by row (probe forms)
        ([("_id", both), ("patient.name", "chainley")], {"ann-hr"}),
        ([("_id", both), ("patient.name", "nobody")], set()),
        ([("_id", both), ("patient.organization.name", "other")], {"bob-hr"}),
        ([("_id", both), ("patient._id", bob)], {"bob-hr"}),
        ([("_id", both), ("patient.gender:not", "male")], {"ann-hr", "bob-hr"}),
    ]
    await check_table(client, "Observation", cases, names)
    deep = {"patient.organization.partof.partof.name": "x"}
    assert_outcome(await client.get("/Observation", params=deep), 400)
    lenient = await find(client, "Observation", {"patient.shoe-size": "42"})
    assert len(ids(lenient)) == 3 and any("patient.shoe-size" in d for d in outcomes(lenient))
    strict = await client.get("/Observation", params={"patient.shoe-size": "42"}, headers={"Prefer": "handling=strict"})
    assert_outcome(strict, 400, "not-supported")


async def test_reverse_chains(client: httpx.AsyncClient) -> None:
    names = {}
    for name in ("has-a1c", "has-hr", "has-none"):
        names[(await create(client, patient(name)))["id"]] = name
    by_name = {v: k for k, v in names.items()}
    await create(client, observation(by_name["has-a1c"], code="4548-4", category="laboratory"))
    enc = {"resourceType": "Encounter", "status": "completed", "subject": {"reference": f"Patient/{by_name['has-hr']}"}}
    enc_id = (await create(client, enc))["id"]
    await create(client, observation(by_name["has-hr"], encounter={"reference": f"Encounter/{enc_id}"}))
    cases: list[tuple[Params, set[str]]] = [
        ({"_has:Observation:patient:code": "4548-4"}, {"has-a1c"}),
        ({"_has:Observation:subject:code": "8867-4,4548-4"}, {"has-a1c", "has-hr"}),
        ({"_has:Observation:patient:code": "1111-1"}, set()),
        ({"_has:Observation:patient:category": "laboratory"}, {"has-a1c"}),
        ({"_has:Encounter:patient:status": "completed"}, {"has-hr"}),
        ({"_has:Encounter:patient:_has:Observation:encounter:code": "8867-4"}, {"has-hr"}),  # nested
        ({"_has:Observation:patient:patient.name": "has-a1c"}, {"has-a1c"}),  # _has then a chain
        ([("_has:Observation:patient:code", "4548-4"), ("name", "has-hr")], set()),
        ([("_has:Observation:patient:code", "4548-4"), ("name", "has-a1c")], {"has-a1c"}),
        ([("_id", ",".join(names)), ("_has:Encounter:patient:_has:Observation:encounter:code", "8867-4")], {"has-hr"}),
        ([("_id", ",".join(names)), ("_has:Observation:patient:code:not", "8867-4")], {"has-a1c"}),
        ([("_id", ",".join(names)), ("_has:Observation:patient:_id", "nope")], set()),
    ]
    await check_table(client, "Patient", cases, names)
    assert_outcome(await client.get("/Patient", params={"_has:Observation:patient": "x"}), 400)
    assert_outcome(await client.get("/Patient", params={"_has:Observation:encounter:code": "x"}), 400)  # not a Patient
    deep = "_has:Observation:patient:_has:Observation:patient:_has:Observation:patient:_has:Observation:patient:code"
    assert_outcome(await client.get("/Patient", params={deep: "x"}), 400)


# ------------------------------------------------------------------------------------------ includes


async def test_include_revinclude_and_iterate(client: httpx.AsyncClient) -> None:
    org = await _org(client, "Incl Org")
    doc = {"resourceType": "Practitioner", "name": [{"family": "Doc"}]}
    doc_id = (await create(client, doc))["id"]
    pid = (await create(client, patient("Incl", managingOrganization={"reference": f"Organization/{org}"})))["id"]
    enc = {"resourceType": "Encounter", "status": "completed", "subject": {"reference": f"Patient/{pid}"}}
    enc_ids = [(await create(client, enc))["id"] for _ in range(2)]
    obs_ids = []
    for enc_id in enc_ids:
        for _ in range(2):
            o = observation(pid, encounter={"reference": f"Encounter/{enc_id}"})
            o["performer"] = [{"reference": f"Practitioner/{doc_id}"}]
            obs_ids.append((await create(client, o))["id"])

    b = await find(client, "Observation", {"_id": obs_ids[0], "_include": "Observation:patient"})
    assert ids(b) == [obs_ids[0]] and ids(b, "include") == [pid]
    b = await find(client, "Observation", {"_id": obs_ids[0], "_include": "Observation:subject:Patient"})
    assert ids(b, "include") == [pid]
    b = await find(client, "Observation", {"_id": obs_ids[0], "_include": "Observation:subject:Group"})
    assert ids(b, "include") == []
    b = await find(client, "Observation", {"_id": obs_ids[0], "_include": "*"})
    assert set(ids(b, "include")) == {pid, enc_ids[0], doc_id}
    b = await find(client, "Observation", [("patient", pid), ("_include", "Observation:patient")])
    assert sorted(ids(b)) == sorted(obs_ids) and ids(b, "include") == [pid], "included once"
    assert b["total"] == 4, "totals count matches only"
    # without :iterate, an include does not follow the included Patient
    b = await find(
        client,
        "Observation",
        [("_id", obs_ids[0]), ("_include", "Observation:patient"), ("_include", "Patient:organization")],
    )
    assert set(ids(b, "include")) == {pid}
    b = await find(
        client,
        "Observation",
        [("_id", obs_ids[0]), ("_include", "Observation:patient"), ("_include:iterate", "Patient:organization")],
    )
    assert set(ids(b, "include")) == {pid, org}
    b = await find(client, "Encounter", {"_id": enc_ids[0], "_revinclude": "Observation:encounter"})
    assert ids(b) == [enc_ids[0]] and sorted(ids(b, "include")) == sorted(obs_ids[:2])
    b = await find(
        client,
        "Encounter",
        [("patient", pid), ("_revinclude", "Observation:encounter"), ("_include:iterate", "Observation:performer")],
    )
    assert sorted(ids(b, "include")) == sorted([*obs_ids, doc_id])
    b = await find(client, "Patient", [("_id", pid), ("_revinclude:iterate", "Observation:patient")])
    assert sorted(ids(b, "include")) == sorted(obs_ids)
    b = await find(client, "Patient", [("_id", pid), ("_revinclude", "Encounter:patient"), ("_summary", "count")])
    assert b["total"] == 1 and b["entry"] == []
    lenient = await find(client, "Observation", {"_id": obs_ids[0], "_include": "Observation:nope"})
    assert ids(lenient, "include") == [] and outcomes(lenient)
    strict = {"Prefer": "handling=strict"}
    assert_outcome(await client.get("/Observation", params={"_include": "Observation:nope"}, headers=strict), 400)
    assert_outcome(await client.get("/Observation", params={"_include": "Observation"}), 400)
    assert_outcome(await client.get("/Observation", params={"_include": "Observation:encounter:Patient"}), 400)


# ------------------------------------------------------------------------------------------ sort and paging


async def _pages(client: httpx.AsyncClient, url: str, limit: int = 50) -> tuple[list[str], int]:
    seen: list[str] = []
    pages = 0
    next_url: str | None = url
    while next_url and pages < limit:
        r = await client.get(next_url)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += ids(body)
        next_url = next_link(body)
        pages += 1
    return seen, pages


async def test_multi_key_sort_with_paging(client: httpx.AsyncClient, facility: str) -> None:
    people = [
        ("Able", "1980-01-01", "female"),
        ("Able", "1990-05-05", "male"),
        ("Baker", "1970", "female"),
        ("Baker", "1970-06-01", "male"),
        ("Cole", None, "female"),
        ("Able", "1985-03-03", None),
        ("Dunn", "2000-12-31", "male"),
    ]
    rows = []
    for family, birth, gender in people:
        body = patient(family)
        body.pop("birthDate")
        body.pop("gender")
        if birth:
            body["birthDate"] = birth
        if gender:
            body["gender"] = gender
        body["identifier"] = [{"system": "urn:sort", "value": "s"}]
        low = (birth + "-01-01")[:10] if birth else None  # a partial date sorts by its first day
        rows.append(((await create(client, body))["id"], family, low, gender))

    def expected(key: Any) -> list[str]:
        return [r[0] for r in sorted(rows, key=key)]

    far = "9999"
    cases = {
        "family,-birthdate": expected(lambda r: (r[1], _neg(r[2] or "0000"), r[0])),
        "-family,birthdate": list(reversed(expected(lambda r: (r[1], _neg(r[2] or far), r[0])))),
        "birthdate": expected(lambda r: (r[2] is None, r[2] or "", r[0])),
        "-birthdate,_id": expected(lambda r: (r[2] is None, _neg(r[2] or ""), r[0])),
        "gender,family": expected(lambda r: (r[3] is None, r[3] or "", r[1], r[0])),
        "_id": sorted(r[0] for r in rows),
        "-_id": sorted((r[0] for r in rows), reverse=True),
    }
    for sort, want in cases.items():
        got, pages = await _pages(client, f"/Patient?identifier=urn:sort|s&_sort={sort}&_count=2")
        assert got == want, f"_sort={sort}"
        assert pages == 4
    b = await find(client, "Patient", {"identifier": "urn:sort|s", "_sort": "-_lastUpdated", "_count": "3"})
    assert ids(b) == [r[0] for r in rows][::-1][:3]
    # the cursor holds every sort value and is bound to the facility and the query
    first = await find(client, "Patient", {"identifier": "urn:sort|s", "_sort": "family,-birthdate", "_count": "2"})
    url = next_link(first)
    assert url
    assert_outcome(await client.get(url, headers={"X-Facility-Id": facility + "-other"}), 400)
    assert_outcome(await client.get(url.replace("_sort=family", "_sort=gender")), 400)
    token = url.split("_page=")[1]
    assert_outcome(await client.get(url.replace(token, token[:-3] + "AAA")), 400)
    assert_outcome(await client.get("/Patient", params={"_sort": "shoe-size"}), 400)
    assert_outcome(await client.get("/Patient", params={"_sort": "organization"}), 400)  # references do not sort


def _neg(date: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in date)


async def test_sort_by_token_quantity_and_date_of_observations(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    made = []
    for i, (status, value) in enumerate([("final", 80), ("amended", 60), ("final", 70), ("preliminary", 90)]):
        obs = observation(pid, when=f"2024-01-0{i + 1}T00:00:00Z", value=value, status=status)
        made.append((await create(client, obs))["id"])
    b = await find(client, "Observation", {"patient": pid, "_sort": "value-quantity"})
    assert ids(b) == [made[1], made[2], made[0], made[3]]
    b = await find(client, "Observation", {"patient": pid, "_sort": "-value-quantity", "_count": "1"})
    assert ids(b) == [made[3]]
    got, _ = await _pages(client, f"/Observation?patient={pid}&_sort=status,-date&_count=1")
    assert got == [made[1], made[2], made[0], made[3]]


# ------------------------------------------------------------------------------------------ result parameters


async def test_elements_and_summary(client: httpx.AsyncClient) -> None:
    body = patient("Elem", text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'})
    body["contact"] = [{"name": {"family": "Kin"}}]
    pid = (await create(client, body))["id"]
    oid = (await create(client, observation(pid, value=72.50)))["id"]

    def subsetted(resource: dict[str, Any]) -> bool:
        return any(t.get("code") == "SUBSETTED" for t in resource.get("meta", {}).get("tag", []))

    b = await find(client, "Patient", {"_id": pid, "_elements": "name,gender"})
    res = b["entry"][0]["resource"]
    assert set(res) == {"resourceType", "id", "meta", "name", "gender"} and subsetted(res)
    b = await find(client, "Observation", {"_id": oid, "_elements": "value"})
    res = b["entry"][0]["resource"]
    assert set(res) == {"resourceType", "id", "meta", "status", "code", "valueQuantity"}  # + mandatory
    assert b["entry"][0]["resource"]["valueQuantity"]["value"] == 72.5
    raw = (await client.get("/Observation", params={"_id": oid, "_elements": "value"})).content
    assert b'"value":72.5' in raw or b'"value":72.50' in raw
    b = await find(client, "Patient", {"_id": pid, "_elements": "name,shoeSize"})
    assert set(b["entry"][0]["resource"]) == {"resourceType", "id", "meta", "name"} and outcomes(b)
    strict = {"Prefer": "handling=strict"}
    assert_outcome(await client.get("/Patient", params={"_elements": "name,shoeSize"}, headers=strict), 400)
    b = await find(client, "Patient", {"_id": pid, "_summary": "true"})
    res = b["entry"][0]["resource"]
    assert "name" in res and "text" not in res and "contact" not in res and subsetted(res)
    b = await find(client, "Patient", {"_id": pid, "_summary": "data"})
    res = b["entry"][0]["resource"]
    assert "text" not in res and "contact" in res and subsetted(res)
    b = await find(client, "Patient", {"_id": pid, "_summary": "text"})
    assert set(b["entry"][0]["resource"]) == {"resourceType", "id", "meta", "text"}
    b = await find(client, "Patient", {"_id": pid, "_summary": "false"})
    assert "contact" in b["entry"][0]["resource"] and not subsetted(b["entry"][0]["resource"])
    b = await find(client, "Observation", {"_id": oid, "_elements": "status", "_include": "Observation:patient"})
    included = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "include"]
    assert included and "contact" in included[0], "_elements does not apply to included resources"
    assert_outcome(await client.get("/Patient", params={"_summary": "maybe"}), 400)


async def test_totals_and_count(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    for _ in range(3):
        await create(client, observation(pid))
    assert "total" not in await find(client, "Observation", {"patient": pid, "_count": "2", "_total": "none"})
    assert (await find(client, "Observation", {"patient": pid, "_count": "2", "_total": "accurate"}))["total"] == 3
    assert (await find(client, "Observation", {"patient": pid, "_count": "2", "_total": "estimate"}))["total"] == 3
    assert "total" not in await find(client, "Observation", {"patient": pid, "_count": "2"})
    assert (await find(client, "Observation", {"patient": pid}))["total"] == 3  # free: one page
    b = await find(client, "Observation", {"patient": pid, "_count": "0"})
    assert b["total"] == 3 and b["entry"] == []


@pytest.mark.parametrize(
    "resource_type, params",
    [
        ("Observation", {"date": "2024-13"}),
        ("Observation", {"date": "20240101"}),
        ("Observation", {"date": "xx2024"}),
        ("Observation", {"date": "gt"}),
        ("Observation", {"date": "2024-02-30"}),
        ("Observation", {"date": "2024-01-01T10:00:00+25:00"}),
        ("Observation", {"value-quantity": "zz5"}),
        ("Observation", {"value-quantity": "gt"}),
        ("Observation", {"value-quantity": "5|x"}),
        ("Observation", {"value-quantity": "NaN"}),
        ("Observation", {"value-quantity": "1e999999999"}),
        ("Observation", {"code-value-quantity": "8480-6"}),
        ("Observation", {"code-value-quantity": "8480-6$gt1,8462-4$gt1"}),  # multipleOr false
        ("Observation", {"code": ""}),
        ("Observation", {"code": "a|b|c"}),
        ("Observation", {"code:missing": "maybe"}),
        ("Observation", {"subject": "Patient/"}),
        ("Observation", {"subject": "not an id"}),
        ("Patient", {"identifier:of-type": "a|b"}),
        ("Patient", {"_count": "-1"}),
        ("Patient", {"_count": "abc"}),
        ("Patient", {"_count": "100001"}),
        ("Patient", {"_total": "maybe"}),
        ("Patient", {"_sort": "nope"}),
        ("Patient", {"_sort": "-"}),
        ("Patient", {"_elements": ","}),
        ("Patient", {"_has:Observation": "x"}),
        ("Patient", {"_include": "a:b:c:d"}),
        ("Patient", {"_page": "garbage"}),
    ],
)
async def test_malformed_values_are_400(client: httpx.AsyncClient, resource_type: str, params: dict[str, str]) -> None:
    assert_outcome(await client.get(f"/{resource_type}", params=params), 400)
    r = await client.post(
        f"/{resource_type}/_search", data=params, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_outcome(r, 400)


async def test_unknown_and_unsupported_lenient_or_strict(client: httpx.AsyncClient) -> None:
    await create(client, patient())
    strict = {"Prefer": "handling=strict"}
    for params in (
        {"shoe-size": "42"},
        {"name:in": "x"},  # a modifier the spec has for another type
        {"gender:in": "http://x/vs"},  # terminology modifiers are not supported
        {"_text:exact": "x"},  # _text and _content themselves: tests/test_search_text.py
        {"_filter": "name eq x"},
        {"_count:x": "1"},
    ):
        b = await find(client, "Patient", params)
        assert len(ids(b)) == 1 and outcomes(b), params
        assert_outcome(await client.get("/Patient", params=params, headers=strict), 400, "not-supported")


# ------------------------------------------------------------------------------------------ isolation


async def test_no_side_path_crosses_facilities(client: httpx.AsyncClient, facility: str, other_facility: str) -> None:
    """The same ids and matching data in another facility never appear, match or count — through
    _id, chains, _has, _include, _revinclude, _total, _summary=count or a paging cursor."""
    there = {"X-Facility-Id": other_facility}
    shared = "shared-patient-1"
    mine = patient("Here", id=shared)
    assert (await client.put(f"/Patient/{shared}", json=mine)).status_code == 201
    theirs = patient("Elsewhere", id=shared, gender="male")
    assert (await client.put(f"/Patient/{shared}", json=theirs, headers=there)).status_code == 201
    my_obs = (await create(client, observation(shared)))["id"]
    # the other facility: observations about "its" Patient/shared-patient-1, an encounter, an org
    for _ in range(3):
        r = await client.post("/Observation", json=observation(shared, code="4548-4"), headers=there)
        assert r.status_code == 201
    only_there = (await client.post("/Patient", json=patient("OnlyThere"), headers=there)).json()["id"]
    dangling = (await create(client, observation(only_there)))["id"]  # refers to an id that exists only there
    org_there = await _org(client, "Org There", **there)
    linked = (await create(client, patient("Linked", managingOrganization={"reference": f"Organization/{org_there}"})))[
        "id"
    ]

    assert await found(client, "Patient", {"_id": f"{shared},{only_there},{org_there}"}) == {shared}
    b = await find(client, "Patient", {"_id": shared})
    assert b["entry"][0]["resource"]["name"][0]["family"] == "Here"
    # chains: the other facility's Patient with that name/gender is not "my" observation's subject
    assert await found(client, "Observation", {"patient.name": "elsewhere"}) == set()
    assert await found(client, "Observation", {"patient.gender": "male"}) == set()
    assert await found(client, "Observation", {"patient.name": "onlythere"}) == set()
    assert await found(client, "Observation", {"patient.name": "here"}) == {my_obs}
    assert await found(client, "Patient", {"organization.name": "org there"}) == set()
    # _has: their observations with code 4548-4 refer to Patient/shared-patient-1, not mine
    assert await found(client, "Patient", {"_has:Observation:patient:code": "4548-4"}) == set()
    assert await found(client, "Patient", {"_has:Observation:patient:code": "8867-4"}) == {shared}
    # _include: a reference resolves only inside this facility
    b = await find(client, "Observation", {"_id": dangling, "_include": "Observation:patient"})
    assert ids(b) == [dangling] and ids(b, "include") == []
    b = await find(client, "Patient", {"_id": linked, "_include": "Patient:organization"})
    assert ids(b, "include") == []
    b = await find(client, "Observation", {"_id": my_obs, "_include": "Observation:patient"})
    included = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "include"]
    assert [r["name"][0]["family"] for r in included] == ["Here"]
    # _revinclude: their observations refer to the same id but are not included
    b = await find(client, "Patient", {"_id": shared, "_revinclude": "Observation:patient"})
    assert ids(b, "include") == [my_obs]
    # counts
    assert (await find(client, "Observation", {"code": "4548-4", "_total": "accurate"}))["total"] == 0
    assert (await find(client, "Observation", {"patient": shared, "_summary": "count"}))["total"] == 1
    assert (await find(client, "Patient", {"_summary": "count"}))["total"] == 2
    assert (await find(client, "Observation", {"patient": shared, "_summary": "count"}, headers=there))["total"] == 3
    # a cursor from there is not valid here, and pages there never show rows from here
    page = await find(client, "Observation", {"patient": shared, "_count": "1", "_sort": "-date"}, headers=there)
    url = next_link(page)
    assert url
    assert_outcome(await client.get(url), 400)
    there_ids, _ = await _pages(client, f"/Observation?patient={shared}&_count=1&_sort=-date")
    assert there_ids == [my_obs]


async def test_includes_and_chains_respect_the_callers_grants(
    app: Any, client: httpx.AsyncClient, facility: str
) -> None:
    from tests.conftest import token_for

    settings = app.state.backends.settings
    me = (await create(client, patient("Me")))["id"]
    other = (await create(client, patient("Other")))["id"]
    enc = {"resourceType": "Encounter", "status": "completed", "subject": {"reference": f"Patient/{me}"}}
    enc_id = (await create(client, enc))["id"]
    mine = (await create(client, observation(me, encounter={"reference": f"Encounter/{enc_id}"})))["id"]
    theirs = (await create(client, observation(other, encounter={"reference": f"Encounter/{enc_id}"})))["id"]

    def as_token(token: str) -> httpx.AsyncClient:
        headers = {"X-Facility-Id": facility, "Authorization": f"Bearer {token}"}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver/fhir/r5", headers=headers
        )

    # Observations only: included Patients are left out silently; a chain into Patient is 403
    obs_only = token_for(settings, [facility], roles=["clinician"], scopes=["user/Observation.rs"])
    async with as_token(obs_only) as c:
        b = await find(c, "Observation", {"_id": mine, "_include": "Observation:patient"})
        assert ids(b) == [mine] and ids(b, "include") == []
        assert_outcome(await c.get("/Observation", params={"patient.name": "me"}), 403, "forbidden")
    # patient-scoped: revinclude shows only the launch patient's observations, _has sees only them
    scoped = token_for(
        settings,
        [facility],
        roles=["clinician"],
        patient=me,
        scopes=["patient/Encounter.rs", "patient/Observation.rs", "patient/Patient.rs"],
    )
    async with as_token(scoped) as c:
        b = await find(c, "Encounter", {"_id": enc_id, "_revinclude": "Observation:encounter"})
        assert ids(b) == [enc_id] and ids(b, "include") == [mine]
        assert await found(c, "Encounter", {"_has:Observation:encounter:patient": other}) == set()
        assert await found(c, "Encounter", {"_has:Observation:encounter:patient": me}) == {enc_id}
        assert await found(c, "Observation", {"patient.name": "other"}) == set()
        b = await find(c, "Observation", {"encounter": enc_id, "_include": "Observation:patient"})
        assert ids(b) == [mine] and ids(b, "include") == [me]
    assert await found(client, "Encounter", {"_has:Observation:encounter:patient": other}) == {enc_id}
    assert theirs


# ------------------------------------------------------------------------------------------ index maintenance


async def test_index_follows_updates_and_deletes(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient("Before", address=[{"city": "Oldtown"}])))["id"]
    assert await found(client, "Patient", {"address-city": "oldtown"}) == {pid}
    changed = patient("After", id=pid)
    assert (await client.put(f"/Patient/{pid}", json=changed)).status_code == 200
    assert await found(client, "Patient", {"address-city": "oldtown"}) == set()
    assert await found(client, "Patient", {"address-city:missing": "true"}) == {pid}
    assert await found(client, "Patient", {"family": "after"}) == {pid}
    assert await found(client, "Patient", {"family": "before"}) == set()
    oid = (await create(client, observation(pid, value=99)))["id"]
    assert await found(client, "Observation", {"value-quantity": "99"}) == {oid}
    assert (await client.delete(f"/Observation/{oid}")).status_code in (200, 204)
    assert await found(client, "Observation", {"value-quantity": "99"}) == set()
    assert await found(client, "Observation", {"value-quantity:missing": "true"}) == set()
    assert await found(client, "Patient", {"_has:Observation:patient:value-quantity": "99"}) == set()


async def test_capability_statement_lists_the_registry_parameters(client: httpx.AsyncClient) -> None:
    from subgraphs.store.search import supported_params

    cs = (await client.get("/metadata")).json()
    by_type = {r["type"]: r for r in cs["rest"][0]["resource"]}
    obs = {p["name"]: p["type"] for p in by_type["Observation"]["searchParam"]}
    assert obs["code-value-quantity"] == "composite" and obs["value-quantity"] == "quantity"
    assert obs["_profile"] == "reference" and obs["_source"] == "uri" and obs["_lastUpdated"] == "date"
    assert {"_filter", "_has", "_in"}.isdisjoint(obs)
    assert obs["_text"] == obs["_content"] == "special"
    assert "near" not in {p["name"] for p in by_type["Location"]["searchParam"]}
    for resource_type, resource in by_type.items():
        assert [p["name"] for p in resource["searchParam"]] == [p.code for p in supported_params(resource_type)]
    assert "Observation:patient" in by_type["Observation"]["searchInclude"]
    assert "Observation:encounter" in by_type["Encounter"]["searchRevInclude"]
    assert by_type["Patient"]["operation"][0]["name"] == "everything"


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # about PostgreSQL only
async def test_new_index_tables_are_under_row_level_security(
    client: httpx.AsyncClient, facility: str, postgres_runtime_url: str, postgres_url: str
) -> None:
    import asyncpg

    pid = (await create(client, patient()))["id"]
    await create(client, observation(pid))
    tables = ["idx_quantity", "idx_number", "idx_uri", "idx_composite"]
    owner = await asyncpg.connect(libpq_dsn(postgres_url))
    try:
        forced = await owner.fetch(
            "SELECT relname FROM pg_class WHERE relrowsecurity AND relforcerowsecurity AND relname = ANY($1)", tables
        )
        assert sorted(r["relname"] for r in forced) == sorted(tables)
    finally:
        await owner.close()
    conn = await asyncpg.connect(libpq_dsn(postgres_runtime_url))
    try:
        for table in tables:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, f"{table} leaks without a facility"
        async with conn.transaction():
            await conn.execute("SELECT set_config('unihealth.facility', $1, true)", facility)
            assert await conn.fetchval("SELECT count(*) FROM idx_quantity") > 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    "INSERT INTO idx_uri (facility, type, id, param, value) VALUES ($1, 'Patient', 'x', 'p', 'u')",
                    facility + "-other",
                )
    finally:
        await conn.close()
