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
        event = dict(record.audit_event)
        meta = dict(event.get("meta") or {})
        meta["tag"] = [*meta.get("tag", []), {"system": audit_chain.SEALED_SYSTEM, "code": "sealed"}]
        event["meta"] = meta
        event["id"] = record.event_id
        content = fhirjson.dumps(event)
        recorded = datetime.fromisoformat(record.recorded)
        async with self.db.transaction(write=True, facility=record.facility) as conn:
            if not await audit_chain.append(self.db, conn, record.facility, record.event_id, content, recorded):
                return
            repo = ResourceRepository(self.db, conn, record.facility, _SEALER)
            await repo.save_many([Change("AuditEvent", record.event_id, event)])
        self.sealed += 1
