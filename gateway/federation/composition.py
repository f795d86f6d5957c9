"""Compose subgraph SDLs (Apollo Federation v2, as served at ``_service { sdl }``) into a
:class:`~gateway.federation.supergraph.Supergraph`.

Contract of :func:`compose`:
* subgraphs are merged in name order (as Apollo's composition does, so the API schema lists
  fields in the same order); a type's fields are the union of its subgraphs' fields;
* each field records the subgraphs that resolve it: every definition except ``@external`` ones and
  those taken over by ``@override(from:)``; key fields, ``@shareable`` fields and fields of
  ``@shareable`` types may be resolved by several subgraphs (a subgraph that ``@provides`` a
  field counts as resolving it) — any other field resolved by two subgraphs is a
  :class:`CompositionError`, as are: one name for different kinds of types; one field with
  different types (only nullability may differ: the supergraph keeps the nullable one for
  outputs and the non-null one for inputs) or different arguments; an ``@external`` field whose
  type is not exactly the resolved one, or that no subgraph resolves; a ``@key`` naming fields
  its subgraph does not declare; a field that cannot be reached (its type is returned by a subgraph that does not
  resolve the field, and no subgraph that does has a resolvable ``@key`` the first can supply);
* federation directives are found under their imported names (``@link(import: [...])``,
  including ``{name: "@key", as: "@primaryKey"}`` renames) or as ``@federation__key``; Federation
  1 SDLs (no ``@link``) use the bare names, and their value types count as shareable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from graphql import (
    DirectiveNode,
    DocumentNode,
    EnumTypeDefinitionNode,
    EnumTypeExtensionNode,
    EnumValueDefinitionNode,
    FieldDefinitionNode,
    GraphQLError,
    InputObjectTypeDefinitionNode,
    InputObjectTypeExtensionNode,
    InputValueDefinitionNode,
    InterfaceTypeDefinitionNode,
    InterfaceTypeExtensionNode,
    ListTypeNode,
    NamedTypeNode,
    NameNode,
    NonNullTypeNode,
    ObjectTypeDefinitionNode,
    ObjectTypeExtensionNode,
    ScalarTypeDefinitionNode,
    ScalarTypeExtensionNode,
    SchemaDefinitionNode,
    SchemaExtensionNode,
    StringValueNode,
    TypeDefinitionNode,
    TypeNode,
    UnionTypeDefinitionNode,
    UnionTypeExtensionNode,
    parse,
    print_ast,
)

from .fieldsets import FieldSet, parse_fieldset
from .supergraph import (
    DEFAULT_ROOTS,
    CompositionError,
    FieldMeta,
    Key,
    Supergraph,
    TypeMeta,
    api_definition,
    build_api_schema,
    clean_directives,
    clean_field,
    directive_args,
)

FEDERATION_DIRECTIVES = (
    "key",
    "shareable",
    "external",
    "requires",
    "provides",
    "override",
    "inaccessible",
    "interfaceObject",
    "extends",
    "tag",
    "composeDirective",
)
INTERNAL_TYPES = frozenset({"_Service", "_Entity", "_Any", "_FieldSet", "FieldSet", "federation__FieldSet"})
INTERNAL_ROOT_FIELDS = frozenset({"_service", "_entities"})
_KINDS: dict[type, str] = {
    ObjectTypeDefinitionNode: "object",
    ObjectTypeExtensionNode: "object",
    InterfaceTypeDefinitionNode: "interface",
    InterfaceTypeExtensionNode: "interface",
    UnionTypeDefinitionNode: "union",
    UnionTypeExtensionNode: "union",
    EnumTypeDefinitionNode: "enum",
    EnumTypeExtensionNode: "enum",
    InputObjectTypeDefinitionNode: "input",
    InputObjectTypeExtensionNode: "input",
    ScalarTypeDefinitionNode: "scalar",
    ScalarTypeExtensionNode: "scalar",
}


# ------------------------------------------------------------------------------------- one subgraph
@dataclass
class _Local:
    """One type as one subgraph declares it (definition and extensions together)."""

    kind: str
    description: StringValueNode | None = None
    directives: list[DirectiveNode] = field(default_factory=list)
    fields: dict[str, FieldDefinitionNode] = field(default_factory=dict)
    inputs: dict[str, InputValueDefinitionNode] = field(default_factory=dict)
    interfaces: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    values: dict[str, EnumValueDefinitionNode] = field(default_factory=dict)


@dataclass
class _Subgraph:
    name: str
    fed2: bool
    names: dict[str, str]  # local directive name -> federation directive
    roots: dict[str, str]  # local root type name -> supergraph root name
    types: dict[str, _Local]

    def directives(self, nodes: list[DirectiveNode] | tuple[DirectiveNode, ...], which: str) -> list[DirectiveNode]:
        return [d for d in nodes if self.names.get(d.name.value) == which]

    def has(self, nodes: list[DirectiveNode] | tuple[DirectiveNode, ...], which: str) -> bool:
        return bool(self.directives(nodes, which))


def _federation_names(document: DocumentNode) -> tuple[bool, dict[str, str]]:
    for definition in document.definitions:
        if not isinstance(definition, SchemaDefinitionNode | SchemaExtensionNode):
            continue
        for directive in definition.directives or ():
            if directive.name.value != "link":
                continue
            args = directive_args(directive)
            if "specs.apollo.dev/federation/" not in str(args.get("url") or ""):
                continue
            prefix = str(args.get("as") or "federation")
            names = {f"{prefix}__{n}": n for n in FEDERATION_DIRECTIVES}
            for item in args.get("import") or []:  # type: ignore[attr-defined]
                if isinstance(item, str):
                    names[item.lstrip("@")] = item.lstrip("@")
                elif isinstance(item, dict):
                    original = str(item.get("name", "")).lstrip("@")
                    names[str(item.get("as") or original).lstrip("@")] = original
            return True, names
    return False, {n: n for n in FEDERATION_DIRECTIVES}


def _read_subgraph(name: str, sdl: str) -> _Subgraph:
    try:
        document = parse(sdl, no_location=True)
    except GraphQLError as exc:
        raise CompositionError(f"subgraph {name}: the SDL does not parse: {exc.message}") from None
    fed2, names = _federation_names(document)
    roots = {v: v for v in DEFAULT_ROOTS.values()}
    for definition in document.definitions:
        if isinstance(definition, SchemaDefinitionNode | SchemaExtensionNode):
            for op in definition.operation_types or ():
                roots[op.type.name.value] = DEFAULT_ROOTS[op.operation.value]
    types: dict[str, _Local] = {}
    for definition in document.definitions:
        kind = _KINDS.get(type(definition))
        if kind is None:
            continue
        type_name = definition.name.value  # type: ignore[attr-defined]
        if type_name in INTERNAL_TYPES or type_name.startswith(("link__", "federation__", "join__")):
            continue
        type_name = roots.get(type_name, type_name)
        local = types.setdefault(type_name, _Local(kind))
        if local.kind != kind:
            raise CompositionError(f"subgraph {name}: {type_name} is declared both as {local.kind} and {kind}")
        local.description = local.description or getattr(definition, "description", None)
        local.directives += list(getattr(definition, "directives", None) or ())
        for fdef in getattr(definition, "fields", None) or ():
            if isinstance(fdef, FieldDefinitionNode):
                if type_name == "Query" and fdef.name.value in INTERNAL_ROOT_FIELDS:
                    continue
                local.fields[fdef.name.value] = fdef
            else:
                local.inputs[fdef.name.value] = fdef
        local.interfaces += [i.name.value for i in getattr(definition, "interfaces", None) or ()]
        local.members += [m.name.value for m in getattr(definition, "types", None) or ()]
        for value in getattr(definition, "values", None) or ():
            local.values[value.name.value] = value
    return _Subgraph(name, fed2, names, roots, types)


# ------------------------------------------------------------------------------------- types
def _shape(node: TypeNode) -> tuple[str, tuple[bool, ...]]:
    """(named type, non-null flags from the outside in: one per wrapper level plus the name)."""
    flags: list[bool] = []
    while True:
        if isinstance(node, NonNullTypeNode):
            flags.append(True)
            node = node.type
        else:
            flags.append(False)
        if isinstance(node, ListTypeNode):
            node = node.type
            continue
        assert isinstance(node, NamedTypeNode)
        return node.name.value, tuple(flags)


def _rebuild(name: str, flags: tuple[bool, ...]) -> TypeNode:
    node: TypeNode = NamedTypeNode(name=NameNode(value=name))
    last = len(flags) - 1
    for depth in range(last, -1, -1):
        if depth < last:
            node = ListTypeNode(type=node)
        if flags[depth]:
            node = NonNullTypeNode(type=node)  # type: ignore[arg-type]
    return node


def _merge_types(where: str, found: list[tuple[str, TypeNode]], *, output: bool) -> TypeNode:
    """One type for ``where`` from each subgraph's (see the module contract)."""
    first_graph, first = found[0]
    name, flags = _shape(first)
    merged = list(flags)
    for graph, node in found[1:]:
        other_name, other = _shape(node)
        if other_name != name or len(other) != len(flags):
            raise CompositionError(
                f"{where} has type {print_ast(first)} in subgraph {first_graph} "
                f"but {print_ast(node)} in subgraph {graph}"
            )
        merged = [(a and b) if output else (a or b) for a, b in zip(merged, other, strict=True)]
    return _rebuild(name, tuple(merged))


