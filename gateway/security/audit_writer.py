"""Group commit for access records: many requests' records, one transaction per facility.

Contract: ``await writer.record(audit)`` returns once ``audit`` is committed to the outbox — the
request may then answer — or raises what the commit raised. Records that arrive while a commit is
running are committed together by the next one (no timer, no added latency when idle), so under
load a read costs a share of one write transaction instead of a whole one. Records of different
facilities go in different transactions (row-level security keys on the facility).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from subgraphs.store.repository import ResourceRepository

from .audit import AccessAudit, persist

OpenRepository = Callable[[str], AbstractAsyncContextManager[ResourceRepository]]


class AuditWriter:
    def __init__(self, open_repository: OpenRepository) -> None:
        self._open = open_repository
        self._pending: list[tuple[AccessAudit, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def record(self, audit: AccessAudit) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((audit, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_all())
        await future

    async def _flush_all(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            by_facility: dict[str, list[tuple[AccessAudit, asyncio.Future[None]]]] = defaultdict(list)
            for audit, future in batch:
                by_facility[audit.facility or ""].append((audit, future))
            for facility, items in by_facility.items():
                try:
                    async with self._open(facility) as repo:
                        for audit, _ in items:
                            await persist(repo, audit)
                except BaseException as exc:  # every waiter learns the outcome of its commit
                    for _, future in items:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for _, future in items:
                    if not future.done():
                        future.set_result(None)
