"""Helpers for the GraphQL subgraph tests: in-process clients, queries, SQL statement counting."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
from sqlalchemy import Engine, event

from gateway.backends import Backends
from subgraphs.graphql.app import create_subgraph_app
from subgraphs.graphql.context import SubgraphContext
from subgraphs.graphql.schema import SubgraphSchema


@asynccontextmanager
async def subgraph_client(
    schema: SubgraphSchema,
    backends: Backends,
    facility: str | None,
    token: str | None,
    extra_headers: dict[str, str] | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to ``schema``'s ASGI app in-process (``/graphql``)."""
    headers = {"Content-Type": "application/json", **(extra_headers or {})}
    if facility is not None:
        headers["X-Facility-Id"] = facility
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    app = create_subgraph_app(schema, backends)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://subgraph",
        headers=headers,
        timeout=60,
    ) as client:
        yield client


async def gql(client: httpx.AsyncClient, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST a GraphQL operation; the JSON answer (asserting HTTP 200 and no stack trace)."""
    r = await client.post("/graphql", json={"query": query, "variables": variables or {}})
    assert r.status_code == 200, r.text
    assert "Traceback" not in r.text
    body: dict[str, Any] = r.json()
    return body


def codes(body: dict[str, Any]) -> list[str]:
    """The ``extensions.code`` of every error of an answer."""
    return [e.get("extensions", {}).get("code") for e in body.get("errors", [])]


def sync_engine(backends: Backends) -> Engine:
    engine: Any = backends.db.engine  # type: ignore[attr-defined]
    return engine if isinstance(engine, Engine) else engine.sync_engine


class StatementLog:
    """Statements the engine ran for the request's reads (``selects``: data reads only)."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.closed = False

    @property
    def selects(self) -> list[str]:
        return [s for s in self.statements if s.lstrip().upper().startswith("SELECT") and "set_config" not in s]


@contextmanager
def count_statements(backends: Backends) -> Iterator[StatementLog]:
    """Record the SQL statements ``backends`` runs inside the block until a subgraph request's
    transaction closes (what follows — its access record — is not the request's reads)."""
    engine = sync_engine(backends)
    log = StatementLog()
    original = SubgraphContext.close

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not log.closed:
            log.statements.append(statement)

    async def close(self: SubgraphContext, error: BaseException | None = None) -> None:
        await original(self, error)
        log.closed = True

    event.listen(engine, "before_cursor_execute", before)
    SubgraphContext.close = close  # type: ignore[method-assign]
    try:
        yield log
    finally:
        SubgraphContext.close = original  # type: ignore[method-assign]
        event.remove(engine, "before_cursor_execute", before)


def checked_out(backends: Backends) -> int:
    """Connections currently checked out of the pool (0 when every transaction is closed)."""
    pool: Any = sync_engine(backends).pool
    return int(pool.checkedout())


def entities_query(selection: str) -> str:
    return "query($reps: [_Any!]!) { _entities(representations: $reps) { ... on Patient { id " + selection + " } } }"


def reps(ids: list[str]) -> dict[str, Any]:
    return {"reps": [{"__typename": "Patient", "id": i} for i in ids]}
