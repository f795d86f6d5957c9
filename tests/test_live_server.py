"""Drive a real server process: the real FHIR client ``fhirpy`` (async), and ``serve --demo``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirpy import AsyncFHIRClient

from gateway import demo_data
from gateway.cli import DEMO_FACILITIES, DEMO_SEED
from tests.conftest import token_for
from tests.live import serve


@pytest.fixture(scope="module")
def live(backend: str, settings_for: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    settings = settings_for(backend)
    env = {
        "UNIHEALTH_DATABASE_URL": settings.database_url,
        "UNIHEALTH_SECRET_KEY": settings.secret_key.decode(),
        "UNIHEALTH_DEV_JWT_KEY": settings.dev_jwt_key.decode(),
        "UNIHEALTH_MIGRATION_DATABASE_URL": settings.migration_database_url,
    }
    with serve(tmp_path_factory.mktemp("live"), env=env) as base:
        yield base, settings


async def test_fhirpy_client(live: tuple[str, Any], facility: str, other_facility: str) -> None:
    base, settings = live
    auth = "Bearer " + token_for(settings, [facility, other_facility])
    client = AsyncFHIRClient(f"{base}/fhir/r5", authorization=auth, extra_headers={"X-Facility-Id": facility})
    patient = client.resource(
        "Patient",
        name=[{"family": "Okafor", "given": ["Ada"]}],
        gender="female",
        birthDate="1980-02-03",
        identifier=[{"system": "https://unihealth.dev/fhir/sid/national-id", "value": "N-77"}],
    )
    await patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"
    obs = client.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        subject=patient.to_reference(),
        effectiveDateTime="2024-05-01T10:00:00Z",
        valueQuantity={"value": 61, "unit": "/min"},
    )
    await obs.save()
    patient["gender"] = "other"
    await patient.save()
    fetched = await client.reference("Patient", patient.id).to_resource()
    assert fetched["gender"] == "other" and fetched["meta"]["versionId"] == "2"
    found = await client.resources("Patient").search(family="okafor").fetch_all()
    assert [p.id for p in found] == [patient.id]
    by_identifier = (
        await client.resources("Patient").search(identifier="https://unihealth.dev/fhir/sid/national-id|N-77").first()
    )
    assert by_identifier is not None and by_identifier.id == patient.id
    observations = await client.resources("Observation").search(patient=patient.id).sort("-date").fetch()
    assert [o.id for o in observations] == [obs.id]
    assert await client.resources("Observation").search(patient=patient.id).count() == 1
    await obs.delete()
    assert await client.resources("Observation").search(patient=patient.id).fetch() == []
    other = AsyncFHIRClient(f"{base}/fhir/r5", authorization=auth, extra_headers={"X-Facility-Id": other_facility})
    assert await other.resources("Patient").search(family="okafor").fetch() == []


def test_serve_demo_answers_the_readme_curl(tmp_path: Path) -> None:
    """The README's run command: ``serve --demo`` loads demo data and the summary curl works."""
    first = next(r for r in demo_data.generate(1, DEMO_FACILITIES, DEMO_SEED) if r["resourceType"] == "Patient")
    facility = demo_data.facility_ids(DEMO_FACILITIES)[0]
    with serve(tmp_path, "--demo", env={"UNIHEALTH_DATABASE_URL": ""}) as base:
        token = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "token",
                "--demo",
                "--data-dir",
                str(tmp_path),
                "--facility",
                facility,
                "--role",
                "clinician",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        r = httpx.get(
            f"{base}/fhir/r5/Patient/{first['id']}/summary",
            params={"encounters": 3},
            headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
        types = {e["resource"]["resourceType"] for e in r.json()["entry"]}
        assert {"Patient", "Encounter", "Observation"} <= types
        other = demo_data.facility_ids(2)[1]
        headers = {"X-Facility-Id": other, "Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base}/fhir/r5/Patient/{first['id']}", headers=headers).status_code == 403, "fac-001 only"
        assert httpx.get(f"{base}/fhir/r5/Patient/{first['id']}").status_code == 401
