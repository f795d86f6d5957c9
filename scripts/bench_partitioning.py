#!/usr/bin/env python3
"""Partitioning experiment (issue 7; prints, never asserts): the same data, plain vs partitioned.

Usage: ``.venv/bin/python scripts/bench_partitioning.py --postgres-url OWNER_URL [--patients 29000]
[--facilities 1] [--seed 7] [--iterations 200] [--write-patients 120] [--rebuild] [--no-explain]``

``OWNER_URL`` names a database that ``scripts/bench_search.py`` loaded (same ``--patients``,
``--facilities``, ``--seed``). The script:

1. builds, once (again with ``--rebuild``), schema ``part``: a copy of ``resources``,
   ``resource_history`` and every ``idx_*`` table, each ``PARTITION BY LIST (type)`` with one
   partition per large type (Observation, Encounter, Patient, Condition, MedicationRequest) and a
   DEFAULT one, with the same indexes (as partitioned indexes), extended statistics, forced
   row-level-security policy and grants as ``public``; the other tables (outbox, links, audit)
   stay shared. Timed.
2. measures, in the same run and interleaved (each search runs on both, alternating which goes
   first, so the neighbours' load hits both alike), the searches of ``bench_search.py`` as two RLS
   runtime roles: ``unihealth_bench_runtime`` (``public``) and ``unihealth_bench_part``, whose
   ``search_path`` is ``part, public`` -- the application's statements are unqualified, so the
   same code runs on either layout. Prints P50/P95/P99 per search and layout, and the plan of
   ``obs-by-patient-code`` on the partitioned layout.
3. writes ``--write-patients`` new demo patients (another seed) through
   :func:`gateway.importer.import_file` into a fresh facility of each layout (``fac-wplain`` /
   ``fac-wpart``), in alternating chunks, then imports them again (updates: index rows deleted
   and rewritten, history appended); reports resources/s and the time spent in SQL statements.
4. maintenance: ``VACUUM (ANALYZE)`` of each layout's tables after the load (first vacuum), then,
   after deleting the write facilities' rows (as the owner), ``VACUUM`` and ``ANALYZE`` again;
   the relation sizes of both layouts. The write facilities' rows are removed at the end.

The ``part`` schema is left in place (it doubles the database's size); ``--drop`` removes it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import orjson  # noqa: E402
from sqlalchemy import event  # noqa: E402

from gateway import demo_data  # noqa: E402
from gateway.backends import Backends, open_backends  # noqa: E402
from gateway.importer import FACILITY_TAG_SYSTEM, import_file  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from subgraphs.store.database import libpq_dsn  # noqa: E402

TABLES = (
    "resources",
    "resource_history",
    "idx_token",
    "idx_reference",
    "idx_date",
    "idx_string",
    "idx_quantity",
    "idx_number",
    "idx_uri",
    "idx_composite",
    "idx_text",
)
TYPES = ("Observation", "Encounter", "Patient", "Condition", "MedicationRequest")
SCHEMA = "part"
PART_ROLE = "unihealth_bench_part"
FACILITY_POLICY = "facility = current_setting('unihealth.facility', true)"
WRITE_FACILITIES = {"plain": "fac-wplain", "part": "fac-wpart"}


# run as a script, its directory is on sys.path: the search bench is a plain import
import bench_search as BS  # noqa: E402


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _dsn(url: str) -> str:
    return libpq_dsn(url)


async def build(owner_url: str, rebuild: bool) -> None:
    """Create schema ``part`` (see the module docstring) unless it exists and ``rebuild`` is off."""
    conn = await asyncpg.connect(_dsn(owner_url))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", SCHEMA)
        if exists and not rebuild:
            say(f"schema {SCHEMA} exists: not rebuilding")
            return
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await conn.execute(f"CREATE SCHEMA {SCHEMA}")
        await conn.execute("SET maintenance_work_mem = '512MB'")
        started = time.perf_counter()
        for table in TABLES:
            t = time.perf_counter()
            await conn.execute(
                f"CREATE TABLE {SCHEMA}.{table} (LIKE public.{table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
                f" INCLUDING STORAGE) PARTITION BY LIST (type)"
            )
            for resource_type in TYPES:
                await conn.execute(
                    f"CREATE TABLE {SCHEMA}.{table}_{resource_type.lower()} PARTITION OF {SCHEMA}.{table}"
                    f" FOR VALUES IN ('{resource_type}')"
                )
            await conn.execute(f"CREATE TABLE {SCHEMA}.{table}_other PARTITION OF {SCHEMA}.{table} DEFAULT")
            copied = await conn.execute(f"INSERT INTO {SCHEMA}.{table} SELECT * FROM public.{table}")
            copy_s = time.perf_counter() - t
            for (definition,) in await conn.fetch(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = $1", table
            ):
                await conn.execute(definition.replace(f" ON public.{table} ", f" ON {SCHEMA}.{table} "))
            for (definition,) in await conn.fetch(
                "SELECT pg_get_statisticsobjdef(s.oid) FROM pg_statistic_ext s"
                " JOIN pg_class c ON c.oid = s.stxrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relname = $1",
                table,
            ):
                await conn.execute(
                    definition.replace("public.", f"{SCHEMA}.", 1).replace(f" FROM {table}", f" FROM {SCHEMA}.{table}")
                )
            await conn.execute(f"ALTER TABLE {SCHEMA}.{table} ENABLE ROW LEVEL SECURITY")
            await conn.execute(f"ALTER TABLE {SCHEMA}.{table} FORCE ROW LEVEL SECURITY")
            await conn.execute(
                f"CREATE POLICY facility_isolation ON {SCHEMA}.{table}"
                f" USING ({FACILITY_POLICY}) WITH CHECK ({FACILITY_POLICY})"
            )
            say(
                f"  {SCHEMA}.{table}: {copied.split()[-1]} rows, copy {copy_s:.0f} s,"
                f" with indexes {time.perf_counter() - t:.0f} s"
            )
        await conn.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO unihealth_app")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {SCHEMA} TO unihealth_app")
        t = time.perf_counter()
        await conn.execute(f"ANALYZE {', '.join(f'{SCHEMA}.{table}' for table in TABLES)}")
        say(f"built {SCHEMA} in {time.perf_counter() - started:.0f} s (ANALYZE {time.perf_counter() - t:.0f} s)")
    finally:
        await conn.close()


async def _part_url(owner_url: str) -> str:
    """A login role like bench_search's runtime role, whose statements resolve to ``part`` first."""
    conn = await asyncpg.connect(_dsn(owner_url))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", PART_ROLE):
            await conn.execute(f"CREATE ROLE {PART_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS")
        await conn.execute(f"GRANT unihealth_app TO {PART_ROLE}")
        await conn.execute(f"ALTER ROLE {PART_ROLE} SET search_path = {SCHEMA}, public")
    finally:
        await conn.close()
    return f"postgresql+asyncpg://{PART_ROLE}@{owner_url.split('://', 1)[1].split('@', 1)[1]}"


