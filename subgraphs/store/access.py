"""Access policy as the store sees it: which interactions on which types, on which rows.

Contract: an :class:`AccessPolicy` maps ``(resource type, interaction letter)`` — letters from SMART
v2: ``c`` create, ``r`` read (read, vread, instance history), ``u`` update, ``d`` delete, ``s``
search (and type/system history) — to a :class:`Grant`. No grant: the interaction is forbidden
(403). A grant with ``groups = None`` is unrestricted within the facility; otherwise the rows
visible are those matching ANY group, a group being an AND of search criteria (a SMART
query-constrained scope like ``Observation.rs?category=laboratory``, plus the launch patient's
compartment for ``patient/`` scopes). The repository compiles the groups into the SQL of every
statement it runs, so REST, GraphQL and bulk paths cannot disagree. The policy is computed by
:mod:`gateway.security` from token, role and scopes; the store never sees HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

from .errors import FhirError
from .search import SearchQuery, Shape, parse_search, query_shape

Criteria = tuple[tuple[str, str], ...]
LETTERS = "cruds"


@dataclass(frozen=True, slots=True)
class Grant:
    groups: tuple[Criteria, ...] | None = None  # None: every row of the facility


@dataclass(frozen=True)
class AccessPolicy:
    grants: Mapping[tuple[str, str], Grant] = field(default_factory=lambda: MappingProxyType({}))
    everything: bool = False  # internal callers (import, relay, migrations): no checks
    label: str = ""

    @classmethod
    def unrestricted(cls, label: str = "system") -> AccessPolicy:
        return cls(everything=True, label=label)

    def grant(self, resource_type: str, letter: str) -> Grant:
        """The grant for ``letter`` on ``resource_type``; 403 when there is none."""
        if self.everything:
            return _ALL
        grant = self.grants.get((resource_type, letter))
        if grant is None:
            raise FhirError(403, "forbidden", f"not permitted: {_NAMES[letter]} {resource_type}")
        return grant

    def allows(self, resource_type: str, letter: str) -> bool:
        return self.everything or (resource_type, letter) in self.grants

    def queries(self, resource_type: str, letter: str) -> tuple[SearchQuery, ...] | None:
        """The grant's groups parsed as search queries (None: unrestricted); 403 without grant."""
        grant = self.grant(resource_type, letter)
        if grant.groups is None:
            return None
        return tuple(self._parsed[(resource_type, g)] for g in grant.groups)

    def shapes(self, resource_type: str, letter: str) -> tuple[Shape, ...] | None:
        queries = self.queries(resource_type, letter)
        return None if queries is None else tuple(query_shape(q) for q in queries)

    @cached_property
    def _parsed(self) -> dict[tuple[str, Criteria], SearchQuery]:
        out: dict[tuple[str, Criteria], SearchQuery] = {}
        for (resource_type, _letter), grant in self.grants.items():
            for group in grant.groups or ():
                if (resource_type, group) not in out:
                    out[(resource_type, group)] = parse_search(resource_type, list(group), strict=True)
        return out


_ALL = Grant()
_NAMES = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
