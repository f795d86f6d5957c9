"""The CapabilityStatement, generated from what this server really supports.

Contract: every resource type in :data:`SUPPORTED_TYPES` is listed with the interactions the routes
implement and exactly the search parameters the store indexes (:data:`PARAMS`), so the statement
cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from subgraphs.store.params import PARAMS
from subgraphs.store.validation import SUPPORTED_TYPES

INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "history-type", "create", "search-type")
_TYPE_MAP = {"token": "token", "reference": "reference", "date": "date", "string": "string"}


def capability_statement(base: str, version: str) -> dict[str, Any]:
    resources = []
    for resource_type in SUPPORTED_TYPES:
        params = [{"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"}]
        params += [{"name": p.name, "type": _TYPE_MAP[p.kind]} for p in PARAMS.get(resource_type, ())]
        entry: dict[str, Any] = {
            "type": resource_type,
            "interaction": [{"code": code} for code in INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "conditionalDelete": "not-supported",
            "searchParam": params,
        }
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
