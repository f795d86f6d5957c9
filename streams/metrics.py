"""Prometheus metrics for every UniHealth process: instruments, one process-wide registry, the
text exposition (0.0.4) and a dependency-free ``/healthz`` + ``/metrics`` server.

Contract:

* :data:`REGISTRY` is the process's one registry. :meth:`Registry.counter`, :meth:`Registry.gauge`
  and :meth:`Registry.histogram` create a family once (asking again with the same name, kind and
  labels returns the same family; anything else is a ``ValueError``). ``family.labels(*values)``
  returns the child for those label values (created on first use, then cached), whose ``inc`` /
  ``set`` / ``observe`` are a few attribute updates: cheap enough for every request. Label values
  are the caller's to bound: :class:`Bounded` caps a label at its first ``limit`` distinct values.
* Values computed on scrape come from *collectors*: ``registry.collector(fn)`` registers an async
  ``fn() -> Iterable[Metric]`` and returns the function that unregisters it. A collector that
  raises or exceeds ``collect_timeout`` is left out of that scrape (logged, and counted in
  ``unihealth_metrics_collector_failures_total``); the rest of the page is still served.
* :func:`render` writes :class:`Metric` snapshots in the text format: one ``# HELP`` and ``# TYPE``
  line per family, then its samples (histograms: cumulative ``_bucket{le=...}``, ``_sum``,
  ``_count``). Label values are escaped (backslash, double quote, newline); names are checked
  (``[a-zA-Z_:][a-zA-Z0-9_:]*``).
* :func:`serve` starts an HTTP/1.1 server on ``host:port`` answering ``GET /metrics`` (the
  registry's exposition) and ``GET /healthz`` (200 ``ok`` while ``healthy()`` is true, else 503);
  anything else is 404. Each connection is read with a timeout, answered once and closed. The
  HTTP processes (edge, subgraphs) serve the same exposition on their own ``/metrics`` route.
* Nothing here starts at import time; the caller closes the returned server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

log = logging.getLogger(__name__)

MetricType = Literal["counter", "gauge", "histogram"]
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: 1 ms to 10 s, dense around the 50 ms latency goal."""


Sample = tuple[str, Mapping[str, str], float]


@dataclass
class Metric:
    """A snapshot of one metric family: samples are ``(suffix, labels, value)``; the suffix is
    appended to the name (``""``, or ``_bucket``/``_sum``/``_count`` for histograms)."""

    name: str
    kind: MetricType
    help: str
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"not a metric name: {self.name!r}")

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append(("", labels, value))
        return self


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def render(metrics: Iterable[Metric]) -> str:
    """The text exposition of ``metrics`` (ends with a newline)."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for suffix, labels, value in metric.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            name = metric.name + suffix
            lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- instruments
class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    """Bucket counts (the last one is ``+Inf``), sum and count of the observed values."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


class Family(Generic[C]):
    """One metric family: a child per distinct tuple of label values."""

    kind: MetricType

    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        Metric(name, "gauge", help)  # validates the name
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self.children: dict[tuple[str, ...], C] = {}

    def _new(self) -> C:
        raise NotImplementedError

    def labels(self, *values: str) -> C:
        """The child for ``values`` (one per label name, in order)."""
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            child = self.children[values] = self._new()
        return child

    def _labels(self, values: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self.labelnames, values, strict=True))

    def snapshot(self) -> Metric:
        metric = Metric(self.name, self.kind, self.help)
        for values, child in sorted(self.children.items()):
            metric.samples.extend(self._samples(self._labels(values), child))
        return metric

    def _samples(self, labels: dict[str, str], child: C) -> list[Sample]:
        raise NotImplementedError


class Counter(Family[CounterChild]):
    kind: MetricType = "counter"

    def _new(self) -> CounterChild:
        return CounterChild()

    def _samples(self, labels: dict[str, str], child: CounterChild) -> list[Sample]:
        return [("", labels, child.value)]


class Gauge(Family[GaugeChild]):
    kind: MetricType = "gauge"

    def _new(self) -> GaugeChild:
        return GaugeChild()

    def _samples(self, labels: dict[str, str], child: GaugeChild) -> list[Sample]:
        return [("", labels, child.value)]


class Histogram(Family[HistogramChild]):
    kind: MetricType = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, help, labelnames)
        bounds = tuple(sorted(float(b) for b in buckets))
        if not bounds or math.isinf(bounds[-1]) or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct finite bounds")
        self.bounds = bounds

    def _new(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _samples(self, labels: dict[str, str], child: HistogramChild) -> list[Sample]:
        out: list[Sample] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), child.counts, strict=True):
            running += n
            out.append(("_bucket", {**labels, "le": _number(bound)}, running))
        out.append(("_sum", labels, child.sum))
        out.append(("_count", labels, child.count))
        return out


