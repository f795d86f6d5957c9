"""Bad input: a clear OperationOutcome with the right 4xx, never a 500, and nothing stored changes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import token_for
from tests.helpers import assert_outcome, create, patient


async def _snapshot(client: httpx.AsyncClient) -> Any:
    """Everything the facility has, all versions: must be identical before and after bad input."""
    return (await client.get("/_history", params={"_count": 1000})).json()["entry"]


@pytest.fixture
async def existing(client: httpx.AsyncClient) -> str:
    return str((await create(client, patient()))["id"])


CASES: list[tuple[str, str, str, dict[str, str], bytes, int, str]] = [
    # (name, method, path, headers, body, status, issue code)
    ("malformed JSON", "POST", "/Patient", {}, b'{"resourceType": "Patient",', 400, "structure"),
    ("not an object", "POST", "/Patient", {}, b"[1, 2]", 400, "structure"),
    ("empty body", "POST", "/Patient", {}, b"", 400, "required"),
    ("NaN", "POST", "/Patient", {}, b'{"resourceType":"Patient","x":NaN}', 400, "structure"),
    ("trailing data", "POST", "/Patient", {}, b'{"resourceType":"Patient"} {}', 400, "structure"),
    ("bad UTF-8", "POST", "/Patient", {}, b'{"resourceType":"Patient","gender":"\xff"}', 400, "structure"),
    ("invalid R5 element", "POST", "/Patient", {}, b'{"resourceType":"Patient","foo":1}', 400, "invalid"),
    (
        "invalid R5 value",
        "POST",
        "/Patient",
        {},
        b'{"resourceType":"Patient","birthDate":"1970-13-45"}',
        400,
        "invalid",
    ),
    (
        "missing required",
        "POST",
        "/Observation",
        {},
        b'{"resourceType":"Observation","status":"final"}',
        400,
        "invalid",
    ),
    ("type mismatch", "POST", "/Patient", {}, b'{"resourceType":"Observation"}', 400, "invalid"),
    ("no resourceType", "POST", "/Patient", {}, b'{"gender":"male"}', 400, "invalid"),
    ("unsupported type", "POST", "/Basic", {}, b'{"resourceType":"Basic"}', 404, "not-supported"),
    ("unknown type read", "GET", "/Spaceship/1", {}, b"", 404, "not-supported"),
    ("XML", "POST", "/Patient", {"Content-Type": "application/fhir+xml"}, b"<Patient/>", 415, "not-supported"),
    ("text/plain", "POST", "/Patient", {"Content-Type": "text/plain"}, b"{}", 415, "not-supported"),
    ("accept XML", "GET", "/Patient", {"Accept": "application/fhir+xml"}, b"", 406, "not-supported"),
    ("_format xml", "GET", "/Patient?_format=xml", {}, b"", 406, "not-supported"),
    ("bad id", "GET", "/Patient/bad$id", {}, b"", 400, "invalid"),
    ("missing facility", "GET", "/Patient", {"X-Facility-Id": ""}, b"", 400, "required"),
    ("bad facility", "GET", "/Patient", {"X-Facility-Id": "a b/c"}, b"", 400, "invalid"),
    ("bad _count", "GET", "/Patient?_count=abc", {}, b"", 400, "invalid"),
    ("huge _count", "GET", "/Patient?_count=100000", {}, b"", 400, "invalid"),
    ("bad date", "GET", "/Observation?date=2024-13", {}, b"", 400, "invalid"),
    ("bad prefix", "GET", "/Observation?date=xx2024", {}, b"", 400, "invalid"),
    ("sort unknown", "GET", "/Observation?_sort=color", {}, b"", 400, "invalid"),
    ("strict unknown", "GET", "/Observation?color=red", {"Prefer": "handling=strict"}, b"", 400, "not-supported"),
    ("bad cursor", "GET", "/Patient?_page=garbage", {}, b"", 400, "invalid"),
    ("bad _since", "GET", "/Patient/_history?_since=yesterday", {}, b"", 400, "invalid"),
    ("wrong method", "PATCH", "/Patient/x", {}, b"{}", 405, "not-supported"),
    ("no route", "GET", "/Patient/x/y/z/w", {}, b"", 404, "not-found"),
    ("bundle not bundle", "POST", "/", {}, b'{"resourceType":"Patient"}', 400, "invalid"),
    ("bundle bad type", "POST", "/", {}, b'{"resourceType":"Bundle","type":"collection"}', 400, "invalid"),
    (
        "bundle bad entry",
        "POST",
        "/",
        {},
        b'{"resourceType":"Bundle","type":"transaction","entry":[{}]}',
        400,
        "invalid",
    ),
    ("summary encounters", "GET", "/Patient/x/summary?encounters=99", {}, b"", 400, "invalid"),
    ("summary encounters text", "GET", "/Patient/x/summary?encounters=all", {}, b"", 400, "invalid"),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "headers", "body", "status", "code"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_input(
    client: httpx.AsyncClient,
    existing: str,
    name: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    before = await _snapshot(client)
    r = await client.request(method, path, content=body, headers=headers)
    assert_outcome(r, status, code)
    assert await _snapshot(client) == before


async def test_update_bad_inputs_change_nothing(client: httpx.AsyncClient, existing: str) -> None:
    before = await _snapshot(client)
    cases = [
        (b'{"resourceType":"Patient","id":"other"}', {}, 400),  # body id != URL id
        (b'{"resourceType":"Patient"}', {}, 400),  # no id on PUT
        (b'{"resourceType":"Patient","id":"%s","gender":7}' % existing.encode(), {}, 400),
        (b'{"resourceType":"Patient","id":"%s"}' % existing.encode(), {"If-Match": "banana"}, 400),
        (b'{"resourceType":"Patient","id":"%s"}' % existing.encode(), {"If-Match": 'W/"7"'}, 412),
        (b'{"resourceType":"Patient","id":"%s"}' % existing.encode(), {"If-Match": 'W/"x"'}, 400),
    ]
    for body, headers, status in cases:
        r = await client.put(f"/Patient/{existing}", content=body, headers=headers)
        assert_outcome(r, status)
    assert await _snapshot(client) == before


async def test_body_too_large(app: Any, facility: str) -> None:
    from starlette.applications import Starlette

    assert isinstance(app, Starlette)
    limit = app.state.backends.settings.max_body_bytes
    big = b'{"resourceType":"Patient","text":{"status":"generated","div":"' + b"a" * (limit + 10) + b'"}}'
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t/fhir/r5",
        headers={
            "X-Facility-Id": facility,
            "Content-Type": "application/fhir+json",
            "Authorization": "Bearer " + token_for(app.state.backends.settings, [facility]),
        },
    ) as c:
        r = await c.post("/Patient", content=big)
        assert_outcome(r, 413, "too-costly")

        async def chunks() -> Any:  # no Content-Length: the limit still holds while streaming
            for _ in range(limit // 65536 + 2):
                yield b"a" * 65536

        r = await c.post("/Patient", content=chunks())
        assert_outcome(r, 413, "too-costly")
        assert (await c.get("/Patient")).json()["entry"] == []


async def test_deeply_nested_json(client: httpx.AsyncClient, existing: str) -> None:
    before = await _snapshot(client)
    for depth in (100, 100_000):
        body = b'{"resourceType":"Patient","extension":' + b"[" * depth + b"]" * depth + b"}"
        r = await client.post("/Patient", content=body)
        assert_outcome(r, 400, "structure")
    assert await _snapshot(client) == before


async def test_transaction_failure_writes_nothing(client: httpx.AsyncClient, existing: str) -> None:
    before = await _snapshot(client)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:1", "resource": patient("Good"), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {"resourceType": "Patient", "id": existing, "name": [{"family": "Changed"}]},
                "request": {"method": "PUT", "url": f"Patient/{existing}"},
            },
            {
                "resource": {"resourceType": "Observation", "status": "final"},  # invalid: no code
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    r = await client.post("/", json=bundle)
    body = assert_outcome(r, 400, "invalid")
    assert "Bundle.entry[2]" in body["issue"][0]["diagnostics"]
    assert await _snapshot(client) == before