def _arguments_text(fdef: FieldDefinitionNode) -> str:
    return ", ".join(f"{a.name.value}: {print_ast(a.type)}" for a in fdef.arguments or ())


# ------------------------------------------------------------------------------------- compose
def compose(sdls: Mapping[str, str], urls: Mapping[str, str] | None = None) -> Supergraph:
    """The supergraph of ``sdls`` (subgraph name → SDL); ``urls`` names where each is served."""
    if not sdls:
        raise CompositionError("there are no subgraphs to compose")
    subgraphs = [_read_subgraph(name, sdls[name]) for name in sorted(sdls)]
    merged: dict[str, list[tuple[_Subgraph, _Local]]] = {}
    for sub in subgraphs:
        for type_name, local in sub.types.items():
            merged.setdefault(type_name, []).append((sub, local))
    provided = _provided_fields(subgraphs)
    types: dict[str, TypeMeta] = {}
    definitions: list[TypeDefinitionNode] = []
    for type_name, defs in sorted(merged.items()):  # Apollo's composition orders types by name
        kinds = {local.kind for _, local in defs}
        if len(kinds) > 1:
            detail = ", ".join(f"{local.kind} in {sub.name}" for sub, local in defs)
            raise CompositionError(f"type {type_name} is declared as different kinds: {detail}")
        kind = defs[0][1].kind
        description = next((local.description for _, local in defs if local.description), None)
        if kind in ("object", "interface"):
            meta, definition = _compose_composite(type_name, kind, defs, description, provided)
            types[type_name] = meta
        elif kind == "union":
            types[type_name] = TypeMeta(type_name, "union", tuple(s.name for s, _ in defs))
            definition = _union(type_name, defs, description)
        elif kind == "enum":
            definition = _enum(type_name, defs, description)
        elif kind == "input":
            definition = _input(type_name, defs, description)
        else:
            definition = _scalar(type_name, defs, description)
        definitions.append(definition)
    _check_reachable(types, subgraphs)
    roots = {k: v for k, v in DEFAULT_ROOTS.items() if v in types}
    schema = build_api_schema(definitions, roots)
    return Supergraph(
        api_schema=schema,
        types=types,
        urls={s.name: (urls or {}).get(s.name, "") for s in subgraphs},
        roots=roots,
    )