class Bounded:
    """A label value capped at the first ``limit`` distinct values seen; later ones are ``other``."""

    def __init__(self, limit: int = 100, other: str = "other") -> None:
        self.limit, self.other = limit, other
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return self.other


Collect = Callable[[], Awaitable[Iterable[Metric]]]


class Registry:
    """Every metric family and collector of a process (see the module contract)."""

    def __init__(self, *, collect_timeout: float = 10.0) -> None:
        self.collect_timeout = collect_timeout
        self._families: dict[str, Family[CounterChild] | Family[GaugeChild] | Family[HistogramChild]] = {}
        self._collectors: dict[int, tuple[str, Collect]] = {}
        self._next = 0
        self._failures = self.counter(
            "unihealth_metrics_collector_failures_total", "scrapes where a collector failed", ["collector"]
        )

    def _get(self, name: str, kind: MetricType, labels: Sequence[str]) -> object | None:
        existing = self._families.get(name)
        if existing is not None and (existing.kind != kind or existing.labelnames != tuple(labels)):
            raise ValueError(f"metric {name} exists as a {existing.kind} with labels {existing.labelnames}")
        return existing

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        found = self._get(name, "counter", labels)
        if isinstance(found, Counter):
            return found
        family = self._families[name] = Counter(name, help, labels)
        return family

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        found = self._get(name, "gauge", labels)
        if isinstance(found, Gauge):
            return found
        family = self._families[name] = Gauge(name, help, labels)
        return family

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        found = self._get(name, "histogram", labels)
        if isinstance(found, Histogram):
            return found
        family = self._families[name] = Histogram(name, help, labels, buckets)
        return family

    def collector(self, collect: Collect, name: str = "") -> Callable[[], None]:
        """Add ``collect`` to every scrape; returns the function that removes it."""
        self._next += 1
        token = self._next
        self._collectors[token] = (name or getattr(collect, "__name__", "collector"), collect)

        def remove() -> None:
            self._collectors.pop(token, None)

        return remove

    async def _run(self, name: str, collect: Collect) -> list[Metric]:
        try:
            async with asyncio.timeout(self.collect_timeout):
                return list(await collect())
        except Exception as exc:
            log.warning("collecting metrics from %s failed: %r", name, exc)
            self._failures.labels(name).inc()
            return []

    async def collect(self) -> list[Metric]:
        """Snapshots of every family, then what the collectors return (run concurrently; families
        of the same name are merged, a clashing kind is dropped)."""
        gathered = await asyncio.gather(*(self._run(n, c) for n, c in list(self._collectors.values())))
        out = {name: family.snapshot() for name, family in sorted(self._families.items())}
        for metric in (m for batch in gathered for m in batch):
            same = out.setdefault(metric.name, Metric(metric.name, metric.kind, metric.help))
            if same.kind == metric.kind:  # one family per name, even if two collectors report it
                same.samples.extend(metric.samples)
        return list(out.values())

    async def exposition(self) -> bytes:
        """The text page of :meth:`collect`."""
        return render(await self.collect()).encode()


REGISTRY = Registry()
"""The process-wide registry: every instrument and ``/metrics`` of this process use it."""


# ---------------------------------------------------------------------------------- the server
async def serve(
    host: str,
    port: int,
    registry: Registry,
    healthy: Callable[[], bool],
    *,
    read_timeout: float = 5.0,
) -> asyncio.Server:
    """Start the endpoint (port 0 picks a free one: see ``server.sockets``)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(read_timeout):
                request = await reader.readuntil(b"\r\n\r\n")
            parts = request.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1].split(b"?", 1)[0]) if len(parts) >= 2 else (b"", b"")
            ctype = "text/plain"
            if method not in (b"GET", b"HEAD"):
                status, body = "405 Method Not Allowed", b"method not allowed\n"
            elif path == b"/healthz":
                status, body = ("200 OK", b"ok\n") if healthy() else ("503 Service Unavailable", b"unhealthy\n")
            elif path == b"/metrics":
                status, body, ctype = "200 OK", await registry.exposition(), CONTENT_TYPE
            else:
                status, body = "404 Not Found", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == b"HEAD" else head + body)
            async with asyncio.timeout(read_timeout):
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)


def bound_port(server: asyncio.Server) -> int:
    """The port ``server`` listens on (useful after ``port=0``)."""
    return int(server.sockets[0].getsockname()[1])
