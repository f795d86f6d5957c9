"""The CapabilityStatement, generated from what this server really supports.

Contract: every resource type in :data:`SUPPORTED_TYPES` is listed with the interactions the routes
implement, exactly the search parameters the search engine handles (from the registry generated
from the official R5 definitions: :func:`subgraphs.store.search.supported_params`) with their types
and definitions, the ``_include``/``_revinclude`` values it accepts, and ``$everything`` on Patient,
so the statement cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from subgraphs.store.search import supported_params
from subgraphs.store.validation import SUPPORTED_TYPES

INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "history-type", "create", "search-type")
EVERYTHING = "http://hl7.org/fhir/OperationDefinition/Patient-everything"


def _search_params(resource_type: str) -> list[dict[str, Any]]:
    out = []
    for p in supported_params(resource_type):
        entry: dict[str, Any] = {"name": p.code, "type": p.type}
        if p.url:
            entry["definition"] = p.url
        out.append(entry)
    return out


def _includes(resource_type: str) -> tuple[list[str], list[str]]:
    include = [f"{resource_type}:{p.code}" for p in supported_params(resource_type) if p.type == "reference"]
    revinclude = [
        f"{source}:{p.code}"
        for source in SUPPORTED_TYPES
        for p in supported_params(source)
        if p.type == "reference" and (not p.targets or resource_type in p.targets) and not p.code.startswith("_")
    ]
    return ["*", *include], sorted(revinclude)


def capability_statement(base: str, version: str) -> dict[str, Any]:
    resources = []
    for resource_type in SUPPORTED_TYPES:
        include, revinclude = _includes(resource_type)
        entry: dict[str, Any] = {
            "type": resource_type,
            "interaction": [{"code": code} for code in INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "conditionalDelete": "not-supported",
            "searchInclude": include,
            "searchRevInclude": revinclude,
            "searchParam": _search_params(resource_type),
        }
        if resource_type == "Patient":
            entry["operation"] = [{"name": "everything", "definition": EVERYTHING}]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-25",
        "kind": "instance",
        "software": {"name": "UniHealth", "version": version},
        "implementation": {"description": "UniHealth FHIR R5 edge gateway", "url": base},
        "fhirVersion": "5.0.0",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Every request except /metadata names its facility in the X-Facility-Id header.",
                "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
            }
        ],
    }
