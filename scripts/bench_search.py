#!/usr/bin/env python3
"""Search benchmark (issue 3; prints, never asserts).

Usage: ``.venv/bin/python scripts/bench_search.py [--patients 1000] [--facilities 1]
[--backends sqlite,postgresql] [--iterations 300] [--postgres-url URL] [--keep DIR] [--no-explain]
[--load-minutes M] [--import-workers N]``

``--load-minutes M`` stops the import after the batch running at M minutes (the data is in patient
order, so what is loaded is the first patients, complete); the searches then use those patients
and the report gives the number of resources reached.

``--import-workers N`` (PostgreSQL): the load runs in N processes, each calling
:func:`gateway.importer.import_file` (validation, index extraction, outbox: the normal write path)
on its own shard of the NDJSON (:func:`shard_by_patient`: the resources before the first Patient
are imported first, then each patient goes whole, in file order, to shard ``i % N``). No two
processes ever write the same resource, so their transactions never wait on each other's
per-resource locks; the data are one facility's either way. On 2 busy cores this buys CPU share,
not parallel speed-up: the import is CPU-bound in Python (R5 validation, FHIRPath extraction).

``--keep DIR`` keeps the SQLite database (and the NDJSON) in ``DIR``; with it, or with
``--postgres-url``, a database that already holds the facility's data is measured without
importing again (same ``--patients``/``--facilities``/``--seed`` expected).

For each backend: loads ``--patients`` deterministic demo patients (:mod:`gateway.demo_data`, about
35 resources each) with :func:`gateway.importer.import_file` into a fresh database (PostgreSQL: a
throw-away server from ``scripts/postgres.sh`` unless ``--postgres-url`` names one; migrations and
the import as the owner, the measured searches as a login role in ``unihealth_app``, so row-level
security is live), then times, in one facility, sequential store-level searches (parse + the
repository's statements in a read transaction, no HTTP) for random patients:

* ``obs-by-patient-code``  ``Observation?patient=X&code=http://loinc.org|Y&_sort=-date&_count=20``
* ``patient-name-birthdate``  ``Patient?name=<family>&birthdate=<birthDate>``
* ``encounter-revinclude``  ``Encounter?patient=X&_revinclude=Observation:encounter``
* ``chain-identifier``  ``Observation?patient.identifier=<national id>&code=Y`` (chained)
* ``chain-name``  ``Encounter?patient.name=<family>&_count=20`` (chained, string)
* ``has-reverse-chain``  ``Patient?_has:Observation:patient:code=Y&name=<family>``
* ``content-family``  ``Patient?_content=<family>&_count=20`` (word-prefix text search)
* ``code-total-estimate``  ``Observation?code=Y&_total=estimate&_count=20`` (a large result's total)

Every search resolves the facility's registry first (``repo.search_registry()``: its custom
SearchParameters, a stamp query), as the REST path does. After the import, PostgreSQL statistics
are refreshed (``ANALYZE`` as the owner, as autovacuum would eventually).

and reports P50/P95/P99 (ms), sequential throughput (searches/s) and the mean number of matches,
then prints the query plans (PostgreSQL ``EXPLAIN (ANALYZE, BUFFERS)``, SQLite ``EXPLAIN QUERY
PLAN``) of every statement one search of each kind ran.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import event  # noqa: E402

from gateway import demo_data  # noqa: E402
from gateway.backends import Backends, open_backends  # noqa: E402
from gateway.importer import import_file  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from subgraphs.store.database import libpq_dsn  # noqa: E402
from subgraphs.store.search import parse_search  # noqa: E402

SECRET = b"bench-secret-key-that-is-long-enough-0123456789"
DEV_KEY = b"bench-development-jwt-key-long-enough-0123456789"
NATIONAL = "https://unihealth.dev/fhir/sid/national-id"
LOINC = "http://loinc.org"
RUNTIME_ROLE = "unihealth_bench_runtime"


@dataclass
class Person:
    id: str
    family: str
    birth: str
    national: str
    codes: list[str]


def _people(patients: int, facilities: int, seed: int, facility: str) -> list[Person]:
    out: dict[str, Person] = {}
    codes: dict[str, set[str]] = defaultdict(set)
    for r in demo_data.generate(patients, facilities, seed):
        tags = r.get("meta", {}).get("tag", [])
        if not any(t.get("code") == facility for t in tags):
            continue
        if r["resourceType"] == "Patient":
            national = next(i["value"] for i in r["identifier"] if i["system"] == NATIONAL)
            out[r["id"]] = Person(r["id"], r["name"][0]["family"], r["birthDate"], national, [])
        elif r["resourceType"] == "Observation":
            pid = r["subject"]["reference"].split("/")[1]
            for c in r["code"].get("coding", []):
                if c.get("system") == LOINC:
                    codes[pid].add(c["code"])
    for pid, person in out.items():
        person.codes = sorted(codes[pid])
    return [p for p in out.values() if p.codes]


def _queries(p: Person, rng: random.Random) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    code = rng.choice(p.codes)
    return {
        "obs-by-patient-code": (
            "Observation",
            [("patient", p.id), ("code", f"{LOINC}|{code}"), ("_sort", "-date"), ("_count", "20")],
        ),
        "patient-name-birthdate": ("Patient", [("name", p.family), ("birthdate", p.birth)]),
        "encounter-revinclude": ("Encounter", [("patient", p.id), ("_revinclude", "Observation:encounter")]),
        "chain-identifier": ("Observation", [("patient.identifier", f"{NATIONAL}|{p.national}"), ("code", code)]),
        "chain-name": ("Encounter", [("patient.name", p.family), ("_count", "20")]),
        "has-reverse-chain": ("Patient", [("_has:Observation:patient:code", code), ("name", p.family)]),
        "content-family": ("Patient", [("_content", p.family), ("_count", "20")]),
        "code-total-estimate": ("Observation", [("code", f"{LOINC}|{code}"), ("_total", "estimate"), ("_count", "20")]),
    }


async def _search(backends: Backends, facility: str, resource_type: str, pairs: list[tuple[str, str]]) -> int:
    async with backends.repository(facility, write=False) as repo:
        registry = await repo.search_registry()
        query = parse_search(resource_type, pairs, default_count=50, max_count=1000, registry=registry)
        page = await repo.search(query)
        return len(page.resources) + len(getattr(page, "included", ()))


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


class Capture:
    """The SQL and parameters of every statement run while ``active``."""

    def __init__(self, sync_engine: Any) -> None:
        self.active = False
        self.statements: list[tuple[str, Any]] = []
        event.listen(sync_engine, "before_cursor_execute", self._on)

    def _on(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if self.active and statement.lstrip().upper().startswith("SELECT") and "set_config" not in statement:
            self.statements.append((statement, parameters))


async def _explain(backends: Backends, facility: str, capture: Capture, resource_type: str, pairs: Any) -> str:
    capture.statements, capture.active = [], True
    try:
        await _search(backends, facility, resource_type, pairs)
    finally:
        capture.active = False
    lines: list[str] = []
    async with backends.repository(facility, write=False) as repo:
        for n, (statement, parameters) in enumerate(capture.statements, 1):
            lines.append(f"  -- statement {n}")
            if backends.db.dialect == "postgresql":
                result = await repo.conn.exec_driver_sql(  # type: ignore[attr-defined]
                    "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, parameters
                )
                lines += [f"  {row[0]}" for row in result]
            else:
                result = repo.conn.sync_connection.exec_driver_sql(  # type: ignore[attr-defined]
                    "EXPLAIN QUERY PLAN " + statement, parameters
                )
                lines += [f"  {'  ' * (row[1] // 2 if row[1] < 40 else 1)}{row[3]}" for row in result]
    return "\n".join(lines)


def _start_postgres() -> tuple[str, str]:
    out = subprocess.run([str(ROOT / "scripts" / "postgres.sh")], capture_output=True, text=True, check=True)
    url, directory = out.stdout.split()
    return url, directory


def _stop_postgres(directory: str) -> None:
    subprocess.run([str(ROOT / "scripts" / "postgres.sh"), "stop", directory], check=False)


async def _runtime_url(owner_url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(libpq_dsn(owner_url))
    try:
        for role, attrs in (("unihealth_app", "NOLOGIN"), (RUNTIME_ROLE, "LOGIN NOSUPERUSER NOBYPASSRLS")):
            if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f"CREATE ROLE {role} {attrs}")
        await conn.execute(f"GRANT unihealth_app TO {RUNTIME_ROLE}")
    finally:
        await conn.close()
    user_at = owner_url.split("://", 1)[1].split("@", 1)
    return f"postgresql+asyncpg://{RUNTIME_ROLE}@{user_at[1]}"


async def bench_backend(
    name: str, args: argparse.Namespace, data: Path, work: Path, say: Callable[[str], None]
) -> None:
    stop: list[str] = []
    if name == "postgresql":
        owner = args.postgres_url
        if not owner:
            owner, directory = _start_postgres()
            stop.append(directory)
        runtime = await _runtime_url(owner)
        settings_kwargs: dict[str, Any] = {
            "data_dir": work,
            "database_url": runtime,
            "migration_database_url": owner,
            "secret_key": SECRET,
            "dev_jwt_key": DEV_KEY,
            "relay": "off",
        }
        settings = load_settings({}, **settings_kwargs)
    else:
        url = f"sqlite+aiosqlite:///{work / 'bench.sqlite'}"
        # relay off: publishing the import's outbox would compete with the searches in this loop
        settings = load_settings(
            {}, data_dir=work, database_url=url, secret_key=SECRET, dev_jwt_key=DEV_KEY, relay="off"
        )
    try:
        backends = await open_backends(settings)
        try:
            facility = demo_data.facility_ids(args.facilities)[0]
            if await _loaded(backends, facility):
                say(f"[{name}] the database already holds {facility}'s data: not importing")
            elif name == "postgresql" and args.import_workers > 1:
                await _import_parallel(settings_kwargs, backends, data, args.import_workers, args.load_minutes, name)
                await _analyze(settings.migration_database_url)
            else:
                await _import(backends, data, args.load_minutes, say, name, analyze=name != "postgresql")
                if name == "postgresql":  # as the owner, once
                    await _analyze(settings.migration_database_url)
            await _measure(name, backends, args, say)
        finally:
            await backends.close()
    finally:
        for directory in stop:
            _stop_postgres(directory)


class LoadCap(Exception):
    """The import reached ``--load-minutes``."""


def shard_by_patient(data: Path, shards: int, dest: Path) -> tuple[Path, list[Path]]:
    """Split the NDJSON ``data`` into ``dest/head.ndjson`` (every line before the first Patient)
    and ``shards`` files ``dest/shard-<i>.ndjson``: each Patient line and the lines after it, up to
    the next Patient, go to shard ``(patient number) % shards`` in file order.

    With :mod:`gateway.demo_data`'s order (a patient's resources follow it and reference only it,
    its own earlier resources, or the head's Organizations and Practitioners), every resource of a
    patient lands in one shard, after what it references. Existing shard files are reused."""
    head = dest / "head.ndjson"
    paths = [dest / f"shard-{i}.ndjson" for i in range(shards)]
    if head.exists() and all(p.exists() for p in paths):
        return head, paths
    dest.mkdir(parents=True, exist_ok=True)
    outs = [p.with_suffix(".partial").open("wb") for p in [head, *paths]]
    try:
        target, patients = 0, 0
        with data.open("rb") as fh:
            for line in fh:
                if line.startswith(b'{"resourceType":"Patient"'):
                    target = 1 + patients % shards
                    patients += 1
                outs[target].write(line)
    finally:
        for out in outs:
            out.close()
    for p in [head, *paths]:
        p.with_suffix(".partial").replace(p)
    return head, paths


def _import_shard(settings_kwargs: dict[str, Any], shard: Path, minutes: float, started: float, label: str) -> int:
    """One import process: :func:`import_file` of ``shard`` until ``minutes`` after ``started``
    (a ``time.time()``); returns the resources it wrote."""

    async def run() -> int:
        backends = await open_backends(load_settings({}, **settings_kwargs))
        try:
            return await _import(backends, shard, minutes, _say, label, started=started, analyze=False)
        finally:
            await backends.close()

    return asyncio.run(run())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _import_parallel(
    settings_kwargs: dict[str, Any], backends: Backends, data: Path, workers: int, minutes: float, name: str
) -> None:
    started = time.time()
    head, shards = shard_by_patient(data, workers, data.parent / f"{data.stem}-shards-{workers}")
    await _import(backends, head, 0, _say, f"{name} head")
    loop = asyncio.get_running_loop()
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = await asyncio.gather(
            *(
                loop.run_in_executor(pool, _import_shard, settings_kwargs, shard, minutes, started, f"{name} {i}")
                for i, shard in enumerate(shards)
            )
        )
    elapsed = time.time() - started
    _say(
        f"[{name}] {workers} processes imported {sum(done)} resources in {elapsed:.0f} s ({sum(done) / elapsed:.0f}/s)"
    )


async def _import(
    backends: Backends,
    data: Path,
    minutes: float,
    say: Callable[[str], None],
    name: str,
    *,
    started: float | None = None,
    analyze: bool = True,
) -> int:
    """Import ``data`` (stopping after ``minutes`` from ``started``, a ``time.time()``, default
    now); returns the resources written. ``analyze``: as :func:`gateway.importer.import_file`."""
    begin = time.time() if started is None else started
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        elapsed = time.time() - begin
        if done % 50_000 < n:
            say(f"[{name}] {done} resources, {done / elapsed:.0f}/s")
        if minutes and elapsed > minutes * 60:
            raise LoadCap

    try:
        await import_file(backends, data, batch_size=500, progress=progress, analyze=analyze)
        say(f"[{name}] imported {done} resources in {time.time() - begin:.0f} s")
    except LoadCap:
        say(f"[{name}] stopped the import at {minutes} min: {done} resources")
    return done


async def _analyze(owner_url: str) -> None:
    from subgraphs.store.database import open_database

    db = open_database(owner_url)
    try:
        await db.analyze()
    finally:
        await db.dispose()


async def _sizes(backends: Backends, facility: str) -> tuple[int, set[str]]:
    """The facility's resources and its Patients' ids, as stored."""
    from sqlalchemy import func, select

    from subgraphs.store.schema import resources

    async with backends.repository(facility, write=False) as repo:
        where = (resources.c.facility == facility, resources.c.deleted.is_(False))
        total = (await repo.conn.execute(select(func.count()).select_from(resources).where(*where))).scalar_one()
        stmt = select(resources.c.id).where(*where, resources.c.type == "Patient")
        return int(total), set((await repo.conn.execute(stmt)).scalars())


async def _loaded(backends: Backends, facility: str) -> bool:
    from sqlalchemy import func, select

    from subgraphs.store.schema import resources

    async with backends.repository(facility, write=False) as repo:
        stmt = select(func.count()).select_from(resources).where(resources.c.facility == facility)
        return bool((await repo.conn.execute(stmt)).scalar_one())


async def _measure(name: str, backends: Backends, args: argparse.Namespace, say: Callable[[str], None]) -> None:
    facility = demo_data.facility_ids(args.facilities)[0]
    stored, patient_ids = await _sizes(backends, facility)
    people = [p for p in _people(args.patients, args.facilities, args.seed, facility) if p.id in patient_ids]
    rng = random.Random(args.seed)
    kinds = list(_queries(people[0], rng))
    timings: dict[str, list[float]] = {k: [] for k in kinds}
    sizes: dict[str, list[int]] = {k: [] for k in kinds}
    for i in range(args.warmup + args.iterations):
        person = rng.choice(people)
        for kind, (resource_type, pairs) in _queries(person, rng).items():
            t = time.perf_counter()
            n = await _search(backends, facility, resource_type, pairs)
            if i >= args.warmup:
                timings[kind].append((time.perf_counter() - t) * 1000)
                sizes[kind].append(n)
    floor: list[float] = []
    for person in rng.sample(people, min(len(people), args.iterations)):
        t = time.perf_counter()
        async with backends.repository(facility, write=False) as repo:
            await repo.read("Patient", person.id)
        floor.append((time.perf_counter() - t) * 1000)
    print(
        f"\n== {name}: facility {facility} holds {stored} resources ({len(patient_ids)} patients), "
        f"{args.iterations} searches each"
    )
    print(
        f"(floor: a read by id in its own transaction, P50 {_percentile(floor, 50):.2f} ms, "
        f"P95 {_percentile(floor, 95):.2f} ms)"
    )
    print(f"{'search':<24}{'P50 ms':>9}{'P95 ms':>9}{'P99 ms':>9}{'mean ms':>9}{'per s':>9}{'results':>9}")
    for kind in kinds:
        ms = timings[kind]
        mean = statistics.fmean(ms)
        print(
            f"{kind:<24}{_percentile(ms, 50):>9.2f}{_percentile(ms, 95):>9.2f}{_percentile(ms, 99):>9.2f}"
            f"{mean:>9.2f}{1000 / mean:>9.0f}{statistics.fmean(sizes[kind]):>9.1f}"
        )
    if args.explain:
        sync_engine = getattr(backends.db.engine, "sync_engine", backends.db.engine)  # type: ignore[attr-defined]
        capture = Capture(sync_engine)
        for kind, (resource_type, pairs) in _queries(people[0], rng).items():
            print(f"\n-- plan [{name}] {kind}: {resource_type}?{'&'.join(f'{k}={v}' for k, v in pairs)}")
            print(await _explain(backends, facility, capture, resource_type, pairs))


async def main_async(args: argparse.Namespace) -> None:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="unihealth-bench-search-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        data = root / f"demo-{args.patients}-{args.facilities}-{args.seed}.ndjson"
        if not data.exists():
            written = demo_data.write_ndjson(data, args.patients, args.facilities, args.seed)
            say(f"wrote {written} resources for {args.patients} patients")
        for name in args.backends.split(","):
            work = root / f"{name}-{args.patients}-{args.facilities}-{args.seed}"
            work.mkdir(parents=True, exist_ok=True)
            await bench_backend(name, args, data, work, say)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--facilities", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", default="", help="an owner URL (default: a throw-away server)")
    parser.add_argument("--keep", default="", help="keep the SQLite database and the data here, reuse them")
    parser.add_argument("--no-explain", dest="explain", action="store_false")
    parser.add_argument("--load-minutes", type=float, default=0, help="stop the import after this long (0: never)")
    parser.add_argument("--import-workers", type=int, default=1, help="PostgreSQL: import in this many processes")
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
