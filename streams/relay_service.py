"""The outbox relay as its own process: ``unihealth streams relay``.

Contract:

* Settings come from :func:`gateway.settings.load_settings` (``UNIHEALTH_*``). The database is
  ``UNIHEALTH_RELAY_DATABASE_URL`` if set, else ``UNIHEALTH_DATABASE_URL`` (on PostgreSQL it must be
  a role in ``unihealth_relay``, which sees every facility's outbox). The bus is Kafka
  (``UNIHEALTH_BUS=kafka``, ``UNIHEALTH_KAFKA_BOOTSTRAP``): a relay process with an in-process bus
  would publish to nobody, so that is refused.
* It runs :meth:`streams.relay.Relay.run` (at-least-once, per-key order; several relay processes
  may run at once on PostgreSQL) until SIGTERM or SIGINT, then lets the current drain finish
  (bounded by ``shutdown_timeout``), flushes the producer and exits 0. An unreachable broker at
  start is retried with backoff, as are failed drains.
* While it runs, its collectors are on :data:`streams.metrics.REGISTRY`: ``unihealth_outbox_unpublished``
  (rows), ``unihealth_outbox_oldest_unpublished_age_seconds`` (read on scrape),
  ``unihealth_relay_published_total``, ``unihealth_relay_held_back_total`` and
  ``unihealth_relay_failed_drains_total``. With ``metrics_port`` it serves them on ``/metrics``, and
  ``/healthz`` (200 while the relay loop runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from subgraphs.store.database import Database, libpq_dsn, open_database
from subgraphs.store.dates import as_utc
from subgraphs.store.schema import outbox
from subgraphs.store.writes import OUTBOX_CHANNEL

from . import metrics
from .bus import KafkaBus
from .relay import Relay, wait_stopped

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger("unihealth.relay")


@dataclass(frozen=True, slots=True)
class RelayOptions:
    poll_interval: float = 0.02
    batch: int = 500
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    shutdown_timeout: float = 30.0
    connect_backoff: float = 5.0


def relay_database_url(settings: Settings) -> str:
    """``UNIHEALTH_RELAY_DATABASE_URL`` if set, else ``UNIHEALTH_DATABASE_URL``."""
    return settings.relay_database_url or settings.database_url


OUTBOX_COUNT_CAP = 1_000_000
""":func:`outbox_lag` counts at most this many unpublished rows (a scrape stays bounded)."""


async def outbox_lag(db: Database) -> tuple[int, float]:
    """(unpublished rows — at most :data:`OUTBOX_COUNT_CAP`, age in seconds of the oldest one — 0
    when none). Both read the partial index of unpublished rows; no facility is set, so on
    PostgreSQL ``db`` must be a role that sees every facility's outbox (``unihealth_relay``)."""
    async with db.transaction(write=False) as conn:
        pending = outbox.c.published_at.is_(None)
        capped = select(outbox.c.seq).where(pending).limit(OUTBOX_COUNT_CAP).subquery()
        count = int((await conn.execute(select(func.count()).select_from(capped))).scalar_one())
        oldest = (
            await conn.execute(select(outbox.c.occurred_at).where(pending).order_by(outbox.c.seq).limit(1))
        ).scalar_one_or_none()
    age = 0.0 if oldest is None else max(0.0, (datetime.now(UTC) - as_utc(oldest)).total_seconds())
    return count, age


def outbox_metrics(count: int, age: float) -> list[metrics.Metric]:
    """The outbox backlog gauges (also served by the edge when its inline relay can see them)."""
    return [
        metrics.Metric("unihealth_outbox_unpublished", "gauge", "outbox rows not yet published").add(count),
        metrics.Metric(
            "unihealth_outbox_oldest_unpublished_age_seconds", "gauge", "age of the oldest unpublished outbox row"
        ).add(age),
    ]


def outbox_collector(db: Database) -> metrics.Collect:
    """A registry collector of :func:`outbox_metrics`, read from ``db`` on every scrape."""

    async def outbox_backlog() -> list[metrics.Metric]:
        return outbox_metrics(*await outbox_lag(db))

    return outbox_backlog


