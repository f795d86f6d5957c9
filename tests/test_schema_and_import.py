"""The Alembic migrations create exactly the declared schema; demo data imports and serves."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select
from starlette.applications import Starlette

from gateway import demo_data
from gateway.importer import import_file
from subgraphs.store.database import PostgresDatabase
from subgraphs.store.schema import metadata, outbox, resource_history, resources
from tests.conftest import token_for


async def test_migrations_match_declared_schema(postgres_url: str) -> None:
    db = PostgresDatabase(postgres_url)
    try:
        await db.create_schema()  # idempotent: upgrades to head

        def diff(connection: Any) -> list[Any]:
            return list(compare_metadata(MigrationContext.configure(connection), metadata))

        async with db.engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await db.dispose()


async def test_import_demo_data_and_read_summary(app: Starlette, tmp_path: Path) -> None:
    backends = app.state.backends
    path = tmp_path / "demo.ndjson"
    seed = uuid.uuid4().int % 1_000_000_000  # fresh ids per run and backend
    written = demo_data.write_ndjson(path, 12, 2, seed)
    facilities = demo_data.facility_ids(2)
    steps: list[int] = []
    imported = await import_file(backends, path, batch_size=100, progress=steps.append)
    assert imported == written == sum(steps)
    patients = [r for r in demo_data.generate(12, 2, seed) if r["resourceType"] == "Patient"]
    async with backends.repository(facilities[0], write=False) as repo:
        stored = await repo.read("Patient", patients[0]["id"])
        assert stored is not None and stored.version == 1
        n_outbox = (
            await repo.conn.execute(
                select(func.count())
                .select_from(outbox)
                .where(outbox.c.facility == facilities[0], outbox.c.id == patients[0]["id"])
            )
        ).scalar_one()
        assert n_outbox == 1, "every write has its outbox row"
        n_hist = (
            await repo.conn.execute(
                select(func.count())
                .select_from(resource_history)
                .where(resource_history.c.facility == facilities[0], resource_history.c.id == patients[0]["id"])
            )
        ).scalar_one()
        assert n_hist == 1
    token = token_for(backends.settings, [facilities[0]])
    # re-import is idempotent in content: new versions, same resources
    again = await import_file(backends, path, batch_size=1000)
    assert again == written
    async with backends.repository(facilities[0], write=False) as repo:
        stored = await repo.read("Patient", patients[0]["id"])
        assert stored is not None and stored.version == 2
        count = (
            await repo.conn.execute(
                select(func.count())
                .select_from(resources)
                .where(
                    resources.c.facility == facilities[0],
                    resources.c.type == "Patient",
                    resources.c.id.in_([p["id"] for p in patients]),
                )
            )
        ).scalar_one()
        assert count == 6  # patient i goes to facility i % 2
    token = token_for(backends.settings, [facilities[0]])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t/fhir/r5",
        headers={"X-Facility-Id": facilities[0], "Authorization": f"Bearer {token}"},
    ) as c:
        r = await c.get(f"/Patient/{patients[0]['id']}/summary")
        assert r.status_code == 200
        types = [e["resource"]["resourceType"] for e in r.json()["entry"]]
        assert types[0] == "Patient" and "Observation" in types and "Encounter" in types


def test_import_of_a_missing_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``unihealth import`` names the missing file and exits non-zero, without a traceback and
    before opening (or creating) any database."""
    from gateway.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["import", "--data-dir", str(tmp_path), str(tmp_path / "absent.ndjson")])
    assert exited.value.code == f"unihealth import: no such file: {tmp_path / 'absent.ndjson'}"
    assert not any(tmp_path.iterdir()), "nothing was created"
