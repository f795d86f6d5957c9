"""A validated client operation, normalized for planning and response shaping.

Contract of :func:`normalize` (the document must already be valid against the API schema):
* fragment spreads and inline fragments whose type condition holds for every object the parent
  position can hold are inlined; others (a concrete type under an interface or union) stay as
  :class:`Fragment` nodes, one per type condition;
* selections of the same response key on the same level are merged into one :class:`Field`
  (GraphQL's field merging: validation guarantees they are the same field with the same
  arguments), their sub-selections concatenated;
* ``@skip``/``@include`` are evaluated with the request's coerced variable values: what they
  exclude is gone, and no other directive survives;
* :attr:`Operation.plan_variables` names the variables that change the normalized tree or its
  cost (``@skip``/``@include`` conditions and list-size arguments ``first``/``last``), so a
  plan cache keys on their values and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    BooleanValueNode,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLCompositeType,
    GraphQLInterfaceType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLSchema,
    GraphQLUnionType,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionNode,
    SelectionSetNode,
    VariableNode,
    get_named_type,
    is_composite_type,
)
from graphql.type.introspection import SchemaMetaFieldDef, TypeMetaFieldDef, TypeNameMetaFieldDef

LIST_SIZE_ARGUMENTS = ("first", "last")
INTROSPECTION_FIELDS = frozenset({"__schema", "__type"})


@dataclass(slots=True)
class Field:
    """One selected field (all selections of its response key on its level, merged)."""

    key: str  # response key: the alias, else the name
    name: str
    nodes: list[FieldNode]  # every selection merged here (the first one's arguments count)
    parent: str  # the type it is selected on
    type: GraphQLOutputType  # its type in the API schema (wrapped)
    selections: list[Selection] | None  # None for leaves
    shaping: Any = None  # what response shaping precomputes for it (see gateway.federation.shaping)

    @property
    def node(self) -> FieldNode:
        return self.nodes[0]

    @property
    def named(self) -> str:
        return str(get_named_type(self.type).name)

    @property
    def lists(self) -> int:
        """How many list wrappers its type has (each is a ``@`` in a fetch path)."""
        count, kind = 0, self.type
        while isinstance(kind, GraphQLNonNull | GraphQLList):
            if isinstance(kind, GraphQLList):
                count += 1
            kind = kind.of_type
        return count


@dataclass(slots=True)
class Fragment:
    """Selections that apply only to objects of ``type_condition`` (under an abstract parent)."""

    type_condition: str
    selections: list[Selection]


Selection = Field | Fragment


@dataclass(slots=True)
class Operation:
    kind: str  # query | mutation | subscription
    name: str | None
    root_type: str
    selections: list[Selection]
    definition: OperationDefinitionNode
    fragments: dict[str, FragmentDefinitionNode]
    plan_variables: tuple[str, ...] = field(default=())


def operation_variables(document: DocumentNode, operation: OperationDefinitionNode) -> tuple[str, ...]:
    """Variables used by ``@skip``/``@include`` or list-size arguments anywhere in ``operation``
    (fragments included), sorted."""
    found: set[str] = set()

    def visit(selection_set: SelectionSetNode | None, seen: set[str]) -> None:
        for selection in selection_set.selections if selection_set else ():
            for directive in selection.directives or ():
                if directive.name.value in ("skip", "include"):
                    found.update(
                        a.value.name.value for a in directive.arguments or () if isinstance(a.value, VariableNode)
                    )
            if isinstance(selection, FieldNode):
                for arg in selection.arguments or ():
                    if arg.name.value in LIST_SIZE_ARGUMENTS and isinstance(arg.value, VariableNode):
                        found.add(arg.value.name.value)
                visit(selection.selection_set, seen)
            elif isinstance(selection, InlineFragmentNode):
                visit(selection.selection_set, seen)
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in seen:
                seen.add(selection.name.value)
                fragment = fragments.get(selection.name.value)
                visit(fragment.selection_set if fragment else None, seen)

    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    visit(operation.selection_set, set())
    return tuple(sorted(found))


def _condition(node: SelectionNode, name: str, variables: Mapping[str, Any]) -> bool | None:
    """The ``if`` of ``@name`` on ``node`` (None when absent); validation guarantees a Boolean."""
    for directive in node.directives or ():
        if directive.name.value != name:
            continue
        for argument in directive.arguments or ():
            if argument.name.value == "if":
                if isinstance(argument.value, VariableNode):
                    return variables.get(argument.value.name.value) is True
                return isinstance(argument.value, BooleanValueNode) and argument.value.value
    return None


def _included(node: SelectionNode, variables: Mapping[str, Any]) -> bool:
    if not node.directives:
        return True
    return _condition(node, "skip", variables) is not True and _condition(node, "include", variables) is not False


class _Normalizer:
    def __init__(
        self, schema: GraphQLSchema, fragments: Mapping[str, FragmentDefinitionNode], variables: Mapping[str, Any]
    ) -> None:
        self.schema = schema
        self.fragments = fragments
        self.variables = variables

    def _covers(self, condition: GraphQLCompositeType, parent: GraphQLCompositeType) -> bool:
        """Whether every object ``parent`` can hold satisfies ``condition``."""
        if condition is parent:
            return True
        if isinstance(parent, GraphQLObjectType):
            return isinstance(condition, GraphQLInterfaceType | GraphQLUnionType) and self.schema.is_sub_type(
                condition, parent
            )
        possible = self.schema.get_possible_types(parent)
        if isinstance(condition, GraphQLObjectType):
            return list(possible) == [condition]
        return all(self.schema.is_sub_type(condition, p) for p in possible)

    def collect(self, parent: GraphQLCompositeType, selection_set: SelectionSetNode, out: list[Selection]) -> None:
        for selection in selection_set.selections:
            if not _included(selection, self.variables):
                continue
            if isinstance(selection, FieldNode):
                self._field(parent, selection, out)
                continue
            if isinstance(selection, FragmentSpreadNode):
                fragment = self.fragments[selection.name.value]
                condition_name: str | None = fragment.type_condition.name.value
                sub = fragment.selection_set
            else:
                assert isinstance(selection, InlineFragmentNode)
                condition_name = selection.type_condition.name.value if selection.type_condition else None
                sub = selection.selection_set
            condition = parent if condition_name is None else self.schema.get_type(condition_name)
            assert condition is not None and is_composite_type(condition)
            if self._covers(condition, parent):
                self.collect(parent, sub, out)
                continue
            if isinstance(parent, GraphQLObjectType):
                continue  # an abstract condition that does not hold here (validation allows it)
            name = str(condition.name)
            target = next((s for s in out if isinstance(s, Fragment) and s.type_condition == name), None)
            if target is None:
                target = Fragment(name, [])
                out.append(target)
            self.collect(condition, sub, target.selections)

    def _field(self, parent: GraphQLCompositeType, node: FieldNode, out: list[Selection]) -> None:
        name = node.name.value
        key = node.alias.value if node.alias else name
        if name == "__typename":
            definition = TypeNameMetaFieldDef
        elif name == "__schema":
            definition = SchemaMetaFieldDef
        elif name == "__type":
            definition = TypeMetaFieldDef
        else:
            definition = parent.fields[name]  # type: ignore[union-attr]
        existing = next((s for s in out if isinstance(s, Field) and s.key == key), None)
        if existing is None:
            composite = is_composite_type(get_named_type(definition.type)) and name not in INTROSPECTION_FIELDS
            existing = Field(key, name, [], str(parent.name), definition.type, [] if composite else None)
            out.append(existing)
        existing.nodes.append(node)
        if existing.selections is not None and node.selection_set is not None:
            self.collect(get_named_type(definition.type), node.selection_set, existing.selections)  # type: ignore[arg-type]


def normalize(
    schema: GraphQLSchema,
    document: DocumentNode,
    definition: OperationDefinitionNode,
    variables: Mapping[str, Any],
) -> Operation:
    """The normalized tree of ``definition`` (see the module contract)."""
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    kind = definition.operation.value
    root = schema.get_root_type(definition.operation)
    if root is None:
        raise ValueError(f"the schema has no {kind} type")
    selections: list[Selection] = []
    _Normalizer(schema, fragments, variables).collect(root, definition.selection_set, selections)
    return Operation(
        kind=kind,
        name=definition.name.value if definition.name else None,
        root_type=str(root.name),
        selections=selections,
        definition=definition,
        fragments=fragments,
        plan_variables=operation_variables(document, definition),
    )


def fields_of(selections: list[Selection]) -> list[Field]:
    """The fields of ``selections`` at this level, fragments' included (in order)."""
    out: list[Field] = []
    for selection in selections:
        if isinstance(selection, Field):
            out.append(selection)
        else:
            out += fields_of(selection.selections)
    return out
