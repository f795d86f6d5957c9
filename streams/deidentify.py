"""De-identification for analysts: change events → ``unihealth.deidentified.<Type>``.

Contract (:func:`deidentify` on one resource, :class:`Deidentifier` on one change event):

* **Removed** wherever they occur: ``name``, ``identifier``, ``address``, ``telecom``, ``photo``,
  ``contact``, ``note``, ``comment``, ``patientInstruction``, ``valueString``, ``valueMarkdown``,
  ``valueAttachment``, ``presentedForm``, ``extension`` and ``modifierExtension`` (they may carry
  anything), the narrative (``text`` holding a ``div``), free ``text`` outside a CodeableConcept
  (e.g. Dosage.text), ``display`` outside a Coding (Reference.display names people),
  ``meta.source``, and element ``id``\\ s. ``contained`` resources are de-identified the same way.
* **Kept**: facility, codes (Coding, CodeableConcept incl. its text), quantities and other values,
  status fields, ``meta.versionId``/``tag``/``security``/``profile``.
* **Dates shifted**: every date, dateTime and instant moves by the same whole number of days,
  :func:`date_shift_days` = HMAC(key, ``facility|patient``) mapped to ±1..365 — stable per patient,
  so intervals within one patient's record are preserved. Only the date part of the string changes:
  the time of day, the fraction and the timezone form (``Z``, ``+02:00`` or none) stay as written.
  ``YYYY`` / ``YYYY-MM`` values (under date-named elements) shift their first day and keep their
  precision. Resources outside any patient compartment shift by their own ``facility|Type/id``.
* **Pseudonyms**: the resource id, and every reference ``Type/id`` (also ``.../_history/n``), become
  ``pseudonym(facility, Type, id)`` — 32 hex chars of HMAC(key, ``facility|Type/id``), so links
  between de-identified resources survive; local ``#`` references stay; any other reference
  (absolute URL, URN) is replaced by ``urn:unihealth:pseudonym:<hmac>``.
* **Message**: topic ``unihealth.deidentified.<Type>``, key ``facility|<patient pseudonym>`` (else
  ``facility|Type/<pseudonym>``) — the change topics' key scheme — and value (schema 1)::

      {"schema": 1, "event_id": "<hmac of the event id>", "facility": "fac-001",
       "resource_type": "Observation", "resource_id": "<pseudonym>", "version": 3,
       "operation": "update", "patient": "<pseudonym>" | null,
       "occurred_at": "<shifted instant>", "resource": {...} | null}   # null for a delete

The key is derived from ``UNIHEALTH_SECRET_KEY`` (:func:`derive_key`) unless one is given; anyone
with it can recompute pseudonyms from real ids, so it never leaves the worker.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable, Collection
from datetime import date, timedelta
from typing import Any

from subgraphs.store import fhirjson
from subgraphs.store.access import AccessPolicy
from subgraphs.store.database import Database
from subgraphs.store.repository import ResourceRepository

from .bus import Message
from .events import ChangeEvent, topic_for
from .invalidation import patient_of

TOPIC_PREFIX = "unihealth.deidentified."
SCHEMA_VERSION = 1
DEFAULT_EXCLUDED_TYPES = frozenset({"AuditEvent"})
"""Access records name users and network addresses and are for auditors, not analysts."""

_READER = AccessPolicy.unrestricted("de-identification agent")

REMOVED = frozenset(
    {
        "name",
        "identifier",
        "address",
        "telecom",
        "photo",
        "contact",
        "note",
        "comment",
        "patientInstruction",
        "valueString",
        "valueMarkdown",
        "valueAttachment",
        "presentedForm",
        "extension",
        "modifierExtension",
    }
)
_CODE_KEYS = frozenset({"code", "system", "version"})
_DATE_KEYS = frozenset({"start", "end", "issued", "recorded", "authoredOn", "lastUpdated", "event"})
_FULL_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?=$|T)")
_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?$")
_RELATIVE_REF = re.compile(r"^([A-Z][A-Za-z0-9]{0,63})/([A-Za-z0-9\-.]{1,64})(/_history/[A-Za-z0-9\-.]{1,64})?$")


def topic(resource_type: str) -> str:
    """``unihealth.deidentified.<Type>``."""
    return TOPIC_PREFIX + topic_for(resource_type).rsplit(".", 1)[1]


def derive_key(secret: bytes) -> bytes:
    """The de-identification key derived from the install secret (a separate HMAC domain)."""
    return hmac.new(secret, b"unihealth/deidentify/v1", hashlib.sha256).digest()


def _mac(key: bytes, domain: str, text: str) -> bytes:
    return hmac.new(key, f"{domain}\x00{text}".encode(), hashlib.sha256).digest()


def pseudonym(key: bytes, facility: str, resource_type: str, resource_id: str) -> str:
    """A stable pseudonymous id for ``Type/id`` in ``facility``: 32 hex characters."""
    return _mac(key, "id", f"{facility}|{resource_type}/{resource_id}").hex()[:32]


def date_shift_days(key: bytes, facility: str, subject: str) -> int:
    """The per-patient (``subject``) shift: a stable whole number of days in -365..-1 or 1..365."""
    n = int.from_bytes(_mac(key, "date-shift", f"{facility}|{subject}")[:8], "big") % 730
    return n - 365 if n < 365 else n - 364


def shift_date_text(value: str, days: int, *, partial: bool) -> str | None:
    """``value`` (a FHIR date, dateTime or instant) moved by ``days``; None if it is not one.

    Only the leading ``YYYY-MM-DD`` changes; ``partial`` allows ``YYYY`` and ``YYYY-MM``.
    """
    m = _FULL_DATE.match(value)
    if m is not None:
        try:
            moved = date(int(m[1]), int(m[2]), int(m[3])) + timedelta(days=days)
        except (ValueError, OverflowError):
            return None
        return moved.isoformat() + value[10:]
    if not partial:
        return None
    p = _PARTIAL_DATE.match(value)
    if p is None:
        return None
    try:
        moved = date(int(p[1]), int(p[2] or 1), 1) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{moved.year:04d}-{moved.month:02d}" if p[2] else f"{moved.year:04d}"


def _date_named(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(("date", "datetime", "instant")) or name in _DATE_KEYS


class _Scrubber:
    def __init__(self, key: bytes, facility: str, days: int) -> None:
        self.key = key
        self.facility = facility
        self.days = days

    def reference(self, ref: str) -> str:
        if ref.startswith("#"):
            return ref
        m = _RELATIVE_REF.match(ref)
        if m is None:
            return "urn:unihealth:pseudonym:" + _mac(self.key, "ref", f"{self.facility}|{ref}").hex()[:32]
        return f"{m[1]}/{pseudonym(self.key, self.facility, m[1], m[2])}"

    def value(self, name: str, value: Any) -> Any:
        if isinstance(value, dict):
            return self.element(value)
        if isinstance(value, list):
            return [self.value(name, v) for v in value]
        if isinstance(value, str) and name not in _CODE_KEYS:
            shifted = shift_date_text(value, self.days, partial=_date_named(name))
            if shifted is not None:
                return shifted
        return value

    def element(self, obj: dict[str, Any], *, top: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        is_coding = "code" in obj or "system" in obj
        for name, value in obj.items():
            if name in REMOVED:
                continue
            if name == "text" and (isinstance(value, dict) or "coding" not in obj):
                continue  # narrative, or free text outside a CodeableConcept
            if name == "display" and not is_coding:
                continue  # Reference.display names people
            if name == "id" and not top:
                continue
            if name == "reference" and isinstance(value, str):
                out[name] = self.reference(value)
            elif name == "meta" and isinstance(value, dict):
                meta = {k: v for k, v in value.items() if k != "source"}
                out[name] = self.element(meta)
            elif name == "contained" and isinstance(value, list):
                out[name] = [self.contained(v) for v in value if isinstance(v, dict)]
            else:
                out[name] = self.value(name, value)
        return out

    def contained(self, resource: dict[str, Any]) -> dict[str, Any]:
        out = self.element(resource)
        if isinstance(resource.get("id"), str):
            out["id"] = resource["id"]  # local to its container: '#id' references stay valid
        return out


def deidentify(resource: dict[str, Any], *, key: bytes, facility: str, subject: str) -> dict[str, Any]:
    """The de-identified copy of ``resource`` (see the module docstring); ``subject`` is the
    patient id whose date shift applies (or ``Type/id`` outside any compartment)."""
    scrub = _Scrubber(key, facility, date_shift_days(key, facility, subject))
    out = scrub.element(resource, top=True)
    if isinstance(resource.get("id"), str) and isinstance(resource.get("resourceType"), str):
        out["id"] = pseudonym(key, facility, resource["resourceType"], resource["id"])
    return out


Publish = Callable[[Message], Awaitable[None]]


class Deidentifier:
    """Change-event handler: reads the changed version (vread, unrestricted, in the event's
    facility), de-identifies it and publishes it with ``publish`` (the worker's producer).

    A version that cannot be read raises LookupError (the agent retries, then dead-letters).
    Types in ``excluded`` (default: AuditEvent) are skipped.
    """

    def __init__(
        self, db: Database, key: bytes, publish: Publish, *, excluded: Collection[str] = DEFAULT_EXCLUDED_TYPES
    ) -> None:
        if len(key) < 16:
            raise ValueError("the de-identification key must be at least 16 bytes")
        self.db = db
        self.key = key
        self.publish = publish
        self.excluded = frozenset(excluded)
        self.published = 0

    async def __call__(self, event: ChangeEvent) -> None:
        message = await self.message_for(event)
        if message is not None:
            await self.publish(message)
            self.published += 1

    async def message_for(self, event: ChangeEvent) -> Message | None:
        """The de-identified message for ``event`` (None for an excluded type)."""
        if event.resource_type in self.excluded:
            return None
        f, key = event.facility, self.key
        patient = patient_of(event)
        subject = patient if patient is not None else f"{event.resource_type}/{event.resource_id}"
        resource: dict[str, Any] | None = None
        if event.operation != "delete":
            async with self.db.transaction(write=False, facility=f) as conn:
                repo = ResourceRepository(self.db, conn, f, _READER)
                stored = await repo.vread(event.resource_type, event.resource_id, event.version)
            if stored is None or stored.content is None:
                raise LookupError(f"{event.resource_type}/{event.resource_id}/_history/{event.version} is not in {f}")
            resource = deidentify(stored.json(), key=key, facility=f, subject=subject)
        days = date_shift_days(key, f, subject)
        pseudo_patient = pseudonym(key, f, "Patient", patient) if patient is not None else None
        rid = pseudonym(key, f, event.resource_type, event.resource_id)
        value = {
            "schema": SCHEMA_VERSION,
            "event_id": _mac(key, "event", event.event_id).hex()[:32],
            "facility": f,
            "resource_type": event.resource_type,
            "resource_id": rid,
            "version": event.version,
            "operation": event.operation,
            "patient": pseudo_patient,
            "occurred_at": shift_date_text(event.occurred_at, days, partial=False) or event.occurred_at,
            "resource": resource,
        }
        message_key = f"{f}|{pseudo_patient}" if pseudo_patient else f"{f}|{event.resource_type}/{rid}"
        return Message(topic(event.resource_type), message_key.encode(), fhirjson.dumps(value))