def relay_metrics(relay: Relay) -> list[metrics.Metric]:
    return [
        metrics.Metric("unihealth_relay_published_total", "counter", "outbox rows published and marked").add(
            relay.published
        ),
        metrics.Metric(
            "unihealth_relay_held_back_total", "counter", "claimed rows left for later behind an older row of their key"
        ).add(relay.held_back),
        metrics.Metric("unihealth_relay_failed_drains_total", "counter", "drains that failed and were retried").add(
            relay.failed_drains
        ),
        metrics.Metric(
            "unihealth_relay_purged_total", "counter", "published outbox rows deleted past the retention"
        ).add(relay.purged),
    ]


async def _start_bus(bootstrap: str, stop: asyncio.Event, backoff: float) -> KafkaBus | None:
    """A started KafkaBus, retrying while the broker is unreachable; None if ``stop`` was set first."""
    while not stop.is_set():
        bus = KafkaBus(bootstrap, client_id="unihealth-relay", connect_timeout=10.0)
        try:
            await bus.start()
            return bus
        except Exception as exc:
            log.warning("relay: Kafka at %s is not reachable (%r); retrying in %.0f s", bootstrap, exc, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
    return None


async def run_relay(settings: Settings, options: RelayOptions, stop: asyncio.Event) -> None:
    """Relay until ``stop`` is set (see the module docstring); returns after a clean shutdown."""
    if settings.bus != "kafka" or not settings.kafka_bootstrap:
        raise ValueError("the relay process publishes to Kafka: set UNIHEALTH_BUS=kafka and UNIHEALTH_KAFKA_BOOTSTRAP")
    db = open_database(relay_database_url(settings), pool_size=2)
    server: asyncio.Server | None = None
    bus: KafkaBus | None = None
    unregister: list[Callable[[], None]] = []
    try:
        bus = await _start_bus(settings.kafka_bootstrap, stop, options.connect_backoff)
        if bus is None:
            return
        relay = Relay(db, bus)
        task = asyncio.create_task(
            relay.run(
                stop_event=stop,
                poll_interval=options.poll_interval,
                limit=options.batch,
                retention=settings.outbox_retention,
            ),
            name="relay",
        )

        async def relay_counters() -> list[metrics.Metric]:
            return relay_metrics(relay)

        unregister.append(metrics.REGISTRY.collector(relay_counters))
        unregister.append(metrics.REGISTRY.collector(outbox_collector(db)))
        stop_listening = await listen_for_commits(db.url, relay)
        if options.metrics_port is not None:
            server = await metrics.serve(
                options.metrics_host, options.metrics_port, metrics.REGISTRY, lambda: not task.done()
            )
            log.info("relay: metrics on http://%s:%d/metrics", options.metrics_host, metrics.bound_port(server))
        log.info("relay: publishing the outbox of %s to Kafka at %s", db.dialect, settings.kafka_bootstrap)
        started = time.monotonic()
        await stop.wait()
        await wait_stopped(task, options.shutdown_timeout)
        if stop_listening is not None:
            await stop_listening()
        log.info("relay: stopped after %.1f s; %d rows published", time.monotonic() - started, relay.published)
    finally:
        for remove in unregister:
            remove()
        if server is not None:
            server.close()
        if bus is not None:
            await bus.stop()
        await db.dispose()


async def listen_for_commits(url: str, relay: Relay) -> Callable[[], Awaitable[None]] | None:
    """PostgreSQL: ``LISTEN`` on the outbox channel on a connection of its own and wake ``relay``
    at every notification (writers signal it on commit), so a change is published at once
    rather than at the next poll. Returns the close function, or None where that is not possible
    (SQLite, or the connection failed: the relay then just polls)."""
    if not url.startswith("postgresql"):
        return None
    import asyncpg

    try:
        conn = await asyncpg.connect(libpq_dsn(url))
        await conn.add_listener(OUTBOX_CHANNEL, lambda *_: relay.wake())
    except (OSError, asyncpg.PostgresError) as exc:
        log.warning("relay: cannot LISTEN for commits (%r); polling only", exc)
        return None

    async def close() -> None:
        with contextlib.suppress(Exception):
            await conn.close(timeout=5)

    return close


def main(settings: Settings, options: RelayOptions) -> None:
    """Run the relay in this process until SIGTERM/SIGINT (blocking)."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_relay(settings, options, stop)

    asyncio.run(run())
