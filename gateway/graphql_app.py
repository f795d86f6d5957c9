"""``/graphql`` on the edge: the federated gateway over the patient, observation and medication subgraphs.

Contract:
* :func:`mount_graphql` appends the ``/graphql`` route to an app's routes and returns the
  :class:`GraphQLEdge` behind it; nothing is built or opened then. :meth:`GraphQLEdge.start`
  (from the app's lifespan, once the backends are open) builds the supergraph and the gateway;
  :meth:`GraphQLEdge.close` closes the subgraph connections. If ``start`` was not called, the first
  request starts the gateway from ``request.app.state.backends``.
* Subgraphs are in-process by default (their strawberry schemas executed over the edge's own
  backends, composed from their SDLs). With ``UNIHEALTH_SUBGRAPHS=patient=http://...,...`` they
  are asked over HTTP (composed from each one's ``_service { sdl }``); ``UNIHEALTH_SUPERGRAPH``
  names a supergraph SDL file (Apollo's composition output) to use instead of composing, whose
  URLs ``UNIHEALTH_SUBGRAPHS`` overrides (``UNIHEALTH_SUBGRAPHS=supergraph`` uses the file's URLs
  as they are). Composition conflicts fail :meth:`GraphQLEdge.start` with the composition's
  message; subgraphs that cannot be reached at start are retried on later requests (meanwhile
  ``/graphql`` answers 503 with a GraphQL error).
* ``POST /graphql`` takes ``application/json`` ``{"query", "variables", "operationName"}``;
  ``GET /graphql?query=...&variables=...&operationName=...`` runs queries. Answers are JSON
  (``application/json``; stored FHIR decimals keep their digits), status as
  :meth:`~gateway.federation.gateway.FederatedGateway.execute` says; malformed HTTP requests
  (bad JSON, wrong media type, batches, too large) are 400/413/415 with a GraphQL error body.
  GraphiQL is served on ``GET /graphql`` from a browser in the embedded profile only.
* ``Authorization``, ``X-Facility-Id`` and ``X-Request-Id`` reach every subgraph request; without
  an ``X-Request-Id`` the edge makes one, so the access records the subgraphs write for one
  operation share it, and returns it in the response's ``X-Request-Id``.
* Response cache: with ``cache_ttl`` > 0 (``UNIHEALTH_GRAPHQL_CACHE_TTL``, default 60 s; an explicit
  :class:`FederationSettings` has none unless it says so) and the edge's backends at hand,
  :meth:`GraphQLEdge.start` gives the gateway a :class:`~gateway.graphql_cache.GraphQLCache` over
  ``backends.cache`` (single-patient answers; see that module), which is also its entity cache
  (per-patient ``_entities`` answers, e.g. each ward patient's vitals and medications). A gateway
  without backends (HTTP subgraphs in a process of its own) cannot verify callers or write access
  records, so it has neither.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from subgraphs.store import fhirjson

from .federation.composition import compose
from .federation.executor import EntityCache
from .federation.gateway import FederatedGateway, GatewayConfig, GraphQLRequest, ResponseCache
from .federation.supergraph import CompositionError, Supergraph, load_supergraph
from .federation.transport import Forwarded, HttpTransport, InProcessTransport, Transport, in_process_schemas

if TYPE_CHECKING:
    from .backends import Backends
    from .settings import Settings

log = logging.getLogger("unihealth.federation")
SDL_QUERY = "{ _service { sdl } }"
JSON_TYPES = ("application/json", "application/graphql-response+json")


@dataclass(frozen=True, slots=True)
class FederationSettings:
    """The gateway's settings (from :class:`~gateway.settings.Settings`, see :func:`federation_settings`)."""

    subgraphs: dict[str, str] = field(default_factory=dict)  # name -> URL; empty: in-process
    use_supergraph_urls: bool = False  # UNIHEALTH_SUBGRAPHS=supergraph
    supergraph_path: str = ""
    max_depth: int = 12
    max_cost: int = 5000
    timeout: float = 30.0
    graphiql: bool = False
    max_body_bytes: int = 10 * 1024 * 1024
    cache_ttl: int = 0  # seconds; 0: no response cache (settings: UNIHEALTH_GRAPHQL_CACHE_TTL, default 60)

    @property
    def over_http(self) -> bool:
        return bool(self.subgraphs) or self.use_supergraph_urls


