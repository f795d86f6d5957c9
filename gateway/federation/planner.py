"""Plan a normalized operation into fetches, level by level.

Contract of :meth:`Planner.plan`:
* root fields go to a subgraph that resolves them (all root fields of one subgraph in ONE
  fetch, level 0); a field shared by several subgraphs goes where its siblings already go, and
  the fields of one position that need other subgraphs go to as few subgraphs as possible;
* inside a fetch, a field its subgraph resolves (or ``@provides`` at that position) stays in that
  fetch; a field it does not resolve — or one with ``@requires`` in the subgraph that resolves
  it — is fetched from its subgraph through ``_entities``: the parent fetch selects
  ``__typename`` and the fields of a resolvable ``@key`` of the target subgraph (and the
  ``@requires`` fields it can resolve; the others come from a sibling fetch one level earlier),
  and the entity fetch runs one level after everything it depends on;
* a :class:`Fetch` has a path from the root (response keys, ``@`` per list level) where its
  objects are; all fetches of one subgraph at one level are sent as ONE request by the executor;
* internal fields (keys, ``__typename``, requires) reuse the client's selection of the same field
  when there is one, else take the field's name, else an alias ``_uh_<name>`` when the client
  already uses that response key for something else; the response shaping drops them;
* what cannot be planned raises :class:`PlanningError` naming the type, field and subgraphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphql import ArgumentNode, VariableNode, print_ast, visit
from graphql.language.visitor import Visitor

from .fieldsets import FieldSet, merge_fieldsets
from .operation import INTROSPECTION_FIELDS, Field, Fragment, Operation, Selection
from .supergraph import FieldMeta, Key, Supergraph

INTERNAL_PREFIX = "_uh_"


class PlanningError(Exception):
    """The operation cannot be planned over this supergraph."""


@dataclass(slots=True)
class PlanField:
    key: str  # response key in the subgraph's answer
    name: str
    arguments: str  # printed, e.g. "(id: $id)", or ""
    children: list[PlanItem] | None = None
    named: str = ""  # its named output type in the API schema ("" for internal key/requires fields)


@dataclass(slots=True)
class PlanFragment:
    type_condition: str
    children: list[PlanItem]


PlanItem = PlanField | PlanFragment


@dataclass(frozen=True, slots=True)
class RepField:
    """One field of a representation: ``name`` in the representation, read from ``key``."""

    name: str
    key: str
    children: tuple[RepField, ...] | None = None


@dataclass(slots=True)
class Fetch:
    id: int
    subgraph: str
    level: int
    type_name: str | None  # the entity type of an _entities fetch; None for a root fetch
    path: tuple[str, ...]  # where its objects are: response keys and "@" per list level
    after: tuple[int, ...] = ()  # fetches that must have run (the parent, requires providers)
    items: list[PlanItem] = field(default_factory=list)
    representation: tuple[RepField, ...] = ()
    variables: set[str] = field(default_factory=set)  # client variables its selection uses
    _text: str | None = None

    @property
    def selection(self) -> str:
        """The printed selection (inside ``... on Type { }`` for entity fetches)."""
        if self._text is None:
            self._text = print_items(self.items)
        return self._text


@dataclass(slots=True)
class QueryPlan:
    operation: Operation
    fetches: list[Fetch]
    variable_definitions: dict[str, str]  # client variable -> "$name: Type = default"

    @property
    def levels(self) -> list[list[Fetch]]:
        out: list[list[Fetch]] = []
        for fetch in self.fetches:
            while len(out) <= fetch.level:
                out.append([])
            out[fetch.level].append(fetch)
        return out


def print_items(items: list[PlanItem]) -> str:
    parts = []
    for item in items:
        if isinstance(item, PlanFragment):
            parts.append(f"... on {item.type_condition} {{ {print_items(item.children)} }}")
            continue
        head = item.name if item.key == item.name else f"{item.key}: {item.name}"
        head += item.arguments
        parts.append(head if item.children is None else f"{head} {{ {print_items(item.children)} }}")
    return " ".join(parts)


class _VariableCollector(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def enter_variable(self, node: VariableNode, *_: object) -> None:
        self.names.add(node.name.value)


def _arguments(arguments: tuple[ArgumentNode, ...] | list[ArgumentNode] | None) -> tuple[str, set[str]]:
    if not arguments:
        return "", set()
    collector = _VariableCollector()
    for argument in arguments:
        visit(argument, collector)
    return "(" + ", ".join(print_ast(a) for a in arguments) + ")", collector.names


def _provided(fields: FieldSet | None) -> dict[str, FieldSet | None] | None:
    return None if fields is None else dict(fields)


class Planner:
    def __init__(self, supergraph: Supergraph) -> None:
        self.supergraph = supergraph

    def plan(self, operation: Operation) -> QueryPlan:
        """The fetches of ``operation`` (see the module contract)."""
        if operation.kind != "query":
            raise PlanningError(f"{operation.kind} operations are not supported by this gateway")
        state = _PlanState(self.supergraph)
        by_graph: dict[str, list[Selection]] = {}
        for selection in operation.selections:
            assert isinstance(selection, Field), "the root type is an object type"
            if selection.name == "__typename" or selection.name in INTROSPECTION_FIELDS:
                continue
            meta = self.supergraph.field(operation.root_type, selection.name)
            graph = next((g for g in meta.graphs if g in by_graph), meta.graphs[0])
            by_graph.setdefault(graph, []).append(selection)
        for graph, selections in by_graph.items():
            fetch = state.new_fetch(graph, None, (), ())
            fetch.items = state.build(fetch, graph, operation.root_type, selections, (), None)
        definitions = {d.variable.name.value: print_ast(d) for d in operation.definition.variable_definitions or ()}
        return QueryPlan(operation, state.fetches, definitions)


class _PlanState:
    def __init__(self, supergraph: Supergraph) -> None:
        self.sg = supergraph
        self.fetches: list[Fetch] = []

    def new_fetch(self, graph: str, type_name: str | None, path: tuple[str, ...], after: tuple[int, ...]) -> Fetch:
        level = 1 + max((self.fetches[i].level for i in after), default=-1)
        fetch = Fetch(len(self.fetches), graph, level, type_name, path, after)
        self.fetches.append(fetch)
        return fetch

    # ------------------------------------------------------------------ one selection set
    def build(
        self,
        fetch: Fetch,
        graph: str,
        parent: str,
        selections: list[Selection],
        path: tuple[str, ...],
        provided: dict[str, FieldSet | None] | None,
        requires_met: bool = False,
    ) -> list[PlanItem]:
        """The items ``graph`` resolves for ``selections`` on ``parent`` objects at ``path``;
        the rest becomes entity fetches after ``fetch``. ``requires_met``: these objects come
        from ``_entities`` with the ``@requires`` fields of ``graph`` in their representation."""
        parent_meta = self.sg.types.get(parent)
        abstract = parent_meta is not None and parent_meta.kind in ("interface", "union")
        if abstract and not all(
            self._local(graph, parent, s, provided, requires_met) for s in selections if isinstance(s, Field)
        ):
            return self._expand(fetch, graph, parent, selections, path, provided)
        local: list[PlanItem] = []
        pending: list[tuple[Field, list[str]]] = []
        for selection in selections:
            if isinstance(selection, Fragment):
                children = self.build(fetch, graph, selection.type_condition, selection.selections, path, provided)
                if children:
                    local.append(PlanFragment(selection.type_condition, children))
                continue
            if selection.name == "__typename":
                local.append(PlanField(selection.key, "__typename", ""))
                continue
            assert parent_meta is not None, f"no federation facts for {parent}"
            meta = parent_meta.fields[selection.name]
            if self._local(graph, parent, selection, provided, requires_met):
                local.append(self._local_field(fetch, graph, selection, meta, path, provided))
            else:
                pending.append((selection, self._candidates(parent, meta, graph)))
        if abstract and not any(isinstance(i, PlanField) and i.key == "__typename" for i in local):
            local.insert(0, PlanField("__typename", "__typename", ""))
        if pending:
            self._jump(fetch, graph, parent, local, _assign(pending), path, selections)
        return local

    def _local(
        self,
        graph: str,
        parent: str,
        selection: Field,
        provided: dict[str, FieldSet | None] | None,
        requires_met: bool = False,
    ) -> bool:
        if selection.name == "__typename":
            return True
        meta = self.sg.types[parent].fields[selection.name]
        if graph in meta.graphs and (requires_met or graph not in meta.requires):
            return True
        return provided is not None and selection.name in provided

    def _local_field(
        self,
        fetch: Fetch,
        graph: str,
        selection: Field,
        meta: FieldMeta,
        path: tuple[str, ...],
        provided: dict[str, FieldSet | None] | None,
    ) -> PlanField:
        arguments, variables = _arguments(selection.node.arguments)
        fetch.variables |= variables
        children = None
        if selection.selections is not None:
            if graph in meta.provides:
                child_provided = _provided(meta.provides[graph])
            elif graph not in meta.graphs and provided is not None:
                child_provided = _provided(provided.get(selection.name))
            else:
                child_provided = None
            child_path = (*path, selection.key, *(["@"] * selection.lists))
            children = self.build(fetch, graph, selection.named, selection.selections, child_path, child_provided)
        return PlanField(selection.key, selection.name, arguments, children, selection.named)

    def _expand(
        self,
        fetch: Fetch,
        graph: str,
        parent: str,
        selections: list[Selection],
        path: tuple[str, ...],
        provided: dict[str, FieldSet | None] | None,
    ) -> list[PlanItem]:
        """An abstract position with fields ``graph`` cannot resolve: one fragment per object type."""
        schema = self.sg.api_schema
        abstract = schema.get_type(parent)
        items: list[PlanItem] = [PlanField("__typename", "__typename", "")]
        for possible in sorted(schema.get_possible_types(abstract), key=lambda t: t.name):  # type: ignore[arg-type]
            meta = self.sg.types.get(possible.name)
            if meta is None or graph not in meta.graphs:
                continue
            applicable = self._applicable(possible.name, selections)
            if applicable:
                children = self.build(fetch, graph, possible.name, applicable, path, provided)
                items.append(PlanFragment(possible.name, children))
        return items

    def _applicable(self, type_name: str, selections: list[Selection]) -> list[Selection]:
        schema = self.sg.api_schema
        concrete = schema.get_type(type_name)
        out: list[Selection] = []
        for selection in selections:
            if isinstance(selection, Field):
                out.append(selection)
                continue
            condition = schema.get_type(selection.type_condition)
            if condition is concrete or (
                condition is not None
                and not hasattr(condition, "is_type_of")
                and schema.is_sub_type(condition, concrete)  # type: ignore[arg-type]
            ):
                out += self._applicable(type_name, selection.selections)
        return out

    # ------------------------------------------------------------------ entity jumps
    def _candidates(self, parent: str, meta: FieldMeta, graph: str) -> list[str]:
        """Subgraphs that can resolve ``meta`` for ``parent`` objects from ``graph``: those with a
        resolvable key ``graph`` can supply first."""
        candidates = [g for g in meta.graphs if self.sg.keys(parent, g)]
        if not candidates:
            raise PlanningError(
                f"cannot plan {parent}.{meta.name} from subgraph {graph}: it is resolved by "
                f"{', '.join(meta.graphs) or 'no subgraph'}, where {parent} has no resolvable @key"
            )
        reachable = [g for g in candidates if self._key_for(parent, g, graph) is not None]
        return reachable + [g for g in candidates if g not in reachable]

    def _key_for(self, parent: str, target: str, graph: str) -> Key | None:
        for key in self.sg.keys(parent, target):
            if self.sg.resolves(parent, key.fields, graph):
                return key
        return None

    def _jump(
        self,
        fetch: Fetch,
        graph: str,
        parent: str,
        local: list[PlanItem],
        remote: dict[str, list[Field]],
        path: tuple[str, ...],
        selections: list[Selection],
    ) -> None:
        client_keys = {s.key for s in selections if isinstance(s, Field)}
        created: dict[str, Fetch] = {}
        parent_meta = self.sg.types[parent]
        # targets without @requires first: their fetches can then supply the others' required fields
        ordered = sorted(
            remote.items(), key=lambda kv: any(kv[0] in parent_meta.fields[f.name].requires for f in kv[1])
        )
        for target, fields in ordered:
            key = self._key_for(parent, target, graph)
            if key is None:
                raise PlanningError(
                    f"cannot plan {parent}.{fields[0].name}: subgraph {graph} cannot supply any @key of {parent} "
                    f"that subgraph {target} resolves"
                )
            representation = [RepField("__typename", _ensure(local, "__typename", None, client_keys))]
            representation += _ensure_fieldset(local, key.fields, client_keys)
            after = [fetch.id]
            requires: FieldSet = ()
            for f in fields:
                required = parent_meta.fields[f.name].requires.get(target)
                if required:
                    requires = merge_fieldsets(requires, required)
            if requires:
                here = tuple((n, s) for n, s in requires if self.sg.resolves(parent, ((n, s),), graph))
                representation += _ensure_fieldset(local, here, client_keys)
                for name, sub in requires:
                    if (name, sub) in here:
                        continue
                    provider = self._provider(fetch, graph, parent, name, sub, path, created, local, client_keys)
                    representation += _ensure_fieldset(provider.items, ((name, sub),), client_keys)
                    provider._text = None
                    after.append(provider.id)
            child = self.new_fetch(target, parent, path, tuple(dict.fromkeys(after)))
            child.representation = _dedupe(representation)
            child.items = self.build(child, target, parent, list(fields), path, None, requires_met=True)
            created[target] = child

    def _provider(
        self,
        fetch: Fetch,
        graph: str,
        parent: str,
        name: str,
        sub: FieldSet | None,
        path: tuple[str, ...],
        created: dict[str, Fetch],
        local: list[PlanItem],
        client_keys: set[str],
    ) -> Fetch:
        """The sibling fetch that supplies required field ``name`` (created if needed)."""
        meta = self.sg.types[parent].fields.get(name)
        if meta is None:
            raise PlanningError(f"@requires names {parent}.{name}, which the supergraph does not have")
        for target in meta.graphs:
            if target in created and self.sg.resolves(parent, ((name, sub),), target):
                return created[target]
        for target in meta.graphs:
            key = self._key_for(parent, target, graph)
            if key is None or not self.sg.resolves(parent, ((name, sub),), target):
                continue
            provider = self.new_fetch(target, parent, path, (fetch.id,))
            typename = _ensure(local, "__typename", None, client_keys)
            provider.representation = _dedupe(
                [RepField("__typename", typename), *_ensure_fieldset(local, key.fields, client_keys)]
            )
            created[target] = provider
            return provider
        raise PlanningError(
            f"cannot plan the @requires field {parent}.{name}: no subgraph resolving it is reachable from {graph}"
        )


def _assign(pending: list[tuple[Field, list[str]]]) -> dict[str, list[Field]]:
    """Fields to subgraphs, as few subgraphs as greedily possible: the subgraph that can take the
    most fields first (ties: the fields' own preference order)."""
    out: dict[str, list[Field]] = {}
    left = list(pending)
    while left:
        counts: dict[str, int] = {}
        for _, candidates in left:
            for g in candidates:
                counts[g] = counts.get(g, 0) + 1
        best = max(counts, key=lambda g: (counts[g], -min(c.index(g) for _, c in left if g in c)))
        out[best] = [f for f, c in left if best in c]
        left = [(f, c) for f, c in left if best not in c]
    return out


def _dedupe(fields: list[RepField]) -> tuple[RepField, ...]:
    out: dict[str, RepField] = {}
    for f in fields:
        out.setdefault(f.name, f)
    return tuple(out.values())


def _ensure(items: list[PlanItem], name: str, sub: FieldSet | None, taken: set[str]) -> str:
    """The response key under which ``items`` select field ``name`` without arguments (added
    if missing); ``sub`` fields are ensured below it."""
    for item in items:
        if isinstance(item, PlanField) and item.name == name and not item.arguments:
            if sub is not None and item.children is not None:
                _ensure_fieldset(item.children, sub, set())
            return item.key
    used = taken | {i.key for i in items if isinstance(i, PlanField)}
    key = name if name not in used else INTERNAL_PREFIX + name
    while key in used:  # the client used the alias too
        key = "_" + key
    children: list[PlanItem] | None = None
    if sub is not None:
        children = []
        _ensure_fieldset(children, sub, set())
    items.append(PlanField(key, name, "", children))
    return key


def _ensure_fieldset(items: list[PlanItem], fields: FieldSet, taken: set[str]) -> list[RepField]:
    out = []
    for name, sub in fields:
        key = _ensure(items, name, sub, taken)
        children = None
        if sub is not None:
            holder = next(i for i in items if isinstance(i, PlanField) and i.key == key)
            children = tuple(_ensure_fieldset(holder.children or [], sub, set()))
        out.append(RepField(name, key, children))
    return out
