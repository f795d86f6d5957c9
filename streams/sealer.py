"""The audit sealer: access records → the facility's hash chain + a stored AuditEvent.

Contract: :class:`AuditSealer` is a bus handler for :data:`~streams.events.AUDIT_TOPIC`. For each
record it, in ONE transaction of the record's facility, appends the record to the chain
(:func:`streams.audit_chain.append`, once per ``event_id``) and stores the AuditEvent as a resource
(id = ``event_id``, tagged ``urn:unihealth:audit|sealed``) so auditors can search it. A redelivered
record changes nothing. The embedded in-process bus and the Kafka worker call the same handler.

Trust (what is validated where):

* ``AuditSealer(db)`` — the default, and what the Kafka worker (:mod:`streams.worker`) runs —
  treats every record as untrusted input: each AuditEvent is validated against the full R5 model
  (``fhir.resources``) before anything is written. An invalid one fails the handler, so nothing of
  its batch is chained or stored; the worker's :class:`~streams.processing.Processor` retries it
  and then dead-letters it. A broker carries whatever any producer wrote to the topic.
* ``AuditSealer(db, trusted=True)`` — only for records the relay read from this store's own
  outbox and handed over in process (:func:`streams.embedded.subscribe_embedded` with the
  :class:`~streams.bus.InProcessBus`). Those AuditEvents were built by the server itself
  (:func:`gateway.security.audit.audit_event`, :mod:`gateway.security.break_glass`), whose output
  tests validate against the R5 model for hostile inputs (tests/test_audit.py), so the sealer
  stores them without validating again (``save_many(validated=True)``). Everything else is the
  same: chain, index, history and the AuditEvent's own change event.
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
    """The handler (see the module docstring); ``trusted`` only for the in-process outbox path."""

    def __init__(self, db: Database, *, trusted: bool = False) -> None:
        self.db = db
        self.trusted = trusted
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
                    repository = ResourceRepository(self.db, conn, facility, _SEALER)
                    await repository.save_many(changes, validated=self.trusted)
            self.sealed += len(changes)


def _prepare(record: AuditRecord) -> tuple[dict[str, Any], bytes, datetime]:
    event = dict(record.audit_event)
    meta = dict(event.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), {"system": audit_chain.SEALED_SYSTEM, "code": "sealed"}]
    event["meta"] = meta
    event["id"] = record.event_id
    return event, fhirjson.dumps(event), datetime.fromisoformat(record.recorded)
