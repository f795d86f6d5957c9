"""The write pipeline: from changes to rows in resources, history, index and outbox.

Contract: :func:`plan` turns changes plus the current versions into the rows to write — each body
validated against its R5 model (400 otherwise; skipped only when the caller passes ``validated``,
having built the bodies itself: :meth:`~.repository.ResourceRepository.save_many`), stored as the
client's JSON with the server's id and meta, its search index extracted, and one outbox event per
change (412 on a stale ``if_match``). :func:`apply` writes a :class:`WritePlan` with batched
statements inside the caller's transaction. Nothing here checks access; the repository does,
before and after.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, insert, select, text, update

from . import fhirjson
from .crypto import Keyring
from .database import SqlConnection
from .errors import conflict_version
from .extract import index_rows
from .params import PATIENT_PARAM
from .records import Change, StoredResource, document
from .registry import Registry
from .schema import INDEX_TABLES, idx_reference, outbox, resource_history, resources
from .validation import validate

Versions = dict[tuple[str, str], tuple[int, bool]]  # (type, id) -> (version, deleted)


@dataclass
class WritePlan:
    stored: list[tuple[StoredResource, bool]] = field(default_factory=list)  # (stored, created)
    inserts: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    index: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))


_CURRENT = select(resources.c.id, resources.c.version, resources.c.deleted).where(
    resources.c.facility == bindparam("facility"),
    resources.c.type == bindparam("type"),
    resources.c.id.in_(bindparam("ids", expanding=True)),
)
_INSERT = {table: insert(table) for table in (resources, resource_history, outbox, *INDEX_TABLES.values())}
"""Statements every write runs, built once (building them per write was a measurable share of
sealing an AuditEvent)."""


async def current_versions(conn: SqlConnection, facility: str, changes: Sequence[Change]) -> Versions:
    by_type: dict[str, list[str]] = defaultdict(list)
    for change in changes:
        by_type[change.type].append(change.id)
    found: Versions = {}
    for resource_type, ids in by_type.items():
        for chunk in chunks(ids, 500):
            rows = await conn.execute(_CURRENT, {"facility": facility, "type": resource_type, "ids": chunk})
            found.update({(resource_type, r.id): (r.version, bool(r.deleted)) for r in rows})
    return found


async def previous_patients(
    conn: SqlConnection, facility: str, changes: Sequence[Change], current: Versions
) -> dict[tuple[str, str], str]:
    """The compartment patient of each existing resource about to be updated or deleted (read
    before its index is rewritten): a delete event is keyed like the resource's earlier events, and
    an update that moves a resource to another patient names the patient it left."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for change in changes:
        if change.type != "Patient" and (change.type, change.id) in current:
            by_type[change.type].append(change.id)
    found: dict[tuple[str, str], str] = {}
    ref = idx_reference
    stmt = select(ref.c.id, ref.c.target_id).where(
        ref.c.facility == bindparam("facility"),
        ref.c.type == bindparam("type"),
        ref.c.id.in_(bindparam("ids", expanding=True)),
        ref.c.param == PATIENT_PARAM,
        ref.c.target_type == "Patient",
    )
    for resource_type, ids in by_type.items():
        for chunk in chunks(ids, 500):
            for row in await conn.execute(stmt, {"facility": facility, "type": resource_type, "ids": chunk}):
                found.setdefault((resource_type, row.id), row.target_id)
    return found


def plan(
    facility: str,
    changes: Sequence[Change],
    current: Versions,
    now: datetime,
    previous_patient: dict[tuple[str, str], str] | None = None,
    registry: Registry | None = None,
    *,
    validated: bool = False,
) -> WritePlan:
    """The rows for ``changes``; index rows extracted with ``registry`` (the facility's search
    parameters, default: the process-wide official ones). With ``validated`` the bodies are not
    validated again: the caller vouches that each is a valid R5 resource of its type."""
    out = WritePlan()
    for change in changes:
        prev = current.get((change.type, change.id))
        prev_version, prev_deleted = prev if prev else (0, True)
        if change.if_match is not None and (prev is None or prev_deleted or change.if_match != prev_version):
            raise conflict_version(f'W/"{change.if_match}"', prev_version)
        version = prev_version + 1
        content: bytes | None = None
        patient: str | None = change.id if change.type == "Patient" else None
        before = (previous_patient or {}).get((change.type, change.id))
        if change.body is None and patient is None:
            patient = before
        if change.body is not None:
            doc = document(change.body, change.type, change.id, version, now)
            if not validated:
                validate(change.type, doc)
            content = fhirjson.dumps(doc)
            for kind, rows in index_rows(doc, registry, resource_type=change.type).items():
                for row in rows:
                    if (
                        kind == "reference"
                        and patient is None
                        and row["param"] == PATIENT_PARAM
                        and row["target_type"] == "Patient"
                    ):
                        patient = row["target_id"]
                    out.index[kind].append({"facility": facility, "type": change.type, "id": change.id, **row})
        deleted = change.body is None
        row = {
            "facility": facility,
            "type": change.type,
            "id": change.id,
            "version": version,
            "last_updated": now,
            "deleted": deleted,
            "content": content,
        }
        (out.updates if prev else out.inserts).append(row)
        created = prev is None or prev_deleted
        out.history.append({**row, "method": "DELETE" if deleted else ("POST" if prev is None else "PUT")})
        out.events.append(
            {
                "event_id": str(uuid.uuid4()),
                "facility": facility,
                "type": change.type,
                "id": change.id,
                "version": version,
                "operation": "delete" if deleted else ("create" if created else "update"),
                "patient_id": patient,
                "previous_patient_id": before if before is not None and before != patient else None,
                "occurred_at": now,
            }
        )
        out.stored.append((StoredResource(change.type, change.id, version, now, deleted, content), created))
    return out


