"""Text search: ``_text`` (the narrative) and ``_content`` (every string of the resource).

Contract
--------
* Indexing: :func:`text_rows` gives, for a resource, at most two ``idx_text`` rows: ``_text`` with
  the words of ``text.div`` (XHTML tags dropped, entities decoded) and ``_content`` with the words
  of every string value in the resource, the narrative included. A *word* is a maximal run of
  letters or digits of the :func:`~.extract.normalize`-d text (case- and accent-insensitive); the
  row holds each distinct word once, in order of first appearance, space-separated with a space at
  both ends, cut at :data:`MAX_CHARS`; runs longer than :data:`MAX_WORD` (base64 data) are left
  out. Resources without a narrative have no ``_text`` row.
* Searching: a value is one or more words (:func:`query_words`); a resource matches when *every*
  word of the value begins a word of its text (``_text=heart fail`` finds "Heart failure");
  comma-separated values are OR-ed, repeated parameters AND-ed. A value without any word is a 400.
* SQL: ``value LIKE '% w1%' AND value LIKE '% w2%'`` (each pattern bound; words hold no LIKE
  wildcards) within the ``(facility, type, param)`` range of ``idx_text``, on both backends. Not
  PostgreSQL full text: its operators (``@@``, ``to_tsvector``) are not leakproof, so under the
  forced row-level security of every table the planner cannot use a GIN index for them and
  computes ``to_tsvector`` per row (~0.3 ms); a LIKE over the stored words costs microseconds per
  row. The work grows with the facility's resources of the type, as ``:contains`` does; next to a
  selective criterion (``patient=``) the text criterion is a per-row probe.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .extract import normalize

TEXT_PARAMS = ("_text", "_content")
MAX_CHARS = 65536  # per row: distinct words of even a long narrative fit many times over
MAX_QUERY_WORDS = 16
MAX_WORD = 64  # longer runs (base64 attachment data, hashes) are not words anyone searches for
_WORD = re.compile(r"[^\W_]+")
_TAG = re.compile(r"<[^>]*>")


def words(text: str) -> list[str]:
    """The normalized words of ``text`` in order (repeats kept)."""
    return _WORD.findall(normalize(text))


def narrative_text(div: str) -> str:
    """The readable text of an XHTML narrative: tags dropped, entities decoded."""
    return html.unescape(_TAG.sub(" ", div))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key == "div" and isinstance(item, str):
                yield narrative_text(item)
            else:
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _row_value(texts: Iterator[str]) -> str | None:
    seen: dict[str, None] = {}
    size = 1
    for text in texts:
        for word in words(text):
            if word not in seen and len(word) <= MAX_WORD:
                size += len(word) + 1
                if size > MAX_CHARS:
                    break
                seen[word] = None
    return " " + " ".join(seen) + " " if seen else None


def text_rows(resource: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``idx_text`` rows (``param``, ``value``) of ``resource`` (see the module docstring)."""
    rows = []
    narrative = resource.get("text")
    div = narrative.get("div") if isinstance(narrative, Mapping) else None
    if isinstance(div, str):
        value = _row_value(iter([narrative_text(div)]))
        if value is not None:
            rows.append({"param": "_text", "value": value})
    content = _row_value(_strings({k: v for k, v in resource.items() if k != "resourceType"}))
    if content is not None:
        rows.append({"param": "_content", "value": content})
    return rows


def query_words(raw: str) -> list[str]:
    """The distinct words of a search value (at most :data:`MAX_QUERY_WORDS`)."""
    return list(dict.fromkeys(words(raw)))[:MAX_QUERY_WORDS]


def like_patterns(found: Sequence[str]) -> list[str]:
    """The LIKE patterns (escape ``/``) for "every word as a prefix" on the stored form."""
    return [f"% {w}%" for w in found]  # words hold no %, _ or /