def parse_subgraphs(value: str) -> dict[str, str]:
    """``patient=http://a/graphql,observation=http://b/graphql`` → {name: url}; ValueError if malformed."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, sep, url = part.partition("=")
        if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
            raise ValueError(f"UNIHEALTH_SUBGRAPHS entries are name=http(s)://host:port/graphql, got {part!r}")
        out[name.strip()] = url.strip()
    return out


def federation_settings(settings: Settings) -> FederationSettings:
    """The gateway settings held by ``settings`` (UNIHEALTH_SUBGRAPHS, UNIHEALTH_SUPERGRAPH,
    UNIHEALTH_GRAPHQL_MAX_DEPTH/_MAX_COST/_TIMEOUT/_CACHE_TTL)."""
    raw = settings.graphql_subgraphs
    return FederationSettings(
        subgraphs={} if raw.strip() in ("", "supergraph") else parse_subgraphs(raw),
        use_supergraph_urls=raw.strip() == "supergraph",
        supergraph_path=settings.graphql_supergraph,
        max_depth=settings.graphql_max_depth,
        max_cost=settings.graphql_max_cost,
        timeout=settings.graphql_timeout,
        graphiql=settings.profile == "embedded",
        max_body_bytes=settings.max_body_bytes,
        cache_ttl=settings.graphql_cache_ttl,
    )


async def fetch_sdls(urls: dict[str, str], seconds: float) -> dict[str, str]:
    """Each subgraph's ``_service { sdl }`` over HTTP; :class:`CompositionError` naming the one
    that could not be read (``unreachable`` is True on the exception when it did not answer)."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as session:

        async def one(name: str, url: str) -> tuple[str, str]:
            try:
                async with session.post(url, json={"query": SDL_QUERY}) as answer:
                    sdl = (await answer.json(content_type=None))["data"]["_service"]["sdl"]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                error = CompositionError(f"cannot read the SDL of subgraph {name} at {url}: {type(exc).__name__}")
                error.unreachable = True  # type: ignore[attr-defined]
                raise error from None
            if not isinstance(sdl, str):
                raise CompositionError(f"subgraph {name} at {url} did not answer its SDL")
            return name, sdl

        return dict(await asyncio.gather(*(one(n, u) for n, u in urls.items())))


async def build_gateway(
    config: FederationSettings,
    backends: Backends | None,
    *,
    cache: ResponseCache | None = None,
    entity_cache: EntityCache | None = None,
) -> FederatedGateway:
    """The gateway ``config`` describes (see the module contract); I/O: the supergraph file or the
    subgraphs' SDLs over HTTP."""
    transport: Transport
    supergraph: Supergraph
    if config.supergraph_path:
        text = await asyncio.to_thread(_read, config.supergraph_path)
        supergraph = load_supergraph(text, config.subgraphs or None)
    if config.over_http:
        if not config.supergraph_path:
            sdls = await fetch_sdls(config.subgraphs, config.timeout)
            supergraph = compose(sdls, config.subgraphs)
        transport = HttpTransport(supergraph.urls, timeout=config.timeout)
    else:
        if backends is None:
            raise CompositionError("in-process subgraphs need the edge's backends")
        schemas = in_process_schemas()
        if not config.supergraph_path:
            supergraph = compose({name: schema.as_str() for name, schema in schemas.items()})
        unknown = set(supergraph.subgraphs) - set(schemas)
        if unknown:
            raise CompositionError(f"the supergraph names subgraphs this process does not serve: {sorted(unknown)}")
        transport = InProcessTransport(schemas, backends)
    gateway_config = GatewayConfig(max_depth=config.max_depth, max_cost=config.max_cost)
    return FederatedGateway(supergraph, transport, gateway_config, cache=cache, entity_cache=entity_cache)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _error_body(message: str, code: str) -> bytes:
    return orjson.dumps({"errors": [{"message": message, "extensions": {"code": code}}]})


def _json(status: int, body: bytes) -> Response:
    return Response(body, status_code=status, media_type="application/json")


