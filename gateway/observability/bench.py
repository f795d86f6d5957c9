"""``python -m gateway.observability.bench``: what the observability layer costs per request.

Prints the CPU time per request (``time.process_time``, so other processes on the machine skew it
less than wall-clock load tests) of one tiny route — ``GET /fhir/r5/{type}/{id}`` answering
``{}`` — served by the same Starlette app three ways: bare, behind the observer with metrics off
(request id + access log), with metrics on (plus the duration histogram) — in those the access log
costs only its level check, as under ``--log-level warning`` — and with metrics on and the access
log written as JSON (to ``/dev/null``), as under the default ``--log-level info``. Asserts
nothing; run it to compare commits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from .asgi import ObservedApp, access_log
from .logs import ContextFilter, JsonFormatter


async def _read(request: Request) -> Response:
    return JSONResponse({})


def _routes() -> list[Any]:
    return [Mount("/fhir/r5", routes=[Route("/{type}/{id}", _read, methods=["GET"])])]


def _scope(n: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"/fhir/r5/Patient/p-{n}",
        "raw_path": f"/fhir/r5/Patient/p-{n}".encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"x-facility-id", b"fac-001"), (b"x-request-id", b"bench-id")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


async def _run(app: Any, requests: int) -> float:
    """CPU seconds per request of ``requests`` requests through ``app``."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    started = time.process_time()
    for n in range(requests):
        await app(_scope(n), receive, send)
    return (time.process_time() - started) / requests


@contextlib.contextmanager
def _json_access_log(on: bool) -> Any:
    """While active (and ``on``), ``unihealth.access`` writes JSON lines to /dev/null."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(ContextFilter("bench"))
        level, propagate = access_log.level, access_log.propagate
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
        try:
            yield
        finally:
            access_log.removeHandler(handler)
            access_log.setLevel(level)
            access_log.propagate = propagate


async def measure(requests: int, rounds: int) -> dict[str, float]:
    """Median µs per request of each variant over ``rounds`` interleaved rounds."""
    apps = {
        "bare": (Starlette(routes=_routes()), False),
        "observed, metrics off": (ObservedApp(service="bench", metrics=False, routes=_routes()), False),
        "observed, metrics on": (ObservedApp(service="bench", metrics=True, routes=_routes()), False),
        "metrics on + JSON log": (ObservedApp(service="bench", metrics=True, routes=_routes()), True),
    }
    for app, logs in apps.values():
        with _json_access_log(logs):
            await _run(app, 200)  # warm up
    results: dict[str, list[float]] = {name: [] for name in apps}
    for _ in range(rounds):
        for name, (app, logs) in apps.items():
            with _json_access_log(logs):
                results[name].append(await _run(app, requests) * 1e6)
    return {name: statistics.median(values) for name, values in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.observability.bench", description=__doc__)
    parser.add_argument("--requests", type=int, default=5000, help="requests per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    medians = asyncio.run(measure(args.requests, args.rounds))
    bare = medians["bare"]
    print(f"CPU µs per request (median of {args.rounds} rounds x {args.requests} requests):")
    for name, value in medians.items():
        print(f"  {name:<24} {value:8.1f} µs   +{value - bare:6.1f} µs over bare")


if __name__ == "__main__":
    main()