async def apply(conn: SqlConnection, facility: str, p: WritePlan, keyring: Keyring | None = None) -> None:
    """Write the plan in ``conn``'s transaction; with a ``keyring``, payloads are stored sealed
    with the facility's key (:mod:`.crypto`; the plan's ``stored`` keep the plaintext)."""
    if keyring is not None:
        p = _sealed(keyring, facility, p)
    if p.inserts:
        await conn.execute(_INSERT[resources], p.inserts)
    if p.updates:
        stmt = (
            update(resources)
            .where(
                and_(
                    resources.c.facility == bindparam("k_facility"),
                    resources.c.type == bindparam("k_type"),
                    resources.c.id == bindparam("k_id"),
                )
            )
            .values(
                version=bindparam("u_version"),
                last_updated=bindparam("u_last_updated"),
                deleted=bindparam("u_deleted"),
                content=bindparam("u_content"),
            )
        )
        await conn.execute(
            stmt,
            [
                {
                    "k_facility": r["facility"],
                    "k_type": r["type"],
                    "k_id": r["id"],
                    "u_version": r["version"],
                    "u_last_updated": r["last_updated"],
                    "u_deleted": r["deleted"],
                    "u_content": r["content"],
                }
                for r in p.updates
            ],
        )
        by_type: dict[str, list[str]] = defaultdict(list)
        for r in p.updates:
            by_type[r["type"]].append(r["id"])
        for table in INDEX_TABLES.values():
            for resource_type, ids in by_type.items():
                for chunk in chunks(ids, 500):
                    await conn.execute(
                        delete(table).where(
                            table.c.facility == facility, table.c.type == resource_type, table.c.id.in_(chunk)
                        )
                    )
    await conn.execute(_INSERT[resource_history], p.history)
    for kind, rows in p.index.items():
        if rows:
            await conn.execute(_INSERT[INDEX_TABLES[kind]], rows)
    await conn.execute(_INSERT[outbox], p.events)


OUTBOX_CHANNEL = "unihealth_outbox"
"""PostgreSQL ``NOTIFY`` channel a change's transaction signals on commit, so relays in other
processes (``LISTEN``) publish at once instead of at their next poll."""
_NOTIFY_OUTBOX = text(f"SELECT pg_notify('{OUTBOX_CHANNEL}', '')")


async def notify_outbox(conn: SqlConnection) -> None:
    """Signal :data:`OUTBOX_CHANNEL` when this (PostgreSQL) transaction commits; notifications of
    one transaction are merged, and a rolled-back transaction sends none."""
    await conn.execute(_NOTIFY_OUTBOX)


def _sealed(keyring: Keyring, facility: str, p: WritePlan) -> WritePlan:
    def seal(row: dict[str, Any]) -> dict[str, Any]:
        if row["content"] is None:
            return row
        return {**row, "content": keyring.seal(facility, row["type"], row["id"], row["content"])}

    return replace(
        p,
        inserts=[seal(r) for r in p.inserts],
        updates=[seal(r) for r in p.updates],
        history=[seal(r) for r in p.history],
    )


def chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


AUDIT_OPERATION = "audit"


async def append_audit(
    conn: SqlConnection, facility: str, event_id: str, payload: bytes, patient: str | None, when: datetime
) -> None:
    """An access record on the outbox (operation ``audit``, type AuditEvent, id = event id)."""
    await conn.execute(
        insert(outbox),
        {
            "event_id": event_id,
            "facility": facility,
            "type": "AuditEvent",
            "id": event_id,
            "version": 1,
            "operation": AUDIT_OPERATION,
            "patient_id": patient,
            "occurred_at": when,
            "payload": payload,
        },
    )