def _provided_fields(subgraphs: list[_Subgraph]) -> set[tuple[str, str, str]]:
    """(subgraph, type, field) of every field some ``@provides`` of that subgraph names."""
    out: set[tuple[str, str, str]] = set()

    def walk(sub: _Subgraph, type_name: str, fields: FieldSet) -> None:
        local = sub.types.get(type_name)
        for name, children in fields:
            out.add((sub.name, type_name, name))
            if children is not None and local is not None and name in local.fields:
                walk(sub, _shape(local.fields[name].type)[0], children)

    for sub in subgraphs:
        for local in sub.types.values():
            for fdef in local.fields.values():
                for directive in sub.directives(fdef.directives or (), "provides"):
                    try:
                        fields = parse_fieldset(str(directive_args(directive).get("fields") or ""))
                    except ValueError:
                        continue  # reported with the field itself
                    walk(sub, _shape(fdef.type)[0], fields)
    return out


def _compose_composite(
    type_name: str,
    kind: str,
    defs: list[tuple[_Subgraph, _Local]],
    description: StringValueNode | None,
    provided: set[tuple[str, str, str]],
) -> tuple[TypeMeta, TypeDefinitionNode]:
    keys: dict[str, tuple[Key, ...]] = {}
    for sub, local in defs:
        if sub.has(local.directives, "interfaceObject"):
            raise CompositionError(f"@interfaceObject ({type_name} in subgraph {sub.name}) is not supported")
        found = []
        for directive in sub.directives(local.directives, "key"):
            args = directive_args(directive)
            try:
                found.append(Key(parse_fieldset(str(args.get("fields") or "")), bool(args.get("resolvable", True))))
            except ValueError as exc:
                raise CompositionError(f"subgraph {sub.name}: @key on {type_name}: {exc}") from None
        for key in found:
            missing = [name for name, _ in key.fields if name not in local.fields]
            if missing:
                raise CompositionError(
                    f"subgraph {sub.name}: a @key of {type_name} names {', '.join(missing)}, which {type_name} "
                    "does not have there"
                )
        if found:
            keys[sub.name] = tuple(found)
    if kind == "interface" and keys:
        raise CompositionError(f"entity interfaces ({type_name} has a @key) are not supported by this gateway")
    order: list[str] = []
    for _, local in defs:
        order += [f for f in local.fields if f not in order]
    meta = TypeMeta(type_name, kind, tuple(s.name for s, _ in defs), keys)
    api_fields: list[FieldDefinitionNode] = []
    for field_name in order:
        fmeta, api_field = _compose_field(type_name, field_name, defs, keys, provided)
        meta.fields[field_name] = fmeta
        if api_field is not None:
            api_fields.append(api_field)
    interfaces: list[str] = []
    for _, local in defs:
        interfaces += [i for i in local.interfaces if i not in interfaces]
    node_type = ObjectTypeDefinitionNode if kind == "object" else InterfaceTypeDefinitionNode
    definition = node_type(
        description=description,
        name=NameNode(value=type_name),
        interfaces=tuple(NamedTypeNode(name=NameNode(value=i)) for i in interfaces),
        directives=(),
        fields=tuple(api_fields),
    )
    return meta, definition


