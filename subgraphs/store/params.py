"""Compatibility names over the search registry (the foundation's hand-written parameter list is gone).

Contract: :data:`PATIENT_PARAM` names the reference parameter that puts a resource in a patient's
compartment for summaries, events and SMART ``patient/`` scopes. :data:`PARAM_BY_NAME` maps a
resource type to its search parameters by code, read from
:func:`subgraphs.store.registry.default_registry` on first use (never at import time), so existing
callers (``"patient" in PARAM_BY_NAME[type]``) see the official R5 definitions.
:func:`normalize_string` is the string-search normal form (the one the index holds).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .extract import normalize
from .registry import SearchParam, default_registry
from .validation import SUPPORTED_TYPES

# The params that put a resource in a patient's compartment (for summaries and events).
PATIENT_PARAM = "patient"


class _ParamsByType(Mapping[str, dict[str, SearchParam]]):
    """``type → {code: SearchParam}`` for the supported types, from the registry, lazily."""

    def __getitem__(self, resource_type: str) -> dict[str, SearchParam]:
        if resource_type not in SUPPORTED_TYPES:
            raise KeyError(resource_type)
        return default_registry().params_for(resource_type)

    def __iter__(self) -> Iterator[str]:
        return iter(SUPPORTED_TYPES)

    def __len__(self) -> int:
        return len(SUPPORTED_TYPES)


PARAM_BY_NAME: Mapping[str, dict[str, SearchParam]] = _ParamsByType()


def normalize_string(value: str) -> str:
    """Case- and accent-insensitive form used by string search (R5 search, string type)."""
    return normalize(value)[:255]


def split_reference(ref: str) -> tuple[str, str] | None:
    """``Type/id`` (also ``Type/id/_history/n`` or an absolute URL ending so) → (type, id)."""
    parts = ref.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-2] or not parts[-1] or not parts[-2][0].isupper():
        return None
    return parts[-2], parts[-1]
