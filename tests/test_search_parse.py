"""Parsing and SQL compilation of searches, without a database: every compiled statement binds
exactly the values :func:`query_params` provides, equal shapes share one statement, and no raw
input ever reaches the SQL text."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from subgraphs.store import statements as sql
from subgraphs.store.errors import FhirError
from subgraphs.store.search import SortKey, parse_search, query_params, query_shape

PG: Dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
LITE: Dialect = sqlite.dialect()

QUERIES: list[tuple[str, list[tuple[str, str]]]] = [
    ("Observation", [("code", "http://loinc.org|8867-4,|x,sys|,y"), ("date", "ge2024-01"), ("date", "ap2024")]),
    ("Observation", [("value-quantity", "5.4|http://unitsofmeasure.org|mg,ne3,gt4||kg,ap7|s|")]),
    ("Observation", [("component-code-value-quantity", "8480-6$gt140|http://unitsofmeasure.org|mm[Hg]")]),
    ("Observation", [("code-value-concept", "a|b$c|d"), ("code-value-date", "x$ge2020")]),
    ("Observation", [("code-value-string", "a$Smi")]),
    ("Encounter", [("location-period", "Location/1$2024")]),
    ("Observation", [("subject:Patient.name:exact", "Ann"), ("patient.organization.name", "acme")]),
    ("Patient", [("_has:Encounter:patient:_has:Observation:encounter:status", "x"), ("_id", "a,b,c")]),
    ("Patient", [("identifier:of-type", "s|c|v"), ("identifier:text", "mr"), ("gender:not", "male")]),
    ("Patient", [("name:contains", "a%_b"), ("family:text", "x"), ("birthdate:missing", "true")]),
    ("Observation", [("_source:above", "http://a/b"), ("_source:below", "http://a"), ("_profile", "http://p|1")]),
    ("Observation", [("subject:identifier", "urn:x|1"), ("_lastUpdated", "gt2024,lt2020"), ("code:code-text", "88")]),
    ("Observation", [("_tag:not", "a|b"), ("_security", "R"), ("performer:missing", "false")]),
]


def _binds(stmt: Any) -> tuple[set[str], set[str]]:
    """(names that need a value, names with a value in the statement)."""
    compiled = stmt.compile(dialect=PG)
    needed: set[str] = set()
    preset: set[str] = set()
    for name, bind in compiled.binds.items():
        (preset if bind.value is not None or bind.callable is not None else needed).add(name)
    return needed, preset


@pytest.mark.parametrize("resource_type, pairs", QUERIES)
def test_statements_bind_exactly_the_query_values(resource_type: str, pairs: list[tuple[str, str]]) -> None:
    query = parse_search(resource_type, pairs, strict=True)
    assert not query.ignored
    shape = query_shape(query)
    params = query_params(query, "fac")
    sub = tuple((t, None) for t in sorted(query.other_types()))
    for stmt in (sql.count(shape, None, sub), sql.search(shape, None, (SortKey("_id", "_id", False),), None, sub)):
        needed, _ = _binds(stmt)
        needed -= {"limit"}
        assert needed <= set(params), f"unbound: {needed - set(params)}"
        # values the statement does not use: only the unused half of a date range (gt uses the end)
        unused = {k for k in set(params) - needed - {"type", "facility"}}
        assert all(isinstance(params[k], datetime) for k in unused), unused


def test_equal_shapes_share_a_statement_and_values_stay_out_of_sql() -> None:
    evil = "Robert'); DROP TABLE resources;--"
    a = parse_search("Patient", [("name", evil), ("birthdate", "ge1970"), ("_sort", "-birthdate")])
    b = parse_search("Patient", [("name", "ann"), ("birthdate", "ge1999-02"), ("_sort", "-birthdate")])
    assert query_shape(a) == query_shape(b)
    keys = tuple(a.sort)
    assert sql.search(query_shape(a), None, keys, None) is sql.search(query_shape(b), None, keys, None)
    for dialect in (PG, LITE):
        text = str(sql.search(query_shape(a), None, keys, (False,)).compile(dialect=dialect))
        assert "DROP" not in text and "robert" not in text.lower() and "1970" not in text
        assert "facility" in text
    c = parse_search("Patient", [("name:exact", "ann")])
    assert query_shape(c) != query_shape(b)
    assert evil not in repr(query_shape(a))


def test_every_subquery_names_the_facility() -> None:
    query = parse_search(
        "Patient",
        [
            ("_has:Observation:patient:patient.organization.name", "x"),
            ("organization.name", "y"),
            ("name:missing", "true"),
        ],
    )
    sub = tuple((t, None) for t in sorted(query.other_types()))
    text = str(sql.count(query_shape(query), None, sub).compile(dialect=PG))
    selects = text.count("SELECT")
    assert text.count("facility = %(facility)s") >= selects, text


def test_parse_errors_and_depth() -> None:
    parse_search("Observation", [("patient.organization.partof.name", "x")])  # three links
    with pytest.raises(FhirError) as exc:
        parse_search("Observation", [("patient.organization.partof.partof.name", "x")])
    assert exc.value.status == 400
    lenient = parse_search("Patient", [("nope", "1"), ("name:in", "x"), ("_include", "Patient:nope")])
    assert lenient.ignored == ["nope", "name:in", "_include"]
    with pytest.raises(FhirError) as exc:
        parse_search("Patient", [("nope", "1")], strict=True)
    assert exc.value.status == 400 and exc.value.code == "not-supported"


def test_every_official_example_indexes_into_the_tables() -> None:
    """Index rows of every official R5 example of the in-scope types fit their tables: known
    columns only, text within the column sizes, one row per distinct value."""
    from subgraphs.store.extract import index_rows
    from subgraphs.store.schema import INDEX_TABLES
    from tests.test_search_registry import _examples

    kinds: set[str] = set()
    for name, resource in _examples():
        for kind, rows in index_rows(resource).items():
            kinds.add(kind)
            table = INDEX_TABLES[kind]
            columns = {c.name: c for c in table.columns}
            for row in rows:
                assert set(row) <= set(columns) - {"facility", "type", "id"}, (name, kind, row)
                for key, value in row.items():
                    length = getattr(columns[key].type, "length", None)
                    if isinstance(value, str) and length:
                        assert len(value) <= length, (name, kind, key)
                    if not columns[key].nullable:
                        assert value is not None, (name, kind, key)
            assert len({tuple(sorted(r.items())) for r in rows}) == len(rows), (name, kind)
    assert kinds == set(INDEX_TABLES) - {"number"}  # R5 defines no number parameter for these types
