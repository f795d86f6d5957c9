"""PostgreSQL row-level security: the second wall behind the facility predicates."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from subgraphs.store.database import libpq_dsn
from tests.conftest import RUNTIME_ROLE
from tests.helpers import create, patient


def _dsn(url: str) -> str:
    return libpq_dsn(url)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # about PostgreSQL only
async def test_runtime_role_without_facility_sees_nothing(
    client: httpx.AsyncClient, facility: str, postgres_runtime_url: str, postgres_url: str
) -> None:
    pid = (await create(client, patient()))["id"]
    conn = await asyncpg.connect(_dsn(postgres_runtime_url))
    try:
        assert await conn.fetchval("SELECT current_user") == RUNTIME_ROLE
        assert not await conn.fetchval("SELECT rolbypassrls OR rolsuper FROM pg_roles WHERE rolname = current_user")
        for table in (
            "resources",
            "resource_history",
            "outbox",
            "idx_token",
            "idx_reference",
            "idx_date",
            "idx_string",
        ):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, f"{table} leaks without a facility"
        # a statement that forgot its facility predicate still sees only the transaction's facility
        async with conn.transaction():
            await conn.execute("SELECT set_config('unihealth.facility', $1, true)", facility)
            ids = await conn.fetch("SELECT id, facility FROM resources")
            assert {r["facility"] for r in ids} == {facility} and pid in {r["id"] for r in ids}
        async with conn.transaction():
            await conn.execute("SELECT set_config('unihealth.facility', $1, true)", facility + "-other")
            assert await conn.fetchval("SELECT count(*) FROM resources WHERE id = $1", pid) == 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # WITH CHECK: no writing into another facility
                await conn.execute(
                    "INSERT INTO idx_string (facility, type, id, param, value) "
                    "VALUES ($1, 'Patient', 'x', 'name', 'x')",
                    facility,
                )
        assert await conn.fetchval("SELECT count(*) FROM resources") == 0, "SET LOCAL ended with the transaction"
    finally:
        await conn.close()
    owner = await asyncpg.connect(_dsn(postgres_url))
    try:  # the policies are forced on the table owner too (only superusers bypass; the app is not one)
        forced = await owner.fetch(
            "SELECT relname FROM pg_class WHERE relrowsecurity AND relforcerowsecurity AND relname = ANY($1)",
            ["resources", "resource_history", "outbox", "idx_token", "idx_reference", "idx_date", "idx_string"],
        )
        assert len(forced) == 7
    finally:
        await owner.close()
