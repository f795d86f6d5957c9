"""The audit trail: one AuditEvent per access (allowed or denied), sealed into a per-facility hash
chain through the outbox; tampering is detected at the altered record."""

from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import delete, select, update
from starlette.applications import Starlette

from gateway.security.audit import UNREPRESENTABLE_SUBJECT, AccessAudit, audit_event
from gateway.security.break_glass import Session, _override_event
from gateway.security.tokens import Principal
from streams import audit_chain
from streams.bus import InProcessBus
from streams.events import AUDIT_TOPIC, AuditRecord
from streams.relay import Relay
from streams.sealer import AuditSealer
from subgraphs.store.database import Database, libpq_dsn
from subgraphs.store.schema import audit_log
from subgraphs.store.validation import validate
from tests.conftest import token_for
from tests.helpers import assert_outcome, create, observation, patient


async def seal(app: Starlette, relay_database: Database) -> AuditSealer:
    """Drain the outbox through an in-process bus into the sealer (as the embedded relay does)."""
    bus = InProcessBus()
    sealer = AuditSealer(app.state.backends.db)
    bus.subscribe(AUDIT_TOPIC, sealer)
    relay = Relay(relay_database, bus)
    while await relay.drain_once(1000):
        pass
    assert bus.failures == [], bus.failures
    return sealer


async def chain(app: Starlette, facility: str) -> list[dict[str, Any]]:
    db = app.state.backends.db
    async with db.transaction(write=False, facility=facility) as conn:
        rows = await conn.execute(
            select(audit_log.c.seq, audit_log.c.content)
            .where(audit_log.c.facility == facility)
            .order_by(audit_log.c.seq)
        )
        return [json.loads(r.content) for r in rows]


def _code(event: dict[str, Any]) -> str:
    return str(event["code"]["coding"][0]["code"])


async def test_every_access_is_audited_once(
    app: Starlette, relay_database: Database, client: httpx.AsyncClient, facility: str, other_facility: str
) -> None:
    await seal(app, relay_database)  # earlier tests' records out of the way
    pid = (await create(client, patient()))["id"]  # 1 create
    oid = (await create(client, observation(pid)))["id"]  # 2 create
    assert (await client.get(f"/Patient/{pid}")).status_code == 200  # 3 read
    assert (await client.get("/Observation", params={"patient": pid})).status_code == 200  # 4 search
    assert (await client.put(f"/Observation/{oid}", json=observation(pid, id=oid, value=90))).status_code == 200  # 5
    assert (await client.get(f"/Patient/{pid}/summary")).status_code == 200  # 6 operation
    assert_outcome(await client.get("/Patient/nobody"), 404)  # 7 read, failed
    assert (await client.delete(f"/Observation/{oid}")).status_code == 204  # 8 delete
    nurse = token_for(app.state.backends.settings, [facility], roles=["nurse"])
    med = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medication": {"concept": {"text": "x"}},
        "subject": {"reference": f"Patient/{pid}"},
    }
    assert_outcome(
        await client.post("/MedicationRequest", json=med, headers={"Authorization": f"Bearer {nurse}"}), 403
    )  # 9 create, denied
    assert_outcome(await client.get(f"/Patient/{pid}", headers={"Authorization": "Bearer forged"}), 401)  # 10
    await client.get(f"/Patient/{pid}", headers={"X-Facility-Id": other_facility})  # another facility's chain
    sealer = await seal(app, relay_database)
    events = await chain(app, facility)
    assert [(_code(e), e["action"], e["outcome"]["code"]["code"]) for e in events] == [
        ("create", "C", "0"),
        ("create", "C", "0"),
        ("read", "R", "0"),
        ("search-type", "E", "0"),
        ("update", "U", "0"),
        ("operation", "E", "0"),
        ("read", "R", "4"),
        ("delete", "D", "0"),
        ("create", "C", "4"),
        ("read", "R", "4"),
    ]
    assert sealer.sealed == 11
    assert all(e["patient"] == {"reference": f"Patient/{pid}"} for e in events[:6])
    who = [e["agent"][0]["who"] for e in events]
    assert who[8]["identifier"]["value"] == f"nurse@{facility}" and who[9] == {"display": "unauthenticated"}
    search = events[3]
    query = next(e["query"] for e in search["entity"] if "query" in e)
    assert base64.b64decode(query).decode() == f"patient={pid}"
    assert (await audit_chain.verify(app.state.backends.db, facility)).ok
    assert len(await chain(app, other_facility)) == 1, "each facility has its own chain"


