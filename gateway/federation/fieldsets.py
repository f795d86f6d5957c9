"""Federation field sets (the ``fields`` of ``@key``, ``@requires``, ``@provides``).

Contract: :func:`parse_fieldset` turns ``"id owner { id }"`` into a :data:`FieldSet` — a tuple of
``(field name, sub field set or None)`` in source order — or raises ``ValueError`` naming the text
(aliases, arguments, fragments and directives are not allowed in field sets here).
:func:`print_fieldset` is its inverse (normalized spacing).
"""

from __future__ import annotations

from graphql import FieldNode, GraphQLError, SelectionSetNode, parse
from graphql.language import OperationDefinitionNode

FieldSet = tuple[tuple[str, "FieldSet | None"], ...]


def _convert(selection_set: SelectionSetNode, text: str) -> FieldSet:
    out: list[tuple[str, FieldSet | None]] = []
    for selection in selection_set.selections:
        if not isinstance(selection, FieldNode) or selection.alias or selection.arguments or selection.directives:
            raise ValueError(f"field set {text!r}: only plain fields and sub-selections are supported")
        sub = _convert(selection.selection_set, text) if selection.selection_set else None
        out.append((selection.name.value, sub))
    return tuple(out)


def parse_fieldset(text: str) -> FieldSet:
    """The field set of ``text`` (e.g. ``"id"``, ``"id owner { id }"``)."""
    try:
        document = parse("{" + text + "}", no_location=True)
    except GraphQLError as exc:
        raise ValueError(f"field set {text!r} is not valid: {exc.message}") from None
    operation = document.definitions[0]
    assert isinstance(operation, OperationDefinitionNode)
    fields = _convert(operation.selection_set, text)
    if not fields:
        raise ValueError(f"field set {text!r} is empty")
    return fields


def print_fieldset(fields: FieldSet) -> str:
    """``fields`` as text: ``id owner { id }``."""
    return " ".join(name if sub is None else f"{name} {{ {print_fieldset(sub)} }}" for name, sub in fields)


def merge_fieldsets(a: FieldSet, b: FieldSet) -> FieldSet:
    """The union of two field sets (``a``'s order first)."""
    out: dict[str, FieldSet | None] = dict(a)
    for name, sub in b:
        if name in out:
            current = out[name]
            if current is not None and sub is not None:
                out[name] = merge_fieldsets(current, sub)
            else:
                out[name] = current or sub
        else:
            out[name] = sub
    return tuple(out.items())
