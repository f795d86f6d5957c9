"""Cross-facility sharing: linked records by national identifier, R5 Consent, break-the-glass."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from starlette.applications import Starlette

from gateway.security import break_glass
from gateway.security.consent import FACILITY_SYSTEM, decision, permits
from subgraphs.store.database import Database
from subgraphs.store.schema import btg_sessions
from tests.conftest import token_for
from tests.helpers import TREATMENT, assert_outcome, create, observation, patient, treatment_consent
from tests.test_audit import chain, seal

NID = "https://unihealth.dev/fhir/sid/national-id"
NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _consent(decision_: str = "permit", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "decision": decision_,
        "subject": {"reference": "Patient/a"},
        **extra,
    }


def _actor(facility: str) -> dict[str, Any]:
    return {"reference": {"identifier": {"system": FACILITY_SYSTEM, "value": facility}}}


PURPOSE = TREATMENT
MATRIX = [
    # (name, consent, requester, purpose, labels, expected)
    ("network-wide permit", _consent(), "B", "TREAT", set(), True),
    ("draft does not count", _consent(status="draft"), "B", "TREAT", set(), False),
    ("inactive status", _consent(status="inactive"), "B", "TREAT", set(), False),
    ("within period", _consent(period={"start": "2026-01-01", "end": "2026-12-31"}), "B", "TREAT", set(), True),
    ("expired", _consent(period={"end": "2026-05-31"}), "B", "TREAT", set(), False),
    ("not yet", _consent(period={"start": "2026-06-02"}), "B", "TREAT", set(), False),
    (
        "grantee is B",
        _consent(grantee=[{"identifier": {"system": FACILITY_SYSTEM, "value": "B"}}]),
        "B",
        "TREAT",
        set(),
        True,
    ),
    (
        "grantee is C",
        _consent(grantee=[{"identifier": {"system": FACILITY_SYSTEM, "value": "C"}}]),
        "B",
        "TREAT",
        set(),
        False,
    ),
    ("base deny", _consent("deny"), "B", "TREAT", set(), False),
    (
        "deny except B for treatment",
        _consent("deny", provision=[{"actor": [_actor("B")], "purpose": [PURPOSE]}]),
        "B",
        "TREAT",
        set(),
        True,
    ),
    (
        "deny except B: C asks",
        _consent("deny", provision=[{"actor": [_actor("B")], "purpose": [PURPOSE]}]),
        "C",
        "TREAT",
        set(),
        False,
    ),
    (
        "deny except B for treatment: research",
        _consent("deny", provision=[{"actor": [_actor("B")], "purpose": [PURPOSE]}]),
        "B",
        "HRESCH",
        set(),
        False,
    ),
    (
        "permit but not restricted data",
        _consent(
            provision=[
                {"securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}
            ]
        ),
        "B",
        "TREAT",
        {"R"},
        False,
    ),
    (
        "permit, unrestricted data",
        _consent(
            provision=[
                {"securityLabel": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}
            ]
        ),
        "B",
        "TREAT",
        {"N"},
        True,
    ),
    (
        "deny provision with a permit inside",
        _consent(provision=[{"actor": [_actor("B")], "provision": [{"purpose": [PURPOSE]}]}]),
        "B",
        "TREAT",
        set(),
        True,
    ),
    (
        "deny provision, other purpose",
        _consent(provision=[{"actor": [_actor("B")], "provision": [{"purpose": [PURPOSE]}]}]),
        "B",
        "ETREAT",
        set(),
        False,
    ),
    (
        "provision period over",
        _consent("deny", provision=[{"actor": [_actor("B")], "period": {"end": "2026-01-01"}}]),
        "B",
        "TREAT",
        set(),
        False,
    ),
]


@pytest.mark.parametrize(
    ("name", "consent", "requester", "purpose", "labels", "expected"), MATRIX, ids=[m[0] for m in MATRIX]
)
def test_consent_matrix(
    name: str, consent: dict[str, Any], requester: str, purpose: str, labels: set[str], expected: bool
) -> None:
    assert permits([consent], requester, purpose, labels, NOW) is expected


def test_any_deny_wins() -> None:
    assert permits([_consent(), _consent("deny")], "B", "TREAT", set(), NOW) is False
    assert decision(_consent(status="entered-in-error"), "B", "TREAT", set(), NOW) is None
    assert permits([], "B", "TREAT", set(), NOW) is False


async def _linked_patient(client: httpx.AsyncClient, facility: str, nid: str) -> str:
    return str((await create(client, patient(identifier=[{"system": NID, "value": nid}])))["id"])


def _sources(bundle: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in bundle["entry"]:
        source = next((x["valueString"] for x in e.get("extension", [])), "local")
        out.setdefault(source, []).append(e["resource"]["resourceType"])
    return out


async def test_linked_records_need_consent_or_break_the_glass(
    app: Starlette, relay_database: Database, facility: str, other_facility: str
) -> None:
    settings = app.state.backends.settings
    nid = f"NID-{facility}"
    both = token_for(settings, [facility, other_facility])

    def client_for(fac: str, token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t/fhir/r5",
            headers={"X-Facility-Id": fac, "Authorization": f"Bearer {token}"},
        )

    async with client_for(facility, both) as home, client_for(other_facility, both) as away:
        mine = await _linked_patient(home, facility, nid)
        theirs = await _linked_patient(away, other_facility, nid)
        await create(away, observation(theirs, code="4548-4", category="laboratory"))
        unrelated = await _linked_patient(away, other_facility, "someone-else")
        await create(away, observation(unrelated))
    clinician = token_for(settings, [facility], roles=["clinician"])
    async with client_for(facility, clinician) as c:
        summary = (await c.get(f"/Patient/{mine}/summary")).json()
        assert _sources(summary) == {"local": ["Patient"]}, "no consent: nothing shared, nothing hinted"
        assert "meta" not in summary
    # the data owner records a consent permitting the home facility, for treatment
    consent = treatment_consent(theirs, facility)
    async with client_for(other_facility, both) as away:
        cid = (await create(away, consent))["id"]
    async with client_for(facility, clinician) as c:
        summary = (await c.get(f"/Patient/{mine}/summary")).json()
        assert _sources(summary) == {"local": ["Patient"], other_facility: ["Patient", "Observation"]}
        assert all(
            theirs in e["resource"].get("id", "") or e["resource"]["resourceType"] != "Patient"
            for e in summary["entry"]
            if e.get("extension")
        )
    await seal(app, relay_database)
    shared = [e for e in await chain(app, other_facility) if e["code"]["coding"][0]["code"] == "operation"]
    assert len(shared) == 1 and shared[0]["patient"] == {"reference": f"Patient/{theirs}"}, "the owner sees it"
    # the consent is withdrawn: nothing again
    async with client_for(other_facility, both) as away:
        withdrawn = {**consent, "id": cid, "status": "inactive"}
        assert (await away.put(f"/Consent/{cid}", json=withdrawn)).status_code == 200
    async with client_for(facility, clinician) as c:
        assert _sources((await c.get(f"/Patient/{mine}/summary")).json()) == {"local": ["Patient"]}
        # break the glass: shared for the session, labelled, audited at the home facility
        btg = (await c.get(f"/Patient/{mine}/summary", headers={"X-Break-Glass-Reason": "unconscious in ED"})).json()
        assert _sources(btg)[other_facility] == ["Patient", "Observation"]
        assert btg["meta"]["security"][0]["code"] == "BTG"
        again = (await c.get(f"/Patient/{mine}/summary")).json()  # the session lasts, for this patient only
        assert other_facility in _sources(again) and again["meta"]["security"][0]["code"] == "BTG"
    nurse = token_for(settings, [facility], roles=["nurse"])
    async with client_for(facility, nurse) as n:
        assert_outcome(await n.get(f"/Patient/{mine}/summary", headers={"X-Break-Glass-Reason": "x"}), 403)
    # expiry: the stop is recorded, the sharing ends
    async with app.state.backends.repository(facility, write=True) as repo:
        await repo.conn.execute(
            update(btg_sessions)
            .where(btg_sessions.c.facility == facility)
            .values(expires_at=datetime(2020, 1, 1, tzinfo=UTC))
        )
    async with client_for(facility, clinician) as c:
        after = (await c.get(f"/Patient/{mine}/summary")).json()
        assert _sources(after) == {"local": ["Patient"]} and "meta" not in after
        await c.get(f"/Patient/{mine}/summary", headers={"X-Break-Glass-Reason": "second look"})  # sweeps, reopens
    await seal(app, relay_database)
    dcm = [
        e["code"]["coding"][0]["code"]
        for e in await chain(app, facility)
        if e["code"]["coding"][0]["system"].endswith("DCM")
    ]
    assert dcm == ["110127", "110138", "110127"], dcm
    async with app.state.backends.repository(facility, write=True) as repo:  # the privacy officer's review
        listed = await break_glass.sessions(repo)
        assert [s.reason for s in listed] == ["second look", "unconscious in ED"]
        assert [s.stop_recorded for s in listed] == [False, True]
        reviewed = await break_glass.review(repo, listed[1].id, "privacy officer", "justified: ED admission")
        assert reviewed.reviewed_by == "privacy officer" and reviewed.json()["reviewNote"].startswith("justified")
