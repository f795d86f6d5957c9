"""Optional per-facility payload encryption (AES-256-GCM), on both backends.

What is stored is sealed (no name in the row), what is served is the JSON as written; facilities
without a key stay plaintext; a payload moved onto another resource or sealed with a key that is
not configured does not open (an error, never other data); rotation with ``reencrypt`` moves every
row to the new key; a malformed keyring refuses to start.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Table, select, update
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.settings import SettingsError, load_settings
from subgraphs.store.crypto import Keyring, kid_of, load_keyring
from subgraphs.store.database import Database
from subgraphs.store.reencrypt import reencrypt
from subgraphs.store.schema import resource_history, resources
from tests.conftest import token_for
from tests.helpers import assert_outcome, create, observation, patient
from tests.test_search_custom_params import definition


@asynccontextmanager
async def edge(settings: Any, facility: str, *others: str) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        token = token_for(app.state.backends.settings, [facility, *others])
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://t/fhir/r5",
            headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
        ) as client:
            yield app, client


async def stored(db: Database, table: Table, facility: str, resource_type: str, resource_id: str) -> list[bytes]:
    """The raw ``content`` of a resource's rows in ``table`` (every version for the history)."""
    async with db.transaction(write=False, facility=facility) as conn:
        rows = await conn.execute(
            select(table.c.content).where(
                table.c.facility == facility, table.c.type == resource_type, table.c.id == resource_id
            )
        )
        return [r.content for r in rows if r.content is not None]


def family() -> str:
    return f"Sealed{uuid.uuid4().hex[:10]}"


async def test_payloads_are_sealed_at_rest_and_served_as_written(
    backend: str, settings_for: Any, facility: str, other_facility: str
) -> None:
    keyring = Keyring({"k1": os.urandom(32)}, {facility: "k1"})
    name, plain_name = family(), family()
    async with edge(settings_for(backend, payload_keys=keyring), facility, other_facility) as (app, c):
        db: Database = app.state.backends.db
        pid = (await create(c, patient(name)))["id"]
        oid = (await create(c, observation(pid, code="8867-4", value=72)))["id"]
        updated = await c.put(f"/Patient/{pid}", json={**patient(name), "id": pid, "gender": "female"})
        assert updated.status_code == 200, updated.text

        rows = await stored(db, resources, facility, "Patient", pid)
        history = await stored(db, resource_history, facility, "Patient", pid)
        assert len(rows) == 1 and len(history) == 2
        for blob in [*rows, *history]:
            assert kid_of(blob) == "k1" and name.encode() not in blob, "stored sealed"
        assert kid_of((await stored(db, resources, facility, "Observation", oid))[0]) == "k1"

        read = await c.get(f"/Patient/{pid}")
        assert read.status_code == 200 and read.json()["name"][0]["family"] == name
        assert read.json()["gender"] == "female"
        found = await c.get("/Patient", params={"family": name})
        assert [e["resource"]["id"] for e in found.json()["entry"]] == [pid], "search still finds it"
        versions = await c.get(f"/Patient/{pid}/_history")
        assert [e["resource"]["meta"]["versionId"] for e in versions.json()["entry"]] == ["2", "1"]
        custom = await c.post(
            "/SearchParameter", json=definition("nickname", "string", "Patient.name.given", "Patient")
        )
        assert custom.status_code == 201, custom.text
        assert kid_of((await stored(db, resources, facility, "SearchParameter", custom.json()["id"]))[0]) == "k1"
        nick = (await create(c, patient(name, name=[{"family": name, "given": ["Sealy"]}])))["id"]
        found = await c.get("/Patient", params={"nickname": "Sealy"})
        assert [e["resource"]["id"] for e in found.json()["entry"]] == [nick], "a sealed custom parameter is in use"
        summary = await c.get(f"/Patient/{pid}/summary")
        assert summary.status_code == 200
        assert oid in {e["resource"]["id"] for e in summary.json()["entry"]}

        other = await c.post("/Patient", json=patient(plain_name), headers={"X-Facility-Id": other_facility})
        assert other.status_code == 201, other.text
        raw = await stored(db, resources, other_facility, "Patient", other.json()["id"])
        assert kid_of(raw[0]) is None and plain_name.encode() in raw[0], "a facility without a key stays plaintext"


