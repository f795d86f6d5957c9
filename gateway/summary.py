"""Patient summary assembly, shared by the REST summary path and (later) GraphQL.

Contract: :func:`patient_summary` returns a ``collection`` Bundle holding, from the caller's
facility only: the Patient, its last ``encounters`` Encounters (newest first), its active
AllergyIntolerances, active Conditions (active, recurrence, relapse), active MedicationRequests,
and the newest Observation of each code in the vital-signs and laboratory categories. 404 if the
patient is absent here or outside the caller's access (deleted: 410). Sections the caller may not
search are left out; within a section only what the caller may see is included.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fhir_rest.results import entry
from subgraphs.store.dates import instant
from subgraphs.store.errors import gone, not_found
from subgraphs.store.repository import ResourceRepository, StoredResource, check_id
from subgraphs.store.search import parse_search

ACTIVE_CONDITION = "active,recurrence,relapse"
SUMMARY_CATEGORIES = ("vital-signs", "laboratory")


async def _search(
    repo: ResourceRepository, resource_type: str, pairs: list[tuple[str, str]], count: int = 1000
) -> list[StoredResource]:
    query = parse_search(resource_type, pairs, default_count=count, max_count=1000)
    return (await repo.search(query)).resources


async def patient_summary(repo: ResourceRepository, base: str, patient_id: str, encounters: int) -> dict[str, Any]:
    parts = await summary_parts(repo, patient_id, encounters)
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": instant(datetime.now(UTC)),
        "entry": [entry(base, r, mode=None) for r in parts],
    }


async def summary_parts(repo: ResourceRepository, patient_id: str, encounters: int) -> list[StoredResource]:
    """The summary's resources from ``repo``'s facility, as the caller may see them (see module doc)."""
    check_id(patient_id)
    patient = await repo.read("Patient", patient_id)
    if patient is None:
        raise not_found("Patient", patient_id)
    if patient.deleted:
        raise gone("Patient", patient_id, patient.version)
    ref = f"Patient/{patient_id}"
    parts: list[StoredResource] = [patient]
    sections: list[tuple[str, list[tuple[str, str]], int]] = [
        ("Encounter", [("patient", ref), ("_sort", "-date")], encounters),
        ("AllergyIntolerance", [("patient", ref), ("clinical-status", "active")], 1000),
        ("Condition", [("patient", ref), ("clinical-status", ACTIVE_CONDITION)], 1000),
        ("MedicationRequest", [("patient", ref), ("status", "active")], 1000),
    ]
    allowed = repo.policy.allows  # sections the caller may not search are left out, not refused
    for resource_type, pairs, count in sections:
        if allowed(resource_type, "s"):
            parts += await _search(repo, resource_type, pairs, count)
    if allowed("Observation", "s"):
        parts += await repo.latest_per_code("Observation", patient_id, SUMMARY_CATEGORIES)
    compartment = {(r.type, r.id) for r in parts}  # all of it is this patient's: no lookup for the audit
    repo.touched[:] = [t for t in repo.touched if t not in compartment]
    repo.patients.add(patient_id)
    return parts
