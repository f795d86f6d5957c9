"""De-identification: the pure transform, and the analyst topic fed by the worker through real Kafka."""

from __future__ import annotations

import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette

from streams.deidentify import (
    TOPIC_PREFIX,
    date_shift_days,
    deidentify,
    derive_key,
    pseudonym,
    shift_date_text,
    topic,
)
from streams.worker import CHANGE_TOPICS
from subgraphs.store.database import Database
from subgraphs.store.validation import SUPPORTED_TYPES
from tests.conftest import SECRET
from tests.helpers import observation
from tests.test_streams_worker import (
    StreamProcess,
    app_database_url,
    drain_to_kafka,
    eventually,
    group_at_end,
    read_topics,
    stream_env,
)

pytest_plugins = ["tests.streams_services"]

KEY = derive_key(b"k" * 48)


def rich_patient(tag: str) -> dict[str, Any]:
    """A Patient with every kind of identifying data, all strings unique to ``tag``."""
    return {
        "resourceType": "Patient",
        "text": {"status": "generated", "div": f"<div xmlns='http://www.w3.org/1999/xhtml'>Zed{tag} Quill</div>"},
        "identifier": [{"system": "https://unihealth.dev/fhir/sid/national-id", "value": f"NID-{tag}"}],
        "name": [{"family": f"Quill{tag}", "given": [f"Zed{tag}"]}],
        "telecom": [{"system": "phone", "value": f"+41-79-{tag}"}, {"system": "email", "value": f"zed{tag}@x.org"}],
        "address": [{"line": [f"{tag} Rue du Test"], "city": f"Town{tag}", "postalCode": f"P{tag}"}],
        "gender": "female",
        "birthDate": "1970-03-15",
        "contact": [{"name": {"family": f"Kin{tag}"}, "telecom": [{"system": "phone", "value": f"kin-{tag}"}]}],
        "maritalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]
        },
    }


def phi_of(resource: dict[str, Any]) -> list[str]:
    """The identifying strings of a resource made by :func:`rich_patient`."""
    return [
        resource["identifier"][0]["value"],
        resource["name"][0]["family"],
        resource["name"][0]["given"][0],
        resource["telecom"][0]["value"],
        resource["telecom"][1]["value"],
        resource["address"][0]["line"][0],
        resource["address"][0]["city"],
        resource["address"][0]["postalCode"],
        resource["contact"][0]["name"]["family"],
    ]


# ------------------------------------------------------------------------------------------ pure transform
def test_deidentify_removes_identifiers_and_keeps_codes_and_values() -> None:
    src = rich_patient("77") | {
        "id": "p-77",
        "meta": {"versionId": "2", "lastUpdated": "2024-05-01T10:20:30.123Z", "source": "https://ehr.example/xyz"},
    }
    out = deidentify(src, key=KEY, facility="fac-1", subject="p-77")
    text = orjson.dumps(out).decode()
    for secret in [*phi_of(src), "p-77", "ehr.example"]:
        assert secret not in text, secret
    assert out["id"] == pseudonym(KEY, "fac-1", "Patient", "p-77")
    assert out["gender"] == "female" and out["maritalStatus"] == src["maritalStatus"], "codes are kept"
    assert "text" not in out and "contact" not in out
    days = date_shift_days(KEY, "fac-1", "p-77")
    assert 1 <= abs(days) <= 365
    assert date.fromisoformat(out["birthDate"]) - date(1970, 3, 15) == timedelta(days=days)
    assert out["meta"]["lastUpdated"].endswith("T10:20:30.123Z") and out["meta"]["versionId"] == "2"


def test_dates_shift_keeping_time_and_zone_form() -> None:
    assert shift_date_text("2024-01-31T23:59:59.5+02:00", 1, partial=False) == "2024-02-01T23:59:59.5+02:00"
    assert shift_date_text("2024-03-01T08:00:00", -1, partial=False) == "2024-02-29T08:00:00"
    assert shift_date_text("2024-03-01", -366, partial=False) == "2023-03-01"
    assert shift_date_text("1970", 200, partial=True) == "1970" and shift_date_text("1970", -1, partial=True) == "1969"
    assert shift_date_text("1970-05", 40, partial=True) == "1970-06"
    assert shift_date_text("1970", 200, partial=False) is None, "a bare year is a date only where the element is one"
    assert shift_date_text("8867-4", 3, partial=True) is None


