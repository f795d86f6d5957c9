"""``Patient/{id}/$everything`` with the linked records of other facilities: consent, deny,
break-the-glass, paging bound to the facility, on every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from starlette.applications import Starlette

from gateway.linked import SOURCE_FACILITY
from subgraphs.store.database import Database
from tests.conftest import token_for
from tests.helpers import assert_outcome, create, observation, patient, treatment_consent
from tests.test_audit import chain, seal

NID = "https://unihealth.dev/fhir/sid/national-id"
RESTRICTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}


def _client(app: Starlette, facility: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://t/fhir/r5",
        headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}"},
        timeout=60,
    )


@dataclass
class Linked:
    app: Starlette
    home: str  # B: asks
    away: str  # A: holds the linked record
    mine: str  # B's patient
    theirs: str  # A's patient (same national id)
    away_ids: list[str]  # A's compartment of that patient, Patient first
    restricted: str  # A's Observation labelled R
    clinician: str  # B's clinician token
    owner: str  # A's admin token


@pytest.fixture
async def linked(app: Starlette, facility: str, other_facility: str) -> AsyncIterator[Linked]:
    settings = app.state.backends.settings
    nid = f"NID-{facility}"
    owner = token_for(settings, [other_facility])
    async with _client(app, facility, token_for(settings, [facility])) as home:
        mine = (await create(home, patient("Home", identifier=[{"system": NID, "value": nid}])))["id"]
        await create(home, observation(mine, code="1-1"))
        await create(home, observation(mine, code="1-2"))
    async with _client(app, other_facility, owner) as away:
        theirs = (await create(away, patient("Away", identifier=[{"system": NID, "value": nid}])))["id"]
        ids = [theirs]
        for code in ("2-1", "2-2", "2-3"):
            ids.append((await create(away, observation(theirs, code=code)))["id"])
        enc = {"resourceType": "Encounter", "status": "completed", "subject": {"reference": f"Patient/{theirs}"}}
        ids.append((await create(away, enc))["id"])
        labelled = observation(theirs, code="2-9", meta={"security": [RESTRICTED]})
        restricted = (await create(away, labelled))["id"]
    clinician = token_for(settings, [facility], roles=["clinician"])
    yield Linked(app, facility, other_facility, mine, theirs, ids, restricted, clinician, owner)


async def _consent(w: Linked, decision: str = "deny", **provision: Any) -> str:
    async with _client(w.app, w.away, w.owner) as away:
        return str((await create(away, treatment_consent(w.theirs, w.home, decision, **provision)))["id"])


async def _pages(c: httpx.AsyncClient, url: str, **params: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every entry of every page (following ``next``), and the pages."""
    entries, pages = [], []
    r = await c.get(url, params=params)
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body)
        entries += body.get("entry", [])
        nxt = [link["url"] for link in body["link"] if link["relation"] == "next"]
        if not nxt:
            return entries, pages
        r = await c.get(url, params={**params, "_page": parse_qs(urlparse(nxt[0]).query)["_page"][0]})


