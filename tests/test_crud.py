"""Contract suite for the instance and type interactions (runs on every backend)."""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers import assert_outcome, create, observation, patient


async def test_create_read_vread(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/Patient",
        json=patient(meta={"versionId": "99", "lastUpdated": "2001-01-01T00:00:00Z", "tag": [{"code": "keep-me"}]}),
    )
    assert r.status_code == 201
    body = r.json()
    pid = body["id"]
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"].endswith(f"/fhir/r5/Patient/{pid}/_history/1")
    assert r.headers["last-modified"].endswith("GMT")
    assert body["meta"]["versionId"] == "1", "versionId from the body is never trusted"
    assert body["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert body["meta"]["tag"] == [{"code": "keep-me"}]
    read = await client.get(f"/Patient/{pid}")
    assert read.status_code == 200 and read.json() == body
    assert read.headers["etag"] == 'W/"1"'
    vread = await client.get(f"/Patient/{pid}/_history/1")
    assert vread.json() == body
    assert (await client.get(f"/Patient/{pid}/_history/2")).status_code == 404


async def test_server_assigns_uuid_ids_and_ignores_body_id_on_create(client: httpx.AsyncClient) -> None:
    r = await client.post("/Patient", json=patient(id="client-chosen"))
    assert r.status_code == 201
    assert r.json()["id"] != "client-chosen"
    assert len(r.json()["id"]) == 36


async def test_update_versions_and_if_match(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    r = await client.put(f"/Patient/{pid}", json=patient("Jones", id=pid), headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "2"
    assert r.headers["etag"] == 'W/"2"'
    stale = await client.put(f"/Patient/{pid}", json=patient("Brown", id=pid), headers={"If-Match": 'W/"1"'})
    assert_outcome(stale, 412, "conflict")
    current = await client.get(f"/Patient/{pid}")
    assert current.json()["name"][0]["family"] == "Jones", "a failed If-Match changes nothing"
    assert (await client.get(f"/Patient/{pid}/_history/1")).json()["name"][0]["family"] == "Smith"


async def test_update_as_create(client: httpx.AsyncClient) -> None:
    r = await client.put("/Patient/my-own-id", json=patient(id="my-own-id"))
    assert r.status_code == 201
    assert r.headers["location"].endswith("/Patient/my-own-id/_history/1")
    r2 = await client.put("/Patient/my-own-id", json=patient("Other", id="my-own-id"))
    assert r2.status_code == 200 and r2.json()["meta"]["versionId"] == "2"


async def test_delete_then_gone_and_recreate(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    assert (await client.delete(f"/Patient/{pid}")).status_code == 204
    gone = await client.get(f"/Patient/{pid}")
    assert_outcome(gone, 410, "deleted")
    assert (await client.delete(f"/Patient/{pid}")).status_code == 204, "delete is idempotent"
    assert (await client.get(f"/Patient/{pid}/_history/1")).status_code == 200, "old versions stay readable"
    again = await client.put(f"/Patient/{pid}", json=patient(id=pid))
    assert again.status_code == 201 and again.json()["meta"]["versionId"] == "3"


async def test_facilities_are_isolated(client: httpx.AsyncClient, facility: str) -> None:
    pid = (await create(client, patient()))["id"]
    other = {"X-Facility-Id": facility + "-other"}
    absent = await client.get("/Patient/does-not-exist", headers=other)
    elsewhere = await client.get(f"/Patient/{pid}", headers=other)
    assert_outcome(elsewhere, 404, "not-found")
    assert absent.status_code == elsewhere.status_code == 404
    assert (await client.get(f"/Patient/{pid}/_history/1", headers=other)).status_code == 404
    assert (await client.get(f"/Patient/{pid}/_history", headers=other)).status_code == 404
    search = await client.get("/Patient", params={"_id": pid}, headers=other)
    assert search.json()["entry"] == []
    # a PUT to an id used elsewhere creates a new resource in the caller's facility
    put = await client.put(f"/Patient/{pid}", json=patient("Intruder", id=pid), headers=other)
    assert put.status_code == 201 and put.json()["meta"]["versionId"] == "1"
    mine = await client.get(f"/Patient/{pid}")
    assert mine.json()["name"][0]["family"] == "Smith" and mine.json()["meta"]["versionId"] == "1"
    # a DELETE from another facility does not touch it
    await client.delete(f"/Patient/{pid}", headers=other)
    assert (await client.get(f"/Patient/{pid}")).status_code == 200


async def test_exact_json_survives(client: httpx.AsyncClient) -> None:
    raw = (
        b'{"resourceType":"Observation","status":"final","code":{"text":"weight"},'
        b'"effectiveInstant":"2024-03-05T10:00:00.120+05:30",'
        b'"valueQuantity":{"value":72.50000,"unit":"kg"},'
        b'"component":[{"code":{"text":"x"},"valueQuantity":{"value":1.0E+2}},'
        b'{"code":{"text":"y"},"valueInteger":12345}]}'
    )
    r = await client.post("/Observation", content=raw)
    assert r.status_code == 201, r.text
    text = (await client.get(f"/Observation/{r.json()['id']}")).text
    assert '"value":72.50000' in text
    assert '"effectiveInstant":"2024-03-05T10:00:00.120+05:30"' in text
    assert '"valueInteger":12345' in text
    assert '"value":1.0E+2' in text


async def test_integer64_strings_survive(client: httpx.AsyncClient) -> None:
    raw = (
        b'{"resourceType":"Observation","status":"final","code":{"text":"big"},'
        b'"valueInteger":7,"extension":[{"url":"http://example.org/big","valueInteger64":"9223372036854775807"}]}'
    )
    r = await client.post("/Observation", content=raw)
    assert r.status_code == 201, r.text
    text = (await client.get(f"/Observation/{r.json()['id']}")).text
    assert '"valueInteger64":"9223372036854775807"' in text


async def test_prefer_return(client: httpx.AsyncClient) -> None:
    minimal = await client.post("/Patient", json=patient(), headers={"Prefer": "return=minimal"})
    assert minimal.status_code == 201 and minimal.content == b"" and minimal.headers["location"]
    oo = await client.post("/Patient", json=patient(), headers={"Prefer": "return=OperationOutcome"})
    assert oo.status_code == 201 and oo.json()["resourceType"] == "OperationOutcome"
    rep = await client.post("/Patient", json=patient(), headers={"Prefer": "return=representation"})
    assert rep.json()["resourceType"] == "Patient"


async def test_history_instance_type_count_since_and_paging(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    for family in ("B", "C"):
        await client.put(f"/Patient/{pid}", json=patient(family, id=pid))
    await client.delete(f"/Patient/{pid}")
    h = (await client.get(f"/Patient/{pid}/_history")).json()
    assert h["type"] == "history"
    assert [e["response"]["etag"] for e in h["entry"]] == ['W/"4"', 'W/"3"', 'W/"2"', 'W/"1"']
    assert "resource" not in h["entry"][0] and h["entry"][0]["request"]["method"] == "DELETE"
    assert h["entry"][-1]["request"]["method"] == "POST"
    page1 = (await client.get(f"/Patient/{pid}/_history", params={"_count": 3})).json()
    assert len(page1["entry"]) == 3
    nxt = next(link["url"] for link in page1["link"] if link["relation"] == "next")
    page2 = (await client.get(nxt.replace("http://testserver/fhir/r5", ""))).json()
    assert [e["response"]["etag"] for e in page2["entry"]] == ['W/"1"']
    since = h["entry"][1]["response"]["lastModified"]
    recent = (await client.get(f"/Patient/{pid}/_history", params={"_since": since})).json()
    assert [e["response"]["etag"] for e in recent["entry"]] == ['W/"4"', 'W/"3"']
    await create(client, observation(pid))
    typed = (await client.get("/Patient/_history")).json()
    assert {e["fullUrl"].rsplit("/", 2)[-2] for e in typed["entry"]} == {"Patient"}
    system = (await client.get("/_history")).json()
    assert {e["fullUrl"].rsplit("/", 2)[-2] for e in system["entry"]} == {"Patient", "Observation"}


async def test_history_cursor_bound_to_facility(client: httpx.AsyncClient, facility: str) -> None:
    pid = (await create(client, patient()))["id"]
    await client.put(f"/Patient/{pid}", json=patient("B", id=pid))
    page = (await client.get(f"/Patient/{pid}/_history", params={"_count": 1})).json()
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next").replace(
        "http://testserver/fhir/r5", ""
    )
    replay = await client.get(nxt, headers={"X-Facility-Id": facility + "-other"})
    assert_outcome(replay, 400)


async def test_concurrent_updates_make_distinct_versions(client: httpx.AsyncClient) -> None:
    pid = (await create(client, patient()))["id"]
    results = await asyncio.gather(*(client.put(f"/Patient/{pid}", json=patient(f"N{i}", id=pid)) for i in range(10)))
    assert all(r.status_code == 200 for r in results)
    versions = sorted(int(r.json()["meta"]["versionId"]) for r in results)
    assert versions == list(range(2, 12))


async def test_metadata(client: httpx.AsyncClient) -> None:
    r = await client.get("/metadata", headers={"X-Facility-Id": ""})
    assert r.status_code == 200
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "5.0.0"
    types = {res["type"] for res in cs["rest"][0]["resource"]}
    assert {"Patient", "Observation", "MedicationRequest", "Provenance"} <= types
    obs = next(res for res in cs["rest"][0]["resource"] if res["type"] == "Observation")
    assert {"patient", "code", "date", "category", "status"} <= {p["name"] for p in obs["searchParam"]}
