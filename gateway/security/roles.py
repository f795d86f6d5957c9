"""The role permission table: what each role may do, before scopes narrow it further.

Contract: :data:`PERMISSIONS` maps a role to ``{resource type: SMART letters}``; a caller's
effective rights are (union over its roles) ∩ (union over its token's scopes). AuditEvents are
readable by the auditor role only. The table is the documented policy (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Iterable

CLINICAL = (
    "Patient",
    "Encounter",
    "Observation",
    "MedicationRequest",
    "Medication",
    "AllergyIntolerance",
    "Condition",
    "Consent",
    "Provenance",
)
DIRECTORY = ("Practitioner", "PractitionerRole", "Organization", "Location")
DEFINITIONS = ("SearchParameter",)  # a facility's custom search parameters (docs/search.md)


def _table(*parts: tuple[Iterable[str], str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for types, letters in parts:
        for t in types:
            out[t] = "".join(sorted(set(out.get(t, "")) | set(letters), key="cruds".index))
    return out


PERMISSIONS: dict[str, dict[str, str]] = {
    "clinician": _table((CLINICAL, "crus"), (DIRECTORY, "rs")),
    "nurse": _table((CLINICAL, "rs"), (("Observation", "Encounter", "AllergyIntolerance"), "cu"), (DIRECTORY, "rs")),
    "pharmacist": _table((CLINICAL, "rs"), (("MedicationRequest", "Medication"), "cu"), (DIRECTORY, "rs")),
    "registrar": _table((("Patient", "Encounter", "Consent"), "crus"), (DIRECTORY, "crus")),
    "auditor": _table((("AuditEvent", "Provenance"), "rs")),
    "analyst": _table((CLINICAL, "rs"), (DIRECTORY, "rs")),
    "admin": _table((CLINICAL, "cruds"), (DIRECTORY, "cruds"), (DEFINITIONS, "cruds")),
    # a backend service (EHR interface engine, bulk loader): may also submit AuditEvents, never read them
    "integration": _table((CLINICAL, "cruds"), (DIRECTORY, "cruds"), (DEFINITIONS, "cruds"), (("AuditEvent",), "c")),
}

ROLES = tuple(PERMISSIONS)


def role_letters(roles: Iterable[str], resource_type: str) -> frozenset[str]:
    return frozenset("".join(PERMISSIONS.get(r, {}).get(resource_type, "") for r in roles))
