"""The supergraph: the federated graph's types, and which subgraph resolves each field.

Contract:
* :class:`Supergraph` holds the client-facing API schema (:attr:`Supergraph.api_schema`, a
  graphql-core schema without any federation machinery: no ``_entities``, ``_service``,
  ``join__``/``link__`` types, no ``@inaccessible`` elements) and, per type and field, the
  federation facts the planner needs: the subgraphs that resolve a field (:attr:`FieldMeta.graphs`;
  ``@external`` and overridden definitions excluded), ``@requires`` and ``@provides`` field sets
  per subgraph, and the ``@key`` field sets of each entity per subgraph (:class:`Key`).
* :func:`load_supergraph` reads a supergraph SDL as Apollo's composition writes it (join v0.3+:
  ``@join__graph``, ``@join__type``, ``@join__field``); :func:`gateway.federation.composition.compose`
  builds the same from subgraph SDLs. Both raise :class:`CompositionError` with a message naming
  the type, field and subgraphs at fault. Neither does I/O.
* Unsupported Federation features fail loudly rather than plan wrongly: ``@interfaceObject`` and
  entity interfaces resolved across subgraphs raise :class:`CompositionError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from graphql import (
    ConstDirectiveNode,
    DirectiveNode,
    DocumentNode,
    EnumTypeDefinitionNode,
    EnumValueDefinitionNode,
    FieldDefinitionNode,
    GraphQLError,
    GraphQLSchema,
    InputObjectTypeDefinitionNode,
    InputValueDefinitionNode,
    InterfaceTypeDefinitionNode,
    NamedTypeNode,
    NameNode,
    Node,
    ObjectTypeDefinitionNode,
    OperationType,
    OperationTypeDefinitionNode,
    ScalarTypeDefinitionNode,
    SchemaDefinitionNode,
    TypeDefinitionNode,
    TypeNode,
    UnionTypeDefinitionNode,
    build_ast_schema,
    parse,
    value_from_ast_untyped,
)

from .fieldsets import FieldSet, parse_fieldset

STANDARD_DIRECTIVES = frozenset({"deprecated", "specifiedBy", "oneOf"})
ROOT_KINDS = ("query", "mutation", "subscription")
DEFAULT_ROOTS = {"query": "Query", "mutation": "Mutation", "subscription": "Subscription"}


class CompositionError(ValueError):
    """The subgraphs (or the supergraph SDL) do not form a graph this gateway can serve."""


@dataclass(frozen=True, slots=True)
class Key:
    """One ``@key`` of an entity in one subgraph."""

    fields: FieldSet
    resolvable: bool = True


@dataclass(slots=True)
class FieldMeta:
    """Federation facts of one field of an object or interface type."""

    name: str
    graphs: tuple[str, ...]  # subgraphs that resolve it, in supergraph order
    requires: dict[str, FieldSet] = field(default_factory=dict)  # subgraph -> representation fields it needs
    provides: dict[str, FieldSet] = field(default_factory=dict)  # subgraph -> fields of the result it resolves
    external: frozenset[str] = frozenset()  # subgraphs where it is declared @external


@dataclass(slots=True)
class TypeMeta:
    """Federation facts of one composite type."""

    name: str
    kind: str  # object | interface | union
    graphs: tuple[str, ...]
    keys: dict[str, tuple[Key, ...]] = field(default_factory=dict)
    fields: dict[str, FieldMeta] = field(default_factory=dict)


class Supergraph:
    """The composed graph (see the module contract)."""

    def __init__(
        self,
        *,
        api_schema: GraphQLSchema,
        types: Mapping[str, TypeMeta],
        urls: Mapping[str, str],
        roots: Mapping[str, str] | None = None,
    ) -> None:
        self.api_schema = api_schema
        self.types = dict(types)
        self.urls = dict(urls)
        self.roots = dict(roots or {k: v for k, v in DEFAULT_ROOTS.items() if v in types})

    @property
    def subgraphs(self) -> tuple[str, ...]:
        return tuple(self.urls)

    def type(self, name: str) -> TypeMeta:
        return self.types[name]

    def field(self, type_name: str, field_name: str) -> FieldMeta:
        return self.types[type_name].fields[field_name]

    def is_entity(self, type_name: str) -> bool:
        meta = self.types.get(type_name)
        return meta is not None and any(k.resolvable for keys in meta.keys.values() for k in keys)

    def keys(self, type_name: str, graph: str) -> tuple[Key, ...]:
        """The resolvable keys of ``type_name`` in ``graph`` (empty if none)."""
        meta = self.types.get(type_name)
        if meta is None:
            return ()
        return tuple(k for k in meta.keys.get(graph, ()) if k.resolvable)

    def resolves(self, type_name: str, fields: FieldSet, graph: str) -> bool:
        """Whether ``graph`` resolves every field of ``fields`` on ``type_name`` by itself."""
        meta = self.types.get(type_name)
        if meta is None:
            return False
        for name, sub in fields:
            if name == "__typename":
                continue
            found = meta.fields.get(name)
            if found is None or graph not in found.graphs:
                return False
            if sub is not None and not self.resolves(self.return_type(type_name, name), sub, graph):
                return False
        return True

    def return_type(self, type_name: str, field_name: str) -> str:
        """The named (unwrapped) type of ``type_name.field_name`` in the API schema."""
        parent = self.api_schema.get_type(type_name)
        fields = getattr(parent, "fields", None)
        if not fields or field_name not in fields:
            raise KeyError(f"{type_name}.{field_name}")
        kind = fields[field_name].type
        while hasattr(kind, "of_type"):
            kind = kind.of_type
        return str(kind.name)


# ------------------------------------------------------------------------------------- helpers
def directive_args(node: DirectiveNode) -> dict[str, object]:
    """The literal arguments of a directive (variables are not allowed in SDL)."""
    return {arg.name.value: value_from_ast_untyped(arg.value) for arg in node.arguments or ()}


def clean_directives(directives: Iterable[DirectiveNode]) -> tuple[ConstDirectiveNode, ...]:
    """Only the directives the API schema keeps (``@deprecated``, ``@specifiedBy``, ``@oneOf``)."""
    return tuple(cast(ConstDirectiveNode, d) for d in directives if d.name.value in STANDARD_DIRECTIVES)


def clean_input_value(node: InputValueDefinitionNode) -> InputValueDefinitionNode:
    return InputValueDefinitionNode(
        description=node.description,
        name=node.name,
        type=node.type,
        default_value=node.default_value,
        directives=clean_directives(node.directives or ()),
    )


def clean_field(node: FieldDefinitionNode, type_node: TypeNode | None = None) -> FieldDefinitionNode:
    """``node`` without federation directives (and with ``type_node`` as its type when given)."""
    return FieldDefinitionNode(
        description=node.description,
        name=node.name,
        arguments=tuple(clean_input_value(a) for a in node.arguments or ()),
        type=type_node or node.type,
        directives=clean_directives(node.directives or ()),
    )


def build_api_schema(definitions: list[TypeDefinitionNode], roots: Mapping[str, str]) -> GraphQLSchema:
    """The client-facing schema of ``definitions`` (already free of federation machinery)."""
    schema_def = SchemaDefinitionNode(
        directives=(),
        operation_types=tuple(
            OperationTypeDefinitionNode(operation=OperationType(kind), type=NamedTypeNode(name=NameNode(value=name)))
            for kind, name in roots.items()
            if any(d.name.value == name for d in definitions)
        ),
    )
    try:
        return build_ast_schema(DocumentNode(definitions=(schema_def, *definitions)), assume_valid_sdl=False)
    except (GraphQLError, TypeError) as exc:
        raise CompositionError(f"the composed API schema is not valid: {exc}") from None


# ------------------------------------------------------------------------------------- supergraph SDL
def _link_names(document: DocumentNode) -> dict[str, str]:
    """Local names of the linked specs' directives: ``{"join": "join", "inaccessible": "inaccessible"}``."""
    names = {"join": "join", "inaccessible": "inaccessible", "link": "link"}
    for definition in document.definitions:
        if isinstance(definition, SchemaDefinitionNode):
            for directive in definition.directives or ():
                if directive.name.value != "link":
                    continue
                args = directive_args(directive)
                url = str(args.get("url") or "")
                spec = url.rstrip("/").split("/")[-2] if url.count("/") >= 2 else ""
                if spec in ("join", "inaccessible") and args.get("as"):
                    names[spec] = str(args["as"])
    return names