class GraphQLEdge:
    """The ``/graphql`` endpoint and the gateway behind it (see the module contract)."""

    def __init__(
        self,
        settings: Settings,
        *,
        config: FederationSettings | None = None,
        cache: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        self.config = config or federation_settings(settings)
        self.cache = cache
        self.gateway: FederatedGateway | None = None
        self._lock = asyncio.Lock()
        self._graphiql: str | None = None

    def routes(self) -> list[BaseRoute]:
        return [Route("/graphql", self.endpoint, methods=["GET", "POST"])]

    async def start(self, backends: Backends | None) -> FederatedGateway | None:
        """Build the gateway (idempotent). Raises :class:`CompositionError` on conflicts; returns
        None (and logs) when subgraphs could not be reached, to be retried on the next request."""
        async with self._lock:
            if self.gateway is None:
                if self.cache is None and backends is not None and self.config.cache_ttl > 0:
                    from .graphql_cache import GraphQLCache

                    self.cache = GraphQLCache(backends, self.config.cache_ttl)
                try:
                    self.gateway = await build_gateway(
                        self.config, backends, cache=self.cache, entity_cache=_entity_cache(self.cache)
                    )
                except CompositionError as exc:
                    if not getattr(exc, "unreachable", False):
                        raise
                    log.warning("GraphQL gateway not started yet: %s", exc)
            return self.gateway

    async def close(self) -> None:
        gateway, self.gateway = self.gateway, None
        if gateway is not None:
            await gateway.close()

    # ------------------------------------------------------------------ HTTP
    def _base(self, request: Request) -> str:
        configured = self.settings.base_url
        return f"{configured}/fhir/r5" if configured else f"{request.url.scheme}://{request.url.netloc}/fhir/r5"

    async def _request(self, request: Request) -> GraphQLRequest | Response:
        if request.method == "GET":
            params = request.query_params
            variables: Any = None
            if params.get("variables"):
                try:
                    variables = orjson.loads(params["variables"])
                except orjson.JSONDecodeError:
                    return _json(400, _error_body("`variables` is not valid JSON", "BAD_REQUEST"))
            payload: Any = {
                "query": params.get("query"),
                "variables": variables,
                "operationName": params.get("operationName"),
            }
        else:
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media not in JSON_TYPES:
                return _json(415, _error_body("POST /graphql takes application/json", "BAD_REQUEST"))
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.config.max_body_bytes:
                return _json(413, _error_body("the request body is too large", "BAD_REQUEST"))
            body = await request.body()
            if len(body) > self.config.max_body_bytes:
                return _json(413, _error_body("the request body is too large", "BAD_REQUEST"))
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                return _json(400, _error_body("the request body is not valid JSON", "BAD_REQUEST"))
            if isinstance(payload, list):
                return _json(400, _error_body("batched operations are not supported", "BAD_REQUEST"))
        if not isinstance(payload, dict):
            return _json(400, _error_body("the request must be a JSON object with a `query`", "BAD_REQUEST"))
        query, variables, name = payload.get("query"), payload.get("variables"), payload.get("operationName")
        if variables is not None and not isinstance(variables, dict):
            return _json(400, _error_body("`variables` must be a JSON object", "BAD_REQUEST"))
        if name is not None and not isinstance(name, str):
            return _json(400, _error_body("`operationName` must be a string", "BAD_REQUEST"))
        return GraphQLRequest(query if isinstance(query, str) else None, variables, name or None)

    def _wants_ide(self, request: Request) -> bool:
        return (
            self.config.graphiql
            and request.method == "GET"
            and "query" not in request.query_params
            and "text/html" in request.headers.get("accept", "")
        )

    async def endpoint(self, request: Request) -> Response:
        if self._wants_ide(request):
            if self._graphiql is None:
                from strawberry.http.ides import get_graphql_ide_html

                self._graphiql = await asyncio.to_thread(get_graphql_ide_html, "graphiql")
            return HTMLResponse(self._graphiql)
        parsed = await self._request(request)
        if isinstance(parsed, Response):
            return parsed
        gateway = self.gateway or await self.start(getattr(request.app.state, "backends", None))
        if gateway is None:
            return _json(503, _error_body("the GraphQL subgraphs cannot be reached yet", "SERVICE_UNAVAILABLE"))
        client = request.client.host if request.client else None
        headers = dict(request.headers)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex  # one id for every subgraph's access record
        headers["x-request-id"] = request_id
        forwarded = Forwarded.from_headers(headers, client=client, base=self._base(request))
        result = await gateway.execute(parsed, forwarded)
        response = _json(result.status, fhirjson.dumps(result.body))
        response.headers["X-Request-Id"] = request_id
        return response


def mount_graphql(
    routes: list[BaseRoute],
    settings: Settings,
    *,
    config: FederationSettings | None = None,
    cache: ResponseCache | None = None,
) -> GraphQLEdge:
    """Add ``/graphql`` to ``routes``; start and close the returned edge in the app's lifespan."""
    edge = GraphQLEdge(settings, config=config, cache=cache)
    routes.extend(edge.routes())
    return edge


def create_gateway_app(
    settings: Settings, *, config: FederationSettings | None = None, open_store: bool | None = None
) -> Any:
    """A Starlette app serving only ``/graphql`` (and ``/healthz``): the gateway as its own process.
    With in-process subgraphs it opens the backends of ``settings`` in its lifespan; over HTTP it
    opens none unless ``open_store`` (then, as the edge does, it verifies callers, writes access
    records and has the response and entity cache). Nothing is opened when called."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse

    from .backends import open_backends

    routes: list[BaseRoute] = []
    edge = mount_graphql(routes, settings, config=config)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        wanted = not edge.config.over_http if open_store is None else open_store
        backends = await open_backends(settings) if wanted else None
        app.state.backends = backends
        try:
            await edge.start(backends)
            yield
        finally:
            await edge.close()
            if backends is not None:
                await backends.close()

    return Starlette(routes=[*routes, Route("/healthz", healthz, methods=["GET"])], lifespan=lifespan)


def _entity_cache(cache: ResponseCache | None) -> EntityCache | None:
    """The response cache as the executor's entity cache too, when it is one (the edge's is)."""
    from .graphql_cache import GraphQLCache

    return cache if isinstance(cache, GraphQLCache) else None
