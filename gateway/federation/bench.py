"""``python -m gateway.federation.bench``: our gateway vs ``@apollo/gateway`` over the same subgraphs.

Contract (prints, never asserts on speed; bounded to about two minutes with the defaults):

1. loads deterministic demo data (:func:`gateway.demo_data.write_ndjson`, 60 patients in two
   facilities: 30 in ``fac-001``) into a fresh store: by default a throw-away PostgreSQL
   (``scripts/postgres.sh``, stopped at the end; migrations as the owner, every process as a
   login role in ``unihealth_app``, row-level security live), or with ``--backend sqlite`` the
   embedded SQLite file;
2. starts the three subgraphs as processes (``unihealth subgraph ...``), Apollo Gateway over them
   (IntrospectAndCompose, ``scripts/apollo/gateway.mjs``), our gateway over them as its own
   process (HTTP subgraphs) with the cache off, and again with the cache on and the store open as
   the production edge has it (``--open-store``: callers verified, access records written), and
   our gateway with in-process subgraphs over the same store (the embedded default), cache off and
   on — each a single process on the loopback;
3. checks the answers: each operation is asked of every target once and the JSON answers
   compared (numbers as numbers) — before the load and again after it (the caches warm then);
4. runs each operation — a single-patient summary (random patient of the 30 per request) and the
   30-patient ward — against each target with ``--vus`` concurrent clients for ``--seconds``
   (after an unmeasured warm-up of 2 s at the same concurrency, which also fills the cache: with
   the cache on, measured summaries are whole-answer hits and the ward's per-patient entities are
   entity-cache hits — its page itself is always asked of the patient subgraph)
   (k6 when ``.venv/bin/k6`` or ``k6`` exists, else an asyncio load generator in a separate
   process), one target at a time;
5. prints a table: requests/s, P50/P95/P99 latency (ms), failed % (non-200 or an ``errors`` key).

Everything it starts is stopped at the end; the work directory is removed unless ``--keep``.
Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY = """query Summary($id: ID!) {
  patient(id: $id) {
    id name { text } birthDate gender
    encounters(first: 5) { id status classCode period { start end } }
    allergies { id criticality code { display } }
    conditions { id clinicalStatus code { display } }
    latestVitals { id code { code display } effective valueQuantity { value unit } }
    medicationRequests(status: "active") { id status medication { display } dosageText }
  }
}"""
WARD = """query Ward {
  patients(first: 30) {
    nodes {
      id name { family given }
      latestVitals { id code { code display } effective valueQuantity { value unit } }
      medicationRequests(status: "active") { id status medication { display } dosageText }
      allergies { id criticality code { display } }
    }
  }
}"""
K6_SCRIPT = """
import http from 'k6/http';
import { check } from 'k6';
const cfg = JSON.parse(open(__ENV.CONFIG));
export const options = {
  vus: Number(__ENV.VUS), duration: __ENV.DURATION, summaryTrendStats: ['med', 'p(95)', 'p(99)'],
};
export default function () {
  const variables = cfg.ids.length ? { id: cfg.ids[Math.floor(Math.random() * cfg.ids.length)] } : {};
  const r = http.post(cfg.url, JSON.stringify({ query: cfg.query, variables: variables }), { headers: cfg.headers });
  check(r, { ok: (res) => res.status === 200 && res.body.indexOf('"errors"') < 0 });
}
"""


@dataclass
class Row:
    target: str
    operation: str
    rps: float
    p50: float
    p95: float
    p99: float
    failed: float


def _k6() -> str | None:
    local = Path(sys.executable).parent / "k6"
    return str(local) if local.exists() else shutil.which("k6")


def run_k6(
    k6: str, workdir: Path, url: str, query: str, ids: list[str], headers: dict[str, str], vus: int, seconds: int
) -> Row:
    script, config, summary = workdir / "federation.js", workdir / "k6-config.json", workdir / "k6-summary.json"
    script.write_text(K6_SCRIPT)
    config.write_text(json.dumps({"url": url, "query": query, "ids": ids, "headers": headers}))
    env = {
        **os.environ,
        "CONFIG": str(config),
        "VUS": str(vus),
        "DURATION": f"{seconds}s",
        "K6_NO_USAGE_REPORT": "true",
    }
    out = subprocess.run(
        [k6, "run", "--quiet", "--no-usage-report", "--summary-export", str(summary), str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    if not summary.exists():
        raise RuntimeError(f"k6 failed: {out.stderr[-2000:]}")
    metrics = json.loads(summary.read_text())["metrics"]
    duration = metrics["http_req_duration"]
    checks = metrics.get("checks", {})
    total = checks.get("passes", 0) + checks.get("fails", 0)
    return Row(
        "",
        "",
        float(metrics["http_reqs"]["rate"]),
        float(duration["med"]),
        float(duration["p(95)"]),
        float(duration["p(99)"]),
        100.0 * checks.get("fails", 0) / total if total else 100.0,
    )


async def _load(
    url: str, query: str, ids: list[str], headers: dict[str, str], vus: int, seconds: int
) -> dict[str, Any]:
    import random

    import httpx

    latencies: list[float] = []
    failed = 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=vus)) as client:

        async def user() -> None:
            nonlocal failed
            while time.monotonic() < deadline:
                variables = {"id": random.choice(ids)} if ids else {}
                start = time.perf_counter()
                r = await client.post(url, json={"query": query, "variables": variables}, headers=headers)
                latencies.append((time.perf_counter() - start) * 1000)
                if r.status_code != 200 or b'"errors"' in r.content:
                    failed += 1

        started = time.monotonic()
        await asyncio.gather(*(user() for _ in range(vus)))
        elapsed = time.monotonic() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    return {
        "rps": len(latencies) / elapsed,
        "p50": pct(0.5),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "failed": 100.0 * failed / max(len(latencies), 1),
    }


def run_python_load(url: str, query: str, ids: list[str], headers: dict[str, str], vus: int, seconds: int) -> Row:
    """The asyncio load generator, in its own process (so it does not share the gateway's CPU time slices)."""
    payload = json.dumps({"url": url, "query": query, "ids": ids, "headers": headers, "vus": vus, "seconds": seconds})
    out = subprocess.run(
        [sys.executable, "-m", "gateway.federation.bench", "--load", payload],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return Row("", "", r["rps"], r["p50"], r["p95"], r["p99"], r["failed"])


def _normalized(body: Any) -> Any:
    return json.loads(json.dumps(body))


RUNTIME_ROLE = "unihealth_bench"
CACHE_OFF = {"UNIHEALTH_GRAPHQL_CACHE_TTL": "0"}
CACHE_ON = {"UNIHEALTH_GRAPHQL_CACHE_TTL": "60"}  # in-process cache; warm after the warm-up
WARMUP_SECONDS = 2


async def _runtime_url(owner_url: str) -> str:
    """A login role in ``unihealth_app`` (neither superuser nor owner): row-level security applies."""
    import asyncpg

    from subgraphs.store.database import libpq_dsn

    conn = await asyncpg.connect(libpq_dsn(owner_url))
    try:
        for role, attrs in (("unihealth_app", "NOLOGIN"), ("unihealth_relay", "NOLOGIN"), (RUNTIME_ROLE, "LOGIN")):
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f"CREATE ROLE {role} {attrs}")
        await conn.execute(f"GRANT unihealth_app TO {RUNTIME_ROLE}")
    finally:
        await conn.close()
    return f"postgresql+asyncpg://{RUNTIME_ROLE}@{owner_url.split('://', 1)[1].split('@', 1)[1]}"


async def _prepare(workdir: Path, owner_url: str | None) -> tuple[Any, list[str], str]:
    from gateway import demo_data
    from gateway.backends import open_backends
    from gateway.importer import facility_of, import_file
    from gateway.security.tokens import mint
    from gateway.settings import load_settings

    overrides: dict[str, object] = {}
    if owner_url:
        overrides = {"database_url": await _runtime_url(owner_url), "migration_database_url": owner_url}
    settings = load_settings({}, data_dir=workdir / "data", relay="off", **overrides)
    path = workdir / "demo.ndjson"
    demo_data.write_ndjson(path, 60, 2, 7)
    backends = await open_backends(settings)
    try:
        await import_file(backends, path)
    finally:
        await backends.close()
    if owner_url:  # planner statistics now, not whenever autovacuum gets to it (only the owner may)
        from subgraphs.store.database import open_database

        owner = open_database(owner_url)
        try:
            await owner.analyze()
        finally:
            await owner.dispose()
    facility = demo_data.facility_ids(2)[0]
    ids = [
        r["id"]
        for r in demo_data.generate(60, 2, 7)
        if r["resourceType"] == "Patient" and facility_of(r, None) == facility
    ]
    token = mint(settings, facilities=[facility], roles=["clinician"], lifetime=3600)
    return settings, ids, token


def format_table(rows: list[Row], vus: int, seconds: int) -> str:
    lines = [
        f"{vus} concurrent clients, {seconds} s per cell; latency in ms",
        f"{'target':<38} {'operation':<10} {'req/s':>8} {'P50':>8} {'P95':>8} {'P99':>8} {'failed':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r.target:<38} {r.operation:<10} {r.rps:>8.1f} {r.p50:>8.1f} {r.p95:>8.1f} {r.p99:>8.1f}"
            f" {r.failed:>6.1f}%"
        )
    return "\n".join(lines)


@contextmanager
def _postgres() -> Iterator[str]:
    script = Path(__file__).resolve().parents[2] / "scripts" / "postgres.sh"
    out = subprocess.run([str(script)], capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"could not start PostgreSQL:\n{out.stderr[-2000:]}")
    url, directory = out.stdout.split()
    try:
        yield url
    finally:
        subprocess.run([str(script), "stop", directory], capture_output=True, timeout=120, check=False)


def run(seconds: int, vus: int, workdir: Path, backend: str) -> list[Row]:
    with ExitStack() as stack:
        owner_url = stack.enter_context(_postgres()) if backend == "postgresql" else None
        return _run(seconds, vus, workdir, owner_url)


def _run(seconds: int, vus: int, workdir: Path, owner_url: str | None) -> list[Row]:
    import httpx

    from .harness import apollo_gateway, gateway_process, subgraph_processes

    settings, ids, token = asyncio.run(_prepare(workdir, owner_url))
    if len(ids) < 30:
        raise RuntimeError(f"the demo facility has {len(ids)} patients, not 30")
    headers = {"Authorization": f"Bearer {token}", "X-Facility-Id": "fac-001", "Content-Type": "application/json"}
    k6 = _k6()
    print(f"load generator: {'k6 ' + k6 if k6 else 'asyncio (k6 not found)'}", file=sys.stderr)
    rows: list[Row] = []
    with ExitStack() as stack:
        urls = stack.enter_context(subgraph_processes(settings, workdir))
        targets = {
            "@apollo/gateway 2.14 (HTTP subgraphs)": stack.enter_context(apollo_gateway(workdir, subgraphs=urls)),
            "ours (HTTP subgraphs)": stack.enter_context(gateway_process(settings, workdir, subgraphs=urls)),
            "ours (HTTP subgraphs), cache on": stack.enter_context(
                gateway_process(settings, workdir, subgraphs=urls, env=CACHE_ON, open_store=True)
            ),
            "ours embedded, cache off": stack.enter_context(gateway_process(settings, workdir, env=CACHE_OFF)),
            "ours embedded, cache on": stack.enter_context(gateway_process(settings, workdir, env=CACHE_ON)),
        }
        operations = {"summary": (SUMMARY, ids[:30]), "ward": (WARD, [])}

        def compare(when: str) -> None:
            for name, (query, op_ids) in operations.items():
                answers = []
                for url in targets.values():
                    variables = {"id": op_ids[0]} if op_ids else {}
                    answer = httpx.post(url, json={"query": query, "variables": variables}, headers=headers, timeout=60)
                    answers.append(_normalized(answer.json()))
                equal = all(a == answers[0] for a in answers) and "errors" not in answers[0]
                print(f"{name} ({when}): answers of all targets equal and without errors: {equal}", file=sys.stderr)

        compare("first request")
        for name, (query, op_ids) in operations.items():
            for target, url in targets.items():
                for span in (WARMUP_SECONDS, seconds):  # a warm-up at full concurrency first, not kept
                    if k6:
                        row = run_k6(k6, workdir, url, query, op_ids, headers, vus, span)
                    else:
                        row = run_python_load(url, query, op_ids, headers, vus, span)
                row.target, row.operation = target, name
                rows.append(row)
                print(f"  {target} {name}: {row.rps:.1f} req/s", file=sys.stderr)
        compare("after the load, caches warm")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.federation.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=6, help="measured, per target and operation")
    parser.add_argument("--vus", type=int, default=32, help="concurrent clients")
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)  # internal: the load generator process
    args = parser.parse_args(argv)
    if args.load:
        spec = json.loads(args.load)
        print(
            json.dumps(
                asyncio.run(
                    _load(spec["url"], spec["query"], spec["ids"], spec["headers"], spec["vus"], spec["seconds"])
                )
            )
        )
        return
    workdir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="uh-fedbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = run(args.seconds, args.vus, workdir, args.backend)
        print(format_table(rows, args.vus, args.seconds) + f"\nstore: {args.backend}")
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
