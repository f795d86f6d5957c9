"""The stream worker: a Faust app whose agents call the plain handlers (``unihealth streams worker``).

Agents are thin: each one feeds the raw records of its topics to a
:class:`~streams.processing.Processor` (decode, bounded retries, dead letter) around a plain
async handler — the same handlers the embedded in-process bus calls:

=============  ==========================================  ===================================
agent          topics                                      handler
=============  ==========================================  ===================================
audit          ``unihealth.audit``                         :class:`streams.sealer.AuditSealer`
invalidate     ``unihealth.changes.<Type>`` (every type)   :class:`streams.invalidation.CacheInvalidator`
deidentify     ``unihealth.changes.<Type>`` (every type)   :class:`streams.deidentify.Deidentifier`
=============  ==========================================  ===================================

Contract:

* One consumer group (``group_id``, the Faust app id). Offsets are committed (every
  ``commit_interval`` seconds and at shutdown) only for records every agent has finished, so a
  crash redelivers: at least once. The handlers are idempotent (the sealer by ``event_id``,
  invalidation by nature) or produce deterministic output (de-identified messages carry a
  deterministic ``event_id`` for analysts to deduplicate).
* The change topics are subscribed by name, one per type the store supports
  (:data:`subgraphs.store.validation.SUPPORTED_TYPES`), not by pattern: Faust's aiokafka driver does
  not support pattern subscriptions. Missing topics are created at start (``partitions``,
  ``replication``) so the subscription sees them.
* Poison records go to ``unihealth.dead-letter``; the agent keeps going. The audit agent's sealer
  validates every AuditEvent it reads from Kafka against the R5 model (``AuditSealer(trusted=False)``,
  :mod:`streams.sealer`): an invalid one is retried, dead-lettered and never chained or stored.
* SIGTERM/SIGINT stop it gracefully (Faust's worker): offsets of finished records are committed,
  the database and cache are closed. Records still in flight are not waited for (Faust's
  ``stream_wait_empty`` is off, as the handlers are idempotent): they are redelivered.
* A broker that goes away while the worker runs is waited for (the clients reconnect). At start
  the worker waits up to 2 minutes for the broker; if Faust still cannot connect while starting
  it exits non-zero: run it under a supervisor that restarts it (systemd ``Restart=on-failure``,
  a Kubernetes Deployment), as with any consumer.
* With ``metrics_port``: ``/healthz`` (200 once consuming: started, not rebalancing, partitions
  assigned) and ``/metrics`` (per-agent processed/retried/dead-lettered
  counters and the group's consumer lag per topic/partition, from :class:`streams.lag.LagMonitor`).

Faust is imported only when the worker runs (:func:`run_worker`), never at import time of the
``unihealth`` command.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subgraphs.store.database import Database, open_database
from subgraphs.store.validation import SUPPORTED_TYPES

from . import metrics
from .bus import Handler, Message
from .cache import Cache, MemoryCache, RedisCache
from .deidentify import TOPIC_PREFIX as DEIDENTIFIED_PREFIX
from .deidentify import Deidentifier, derive_key
from .deidentify import topic as deidentified_topic
from .events import AUDIT_TOPIC, topic_for
from .invalidation import CacheInvalidator
from .lag import LagMonitor
from .processing import DEAD_LETTER_TOPIC, Processor, Record
from .sealer import AuditSealer

if TYPE_CHECKING:
    from gateway.settings import Settings

log = logging.getLogger("unihealth.worker")

AGENTS = ("audit", "invalidate", "deidentify")
CHANGE_TOPICS = tuple(topic_for(t) for t in SUPPORTED_TYPES)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    bootstrap: str
    group_id: str = "unihealth-worker"
    agents: frozenset[str] = frozenset({"audit", "invalidate"})
    cache_url: str = ""  # redis://host:port/db; "memory" only for trying things out
    deidentify_key: bytes = b""  # default: derived from UNIHEALTH_SECRET_KEY
    attempts: int = 3
    session_timeout: float = 10.0
    heartbeat_interval: float = 1.0
    commit_interval: float = 1.0
    partitions: int = 3
    replication: int = 1
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    lag_interval: float = 5.0
    log_level: str = "info"
    log_format: str = "text"  # UNIHEALTH_LOG_FORMAT: text | json

    def topics(self) -> list[str]:
        """Every topic some enabled agent consumes or produces."""
        out = [DEAD_LETTER_TOPIC]
        if "audit" in self.agents:
            out.append(AUDIT_TOPIC)
        if self.agents & {"invalidate", "deidentify"}:
            out.extend(CHANGE_TOPICS)
        if "deidentify" in self.agents:
            out.extend(deidentified_topic(t) for t in SUPPORTED_TYPES)
        return out

    def consumed(self) -> list[str]:
        """The topics the enabled agents consume (what the lag is measured on)."""
        return [t for t in self.topics() if t != DEAD_LETTER_TOPIC and not t.startswith(DEIDENTIFIED_PREFIX)]


@dataclass
class Services:
    """What the agents need, opened lazily (no I/O at construction) and closed by :meth:`close`."""

    db: Database
    cache: Cache | None
    processors: dict[str, Processor] = field(default_factory=dict)

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()
        await self.db.dispose()


def open_cache(url: str) -> Cache:
    """``redis://...`` → :class:`RedisCache`; ``memory`` → a :class:`MemoryCache` of this process."""
    if url == "memory":
        return MemoryCache()
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisCache.from_url(url)
    raise ValueError(f"cache URL must be redis://..., rediss://..., unix://... or 'memory', got {url[:60]!r}")


