"""The outbox relay: publishes committed ``outbox`` rows to the bus, then marks them published.

Contract:

* Every change commits an ``outbox`` row in the same transaction as the change (see
  :mod:`subgraphs.store.repository`). :meth:`Relay.drain_once` reads unpublished rows in ``seq``
  order, publishes each as a :class:`~streams.events.ChangeEvent` to
  :func:`~streams.events.topic_for` its type, keyed by :func:`~streams.events.message_key`, and
  sets ``published_at`` **only after the bus acknowledged the whole batch**. If publishing fails
  nothing of the batch is marked and the error propagates; :meth:`Relay.run` logs it, backs off and
  retries, so no committed change is ever lost.
* At least once: a crash (or a publish timeout) after the broker accepted a batch but before the
  mark commits republishes those events with the same ``event_id`` — consumers deduplicate on it.
* Order: events of one key (one patient, or one resource outside any compartment) are published in
  ``seq`` order, which follows commit order for changes that causally follow each other (writers of
  one resource are serialized by the store's locks, so its versions always appear in order).
* PostgreSQL: rows are claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` inside one transaction
  that stays open until they are marked, so any number of relays (processes) can run at once and
  no row is published by two of them at the same time. To keep per-key order across relays, a
  relay holds back a claimed row when an older unpublished row of the same key is not in its own
  claim (another relay holds it, or it committed after the claim); the oldest row of every key
  always progresses, so this cannot livelock.
* Retention: published rows are only a transport's receipt. :meth:`Relay.purge` deletes the oldest
  rows while they were published before a cut-off, in ``seq`` order, stopping at the first row that
  is unpublished or younger — so an unpublished row is never deleted and nothing behind it either.
  :meth:`Relay.run` purges every ``purge_interval`` seconds when given a ``retention``. The broker
  (Kafka's topic retention) then holds the events; keep it longer than a worker can be down.
* Access records may wait (:meth:`Relay.run` with ``audit_linger`` > 0; the embedded profile's
  inline relay): a drain of :meth:`run` publishes change rows at once but leaves the access
  records (operation ``audit``) unpublished while there are fewer than ``audit_batch`` of them in
  its read and the oldest is younger than ``audit_linger`` seconds; then all of them go, in
  ``seq`` order. Sealing one record alone costs ~4.3 ms of CPU, in batches of 8 or more ~1.1-1.5
  ms each (measured, SQLite); every read writes one, and in process the sealer shares the CPU
  with the requests. The records are committed before any response (nothing is lost by waiting);
  they are only chained and searchable up to ``audit_linger`` later. Cache invalidation and the
  change stream never wait. :meth:`drain_once` itself always publishes everything it reads.
* SQLite (embedded, one process): a plain ordered read, publish outside any transaction (so
  in-process handlers may write to the store), then a short write transaction marks the rows. Run
  one relay per SQLite database; concurrent calls on one :class:`Relay` are serialized.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Select, TextualSelect, bindparam, delete, select, text, update

from subgraphs.store.database import Database, SqlConnection
from subgraphs.store.dates import as_utc, instant
from subgraphs.store.schema import outbox

from .bus import Bus, Message
from .events import AuditRecord, ChangeEvent, message_key

log = logging.getLogger(__name__)

AUDIT_OPERATION = "audit"
"""Outbox rows with this operation carry an access record (``payload``), not a change."""

_COLUMNS = (
    outbox.c.seq,
    outbox.c.event_id,
    outbox.c.facility,
    outbox.c.type,
    outbox.c.id,
    outbox.c.version,
    outbox.c.operation,
    outbox.c.patient_id,
    outbox.c.previous_patient_id,
    outbox.c.occurred_at,
    outbox.c.payload,
)


def event_from_row(row: Any) -> ChangeEvent:
    """The change event for one ``outbox`` row."""
    return ChangeEvent(
        event_id=row.event_id,
        facility=row.facility,
        resource_type=row.type,
        resource_id=row.id,
        version=row.version,
        operation=row.operation,
        patient_id=row.patient_id,
        occurred_at=instant(as_utc(row.occurred_at)),
        previous_patient_id=row.previous_patient_id,
    )


def message_from_row(row: Any) -> Message:
    """The bus message for one ``outbox`` row: a change event, or (operation ``audit``) the access
    record stored in its payload, on the audit topic."""
    if row.operation == AUDIT_OPERATION:
        record = AuditRecord(row.event_id, row.facility, instant(as_utc(row.occurred_at)), orjson.loads(row.payload))
        return Message(record.topic, record.key, record.to_json())
    event = event_from_row(row)
    return Message(event.topic, event.key, event.to_json())


def _row_key(row: Any) -> bytes:
    if row.operation == AUDIT_OPERATION:
        return str(row.facility).encode()
    return message_key(row.facility, row.type, row.id, row.patient_id)


def _pending(limit: int) -> Select[Any]:
    return select(*_COLUMNS).where(outbox.c.published_at.is_(None)).order_by(outbox.c.seq).limit(limit)


_SQLITE_PENDING: TextualSelect = text(
    f"SELECT {', '.join(c.name for c in _COLUMNS)} FROM outbox INDEXED BY ix_outbox_unpublished "
    "WHERE published_at IS NULL ORDER BY seq LIMIT :limit"
).columns(*_COLUMNS)
""":func:`_pending` for SQLite, pinned to the partial index of unpublished rows. SQLite's planner,
given statistics taken while the import's rows were still unpublished (``ANALYZE`` at start),
walks the whole table in ``seq`` order instead — every poll then reads every published row and
its payload (2 ms at 3,000 rows, growing with the outbox; the relay polls 20 times a second and
after every commit)."""


_MARK = (
    update(outbox)
    .where(outbox.c.seq.in_(bindparam("seqs", expanding=True)), outbox.c.published_at.is_(None))
    .values(published_at=bindparam("now", type_=outbox.c.published_at.type))
)
"""Marks rows published (built once: the relay runs it after every drain)."""


class Relay:
    """Drains the outbox of ``db`` to ``bus`` (see the module docstring for the guarantees)."""

    def __init__(self, db: Database, bus: Bus, *, drain_timeout: float = 120.0, max_backoff: float = 5.0) -> None:
        self.db = db
        self.bus = bus
        self.drain_timeout = drain_timeout
        self.max_backoff = max_backoff
        self.published = 0
        """Rows this relay has published and marked (a counter for metrics and tests)."""
        self.held_back = 0
        """Claimed rows left for a later drain because an older row of their key was elsewhere."""
        self.failed_drains = 0
        """Drains of :meth:`run` that failed (publish or database error) and were retried."""
        self.purged = 0
        """Published rows this relay deleted past the retention (:meth:`purge`)."""
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Make a running :meth:`run` drain now instead of at its next poll (call after a commit)."""
        self._wakeup.set()

    async def drain_once(self, limit: int = 500) -> int:
        """Publish up to ``limit`` unpublished rows in ``seq`` order; returns how many were marked.

        Raises what the bus raised (nothing is marked then), or TimeoutError past ``drain_timeout``.
        """
        return await self._drain(limit, None)

    async def _drain(self, limit: int, linger: tuple[float, int] | None) -> int:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        async with self._lock, asyncio.timeout(self.drain_timeout):
            if self.db.dialect == "postgresql":
                count = await self._drain_claiming(limit, linger)
            else:
                count = await self._drain_single(limit, linger)
        self.published += count
        return count

    async def purge(self, retention: timedelta, *, batch: int = 5000) -> int:
        """Delete published rows older than ``retention`` (by ``published_at``), oldest first, up to
        ``batch`` per statement until the oldest remaining row is unpublished or younger; returns
        how many were deleted. Reads at most ``batch`` rows per round: the front of the outbox."""
        if batch < 1:
            raise ValueError("batch must be at least 1")
        cutoff = datetime.now(UTC) - retention
        deleted = 0
        while True:
            async with self.db.transaction(write=True) as conn:
                front = list(
                    await conn.execute(select(outbox.c.seq, outbox.c.published_at).order_by(outbox.c.seq).limit(batch))
                )
                last: int | None = None
                for row in front:
                    if row.published_at is None or as_utc(row.published_at) >= cutoff:
                        break
                    last = row.seq
                if last is None:
                    break
                result = await conn.execute(
                    delete(outbox).where(outbox.c.seq <= last, outbox.c.published_at.is_not(None))
                )
                deleted += int(getattr(result, "rowcount", 0) or 0)
            if last != front[-1].seq or len(front) < batch:
                break
        self.purged += deleted
        return deleted

    async def run(
        self,
        *,
        stop_event: asyncio.Event,
        poll_interval: float = 0.05,
        limit: int = 500,
        retention: timedelta | None = None,
        purge_interval: float = 60.0,
        audit_linger: float = 0.0,
        audit_batch: int = 32,
    ) -> None:
        """Drain until ``stop_event`` is set: at once while rows keep coming, else every ``poll_interval``
        seconds (or on :meth:`wake`); failures are logged and retried with exponential backoff. With
        a ``retention``, also :meth:`purge` every ``purge_interval`` seconds (first at start). With
        ``audit_linger`` > 0, access records wait as the module docstring says."""
        linger = (audit_linger, max(1, audit_batch)) if audit_linger > 0 else None
        failures = 0
        next_purge = 0.0
        loop = asyncio.get_running_loop()
        while not stop_event.is_set():
            delay = poll_interval
            try:
                if await self._drain(limit, linger) > 0:
                    delay = 0.0
                if retention is not None and loop.time() >= next_purge:
                    next_purge = loop.time() + purge_interval
                    if purged := await self.purge(retention):
                        log.info("outbox relay: deleted %d published rows older than %s", purged, retention)
                failures = 0
            except Exception:
                failures += 1
                self.failed_drains += 1
                delay = min(self.max_backoff, poll_interval * 2**failures)
                log.exception("outbox relay: publishing failed (%d in a row); retrying in %.2f s", failures, delay)
            if delay > 0:
                await self._sleep(delay, stop_event)

    async def _sleep(self, delay: float, stop_event: asyncio.Event) -> None:
        waiters = {asyncio.ensure_future(stop_event.wait()), asyncio.ensure_future(self._wakeup.wait())}
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            self._wakeup.clear()

    # ---------------------------------------------------------------- SQLite
    async def _drain_single(self, limit: int, linger: tuple[float, int] | None) -> int:
        async with self.db.transaction(write=False) as conn:
            rows = _without_waiting_audits(list(await conn.execute(_SQLITE_PENDING, {"limit": limit})), linger)
        if not rows:
            return 0
        await self._publish(rows)
        async with self.db.transaction(write=True) as conn:
            await self._mark(conn, rows)
        return len(rows)

    # ---------------------------------------------------------------- PostgreSQL
    async def _drain_claiming(self, limit: int, linger: tuple[float, int] | None) -> int:
        async with self.db.transaction(write=True) as conn:
            claimed = list(await conn.execute(_pending(limit).with_for_update(skip_locked=True)))
            if not claimed:
                return 0
            rows = _without_waiting_audits(await self._in_key_order(conn, claimed), linger)
            if not rows:
                return 0
            await self._publish(rows)
            await self._mark(conn, rows)
        return len(rows)

    async def _in_key_order(self, conn: SqlConnection, claimed: list[Any]) -> list[Any]:
        """The claimed rows that may go now: none with an older unpublished row of its key outside the claim."""
        seqs = [r.seq for r in claimed]
        older = await conn.execute(
            select(
                outbox.c.seq, outbox.c.facility, outbox.c.type, outbox.c.id, outbox.c.patient_id, outbox.c.operation
            ).where(outbox.c.published_at.is_(None), outbox.c.seq < seqs[-1], outbox.c.seq.not_in(seqs))
        )
        first_held: dict[bytes, int] = {}
        for row in older:
            key = _row_key(row)
            first_held[key] = min(row.seq, first_held.get(key, row.seq))
        if not first_held:
            return claimed
        ready = [r for r in claimed if r.seq < first_held.get(_row_key(r), r.seq + 1)]
        self.held_back += len(claimed) - len(ready)
        if len(ready) < len(claimed):
            log.debug("outbox relay: holding back %d rows behind older rows of their keys", len(claimed) - len(ready))
        return ready

    # ---------------------------------------------------------------- shared
    async def _publish(self, rows: Sequence[Any]) -> None:
        await self.bus.publish_many([message_from_row(row) for row in rows])

    async def _mark(self, conn: SqlConnection, rows: Sequence[Any]) -> None:
        now = datetime.now(UTC)
        seqs = [r.seq for r in rows]
        for start in range(0, len(seqs), 1000):
            await conn.execute(_MARK, {"seqs": seqs[start : start + 1000], "now": now})


def _without_waiting_audits(rows: list[Any], linger: tuple[float, int] | None) -> list[Any]:
    """``rows`` without their access records when those may still wait (module docstring)."""
    if linger is None:
        return rows
    audits = [r for r in rows if r.operation == AUDIT_OPERATION]
    if not audits or len(audits) >= linger[1]:
        return rows
    oldest = min(as_utc(r.occurred_at) for r in audits)
    if (datetime.now(UTC) - oldest).total_seconds() >= linger[0]:
        return rows
    return [r for r in rows if r.operation != AUDIT_OPERATION]


async def wait_stopped(task: asyncio.Task[None], limit: float = 30.0) -> None:
    """Wait (bounded) for a :meth:`Relay.run` task whose stop event was set; cancel it past ``limit``."""
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
