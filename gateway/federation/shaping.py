"""The final response: the merged subgraph data, shaped to the client's selection.

Contract of :func:`shape` (the semantics of Apollo Gateway's ``computeResponse``, so both
gateways answer alike):
* only what the client selected is returned, under its response keys, in selection order:
  keys, ``__typename`` and ``@requires`` fields fetched for the plan are dropped;
* ``__typename`` is the object's own (as its subgraph said, if the API schema has that object
  type), else the parent type's; root ``__typename`` is the root type's name; ``__schema`` and
  ``__type`` are answered by ``introspect`` from the API schema;
* a missing or ``null`` value is ``null``; ``null`` in a non-null position nulls the nearest
  nullable ancestor (``data`` itself at the top), recording ``Cannot return null for
  non-nullable field T.f.`` once per cause; a leaf value of the wrong type is ``null`` with
  ``Invalid value found for field T.f.`` (custom scalars accept anything). These errors carry
  code ``INVALID_GRAPHQL``; the gateway reports them only when execution itself had no errors
  (otherwise they are consequences of those), in ``extensions.valueCompletion``.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable
from typing import Any

from graphql import (
    GraphQLBoolean,
    GraphQLCompositeType,
    GraphQLEnumType,
    GraphQLFloat,
    GraphQLID,
    GraphQLInt,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLSchema,
    GraphQLString,
    is_composite_type,
)

from .operation import INTROSPECTION_FIELDS, Field, Operation, Selection

_MISSING: Any = object()
Introspect = Callable[[Field], Any]
_NUMBERS = (int, float, decimal.Decimal)


class _Shaper:
    def __init__(self, schema: GraphQLSchema, introspect: Introspect) -> None:
        self.schema = schema
        self.introspect = introspect
        self.errors: list[dict[str, Any]] = []

    def error(self, message: str, path: list[str | int]) -> None:
        self.errors.append({"message": message, "path": list(path), "extensions": {"code": "INVALID_GRAPHQL"}})

    @staticmethod
    def describe(path: list[str | int], kind: GraphQLOutputType, parent: GraphQLCompositeType) -> str:
        last = path[-1]
        if isinstance(last, str):
            return f"field {parent.name}.{last}"
        return f"array element of type {kind} at index {last}"

    def apply(
        self,
        source: dict[str, Any],
        selections: list[Selection],
        output: dict[str, Any],
        path: list[str | int],
        parent: GraphQLCompositeType,
    ) -> bool:
        """Fill ``output``; False when a null must bubble up past this object."""
        for selection in selections:
            if not isinstance(selection, Field):
                typename = source.get("__typename")
                condition = self.schema.get_type(selection.type_condition)
                if self._applies(condition, typename, parent) and not self.apply(
                    source,
                    selection.selections,
                    output,
                    path,
                    condition,  # type: ignore[arg-type]
                ):
                    return False
                continue
            key = selection.key
            plain = selection.shaping
            if plain is None:
                plain = selection.shaping = _plain_leaf(selection)
            if plain is not False:  # the common case, inline: a scalar that is not in a list
                if key in output:
                    continue
                value = source.get(key)
                if value is not None and (plain is True or plain(value)):
                    output[key] = value
                    continue
                nonnull = isinstance(selection.type, GraphQLNonNull)
                path.append(key)
                if value is not None:
                    self.error(f"Invalid value found for field {parent.name}.{key}.", path)
                elif nonnull:
                    self.error(f"Cannot return null for non-nullable field {parent.name}.{key}.", path)
                path.pop()
                output[key] = None
                if nonnull:
                    return False
                continue
            if selection.name in INTROSPECTION_FIELDS:
                if key not in output:
                    output[key] = self.introspect(selection)
                continue
            value = source.get(key)
            if selection.name == "__typename":
                if key not in output:
                    if value is None and key != "__typename":
                        value = source.get("__typename")
                    found = self.schema.get_type(value) if isinstance(value, str) else None
                    kind = found or parent
                    if not isinstance(kind, GraphQLObjectType):
                        return False
                    output[key] = kind.name
                continue
            path.append(key)
            updated, invalid, _ = self.update(
                output.get(key, _MISSING), selection.type, value, selection.selections, path, parent
            )
            output[key] = updated
            path.pop()
            if invalid:
                return False
        return True

    def _applies(self, condition: Any, typename: Any, parent: GraphQLCompositeType) -> bool:
        if condition is None:
            return False
        if isinstance(typename, str):
            found = self.schema.get_type(typename)
            if found is None:
                return False
            return bool(
                found is condition
                or (not isinstance(condition, GraphQLObjectType) and self.schema.is_sub_type(condition, found))
            )
        return bool(condition is parent or self.schema.is_sub_type(condition, parent))

    def update(
        self,
        current: Any,
        kind: GraphQLOutputType,
        value: Any,
        selections: list[Selection] | None,
        path: list[str | int],
        parent: GraphQLCompositeType,
    ) -> tuple[Any, bool, bool]:
        """(updated value, bubbles a null up, errors already recorded)."""
        if current is None or (current is not _MISSING and selections is None):
            return current, False, False
        if isinstance(kind, GraphQLNonNull):
            updated, _, has_errors = self.update(current, kind.of_type, value, selections, path, parent)
            if updated is None:
                if not has_errors:
                    self.error(
                        f"Cannot return null for non-nullable {self.describe(path, kind.of_type, parent)}.", path
                    )
                return None, True, True
            return updated, False, False
        if value is None:
            return None, False, False
        if isinstance(kind, GraphQLList):
            if not isinstance(value, list):
                self.error(f"Invalid value found for {self.describe(path, kind, parent)}.", path)
                return None, False, True
            items = current if isinstance(current, list) and len(current) == len(value) else [_MISSING] * len(value)
            nullify = has_errors = False
            out: list[Any] = []
            element_kind = kind.of_type
            element_nonnull = isinstance(element_kind, GraphQLNonNull)
            base = element_kind.of_type if element_nonnull else element_kind
            objects = selections is not None and isinstance(base, GraphQLObjectType)
            for i, (existing, element) in enumerate(zip(items, value, strict=True)):
                if objects and existing is _MISSING and type(element) is dict:
                    typename = element.get("__typename")
                    if typename is None or typename == base.name:  # the common case, inline
                        fresh: dict[str, Any] = {}
                        path.append(i)
                        ok = self.apply(element, selections or [], fresh, path, base)
                        path.pop()
                        if ok:
                            out.append(fresh)
                        else:  # its error is recorded; a non-null element nulls the list
                            out.append(None)
                            has_errors = True
                            nullify = nullify or element_nonnull
                        continue
                path.append(i)
                updated, invalid, errored = self.update(existing, kind.of_type, element, selections, path, parent)
                path.pop()
                nullify = nullify or invalid
                has_errors = has_errors or errored
                out.append(updated)
            return (None if nullify else out), False, has_errors
        if is_composite_type(kind):
            if not isinstance(value, dict):
                self.error(f"Invalid value found for {self.describe(path, kind, parent)}.", path)
                return None, False, True
            target: GraphQLCompositeType = kind
            typename = value.get("__typename")
            if typename is not None:
                found = self.schema.get_type(typename) if isinstance(typename, str) else None
                if found is None or not is_composite_type(found):
                    self.error(f"Invalid __typename found for object at {self.describe(path, kind, parent)}.", path)
                    return None, False, True
                target = found
            output = current if isinstance(current, dict) else {}
            ok = self.apply(value, selections or [], output, path, target)
            return (output if ok else None), False, not ok
        valid = _valid_leaf(value, kind)
        if not valid:
            self.error(f"Invalid value found for {self.describe(path, kind, parent)}.", path)
        return (value if valid else None), False, not valid


def _plain_leaf(f: Field) -> Any:
    """For a scalar or enum field outside lists: True when any value is valid (custom scalars),
    else a validity check; False for every other field (handled by :meth:`_Shaper.update`)."""
    if f.selections is not None or f.name == "__typename" or f.name in INTROSPECTION_FIELDS or f.lists:
        return False
    kind = f.type.of_type if isinstance(f.type, GraphQLNonNull) else f.type
    if kind is GraphQLString:
        return _is_str
    builtin = kind in (GraphQLInt, GraphQLFloat, GraphQLBoolean, GraphQLID)
    if not builtin and not isinstance(kind, GraphQLEnumType):
        return True
    return lambda value: _valid_leaf(value, kind)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _valid_leaf(value: Any, kind: GraphQLOutputType) -> bool:
    """Apollo's ``isValidLeafValue``: built-in scalars and enums are checked, custom scalars not."""
    builtin = kind in (GraphQLString, GraphQLInt, GraphQLFloat, GraphQLBoolean, GraphQLID)
    if not builtin and not isinstance(kind, GraphQLEnumType):
        return True
    if isinstance(value, bool):
        return kind is GraphQLBoolean
    if isinstance(value, _NUMBERS):
        if kind in (GraphQLInt, GraphQLID):
            return isinstance(value, int) or (math.isfinite(value) and value == int(value))
        return kind is GraphQLFloat and math.isfinite(value)
    if isinstance(value, str):
        if isinstance(kind, GraphQLEnumType):
            return value in kind.values
        return kind not in (GraphQLBoolean, GraphQLInt, GraphQLFloat)
    return False


def shape(
    schema: GraphQLSchema, operation: Operation, data: dict[str, Any], introspect: Introspect
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(data, value-completion errors) of the client's response; see the module contract."""
    root = schema.get_type(operation.root_type)
    assert isinstance(root, GraphQLObjectType)
    shaper = _Shaper(schema, introspect)
    output: dict[str, Any] = {}
    ok = shaper.apply(data, operation.selections, output, [], root)
    return (output if ok else None), shaper.errors
