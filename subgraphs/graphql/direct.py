"""Direct field resolution: graphql-core, not strawberry, runs the simple fields' Python code.

strawberry wraps every field with a resolver method in its own pipeline (an ``Info`` object,
argument conversion, field extensions, awaitable checks) — about ten Python calls per field per
object — and graphql-core adds its own per field (resolve info, path, completion); a ward query
resolves thousands of fields of FHIR value types. Two steps remove most of that:

* :func:`install` gives, in the built graphql-core schema, every *simple* field a
  :class:`DirectResolver`: a field without a resolver (a dataclass attribute) reads the
  attribute; a field whose resolver is a synchronous method taking only ``self`` (no arguments,
  no ``info``) calls that method on the parent object. Root types, and fields with arguments,
  ``info``, ``root``/``parent`` parameters, async resolvers, field extensions or permissions keep
  strawberry's resolver.
* :class:`DirectExecutionContext` completes an object whose selected fields all have direct
  resolvers (and whose sub-objects' do too), or a list of such objects or of leaves, in one tight
  loop: call the resolver, serialize leaves with the field type's own ``serialize``, recurse into
  objects and lists. Which selections qualify is decided once per selection set (a plan of
  steps), before any resolver runs. Anything else —
  a field without a direct resolver, a null for a non-null field, a resolver or serializer that
  raises, a value that is not a list where a list is expected, ``@defer``, resolve middleware,
  ``is_type_of`` — abandons the fast loop for that object and completes it with graphql-core's
  own code from the start (a list: each of its items).

Contract: answers and errors are exactly graphql-core's and strawberry's — the same Python code
runs on the same parent objects in the same order, leaves are serialized by the same scalars,
every error is raised (with its path) by graphql-core's own code, and the SDL is untouched
(only ``GraphQLField.resolve`` changes). Direct resolvers must be free of side effects: when the
fast loop gives up on an object, the resolvers it already called run again.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

from graphql import (
    GraphQLEnumType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLResolveInfo,
    GraphQLScalarType,
    GraphQLSchema,
    Undefined,
)
from graphql.execution.collect_fields import FieldDetailsList, GroupedFieldSet
from graphql.pyutils import AwaitableOrValue, Path
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.schema.schema_converter import GraphQLCoreConverter
from strawberry.types.field import StrawberryField


class DirectResolver:
    """A field resolver that needs only the parent object (``get(parent)``)."""

    __slots__ = ("get",)

    def __init__(self, get: Callable[[Any], Any]) -> None:
        self.get = get

    def __call__(self, source: Any, info: GraphQLResolveInfo[Any]) -> Any:
        return self.get(source)


def direct_resolver(field: StrawberryField) -> DirectResolver | None:
    """The direct resolver of ``field``, or None when it must keep strawberry's."""
    if field.extensions or field.permission_classes or field.is_subscription:
        return None
    resolver = field.base_resolver
    if resolver is None:
        return DirectResolver(attrgetter(field.python_name))
    if (
        resolver.is_async
        or resolver.arguments
        or resolver.self_parameter is None
        or resolver.info_parameter is not None
        or resolver.root_parameter is not None
        or resolver.parent_parameter is not None
    ):
        return None
    func = resolver.wrapped_func
    return DirectResolver(func) if callable(func) else None


def install(schema: GraphQLSchema) -> int:
    """Give every eligible field of ``schema``'s non-root object types a direct resolver; returns
    how many fields got one."""
    roots = {t for t in (schema.query_type, schema.mutation_type, schema.subscription_type) if t is not None}
    installed = 0
    for graphql_type in schema.type_map.values():
        if not isinstance(graphql_type, GraphQLObjectType) or graphql_type in roots:
            continue
        if graphql_type.name.startswith("__"):
            continue
        for graphql_field in graphql_type.fields.values():
            definition = (graphql_field.extensions or {}).get(GraphQLCoreConverter.DEFINITION_BACKREF)
            if not isinstance(definition, StrawberryField):
                continue
            direct = direct_resolver(definition)
            if direct is not None:
                graphql_field.resolve = direct
                installed += 1
    return installed


class _GiveUp(Exception):
    """The fast loop cannot complete this object; graphql-core's code will."""


# (response name, the field's direct getter — None for ``__typename`` —, its type, its field nodes)
_Step = tuple[str, Callable[[Any], Any] | None, GraphQLOutputType | None, FieldDetailsList]


