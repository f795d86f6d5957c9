"""FHIR JSON in and out, without losing what the client sent.

Contract:
* :func:`parse` accepts bytes, enforces a nesting-depth limit and returns plain Python values with
  JSON numbers that have a fraction or exponent as :class:`decimal.Decimal` (so ``1.50`` stays
  ``1.50``) and integers as :class:`int` of any size.
* :func:`dumps` writes compact UTF-8 JSON; a ``Decimal`` is written with its exact digits.
* ``parse(dumps(x)) == x`` for every value ``parse`` returns.
Both raise :class:`~subgraphs.store.errors.FhirError` (400) on malformed input.
"""

from __future__ import annotations

import decimal
import json
from typing import Any

import orjson

from .errors import bad_request

_decoder = json.JSONDecoder(parse_float=decimal.Decimal, parse_constant=None)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_strict_decoder = json.JSONDecoder(parse_float=decimal.Decimal, parse_constant=_reject_constant)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of ``value`` (iterative, stops early once over ``limit``)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return deepest


def parse(body: bytes, *, max_depth: int = 64) -> Any:
    """Parse a JSON document; 400 on bad UTF-8, bad JSON, NaN/Infinity or nesting over ``max_depth``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the body is not valid UTF-8 (byte {exc.start})", code="structure") from None
    # A cheap pre-check so a hostile "[[[[..." never reaches the recursive C scanner's limit.
    opened = max(text.count("{"), 0) + text.count("[")
    try:
        value, end = _strict_decoder.raw_decode(text.lstrip())
    except RecursionError:
        raise bad_request(f"JSON is nested deeper than {max_depth} levels", code="structure") from None
    except ValueError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", code="structure") from None
    if text.lstrip()[end:].strip():
        raise bad_request("the body has data after the JSON document", code="structure")
    if opened > max_depth and _depth(value, max_depth) > max_depth:
        raise bad_request(f"JSON is nested deeper than {max_depth} levels", code="structure")
    return value


def _default(obj: Any) -> Any:
    if isinstance(obj, decimal.Decimal):
        if not obj.is_finite():
            raise TypeError("non-finite decimal")
        return orjson.Fragment(str(obj))
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def dumps(value: Any) -> bytes:
    """Compact JSON bytes; Decimals keep their digits."""
    return orjson.dumps(value, default=_default)


def loads(data: bytes | str) -> Any:
    """Parse JSON that this server wrote itself (trusted, no limits)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return _decoder.decode(text)
