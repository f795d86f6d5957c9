"""Every metric family of the edge and the subgraphs, and the functions that record into them.

Contract: the families live in :data:`streams.metrics.REGISTRY` (created at import, no I/O); the
``record_*`` functions are what other modules call — each is a dictionary lookup and a few
additions. Every label is bounded: route templates (never raw paths), methods, status classes,
subgraph names from the supergraph, loader kinds and resource types, cache kinds from a fixed list,
and GraphQL operation names capped at the first :data:`MAX_OPERATION_NAMES` seen (then
``other``; unnamed operations are ``anonymous``). No label ever carries an id, a facility or a
value from a request body.

Hooks for other modules: :func:`record_cache` (e.g. the GraphQL response cache:
``record_cache("graphql", hit)``), :func:`record_graphql_operation`.
"""

from __future__ import annotations

from streams.metrics import REGISTRY, Bounded

MAX_OPERATION_NAMES = 100
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CACHE_KINDS = ("summary", "graphql", "search", "resource")
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

HTTP_DURATION = REGISTRY.histogram(
    "unihealth_http_request_duration_seconds",
    "HTTP request duration, by route template, method and status class",
    ["service", "route", "method", "status"],
)
GRAPHQL_DURATION = REGISTRY.histogram(
    "unihealth_graphql_operation_duration_seconds",
    "GraphQL operation duration at this process, by operation name (bounded) and status class",
    ["service", "operation", "status"],
)
CACHE_REQUESTS = REGISTRY.counter(
    "unihealth_cache_requests_total", "cache lookups by cache kind and result (hit|miss)", ["cache", "result"]
)
DATALOADER_BATCH = REGISTRY.histogram(
    "unihealth_dataloader_batch_size",
    "keys answered by one DataLoader batch (one SQL statement), by loader and resource type",
    ["loader", "type"],
    buckets=BATCH_BUCKETS,
)
SUBGRAPH_REQUESTS = REGISTRY.counter(
    "unihealth_subgraph_requests_total",
    "requests the gateway sent to a subgraph, by outcome (ok|errors|unavailable)",
    ["subgraph", "outcome"],
)
SUBGRAPH_DURATION = REGISTRY.histogram(
    "unihealth_subgraph_request_duration_seconds", "gateway-to-subgraph request duration", ["subgraph"]
)

_operation_names = Bounded(MAX_OPERATION_NAMES)


def status_class(status: int) -> str:
    """``2xx``, ``4xx``... (``5xx`` for anything out of range)."""
    return f"{status // 100}xx" if 100 <= status < 600 else "5xx"


def operation_label(name: str | None) -> str:
    """The bounded label of a GraphQL operation name."""
    return _operation_names(name) if name else "anonymous"


def record_http(service: str, route: str, method: str, status: int, seconds: float) -> None:
    """One HTTP request (a method outside :data:`METHODS` is labelled ``other``: clients choose it)."""
    method = method if method in METHODS else "other"
    HTTP_DURATION.labels(service, route, method, status_class(status)).observe(seconds)


def record_graphql_operation(service: str, name: str | None, status: int, seconds: float) -> None:
    """One GraphQL operation served by ``service`` with HTTP ``status``."""
    GRAPHQL_DURATION.labels(service, operation_label(name), status_class(status)).observe(seconds)


def record_cache(kind: str, hit: bool) -> None:
    """One cache lookup of ``kind`` (one of :data:`CACHE_KINDS`; anything else counts as ``other``)."""
    CACHE_REQUESTS.labels(kind if kind in CACHE_KINDS else "other", "hit" if hit else "miss").inc()


def record_batch(loader: str, resource_type: str, size: int) -> None:
    """One DataLoader batch of ``size`` keys."""
    DATALOADER_BATCH.labels(loader, resource_type).observe(size)


def record_subgraph_request(subgraph: str, outcome: str, seconds: float) -> None:
    """One gateway-to-subgraph request: ``outcome`` is ``ok``, ``errors`` or ``unavailable``."""
    SUBGRAPH_REQUESTS.labels(subgraph, outcome).inc()
    SUBGRAPH_DURATION.labels(subgraph).observe(seconds)