def _by_source(entries: list[dict[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in entries:
        if e.get("search", {}).get("mode") != "match":
            continue
        source = next((x["valueString"] for x in e.get("extension", []) if x["url"] == SOURCE_FACILITY), "local")
        out.setdefault(source, set()).add(e["resource"]["id"])
    return out


async def test_no_consent_nothing_linked(linked: Linked) -> None:
    async with _client(linked.app, linked.home, linked.clinician) as c:
        entries, pages = await _pages(c, f"/Patient/{linked.mine}/$everything", _count="2")
    assert set(_by_source(entries)) == {"local"} and len(_by_source(entries)["local"]) == 3
    assert all(linked.theirs not in str(p) and "meta" not in p for p in pages)
    async with _client(linked.app, linked.home, linked.clinician) as c:
        one = (await c.get(f"/Patient/{linked.mine}/$everything")).json()
    assert one["total"] == 3, "the total counts only what is shown"


@pytest.mark.parametrize("count", ["2", "3", "50"])
async def test_consent_permits_linked_records_marked_and_paged(linked: Linked, count: str) -> None:
    cid = await _consent(linked)  # deny, except facility B for treatment
    async with _client(linked.app, linked.home, linked.clinician) as c:
        entries, pages = await _pages(c, f"/Patient/{linked.mine}/$everything", _count=count)
    got = _by_source(entries)
    assert got[linked.away] == {*linked.away_ids, linked.restricted, cid}, "consent permits: present"
    assert len(got["local"]) == 3
    for e in entries:
        if e["resource"]["id"] in got[linked.away]:
            assert e["extension"] == [{"url": SOURCE_FACILITY, "valueString": linked.away}]
            assert e["fullUrl"].startswith(f"urn:unihealth:{linked.away}:")
    assert all(len(p.get("entry", [])) <= int(count) for p in pages)
    assert all(p.get("entry") for p in pages), "no empty page hints at unshared data"
    assert all("meta" not in p for p in pages), "no BTG label under consent"
    if count == "50":
        assert pages[0]["total"] == 3 + len(linked.away_ids) + 2


async def test_deny_provisions_and_labels_are_honoured(linked: Linked) -> None:
    await _consent(linked, decision="permit", securityLabel=[RESTRICTED])  # permit, but not R-labelled data
    async with _client(linked.app, linked.home, linked.clinician) as c:
        entries, _ = await _pages(c, f"/Patient/{linked.mine}/$everything", _count="2")
    shared = _by_source(entries)[linked.away]
    assert linked.restricted not in shared and linked.theirs in shared, "the R-labelled record stays home"
    # a deny provision for B wins over the permit
    await _consent(linked, decision="permit")
    async with _client(linked.app, linked.home, linked.clinician) as c:
        entries, pages = await _pages(c, f"/Patient/{linked.mine}/$everything", _count="2")
    assert set(_by_source(entries)) == {"local"} and all(linked.theirs not in str(p) for p in pages)


async def test_break_the_glass_shares_labels_and_audits(linked: Linked, relay_database: Database) -> None:
    async with _client(linked.app, linked.home, linked.clinician) as c:
        url = f"/Patient/{linked.mine}/$everything"
        r = await c.get(url, headers={"X-Break-Glass-Reason": "unconscious in ED"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["meta"]["security"][0]["code"] == "BTG"
        assert _by_source(body["entry"])[linked.away] == {*linked.away_ids, linked.restricted}
        entries, pages = await _pages(c, url, _count="2")  # the session lasts: every page labelled
        assert _by_source(entries)[linked.away] == {*linked.away_ids, linked.restricted}
        assert all(p["meta"]["security"][0]["code"] == "BTG" for p in pages)
    nurse = token_for(linked.app.state.backends.settings, [linked.home], roles=["nurse"])
    async with _client(linked.app, linked.home, nurse) as n:
        assert_outcome(await n.get(url, headers={"X-Break-Glass-Reason": "x"}), 403)
    await seal(linked.app, relay_database)
    home_codes = [e["code"]["coding"][0]["code"] for e in await chain(linked.app, linked.home)]
    assert "110127" in home_codes, "the override is on the home facility's record"
    owner_events = [e for e in await chain(linked.app, linked.away) if "linked $everything" in str(e)]
    assert owner_events and all(e["patient"] == {"reference": f"Patient/{linked.theirs}"} for e in owner_events)
    assert "break-the-glass" in str(owner_events[0])


async def test_cursor_replayed_by_another_facility_is_refused(linked: Linked) -> None:
    await _consent(linked)
    settings = linked.app.state.backends.settings
    async with _client(linked.app, linked.home, linked.clinician) as c:
        _, pages = await _pages(c, f"/Patient/{linked.mine}/$everything", _count="2")
    cursors = [
        parse_qs(urlparse(link["url"]).query)["_page"][0]
        for p in pages
        for link in p["link"]
        if link["relation"] == "next"
    ]
    linked_cursor = cursors[-1]  # well inside the linked records
    both = token_for(settings, [linked.home, linked.away])
    async with _client(linked.app, linked.away, both) as other:
        # the other facility has a patient with B's patient's id: the very same query, replayed
        same_id = {**patient("Twin"), "id": linked.mine}
        assert (await other.put(f"/Patient/{linked.mine}", json=same_id)).status_code == 201
        params = {"_count": "2", "_page": linked_cursor}
        assert_outcome(await other.get(f"/Patient/{linked.mine}/$everything", params=params), 400)
        assert_outcome(await other.get(f"/Patient/{linked.theirs}/$everything", params=params), 400)
    # and at B, the cursor is bound to its query
    async with _client(linked.app, linked.home, linked.clinician) as c:
        r = await c.get(f"/Patient/{linked.mine}/$everything", params={"_count": "3", "_page": linked_cursor})
        assert r.status_code == 200  # _count is not part of the scope
        r = await c.get(
            f"/Patient/{linked.mine}/$everything", params={"_count": "2", "_type": "Patient", "_page": linked_cursor}
        )
        assert_outcome(r, 400)


async def test_type_filter_and_withdrawal_mid_paging(linked: Linked) -> None:
    cid = await _consent(linked)
    async with _client(linked.app, linked.home, linked.clinician) as c:
        entries, _ = await _pages(c, f"/Patient/{linked.mine}/$everything", _type="Encounter")
        assert _by_source(entries) == {linked.away: {linked.away_ids[-1]}}, "_type applies to linked records"
        first = (await c.get(f"/Patient/{linked.mine}/$everything", params={"_count": "4"})).json()
        nxt = next(link["url"] for link in first["link"] if link["relation"] == "next")
        token = parse_qs(urlparse(nxt).query)["_page"][0]
    async with _client(linked.app, linked.away, linked.owner) as away:  # the owner withdraws its consent
        consent = (await away.get(f"/Consent/{cid}")).json()
        assert (await away.put(f"/Consent/{cid}", json={**consent, "status": "inactive"})).status_code == 200
    async with _client(linked.app, linked.home, linked.clinician) as c:
        r = await c.get(f"/Patient/{linked.mine}/$everything", params={"_count": "4", "_page": token})
        assert r.status_code == 200, r.text
        assert linked.away not in r.text and linked.theirs not in r.text, "the next page shares nothing any more"
