"""SMART App Launch v2 scopes (with v1 ``read``/``write`` mapped).

Contract: :func:`parse_scope` turns one scope string into a :class:`Scope` or ``None`` when it is
not a resource scope (``openid``, ``launch``, ``offline_access``... are ignored); a malformed
resource scope raises ``ValueError``. Grammar: ``(patient|user|system)/(Type|*).(cruds-subset|
read|write|*)[?query]``; v2 letters must appear in ``c r u d s`` order. ``read`` → ``rs``,
``write`` → ``cud``, ``*`` → ``cruds``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)(?:\?(.*))?$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True, slots=True)
class Scope:
    context: str  # patient | user | system
    resource_type: str  # a type or "*"
    letters: frozenset[str]
    query: tuple[tuple[str, str], ...]  # AND-ed search criteria ("" = none)
    text: str


def parse_scope(text: str) -> Scope | None:
    m = _SCOPE.match(text)
    if m is None:
        if "/" in text and "." in text:
            raise ValueError(f"malformed SMART scope {text!r}")
        return None
    context, resource_type, perms, query = m.groups()
    if perms in _V1:
        letters = _V1[perms]
    else:
        if not perms or any(c not in "cruds" for c in perms) or list(perms) != sorted(perms, key="cruds".index):
            raise ValueError(f"malformed SMART scope permissions in {text!r}")
        letters = perms
    pairs: tuple[tuple[str, str], ...] = ()
    if query:
        try:
            pairs = tuple(parse_qsl(query, keep_blank_values=False, strict_parsing=True))
        except ValueError:
            raise ValueError(f"malformed query in SMART scope {text!r}") from None
    return Scope(context, resource_type, frozenset(letters), pairs, text)


def parse_scopes(text: str) -> tuple[Scope, ...]:
    """All resource scopes of a space-separated ``scope`` claim."""
    return tuple(s for s in (parse_scope(part) for part in text.split()) if s is not None)
