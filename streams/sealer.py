"""The audit sealer: access records → the facility's hash chain + a stored AuditEvent.

Contract: :class:`AuditSealer` is a bus handler for :data:`~streams.events.AUDIT_TOPIC`. For each
record it, in ONE transaction of the record's facility, appends the record to the chain
(:func:`streams.audit_chain.append`, once per ``event_id``) and stores the AuditEvent as a resource
(id = ``event_id``, tagged ``urn:unihealth:audit|sealed``) so auditors can search it. A redelivered
record changes nothing. The embedded in-process bus and the Kafka worker call the same handler.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from subgraphs.store import fhirjson
from subgraphs.store.access import AccessPolicy
from subgraphs.store.database import Database
from subgraphs.store.records import Change
from subgraphs.store.repository import ResourceRepository

from . import audit_chain
from .events import AuditRecord

log = logging.getLogger(__name__)
_SEALER = AccessPolicy.unrestricted("audit sealer")


class AuditSealer:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.sealed = 0

    async def __call__(self, record: AuditRecord) -> None:
        await self.handle_batch([record])

    async def handle_batch(self, records: list[AuditRecord]) -> None:
        """Seal ``records`` (in order): one transaction, one chain look-up and one batched write per
        facility. The in-process bus hands over whole relay batches; Kafka agents one by one."""
        by_facility: dict[str, list[AuditRecord]] = {}
        for record in records:
            by_facility.setdefault(record.facility, []).append(record)
        for facility, batch in by_facility.items():
            prepared = [_prepare(r) for r in batch]
            async with self.db.transaction(write=True, facility=facility) as conn:
                added = await audit_chain.append_many(
                    self.db,
                    conn,
                    facility,
                    [
                        (r.event_id, content, recorded)
                        for r, (_, content, recorded) in zip(batch, prepared, strict=True)
                    ],
                )
                changes = [
                    Change("AuditEvent", r.event_id, event)
                    for r, (event, _, _), new in zip(batch, prepared, added, strict=True)
                    if new
                ]
                if changes:
                    await ResourceRepository(self.db, conn, facility, _SEALER).save_many(changes)
            self.sealed += len(changes)


def _prepare(record: AuditRecord) -> tuple[dict[str, Any], bytes, datetime]:
    event = dict(record.audit_event)
    meta = dict(event.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), {"system": audit_chain.SEALED_SYSTEM, "code": "sealed"}]
    event["meta"] = meta
    event["id"] = record.event_id
    return event, fhirjson.dumps(event), datetime.fromisoformat(record.recorded)
