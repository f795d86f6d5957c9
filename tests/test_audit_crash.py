"""Audit completeness across ``kill -9``: a real edge process answers concurrent reads (FHIR REST
and GraphQL), is killed mid-stream, restarts on the same data, and every request that got a 2xx
has its access record in the outbox (on every backend).

An access record becomes durable when the outbox transaction that holds it commits; the edge
commits it before the response is sent (``fhir_rest/auditing.py``, ``gateway/security/audit_writer.py``:
group commit, the waiter is released only after the commit). A design that answered first and
committed later would lose the records of answered requests here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from subgraphs.store.database import libpq_dsn
from tests.conftest import token_for
from tests.helpers import observation, patient
from tests.live import free_port

N = 400  # requests in flight around the kill
CONCURRENCY = 32
KILL_AFTER = 120  # 2xx answers before the kill
REQUEST_SYSTEM = "urn:unihealth:request"


@contextmanager
def edge(data_dir: Path, env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``unihealth serve`` on a free port; yields (base URL, process). Ends it (if still alive)."""
    port = free_port()
    log = (data_dir / f"serve-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError((data_dir / f"serve-{port}.log").read_text()[-3000:])
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the edge did not start"
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def _records_sqlite(url: str, facility: str) -> list[bytes]:
    path = url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT payload FROM outbox WHERE operation = 'audit' AND facility = ?", (facility,)
        ).fetchall()
    return [bytes(r[0]) for r in rows]


async def _records_postgres(url: str, facility: str) -> list[bytes]:
    conn = await asyncpg.connect(libpq_dsn(url))
    try:  # the owner's connection (the test server's superuser): every facility's outbox
        rows = await conn.fetch("SELECT payload FROM outbox WHERE operation = 'audit' AND facility = $1", facility)
    finally:
        await conn.close()
    return [bytes(r["payload"]) for r in rows]


def _request_ids(payloads: list[bytes]) -> set[str]:
    out = set()
    for p in payloads:
        for e in orjson.loads(p).get("entity", []):
            ident = e.get("what", {}).get("identifier", {})
            if ident.get("system") == REQUEST_SYSTEM:
                out.add(ident["value"])
    return out


async def test_every_answered_read_is_on_record_after_kill_9(
    backend: str, settings_for: Any, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    settings = settings_for(backend)
    data_dir = tmp_path_factory.mktemp("crash")
    # SQLite: a database file of its own. Killing a process that shares the session's file makes
    # this process's later connections to it fail (disk I/O error in the WAL index), a test artifact.
    database_url = settings.database_url if backend == "postgresql" else f"sqlite+aiosqlite:///{data_dir / 'crash.db'}"
    env = {
        "UNIHEALTH_DATABASE_URL": database_url,
        "UNIHEALTH_SECRET_KEY": settings.secret_key.decode(),
        "UNIHEALTH_DEV_JWT_KEY": settings.dev_jwt_key.decode(),
        "UNIHEALTH_MIGRATION_DATABASE_URL": settings.migration_database_url,
    }
    facility = f"crash-{uuid.uuid4().hex[:12]}"
    headers = {
        "Authorization": f"Bearer {token_for(settings, [facility])}",
        "X-Facility-Id": facility,
        "Content-Type": "application/fhir+json",
    }
    answered: list[str] = []
    failed = 0
    with edge(data_dir, env) as (base, proc):
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as c:
            r = await c.post("/fhir/r5/Patient", json=patient("Crash"))
            assert r.status_code == 201, r.text
            pid = r.json()["id"]
            assert (await c.post("/fhir/r5/Observation", json=observation(pid))).status_code == 201
            paths = [
                f"/fhir/r5/Patient/{pid}",
                f"/fhir/r5/Observation?patient=Patient/{pid}",
                f"/fhir/r5/Patient/{pid}/summary",
                f"/fhir/r5/Patient/{pid}/$everything",
                f"/fhir/r5/Patient/{pid}/_history",
                "graphql",
            ]
            gql = {"query": f'{{ patient(id: "{pid}") {{ id latestVitals {{ id }} }} }}'}
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(N):
                queue.put_nowait(i)
            killed = asyncio.Event()

            async def one(i: int) -> None:
                nonlocal failed
                rid = f"crash-{i}-{uuid.uuid4().hex[:8]}"
                path = paths[i % len(paths)]
                try:
                    if path == "graphql":
                        resp = await c.post(
                            "/graphql", json=gql, headers={"X-Request-Id": rid, "Content-Type": "application/json"}
                        )
                        ok = resp.status_code == 200 and not resp.json().get("errors")
                    else:
                        resp = await c.get(path, headers={"X-Request-Id": rid})
                        ok = 200 <= resp.status_code < 300
                    assert ok or killed.is_set(), resp.text
                    if ok:
                        answered.append(rid)
                except httpx.TransportError:
                    failed += 1
                if len(answered) >= KILL_AFTER and not killed.is_set():
                    killed.set()
                    os.kill(proc.pid, signal.SIGKILL)  # our own child, mid-stream

            async def worker() -> None:
                while not queue.empty():
                    await one(queue.get_nowait())

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        assert killed.is_set() and proc.wait(timeout=10) == -signal.SIGKILL
    assert failed > 0, "the kill landed after the last request: nothing was in flight"
    with edge(data_dir, env) as (base, _):  # restarted on the same data: it recovers and serves
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as c:
            r = await c.get(f"/fhir/r5/Patient/{pid}")
            assert r.status_code == 200, r.text
    if backend == "postgresql":
        payloads = await _records_postgres(request.getfixturevalue("postgres_url"), facility)
    else:
        payloads = await _records_sqlite(database_url, facility)
    on_record = _request_ids(payloads)
    missing = [rid for rid in answered if rid not in on_record]
    print(f"{backend}: {len(answered)} answered, {failed} cut off, {len(on_record)} request ids on record")
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no access record: {missing[:5]}"
