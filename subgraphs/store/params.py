"""The search parameters the store indexes, and how values are pulled out of a resource.

Contract: :data:`PARAMS` maps a resource type to its parameters; :func:`extract` returns the index
rows of one resource as ``(kind, row)`` pairs, where ``row`` holds the kind's value columns (see
:mod:`subgraphs.store.schema`). Paths are simple dotted element paths (``subject``,
``medication.concept``); a ``[x]`` suffix matches every choice type (``effective[x]``). This is the
foundation's basic set; the search-engine issue replaces it with a registry generated from the
official R5 SearchParameter definitions.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .dates import date_range

Kind = Literal["token", "reference", "date", "string"]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: Kind
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()  # reference: allowed target types (empty = any)


def _p(name: str, kind: Kind, *paths: str, targets: tuple[str, ...] = ()) -> Param:
    return Param(name, kind, paths, targets)


_IDENT = _p("identifier", "token", "identifier")
_PATIENT_SUBJECT = _p("patient", "reference", "subject", targets=("Patient",))
_SUBJECT = _p("subject", "reference", "subject")
_ENCOUNTER = _p("encounter", "reference", "encounter", targets=("Encounter",))
_STATUS = _p("status", "token", "status")

PARAMS: dict[str, tuple[Param, ...]] = {
    "Patient": (
        _IDENT,
        _p("name", "string", "name.family", "name.given", "name.text", "name.prefix", "name.suffix"),
        _p("family", "string", "name.family"),
        _p("given", "string", "name.given"),
        _p("birthdate", "date", "birthDate"),
        _p("gender", "token", "gender"),
        _p("organization", "reference", "managingOrganization", targets=("Organization",)),
    ),
    "Encounter": (
        _IDENT,
        _PATIENT_SUBJECT,
        _SUBJECT,
        _STATUS,
        _p("class", "token", "class"),
        _p("date", "date", "actualPeriod"),
        _p("service-provider", "reference", "serviceProvider", targets=("Organization",)),
    ),
    "Observation": (
        _IDENT,
        _PATIENT_SUBJECT,
        _SUBJECT,
        _ENCOUNTER,
        _STATUS,
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("date", "date", "effective[x]"),
    ),
    "MedicationRequest": (
        _IDENT,
        _PATIENT_SUBJECT,
        _SUBJECT,
        _ENCOUNTER,
        _STATUS,
        _p("intent", "token", "intent"),
        _p("code", "token", "medication.concept"),
        _p("medication", "reference", "medication.reference", targets=("Medication",)),
        _p("authoredon", "date", "authoredOn"),
        _p("requester", "reference", "requester"),
    ),
    "Medication": (_IDENT, _p("code", "token", "code"), _STATUS),
    "AllergyIntolerance": (
        _IDENT,
        _p("patient", "reference", "patient", targets=("Patient",)),
        _p("clinical-status", "token", "clinicalStatus"),
        _p("code", "token", "code"),
        _p("criticality", "token", "criticality"),
        _p("date", "date", "recordedDate"),
    ),
    "Condition": (
        _IDENT,
        _PATIENT_SUBJECT,
        _SUBJECT,
        _ENCOUNTER,
        _p("clinical-status", "token", "clinicalStatus"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("onset-date", "date", "onset[x]"),
        _p("recorded-date", "date", "recordedDate"),
    ),
    "Practitioner": (_IDENT, _p("name", "string", "name.family", "name.given", "name.text")),
    "PractitionerRole": (
        _IDENT,
        _p("practitioner", "reference", "practitioner", targets=("Practitioner",)),
        _p("organization", "reference", "organization", targets=("Organization",)),
    ),
    "Organization": (_IDENT, _p("name", "string", "name")),
    "Location": (_IDENT, _p("name", "string", "name"), _STATUS),
    "Consent": (
        _IDENT,
        _p("patient", "reference", "subject", targets=("Patient",)),
        _p("subject", "reference", "subject"),
        _STATUS,
        _p("date", "date", "date"),
    ),
    "AuditEvent": (
        _p("patient", "reference", "patient", targets=("Patient",)),
        _p("date", "date", "recorded"),
        _p("code", "token", "code"),
    ),
    "Provenance": (
        _p("target", "reference", "target"),
        _p("patient", "reference", "patient", targets=("Patient",)),
        _p("recorded", "date", "recorded"),
    ),
}

# The params that put a resource in a patient's compartment (for summaries and events).
PATIENT_PARAM = "patient"

PARAM_BY_NAME: dict[str, dict[str, Param]] = {t: {p.name: p for p in ps} for t, ps in PARAMS.items()}


def _walk(value: Any, parts: list[str]) -> Iterator[Any]:
    if not parts:
        if isinstance(value, list):
            yield from value
        else:
            yield value
        return
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, parts)
        return
    if not isinstance(value, dict):
        return
    head, rest = parts[0], parts[1:]
    if head.endswith("[x]"):
        stem = head[:-3]
        for key, child in value.items():
            suffix = key[len(stem) :]
            if key.startswith(stem) and suffix[:1].isupper():
                if rest:
                    yield from _walk(child, rest)
                else:
                    yield _Typed(suffix, child)
        return
    if head in value:
        yield from _walk(value[head], rest)


class _Typed:
    """A choice-type value (``effectiveDateTime`` → type ``DateTime``)."""

    __slots__ = ("type", "value")

    def __init__(self, type_: str, value: Any) -> None:
        self.type = type_
        self.value = value


def values(resource: dict[str, Any], path: str) -> list[Any]:
    """The values at ``path``; choice-type values come wrapped with their type name."""
    return list(_walk(resource, path.split(".")))


def normalize_string(value: str) -> str:
    """Case- and accent-insensitive form used by string search (R5 search, string type)."""
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()[:255]


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, _Typed):
        yield from _tokens(value.value)
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, dict):
        if "coding" in value:  # CodeableConcept
            for coding in value["coding"]:
                yield from _tokens(coding)
        elif "concept" in value:  # CodeableReference
            yield from _tokens(value["concept"])
        elif isinstance(value.get("code"), str):  # Coding
            yield value.get("system"), value["code"]
        elif isinstance(value.get("value"), str):  # Identifier, ContactPoint
            yield value.get("system"), value["value"]


def _reference(value: Any) -> tuple[str, str] | None:
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return split_reference(value["reference"])
    return None


def split_reference(ref: str) -> tuple[str, str] | None:
    """``Type/id`` (also ``Type/id/_history/n`` or an absolute URL ending so) → (type, id)."""
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2] or not parts[-1] or not parts[-2][0].isupper():
        return None
    return parts[-2], parts[-1]


def _dates(value: Any) -> Iterator[tuple[datetime, datetime]]:
    if isinstance(value, _Typed):
        yield from _dates(value.value)
    elif isinstance(value, str):
        rng = date_range(value)
        if rng is not None:
            yield rng
    elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
        end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
        yield (start[0] if start else _MIN, end[1] if end else _MAX)


_MIN = datetime(1, 1, 1, tzinfo=UTC)
_MAX = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def extract(resource_type: str, resource: dict[str, Any]) -> Iterator[tuple[Kind, dict[str, Any]]]:
    """Index rows for ``resource``: ``(kind, {param, ...value columns})``, without duplicates."""
    seen: set[tuple[Any, ...]] = set()
    for param in PARAMS.get(resource_type, ()):
        for path in param.paths:
            for value in values(resource, path):
                for kind, row in _rows(param, value):
                    key = (kind, *row.values())
                    if key not in seen:
                        seen.add(key)
                        yield kind, row


def _rows(param: Param, value: Any) -> Iterator[tuple[Kind, dict[str, Any]]]:
    if param.kind == "token":
        for system, code in _tokens(value):
            if code:
                yield "token", {"param": param.name, "system": system, "code": code[:255]}
    elif param.kind == "reference":
        ref = _reference(value.value if isinstance(value, _Typed) else value)
        if ref and (not param.targets or ref[0] in param.targets):
            yield "reference", {"param": param.name, "target_type": ref[0], "target_id": ref[1]}
    elif param.kind == "date":
        for low, high in _dates(value):
            yield "date", {"param": param.name, "low": low, "high": high}
    elif param.kind == "string" and isinstance(value, str) and value:
        yield "string", {"param": param.name, "value": normalize_string(value)}
