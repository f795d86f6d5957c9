"""Render errors as OperationOutcome responses — the one place REST does it.

Contract: :func:`render_error` turns a :class:`FhirError` into its status, headers and
OperationOutcome; :func:`render_unexpected` turns any other exception into a 500 OperationOutcome
that says nothing about the internals (the details go to the log with the request id).
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from subgraphs.store import fhirjson
from subgraphs.store.errors import FhirError

FHIR_JSON = "application/fhir+json; charset=utf-8"
log = logging.getLogger("unihealth.rest")


def render_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)
    return Response(fhirjson.dumps(exc.outcome()), exc.status, headers=exc.headers, media_type=FHIR_JSON)


def render_http(_request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (no route, wrong method) as OperationOutcomes."""
    assert isinstance(exc, HTTPException)
    code = "not-found" if exc.status_code == 404 else "not-supported"
    error = FhirError(exc.status_code, code, exc.detail or "not supported", headers=dict(exc.headers or {}))
    return render_error(_request, error)


def route_of(request: Request) -> str:
    """The matched route's path template (``/{type}/{id}``), for logs: raw paths carry ids."""
    return str(getattr(request.scope.get("route"), "path", "(no route)"))


def render_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, route_of(request), exc_info=exc)
    error = FhirError(500, "exception", "internal server error; the request was not completed")
    return Response(fhirjson.dumps(error.outcome()), 500, media_type=FHIR_JSON)
