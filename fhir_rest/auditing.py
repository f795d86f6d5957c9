"""Every FHIR route runs inside :func:`audited`: one access record per request, allowed or denied.

Contract: the wrapper opens an :class:`AccessAudit` before the route runs (``http.context`` puts
it on the request's context), notes the status the route answered with — or the error it raised
(401, 403, 404 and every other failure are recorded too) — and persists the record before the
response leaves: the client never receives data whose access is not on record. Requests without
a usable facility (no or malformed ``X-Facility-Id``) have no chain to go to and are only logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import wraps

from starlette.requests import Request
from starlette.responses import Response

from gateway.context import check_facility
from gateway.security.audit import AccessAudit
from subgraphs.store.errors import FhirError

from . import http
from .outcome import route_of

Route = Callable[[Request], Awaitable[Response]]
log = logging.getLogger("unihealth.audit")


def _facility(request: Request) -> str | None:
    try:
        return check_facility(request.headers.get("x-facility-id"))
    except FhirError:
        return None


def audited(interaction: str | dict[str, str], *, inline: frozenset[str] = frozenset()) -> Callable[[Route], Route]:
    """Wrap a route: ``interaction`` names it in the AuditEvent (``read``, ``search-type``...), or
    maps HTTP methods to names; ``inline``: the methods that are a single write, whose record
    commits with the change. A route may refine ``request.state.audit.interaction``."""

    def wrap(route: Route) -> Route:
        @wraps(route)
        async def audited_route(request: Request) -> Response:
            name = interaction if isinstance(interaction, str) else interaction.get(request.method, "operation")
            audit = AccessAudit(
                interaction=name,
                facility=_facility(request),
                resource_type=request.path_params.get("type") or _type_of(request),
                resource_id=request.path_params.get("id"),
                query=request.url.query,
                client=request.client.host if request.client else None,
                request_id=request.headers.get("x-request-id", ""),
                inline=request.method in inline,
            )
            request.state.audit = audit
            try:
                response = await route(request)
            except FhirError as exc:
                audit.status, audit.detail = exc.status, exc.diagnostics[:200]
                await _record(request, audit)
                raise
            except Exception:
                audit.status, audit.detail = 500, "internal error"
                await _record(request, audit)
                raise
            audit.status = response.status_code
            await _record(request, audit)
            return response

        return audited_route

    return wrap


def _type_of(request: Request) -> str | None:
    parts = request.url.path.split("/fhir/r5/", 1)
    head = parts[1].split("/", 1)[0] if len(parts) == 2 else ""
    return head if head[:1].isupper() else None


async def _record(request: Request, audit: AccessAudit) -> None:
    ctx = getattr(request.state, "ctx", None)
    if ctx is not None:
        audit.principal = ctx.principal
    if audit.facility is None:
        log.warning(
            "unaudited request without a facility: %s %s -> %s", request.method, route_of(request), audit.status
        )
        return
    await http.backends(request).record_access(audit)
