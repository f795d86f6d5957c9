"""The master patient index: which facilities hold records of the same person.

Contract: a :class:`PatientLinker` turns a Patient's identifiers of the configured national system
into opaque keys (HMAC-SHA256 with the server's secret — the identifier value itself is never
stored here). :func:`relink` replaces one facility's rows for one patient (called by the
repository on every Patient write and delete, in the same transaction); :func:`linked` lists
``(facility, patient_id)`` for keys across facilities. Reading links reveals only that a facility
knows the person; the records stay behind that facility's isolation and consent.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, insert, select

from .database import SqlConnection
from .schema import patient_links


@dataclass(frozen=True, slots=True)
class PatientLinker:
    system: str
    secret: bytes

    def keys_of(self, patient: dict[str, Any] | None) -> set[str]:
        if not patient:
            return set()
        out = set()
        for ident in patient.get("identifier") or []:
            if isinstance(ident, dict) and ident.get("system") == self.system and isinstance(ident.get("value"), str):
                out.add(hmac.new(self.secret, f"{self.system}|{ident['value']}".encode(), hashlib.sha256).hexdigest())
        return out


async def relink(conn: SqlConnection, facility: str, patient_id: str, keys: set[str]) -> None:
    await conn.execute(
        delete(patient_links).where(patient_links.c.facility == facility, patient_links.c.patient_id == patient_id)
    )
    if keys:
        await conn.execute(
            insert(patient_links),
            [{"national_key": k, "facility": facility, "patient_id": patient_id} for k in sorted(keys)],
        )


async def keys_for(conn: SqlConnection, facility: str, patient_id: str) -> set[str]:
    rows = await conn.execute(
        select(patient_links.c.national_key).where(
            patient_links.c.facility == bindparam("f"), patient_links.c.patient_id == bindparam("p")
        ),
        {"f": facility, "p": patient_id},
    )
    return set(rows.scalars())


_mine = patient_links.alias("mine")
_LINKED_TO = (
    select(patient_links.c.facility, patient_links.c.patient_id)
    .join(_mine, _mine.c.national_key == patient_links.c.national_key)
    .where(_mine.c.facility == bindparam("f"), _mine.c.patient_id == bindparam("p"))
    .where((patient_links.c.facility != bindparam("f")) | (patient_links.c.patient_id != bindparam("p")))
    .distinct()
    .order_by(patient_links.c.facility, patient_links.c.patient_id)
)  # built once: every summary, $everything and GraphQL patient asks it, and building it cost more than running it


async def linked_to(conn: SqlConnection, facility: str, patient_id: str) -> list[tuple[str, str]]:
    """``(facility, patient_id)`` of every other record of the same person, in one query."""
    rows = await conn.execute(_LINKED_TO, {"f": facility, "p": patient_id})
    return [(r.facility, r.patient_id) for r in rows]


async def linked(conn: SqlConnection, keys: set[str]) -> list[tuple[str, str]]:
    """``(facility, patient_id)`` of every patient record sharing one of ``keys``, sorted."""
    if not keys:
        return []
    rows = await conn.execute(
        select(patient_links.c.facility, patient_links.c.patient_id)
        .where(patient_links.c.national_key.in_(bindparam("keys", expanding=True)))
        .distinct()
        .order_by(patient_links.c.facility, patient_links.c.patient_id),
        {"keys": sorted(keys)},
    )
    return [(r.facility, r.patient_id) for r in rows]
