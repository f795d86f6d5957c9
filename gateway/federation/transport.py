"""How the gateway asks a subgraph: over HTTP, or in-process.

Contract (:class:`Transport`): ``send`` runs one GraphQL operation on one subgraph on behalf of
one client request and returns its ``data`` and ``errors`` (each error as a JSON object, as the
subgraph formatted it); it raises :class:`SubgraphUnavailable` — never anything else — when the
subgraph cannot be asked or does not answer with a GraphQL response (connection refused,
timeout, non-2xx HTTP status, a body that is not a GraphQL response). What the subgraph needs
from the client request travels in :class:`Forwarded`: ``Authorization``, ``X-Facility-Id`` and
``X-Request-Id`` (the subgraph authenticates the caller itself), the client's address and the
FHIR base URL.

* :class:`HttpTransport` posts JSON to each subgraph's URL through one pooled, keep-alive
  ``aiohttp.ClientSession`` (created on first use, closed by :meth:`HttpTransport.close`). Idle
  pooled connections are dropped after :data:`CLIENT_KEEPALIVE` seconds, below the servers' idle
  timeout (our subgraphs: :data:`SERVER_KEEPALIVE`; uvicorn's default: 5 s), so the gateway does
  not reuse a connection the server is closing; should a server still drop one
  (``ServerDisconnectedError`` or a reset: it closed an idle keep-alive connection as the request
  went out),
  the request is sent once more on a new connection — a query, so repeating it is safe (the
  subgraph may then have written one more access record, never one less). Subgraph
  answers are parsed with JSON numbers that have a fraction or exponent as ``Decimal``, so the
  stored FHIR JSON in ``resource`` fields keeps its digits through the gateway.
* :class:`InProcessTransport` executes the subgraphs' strawberry schemas directly over the
  edge's own backends (no HTTP, no JSON): the same schema, extensions, authentication,
  transaction and audit record as the subgraph's HTTP view, with parse and validation results
  cached per query text (the gateway sends few distinct texts). At most ``max_concurrency``
  subgraph operations run at once (each holds one database connection while it runs): the
  embedded SQLite pool checks connections out synchronously on the event loop, so GraphQL must
  never be what exhausts it. Creating one settles the process's heap once, as a subgraph process
  does at start (:func:`subgraphs.graphql.app.settle_heap`).

The executor wraps every request to either transport in :func:`measured`: counted in
``unihealth_subgraph_requests_total{subgraph, outcome}`` (``ok``; ``errors``: a GraphQL answer with
errors; ``unavailable``: :class:`SubgraphUnavailable`) and timed in
``unihealth_subgraph_request_duration_seconds{subgraph}`` (:mod:`gateway.observability`).
"""

from __future__ import annotations

import asyncio
import decimal
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.observability.instruments import record_subgraph_request

if TYPE_CHECKING:
    import aiohttp

    from gateway.backends import Backends
    from subgraphs.graphql.schema import SubgraphSchema

FORWARDED_HEADERS = ("authorization", "x-facility-id", "x-request-id")
_decoder = json.JSONDecoder(parse_float=decimal.Decimal)
log = logging.getLogger("unihealth.federation")


class SubgraphUnavailable(Exception):
    """The subgraph could not be asked or did not answer with a GraphQL response."""

    def __init__(self, subgraph: str, reason: str) -> None:
        super().__init__(f"subgraph {subgraph} is unavailable: {reason}")
        self.subgraph = subgraph
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What a subgraph request carries over from the client's request."""

    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names, FORWARDED_HEADERS only
    client: str | None = None
    base: str = ""

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], *, client: str | None = None, base: str = "") -> Forwarded:
        """Keep only :data:`FORWARDED_HEADERS` of ``headers`` (case-insensitive mapping)."""
        kept = {name: headers[name] for name in FORWARDED_HEADERS if headers.get(name)}
        return cls(kept, client, base)


@dataclass(slots=True)
class SubgraphResponse:
    data: dict[str, Any] | None
    errors: list[dict[str, Any]]


class Transport(Protocol):
    async def send(
        self,
        subgraph: str,
        query: str,
        variables: Mapping[str, Any],
        operation_name: str | None,
        forwarded: Forwarded,
    ) -> SubgraphResponse: ...

    async def close(self) -> None: ...


def _default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _response(subgraph: str, payload: Any) -> SubgraphResponse:
    if not isinstance(payload, dict) or not ("data" in payload or "errors" in payload):
        raise SubgraphUnavailable(subgraph, "the answer is not a GraphQL response")
    data, errors = payload.get("data"), payload.get("errors") or []
    if (data is not None and not isinstance(data, dict)) or not isinstance(errors, list):
        raise SubgraphUnavailable(subgraph, "the answer is not a GraphQL response")
    return SubgraphResponse(data, [e if isinstance(e, dict) else {"message": str(e)} for e in errors])


async def measured(subgraph: str, answer: Awaitable[SubgraphResponse]) -> SubgraphResponse:
    """``await answer``, counted and timed for ``subgraph`` (see the module contract)."""
    started = time.perf_counter()
    outcome = "unavailable"
    try:
        response = await answer
        outcome = "errors" if response.errors else "ok"
        return response
    finally:
        record_subgraph_request(subgraph, outcome, time.perf_counter() - started)


