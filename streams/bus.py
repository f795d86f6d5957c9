"""The event bus: where the relay publishes change events and where agents subscribe to them.

Contract (:class:`Bus`):

* ``await publish(topic, key, value)`` / ``await publish_many(messages)`` return only after the bus
  has *durably accepted* every message (Kafka: acknowledged by all in-sync replicas; in-process:
  every subscribed handler has run). If any message was not accepted they raise
  :class:`PublishError` (or :class:`TimeoutError` past the publish timeout) and the caller must
  treat the whole call as not accepted: some messages may still have been delivered, which the
  at-least-once contract of :mod:`streams.events` allows.
* ``subscribe(topic_or_prefix, handler)`` registers ``async handler(event)`` — a
  :class:`~streams.events.ChangeEvent`, or an :class:`~streams.events.AuditRecord` on the audit topic. A
  subscription equal to a topic matches that topic; one ending in ``.`` (e.g.
  :data:`streams.events.TOPIC_PREFIX`) matches every topic that starts with it. Subscribe before
  :meth:`start`. Handlers of one subscription see events in publish order per key.
* A handler that raises (or exceeds the handler timeout) never stops delivery to the others or
  the following events: the error is logged and recorded in ``bus.failures``; nothing is dropped
  silently. (The stream worker, :mod:`streams.worker`, retries and then sends such records to the
  ``unihealth.dead-letter`` topic instead: :mod:`streams.processing`.)
* ``start()`` / ``stop()`` open and close connections; every wait is bounded by a timeout.

:class:`InProcessBus` is the embedded default (no broker: publishing runs the handlers inline);
:class:`KafkaBus` talks to Kafka through aiokafka with an idempotent ``acks=all`` producer and, when
something subscribed, one consumer group that commits offsets after the handlers ran.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from .events import Event, decode

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[None]]  # receives a ChangeEvent, or an AuditRecord on the audit topic


class Message(NamedTuple):
    topic: str
    key: bytes
    value: bytes


class PublishError(Exception):
    """Some messages of a publish were not durably accepted by the bus."""


@dataclass(frozen=True, slots=True)
class HandlerFailure:
    """A message some handler could not process (or that could not be decoded)."""

    topic: str
    key: bytes | None
    value: bytes | None
    handler: str
    error: str


class Bus(Protocol):
    async def publish(self, topic: str, key: bytes, value: bytes) -> None: ...

    async def publish_many(self, messages: Sequence[Message]) -> None: ...

    def subscribe(self, topic_or_prefix: str, handler: Handler) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def matches(subscription: str, topic: str) -> bool:
    """True if ``subscription`` (a topic, or a prefix ending in ``.``) covers ``topic``."""
    return topic == subscription or (subscription.endswith(".") and topic.startswith(subscription))


@dataclass
class _Dispatcher:
    """Decodes messages and runs the matching handlers in subscription order, recording failures."""

    handler_timeout: float
    subscriptions: list[tuple[str, Handler]] = field(default_factory=list)
    failures: list[HandlerFailure] = field(default_factory=list)

    def add(self, topic_or_prefix: str, handler: Handler) -> None:
        if not topic_or_prefix:
            raise ValueError("subscribe to a topic or a prefix ending in '.'")
        self.subscriptions.append((topic_or_prefix, handler))

    def record(self, topic: str, key: bytes | None, value: bytes | None, handler: str, error: BaseException) -> None:
        log.error("change event on %s (key %r) failed in %s: %r", topic, key, handler, error, exc_info=error)
        self.failures.append(HandlerFailure(topic, key, value, handler, repr(error)))

    async def deliver_batch(self, messages: Sequence[Message], events: Sequence[Event]) -> None:
        """Deliver in publish order per subscription; a handler with ``handle_batch`` gets all of
        its events in one call (one failure is recorded for each of them)."""
        for subscription, handler in self.subscriptions:
            mine = [(m, e) for m, e in zip(messages, events, strict=True) if matches(subscription, m.topic)]
            if not mine:
                continue
            batch = getattr(handler, "handle_batch", None)
            if batch is None:
                for message, event in mine:
                    await self._run(handler, message.topic, message.key, event, message.value)
                continue
            try:
                async with asyncio.timeout(self.handler_timeout):
                    await batch([e for _, e in mine])
            except Exception as exc:
                for message, _ in mine:
                    self.record(message.topic, message.key, message.value, _name(handler), exc)

    async def _run(self, handler: Handler, topic: str, key: bytes | None, event: Event, value: bytes | None) -> None:
        try:
            async with asyncio.timeout(self.handler_timeout):
                await handler(event)
        except Exception as exc:  # a handler's failure is recorded, never propagated or lost
            self.record(topic, key, value, _name(handler), exc)

    async def deliver(self, topic: str, key: bytes | None, event: Event, value: bytes | None) -> None:
        for subscription, handler in self.subscriptions:
            if not matches(subscription, topic):
                continue
            try:
                async with asyncio.timeout(self.handler_timeout):
                    await handler(event)
            except Exception as exc:  # a handler's failure is recorded, never propagated or lost
                self.record(topic, key, value, _name(handler), exc)


class InProcessBus:
    """The embedded bus: ``publish`` decodes the event and awaits every matching handler in order.

    "Durably accepted" here means the handlers have run (their failures are in :attr:`failures`).
    Publishes are serialized, so handlers see events in exactly the order they were published.
    """

    def __init__(self, *, handler_timeout: float = 30.0) -> None:
        self._dispatch = _Dispatcher(handler_timeout)
        self._lock = asyncio.Lock()

    @property
    def failures(self) -> list[HandlerFailure]:
        return self._dispatch.failures

    def subscribe(self, topic_or_prefix: str, handler: Handler) -> None:
        self._dispatch.add(topic_or_prefix, handler)

    async def start(self) -> None:
        """Nothing to connect."""

    async def stop(self) -> None:
        """Nothing to close."""

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        await self.publish_many([Message(topic, key, value)])

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Deliver ``messages`` in order; a value that is not a valid change event is a ValueError."""
        events = [decode(m.topic, m.value) for m in messages]
        async with self._lock:
            await self._dispatch.deliver_batch(messages, events)


