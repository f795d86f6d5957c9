"""Small builders and assertions shared by the tests."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.security.consent import FACILITY_SYSTEM

LOINC = "http://loinc.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
TREATMENT = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}


def treatment_consent(subject: str, grantee: str, decision: str = "deny", **provision: Any) -> dict[str, Any]:
    """An active R5 Consent of ``Patient/subject``: base ``decision`` with one provision (the
    opposite) for facility ``grantee``, purpose treatment, plus ``provision``'s extra elements."""
    return {
        "resourceType": "Consent",
        "status": "active",
        "decision": decision,
        "subject": {"reference": f"Patient/{subject}"},
        "provision": [
            {
                "actor": [{"reference": {"identifier": {"system": FACILITY_SYSTEM, "value": grantee}}}],
                "purpose": [TREATMENT],
                **provision,
            }
        ],
    }


def patient(family: str = "Smith", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "name": [{"family": family, "given": ["Ann"]}],
        "gender": "female",
        "birthDate": "1970-01-01",
        **extra,
    }


def observation(
    patient_id: str,
    code: str = "8867-4",
    when: str = "2024-01-01T10:00:00Z",
    value: Any = 72,
    category: str = "vital-signs",
    status: str = "final",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": status,
        "category": [{"coding": [{"system": OBS_CAT, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "/min"},
        **extra,
    }


def assert_outcome(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response is an OperationOutcome with ``status`` (and issue code), never a stack trace."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"] and body["issue"][0]["diagnostics"]
    assert "Traceback" not in response.text
    if code is not None:
        assert body["issue"][0]["code"] == code, body
    return dict(body)


async def create(client: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(f"/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return dict(r.json())
