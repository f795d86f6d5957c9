"""Depth and cost of a normalized operation, and the limits the gateway enforces.

Contract:
* :func:`depth` is the deepest field nesting (a root field is depth 1); introspection fields
  (``__schema``, ``__type``) are not counted, so GraphiQL's introspection query always passes.
* :func:`cost` estimates the entities (for us: FHIR resources) an operation can return: a field
  whose type is an entity (``@key``) costs one per instance; a list field's instances are its
  parent's times the list's size — its ``first``/``last`` argument (literal, variable or schema
  default), else the ``first``/``last`` of the enclosing non-list field (a connection's
  ``nodes``/``edges``), else :data:`DEFAULT_LIST_SIZE`. Leaves and value types (a name, a
  concept and its codings) are free: they are read with their resource. Fragments under abstract
  types all count (an upper bound).
* :func:`check` raises :class:`LimitExceeded` (code ``DEPTH_LIMIT_EXCEEDED`` or
  ``COST_LIMIT_EXCEEDED``) with both numbers in the message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from graphql import GraphQLSchema, IntValueNode, VariableNode

from .operation import INTROSPECTION_FIELDS, LIST_SIZE_ARGUMENTS, Field, Selection, fields_of

DEFAULT_LIST_SIZE = 10


class LimitExceeded(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def depth(selections: list[Selection]) -> int:
    deepest = 0
    for f in fields_of(selections):
        if f.name in INTROSPECTION_FIELDS:
            continue
        below = depth(f.selections) if f.selections else 0
        deepest = max(deepest, 1 + below)
    return deepest


def _size_argument(schema: GraphQLSchema, f: Field, variables: Mapping[str, Any]) -> int | None:
    for arg in f.node.arguments or ():
        if arg.name.value not in LIST_SIZE_ARGUMENTS:
            continue
        if isinstance(arg.value, IntValueNode):
            return int(arg.value.value)
        if isinstance(arg.value, VariableNode):
            value = variables.get(arg.value.name.value)
            return value if isinstance(value, int) else None
    parent = schema.get_type(f.parent)
    definition = getattr(parent, "fields", {}).get(f.name)
    if definition is not None:
        for name in LIST_SIZE_ARGUMENTS:
            argument = definition.args.get(name)
            if argument is not None and isinstance(argument.default_value, int):
                return int(argument.default_value)
    return None


def cost(
    schema: GraphQLSchema,
    selections: list[Selection],
    variables: Mapping[str, Any],
    is_entity: Callable[[str], bool],
    *,
    multiplier: int = 1,
    inherited: int | None = None,
) -> int:
    total = 0
    for f in fields_of(selections):
        if f.selections is None or f.name in INTROSPECTION_FIELDS:
            continue
        own = _size_argument(schema, f, variables)
        size = 1
        if f.lists:
            size = max(own if own is not None else inherited if inherited is not None else DEFAULT_LIST_SIZE, 0)
        instances = multiplier * size
        if is_entity(f.named):
            total += instances
        total += cost(
            schema,
            f.selections,
            variables,
            is_entity,
            multiplier=instances,
            inherited=own if not f.lists else None,
        )
    return total


def check(
    schema: GraphQLSchema,
    selections: list[Selection],
    variables: Mapping[str, Any],
    is_entity: Callable[[str], bool],
    *,
    max_depth: int,
    max_cost: int,
) -> tuple[int, int]:
    """(depth, cost) of the operation, or :class:`LimitExceeded`."""
    found_depth = depth(selections)
    if found_depth > max_depth:
        raise LimitExceeded(
            "DEPTH_LIMIT_EXCEEDED", f"the operation is nested {found_depth} levels deep; the limit is {max_depth}"
        )
    found_cost = cost(schema, selections, variables, is_entity)
    if found_cost > max_cost:
        raise LimitExceeded(
            "COST_LIMIT_EXCEEDED",
            f"the operation may return about {found_cost} resources; the limit is {max_cost} "
            "(lower `first` arguments or split the operation)",
        )
    return found_depth, found_cost
