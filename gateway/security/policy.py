"""From a principal to the store's :class:`~subgraphs.store.access.AccessPolicy`.

Contract: :func:`policy_for` grants ``(type, letter)`` when some role of the principal permits it
(:mod:`gateway.security.roles`) AND some scope of the token does. Each granting scope becomes a
group of search criteria: its query (``patient/Observation.rs?category=laboratory``) plus, for
``patient/`` scopes, the launch patient's compartment (``_id`` for Patient, the ``patient`` search
parameter elsewhere; types outside the compartment — Practitioner, Organization, Location,
Medication, PractitionerRole — are shared reference data and stay unconstrained). An unconstrained
scope makes the grant unconstrained. ``patient/`` scopes without a launch patient grant nothing.

:func:`access_level` fingerprints a policy for cache keys: equal fingerprints, equal visibility (the
REST summary cache and the GraphQL response cache both key on it).

Both are pure and memoized (:data:`MEMO_SIZE` entries each; the policy by principal, its
fingerprint by policy identity): a principal is a frozen value (the verified claims), so every
request of one token gets the same policy object and its fingerprint is computed once. A
principal whose scopes cannot be applied is not memoized (the 403 is raised again each time).
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from types import MappingProxyType

from subgraphs.store.access import AccessPolicy, Criteria, Grant
from subgraphs.store.errors import FhirError
from subgraphs.store.params import PARAM_BY_NAME
from subgraphs.store.search import parse_search
from subgraphs.store.validation import SUPPORTED_TYPES

from ..identity_memo import IdentityMemo
from .roles import role_letters
from .tokens import Principal


def _compartment(resource_type: str, patient: str) -> Criteria:
    if resource_type == "Patient":
        return (("_id", patient),)
    if "patient" in PARAM_BY_NAME.get(resource_type, {}):
        return (("patient", f"Patient/{patient}"),)
    return ()


MEMO_SIZE = 10_000


@functools.lru_cache(maxsize=MEMO_SIZE)
def policy_for(principal: Principal) -> AccessPolicy:
    """The access policy of ``principal`` (module contract); 403 when a scope cannot be applied."""
    return _policy_for(principal)


def _policy_for(principal: Principal) -> AccessPolicy:
    groups: dict[tuple[str, str], set[Criteria] | None] = defaultdict(set)
    for scope in principal.scopes:
        if scope.context == "patient" and not principal.patient:
            continue
        types = SUPPORTED_TYPES if scope.resource_type == "*" else (scope.resource_type,)
        for resource_type in types:
            if resource_type not in SUPPORTED_TYPES:
                continue
            criteria: Criteria = scope.query
            if scope.context == "patient" and principal.patient:
                criteria = (*_compartment(resource_type, principal.patient), *criteria)
            if criteria:
                try:
                    parse_search(resource_type, list(criteria), strict=True)
                except FhirError as exc:
                    if scope.resource_type == "*":
                        continue  # a wildcard scope's query applies to the types that have its parameters
                    raise FhirError(
                        403, "forbidden", f"scope {scope.text} cannot be applied: {exc.diagnostics}"
                    ) from None
            for letter in scope.letters & role_letters(principal.roles, resource_type):
                key = (resource_type, letter)
                current = groups[key]
                if not criteria:
                    groups[key] = None  # an unconstrained scope wins
                elif current is not None:
                    current.add(criteria)
    grants = {key: Grant(None if g is None else tuple(sorted(g))) for key, g in groups.items()}
    return AccessPolicy(MappingProxyType(grants), label=f"{principal.subject} ({', '.join(principal.roles)})")


def access_level(policy: AccessPolicy) -> str:
    """A short fingerprint of what the caller may see (grants and their criteria): callers with equal
    fingerprints see equal data, so a cached view may be shared between them and no one else."""
    return _LEVELS(policy)


def _access_level(policy: AccessPolicy) -> str:
    grants = sorted((k, v.groups) for k, v in policy.grants.items())
    return hashlib.sha256(repr((policy.everything, grants)).encode()).hexdigest()[:16]


_LEVELS: IdentityMemo[AccessPolicy, str] = IdentityMemo(_access_level, MEMO_SIZE)
