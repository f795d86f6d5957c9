"""The ASGI application factory.

Contract: :func:`create_app` does no I/O; the lifespan opens the backends chosen by the settings
(and loads demo data when asked) and closes them on shutdown. Mounted: ``/fhir/r5`` (FHIR REST)
and ``/healthz``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from fhir_rest.outcome import render_error, render_http, render_unexpected
from fhir_rest.routes import routes as fhir_routes
from subgraphs.store.errors import FhirError

from .backends import open_backends
from .security.smart import smart_configuration_route
from .settings import Settings

Startup = Callable[[Starlette], Awaitable[None]]


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def create_app(settings: Settings, *, on_startup: Startup | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.backends = await open_backends(settings)
        try:
            if on_startup is not None:
                await on_startup(app)
            yield
        finally:
            await app.state.backends.close()

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/.well-known/smart-configuration", smart_configuration_route, methods=["GET"]),
            Route("/fhir/r5/.well-known/smart-configuration", smart_configuration_route, methods=["GET"]),
            Mount("/fhir/r5", routes=fhir_routes()),
        ],
        exception_handlers={FhirError: render_error, HTTPException: render_http, Exception: render_unexpected},
        lifespan=lifespan,
    )
    return app
