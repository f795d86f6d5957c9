"""Validation of incoming resources against the FHIR R5 models of ``fhir.resources``.

Contract: :func:`validate` raises :class:`~subgraphs.store.errors.FhirError` (400, ``invalid``)
listing up to five problems with FHIRPath-like ``expression``s when ``resource`` is not a valid R5
resource of ``resource_type``. It never changes ``resource``: what is stored is the client's JSON,
not a re-dump of the model.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import ValidationError

from .errors import FhirError

SUPPORTED_TYPES: tuple[str, ...] = (
    "Patient",
    "Encounter",
    "Observation",
    "MedicationRequest",
    "Medication",
    "AllergyIntolerance",
    "Condition",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "Consent",
    "AuditEvent",
    "Provenance",
    "SearchParameter",  # custom search parameters of a facility (docs/search.md)
)


@cache
def _model(resource_type: str) -> Any:
    from fhir.resources import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def _path(resource_type: str, loc: tuple[int | str, ...]) -> str:
    out = resource_type
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate(resource_type: str, resource: dict[str, Any]) -> None:
    """Raise 400 unless ``resource`` is a valid R5 ``resource_type``."""
    try:
        _model(resource_type).model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors()
        problems = [f"{_path(resource_type, e['loc'])}: {e['msg']}" for e in errors[:5]]
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise FhirError(
            400,
            "invalid",
            f"not a valid R5 {resource_type}: " + "; ".join(problems) + more,
            expression=[_path(resource_type, e["loc"]) for e in errors[:5]],
        ) from None
    except (ValueError, TypeError) as exc:
        raise FhirError(400, "invalid", f"not a valid R5 {resource_type}: {exc}") from None