class DirectExecutionContext(StrawberryGraphQLCoreExecutionContext):
    """strawberry's execution context with the fast loop of the module contract."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        manager = self.middleware_manager
        self._direct = manager is None or not manager.middlewares
        self._plans: dict[tuple[str, int], tuple[GroupedFieldSet, tuple[_Step, ...] | None]] = {}

    def _plan(self, parent_type: GraphQLObjectType, grouped_field_set: GroupedFieldSet) -> tuple[_Step, ...] | None:
        """The steps completing ``grouped_field_set`` on ``parent_type`` directly, or None when a
        selected field has no direct resolver (memoized per selection: graphql-core memoizes the
        grouped field sets of sub-selections, and the set is kept alive with its plan)."""
        key = (parent_type.name, id(grouped_field_set))
        cached = self._plans.get(key)
        if cached is not None:
            return cached[1]
        steps: list[_Step] = []
        fields = parent_type.fields
        for response_name, details in grouped_field_set.items():
            node = details[0].node
            name = node.name.value
            if name == "__typename":
                steps.append((response_name, None, None, details))
                continue
            field = fields.get(name)
            resolve = field.resolve if field is not None else None
            if field is None or not isinstance(resolve, DirectResolver) or node.arguments:
                break
            steps.append((response_name, resolve.get, field.type, details))
        plan = tuple(steps) if len(steps) == len(grouped_field_set) else None
        self._plans[key] = (grouped_field_set, plan)
        return plan

    def execute_fields(
        self,
        parent_type: GraphQLObjectType,
        source_value: Any,
        path: Path | None,
        grouped_field_set: GroupedFieldSet,
        position_context: Any,
    ) -> AwaitableOrValue[dict[str, Any]]:
        if self._direct and self._plan(parent_type, grouped_field_set) is not None:
            try:
                return self._object(parent_type, source_value, grouped_field_set)
            except Exception:  # graphql-core's code below raises or reports it, with its path
                pass
        return super().execute_fields(parent_type, source_value, path, grouped_field_set, position_context)

    def complete_list_value(
        self,
        return_type: GraphQLList[GraphQLOutputType],
        field_details_list: FieldDetailsList,
        info: GraphQLResolveInfo[Any],
        path: Path,
        result: Any,
        position_context: Any,
    ) -> AwaitableOrValue[list[Any]]:
        if self._direct and isinstance(result, list) and self._direct_items(return_type.of_type, field_details_list):
            try:
                value: list[Any] = self._value(return_type, field_details_list, result)
                return value
            except Exception:  # graphql-core's code below raises or reports it, with its path
                pass
        return super().complete_list_value(return_type, field_details_list, info, path, result, position_context)

    def _direct_items(self, item_type: GraphQLOutputType, details: FieldDetailsList) -> bool:
        """Whether the fast loop can complete items of ``item_type`` selected by ``details``."""
        if isinstance(item_type, GraphQLNonNull):
            item_type = item_type.of_type
        if isinstance(item_type, GraphQLScalarType | GraphQLEnumType):
            return True
        if isinstance(item_type, GraphQLObjectType) and item_type.is_type_of is None:
            grouped, deferred, _ = self.collect_subfields(item_type, details)
            return not deferred and self._plan(item_type, grouped) is not None
        return False

    def _object(
        self, parent_type: GraphQLObjectType, source: Any, grouped_field_set: GroupedFieldSet
    ) -> dict[str, Any]:
        plan = self._plan(parent_type, grouped_field_set)
        if plan is None:
            raise _GiveUp
        results: dict[str, Any] = {}
        for response_name, get, type_, details in plan:
            if get is None:
                results[response_name] = parent_type.name
            else:
                results[response_name] = self._value(type_, details, get(source))  # type: ignore[arg-type]
        return results

    def _value(self, type_: GraphQLOutputType, details: FieldDetailsList, value: Any) -> Any:
        if isinstance(type_, GraphQLNonNull):
            if value is None:
                raise _GiveUp
            type_ = type_.of_type
        elif value is None:
            return None
        if isinstance(type_, GraphQLScalarType | GraphQLEnumType):
            serialized = type_.serialize(value)
            if serialized is None or serialized is Undefined:
                raise _GiveUp
            return serialized
        if isinstance(type_, GraphQLList):
            if not isinstance(value, list | tuple):
                raise _GiveUp
            item_type = type_.of_type
            return [self._value(item_type, details, item) for item in value]
        if isinstance(type_, GraphQLObjectType) and type_.is_type_of is None:
            grouped, deferred, _ = self.collect_subfields(type_, details)
            if deferred:
                raise _GiveUp
            return self._object(type_, value, grouped)
        raise _GiveUp
