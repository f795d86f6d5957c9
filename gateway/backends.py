"""The one place that picks backends from settings.

Contract: :func:`open_backends` builds everything a process needs for its profile and nothing at
import time; :meth:`Backends.repository` opens one transaction bound to one facility and yields the
repository over it (commit on normal exit, rollback on error).

Database: SQLite (embedded) or PostgreSQL. Bus: in-process (default) or Kafka. Relay: ``inline``
runs the outbox relay as a task of this process, woken after every write commit (on PostgreSQL
it needs ``UNIHEALTH_RELAY_DATABASE_URL``, a role that sees every facility's outbox; without it
the relay stays off here and runs as its own process); ``off`` leaves it to another process.
The audit sealer is subscribed to the bus here when this process consumes it in-process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from streams.bus import Bus, InProcessBus, KafkaBus
from streams.cache import Cache, MemoryCache, RedisCache
from streams.embedded import subscribe_embedded
from streams.relay import Relay, wait_stopped
from subgraphs.store.access import AccessPolicy
from subgraphs.store.database import Database, open_database
from subgraphs.store.links import PatientLinker
from subgraphs.store.repository import ResourceRepository

from .context import RequestContext
from .security.audit import AccessAudit, persist
from .security.audit_writer import AuditWriter
from .security.tokens import TokenVerifier
from .settings import Settings

_INTERNAL = AccessPolicy.unrestricted("internal")
log = logging.getLogger("unihealth.backends")


@dataclass
class Backends:
    settings: Settings
    db: Database
    verifier: TokenVerifier
    bus: Bus
    cache: Cache
    linker: PatientLinker | None = None
    relay: Relay | None = None
    _relay_db: Database | None = None
    _relay_task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _audit_writer: AuditWriter | None = None

    @asynccontextmanager
    async def repository(
        self, facility: str, *, write: bool, policy: AccessPolicy = _INTERNAL
    ) -> AsyncIterator[ResourceRepository]:
        """One transaction for ``facility``; ``policy`` defaults to unrestricted (internal callers)."""
        async with self.db.transaction(write=write, facility=facility) as conn:
            yield ResourceRepository(self.db, conn, facility, policy, self.linker)
        if write and self.relay is not None:
            self.relay.wake()  # committed: publish now rather than at the next poll

    @asynccontextmanager
    async def session(self, ctx: RequestContext, *, write: bool) -> AsyncIterator[ResourceRepository]:
        """The request's transaction, under the caller's access policy. What the request read or
        wrote goes into its access record; a single write commits that record with the change."""
        async with self.repository(ctx.facility, write=write, policy=ctx.policy) as repo:
            yield repo
            if ctx.audit is not None:
                ctx.audit.absorb(repo)
                repo.touched.clear()
                if write and ctx.audit.inline:
                    ctx.audit.status = ctx.audit.status or 200
                    await persist(repo, ctx.audit)

    async def record_access(self, audit: AccessAudit) -> None:
        """Persist ``audit`` (group-committed with concurrent ones) unless it already went out with a write."""
        if audit.recorded or audit.facility is None:
            return
        if self._audit_writer is None:
            self._audit_writer = AuditWriter(lambda facility: self.repository(facility, write=True))
        await self._audit_writer.record(audit)

    async def _final_drain(self, seconds: float = 10.0) -> None:
        """Publish what the stopped relay left (access records waiting to be sealed in a batch),
        bounded; whatever is left stays in the outbox for the next start."""
        assert self.relay is not None
        try:
            async with asyncio.timeout(seconds):
                while await self.relay.drain_once(1000):
                    pass
        except Exception:
            log.warning("outbox relay: rows left unpublished at shutdown (published at the next start)", exc_info=True)

    async def close(self) -> None:
        self._stop.set()
        if self._relay_task is not None:
            await wait_stopped(self._relay_task)
            await self._final_drain()
        await self.bus.stop()
        await self.cache.close()
        if self._relay_db is not None:
            await self._relay_db.dispose()
        await self.db.dispose()


async def open_backends(settings: Settings) -> Backends:
    """Connect to the configured database and bring its schema up to date."""
    db = open_database(
        settings.database_url, migration_url=settings.migration_database_url, keyring=settings.payload_keys
    )
    await db.create_schema()
    if db.dialect == "sqlite":
        await db.analyze()  # SQLite plans badly without statistics; bounded by analysis_limit
    bus: Bus = KafkaBus(settings.kafka_bootstrap) if settings.bus == "kafka" else InProcessBus()
    cache: Cache = RedisCache.from_url(settings.cache_url) if settings.cache_url else MemoryCache()
    if settings.bus == "inprocess":
        subscribe_embedded(bus, db, cache=cache)  # the worker's handlers, in this process
    linker = PatientLinker(settings.national_id_system, settings.secret_key)
    backends = Backends(settings=settings, db=db, verifier=TokenVerifier(settings), bus=bus, linker=linker, cache=cache)
    await bus.start()
    if settings.relay == "inline":
        relay_db = db
        if db.dialect == "postgresql":
            if not settings.relay_database_url:
                log.warning("relay is off in this process: set UNIHEALTH_RELAY_DATABASE_URL (a unihealth_relay role)")
                return backends
            relay_db = backends._relay_db = open_database(settings.relay_database_url, pool_size=2)
        backends.relay = Relay(relay_db, bus)
        in_process = isinstance(bus, InProcessBus)  # the sealer shares this process's CPU: seal in batches
        backends._relay_task = asyncio.create_task(
            backends.relay.run(
                stop_event=backends._stop,
                retention=settings.outbox_retention,
                audit_linger=settings.audit_linger_ms / 1000 if in_process else 0.0,
            )
        )
    return backends
