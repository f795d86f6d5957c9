"""ASGI apps serving one subgraph at ``/graphql`` (POST JSON and GET queries), ``/healthz``
(liveness), ``/readyz`` (database and cache) and, with ``UNIHEALTH_METRICS`` on, ``/metrics``.

Contract:
* :func:`create_subgraph_app` serves a schema over backends the caller owns (in-process: the
  edge, tests); :func:`create_standalone_app` opens the backends of ``settings`` in its lifespan
  and closes them on shutdown (``unihealth subgraph NAME``); once started it calls
  :func:`settle_heap`. Neither does I/O when called.
* Each HTTP request gets a fresh :class:`~subgraphs.graphql.context.SubgraphContext` from its
  headers (``Authorization``, ``X-Facility-Id``, ``X-Request-Id``); responses are JSON written by
  orjson, so ``resource`` fields are the stored bytes and decimals keep their digits.
* Every request passes :mod:`gateway.observability.asgi` first: its request id is the
  ``X-Request-Id`` the gateway forwarded (or a new one), on every log line and in the response;
  one access-log line; the request-duration and GraphQL-operation histograms.
* :func:`settle_heap` (once per process; the standalone lifespan and the edge's in-process
  transport call it when they start) collects, then freezes everything allocated so far: modules,
  schemas, settings and backends live as long as the process, and without the freeze every full
  collection walks them all (the worst latency tail; in the edge, one ~100 ms full collection
  every ~10 ward queries, a third of the observation subgraph's CPU).
* :func:`schema_for` builds the schema of a subgraph by name (:data:`SUBGRAPHS`).
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL

from gateway.backends import Backends, open_backends
from gateway.observability.asgi import ObservedApp
from gateway.observability.cache import counted
from gateway.observability.endpoints import observability_routes
from gateway.settings import Settings
from subgraphs.store import fhirjson

from . import SUBGRAPHS
from .context import SubgraphContext
from .schema import SubgraphSchema


def schema_for(name: str) -> SubgraphSchema:
    """A new schema of subgraph ``name`` (one of :data:`SUBGRAPHS`)."""
    if name not in SUBGRAPHS:
        raise ValueError(f"unknown subgraph {name!r}; subgraphs are {', '.join(SUBGRAPHS)}")
    module = importlib.import_module(f"subgraphs.{name}.schema")
    schema: SubgraphSchema = module.build_schema()
    return schema


def _base(request: Request | WebSocket, backends: Backends) -> str:
    configured = backends.settings.base_url
    if configured:
        return f"{configured}/fhir/r5"
    return f"{request.url.scheme}://{request.url.netloc}/fhir/r5"


class SubgraphView(GraphQL[SubgraphContext, None]):
    """strawberry's ASGI view with our context and orjson encoding."""

    async def get_context(self, request: Request | WebSocket, response: Response | WebSocket) -> SubgraphContext:
        backends: Backends = request.app.state.backends
        client = request.client.host if request.client else None
        return SubgraphContext.from_headers(backends, request.headers, base=_base(request, backends), client=client)

    def encode_json(self, data: object) -> bytes:
        return fhirjson.dumps(data)


_settled = False


def settle_heap() -> None:
    """``gc.collect()`` then ``gc.freeze()``, the first time it is called in this process."""
    global _settled
    if not _settled:
        _settled = True
        gc.collect()
        gc.freeze()


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def _routes(schema: SubgraphSchema, settings: Settings) -> list[Route]:
    ide = settings.profile == "embedded"
    view = SubgraphView(schema, graphql_ide="graphiql" if ide else None, allow_queries_via_get=True)
    return [
        Route("/graphql", view, methods=["GET", "POST"]),
        Route("/healthz", _healthz, methods=["GET"]),
        *observability_routes(metrics=settings.metrics),
    ]


def create_subgraph_app(schema: SubgraphSchema, backends: Backends, *, name: str = "subgraph") -> Starlette:
    """Serve ``schema`` over ``backends`` (opened and closed by the caller); ``name`` labels its
    logs and metrics (``service``)."""
    settings = backends.settings
    app = ObservedApp(service=name, metrics=settings.metrics, routes=_routes(schema, settings))
    app.state.backends = backends
    return app


def create_standalone_app(schema: SubgraphSchema, settings: Settings, *, name: str = "subgraph") -> Starlette:
    """Serve ``schema`` as its own process: backends opened in the lifespan, closed at shutdown;
    ``name`` labels its logs and metrics (``service``)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        backends = app.state.backends = await open_backends(settings)
        if settings.metrics:
            backends.cache = counted(backends.cache)
        settle_heap()
        try:
            yield
        finally:
            await app.state.backends.close()

    return ObservedApp(service=name, metrics=settings.metrics, routes=_routes(schema, settings), lifespan=lifespan)