def _compose_field(
    type_name: str,
    field_name: str,
    defs: list[tuple[_Subgraph, _Local]],
    keys: Mapping[str, tuple[Key, ...]],
    provided: set[tuple[str, str, str]],
) -> tuple[FieldMeta, FieldDefinitionNode | None]:
    where = f"field {type_name}.{field_name}"
    present = [(sub, local, local.fields[field_name]) for sub, local in defs if field_name in local.fields]
    overridden: set[str] = set()
    for sub, _, fdef in present:
        for directive in sub.directives(fdef.directives or (), "override"):
            overridden.add(str(directive_args(directive).get("from") or ""))
    resolving, external = [], set()
    requires: dict[str, FieldSet] = {}
    provides: dict[str, FieldSet] = {}
    not_shareable: list[str] = []
    for sub, local, fdef in present:
        if sub.has(fdef.directives or (), "external"):
            external.add(sub.name)
            continue
        if sub.name in overridden:
            continue
        resolving.append((sub, fdef))
        key_field = any(field_name in dict(k.fields) for k in keys.get(sub.name, ()))
        shareable = (
            not sub.fed2
            or key_field
            or sub.has(fdef.directives or (), "shareable")
            or sub.has(local.directives, "shareable")
        )
        if not shareable:
            not_shareable.append(sub.name)
        for which, target in (("requires", requires), ("provides", provides)):
            for directive in sub.directives(fdef.directives or (), which):
                try:
                    target[sub.name] = parse_fieldset(str(directive_args(directive).get("fields") or ""))
                except ValueError as exc:
                    raise CompositionError(
                        f"subgraph {sub.name}: @{which} on {type_name}.{field_name}: {exc}"
                    ) from None
    if not resolving:
        graphs = ", ".join(sorted(external)) or "none"
        raise CompositionError(f"{where} is @external in every subgraph that declares it ({graphs}): none resolves it")
    first_sub, first = resolving[0]
    for sub, fdef in resolving[1:]:
        if _arguments_text(fdef) != _arguments_text(first):
            raise CompositionError(
                f"{where} has arguments ({_arguments_text(first)}) in subgraph {first_sub.name} "
                f"but ({_arguments_text(fdef)}) in subgraph {sub.name}"
            )
    merged_type = _merge_types(where, [(s.name, f.type) for s, f in resolving], output=True)
    for sub, _, fdef in present:
        if sub.name in external and print_ast(fdef.type) != print_ast(merged_type):
            raise CompositionError(
                f"{where} is @external in subgraph {sub.name} with type {print_ast(fdef.type)}, but its type is "
                f"{print_ast(merged_type)} where it is resolved (an @external field must repeat the type exactly)"
            )
    providers = [s.name for s, _, _ in present if s.name in external and (s.name, type_name, field_name) in provided]
    if len(resolving) + len(providers) > 1 and not_shareable:
        sharing = [s.name for s, _ in resolving] + [f"{p} (@provides)" for p in providers]
        raise CompositionError(
            f"{where} is resolved by subgraphs {', '.join(sharing)} but is not @shareable in "
            f"{', '.join(not_shareable)} (mark it @shareable everywhere, or @override it)"
        )
    fmeta = FieldMeta(field_name, tuple(s.name for s, _ in resolving), requires, provides, frozenset(external))
    description = next((f.description for _, f in resolving if f.description), None)
    hidden = any(sub.has(f.directives or (), "inaccessible") for sub, _, f in present)
    api = None if hidden else clean_field(_with_description(first, description), merged_type)
    return fmeta, api


