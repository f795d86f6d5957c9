"""Tests for the deterministic synthetic FHIR R5 demo-data generator (gateway.demo_data)."""

from __future__ import annotations

import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fhir.resources import get_fhir_model_class

from gateway.demo_data import (
    FACILITY_TAG_SYSTEM,
    NATIONAL_ID_SYSTEM,
    PROGRESS_EVERY,
    facility_ids,
    generate,
    mrn_system,
    write_ndjson,
)

Resource = dict[str, Any]

PATIENTS, FACILITIES, SEED = 20, 3, 1234
LOINC, SNOMED, UCUM = "http://loinc.org", "http://snomed.info/sct", "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
DATETIME_WITH_OFFSET = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")


@pytest.fixture(scope="module")
def resources() -> list[Resource]:
    return list(generate(PATIENTS, FACILITIES, SEED))


def _facility(resource: Resource) -> str:
    tags = [t for t in resource["meta"]["tag"] if t["system"] == FACILITY_TAG_SYSTEM]
    assert len(tags) == 1, resource
    code = tags[0]["code"]
    assert isinstance(code, str)
    return code


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _patient_ref(resource: Resource) -> str | None:
    holder = resource.get("subject") or resource.get("patient")
    return holder["reference"] if holder else None


def _codes(concept: Resource, system: str) -> list[str]:
    return [c["code"] for c in concept["coding"] if c["system"] == system]


def test_facility_ids() -> None:
    assert facility_ids(3) == ["fac-001", "fac-002", "fac-003"]
    assert facility_ids(0) == []
    assert len(set(facility_ids(250))) == 250


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        generate(-1, 1, 0)
    with pytest.raises(ValueError):
        generate(1, 0, 0)


def test_generate_is_lazy() -> None:
    stream = generate(100_000, 5, 1)
    assert next(stream)["resourceType"] == "Organization"  # does not build 100k patients up front


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    first, second, other = tmp_path / "a.ndjson", tmp_path / "b.ndjson", tmp_path / "c.ndjson"
    write_ndjson(first, PATIENTS, FACILITIES, SEED)
    write_ndjson(second, PATIENTS, FACILITIES, SEED)
    write_ndjson(other, PATIENTS, FACILITIES, SEED + 1)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other.read_bytes()


def test_write_ndjson_count_lines_and_progress(tmp_path: Path, resources: list[Resource]) -> None:
    path = tmp_path / "demo.ndjson"
    calls: list[int] = []
    count = write_ndjson(str(path), PATIENTS, FACILITIES, SEED, progress=calls.append)
    lines = path.read_bytes().splitlines()
    assert count == len(lines) == len(resources)
    assert [orjson.loads(line) for line in lines] == resources
    assert calls and sum(calls) == count and all(n > 0 for n in calls)  # increments (tqdm.update style)


def test_write_ndjson_progress_in_chunks(tmp_path: Path) -> None:
    calls: list[int] = []
    count = write_ndjson(tmp_path / "big.ndjson", 700, 2, 5, progress=calls.append)
    assert count > 2 * PROGRESS_EVERY and sum(calls) == count
    assert calls[:-1] == [PROGRESS_EVERY] * (len(calls) - 1) and 0 < calls[-1] <= PROGRESS_EVERY


def test_smaller_run_is_a_prefix_of_a_larger_one() -> None:
    small = list(generate(5, FACILITIES, SEED))
    large = generate(50, FACILITIES, SEED)
    assert [next(large) for _ in small] == small


def test_every_resource_validates(resources: list[Resource]) -> None:
    for resource in resources:
        model = get_fhir_model_class(resource["resourceType"])
        model.model_validate(resource)


def test_ids_are_unique_uuids(resources: list[Resource]) -> None:
    ids = [r["id"] for r in resources]
    assert len(ids) == len(set(ids))
    for rid in ids:
        assert str(uuid.UUID(rid)) == rid and uuid.UUID(rid).version == 4


def test_references_resolve_to_earlier_resources(resources: list[Resource]) -> None:
    seen: set[str] = set()
    total = 0
    for resource in resources:
        for ref in _references(resource):
            assert ref in seen, f"{resource['resourceType']}/{resource['id']} -> unresolved {ref}"
            total += 1
        seen.add(f"{resource['resourceType']}/{resource['id']}")
    assert total > len(resources)


def test_facility_tags(resources: list[Resource]) -> None:
    by_ref = {f"{r['resourceType']}/{r['id']}": r for r in resources}
    orgs = [r for r in resources if r["resourceType"] == "Organization"]
    assert [r["resourceType"] for r in resources[: len(orgs)]] == ["Organization"] * FACILITIES
    assert [_facility(o) for o in orgs] == facility_ids(FACILITIES)
    assert [o["identifier"][0]["value"] for o in orgs] == facility_ids(FACILITIES)

    patients = [r for r in resources if r["resourceType"] == "Patient"]
    assert len(patients) == PATIENTS
    assert [_facility(p) for p in patients] == [facility_ids(FACILITIES)[i % FACILITIES] for i in range(PATIENTS)]
    facility_of_patient = {f"Patient/{p['id']}": _facility(p) for p in patients}
    for resource in resources:
        facility = _facility(resource)
        patient = f"Patient/{resource['id']}" if resource["resourceType"] == "Patient" else _patient_ref(resource)
        if resource["resourceType"] not in ("Organization", "Practitioner"):
            assert patient is not None and facility_of_patient[patient] == facility
        for ref in _references(resource):  # everything referenced lives in the same facility
            assert _facility(by_ref[ref]) == facility