def _graphs(document: DocumentNode, join: str) -> dict[str, tuple[str, str]]:
    """``join__Graph`` enum value → (subgraph name, url)."""
    for definition in document.definitions:
        if isinstance(definition, EnumTypeDefinitionNode) and definition.name.value == f"{join}__Graph":
            out: dict[str, tuple[str, str]] = {}
            for value in definition.values or ():
                for directive in value.directives or ():
                    if directive.name.value == f"{join}__graph":
                        args = directive_args(directive)
                        out[value.name.value] = (str(args["name"]), str(args.get("url") or ""))
            return out
    raise CompositionError(f"not a supergraph SDL: it has no {join}__Graph enum")


def _is_machinery(name: str, names: Mapping[str, str]) -> bool:
    return name.startswith((f"{names['join']}__", f"{names['link']}__", "link__", "join__"))


def load_supergraph(sdl: str, urls: Mapping[str, str] | None = None) -> Supergraph:
    """A :class:`Supergraph` from supergraph SDL text (Apollo composition output); ``urls``
    overrides the subgraph URLs it names."""
    try:
        document = parse(sdl, no_location=True)
    except GraphQLError as exc:
        raise CompositionError(f"the supergraph SDL does not parse: {exc.message}") from None
    names = _link_names(document)
    join, inaccessible = names["join"], names["inaccessible"]
    graphs = _graphs(document, join)
    roots = dict(DEFAULT_ROOTS)
    for definition in document.definitions:
        if isinstance(definition, SchemaDefinitionNode):
            for op in definition.operation_types:
                roots[op.operation.value] = op.type.name.value
    types: dict[str, TypeMeta] = {}
    api_definitions: list[TypeDefinitionNode] = []

    def hidden(node: Node) -> bool:
        return any(d.name.value == inaccessible for d in getattr(node, "directives", None) or ())

    for definition in document.definitions:
        if not isinstance(definition, TypeDefinitionNode) or _is_machinery(definition.name.value, names):
            continue
        if hidden(definition):
            continue
        type_graphs: list[str] = []
        keys: dict[str, list[Key]] = {}
        for directive in definition.directives or ():
            if directive.name.value != f"{join}__type":
                continue
            args = directive_args(directive)
            graph = graphs[str(args["graph"])][0]
            if args.get("isInterfaceObject"):
                raise CompositionError(f"@interfaceObject ({definition.name.value} in {graph}) is not supported")
            if graph not in type_graphs:
                type_graphs.append(graph)
            if args.get("key"):
                keys.setdefault(graph, []).append(
                    Key(parse_fieldset(str(args["key"])), bool(args.get("resolvable", True)))
                )
        if not type_graphs:
            type_graphs = [g for g, _ in graphs.values()]
        api_definitions.append(api_definition(definition, hidden))
        if isinstance(definition, ObjectTypeDefinitionNode | InterfaceTypeDefinitionNode):
            meta = TypeMeta(
                definition.name.value,
                "object" if isinstance(definition, ObjectTypeDefinitionNode) else "interface",
                tuple(type_graphs),
                {g: tuple(k) for g, k in keys.items()},
            )
            for fdef in definition.fields or ():
                if not hidden(fdef):
                    meta.fields[fdef.name.value] = _join_field(fdef, type_graphs, graphs, join)
            types[meta.name] = meta
        elif isinstance(definition, UnionTypeDefinitionNode):
            types[definition.name.value] = TypeMeta(definition.name.value, "union", tuple(type_graphs))
    _check_interfaces(types)
    present_roots = {k: v for k, v in roots.items() if v in types}
    schema = build_api_schema(api_definitions, {k: DEFAULT_ROOTS[k] for k in present_roots})
    if any(v != DEFAULT_ROOTS[k] for k, v in present_roots.items()):
        raise CompositionError("root types must be named Query, Mutation and Subscription in a supergraph")
    resolved_urls = {name: url for name, url in graphs.values()}
    for name, url in (urls or {}).items():
        if name not in resolved_urls:
            raise CompositionError(f"a URL is configured for subgraph {name!r}, which the supergraph does not have")
        resolved_urls[name] = url
    return Supergraph(api_schema=schema, types=types, urls=resolved_urls, roots=present_roots)