def _with_description(fdef: FieldDefinitionNode, description: StringValueNode | None) -> FieldDefinitionNode:
    return FieldDefinitionNode(
        description=description,
        name=fdef.name,
        arguments=fdef.arguments,
        type=fdef.type,
        directives=fdef.directives,
    )


def _union(name: str, defs: list[tuple[_Subgraph, _Local]], description: StringValueNode | None) -> TypeDefinitionNode:
    members: list[str] = []
    for _, local in defs:
        members += [m for m in local.members if m not in members]
    return UnionTypeDefinitionNode(
        description=description,
        name=NameNode(value=name),
        directives=(),
        types=tuple(NamedTypeNode(name=NameNode(value=m)) for m in members),
    )


def _enum(name: str, defs: list[tuple[_Subgraph, _Local]], description: StringValueNode | None) -> TypeDefinitionNode:
    values: dict[str, EnumValueDefinitionNode] = {}
    for _, local in defs:
        for value_name, value in local.values.items():
            values.setdefault(value_name, value)
    node = EnumTypeDefinitionNode(
        description=description, name=NameNode(value=name), directives=(), values=tuple(values.values())
    )
    return api_definition(node)


def _input(name: str, defs: list[tuple[_Subgraph, _Local]], description: StringValueNode | None) -> TypeDefinitionNode:
    first_sub, first = defs[0]
    for sub, local in defs[1:]:
        if set(local.inputs) != set(first.inputs):
            raise CompositionError(
                f"input type {name} has fields ({', '.join(first.inputs)}) in subgraph {first_sub.name} "
                f"but ({', '.join(local.inputs)}) in subgraph {sub.name}"
            )
    fields = []
    for field_name, value in first.inputs.items():
        merged = _merge_types(
            f"input field {name}.{field_name}", [(s.name, loc.inputs[field_name].type) for s, loc in defs], output=False
        )
        fields.append(
            InputValueDefinitionNode(
                description=value.description,
                name=value.name,
                type=merged,
                default_value=value.default_value,
                directives=value.directives,
            )
        )
    node = InputObjectTypeDefinitionNode(
        description=description, name=NameNode(value=name), directives=(), fields=tuple(fields)
    )
    return api_definition(node)