CLIENT_KEEPALIVE = 4.0
"""Seconds an idle pooled connection to a subgraph is kept (below uvicorn's default 5 s)."""
SERVER_KEEPALIVE = 75
"""Seconds our subgraph processes keep an idle client connection (``unihealth subgraph``)."""


class HttpTransport:
    """Subgraphs over HTTP (see the module contract). aiohttp, not httpx: its client costs the
    gateway about a third of the CPU time per subgraph request (measured: ward query 3.9 ms vs
    7.2 ms of gateway CPU), and the gateway is CPU-bound long before the network is."""

    def __init__(
        self,
        urls: Mapping[str, str],
        *,
        timeout: float = 30.0,
        max_connections: int = 200,
        trace_configs: list[aiohttp.TraceConfig] | None = None,
    ) -> None:
        missing = [name for name, url in urls.items() if not url]
        if missing:
            raise ValueError(f"no URL for subgraph(s) {', '.join(missing)}")
        self.urls = dict(urls)
        self.timeout = timeout
        self.max_connections = max_connections
        self.trace_configs = trace_configs
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """The pooled keep-alive session (created on first use, inside the running loop)."""
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=CLIENT_KEEPALIVE),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                trace_configs=self.trace_configs,
                raise_for_status=False,
            )
        return self._session

    async def send(
        self,
        subgraph: str,
        query: str,
        variables: Mapping[str, Any],
        operation_name: str | None,
        forwarded: Forwarded,
    ) -> SubgraphResponse:
        import aiohttp

        url = self.urls.get(subgraph)
        if not url:
            raise SubgraphUnavailable(subgraph, "no URL is configured")
        body: dict[str, Any] = {"query": query, "variables": dict(variables)}
        if operation_name:
            body["operationName"] = operation_name
        headers = {"content-type": "application/json", "accept": "application/json", **forwarded.headers}
        data = orjson.dumps(body, default=_default)
        try:
            try:
                status, raw = await self._post(url, data, headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # no connection at all (refused, no route): nothing was dropped
                log.info("subgraph %s dropped a pooled connection (%s); sending again", subgraph, type(exc).__name__)
                status, raw = await self._post(url, data, headers)
        except TimeoutError:
            raise SubgraphUnavailable(subgraph, f"no answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise SubgraphUnavailable(subgraph, f"it could not be reached ({type(exc).__name__})") from None
        if not 200 <= status < 300:
            raise SubgraphUnavailable(subgraph, f"it answered HTTP {status}")
        try:
            payload = _decoder.decode(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise SubgraphUnavailable(subgraph, "the answer is not JSON") from None
        return _response(subgraph, payload)

    async def _post(self, url: str, data: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        async with self.session().post(url, data=data, headers=headers) as answer:
            return answer.status, await answer.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def in_process_schemas(names: tuple[str, ...] | None = None) -> dict[str, SubgraphSchema]:
    """Fresh schemas of the subgraphs (default: all of them), with parse and validation results
    cached per query text."""
    from strawberry.extensions import ParserCache, ValidationCache

    from subgraphs.graphql import SUBGRAPHS
    from subgraphs.graphql.app import schema_for

    schemas = {}
    for name in names or SUBGRAPHS:
        schema = schema_for(name)
        schema.extensions = (
            *schema.extensions,
            lambda: ParserCache(maxsize=1024),
            lambda: ValidationCache(maxsize=1024),
        )
        schemas[name] = schema
    return schemas


class InProcessTransport:
    """Subgraphs executed in this process over ``backends`` (see the module contract)."""

    def __init__(self, schemas: Mapping[str, SubgraphSchema], backends: Backends, *, max_concurrency: int = 8) -> None:
        from subgraphs.graphql.app import settle_heap

        settle_heap()
        self.schemas = dict(schemas)
        self.backends = backends
        self._slots = asyncio.Semaphore(max_concurrency)

    async def send(
        self,
        subgraph: str,
        query: str,
        variables: Mapping[str, Any],
        operation_name: str | None,
        forwarded: Forwarded,
    ) -> SubgraphResponse:
        from subgraphs.graphql.context import SubgraphContext

        schema = self.schemas.get(subgraph)
        if schema is None:
            raise SubgraphUnavailable(subgraph, "it is not served in this process")
        headers = forwarded.headers
        context = SubgraphContext(
            self.backends,
            authorization=headers.get("authorization"),
            facility=headers.get("x-facility-id"),
            base=forwarded.base,
            request_id=headers.get("x-request-id", ""),
            client=forwarded.client,
        )
        try:
            async with self._slots:
                result = await schema.execute(
                    query, variable_values=dict(variables), context_value=context, operation_name=operation_name
                )
        except Exception:  # the schema's own errors are in the result; this is a bug, not an answer
            log.exception("in-process subgraph %s failed", subgraph)
            raise SubgraphUnavailable(subgraph, "it failed unexpectedly") from None
        errors = [dict(error.formatted) for error in result.errors or ()]
        return SubgraphResponse(result.data, errors)

    async def close(self) -> None:
        """Nothing to close: the backends belong to the caller."""