def _join_field(
    fdef: FieldDefinitionNode, type_graphs: list[str], graphs: Mapping[str, tuple[str, str]], join: str
) -> FieldMeta:
    resolving: list[str] = []
    external: set[str] = set()
    requires: dict[str, FieldSet] = {}
    provides: dict[str, FieldSet] = {}
    seen = False
    for directive in fdef.directives or ():
        if directive.name.value != f"{join}__field":
            continue
        seen = True
        args = directive_args(directive)
        if args.get("graph") is None:
            resolving.extend(g for g in type_graphs if g not in resolving)
            continue
        graph = graphs[str(args["graph"])][0]
        if args.get("external"):
            external.add(graph)
            continue
        if args.get("usedOverridden"):
            continue
        if graph not in resolving:
            resolving.append(graph)
        if args.get("requires"):
            requires[graph] = parse_fieldset(str(args["requires"]))
        if args.get("provides"):
            provides[graph] = parse_fieldset(str(args["provides"]))
    if not seen:
        resolving = list(type_graphs)
    return FieldMeta(fdef.name.value, tuple(resolving), requires, provides, frozenset(external))


def _never(node: Node) -> bool:
    return False


def api_definition(definition: TypeDefinitionNode, is_hidden: Callable[[Node], bool] = _never) -> TypeDefinitionNode:
    """``definition`` without federation/join/link directives, and without the members
    ``is_hidden`` says are ``@inaccessible``."""
    directives = clean_directives(definition.directives or ())
    if isinstance(definition, ObjectTypeDefinitionNode | InterfaceTypeDefinitionNode):
        kind = type(definition)
        return kind(
            description=definition.description,
            name=definition.name,
            interfaces=definition.interfaces,
            directives=directives,
            fields=tuple(
                FieldDefinitionNode(
                    description=f.description,
                    name=f.name,
                    arguments=tuple(clean_input_value(a) for a in f.arguments or () if not is_hidden(a)),
                    type=f.type,
                    directives=clean_directives(f.directives or ()),
                )
                for f in definition.fields or ()
                if not is_hidden(f)
            ),
        )
    if isinstance(definition, UnionTypeDefinitionNode):
        return UnionTypeDefinitionNode(
            description=definition.description, name=definition.name, directives=directives, types=definition.types
        )
    if isinstance(definition, EnumTypeDefinitionNode):
        return EnumTypeDefinitionNode(
            description=definition.description,
            name=definition.name,
            directives=directives,
            values=tuple(
                EnumValueDefinitionNode(
                    description=v.description, name=v.name, directives=clean_directives(v.directives or ())
                )
                for v in definition.values or ()
                if not is_hidden(v)
            ),
        )
    if isinstance(definition, InputObjectTypeDefinitionNode):
        return InputObjectTypeDefinitionNode(
            description=definition.description,
            name=definition.name,
            directives=directives,
            fields=tuple(clean_input_value(f) for f in definition.fields or () if not is_hidden(f)),
        )
    if isinstance(definition, ScalarTypeDefinitionNode):
        return ScalarTypeDefinitionNode(description=definition.description, name=definition.name, directives=directives)
    raise CompositionError(f"unsupported type definition {definition.name.value}")


def _check_interfaces(types: Mapping[str, TypeMeta]) -> None:
    """Entity interfaces (``@key`` on an interface) need @interfaceObject planning: refused."""
    for meta in types.values():
        if meta.kind == "interface" and any(meta.keys.values()):
            raise CompositionError(f"entity interfaces ({meta.name} has a @key) are not supported by this gateway")
