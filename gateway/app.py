"""The ASGI application factory.

Contract: :func:`create_app` does no I/O; the lifespan opens the backends chosen by the settings
(and loads demo data when asked) and closes them on shutdown. Mounted: ``/fhir/r5`` (FHIR REST),
``/graphql`` (the federated graph, see docs/federation.md; ``graphql`` overrides its settings),
``/.well-known/smart-configuration``, ``/healthz`` (liveness), ``/readyz`` (database and cache,
see :mod:`gateway.observability.endpoints`) and, with ``UNIHEALTH_METRICS`` on, ``/metrics``.

Every request passes :mod:`gateway.observability.asgi` first (request id, access log, request
duration). With metrics on, the cache counts its hits and misses, and when this process runs the
outbox relay, ``/metrics`` shows the outbox backlog read through the relay's own database (on
PostgreSQL the runtime role sees no outbox rows without a facility, so without an inline relay the
backlog is the relay process's metric, not the edge's).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from fhir_rest.outcome import render_error, render_http, render_unexpected
from fhir_rest.routes import routes as fhir_routes
from streams.metrics import REGISTRY
from streams.relay_service import outbox_collector
from subgraphs.store.errors import FhirError

from .backends import open_backends
from .graphql_app import FederationSettings, mount_graphql
from .observability.asgi import ObservedApp
from .observability.cache import counted
from .observability.endpoints import observability_routes
from .security.smart import smart_configuration_route
from .settings import Settings

Startup = Callable[[Starlette], Awaitable[None]]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(
    settings: Settings, *, on_startup: Startup | None = None, graphql: FederationSettings | None = None
) -> Starlette:
    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        *observability_routes(metrics=settings.metrics),
        Route("/.well-known/smart-configuration", smart_configuration_route, methods=["GET"]),
        Route("/fhir/r5/.well-known/smart-configuration", smart_configuration_route, methods=["GET"]),
        Mount("/fhir/r5", routes=fhir_routes()),
    ]
    edge = mount_graphql(routes, settings, config=graphql)  # /graphql: the federated graph (no I/O here)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backends = app.state.backends = await open_backends(settings)
        unregister = None
        if settings.metrics:
            backends.cache = counted(backends.cache)
            if backends.relay is not None:
                unregister = REGISTRY.collector(outbox_collector(backends.relay.db), "outbox")
        try:
            await edge.start(backends)
            if on_startup is not None:
                await on_startup(app)
            yield
        finally:
            if unregister is not None:
                unregister()
            await edge.close()
            await backends.close()

    app = ObservedApp(
        service="edge",
        metrics=settings.metrics,
        routes=routes,
        exception_handlers={FhirError: render_error, HTTPException: render_http, Exception: render_unexpected},
        lifespan=lifespan,
    )
    return app
