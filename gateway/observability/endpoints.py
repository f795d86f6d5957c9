"""``GET /metrics`` and ``GET /readyz`` of the edge and the subgraphs.

Contract:

* ``/metrics``: the Prometheus text exposition of :data:`streams.metrics.REGISTRY` (what this
  process has recorded, plus its collectors, e.g. the outbox backlog). No authentication: serve it
  on a private network (the labels carry no PHI, no ids and no facilities).
* ``/readyz``: 200 ``{"status": "ready", "checks": {...}}`` when every dependency answers within
  ``READY_TIMEOUT`` seconds, else 503 ``{"status": "unavailable", "failed": [names], "checks": {...}}``.
  Checks: ``database`` (``SELECT 1`` in a read transaction, no facility) and, when the cache is
  Redis, ``cache`` (``PING``). A failed check shows only the exception's type; the details go to
  the log. ``/healthz`` stays liveness only (the process answers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streams.cache import Cache, RedisCache
from streams.metrics import CONTENT_TYPE, REGISTRY

from .cache import CountingCache

if TYPE_CHECKING:
    from gateway.backends import Backends
    from subgraphs.store.database import Database

log = logging.getLogger("unihealth.readiness")
READY_TIMEOUT = 2.0


async def metrics_endpoint(request: Request) -> Response:
    return Response(await REGISTRY.exposition(), media_type=CONTENT_TYPE)


async def check_database(db: Database) -> None:
    async with db.transaction(write=False) as conn:
        await conn.execute(text("SELECT 1"))


async def check_cache(cache: Cache) -> None:
    inner = cache.inner if isinstance(cache, CountingCache) else cache
    if isinstance(inner, RedisCache):
        await inner.client.ping()


async def _run(name: str, check: Awaitable[None], seconds: float) -> str:
    try:
        async with asyncio.timeout(seconds):
            await check
        return "ok"
    except Exception as exc:
        log.warning("readiness: %s failed: %r", name, exc)
        return f"unavailable ({type(exc).__name__})"


async def readiness(backends: Backends | None, seconds: float = READY_TIMEOUT) -> tuple[bool, dict[str, object]]:
    """(ready, the JSON body of ``/readyz``) for ``backends`` (None: not opened yet)."""
    checks: dict[str, str] = {}
    if backends is None:
        checks["backends"] = "not open"
    else:
        names = ["database"]
        work = [check_database(backends.db)]
        inner = backends.cache.inner if isinstance(backends.cache, CountingCache) else backends.cache
        if isinstance(inner, RedisCache):
            names.append("cache")
            work.append(check_cache(inner))
        results = await asyncio.gather(*(_run(n, w, seconds) for n, w in zip(names, work, strict=True)))
        checks.update(zip(names, results, strict=True))
    failed = [name for name, result in checks.items() if result != "ok"]
    body: dict[str, object] = {"status": "unavailable" if failed else "ready", "checks": checks}
    if failed:
        body["failed"] = failed
    return not failed, body


async def readyz_endpoint(request: Request) -> Response:
    ready, body = await readiness(getattr(request.app.state, "backends", None))
    return JSONResponse(body, status_code=200 if ready else 503)


def observability_routes(*, metrics: bool) -> list[Route]:
    """``/readyz``, and ``/metrics`` when ``metrics`` is on."""
    routes = [Route("/readyz", readyz_endpoint, methods=["GET"])]
    if metrics:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    return routes
