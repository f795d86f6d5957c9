"""``_text`` (narrative) and ``_content`` (every string) search (issue 3), on every backend: word
prefixes, case- and accent-insensitive, tags and entities of the narrative handled, OR/AND,
updates and deletes, chains, another facility's text never found, bad values 400."""

from __future__ import annotations

from typing import Any

import httpx

from subgraphs.store.search_text import text_rows
from tests.helpers import assert_outcome, create, observation, patient

STRICT = {"Prefer": "handling=strict"}
DIV = '<div xmlns="http://www.w3.org/1999/xhtml"><p>Chronic <b>heart</b> failure &amp; diab&#233;tes</p></div>'


def narrated(family: str, div: str = DIV) -> dict[str, Any]:
    return patient(family, text={"status": "generated", "div": div})


async def ids(client: httpx.AsyncClient, resource_type: str, params: list[tuple[str, str]], **kw: Any) -> set[str]:
    r = await client.get(f"/{resource_type}", params=tuple(params), **kw)
    assert r.status_code == 200, r.text
    return {e["resource"]["id"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"}


def test_the_index_holds_distinct_words() -> None:
    rows = {r["param"]: r["value"] for r in text_rows(narrated("Smith"))}
    assert rows["_text"] == " chronic heart failure diabetes "
    assert rows["_content"].startswith(" smith ann female 1970 01 ")
    assert " heart " in rows["_content"] and " b " not in rows["_content"]
    assert [r["param"] for r in text_rows(patient("Plain"))] == ["_content"]
    photo = patient("Pic", photo=[{"contentType": "image/png", "data": "iVBORw0KGgo" * 20}])
    (content,) = text_rows(photo)
    assert "ivborw0kggo" not in content["value"] and " png " in content["value"]


async def test_text_and_content(client: httpx.AsyncClient, other_facility: str) -> None:
    pid = (await create(client, narrated("Smithers")))["id"]
    plain = (await create(client, patient("Jones")))["id"]
    oid = (await create(client, observation(pid)))["id"]
    other = {"X-Facility-Id": other_facility}
    assert (await client.post("/Patient", json=narrated("Smithers"), headers=other)).status_code == 201
    cases: list[tuple[str, list[tuple[str, str]], set[str]]] = [
        ("Patient", [("_text", "heart")], {pid}),
        ("Patient", [("_text", "HEART fail")], {pid}),  # every word, as a prefix, any case
        ("Patient", [("_text", "diabetes")], {pid}),  # the entity decoded, the accent ignored
        ("Patient", [("_text", "failure heart")], {pid}),  # order does not matter
        ("Patient", [("_text", "eart")], set()),  # prefixes, not substrings
        ("Patient", [("_text", "amp")], set()),  # entities are not words
        ("Patient", [("_text", "p")], set()),  # nor are tags
        ("Patient", [("_text", "smithers")], set()),  # the name is content, not narrative
        ("Patient", [("_text", "xyz,chronic")], {pid}),  # comma: OR
        ("Patient", [("_text", "heart"), ("_text", "xyz")], set()),  # repeated: AND
        ("Patient", [("_content", "smith")], {pid}),
        ("Patient", [("_content", "jones")], {plain}),
        ("Patient", [("_content", "heart")], {pid}),  # the narrative is content too
        ("Patient", [("_content", "ann"), ("gender", "female")], {pid, plain}),
        ("Patient", [("_content", "ann"), ("gender", "male")], set()),
        ("Observation", [("_content", "8867")], {oid}),
        ("Observation", [("subject:Patient._text", "heart")], {oid}),
    ]
    failures = []
    for resource_type, query, expected in cases:
        got = await ids(client, resource_type, query, headers=STRICT)
        if got != expected:
            failures.append(f"{resource_type}?{query}: {got} != {expected}")
    assert not failures, failures
    # an update replaces the words, a delete removes them
    r = await client.put(f"/Patient/{pid}", json={**narrated("Smithers", DIV.replace("heart", "kidney")), "id": pid})
    assert r.status_code == 200, r.text
    assert await ids(client, "Patient", [("_text", "heart")]) == set()
    assert await ids(client, "Patient", [("_text", "kidney")]) == {pid}
    assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    assert await ids(client, "Patient", [("_content", "smithers")]) == set()


async def test_bad_text_values(client: httpx.AsyncClient) -> None:
    for value in ("", "!!!", "   ", "heart,,"):
        assert_outcome(await client.get("/Patient", params={"_text": value}), 400)
    assert_outcome(await client.get("/Patient", params={"_text:exact": "heart"}, headers=STRICT), 400, "not-supported")
    lenient = await client.get("/Patient", params={"_content:missing": "true"})
    assert lenient.status_code == 200 and "_content:missing" in lenient.text
    assert_outcome(await client.get("/Patient", params={"_sort": "_text"}), 400)
    r = await client.get("/Patient", params={"_content": "a'; DROP TABLE resources; --"})
    assert r.status_code == 200, r.text
