"""The access audit: one AuditEvent, shaped after IHE BALP, for every request — allowed or denied.

Contract:
* The protocol layer (REST route wrapper, GraphQL view) opens an :class:`AccessAudit` per request
  and fills in what it learns: who (the verified principal, or nobody), the facility, the
  interaction, the resource type/id or query, the outcome status, and — through the
  repositories the request used — every resource it returned or wrote (their patients).
* :func:`audit_event` turns it into an R5 ``AuditEvent``; :func:`persist` appends it to the outbox
  (operation ``audit``) so it is never lost once committed: the relay publishes it to
  ``unihealth.audit`` and the sealer appends it to the facility's hash chain and stores it.
* Reads and failures are persisted in their own transaction before the response is sent; a
  successful write persists its record in the write's own transaction (atomic with the change).
* :func:`audit_event` always returns a valid R5 AuditEvent, whatever the token, headers and URL
  held (values that are not a valid FHIR string or code are normalized or replaced, see
  :func:`subject_agent`, :func:`fhir_code`). The embedded sealer relies on it: it stores these
  events without validating them again (:mod:`streams.sealer`, ``trusted``), and
  tests/test_audit.py validates the output for hostile inputs.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from subgraphs.store import fhirjson
from subgraphs.store.dates import instant
from subgraphs.store.repository import ResourceRepository

from .tokens import Principal

ACTIONS = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "search-type": "E",
    "search-system": "E",
    "history-instance": "R",
    "history-type": "E",
    "history-system": "E",
    "update": "U",
    "delete": "D",
    "transaction": "E",
    "batch": "E",
    "operation": "E",
    "graphql": "E",
    "capabilities": "R",
}
_INTERACTION_SYSTEM = "http://hl7.org/fhir/restful-interaction"
_OUTCOMES = {0: ("0", "Success"), 4: ("4", "Minor failure"), 8: ("8", "Serious failure")}


@dataclass
class AccessAudit:
    interaction: str
    facility: str | None = None
    principal: Principal | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    query: str = ""
    client: str | None = None
    request_id: str = ""
    status: int = 0
    detail: str = ""
    patients: set[str] = field(default_factory=set)
    touched: list[tuple[str, str]] = field(default_factory=list)
    inline: bool = False  # a single write: persist inside the write's transaction
    recorded: bool = False
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def absorb(self, repo: ResourceRepository) -> None:
        """Take what ``repo`` returned or wrote (its resources and their patients)."""
        self.touched.extend(repo.touched)
        self.patients |= repo.patients


_FHIR_STRING = re.compile(r"[ \r\n\t\S]")
"""A FHIR ``string`` must contain a character of this class (R5's regex; Python's ``\\S`` is the stricter)."""
UNREPRESENTABLE_SUBJECT = "no valid subject in the token"


def fhir_code(value: str) -> str | None:
    """``value`` as a valid FHIR ``code`` (whitespace runs made one space, ends trimmed), None if empty."""
    return " ".join(value.split()) or None


def subject_agent(subject: str) -> dict[str, Any]:
    """The ``who`` of an agent for a token subject: its identifier, or a display saying the token's
    subject could not be represented (empty, or only exotic whitespace) — never an invalid string."""
    if _FHIR_STRING.search(subject):
        return {"identifier": {"system": "urn:unihealth:subject", "value": subject}}
    return {"display": UNREPRESENTABLE_SUBJECT}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def audit_event(audit: AccessAudit, recorded: datetime) -> dict[str, Any]:
    """The R5 AuditEvent for ``audit`` (BALP: category rest, code = the interaction)."""
    grade = 0 if audit.status < 400 else (4 if audit.status < 500 else 8)
    code, display = _OUTCOMES[grade]
    principal = audit.principal
    who: dict[str, Any] = subject_agent(principal.subject) if principal else {"display": "unauthenticated"}
    user: dict[str, Any] = {
        "type": {
            "coding": [
                _coding("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP", "information recipient")
            ]
        },
        "who": who,
        "requestor": True,
    }
    if principal and principal.roles:
        user["role"] = [{"coding": [_coding("urn:unihealth:role", r)]} for r in principal.roles]
    if audit.client and _FHIR_STRING.search(audit.client):
        user["networkString"] = audit.client
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "category": [
            {"coding": [_coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "RESTful Operation")]}
        ],
        "code": {"coding": [_coding(_INTERACTION_SYSTEM, fhir_code(audit.interaction) or "unknown")]},
        "action": ACTIONS.get(audit.interaction, "E"),
        "severity": "informational" if grade == 0 else "warning",
        "recorded": instant(recorded),
        "outcome": {
            "code": _coding("http://terminology.hl7.org/CodeSystem/audit-event-outcome", code, display),
            "detail": [{"text": f"HTTP {audit.status}" + (f": {audit.detail}" if audit.detail else "")}],
        },
        "agent": [
            user,
            {
                "type": {
                    "coding": [_coding("http://dicom.nema.org/resources/ontology/DCM", "110153", "Source Role ID")]
                },
                "who": {"display": "UniHealth edge"},
                "requestor": False,
            },
        ],
        "source": {
            "observer": {"display": "UniHealth edge"},
            "type": [
                {
                    "coding": [
                        _coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")
                    ]
                }
            ],
        },
    }
    purpose = fhir_code(principal.purpose_of_use or "") if principal else None
    if purpose:
        event["authorization"] = [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/v3-ActReason", purpose)]}]
    patients = sorted(audit.patients)
    if len(patients) == 1:
        event["patient"] = {"reference": f"Patient/{patients[0]}"}
    entities: list[dict[str, Any]] = [
        {
            "what": {"reference": f"Patient/{p}"},
            "role": {"coding": [_coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient")]},
        }
        for p in patients
    ]
    if audit.resource_type and audit.resource_id:
        entities.append(
            {
                "what": {"reference": f"{audit.resource_type}/{audit.resource_id}"},
                "role": {
                    "coding": [_coding("http://terminology.hl7.org/CodeSystem/object-role", "4", "Domain Resource")]
                },
            }
        )
    if audit.query:
        import base64

        entities.append(
            {
                "query": base64.b64encode(audit.query.encode()).decode(),
                "role": {"coding": [_coding("http://terminology.hl7.org/CodeSystem/object-role", "24", "Query")]},
            }
        )
    if audit.request_id and _FHIR_STRING.search(audit.request_id):
        entities.append({"what": {"identifier": {"system": "urn:unihealth:request", "value": audit.request_id}}})
    if entities:
        event["entity"] = entities
    return event


async def persist(repo: ResourceRepository, audit: AccessAudit) -> None:
    """Append ``audit`` to the outbox inside ``repo``'s transaction (once)."""
    if audit.recorded:
        return
    audit.patients |= await repo.patients_of(audit.touched)
    now = datetime.now(UTC)
    payload = fhirjson.dumps(audit_event(audit, now))
    patient = min(audit.patients) if len(audit.patients) == 1 else None
    await repo.append_audit(audit.event_id, payload, patient, now)
    audit.recorded = True
