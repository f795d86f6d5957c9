"""A dependency-free ``/healthz`` + ``/metrics`` endpoint (Prometheus text exposition 0.0.4).

Contract:

* :class:`Metric` values are rendered by :func:`render` in the Prometheus text format: one
  ``# HELP`` and ``# TYPE`` line per metric, then one sample line per label set. Label values are
  escaped (backslash, double quote, newline); names are the caller's (``[a-zA-Z_:][a-zA-Z0-9_:]*``).
* :func:`serve` starts an HTTP/1.1 server on ``host:port`` answering ``GET /metrics`` (the text of
  ``collect()``, which may query a database or a broker: it is bounded by ``collect_timeout`` and a
  failure is a 503) and ``GET /healthz`` (200 ``ok`` while ``healthy()`` is true, else 503);
  anything else is 404. Each connection is read with a timeout, answered once and closed.
* Nothing here starts at import time; the caller closes the returned server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

MetricType = Literal["counter", "gauge"]
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Metric:
    """One metric family: its samples are ``(labels, value)`` pairs."""

    name: str
    kind: MetricType
    help: str
    samples: list[tuple[Mapping[str, str], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"not a metric name: {self.name!r}")

    def add(self, value: float, **labels: str) -> Metric:
        self.samples.append((labels, value))
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
        for labels, value in metric.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            lines.append(f"{metric.name}{{{text}}} {_number(value)}" if text else f"{metric.name} {_number(value)}")
    return "\n".join(lines) + "\n"


Collect = Callable[[], Awaitable[Iterable[Metric]]]


async def serve(
    host: str,
    port: int,
    collect: Collect,
    healthy: Callable[[], bool],
    *,
    read_timeout: float = 5.0,
    collect_timeout: float = 10.0,
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
                try:
                    async with asyncio.timeout(collect_timeout):
                        body = render(await collect()).encode()
                    status, ctype = "200 OK", CONTENT_TYPE
                except Exception as exc:
                    log.warning("collecting metrics failed: %r", exc)
                    status, body = "503 Service Unavailable", b"metrics unavailable\n"
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
