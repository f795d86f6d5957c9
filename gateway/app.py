"""The ASGI application factory.

Contract: :func:`create_app` does no I/O; the lifespan opens the backends chosen by the settings
(and loads demo data when asked) and closes them on shutdown. Mounted: ``/fhir/r5`` (FHIR REST),
``/graphql`` (the federated graph, see docs/federation.md), ``/.well-known/smart-configuration``
and ``/healthz``.
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
from subgraphs.store.errors import FhirError

from .backends import open_backends
from .graphql_app import mount_graphql
from .security.smart import smart_configuration_route
from .settings import Settings

Startup = Callable[[Starlette], Awaitable[None]]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(settings: Settings, *, on_startup: Startup | None = None) -> Starlette:
    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/.well-known/smart-configuration", smart_configuration_route, methods=["GET"]),
        Route("/fhir/r5/.well-known/smart-configuration", smart_configuration_route, methods=["GET"]),
        Mount("/fhir/r5", routes=fhir_routes()),
    ]
    graphql = mount_graphql(routes, settings)  # /graphql: the federated graph (no I/O here)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.backends = await open_backends(settings)
        try:
            await graphql.start(app.state.backends)
            if on_startup is not None:
                await on_startup(app)
            yield
        finally:
            await graphql.close()
            await app.state.backends.close()

    app = Starlette(
        routes=routes,
        exception_handlers={FhirError: render_error, HTTPException: render_http, Exception: render_unexpected},
        lifespan=lifespan,
    )
    return app
