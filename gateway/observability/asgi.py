"""The outermost ASGI layer of the edge and the subgraphs: request id, access log, metrics.

Contract (:class:`Observer`, installed outside Starlette's error handling by :class:`ObservedApp`,
so it also sees the 500s that handling renders):

* Request id: the incoming ``X-Request-Id`` when valid (:func:`.request_id.accept`), else a new
  one. It replaces the request's header before the app sees it (so the FHIR audit record and the
  GraphQL gateway's forwarding use the same id), is set in :data:`.request_id.REQUEST_ID` for the
  whole request (every log line carries it), and is the response's only ``X-Request-Id``.
* Access log: one INFO line per request on ``unihealth.access`` — method, route template, status,
  duration in ms, request id, the ``X-Facility-Id`` header value (at most 64 characters) — and
  nothing else: no query string, body or path parameter. Probes (``/healthz``, ``/readyz``,
  ``/metrics``) log at DEBUG.
* Metrics (when on): :data:`~.instruments.HTTP_DURATION` by route *template* (``/fhir/r5/Patient/
  {id}/summary``; ``(unmatched)`` when no route matched), method and status class; for
  ``/graphql`` also :data:`~.instruments.GRAPHQL_DURATION` by operation name, read from the first
  64 KiB of the body or the query string without parsing them (``operationName``, else the name
  of the document's first named operation, else ``anonymous``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import instruments
from .request_id import HEADER, REQUEST_ID, accept

access_log = logging.getLogger("unihealth.access")
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
UNMATCHED = "(unmatched)"
GRAPHQL_PATH = "/graphql"
_PEEK = 64 * 1024
_HEADER = HEADER.encode()
_OPERATION_NAME = re.compile(rb'"operationName"\s*:\s*"([_A-Za-z][_0-9A-Za-z]{0,99})"')
_NAMED_OPERATION = re.compile(rb"\b(?:query|mutation|subscription)\s+([_A-Za-z][_0-9A-Za-z]{0,99})")


def route_templates(routes: Sequence[BaseRoute], prefix: str = "") -> dict[int, str]:
    """``id(route)`` → its full path template, for every route and mount under ``routes``."""
    out: dict[int, str] = {}
    for route in routes:
        if isinstance(route, Mount):
            out[id(route)] = f"{prefix}{route.path}/{UNMATCHED}"
            out.update(route_templates(route.routes, prefix + route.path))
        elif isinstance(route, Route):
            out[id(route)] = prefix + route.path
    return out


def operation_name(method: str, query_string: bytes, body: bytes) -> str | None:
    """The GraphQL operation name a request names, best effort (see the module contract)."""
    if method == "GET":
        params = parse_qs(query_string.decode("latin-1"), max_num_fields=20)
        name = (params.get("operationName") or [""])[0]
        if name:
            return name[:100]
        body = (params.get("query") or [""])[0].encode()
    found = _OPERATION_NAME.search(body) or _NAMED_OPERATION.search(body)
    return found.group(1).decode() if found else None


def _facility(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-facility-id":
            return value[:64].decode("latin-1")
    return ""


class Observer:
    """ASGI middleware (see the module contract)."""

    def __init__(self, app: ASGIApp, *, service: str, routes: Sequence[BaseRoute], metrics: bool) -> None:
        self.app = app
        self.service = service
        self.routes = routes
        self.metrics = metrics
        self._templates: dict[int, str] | None = None

    def template(self, scope: Scope) -> str:
        if self._templates is None:
            self._templates = route_templates(self.routes)
        route = scope.get("route")
        return self._templates.get(id(route), UNMATCHED) if route is not None else UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        incoming = next((v.decode("latin-1") for k, v in headers if k == _HEADER), None)
        request_id = accept(incoming)
        if incoming != request_id:
            scope["headers"] = [(k, v) for k, v in headers if k != _HEADER] + [(_HEADER, request_id.encode())]
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500
        peek = bytearray()
        graphql = self.metrics and scope["path"] == GRAPHQL_PATH

        async def receive_peeking() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(peek) < _PEEK:
                peek.extend(message.get("body", b"")[: _PEEK - len(peek)])
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                out = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER]
                out.append((_HEADER, request_id.encode()))
                message = {**message, "headers": out}
            await send(message)

        try:
            await self.app(scope, receive_peeking if graphql else receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = self.template(scope)
            method: str = scope["method"][:16]
            if self.metrics:
                instruments.record_http(self.service, route, method, status, seconds)
                if graphql:
                    name = operation_name(method, scope.get("query_string", b""), bytes(peek))
                    instruments.record_graphql_operation(self.service, name, status, seconds)
            level = logging.DEBUG if route in PROBES else logging.INFO
            if access_log.isEnabledFor(level):
                self._log(level, method, route, status, seconds, _facility(headers))
            REQUEST_ID.reset(token)

    def _log(self, level: int, method: str, route: str, status: int, seconds: float, facility: str) -> None:
        ms = round(seconds * 1000, 3)
        extra: dict[str, Any] = {
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": ms,
            "facility": facility,
        }
        access_log.log(level, "%s %s %d %.1f ms facility=%r", method, route, status, ms, facility, extra=extra)


class ObservedApp(Starlette):
    """A Starlette app whose outermost layer is an :class:`Observer` for ``service``."""

    def __init__(self, *args: Any, service: str, metrics: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.service = service
        self.metrics = metrics

    def build_middleware_stack(self) -> ASGIApp:
        return Observer(
            super().build_middleware_stack(), service=self.service, routes=self.routes, metrics=self.metrics
        )
