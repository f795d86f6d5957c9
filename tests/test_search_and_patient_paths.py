"""Basic search, paging cursors, and the mandated patient paths, on every backend."""

from __future__ import annotations

from typing import Any

import httpx

from tests.helpers import LOINC, assert_outcome, create, observation, patient


def _ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle["entry"] if e.get("search", {}).get("mode") == "match"]


def _next(bundle: dict[str, Any]) -> str | None:
    url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return url.replace("http://testserver/fhir/r5", "") if url else None


async def _patient_with_obs(client: httpx.AsyncClient) -> tuple[str, list[str]]:
    pid = (await create(client, patient()))["id"]
    ids = []
    for day in range(1, 8):
        obs = observation(pid, when=f"2024-03-0{day}T08:00:00+01:00", value=60 + day)
        ids.append((await create(client, obs))["id"])
    ids.append((await create(client, observation(pid, code="4548-4", when="2024-02-01", category="laboratory")))["id"])
    return pid, ids


async def test_token_reference_date_and_sort(client: httpx.AsyncClient) -> None:
    pid, ids = await _patient_with_obs(client)
    hr = (await client.get("/Observation", params={"patient": pid, "code": f"{LOINC}|8867-4", "_sort": "-date"})).json()
    assert _ids(hr) == list(reversed(ids[:7]))
    assert _ids((await client.get("/Observation", params={"subject": f"Patient/{pid}", "code": "4548-4"})).json()) == [
        ids[7]
    ]
    both = (await client.get("/Observation", params={"patient": pid, "code": "4548-4,8867-4"})).json()
    assert len(_ids(both)) == 8
    assert _ids((await client.get("/Observation", params={"patient": pid, "code:not": "8867-4"})).json()) == [ids[7]]
    march = (await client.get("/Observation", params={"patient": pid, "date": "2024-03", "_sort": "date"})).json()
    assert _ids(march) == ids[:7]
    after = (
        await client.get("/Observation", params=[("patient", pid), ("date", "ge2024-03-05"), ("date", "lt2024-03-07")])
    ).json()
    assert sorted(_ids(after)) == sorted(ids[4:6])
    assert _ids((await client.get("/Observation", params={"patient": pid, "date": "2024-03-02"})).json()) == [ids[1]]
    # timezone: 2024-03-01T08:00+01:00 is 07:00Z
    assert (
        _ids(
            (
                await client.get(
                    "/Observation",
                    params={"patient": pid, "date": "sa2024-03-01T07:30:00Z", "date:x": "1", "_sort": "date"},
                )
            ).json()
        )[0]
        == ids[1]
    )
    assert _ids(
        (await client.get("/Observation", params={"patient": pid, "status": "final", "category": "laboratory"})).json()
    ) == [ids[7]]


async def test_string_search(client: httpx.AsyncClient) -> None:
    a = (await create(client, patient("Müller")))["id"]
    b = (await create(client, patient("Mullins")))["id"]
    assert sorted(_ids((await client.get("/Patient", params={"name": "mul"})).json())) == sorted([a, b])
    assert _ids((await client.get("/Patient", params={"family:exact": "Müller"})).json()) == [a]
    assert _ids((await client.get("/Patient", params={"family:contains": "llin"})).json()) == [b]
    assert _ids((await client.get("/Patient", params={"birthdate": "1970", "gender": "female", "_id": a})).json()) == [
        a
    ]


async def test_unknown_params_reported_under_lenient(client: httpx.AsyncClient) -> None:
    await create(client, patient())
    r = (await client.get("/Patient", params={"shoe-size": "42"})).json()
    outcomes = [e for e in r["entry"] if e["search"]["mode"] == "outcome"]
    assert outcomes and "shoe-size" in outcomes[0]["resource"]["issue"][0]["diagnostics"]
    assert len(_ids(r)) == 1


async def test_paging_is_keyset_and_bound_to_facility(client: httpx.AsyncClient, facility: str) -> None:
    pid, ids = await _patient_with_obs(client)
    seen: list[str] = []
    url: str | None = f"/Observation?patient={pid}&_sort=-date&_count=3"
    pages = 0
    while url:
        page = (await client.get(url)).json()
        seen += _ids(page)
        url = _next(page)
        pages += 1
        if url and pages == 1:
            replay = await client.get(url, headers={"X-Facility-Id": facility + "-other"})
            assert_outcome(replay, 400)
            token = url.split("_page=")[1]
            tampered = url.replace(token, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
            assert_outcome(await client.get(tampered), 400)
            other_query = f"/Observation?patient={pid}&_sort=date&_count=3&_page={token}"
            assert_outcome(await client.get(other_query), 400)
    assert pages == 3
    assert seen == [*reversed(ids[:7]), ids[7]], "newest first across pages, no gaps, no repeats"
    total = (await client.get("/Observation", params={"patient": pid, "_summary": "count"})).json()
    assert total["total"] == 8 and total["entry"] == []


async def test_search_never_crosses_facilities(client: httpx.AsyncClient, facility: str) -> None:
    pid, _ = await _patient_with_obs(client)
    other = {"X-Facility-Id": facility + "-other"}
    for params in ({"patient": pid}, {"code": "8867-4"}, {"_id": pid}):
        r = (await client.get("/Observation", params=params, headers=other)).json()
        assert r["entry"] == []
    count = (await client.get("/Observation", params={"code": "8867-4", "_total": "accurate"}, headers=other)).json()
    assert count["total"] == 0


async def test_patient_observations_and_medication_requests(client: httpx.AsyncClient, facility: str) -> None:
    pid, ids = await _patient_with_obs(client)
    r = (
        await client.get(
            f"/Patient/{pid}/observations", params={"category": "vital-signs", "_sort": "-date", "_count": 5}
        )
    ).json()
    assert r["type"] == "searchset" and _ids(r) == list(reversed(ids[:7]))[:5]
    nxt = _next(r)
    assert nxt and nxt.startswith(f"/Patient/{pid}/observations?")
    assert _ids((await client.get(nxt)).json()) == list(reversed(ids[:7]))[5:]
    med = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medication": {
            "concept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975"}]}
        },
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": "2024-01-01",
    }
    mid = (await create(client, med))["id"]
    await create(client, med | {"status": "completed"})
    meds = (await client.get(f"/Patient/{pid}/medication-requests", params={"status": "active"})).json()
    assert _ids(meds) == [mid]
    assert len(_ids((await client.get(f"/Patient/{pid}/medication-requests")).json())) == 2
    assert_outcome(
        await client.get(f"/Patient/{pid}/observations", headers={"X-Facility-Id": facility + "-other"}), 404
    )
    assert_outcome(await client.get("/Patient/nobody/medication-requests"), 404)


