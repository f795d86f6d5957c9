"""Every change writes exactly one outbox row in its own transaction, keyed by the patient."""

from __future__ import annotations

import httpx
from sqlalchemy import select
from starlette.applications import Starlette

from subgraphs.store.schema import outbox
from tests.helpers import assert_outcome, create, observation, patient


async def _rows(app: Starlette, facility: str) -> list[tuple[str, str, int, str, str | None]]:
    async with app.state.backends.repository(facility, write=False) as repo:
        result = await repo.conn.execute(
            select(outbox.c.type, outbox.c.id, outbox.c.version, outbox.c.operation, outbox.c.patient_id)
            .where(outbox.c.facility == facility, outbox.c.operation != "audit")
            .order_by(outbox.c.seq)
        )
        return [tuple(r) for r in result]  # type: ignore[misc]


async def test_outbox_rows_per_change(app: Starlette, client: httpx.AsyncClient, facility: str) -> None:
    pid = (await create(client, patient()))["id"]
    oid = (await create(client, observation(pid)))["id"]
    await client.put(f"/Observation/{oid}", json=observation(pid, id=oid, value=80))
    await client.delete(f"/Observation/{oid}")
    await client.delete(f"/Observation/{oid}")  # nothing to delete: no event
    assert_outcome(await client.post("/Observation", json={"resourceType": "Observation"}), 400)  # rolled back
    await client.delete(f"/Patient/{pid}")
    assert await _rows(app, facility) == [
        ("Patient", pid, 1, "create", pid),
        ("Observation", oid, 1, "create", pid),
        ("Observation", oid, 2, "update", pid),
        ("Observation", oid, 3, "delete", pid),  # keyed like its earlier events, so it stays in order
        ("Patient", pid, 2, "delete", pid),
    ]
