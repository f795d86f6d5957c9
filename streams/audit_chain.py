"""The per-facility hash chain of access records, and its verification.

Contract: record ``n`` (``seq`` from 1, contiguous) of a facility has
``hash = sha256(prev_hash | seq | event_id | content)`` with ``prev_hash`` the previous record's
hash (64 zeros for the first) and ``content`` the stored AuditEvent JSON bytes. :func:`append`
adds a record exactly once per ``event_id`` (redeliveries are no-ops) under a per-facility lock;
:func:`verify` recomputes the chain and names the first record that was altered, removed or
moved, and cross-checks that every stored AuditEvent resource is in the chain (a truncated tail).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select

from subgraphs.store.crypto import reveal
from subgraphs.store.database import Database, SqlConnection
from subgraphs.store.schema import audit_log, resources

GENESIS = "0" * 64
SEALED_SYSTEM = "urn:unihealth:audit"
SEALED_TAG = f'"system":"{SEALED_SYSTEM}","code":"sealed"'.encode()
"""Sealed AuditEvents carry ``meta.tag`` ``urn:unihealth:audit|sealed`` (as stored, compact JSON)."""


_SEEN = select(audit_log.c.event_id).where(
    audit_log.c.facility == bindparam("f"), audit_log.c.event_id.in_(bindparam("e", expanding=True))
)
_HEAD = (
    select(audit_log.c.seq, audit_log.c.hash)
    .where(audit_log.c.facility == bindparam("f"))
    .order_by(audit_log.c.seq.desc())
    .limit(1)
)
_APPEND = insert(audit_log)
"""The statements of :func:`append_many`, built once (building them per call was a measurable
share of sealing a batch)."""


def chain_hash(prev_hash: str, seq: int, event_id: str, content: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"{prev_hash}|{seq}|{event_id}|".encode())
    h.update(content)
    return h.hexdigest()


async def append(
    db: Database, conn: SqlConnection, facility: str, event_id: str, content: bytes, recorded: datetime
) -> bool:
    """Append one record to ``facility``'s chain inside ``conn``'s transaction; False if present."""
    return (await append_many(db, conn, facility, [(event_id, content, recorded)]))[0]


async def append_many(
    db: Database, conn: SqlConnection, facility: str, records: list[tuple[str, bytes, datetime]]
) -> list[bool]:
    """Append ``(event_id, content, recorded)`` records in order inside ``conn``'s transaction, under
    one lock and one look-up of the chain's head; each result is False if that record was present."""
    await db.lock(conn, f"{facility}|audit-chain")
    seen_rows = await conn.execute(_SEEN, {"f": facility, "e": [r[0] for r in records]})
    seen = set(seen_rows.scalars())
    last = (await conn.execute(_HEAD, {"f": facility})).first()
    seq, prev = (last.seq, last.hash) if last else (0, GENESIS)
    rows, added = [], []
    for event_id, content, recorded in records:
        if event_id in seen:
            added.append(False)
            continue
        seen.add(event_id)
        seq += 1
        digest = chain_hash(prev, seq, event_id, content)
        rows.append(
            {
                "facility": facility,
                "seq": seq,
                "event_id": event_id,
                "recorded": recorded,
                "prev_hash": prev,
                "hash": digest,
                "content": content,
            }
        )
        prev = digest
        added.append(True)
    if rows:
        await conn.execute(_APPEND, rows)
    return added


@dataclass(frozen=True)
class Verdict:
    facility: str
    checked: int
    problem: str | None = None  # None: the chain is intact

    @property
    def ok(self) -> bool:
        return self.problem is None


async def verify(db: Database, facility: str) -> Verdict:
    """Walk ``facility``'s chain in ``seq`` order; the first inconsistency is the verdict."""
    prev, expected, checked = GENESIS, 1, 0
    async with db.transaction(write=False, facility=facility) as conn:
        rows: Any = await conn.execute(
            select(audit_log.c.seq, audit_log.c.event_id, audit_log.c.prev_hash, audit_log.c.hash, audit_log.c.content)
            .where(audit_log.c.facility == bindparam("f"))
            .order_by(audit_log.c.seq),
            {"f": facility},
        )
        chained: set[str] = set()
        for row in rows:
            where = f"record seq {row.seq} (event {row.event_id})"
            if row.seq != expected:
                return Verdict(facility, checked, f"record seq {expected} is missing (next is {where})")
            if row.prev_hash != prev:
                return Verdict(facility, checked, f"{where}: does not follow the previous record")
            if chain_hash(prev, row.seq, row.event_id, row.content) != row.hash:
                return Verdict(facility, checked, f"{where}: content or hash was altered")
            prev, expected, checked = row.hash, expected + 1, checked + 1
            chained.add(row.event_id)
        stored = await conn.execute(
            select(resources.c.id, resources.c.content).where(
                resources.c.facility == bindparam("f"), resources.c.type == "AuditEvent"
            ),
            {"f": facility},
        )
        sealed = {r.id for r in stored if r.content is not None and SEALED_TAG in reveal("AuditEvent", r.id, r.content)}
        missing = sorted(sealed - chained)
        if missing:
            return Verdict(
                facility,
                checked,
                f"AuditEvent {missing[0]} is stored but not in the chain "
                f"({len(missing)} such): the chain was truncated",
            )
    return Verdict(facility, checked)


async def facilities(db: Database) -> list[str]:
    """Facilities with a chain (needs a connection that sees every facility: SQLite, or an owner
    role without forced row-level security)."""
    async with db.transaction(write=False) as conn:
        return list(
            (
                await conn.execute(
                    select(audit_log.c.facility).group_by(audit_log.c.facility).order_by(audit_log.c.facility)
                )
            ).scalars()
        )
