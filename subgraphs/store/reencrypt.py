"""Rewrite one facility's stored payloads with its active key (key rotation, switching encryption on).

Contract: :func:`reencrypt` walks the facility's current resources and every history version in
``(type, id[, version])`` order, ``batch`` rows per transaction (each transaction sets the
facility, so row-level security applies as for any request), and rewrites each payload that is
not already sealed with the facility's active key: plaintext is sealed, a payload sealed with an
older key is opened (that key must still be in the keyring) and sealed again. With no active key
for the facility nothing is rewritten. Idempotent and restartable: a second run rewrites nothing;
an interrupted run leaves every row either old or new, both readable. Only ``content`` changes:
versions, ``lastUpdated``, the search index and the outbox are untouched (no change event: the
resource did not change).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, select, tuple_, update

from .crypto import Keyring, kid_of, reveal
from .database import Database
from .schema import resource_history, resources


@dataclass(frozen=True, slots=True)
class Rewritten:
    facility: str
    current: int
    history: int


async def reencrypt(db: Database, keyring: Keyring, facility: str, batch: int = 500) -> Rewritten:
    kid = keyring.kid_for(facility)
    if kid is None:
        return Rewritten(facility, 0, 0)
    current = await _table(db, keyring, facility, kid, resources, ("type", "id"), batch)
    history = await _table(db, keyring, facility, kid, resource_history, ("type", "id", "version"), batch)
    return Rewritten(facility, current, history)


async def _table(
    db: Database, keyring: Keyring, facility: str, kid: str, table: Table, key: tuple[str, ...], batch: int
) -> int:
    columns = [table.c[k] for k in key]
    after: tuple[Any, ...] | None = None
    rewritten = 0
    while True:
        stmt = select(*columns, table.c.content).where(table.c.facility == facility, table.c.content.is_not(None))
        if after is not None:
            stmt = stmt.where(tuple_(*columns) > tuple_(*after))
        stmt = stmt.order_by(*columns).limit(batch)
        async with db.transaction(write=True, facility=facility) as conn:
            rows = list(await conn.execute(stmt))
            changes = [
                {
                    **{f"k_{k}": getattr(row, k) for k in key},
                    "u_content": keyring.seal(facility, row.type, row.id, reveal(row.type, row.id, row.content)),
                }
                for row in rows
                if kid_of(row.content) != kid
            ]
            if changes:
                where = [table.c.facility == facility, *(table.c[k] == bindparam(f"k_{k}") for k in key)]
                await conn.execute(update(table).where(*where).values(content=bindparam("u_content")), changes)
        rewritten += len(changes)
        if len(rows) < batch:
            return rewritten
        after = tuple(getattr(rows[-1], k) for k in key)