async def test_auditevents_are_for_auditors_and_reading_them_is_audited(
    app: Starlette, relay_database: Database, client: httpx.AsyncClient, facility: str
) -> None:
    await create(client, patient())
    await seal(app, relay_database)
    settings = app.state.backends.settings
    auditor = {"Authorization": "Bearer " + token_for(settings, [facility], roles=["auditor"])}
    clinician = {"Authorization": "Bearer " + token_for(settings, [facility], roles=["clinician"])}
    assert_outcome(await client.get("/AuditEvent", headers=clinician), 403)
    found = (await client.get("/AuditEvent", headers=auditor)).json()
    assert len([e for e in found["entry"] if e["search"]["mode"] == "match"]) == 1  # the create (sealed so far)
    await seal(app, relay_database)
    codes = Counter(_code(e) for e in await chain(app, facility))
    assert codes == {"create": 1, "search-type": 2}, "the auditor's own search is on record"


async def test_redelivery_is_sealed_once(app: Starlette, facility: str) -> None:
    sealer = AuditSealer(app.state.backends.db)
    record = AuditRecord(
        "0b5e3f58-3c83-4b0a-9a37-000000000001",
        facility,
        "2026-01-01T00:00:00.000Z",
        {
            "resourceType": "AuditEvent",
            "code": {"text": "read"},
            "recorded": "2026-01-01T00:00:00.000Z",
            "agent": [{"who": {"display": "x"}}],
            "source": {"observer": {"display": "x"}},
        },
    )
    await sealer(record)
    await sealer(record)
    assert sealer.sealed == 1 and len(await chain(app, facility)) == 1


async def _tamper(app: Starlette, postgres: str | None, statement: Any) -> None:
    """Change audit_log behind the application's back (as a DBA could)."""
    if postgres is None:
        with app.state.backends.db.engine.begin() as conn:
            conn.execute(statement)
        return
    from sqlalchemy.dialects import postgresql

    compiled = statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    conn = await asyncpg.connect(libpq_dsn(postgres))
    try:
        await conn.execute(str(compiled))
    finally:
        await conn.close()


@pytest.mark.parametrize("attack", ["alter", "delete", "swap", "truncate"])
async def test_tampering_is_detected_at_that_record(
    app: Starlette,
    relay_database: Database,
    client: httpx.AsyncClient,
    facility: str,
    backend: str,
    request: pytest.FixtureRequest,
    attack: str,
) -> None:
    for family in ("A", "B", "C", "D"):
        await create(client, patient(family))
    await seal(app, relay_database)
    db = app.state.backends.db
    assert (await audit_chain.verify(db, facility)) == audit_chain.Verdict(facility, 4)
    superuser = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    at = audit_log.c.facility == facility
    if attack == "alter":
        await _tamper(
            app,
            superuser,
            update(audit_log)
            .where(at, audit_log.c.seq == 2)
            .values(content=b'{"resourceType":"AuditEvent","note":"nothing to see"}'),
        )
        expected = "record seq 2 "
    elif attack == "delete":
        await _tamper(app, superuser, delete(audit_log).where(at, audit_log.c.seq == 3))
        expected = "record seq 3 is missing"
    elif attack == "swap":
        await _tamper(app, superuser, update(audit_log).where(at, audit_log.c.seq == 2).values(seq=99))
        await _tamper(app, superuser, update(audit_log).where(at, audit_log.c.seq == 3).values(seq=2))
        await _tamper(app, superuser, update(audit_log).where(at, audit_log.c.seq == 99).values(seq=3))
        expected = "record seq 2 "
    else:
        await _tamper(app, superuser, delete(audit_log).where(at, audit_log.c.seq == 4))
        expected = "truncated"
    verdict = await audit_chain.verify(db, facility)
    assert not verdict.ok and verdict.problem is not None and expected in verdict.problem, verdict