async def _open(runtime_url: str, owner_url: str, work: Path) -> Backends:
    settings = load_settings(
        {},
        data_dir=work,
        database_url=runtime_url,
        migration_database_url=owner_url,
        secret_key=BS.SECRET,
        dev_jwt_key=BS.DEV_KEY,
        relay="off",
    )
    return await open_backends(settings)


async def _check_layout(backends: Backends, facility: str, partitioned: bool) -> None:
    async with backends.repository(facility, write=False) as repo:
        conn: Any = repo.conn
        sql = "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = 'idx_token'::regclass"
        schema = (await conn.exec_driver_sql(sql)).scalar_one()
    expected = SCHEMA if partitioned else "public"
    assert schema == expected, f"idx_token resolves to schema {schema}, expected {expected}"


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    return (
        BS._percentile(values, 50),
        BS._percentile(values, 95),
        BS._percentile(values, 99),
        statistics.fmean(values),
    )


async def measure_searches(
    layouts: dict[str, Backends], args: argparse.Namespace
) -> dict[str, dict[str, tuple[float, float, float, float]]]:
    """Interleaved searches on every layout; (P50, P95, P99, mean) ms per kind and layout."""
    facility = demo_data.facility_ids(args.facilities)[0]
    _stored, patient_ids = await BS._sizes(layouts["plain"], facility)
    people = [p for p in BS._people(args.patients, args.facilities, args.seed, facility) if p.id in patient_ids]
    rng = random.Random(args.seed + 1)
    kinds = list(BS._queries(people[0], rng))
    timings: dict[str, dict[str, list[float]]] = {name: {k: [] for k in kinds} for name in layouts}
    results: dict[str, dict[str, list[int]]] = {name: {k: [] for k in kinds} for name in layouts}
    names = list(layouts)
    for i in range(args.warmup + args.iterations):
        person = rng.choice(people)
        for kind, (resource_type, pairs) in BS._queries(person, rng).items():
            for name in names if i % 2 == 0 else reversed(names):
                t = time.perf_counter()
                n = await BS._search(layouts[name], facility, resource_type, pairs)
                if i >= args.warmup:
                    timings[name][kind].append((time.perf_counter() - t) * 1000)
                    results[name][kind].append(n)
    for kind in kinds:
        counts = {name: sum(results[name][kind]) for name in names}
        if len(set(counts.values())) != 1:
            say(f"WARNING: {kind} returned different numbers of results per layout: {counts}")
    out = {name: {kind: _stats(timings[name][kind]) for kind in kinds} for name in names}
    print(f"\n== searches, {args.iterations} each, interleaved (ms): plain | partitioned by type")
    print(f"{'search':<24}{'P50':>8}{'P95':>8}{'P99':>8}{'mean':>8}  |{'P50':>8}{'P95':>8}{'P99':>8}{'mean':>8}")
    for kind in kinds:
        a, b = out["plain"][kind], out["part"][kind]
        print(f"{kind:<24}" + "".join(f"{v:>8.2f}" for v in a) + "  |" + "".join(f"{v:>8.2f}" for v in b))
    if args.explain:
        sync_engine = getattr(layouts["part"].db.engine, "sync_engine", None)  # type: ignore[attr-defined]
        capture = BS.Capture(sync_engine)
        resource_type, pairs = BS._queries(people[0], rng)["obs-by-patient-code"]
        print(f"\n-- plan [partitioned] obs-by-patient-code: {resource_type}?{pairs}")
        print(await BS._explain(layouts["part"], facility, capture, resource_type, pairs))
    return out


