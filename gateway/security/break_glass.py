"""Break-the-glass: time-limited, audited emergency access to one patient's records.

Contract:
* A clinician declares it per patient with a reason — header ``X-Break-Glass-Reason`` or a token
  whose ``purpose_of_use`` is ``BTG`` — and only roles in ``BREAK_GLASS_ROLES`` may (403 otherwise).
* :func:`engage` opens a session (or finds the caller's open one) for ``(facility, patient,
  subject)`` lasting ``settings.btg_minutes``; opening writes an AuditEvent "Emergency Override
  Started" (DICOM 110127) to the outbox in the same transaction.
* While the session is open, that patient's linked records at other facilities are shared even
  without a permitting Consent, and responses carry the security label ``BTG``.
* :func:`sweep` closes sessions past their expiry with an AuditEvent "Emergency Override Stopped"
  (110138); it runs whenever sessions are engaged or listed, so a stop is recorded at the latest
  when anyone next looks. :func:`review` lets a privacy officer mark a session reviewed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, insert, select, update

from subgraphs.store import fhirjson
from subgraphs.store.dates import as_utc, instant
from subgraphs.store.errors import FhirError, bad_request
from subgraphs.store.repository import ResourceRepository
from subgraphs.store.schema import btg_sessions

from .audit import subject_agent
from .tokens import Principal

BREAK_GLASS_ROLES = ("clinician",)
LABEL = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "BTG", "display": "break the glass"}
_DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass(frozen=True)
class Session:
    facility: str
    id: str
    patient_id: str
    subject: str
    reason: str
    started_at: datetime
    expires_at: datetime
    stop_recorded: bool
    reviewed_by: str | None
    reviewed_at: datetime | None
    review_note: str | None

    @classmethod
    def from_row(cls, row: Any) -> Session:
        return cls(
            row.facility,
            row.id,
            row.patient_id,
            row.subject,
            row.reason,
            as_utc(row.started_at),
            as_utc(row.expires_at),
            bool(row.stop_recorded),
            row.reviewed_by,
            as_utc(row.reviewed_at) if row.reviewed_at else None,
            row.review_note,
        )

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "facility": self.facility,
            "patient": f"Patient/{self.patient_id}",
            "subject": self.subject,
            "reason": self.reason,
            "started": instant(self.started_at),
            "expires": instant(self.expires_at),
            "open": not self.stop_recorded,
            "reviewedBy": self.reviewed_by,
            "reviewed": instant(self.reviewed_at) if self.reviewed_at else None,
            "reviewNote": self.review_note,
        }


def requested(principal: Principal, header_reason: str | None) -> str | None:
    """The declared reason, if this request breaks the glass."""
    if header_reason and header_reason.strip():
        return header_reason.strip()[:1000]
    if principal.purpose_of_use == "BTG":
        return "purpose of use BTG (token)"
    return None


def _override_event(session: Session, code: str, display: str, when: datetime) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "category": [{"coding": [{"system": _DCM, "code": "110113", "display": "Security Alert"}]}],
        "code": {"coding": [{"system": _DCM, "code": code, "display": display}]},
        "action": "E",
        "severity": "alert",
        "recorded": instant(when),
        "outcome": {
            "code": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-event-outcome",
                "code": "0",
                "display": "Success",
            },
            "detail": [{"text": f"break-the-glass session {session.id}: {session.reason}"}],
        },
        "authorization": [{"coding": [LABEL]}],
        "patient": {"reference": f"Patient/{session.patient_id}"},
        "agent": [{"who": subject_agent(session.subject), "requestor": True}],
        "source": {"observer": {"display": "UniHealth edge"}},
        "entity": [{"what": {"identifier": {"system": "urn:unihealth:btg-session", "value": session.id}}}],
    }


async def _record(repo: ResourceRepository, session: Session, code: str, display: str, when: datetime) -> None:
    await repo.append_audit(
        str(uuid.uuid4()), fhirjson.dumps(_override_event(session, code, display, when)), session.patient_id, when
    )


async def engage(
    repo: ResourceRepository,
    principal: Principal,
    patient_id: str,
    reason: str,
    minutes: int,
    roles: tuple[str, ...] = BREAK_GLASS_ROLES,
) -> Session:
    """The caller's open session for the patient, opened now if needed (see module contract)."""
    if not set(principal.roles) & set(roles):
        raise FhirError(403, "forbidden", "break-the-glass is not permitted for your role")
    if not reason:
        raise bad_request("break-the-glass needs a reason", expression=["X-Break-Glass-Reason"])
    now = datetime.now(UTC)
    await sweep(repo, now)
    await repo.lock(f"btg|{patient_id}|{principal.subject}")
    existing = await open_session(repo, principal, patient_id)
    if existing is not None:
        return existing
    session = Session(
        repo.facility,
        str(uuid.uuid4()),
        patient_id,
        principal.subject,
        reason,
        now,
        now + timedelta(minutes=minutes),
        False,
        None,
        None,
        None,
    )
    await repo.conn.execute(
        insert(btg_sessions),
        {
            "facility": session.facility,
            "id": session.id,
            "patient_id": patient_id,
            "subject": session.subject,
            "reason": reason,
            "started_at": now,
            "expires_at": session.expires_at,
            "stop_recorded": False,
        },
    )
    await _record(repo, session, "110127", "Emergency Override Started", now)
    return session


