"""The change event: one versioned JSON message per committed change (schema version 1).

Contract (what any consumer, in any language, may rely on):

* **Topic.** One topic per resource type: ``unihealth.changes.<ResourceType>`` (:func:`topic_for`),
  e.g. ``unihealth.changes.Observation``. All topics share the prefix :data:`TOPIC_PREFIX`.
* **Key.** ``<facility>|<patient id>`` for a resource in a patient's compartment (the Patient itself
  included), else ``<facility>|<ResourceType>/<id>`` (:func:`message_key`, UTF-8). Kafka's default
  partitioner sends equal keys to one partition, so one patient's events on a topic are delivered
  in the order they were committed. Nothing orders events across topics.
* **Value.** A UTF-8 JSON object with exactly these fields (:meth:`ChangeEvent.to_json`)::

      {"schema": 1,                       # this contract's version (an integer)
       "event_id": "3f0c...-uuid",        # unique per change; consumers deduplicate on it
       "facility": "fac-001",             # owning facility; events never mix facilities
       "resource_type": "Observation",
       "resource_id": "9b1e...",
       "version": 3,                      # the resource's versionId after the change (>= 1)
       "operation": "create" | "update" | "delete",
       "patient_id": "2369..." | null,    # the compartment's Patient id, when there is one
       "occurred_at": "2026-01-31T10:00:00.123Z",   # UTC, equals the version's meta.lastUpdated
       "previous_patient_id": "51a0..." | null}     # added in 1: an update that moved the resource
                                                     # out of that patient's compartment

  The event is a *pointer*, not the resource: ``(facility, resource_type, resource_id, version)``
  names exactly one stored version, readable with a vread
  (``GET /fhir/r5/<type>/<id>/_history/<version>`` with ``X-Facility-Id: <facility>``). The issue
  allows either; a pointer keeps PHI off the bus and messages small, and a deleted version has no
  body anyway.
* **Delivery.** At least once: a relay that crashes after the broker acknowledged but before it
  recorded that, publishes the event again with the same ``event_id``. Consumers deduplicate by
  ``event_id``, and may drop an event whose ``version`` is not newer than one already applied to
  the same resource.
* **Evolution.** Within schema 1 fields may only be *added*; consumers must ignore fields they do
  not know. Removing or changing the meaning of a field bumps ``schema``; :meth:`ChangeEvent.from_json`
  rejects schemas it does not know rather than guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import orjson

SCHEMA_VERSION = 1
TOPIC_PREFIX = "unihealth.changes."

Operation = Literal["create", "update", "delete"]
OPERATIONS: frozenset[str] = frozenset(get_args(Operation))

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z0-9]{0,63}$")
_STRING_FIELDS = ("event_id", "facility", "resource_type", "resource_id", "occurred_at")


def topic_for(resource_type: str) -> str:
    """The topic carrying changes of ``resource_type``: ``unihealth.changes.<ResourceType>``."""
    if not _TYPE_RE.match(resource_type):
        raise ValueError(f"not a FHIR resource type name: {resource_type[:80]!r}")
    return TOPIC_PREFIX + resource_type


def message_key(facility: str, resource_type: str, resource_id: str, patient_id: str | None) -> bytes:
    """The Kafka message key: ``facility|patient`` (a Patient is its own patient), else ``facility|type/id``."""
    if patient_id is None and resource_type == "Patient":
        patient_id = resource_id
    subject = patient_id if patient_id is not None else f"{resource_type}/{resource_id}"
    return f"{facility}|{subject}".encode()


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One committed change, as published (see the module docstring for the wire contract)."""

    event_id: str
    facility: str
    resource_type: str
    resource_id: str
    version: int
    operation: Operation
    patient_id: str | None
    occurred_at: str
    previous_patient_id: str | None = None
    schema: int = SCHEMA_VERSION

    @property
    def topic(self) -> str:
        return topic_for(self.resource_type)

    @property
    def key(self) -> bytes:
        return message_key(self.facility, self.resource_type, self.resource_id, self.patient_id)

    def to_json(self) -> bytes:
        """The message value: the JSON object of the contract, UTF-8 (orjson serializes the dataclass)."""
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> ChangeEvent:
        """Parse and validate a message value; :class:`ValueError` names the first problem found.

        Unknown fields are ignored (additive evolution); an unknown ``schema`` is an error.
        """
        try:
            obj: Any = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"change event is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError("change event must be a JSON object")
        schema = obj.get("schema")
        if type(schema) is not int:
            raise ValueError("change event field 'schema' must be an integer")
        if schema != SCHEMA_VERSION:
            raise ValueError(f"unsupported change event schema {schema} (this reader knows {SCHEMA_VERSION})")
        for name in _STRING_FIELDS:
            value = obj.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"change event field {name!r} must be a non-empty string")
        version = obj.get("version")
        if type(version) is not int or version < 1:
            raise ValueError("change event field 'version' must be an integer >= 1")
        operation = obj.get("operation")
        if operation not in OPERATIONS:
            raise ValueError(f"change event field 'operation' must be one of {sorted(OPERATIONS)}")
        patient_id = obj.get("patient_id")
        if patient_id is not None and (not isinstance(patient_id, str) or not patient_id):
            raise ValueError("change event field 'patient_id' must be a non-empty string or null")
        previous = obj.get("previous_patient_id")
        if previous is not None and (not isinstance(previous, str) or not previous):
            raise ValueError("change event field 'previous_patient_id' must be a non-empty string or null")
        if not _TYPE_RE.match(obj["resource_type"]):
            raise ValueError("change event field 'resource_type' is not a resource type name")
        _check_instant(obj["occurred_at"])
        return cls(
            event_id=obj["event_id"],
            facility=obj["facility"],
            resource_type=obj["resource_type"],
            resource_id=obj["resource_id"],
            version=version,
            operation=operation,
            patient_id=patient_id,
            occurred_at=obj["occurred_at"],
            previous_patient_id=previous,
            schema=schema,
        )