class SqlClock:
    """Wall time spent inside statements run through ``sync_engine`` (driver round trips included)."""

    def __init__(self, sync_engine: Any) -> None:
        self.seconds = 0.0
        self._started: list[float] = []
        event.listen(sync_engine, "before_cursor_execute", self._before)
        event.listen(sync_engine, "after_cursor_execute", self._after)

    def _before(self, *_args: Any) -> None:
        self._started.append(time.perf_counter())

    def _after(self, *_args: Any) -> None:
        if self._started:
            self.seconds += time.perf_counter() - self._started.pop()


def _write_chunks(args: argparse.Namespace, work: Path, chunks: int) -> dict[str, list[Path]]:
    """The extra patients as NDJSON chunks (whole patients each), one copy per write facility."""
    lines: list[dict[str, Any]] = list(demo_data.generate(args.write_patients, 1, args.seed + 1000))
    groups: list[list[dict[str, Any]]] = [[] for _ in range(chunks)]
    patient = -1
    for resource in lines:
        if resource["resourceType"] == "Patient":
            patient += 1
        groups[max(patient, 0) % chunks].append(resource)
    out: dict[str, list[Path]] = {}
    for name, facility in WRITE_FACILITIES.items():
        out[name] = []
        for n, group in enumerate(groups):
            path = work / f"write-{name}-{n}.ndjson"
            with path.open("wb") as fh:
                for resource in group:
                    resource["meta"]["tag"] = [{"system": FACILITY_TAG_SYSTEM, "code": facility}]
                    fh.write(orjson.dumps(resource) + b"\n")
            out[name].append(path)
    return out


async def measure_writes(layouts: dict[str, Backends], args: argparse.Namespace, work: Path) -> None:
    chunks = _write_chunks(args, work, 8)
    clocks = {name: SqlClock(getattr(b.db.engine, "sync_engine", None)) for name, b in layouts.items()}  # type: ignore[attr-defined]
    print(f"\n== writes through import_file, {args.write_patients} new patients per layout, 8 alternating chunks")
    for phase in ("create", "update"):
        wall = dict.fromkeys(layouts, 0.0)
        sql = dict.fromkeys(layouts, 0.0)
        written = dict.fromkeys(layouts, 0)
        names = list(layouts)
        for n in range(len(chunks["plain"])):
            for name in names if n % 2 == 0 else reversed(names):
                before = clocks[name].seconds
                t = time.perf_counter()
                written[name] += await _import_quiet(layouts[name], chunks[name][n])
                wall[name] += time.perf_counter() - t
                sql[name] += clocks[name].seconds - before
        for name in names:
            print(
                f"{phase:<7} {name:<6} {written[name]:>6} resources: {written[name] / wall[name]:>6.0f}/s,"
                f" SQL {sql[name] * 1000 / written[name]:.2f} ms per resource"
                f" (wall {wall[name]:.1f} s, SQL {sql[name]:.1f} s)"
            )