async def test_summary(client: httpx.AsyncClient, facility: str) -> None:
    pid = (await create(client, patient()))["id"]
    ref = {"reference": f"Patient/{pid}"}
    enc_ids = []
    for day in range(1, 8):
        enc = {
            "resourceType": "Encounter",
            "status": "completed",
            "subject": ref,
            "actualPeriod": {"start": f"2024-01-0{day}T09:00:00Z", "end": f"2024-01-0{day}T10:00:00Z"},
        }
        enc_ids.append((await create(client, enc))["id"])
    allergy = {
        "resourceType": "AllergyIntolerance",
        "patient": ref,
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}
            ]
        },
        "code": {"text": "penicillin"},
    }
    active_allergy = (await create(client, allergy))["id"]
    resolved = allergy | {
        "clinicalStatus": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "resolved"}
            ]
        }
    }
    await create(client, resolved)
    cond = {
        "resourceType": "Condition",
        "subject": ref,
        "code": {"text": "diabetes"},
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
    }
    cond_id = (await create(client, cond))["id"]
    old_hr = (await create(client, observation(pid, when="2024-01-01T00:00:00Z")))["id"]
    new_hr = (await create(client, observation(pid, when="2024-02-01T00:00:00Z")))["id"]
    bad_hr = (await create(client, observation(pid, when="2024-03-01T00:00:00Z", status="entered-in-error")))["id"]
    lab = (await create(client, observation(pid, code="4548-4", category="laboratory")))["id"]
    survey = (await create(client, observation(pid, code="1111-1", category="survey")))["id"]
    r = await client.get(f"/Patient/{pid}/summary", params={"encounters": 3})
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    by_type: dict[str, list[str]] = {}
    for e in bundle["entry"]:
        by_type.setdefault(e["resource"]["resourceType"], []).append(e["resource"]["id"])
    assert by_type["Patient"] == [pid]
    assert by_type["Encounter"] == list(reversed(enc_ids))[:3]
    assert by_type["AllergyIntolerance"] == [active_allergy]
    assert by_type["Condition"] == [cond_id]
    assert sorted(by_type["Observation"]) == sorted([new_hr, lab])
    assert old_hr not in by_type["Observation"] and bad_hr not in by_type["Observation"]
    assert survey not in by_type["Observation"]
    default = (await client.get(f"/Patient/{pid}/summary")).json()
    assert sum(e["resource"]["resourceType"] == "Encounter" for e in default["entry"]) == 5
    assert_outcome(await client.get(f"/Patient/{pid}/summary", headers={"X-Facility-Id": facility + "-other"}), 404)


async def test_post_search_equals_get(client: httpx.AsyncClient) -> None:
    pid, ids = await _patient_with_obs(client)
    form = {"patient": pid, "code": "8867-4", "_sort": "-date"}
    posted = await client.post(
        "/Observation/_search", data=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert posted.status_code == 200, posted.text
    got = (await client.get("/Observation", params=form)).json()
    assert _ids(posted.json()) == _ids(got) == list(reversed(ids[:7]))
    assert_outcome(
        await client.post("/Observation/_search", content=b"<x/>", headers={"Content-Type": "application/xml"}), 415
    )


async def test_everything_route(client: httpx.AsyncClient, other_facility: str) -> None:
    pid, ids = await _patient_with_obs(client)
    r = await client.get(f"/Patient/{pid}/$everything", params={"_count": 5})
    assert r.status_code == 200, r.text
    seen = {e["resource"]["id"] for e in r.json()["entry"]}
    nxt = _next(r.json())
    while nxt:
        page = (await client.get(nxt)).json()
        seen |= {e["resource"]["id"] for e in page["entry"]}
        nxt = _next(page)
    assert {pid, *ids} <= seen
    assert_outcome(await client.get(f"/Patient/{pid}/$everything", headers={"X-Facility-Id": other_facility}), 404)