async def test_batches_are_sealed_in_order_once(app: Starlette, facility: str, other_facility: str) -> None:
    sealer = AuditSealer(app.state.backends.db)

    def record(n: int, fac: str) -> AuditRecord:
        return AuditRecord(
            f"0b5e3f58-3c83-4b0a-9a37-{n:012d}",
            fac,
            "2026-01-01T00:00:00.000Z",
            {
                "resourceType": "AuditEvent",
                "code": {"text": f"read {n}"},
                "recorded": "2026-01-01T00:00:00.000Z",
                "agent": [{"who": {"display": "x"}}],
                "source": {"observer": {"display": "x"}},
            },
        )

    batch = [record(1, facility), record(2, other_facility), record(3, facility), record(1, facility)]
    await sealer.handle_batch(batch)
    await sealer.handle_batch(batch[:2])  # redelivered
    assert sealer.sealed == 3
    assert [e["code"]["text"] for e in await chain(app, facility)] == ["read 1", "read 3"]
    assert [e["code"]["text"] for e in await chain(app, other_facility)] == ["read 2"]
    assert (await audit_chain.verify(app.state.backends.db, facility)).ok


def _principal(**overrides: Any) -> Principal:
    fields: dict[str, Any] = {"subject": "u@f", "roles": ("clinician",), "facilities": ("f",), "scopes": ()}
    return Principal(**{**fields, **overrides})


HOSTILE_AUDITS = {
    "unauthenticated": AccessAudit("read", None),
    "everything set": AccessAudit(
        "search-type",
        "f",
        _principal(purpose_of_use="TREAT"),
        resource_type="Observation",
        query="patient=p1&_count=5",
        client="10.0.0.1",
        request_id="r-1",
        status=200,
        patients={"p1", "p2"},
    ),
    "empty subject": AccessAudit("read", "f", _principal(subject="")),
    "subject of exotic whitespace": AccessAudit("read", "f", _principal(subject="\u00a0\u2028")),
    "subject with spaces inside": AccessAudit("read", "f", _principal(subject=" a  b ")),
    "purpose with stray whitespace": AccessAudit("read", "f", _principal(purpose_of_use=" BTG  now\t")),
    "blank purpose": AccessAudit("read", "f", _principal(purpose_of_use=" \u00a0")),
    "blank request id and client": AccessAudit("read", "f", _principal(), request_id="\u00a0", client="\u2003"),
    "odd interaction and id": AccessAudit("  weird   op ", "f", _principal(), resource_type="Patient", resource_id=" "),
    "failure with control characters": AccessAudit("read", "f", _principal(), status=400, detail="\x00\x0b"),
    "empty failure detail": AccessAudit("delete", "f", _principal(), status=500, detail=""),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_AUDITS))
def test_access_records_are_valid_r5_whatever_the_request_held(name: str) -> None:
    """The embedded sealer stores these without validating them again (streams/sealer.py,
    ``trusted``): audit_event must produce a valid R5 AuditEvent for any token, header and URL."""
    event = audit_event(HOSTILE_AUDITS[name], datetime.now(UTC))
    validate("AuditEvent", event)  # raises FhirError (400) otherwise


def test_an_unrepresentable_subject_is_said_so_not_dropped() -> None:
    event = audit_event(AccessAudit("read", "f", _principal(subject="")), datetime.now(UTC))
    assert event["agent"][0]["who"] == {"display": UNREPRESENTABLE_SUBJECT}
    assert audit_event(AccessAudit("read", "f", _principal(subject=" a ")), datetime.now(UTC))["agent"][0]["who"] == {
        "identifier": {"system": "urn:unihealth:subject", "value": " a "}
    }


@pytest.mark.parametrize("subject", ["clinician@f", "", "\u00a0"])
def test_break_glass_records_are_valid_r5(subject: str) -> None:
    now = datetime.now(UTC)
    session = Session(
        "f", "s-1", "p1", subject, "unconscious", now, now + timedelta(minutes=60), False, None, None, None
    )
    validate("AuditEvent", _override_event(session, "110127", "Emergency Override Started", now))
