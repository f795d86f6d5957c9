"""The one place that picks backends from settings.

Contract: :func:`open_backends` builds everything a process needs for its profile and nothing at
import time; :meth:`Backends.repository` opens one transaction bound to one facility and yields the
repository over it (commit on normal exit, rollback on error). The embedded profile uses SQLite;
production uses PostgreSQL. Cache and event-bus backends join here in later issues.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from subgraphs.store.database import Database, open_database
from subgraphs.store.repository import ResourceRepository

from .settings import Settings


@dataclass
class Backends:
    settings: Settings
    db: Database

    @asynccontextmanager
    async def repository(self, facility: str, *, write: bool) -> AsyncIterator[ResourceRepository]:
        async with self.db.transaction(write=write) as conn:
            yield ResourceRepository(self.db, conn, facility)

    async def close(self) -> None:
        await self.db.dispose()


async def open_backends(settings: Settings) -> Backends:
    """Connect to the configured database and bring its schema up to date."""
    db = open_database(settings.database_url)
    await db.create_schema()
    if db.dialect == "sqlite":
        await db.analyze()  # SQLite plans badly without statistics; bounded by analysis_limit
    return Backends(settings=settings, db=db)
