"""Consumer lag of a consumer group, measured at the broker (independent of the consuming client).

Contract: :meth:`LagMonitor.poll_once` asks the broker for the group's committed offsets and the
end offsets of every partition of ``topics`` (those that exist), and stores
``lag[(topic, partition)] = end offset - committed offset`` (a partition the group never committed
counts from its beginning offset). :meth:`LagMonitor.run` polls every ``interval`` seconds until
cancelled; each poll is bounded by ``timeout`` and a failed poll keeps the previous values (and
``last_success``) so ``/metrics`` shows how stale they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from .metrics import Metric

log = logging.getLogger(__name__)


class LagMonitor:
    def __init__(
        self, bootstrap: str, group_id: str, topics: Sequence[str], *, interval: float = 5.0, timeout: float = 10.0
    ) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.topics = list(topics)
        self.interval = interval
        self.timeout = timeout
        self.lag: dict[tuple[str, int], int] = {}
        self.last_success: float | None = None
        self._admin: Any = None
        self._consumer: Any = None

    async def _clients(self) -> tuple[Any, Any]:
        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="unihealth-lag")
            await admin.start()
            self._admin = admin
        if self._consumer is None:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, client_id="unihealth-lag")
            await consumer.start()
            self._consumer = consumer
        return self._admin, self._consumer

    async def poll_once(self) -> dict[tuple[str, int], int]:
        """Measure now (bounded by ``timeout``); returns the new lag map."""
        async with asyncio.timeout(self.timeout):
            admin, consumer = await self._clients()
            described = await admin.describe_topics(self.topics)
            partitions = [
                TopicPartition(t["topic"], p["partition"])
                for t in described
                if t.get("error_code") == 0
                for p in sorted(t["partitions"], key=lambda p: int(p["partition"]))
            ]
            committed = await admin.list_consumer_group_offsets(self.group_id)
            ends = await consumer.end_offsets(partitions) if partitions else {}
            begins = await consumer.beginning_offsets(partitions) if partitions else {}
        lag: dict[tuple[str, int], int] = {}
        for tp in partitions:
            meta = committed.get(tp)
            position = meta.offset if meta is not None and meta.offset >= 0 else begins[tp]
            lag[(tp.topic, tp.partition)] = max(0, ends[tp] - position)
        self.lag = lag
        self.last_success = time.time()
        return lag

    async def run(self) -> None:
        """Poll until cancelled (a failed poll is logged and retried at the next interval)."""
        while True:
            try:
                await self.poll_once()
            except Exception as exc:
                log.warning("consumer lag of %s: poll failed: %r", self.group_id, exc)
                await self.close()  # reconnect next time
            await asyncio.sleep(self.interval)

    def metrics(self) -> list[Metric]:
        lag = Metric("unihealth_consumer_lag", "gauge", "end offset minus committed offset, per partition")
        for (topic, partition), value in sorted(self.lag.items()):
            lag.add(value, group=self.group_id, topic=topic, partition=str(partition))
        total = Metric("unihealth_consumer_lag_total", "gauge", "sum of the consumer lag over all partitions")
        total.add(sum(self.lag.values()), group=self.group_id)
        seen = Metric("unihealth_consumer_lag_updated_seconds", "gauge", "unix time of the last successful lag poll")
        seen.add(self.last_success or 0.0, group=self.group_id)
        return [lag, total, seen]

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        consumer, self._consumer = self._consumer, None
        for client in (consumer, admin):
            if client is not None:
                try:
                    async with asyncio.timeout(self.timeout):
                        await (client.stop() if client is consumer else client.close())
                except Exception:
                    log.debug("closing a lag client failed", exc_info=True)