def _check_instant(value: str) -> None:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("change event field 'occurred_at' must be an ISO 8601 instant") from None
    offset = parsed.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise ValueError("change event field 'occurred_at' must be in UTC")


AUDIT_TOPIC = "unihealth.audit"
"""The topic of access records (one per FHIR or GraphQL request), keyed by facility."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One access, as published on :data:`AUDIT_TOPIC` (schema 1)::

        {"schema": 1, "event_id": "<uuid>", "facility": "fac-001",
         "recorded": "2026-01-31T10:00:00.123Z", "audit_event": {... an R5 AuditEvent ...}}

    The key is the facility, so one facility's records arrive in order at the sealer, which
    appends them to that facility's hash chain and stores the AuditEvent (id = ``event_id``).
    Delivery is at least once; the sealer deduplicates by ``event_id``.
    """

    event_id: str
    facility: str
    recorded: str
    audit_event: dict[str, Any]
    schema: int = SCHEMA_VERSION

    @property
    def topic(self) -> str:
        return AUDIT_TOPIC

    @property
    def key(self) -> bytes:
        return self.facility.encode()

    def to_json(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> AuditRecord:
        try:
            obj: Any = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"audit record is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA_VERSION:
            raise ValueError("audit record must be a JSON object with schema 1")
        for name in ("event_id", "facility", "recorded"):
            if not isinstance(obj.get(name), str) or not obj[name]:
                raise ValueError(f"audit record field {name!r} must be a non-empty string")
        event = obj.get("audit_event")
        if not isinstance(event, dict) or event.get("resourceType") != "AuditEvent":
            raise ValueError("audit record field 'audit_event' must be an AuditEvent")
        return cls(obj["event_id"], obj["facility"], obj["recorded"], event)


Event = ChangeEvent | AuditRecord


def decode(topic: str, value: bytes | str) -> Event:
    """The event carried by a message of ``topic`` (ValueError when it is not valid)."""
    if topic == AUDIT_TOPIC:
        return AuditRecord.from_json(value)
    return ChangeEvent.from_json(value)