def test_observation_references_codes_values_and_free_text() -> None:
    obs = observation("p-1", when="2024-06-01T10:00:00+01:00", value=72.5) | {
        "id": "o-1",
        "note": [{"text": "patient Zed said hello"}],
        "performer": [{"reference": "Practitioner/dr-1", "display": "Dr. Who"}],
        "extension": [{"url": "http://x/ext", "valueString": "secret ext"}],
        "contained": [{"resourceType": "Practitioner", "id": "c1", "name": [{"family": "Hidden"}]}],
        "basedOn": [{"reference": "https://other.example/fhir/ServiceRequest/9"}],
    }
    out = deidentify(obs, key=KEY, facility="fac-1", subject="p-1")
    text = orjson.dumps(out).decode()
    for secret in ("Zed", "Dr. Who", "secret ext", "Hidden", "dr-1", "other.example", "p-1", "o-1"):
        assert secret not in text, secret
    assert out["subject"] == {"reference": f"Patient/{pseudonym(KEY, 'fac-1', 'Patient', 'p-1')}"}
    assert out["performer"] == [{"reference": f"Practitioner/{pseudonym(KEY, 'fac-1', 'Practitioner', 'dr-1')}"}]
    assert out["basedOn"][0]["reference"].startswith("urn:unihealth:pseudonym:")
    assert out["code"] == obs["code"] and out["valueQuantity"] == obs["valueQuantity"] and out["status"] == "final"
    assert out["contained"] == [{"resourceType": "Practitioner", "id": "c1"}]
    assert out["effectiveDateTime"].endswith("T10:00:00+01:00")
    assert pseudonym(KEY, "fac-2", "Patient", "p-1") != pseudonym(KEY, "fac-1", "Patient", "p-1")
    assert date_shift_days(KEY, "fac-1", "p-1") == date_shift_days(KEY, "fac-1", "p-1"), "stable"
    assert len({date_shift_days(KEY, "fac-1", f"p{i}") for i in range(50)}) > 10, "spread across patients"
    assert topic("Observation") == TOPIC_PREFIX + "Observation"


# ------------------------------------------------------------------------------------------ through Kafka
async def test_deidentified_topic_carries_no_identity_and_shifts_dates_per_patient(
    app: Starlette,
    relay_database: Database,
    client: httpx.AsyncClient,
    facility: str,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    group = f"deid-{uuid.uuid4().hex[:8]}"
    await drain_to_kafka(relay_database, kafka_bootstrap)
    await group_at_end(kafka_bootstrap, group, list(CHANGE_TOPICS))
    worker = StreamProcess(
        "worker",
        ["worker", "--group-id", group, "--agents", "deidentify", "--session-timeout", "6"],
        stream_env(app_database_url(app), kafka_bootstrap, tmp_path),
        tmp_path,
    ).start()
    try:
        originals: dict[str, dict[str, Any]] = {}
        observations: dict[str, list[str]] = {}
        for i in range(3):
            tag = uuid.uuid4().hex[:10]
            r = await client.post("/Patient", json=rich_patient(tag))
            assert r.status_code == 201, r.text
            pid = r.json()["id"]
            originals[pid] = r.json()
            observations[pid] = []
            for day in (1, 20):
                r = await client.post("/Observation", json=observation(pid, when=f"2024-0{i + 1}-{day:02d}T08:30:00Z"))
                assert r.status_code == 201, r.text
                observations[pid].append(r.json()["effectiveDateTime"])
        await drain_to_kafka(relay_database, kafka_bootstrap)
        deid_topics = [topic(t) for t in SUPPORTED_TYPES]
        mine: list[dict[str, Any]] = []

        async def all_published() -> bool:
            mine[:] = [
                orjson.loads(r.value)
                for r in await read_topics(kafka_bootstrap, deid_topics)
                if r.key.decode().startswith(facility + "|")
            ]
            return len({m["event_id"] for m in mine}) >= 9

        await eventually(all_published, "9 de-identified changes", limit=90)
    finally:
        code = worker.stop()
    assert code == 0, worker.tail()
    raw = b"".join(orjson.dumps(m) for m in mine).decode()
    for pid, resource in originals.items():
        for secret in [*phi_of(resource), pid]:
            assert secret not in raw, f"{secret!r} reached the analyst topic"
    assert all(m["facility"] == facility for m in mine), "the facility is kept"
    patients = {m["patient"]: m for m in mine if m["resource_type"] == "Patient"}
    assert len(patients) == 3
    key = derive_key(SECRET)
    for pid, resource in originals.items():
        alias = pseudonym(key, facility, "Patient", pid)
        shifted_birth = date.fromisoformat(patients[alias]["resource"]["birthDate"])
        shift = shifted_birth - date.fromisoformat(resource["birthDate"])
        assert shift.days == date_shift_days(key, facility, pid) and shift.days != 0
        mine_obs = sorted(
            m["resource"]["effectiveDateTime"]
            for m in mine
            if m["resource_type"] == "Observation" and m["patient"] == alias
        )
        expected = sorted(str(shift_date_text(when, shift.days, partial=False)) for when in observations[pid])
        assert mine_obs == expected, "one shift per patient, time of day and zone form kept"
        assert all(
            m["resource"]["subject"]["reference"] == f"Patient/{alias}"
            for m in mine
            if m["resource_type"] == "Observation" and m["patient"] == alias
        )
