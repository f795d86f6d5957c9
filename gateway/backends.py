"""The one place that picks backends from settings.

Contract: :func:`open_backends` builds everything a process needs for its profile and nothing at
import time; :meth:`Backends.repository` opens one transaction bound to one facility and yields the
repository over it (commit on normal exit, rollback on error). The embedded profile uses SQLite;
production uses PostgreSQL. Cache and event-bus backends join here in later issues.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from subgraphs.store.access import AccessPolicy
from subgraphs.store.database import Database, open_database
from subgraphs.store.repository import ResourceRepository

from .context import RequestContext
from .security.tokens import TokenVerifier
from .settings import Settings

_INTERNAL = AccessPolicy.unrestricted("internal")


@dataclass
class Backends:
    settings: Settings
    db: Database
    verifier: TokenVerifier

    @asynccontextmanager
    async def repository(
        self, facility: str, *, write: bool, policy: AccessPolicy = _INTERNAL
    ) -> AsyncIterator[ResourceRepository]:
        """One transaction for ``facility``; ``policy`` defaults to unrestricted (internal callers)."""
        async with self.db.transaction(write=write, facility=facility) as conn:
            yield ResourceRepository(self.db, conn, facility, policy)

    def session(self, ctx: RequestContext, *, write: bool) -> AbstractAsyncContextManager[ResourceRepository]:
        """The request's transaction, under the caller's access policy."""
        return self.repository(ctx.facility, write=write, policy=ctx.policy)

    async def close(self) -> None:
        await self.db.dispose()


async def open_backends(settings: Settings) -> Backends:
    """Connect to the configured database and bring its schema up to date."""
    db = open_database(settings.database_url, migration_url=settings.migration_database_url)
    await db.create_schema()
    if db.dialect == "sqlite":
        await db.analyze()  # SQLite plans badly without statistics; bounded by analysis_limit
    return Backends(settings=settings, db=db, verifier=TokenVerifier(settings))
