"""Conditional create (also under concurrency) and batch/transaction Bundles, on every backend."""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers import assert_outcome, create, observation, patient

NID = "https://unihealth.dev/fhir/sid/national-id"


def _with_nid(value: str, family: str = "Smith") -> dict[str, object]:
    return patient(family, identifier=[{"system": NID, "value": value}])


async def test_if_none_exist(client: httpx.AsyncClient) -> None:
    cond = {"If-None-Exist": f"identifier={NID}|A-1"}
    first = await client.post("/Patient", json=_with_nid("A-1"), headers=cond)
    assert first.status_code == 201
    second = await client.post("/Patient", json=_with_nid("A-1", "Other"), headers=cond)
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    await create(client, _with_nid("A-2"))
    await create(client, _with_nid("A-2"))
    many = await client.post("/Patient", json=_with_nid("A-2"), headers={"If-None-Exist": f"identifier={NID}|A-2"})
    assert_outcome(many, 412, "multiple-matches")


async def test_if_none_exist_is_per_facility(client: httpx.AsyncClient, facility: str) -> None:
    cond = {"If-None-Exist": f"identifier={NID}|B-1"}
    a = await client.post("/Patient", json=_with_nid("B-1"), headers=cond)
    b = await client.post("/Patient", json=_with_nid("B-1"), headers={**cond, "X-Facility-Id": facility + "-other"})
    assert a.status_code == b.status_code == 201, "a match in another facility is not a match"


async def test_fifty_parallel_conditional_creates_make_one(client: httpx.AsyncClient) -> None:
    cond = {"If-None-Exist": f"identifier={NID}|RACE-1"}
    results = await asyncio.gather(
        *(client.post("/Patient", json=_with_nid("RACE-1"), headers=cond) for _ in range(50))
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 49 + [201], statuses
    assert len({r.json()["id"] for r in results}) == 1
    found = (await client.get("/Patient", params={"identifier": f"{NID}|RACE-1", "_total": "accurate"})).json()
    assert found["total"] == 1


async def test_transaction_rewrites_urn_uuid_and_is_atomic(client: httpx.AsyncClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                "resource": observation("x")
                | {"subject": {"reference": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059"}},
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
                "resource": _with_nid("T-1"),
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    r = await client.post("/", json=bundle)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["type"] == "transaction-response"
    assert [e["response"]["status"] for e in out["entry"]] == ["201 Created", "201 Created"]
    obs_loc, pat_loc = (e["response"]["location"] for e in out["entry"])
    pid = pat_loc.split("/")[1]
    obs = (await client.get("/" + "/".join(obs_loc.split("/")[:2]))).json()
    assert obs["subject"]["reference"] == f"Patient/{pid}"
    assert (await client.get(f"/Patient/{pid}/observations")).json()["entry"][0]["resource"]["id"] == obs["id"]


async def test_transaction_conditional_reference_and_if_none_exist(client: httpx.AsyncClient, facility: str) -> None:
    pid = (await create(client, _with_nid("C-1")))["id"]
    await client.post("/Patient", json=_with_nid("C-1"), headers={"X-Facility-Id": facility + "-other"})
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation("x") | {"subject": {"reference": f"Patient?identifier={NID}|C-1"}},
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": "urn:uuid:0f0f0f0f-0000-4000-8000-000000000001",
                "resource": _with_nid("C-1"),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={NID}|C-1"},
            },
            {
                "resource": observation("y")
                | {"subject": {"reference": "urn:uuid:0f0f0f0f-0000-4000-8000-000000000001"}},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    r = await client.post("/", json=bundle)
    assert r.status_code == 200, r.text
    assert r.json()["entry"][1]["response"]["status"] == "200 OK"
    obs = (await client.get(f"/Patient/{pid}/observations")).json()["entry"]
    assert len(obs) == 2, "both references resolved to the one patient of this facility"
    missing = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": observation("x") | {"subject": {"reference": f"Patient?identifier={NID}|NOPE"}},
                "request": {"method": "POST", "url": "Observation"},
            }
        ],
    }
    assert_outcome(await client.post("/", json=missing), 400)


async def test_transaction_cannot_reach_other_facility(client: httpx.AsyncClient, facility: str) -> None:
    other = facility + "-other"
    theirs = (await client.post("/Patient", json=patient("Theirs"), headers={"X-Facility-Id": other})).json()["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "GET", "url": f"Patient/{theirs}"}}],
    }
    assert_outcome(await client.post("/", json=bundle), 404)
    put = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": patient("Mine", id=theirs), "request": {"method": "PUT", "url": f"Patient/{theirs}"}}],
    }
    r = await client.post("/", json=put)
    assert r.json()["entry"][0]["response"]["status"] == "201 Created"
    theirs_now = await client.get(f"/Patient/{theirs}", headers={"X-Facility-Id": other})
    assert theirs_now.json()["name"][0]["family"] == "Theirs"


async def test_batch_entries_are_independent(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": patient("New"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Observation"}, "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET", "url": f"Patient/{pid}"}},
            {"request": {"method": "GET", "url": "Patient/nope"}},
            {"request": {"method": "DELETE", "url": f"Patient/{pid}"}},
        ],
    }
    r = await client.post("/", json=bundle)
    assert r.status_code == 200
    out = r.json()
    assert out["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in out["entry"]]
    assert statuses == ["201 Created", "400 Bad Request", "200 OK", "404 Not Found", "204 No Content"]
    assert out["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert out["entry"][2]["resource"]["id"] == pid
    assert (await client.get(f"/Patient/{pid}")).status_code == 410