class KafkaBus:
    """Kafka through aiokafka: idempotent producer with ``acks=all``; consumer group for subscribers.

    Consumed offsets are committed after the handlers of a fetched batch ran, so a crash redelivers
    (at least once). ``metadata_max_age_ms`` is short so prefix subscriptions see new topics quickly.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        group_id: str = "unihealth-streams",
        client_id: str = "unihealth",
        publish_timeout: float = 30.0,
        connect_timeout: float = 30.0,
        handler_timeout: float = 30.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.client_id = client_id
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self._dispatch = _Dispatcher(handler_timeout)
        self._producer: Any = None
        self._consumer: Any = None
        self._consume_task: asyncio.Task[None] | None = None

    @property
    def failures(self) -> list[HandlerFailure]:
        return self._dispatch.failures

    def subscribe(self, topic_or_prefix: str, handler: Handler) -> None:
        if self._producer is not None:
            raise RuntimeError("subscribe before start()")
        self._dispatch.add(topic_or_prefix, handler)

    async def start(self) -> None:
        """Connect the producer (and the consumer, if anything subscribed); bounded by the connect timeout."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            max_batch_size=256 * 1024,
            request_timeout_ms=int(self.publish_timeout * 1000),
        )
        try:
            async with asyncio.timeout(self.connect_timeout):
                await producer.start()
        except BaseException:
            await _quietly(producer.stop(), self.connect_timeout)
            raise
        self._producer = producer
        if self._dispatch.subscriptions:
            try:
                await self._start_consumer()
            except BaseException:
                await self.stop()
                raise

    async def _start_consumer(self) -> None:
        topics = sorted({s for s, _ in self._dispatch.subscriptions if not s.endswith(".")})
        prefixes = sorted({s for s, _ in self._dispatch.subscriptions if s.endswith(".")})
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            metadata_max_age_ms=5000,
        )
        if prefixes:
            alternatives = [re.escape(t) + "$" for t in topics] + [re.escape(p) + ".*" for p in prefixes]
            consumer.subscribe(pattern="^(?:" + "|".join(alternatives) + ")")
        else:
            consumer.subscribe(topics=topics)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await consumer.start()
        except BaseException:
            await _quietly(consumer.stop(), self.connect_timeout)
            raise
        self._consumer = consumer
        self._consume_task = asyncio.create_task(self._consume(consumer), name="kafka-bus-consumer")

    async def stop(self) -> None:
        """Stop consuming, flush and close; each step bounded by the connect timeout."""
        task, self._consume_task = self._consume_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=self.connect_timeout)
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await _quietly(consumer.stop(), self.connect_timeout)
        producer, self._producer = self._producer, None
        if producer is not None:
            await _quietly(producer.stop(), self.connect_timeout)

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        await self.publish_many([Message(topic, key, value)])

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Send all, then wait for every acknowledgement (bounded by the publish timeout).

        Raises :class:`PublishError` if any message was not acknowledged, :class:`TimeoutError`
        if the acknowledgements did not all arrive in time.
        """
        producer = self._producer
        if producer is None:
            raise RuntimeError("KafkaBus.publish before start()")
        if not messages:
            return
        async with asyncio.timeout(self.publish_timeout):
            futures = [await producer.send(m.topic, m.value, key=m.key) for m in messages]
            results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise PublishError(f"{len(errors)} of {len(messages)} messages were not acknowledged") from errors[0]

    async def _consume(self, consumer: Any) -> None:
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                for records in batches.values():
                    for record in records:
                        await self._handle(record.topic, record.key, record.value)
                if batches:
                    async with asyncio.timeout(self.connect_timeout):
                        await consumer.commit()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep consuming; uncommitted records come again after a restart or rebalance
                log.exception("Kafka consumer loop error; retrying in 1 s")
                await asyncio.sleep(1.0)

    async def _handle(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        try:
            event = decode(topic, value if value is not None else b"")
        except ValueError as exc:
            self._dispatch.record(topic, key, value, "decode", exc)
            return
        await self._dispatch.deliver(topic, key, event, value)


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


async def _quietly(step: Awaitable[Any], limit: float) -> None:
    """Await a close step, bounded by ``limit`` seconds; its failure is logged, not raised (shutting down)."""
    try:
        async with asyncio.timeout(limit):
            await step
    except Exception:
        log.warning("error while closing a Kafka client", exc_info=True)