def build_services(settings: Settings, options: WorkerOptions, publish: Any) -> Services:
    """The handlers of the enabled agents, each wrapped in a :class:`Processor`.

    ``publish(message)`` must return once the broker acknowledged ``message``.
    """
    unknown = options.agents - set(AGENTS)
    if unknown:
        raise ValueError(f"unknown agents {sorted(unknown)}; choose from {', '.join(AGENTS)}")
    db = open_database(settings.database_url, pool_size=4, keyring=settings.payload_keys)
    cache: Cache | None = None
    handlers: dict[str, Handler] = {}
    if "audit" in options.agents:
        handlers["audit"] = AuditSealer(db, trusted=False)  # a broker's records: validate every AuditEvent
    if "invalidate" in options.agents:
        if not options.cache_url:
            raise ValueError("the invalidate agent needs a cache: --cache-url redis://...")
        cache = open_cache(options.cache_url)
        handlers["invalidate"] = CacheInvalidator(cache)
    if "deidentify" in options.agents:
        key = options.deidentify_key or derive_key(settings.secret_key)
        handlers["deidentify"] = Deidentifier(db, key, publish)
    services = Services(db, cache)
    for name, handler in handlers.items():
        services.processors[name] = Processor(name, handler, publish, attempts=options.attempts)
    return services


def worker_metrics(services: Services) -> list[metrics.Metric]:
    processed = metrics.Metric("unihealth_worker_processed_total", "counter", "records handled, per agent")
    retried = metrics.Metric("unihealth_worker_retries_total", "counter", "failed handler attempts that were retried")
    dead = metrics.Metric("unihealth_worker_dead_letters_total", "counter", "records sent to unihealth.dead-letter")
    for name, p in sorted(services.processors.items()):
        processed.add(p.processed, agent=name)
        retried.add(p.retried, agent=name)
        dead.add(p.dead_lettered, agent=name)
    return [processed, retried, dead]