async def test_a_payload_that_does_not_belong_there_never_opens(backend: str, settings_for: Any, facility: str) -> None:
    keyring = Keyring({"k1": os.urandom(32)}, {facility: "k1"})
    async with edge(settings_for(backend, payload_keys=keyring), facility) as (app, c):
        db: Database = app.state.backends.db
        pid = (await create(c, patient(family())))["id"]
        victim = (await create(c, patient(family())))["id"]
        orphan = (await create(c, patient(family())))["id"]
        moved = (await stored(db, resources, facility, "Patient", pid))[0]
        ghost = Keyring({"ghost": os.urandom(32)}, {facility: "ghost"})  # never configured in this process
        unknown = ghost.seal(facility, "Patient", orphan, json.dumps(patient("Ghost")).encode())
        async with db.transaction(write=True, facility=facility) as conn:
            for target, blob in ((victim, moved), (orphan, unknown)):
                await conn.execute(
                    update(resources)
                    .where(resources.c.facility == facility, resources.c.type == "Patient", resources.c.id == target)
                    .values(content=blob)
                )
        for target in (victim, orphan):
            r = await c.get(f"/Patient/{target}")
            assert_outcome(r, 500, "exception")
            assert pid not in r.text and "Ghost" not in r.text and "Traceback" not in r.text
        assert (await c.get(f"/Patient/{pid}")).status_code == 200, "the original still opens"


async def test_rotation_reencrypts_every_row_with_the_new_key(backend: str, settings_for: Any, facility: str) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    name = family()
    async with edge(settings_for(backend, payload_keys=Keyring({"r1": k1}, {facility: "r1"})), facility) as (app, c):
        pid = (await create(c, patient(name)))["id"]
        await create(c, observation(pid, code="8310-5", value=37.2))
        await c.put(f"/Patient/{pid}", json={**patient(name), "id": pid, "active": True})

    rotated = Keyring({"r1": k1, "r2": k2}, {facility: "r2"})
    async with edge(settings_for(backend, payload_keys=rotated), facility) as (app, c):
        db: Database = app.state.backends.db
        newer = (await create(c, patient(family())))["id"]
        assert kid_of((await stored(db, resources, facility, "Patient", newer))[0]) == "r2", "new writes: new key"
        assert kid_of((await stored(db, resources, facility, "Patient", pid))[0]) == "r1", "old rows: old key"
        assert (await c.get(f"/Patient/{pid}")).json()["name"][0]["family"] == name

        done = await reencrypt(db, rotated, facility, batch=2)
        assert (done.current, done.history) == (2, 3), "Patient + Observation; Patient v1, v2 + Observation v1"
        assert await reencrypt(db, rotated, facility) == type(done)(facility, 0, 0), "idempotent"
        for table in (resources, resource_history):
            async with db.transaction(write=False, facility=facility) as conn:
                kids = {
                    kid_of(r.content)
                    for r in await conn.execute(select(table.c.content).where(table.c.facility == facility))
                }
            assert kids == {"r2"}, f"{table.name}: every row under the new key"
        read = await c.get(f"/Patient/{pid}")
        assert read.status_code == 200 and read.json()["name"][0]["family"] == name and read.json()["active"] is True


def test_a_malformed_keyring_refuses_to_start(tmp_path: Path) -> None:
    good = base64.b64encode(os.urandom(32)).decode()
    cases: dict[str, Any] = {
        "not json": "{",
        "no keys": {"encrypt": {}},
        "short key": {"keys": {"a": base64.b64encode(b"short").decode()}, "encrypt": {}},
        "not base64": {"keys": {"a": "***"}, "encrypt": {}},
        "unknown key id": {"keys": {"a": good}, "encrypt": {"fac-1": "b"}},
    }
    for what, content in cases.items():
        path = tmp_path / f"{what.replace(' ', '-')}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(SettingsError, match="UNIHEALTH_PAYLOAD_KEYS"):
            load_settings({"UNIHEALTH_PAYLOAD_KEYS": str(path)}, data_dir=tmp_path)
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings({"UNIHEALTH_PAYLOAD_KEYS": str(tmp_path / "absent.json")}, data_dir=tmp_path)
    path = tmp_path / "good.json"
    path.write_text(json.dumps({"keys": {"a": good}, "encrypt": {"*": "a"}}))
    keyring = load_settings({"UNIHEALTH_PAYLOAD_KEYS": str(path)}, data_dir=tmp_path).payload_keys
    assert keyring == load_keyring(path) and keyring is not None and keyring.kid_for("any-facility") == "a"