async def open_session(repo: ResourceRepository, principal: Principal, patient_id: str) -> Session | None:
    """The caller's session for this patient that has not expired yet, if any (read-only)."""
    row = (
        await repo.conn.execute(
            select(btg_sessions)
            .where(
                btg_sessions.c.facility == bindparam("f"),
                btg_sessions.c.patient_id == bindparam("p"),
                btg_sessions.c.subject == bindparam("s"),
                btg_sessions.c.expires_at > bindparam("now"),
            )
            .limit(1),
            {"f": repo.facility, "p": patient_id, "s": principal.subject, "now": datetime.now(UTC)},
        )
    ).first()
    return Session.from_row(row) if row is not None else None


async def sweep(repo: ResourceRepository, now: datetime | None = None) -> int:
    """Record "Emergency Override Stopped" for every expired session of this facility; returns how many."""
    now = now or datetime.now(UTC)
    rows = list(
        await repo.conn.execute(
            select(btg_sessions).where(
                btg_sessions.c.facility == bindparam("f"),
                btg_sessions.c.stop_recorded.is_(False),
                btg_sessions.c.expires_at <= bindparam("now"),
            ),
            {"f": repo.facility, "now": now},
        )
    )
    for row in rows:
        session = Session.from_row(row)
        await _record(repo, session, "110138", "Emergency Override Stopped", session.expires_at)
        await repo.conn.execute(
            update(btg_sessions)
            .where(and_(btg_sessions.c.facility == repo.facility, btg_sessions.c.id == session.id))
            .values(stop_recorded=True)
        )
    return len(rows)


async def sessions(repo: ResourceRepository, *, open_only: bool = False) -> list[Session]:
    stmt = select(btg_sessions).where(btg_sessions.c.facility == bindparam("f"))
    if open_only:
        stmt = stmt.where(btg_sessions.c.stop_recorded.is_(False))
    rows = await repo.conn.execute(stmt.order_by(btg_sessions.c.started_at.desc()), {"f": repo.facility})
    return [Session.from_row(r) for r in rows]


async def review(repo: ResourceRepository, session_id: str, by: str, note: str | None) -> Session:
    result = await repo.conn.execute(
        update(btg_sessions)
        .where(and_(btg_sessions.c.facility == repo.facility, btg_sessions.c.id == session_id))
        .values(reviewed_by=by, reviewed_at=datetime.now(UTC), review_note=note)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise FhirError(404, "not-found", f"no break-the-glass session {session_id}")
    found = [s for s in await sessions(repo) if s.id == session_id]
    return found[0]
