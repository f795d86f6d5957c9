"""Session fixtures for the real servers the change-stream tests need: Kafka and Redis.

``kafka_bootstrap`` is ``UNIHEALTH_TEST_KAFKA`` (``host:port``) if set, else a throw-away broker
started by ``scripts/kafka.sh`` (Apache Kafka fetched from Maven Central on first use) and stopped
at the end of the session. ``redis_url`` is ``UNIHEALTH_TEST_REDIS_URL`` if set, else a server from
``scripts/redis.sh``. A server that cannot be started fails the tests that need it — never a skip.

Use them from a test module with ``from tests.streams_services import kafka_bootstrap  # noqa: F401``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 600.0  # a cold Kafka start downloads ~45 MB of jars first


def _start(script: str, what: str) -> tuple[str, str]:
    path = ROOT / "scripts" / script
    try:
        out = subprocess.run([str(path)], capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what} did not start within {START_TIMEOUT:.0f}s ({path}):\n{exc.stderr!r}")
    fields = out.stdout.split()
    if out.returncode != 0 or len(fields) != 2:
        pytest.fail(f"could not start {what} with {path} (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return fields[0], fields[1]


def _stop(script: str, directory: str) -> None:
    subprocess.run([str(ROOT / "scripts" / script), "stop", directory], check=False, timeout=60)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a real Kafka broker with topic auto-creation on."""
    given = os.environ.get("UNIHEALTH_TEST_KAFKA")
    if given:
        yield given
        return
    bootstrap, directory = _start("kafka.sh", "Kafka")
    try:
        yield bootstrap
    finally:
        _stop("kafka.sh", directory)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``redis://host:port/db`` of a real Redis server."""
    given = os.environ.get("UNIHEALTH_TEST_REDIS_URL")
    if given:
        yield given
        return
    url, directory = _start("redis.sh", "Redis")
    try:
        yield url
    finally:
        _stop("redis.sh", directory)