async def _import_quiet(backends: Backends, path: Path) -> int:
    """``import_file`` without its closing whole-database ANALYZE (timed separately below)."""
    analyze = backends.db.analyze

    async def skip() -> None:
        return None

    backends.db.analyze = skip  # type: ignore[method-assign]
    try:
        return await import_file(backends, path, batch_size=500)
    finally:
        backends.db.analyze = analyze  # type: ignore[method-assign]


async def maintenance(owner_url: str, phase: str) -> None:
    """Time VACUUM / ANALYZE of each layout's tables (``phase`` names the moment)."""
    conn = await asyncpg.connect(_dsn(owner_url))
    try:
        await conn.execute("SET maintenance_work_mem = '256MB'")
        for schema in ("public", SCHEMA):
            names = ", ".join(f"{schema}.{t}" for t in TABLES)
            for command in ("VACUUM", "ANALYZE"):
                t = time.perf_counter()
                await conn.execute(f"{command} {names}")
                print(f"{phase}: {command} {schema} ({len(TABLES)} tables){time.perf_counter() - t:>10.1f} s")
    finally:
        await conn.close()


async def delete_write_facilities(owner_url: str) -> None:
    conn = await asyncpg.connect(_dsn(owner_url))
    try:
        for schema, facility in (("public", WRITE_FACILITIES["plain"]), (SCHEMA, WRITE_FACILITIES["part"])):
            for table in TABLES:
                await conn.execute(f"DELETE FROM {schema}.{table} WHERE facility = $1", facility)
        for facility in WRITE_FACILITIES.values():
            for table in ("outbox", "patient_links"):
                await conn.execute(f"DELETE FROM public.{table} WHERE facility = $1", facility)
    finally:
        await conn.close()


async def sizes(owner_url: str) -> None:
    conn = await asyncpg.connect(_dsn(owner_url))
    try:
        print("\n== sizes (table + indexes, MB): plain | partitioned")
        for table in TABLES:
            plain = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", f"public.{table}")
            part = await conn.fetchval(
                "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree($1::regclass)", f"{SCHEMA}.{table}"
            )
            print(f"{table:<20}{plain / 2**20:>10.0f} |{int(part or 0) / 2**20:>10.0f}")
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> None:
    owner = args.postgres_url
    if args.drop:
        conn = await asyncpg.connect(_dsn(owner))
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        finally:
            await conn.close()
        return
    await build(owner, args.rebuild)
    plain_url = await BS._runtime_url(owner)
    part_url = await _part_url(owner)
    with tempfile.TemporaryDirectory(prefix="unihealth-bench-part-") as tmp:
        work = Path(tmp)
        layouts = {"plain": await _open(plain_url, owner, work), "part": await _open(part_url, owner, work)}
        try:
            facility = demo_data.facility_ids(args.facilities)[0]
            await _check_layout(layouts["plain"], facility, partitioned=False)
            await _check_layout(layouts["part"], facility, partitioned=True)
            if not args.skip_maintenance:
                print("\n== maintenance")
                await maintenance(owner, "after the load")
            await measure_searches(layouts, args)
            if args.write_patients:
                await measure_writes(layouts, args, work)
                await delete_write_facilities(owner)
                if not args.skip_maintenance:
                    print("\n== maintenance after the writes and deleting their facilities")
                    await maintenance(owner, "after writes+delete")
        finally:
            for backends in layouts.values():
                await backends.close()
    await sizes(owner)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--postgres-url", required=True, help="the owner URL of a database bench_search loaded")
    parser.add_argument("--patients", type=int, default=29000)
    parser.add_argument("--facilities", type=int, default=1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--write-patients", type=int, default=120)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the partitioned copy")
    parser.add_argument("--drop", action="store_true", help="drop the partitioned copy and stop")
    parser.add_argument("--skip-maintenance", action="store_true")
    parser.add_argument("--no-explain", dest="explain", action="store_false")
    asyncio.run(main_async(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