async def ensure_topics(bootstrap: str, topics: list[str], partitions: int, replication: int) -> None:
    """Create the missing ones of ``topics`` (bounded; an existing topic is left as it is)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="unihealth-worker-setup")
    async with asyncio.timeout(60):
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [NewTopic(t, partitions, replication) for t in topics if t not in existing]
            if missing:
                await admin.create_topics(missing)
                log.info("worker: created topics %s", ", ".join(t.name for t in missing))
        finally:
            await admin.close()


async def _wait_for_broker(options: WorkerOptions, limit: float = 120.0) -> None:
    """Create the topics, retrying while the broker is unreachable (a worker started while the
    broker restarts waits for it); past ``limit`` seconds the last error propagates."""
    deadline = asyncio.get_running_loop().time() + limit
    delay = 0.5
    while True:
        try:
            await ensure_topics(options.bootstrap, options.topics(), options.partitions, options.replication)
            return
        except Exception as exc:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("worker: Kafka at %s is not ready (%r); retrying in %.1f s", options.bootstrap, exc, delay)
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)


def build_app(options: WorkerOptions, services: Services, loop: asyncio.AbstractEventLoop, data_dir: Path) -> Any:
    """The Faust app: one agent per enabled processor (see the module docstring). Faust's own
    files (it keeps none with the memory store, but creates the directory) go under
    ``data_dir/faust/<group id>``, never into the working directory."""
    import faust

    datadir = data_dir / "faust" / options.group_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        options.group_id,
        broker=f"kafka://{options.bootstrap}",
        datadir=str(datadir),
        loop=loop,
        autodiscover=False,
        web_enabled=False,
        store="memory://",
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=options.session_timeout,
        broker_heartbeat_interval=options.heartbeat_interval,
        broker_commit_interval=options.commit_interval,
        producer_acks=-1,
        stream_wait_empty=False,  # idempotent handlers: in-flight records are redelivered, not awaited
        topic_partitions=options.partitions,
        topic_replication_factor=options.replication,
        key_serializer="raw",
        value_serializer="raw",
    )
    sources = {"audit": (AUDIT_TOPIC,), "invalidate": CHANGE_TOPICS, "deidentify": CHANGE_TOPICS}
    for name, processor in services.processors.items():
        channel = app.topic(*sources[name], key_serializer="raw", value_serializer="raw")
        app.agent(channel, name=f"unihealth.{name}")(_agent(processor))
    return app


def _agent(processor: Processor) -> Any:
    async def agent(stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            await processor.process(Record(m.topic, m.partition, m.offset, m.key, m.value))

    agent.__name__ = agent.__qualname__ = f"{processor.name}_agent"
    return agent


def run_worker(settings: Settings, options: WorkerOptions) -> None:
    """Run the worker in this process until SIGTERM/SIGINT (blocking; exits through SystemExit)."""
    import faust
    from mode import Service

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_wait_for_broker(options))
    app: Any = None

    async def publish(message: Message) -> None:
        await app.producer.send_and_wait(message.topic, message.key, message.value, None, None, None)

    services = build_services(settings, options, publish)
    app = build_app(options, services, loop, Path(settings.data_dir))
    lag = LagMonitor(options.bootstrap, options.group_id, options.consumed(), interval=options.lag_interval)

    class Resources(Service):
        """Metrics endpoint and lag monitor; closes the database and cache at shutdown."""

        server: asyncio.Server | None = None
        unregister: Callable[[], None] | None = None

        async def on_start(self) -> None:
            self.add_future(lag.run())

            async def worker_counters() -> list[metrics.Metric]:
                return worker_metrics(services) + lag.metrics()

            self.unregister = metrics.REGISTRY.collector(worker_counters)
            if options.metrics_port is not None:

                def healthy() -> bool:
                    """Consuming: started, not stopping or rebalancing, with partitions assigned."""
                    try:
                        ready = app.started and not app.should_stop and not app.rebalancing
                        return bool(ready and app.consumer.assignment())
                    except Exception:
                        return False

                self.server = await metrics.serve(options.metrics_host, options.metrics_port, metrics.REGISTRY, healthy)
                port = metrics.bound_port(self.server)
                log.info("worker: metrics on http://%s:%d/metrics", options.metrics_host, port)
            log.info(
                "worker: agents %s on %s (group %s)",
                ", ".join(sorted(services.processors)),
                options.bootstrap,
                options.group_id,
            )

        async def on_stop(self) -> None:
            if self.unregister is not None:
                self.unregister()
            if self.server is not None:
                self.server.close()
            await lag.close()
            await services.close()

    from gateway.observability.logs import logging_config

    worker = faust.Worker(
        app,
        Resources(loop=loop),
        loop=loop,
        loglevel=options.log_level,
        logging_config=logging_config(options.log_format, options.log_level, service="worker"),
        quiet=True,
    )
    worker.execute_from_commandline()
