"""Direct field resolution (subgraphs/graphql/direct.py) answers exactly as strawberry and
graphql-core do — data, errors, messages and paths — on a schema built to hit every way out of
the fast loop; and the subgraphs' value types really take the fast loop."""

from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLObjectType

from subgraphs.graphql import direct
from subgraphs.graphql.app import schema_for

CALLS: list[str] = []


@strawberry.type
class Tag:
    code: str
    label: str | None = None

    @strawberry.field
    def shout(self) -> str:
        CALLS.append(f"shout:{self.code}")
        return self.code.upper()


@strawberry.type
class Item:
    name: str | None
    size: int

    @strawberry.field
    def tags(self) -> list[Tag]:
        return [Tag(code="a", label="A"), Tag(code="b")]

    @strawberry.field
    def boom(self) -> str | None:
        raise ValueError(f"no boom for {self.name}")

    @strawberry.field
    def required(self) -> str:
        return None  # type: ignore[return-value]  # a non-null field answering null

    @strawberry.field
    def nullable_tags(self) -> list[Tag | None]:
        return [None, Tag(code="c")]

    @strawberry.field
    def not_a_list(self) -> list[str]:
        return 42  # type: ignore[return-value]

    @strawberry.field
    def bad_int(self) -> int | None:
        return "eleven"  # type: ignore[return-value]

    @strawberry.field
    def greet(self, who: str = "you") -> str:
        return f"hi {who}"


@strawberry.type
class Query:
    @strawberry.field
    def items(self) -> list[Item]:
        return [Item(name="one", size=1), Item(name=None, size=2)]


def _schemas() -> tuple[strawberry.Schema, strawberry.Schema]:
    plain = strawberry.Schema(query=Query)
    fast = strawberry.Schema(query=Query, execution_context_class=direct.DirectExecutionContext)
    assert direct.install(fast._schema) > 0
    return plain, fast


def _answer(schema: strawberry.Schema, query: str) -> dict[str, Any]:
    result = schema.execute_sync(query)
    return {
        "data": result.data,
        "errors": [e.formatted for e in result.errors or ()],
    }


QUERIES = [
    "{ items { name size tags { code label shout __typename } __typename } }",
    "{ items { name boom } }",
    "{ items { name required } }",
    "{ items { nullableTags { code shout } } }",
    "{ items { notAList } }",
    "{ items { badInt } }",
    '{ items { size greet(who: "me") tags { code } } }',
    "{ items { ...F } } fragment F on Item { name tags { ... on Tag { code } } }",
    "{ items { a: name b: name tags { x: code y: shout } } }",
]


def test_direct_answers_equal_strawberry_and_graphql_core_including_errors() -> None:
    plain, fast = _schemas()
    for query in QUERIES:
        assert _answer(fast, query) == _answer(plain, query), query
    errors = _answer(fast, "{ items { name boom } }")["errors"]
    assert [e["path"] for e in errors] == [["items", 0, "boom"], ["items", 1, "boom"]]


def test_the_fast_loop_resolves_each_field_once_and_gives_up_only_when_it_must() -> None:
    _, fast = _schemas()
    CALLS.clear()
    assert _answer(fast, "{ items { tags { shout } } }")["errors"] == []
    assert CALLS == ["shout:a", "shout:b"] * 2  # nothing resolved twice: the fast loop completed it
    CALLS.clear()
    assert _answer(fast, '{ items { tags { shout } greet(who: "x") } }')["errors"] == []
    assert CALLS == ["shout:a", "shout:b"] * 2  # Item is not direct (greet): known before any resolver ran
    CALLS.clear()
    answer = _answer(fast, "{ items { required tags { shout } } }")
    assert answer["data"] is None and answer["errors"][0]["path"] == ["items", 0, "required"]


def test_the_subgraphs_value_types_are_resolved_directly() -> None:
    for name in ("patient", "observation", "medication"):
        schema = schema_for(name)
        assert schema.execution_context_class is direct.DirectExecutionContext
        graphql_schema = schema._schema
        for type_name, field_name in (("Concept", "display"), ("Coding", "code"), ("Patient", "id")):
            graphql_type = graphql_schema.type_map.get(type_name)
            if isinstance(graphql_type, GraphQLObjectType):
                resolve = graphql_type.fields[field_name].resolve
                assert isinstance(resolve, direct.DirectResolver), (name, type_name, field_name)
    observation = schema_for("observation")._schema.type_map["Observation"]
    assert isinstance(observation, GraphQLObjectType)
    assert isinstance(observation.fields["valueQuantity"].resolve, direct.DirectResolver)
    patient = schema_for("patient")._schema.type_map["Patient"]
    assert isinstance(patient, GraphQLObjectType)
    assert not isinstance(patient.fields["encounters"].resolve, direct.DirectResolver)  # arguments and info
