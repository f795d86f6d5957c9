"""One consumed record through one handler: decode, retry, dead-letter — shared by every agent.

Contract (:class:`Processor`):

* ``await processor.process(record)`` decodes ``record.value`` for its topic
  (:func:`streams.events.decode`) and awaits the handler, each attempt bounded by
  ``handler_timeout``. A handler failure is retried up to ``attempts`` times in all, with
  exponential backoff from ``backoff`` seconds.
* A record that cannot be decoded, or whose handler failed ``attempts`` times, is a *poison*
  record: it is published to :data:`DEAD_LETTER_TOPIC` (:class:`DeadLetter`, with the error and
  the original topic, partition, offset, key and value) and ``process`` returns ``"dead-letter"``,
  so the agent goes on with the next record. Only after the dead letter is acknowledged does
  ``process`` return; while the dead-letter topic cannot be written it retries (each attempt
  bounded, backoff capped at ``max_backoff``), holding the partition back rather than dropping
  the record. Cancellation (shutdown) stops it at once; the record is then redelivered.
* Counters (``processed``, ``retried``, ``dead_lettered``) feed the worker's metrics.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from .bus import Handler, Message
from .events import decode

log = logging.getLogger(__name__)

DEAD_LETTER_TOPIC = "unihealth.dead-letter"
Outcome = Literal["ok", "dead-letter"]


@dataclass(frozen=True, slots=True)
class Record:
    """A consumed Kafka record (what an agent hands to :meth:`Processor.process`)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The value on :data:`DEAD_LETTER_TOPIC` (schema 1), keyed like the original record::

    {"schema": 1, "agent": "audit", "error": "ValueError('...')", "attempts": 3,
     "topic": "unihealth.audit", "partition": 0, "offset": 41,
     "key": "<base64>" | null, "value": "<base64>" | null, "failed_at": "2026-...Z"}

    To replay one, produce ``base64decode(value)`` with its key to ``topic`` again.
    """

    agent: str
    error: str
    attempts: int
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    failed_at: str
    schema: int = 1

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "schema": self.schema,
                "agent": self.agent,
                "error": self.error,
                "attempts": self.attempts,
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "key": None if self.key is None else base64.b64encode(self.key).decode(),
                "value": None if self.value is None else base64.b64encode(self.value).decode(),
                "failed_at": self.failed_at,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> DeadLetter:
        obj: Any = orjson.loads(data)
        if not isinstance(obj, dict) or obj.get("schema") != 1:
            raise ValueError("a dead letter is a JSON object with schema 1")

        def raw(name: str) -> bytes | None:
            return None if obj.get(name) is None else base64.b64decode(obj[name])

        return cls(
            str(obj["agent"]),
            str(obj["error"]),
            int(obj["attempts"]),
            str(obj["topic"]),
            int(obj["partition"]),
            int(obj["offset"]),
            raw("key"),
            raw("value"),
            str(obj["failed_at"]),
        )


Publish = Callable[[Message], Awaitable[None]]


class Processor:
    """Runs ``handler`` (a bus handler) on raw records for the agent ``name``."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        dead_letter: Publish,
        *,
        attempts: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        handler_timeout: float = 30.0,
        publish_timeout: float = 30.0,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.name = name
        self.handler = handler
        self.dead_letter = dead_letter
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.handler_timeout = handler_timeout
        self.publish_timeout = publish_timeout
        self.processed = 0
        self.retried = 0
        self.dead_lettered = 0

    async def process(self, record: Record) -> Outcome:
        try:
            event = decode(record.topic, record.value if record.value is not None else b"")
        except ValueError as exc:
            await self._dead_letter(record, exc, 0)
            return "dead-letter"
        error: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                async with asyncio.timeout(self.handler_timeout):
                    await self.handler(event)
                self.processed += 1
                return "ok"
            except Exception as exc:
                error = exc
                if attempt < self.attempts:
                    self.retried += 1
                    log.warning(
                        "agent %s: %s@%d failed (attempt %d): %r", self.name, record.topic, record.offset, attempt, exc
                    )
                    await asyncio.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
        assert error is not None
        await self._dead_letter(record, error, self.attempts)
        return "dead-letter"

    async def _dead_letter(self, record: Record, error: BaseException, attempts: int) -> None:
        log.error(
            "agent %s: %s[%d]@%d is a poison record (%r); sending it to %s",
            self.name,
            record.topic,
            record.partition,
            record.offset,
            error,
            DEAD_LETTER_TOPIC,
        )
        letter = DeadLetter(
            agent=self.name,
            error=repr(error)[:2000],
            attempts=attempts,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            failed_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
        message = Message(DEAD_LETTER_TOPIC, record.key or b"", letter.to_json())
        failures = 0
        while True:
            try:
                async with asyncio.timeout(self.publish_timeout):
                    await self.dead_letter(message)
                self.dead_lettered += 1
                return
            except Exception:
                failures += 1
                delay = min(self.max_backoff, self.backoff * 2**failures)
                log.exception("agent %s: the dead-letter topic is not writable; retrying in %.1f s", self.name, delay)
                await asyncio.sleep(delay)