def test_patient_identifiers(resources: list[Resource]) -> None:
    national: list[str] = []
    mrns: dict[str, list[str]] = defaultdict(list)
    for patient in (r for r in resources if r["resourceType"] == "Patient"):
        systems = {i["system"]: i["value"] for i in patient["identifier"]}
        national.append(systems[NATIONAL_ID_SYSTEM])
        facility = _facility(patient)
        mrns[facility].append(systems[mrn_system(facility)])
        assert patient["name"][0]["family"] and patient["name"][0]["given"]
        assert patient["gender"] in ("male", "female", "other", "unknown")
        assert patient["birthDate"] < "2026-01-01"
        assert patient["address"] and patient["telecom"]
        assert patient["managingOrganization"]["reference"].startswith("Organization/")
    assert len(national) == len(set(national)) == PATIENTS
    assert all(len(v) == len(set(v)) for v in mrns.values())


def test_clinical_content(resources: list[Resource]) -> None:
    larger = list(generate(150, 4, 99))
    kinds = Counter(r["resourceType"] for r in larger)
    assert set(kinds) == {"Organization", "Practitioner", "Patient", "Encounter", "Observation", "Condition",
                          "AllergyIntolerance", "MedicationRequest"}  # fmt: skip
    assert kinds["Organization"] == 4 and 12 <= kinds["Practitioner"] <= 24
    assert 25 <= (len(larger) - kinds["Organization"] - kinds["Practitioner"]) / 150 <= 40
    allergic = {r["patient"]["reference"] for r in larger if r["resourceType"] == "AllergyIntolerance"}
    assert 0.15 <= len(allergic) / 150 <= 0.45

    vital_codes: set[str] = set()
    for r in larger:
        kind = r["resourceType"]
        if kind == "Encounter":
            assert r["status"] == "completed" and r["class"][0]["coding"][0]["code"] in ("AMB", "IMP", "EMER")
            assert r["actualPeriod"]["start"] < r["actualPeriod"]["end"]
        elif kind == "Observation":
            category = r["category"][0]["coding"][0]["code"]
            assert category in ("vital-signs", "laboratory") and r["status"] == "final"
            assert r["encounter"]["reference"].startswith("Encounter/")
            (code,) = _codes(r["code"], LOINC)
            if category == "vital-signs":
                vital_codes.add(code)
            quantities = [c["valueQuantity"] for c in r.get("component", [])] or [r["valueQuantity"]]
            for q in quantities:
                assert q["system"] == UCUM and q["code"] and q["unit"]
            if code == "85354-9":
                assert [_codes(c["code"], LOINC)[0] for c in r["component"]] == ["8480-6", "8462-4"]
            if category == "laboratory":
                assert r["referenceRange"]
        elif kind == "Condition":
            assert _codes(r["code"], SNOMED)
            assert r["clinicalStatus"]["coding"][0]["code"] in ("active", "resolved")
            assert r["verificationStatus"]["coding"][0]["code"] == "confirmed"
        elif kind == "AllergyIntolerance":
            assert _codes(r["code"], SNOMED) and r["clinicalStatus"]["coding"][0]["code"] == "active"
            assert _codes(r["reaction"][0]["manifestation"][0]["concept"], SNOMED)
        elif kind == "MedicationRequest":
            assert _codes(r["medication"]["concept"], RXNORM)
            assert r["status"] in ("active", "completed") and r["intent"] == "order"
            assert r["requester"]["reference"].startswith("Practitioner/") and r["dosageInstruction"][0]["text"]
    assert vital_codes == {"8867-4", "8310-5", "9279-1", "29463-7", "8302-2", "2708-6", "85354-9", "39156-5"}


def test_timestamps_are_fixed_and_offset_aware(resources: list[Resource]) -> None:
    checked = 0
    for r in resources:
        stamps = [r.get("effectiveDateTime"), r.get("issued"), r.get("authoredOn"), r.get("recordedDate")]
        stamps += list(r.get("actualPeriod", {}).values())
        for stamp in filter(None, stamps):
            assert DATETIME_WITH_OFFSET.match(stamp), stamp
            assert stamp < "2026-01-01", stamp  # before the fixed anchor, independent of "now"
            checked += 1
        for day in filter(None, (r.get("onsetDateTime"), r.get("abatementDateTime"))):
            assert day < "2026-01-01"
    assert checked > len(resources)
