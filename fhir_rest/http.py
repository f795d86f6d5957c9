"""HTTP plumbing for the FHIR routes: facility, media types, bodies, Prefer, and rendering.

Contract: this module is the only one in ``fhir_rest`` that touches request and response objects
besides :mod:`fhir_rest.routes`; everything it rejects is a :class:`FhirError` with the right 4xx:
missing facility (400), a body that is not FHIR JSON (415), too large (413), too deep or malformed
(400), an ``Accept`` we cannot serve (406).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.backends import Backends
from gateway.context import RequestContext, check_facility
from gateway.security.policy import policy_for
from gateway.security.tokens import Principal, unauthorized
from subgraphs.store import fhirjson
from subgraphs.store.dates import http_date
from subgraphs.store.errors import FhirError

from .outcome import FHIR_JSON
from .results import Result

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
FORM = "application/x-www-form-urlencoded"


def backends(request: Request) -> Backends:
    b: Backends = request.app.state.backends
    return b


def base_url(request: Request) -> str:
    configured = backends(request).settings.base_url
    if configured:
        return f"{configured}/fhir/r5"
    return f"{request.url.scheme}://{request.url.netloc}/fhir/r5"


def authenticate(request: Request) -> Principal:
    """The verified bearer token's principal; 401 without a valid one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("a Bearer token is required")
    return backends(request).verifier.verify(token.strip())


def context(request: Request) -> RequestContext:
    """Authenticate, check the facility against the token, derive the access policy."""
    check_accept(request)
    principal = authenticate(request)
    audit = getattr(request.state, "audit", None)
    if audit is not None:
        audit.principal = principal  # known from here on, even if the request is refused below
    facility = check_facility(request.headers.get("x-facility-id"))
    if facility not in principal.facilities:
        raise FhirError(403, "forbidden", f"the token does not grant access to facility {facility}")
    ctx = RequestContext(
        facility=facility,
        base=base_url(request),
        policy=policy_for(principal),
        principal=principal,
        request_id=request.headers.get("x-request-id", ""),
        audit=audit,
    )
    request.state.ctx = ctx
    return ctx


def check_accept(request: Request) -> None:
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt not in ("json", *JSON_TYPES):
        raise FhirError(406, "not-supported", f"_format {fmt[:40]} is not supported; this server speaks FHIR JSON")
    accept = request.headers.get("accept")
    if not accept:
        return
    for item in accept.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media in (*JSON_TYPES, "*/*", "application/*"):
            return
    raise FhirError(406, "not-supported", "this server answers in application/fhir+json only")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, *, allow_form: bool = False) -> bytes:
    media = _media_type(request)
    if media not in JSON_TYPES and not (allow_form and media == FORM):
        shown = media or "none"
        raise FhirError(415, "not-supported", f"Content-Type {shown[:60]} is not supported; send application/fhir+json")
    limit = backends(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FhirError(413, "too-costly", f"the body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FhirError(413, "too-costly", f"the body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> Any:
    body = await read_body(request)
    if not body.strip():
        raise FhirError(400, "required", "the request has no body")
    return fhirjson.parse(body, max_depth=backends(request).settings.max_json_depth)


def prefer_return(request: Request) -> str:
    for part in request.headers.get("prefer", "").split(";"):
        for token in part.split(","):
            name, _, value = token.strip().partition("=")
            if name.strip() == "return":
                value = value.strip().strip('"')
                if value in ("minimal", "representation", "OperationOutcome"):
                    return value
    return "representation"


def prefer_strict(request: Request) -> bool:
    return "handling=strict" in request.headers.get("prefer", "").replace(" ", "")


def render(result: Result, prefer: str = "representation") -> Response:
    headers = dict(result.headers)
    if result.etag:
        headers["ETag"] = result.etag
    if result.last_modified:
        headers["Last-Modified"] = http_date(result.last_modified)
    if result.location:
        headers["Location"] = result.location
    body: bytes | None
    if result.status == 204 or result.body is None or (prefer == "minimal" and result.status in (200, 201)):
        body = None
    elif prefer == "OperationOutcome" and result.status in (200, 201):
        body = fhirjson.dumps(
            {
                "resourceType": "OperationOutcome",
                "issue": [
                    {
                        "severity": "information",
                        "code": "informational",
                        "diagnostics": "created" if result.status == 201 else "done",
                    }
                ],
            }
        )
    else:
        body = result.body if isinstance(result.body, bytes) else fhirjson.dumps(result.body)
    if body is None:
        return Response(status_code=result.status, headers=headers)
    return Response(body, result.status, headers=headers, media_type=FHIR_JSON)