def _scalar(name: str, defs: list[tuple[_Subgraph, _Local]], description: StringValueNode | None) -> TypeDefinitionNode:
    directives: dict[str, DirectiveNode] = {}
    for _, local in defs:
        for directive in local.directives:
            directives.setdefault(directive.name.value, directive)
    node = ScalarTypeDefinitionNode(
        description=description, name=NameNode(value=name), directives=clean_directives(directives.values())
    )
    return api_definition(node)


# ------------------------------------------------------------------------------------- reachability
def _check_reachable(types: Mapping[str, TypeMeta], subgraphs: list[_Subgraph]) -> None:
    """Every field of an object type can be planned from every subgraph that returns the type:
    either that subgraph resolves it, or a subgraph that does has a resolvable key whose fields the
    first resolves (one ``_entities`` hop)."""
    returned: dict[str, set[str]] = {}  # type -> subgraphs with a field returning it
    for sub in subgraphs:
        for local in sub.types.values():
            for fdef in local.fields.values():
                if sub.has(fdef.directives or (), "external"):
                    continue
                returned.setdefault(_shape(fdef.type)[0], set()).add(sub.name)
    for meta in types.values():
        if meta.kind != "object" or meta.name in DEFAULT_ROOTS.values():
            continue
        for origin in sorted(returned.get(meta.name, ())):
            for fmeta in meta.fields.values():
                if origin in fmeta.graphs or _provided_somewhere(types, meta.name, fmeta.name, origin):
                    continue
                if not any(
                    all(
                        name == "__typename" or origin in meta.fields.get(name, FieldMeta(name, ())).graphs
                        for name, _ in key.fields
                    )
                    for target in fmeta.graphs
                    for key in meta.keys.get(target, ())
                    if key.resolvable
                ):
                    raise CompositionError(
                        f"field {meta.name}.{fmeta.name} cannot be reached from subgraph {origin}, which returns "
                        f"{meta.name} objects: none of {', '.join(fmeta.graphs)} has a resolvable @key for "
                        f"{meta.name} whose fields {origin} resolves"
                    )


def _provided_somewhere(types: Mapping[str, TypeMeta], type_name: str, field_name: str, graph: str) -> bool:
    """Whether some field of ``graph`` @provides ``type_name.field_name`` (then it may be reachable
    only under that field; the planner checks each path)."""
    for meta in types.values():
        for fmeta in meta.fields.values():
            provided = fmeta.provides.get(graph)
            if provided and any(name == field_name for name, _ in provided):
                return True
    return False
