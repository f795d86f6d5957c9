"""The request context every interaction receives, free of HTTP types.

Contract: a :class:`RequestContext` is built once per request by the protocol layer (REST route,
GraphQL view) from already-checked inputs; interactions and repositories take the facility from it
and from nowhere else (never from a request body). The principal (from the verified token) and the
access policy derived from it travel here; the policy reaches the store with every repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from subgraphs.store.access import AccessPolicy
from subgraphs.store.errors import bad_request

from .security.audit import AccessAudit
from .security.tokens import Principal

_FACILITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-.]{0,63}$")


def check_facility(value: str | None) -> str:
    """400 unless ``value`` is a facility id (``[A-Za-z0-9][A-Za-z0-9-.]{0,63}``)."""
    if not value:
        raise bad_request("the X-Facility-Id header is required", code="required", expression=["X-Facility-Id"])
    if not _FACILITY.match(value):
        raise bad_request("the X-Facility-Id header is not a valid facility id", expression=["X-Facility-Id"])
    return value


@dataclass(frozen=True, slots=True)
class RequestContext:
    facility: str
    base: str  # absolute base of the FHIR API, e.g. "http://127.0.0.1:8000/fhir/r5"
    policy: AccessPolicy
    principal: Principal | None = None  # None only for internal callers (import, relay)
    request_id: str = ""
    audit: AccessAudit | None = None  # this request's access record (None for internal callers)
