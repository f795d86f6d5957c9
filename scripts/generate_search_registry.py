#!/usr/bin/env python3
"""Generate ``subgraphs/store/search_registry.json`` from the official FHIR R5 SearchParameters.

Usage: ``.venv/bin/python scripts/generate_search_registry.py [--check]``

Fetches ``hl7.fhir.r5.core@5.0.0`` with ``npm pack`` into ``.cache/fhir`` (once; the tarball is
never committed), reads every ``SearchParameter-*.json`` in it (the package has no bundle of them;
a ``Bundle`` of SearchParameters would be read too) and writes, deterministically (sorted keys,
stable order, trailing newline):

* ``common``: the parameters whose base is ``Resource`` or ``DomainResource`` (``_id``,
  ``_lastUpdated``, ``_tag``, ``_profile``, ``_security``, ``_source``, ``_text``, ``_content``,
  ``_has``, ``_type``...). Where both define a code (``_text``), ``DomainResource`` wins: every
  in-scope type is a DomainResource. Expressions stay rooted at ``Resource``; the registry re-roots
  them per type.
* ``types``: for each in-scope resource type (``subgraphs.store.validation.SUPPORTED_TYPES``), every
  parameter whose base includes it, with the expression restricted to that type's union branches.

* ``compartments``: the R5 Patient compartment (``CompartmentDefinition-patient.json``): for each
  in-scope type in it, the parameters that put a resource in a patient's compartment (``{def}``
  stands for the Patient itself). Types outside the compartment are left out.
* ``elements``: per in-scope type, from its ``StructureDefinition`` snapshot, the top-level element
  names (choice elements keep ``[x]``): ``all``, ``summary`` (``isSummary``) and ``mandatory``
  (``min >= 1``) — for ``_summary`` and ``_elements``.

Only the package's own 5.0.0 definitions are used: the example SearchParameters it also ships
(``example``, ``example-reference``, ``filter``..., whose ``version`` is not ``5.0.0``) are skipped.
``--check`` exits 1 when the committed file differs from what would be generated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from subgraphs.store.registry import (  # noqa: E402
    GENERIC_ROOTS,
    SPEC_MODIFIERS,
    restrict_expression,
)
from subgraphs.store.validation import SUPPORTED_TYPES  # noqa: E402

PACKAGE, VERSION = "hl7.fhir.r5.core", "5.0.0"
CACHE = ROOT / ".cache" / "fhir"
OUTPUT = ROOT / "subgraphs" / "store" / "search_registry.json"

#: Composite components whose ``definition`` is not in the 5.0.0 package (left over from R4 names):
#: their type follows from the FHIR type their expression selects. Any other dangling definition
#: fails the generation.
DANGLING_COMPONENTS: dict[str, str] = {
    # Encounter.location.period is a Period
    "http://hl7.org/fhir/SearchParameter/Encounter-period": "date",
    # value.ofType(string)
    "http://hl7.org/fhir/SearchParameter/Observation-value-string": "string",
}


def fetch_package(name: str = PACKAGE, version: str = VERSION, cache: Path = CACHE) -> Path:
    """The package tarball, fetched with ``npm pack`` into ``cache`` on first use."""
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / f"{name}-{version}.tgz"
    if not tgz.exists():
        subprocess.run(
            ["npm", "pack", f"{name}@{version}", "--silent"], cwd=cache, check=True, capture_output=True, timeout=600
        )
    return tgz


def search_parameters(tgz: Path) -> Iterator[dict[str, Any]]:
    """Every SearchParameter resource in the package: ``SearchParameter-*.json`` files and the
    entries of any Bundle of SearchParameters, in file-name order."""
    with tarfile.open(tgz) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            base = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not base.endswith(".json"):
                continue
            if not (base.startswith("SearchParameter-") or base.startswith("Bundle-")):
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            data = json.loads(fh.read())
            if data.get("resourceType") == "SearchParameter":
                yield data
            elif data.get("resourceType") == "Bundle":
                for entry in data.get("entry", ()):
                    resource = entry.get("resource", {})
                    if resource.get("resourceType") == "SearchParameter":
                        yield resource


def _package_json(tgz: Path, name: str) -> dict[str, Any]:
    """One JSON file of the package (``package/<name>``)."""
    with tarfile.open(tgz) as tar:
        fh = tar.extractfile(f"package/{name}")
        assert fh is not None, name
        data: dict[str, Any] = json.loads(fh.read())
        return data


def patient_compartment(tgz: Path, types: tuple[str, ...]) -> dict[str, list[str]]:
    """Type → the parameters linking it to the patient, for the in-scope types in the compartment."""
    definition = _package_json(tgz, "CompartmentDefinition-patient.json")
    return {
        r["code"]: list(r["param"])
        for r in sorted(definition.get("resource", ()), key=lambda r: r["code"])
        if r["code"] in types and r.get("param")
    }


def top_level_elements(tgz: Path, resource_type: str) -> dict[str, list[str]]:
    """The top-level elements of ``resource_type``: all, summary and mandatory ones (document order)."""
    definition = _package_json(tgz, f"StructureDefinition-{resource_type}.json")
    out: dict[str, list[str]] = {"all": [], "summary": [], "mandatory": []}
    for element in definition["snapshot"]["element"]:
        path = element["path"].split(".")
        if len(path) != 2:
            continue
        name = path[1]
        out["all"].append(name)
        if element.get("isSummary"):
            out["summary"].append(name)
        if element.get("min", 0) >= 1:
            out["mandatory"].append(name)
    return out


def _entry(sp: dict[str, Any], expression: str | None, base: list[str], by_url: dict[str, Any]) -> dict[str, Any]:
    """The compact registry entry of one definition (empty/default fields left out)."""
    ptype = sp["type"]
    entry: dict[str, Any] = {"type": ptype, "url": sp["url"], "base": base}
    if expression:
        entry["expression"] = expression
    if sp.get("target"):
        entry["targets"] = sorted(sp["target"])
    modifiers = sp.get("modifier") or SPEC_MODIFIERS[ptype]
    if modifiers:
        entry["modifiers"] = list(modifiers)
    if sp.get("comparator"):
        entry["comparators"] = list(sp["comparator"])
    for key in ("multipleOr", "multipleAnd"):
        if key in sp and sp[key] is False:
            entry[key] = False
    if sp.get("processingMode", "normal") != "normal":
        entry["processingMode"] = sp["processingMode"]
    if sp.get("component"):
        comps = []
        for comp in sp["component"]:
            ref = by_url.get(comp["definition"])
            if ref is None and comp["definition"] not in DANGLING_COMPONENTS:
                raise ValueError(f"{sp['url']}: component definition {comp['definition']} is unknown")
            comps.append(
                {
                    "definition": comp["definition"],
                    "expression": comp["expression"],
                    "code": ref["code"] if ref else None,
                    "type": ref["type"] if ref else DANGLING_COMPONENTS[comp["definition"]],
                }
            )
        entry["components"] = comps
    return entry


def build_registry(tgz: Path, types: tuple[str, ...] = SUPPORTED_TYPES) -> dict[str, Any]:
    """The registry document (see the module docstring) from the core package at ``tgz``."""
    definitions = [sp for sp in search_parameters(tgz) if sp.get("version") == VERSION]
    by_url = {sp["url"]: sp for sp in definitions}
    common: dict[str, dict[str, Any]] = {}
    common_rank: dict[str, int] = {}
    per_type: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in sorted(types)}
    for sp in sorted(definitions, key=lambda s: s["url"]):
        bases = sp.get("base", [])
        for generic_rank, generic in enumerate(GENERIC_ROOTS):
            if generic in bases:
                code = sp["code"]
                if code in common and common_rank[code] >= generic_rank:
                    continue
                common[code] = _entry(sp, sp.get("expression"), [generic], by_url)
                common_rank[code] = generic_rank
        for rtype in per_type:
            if rtype not in bases:
                continue
            expression = restrict_expression(sp.get("expression"), rtype, keep_relative=len(bases) == 1)
            if sp.get("expression") and expression is None:
                raise ValueError(f"{sp['url']} names {rtype} as a base but no expression branch applies to it")
            code = sp["code"]
            if code in per_type[rtype]:
                raise ValueError(f"{rtype} has two definitions of {code}: {per_type[rtype][code]['url']}, {sp['url']}")
            per_type[rtype][code] = _entry(sp, expression, [rtype], by_url)
    return {
        "source": f"{PACKAGE}@{VERSION}",
        "generator": "scripts/generate_search_registry.py",
        "common": common,
        "types": per_type,
        "compartments": {"Patient": patient_compartment(tgz, tuple(sorted(types)))},
        "elements": {t: top_level_elements(tgz, t) for t in sorted(types)},
    }


def _line(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def render(document: dict[str, Any]) -> str:
    """The committed text of the registry: sorted keys, one parameter per line (so a diff shows
    which parameters changed), trailing newline. Parses back to ``document``."""
    out = ["{"]
    keys = sorted(document)
    for i, key in enumerate(keys):
        comma = "," if i < len(keys) - 1 else ""
        value = document[key]
        if key == "common":
            out.append(f"{_line(key)}:{{")
            out.extend(_params(value, "  "))
            out.append(f"}}{comma}")
        elif key == "types":
            out.append(f"{_line(key)}:{{")
            types = sorted(value)
            for j, rtype in enumerate(types):
                out.append(f" {_line(rtype)}:{{")
                out.extend(_params(value[rtype], "  "))
                out.append(f" }}{',' if j < len(types) - 1 else ''}")
            out.append(f"}}{comma}")
        elif key in ("compartments", "elements"):
            out.append(f"{_line(key)}:{{")
            out.extend(_params(value, "  "))  # one compartment / type per line
            out.append(f"}}{comma}")
        else:
            out.append(f"{_line(key)}:{_line(value)}{comma}")
    out.append("}")
    return "\n".join(out) + "\n"


def _params(params: dict[str, Any], indent: str) -> list[str]:
    codes = sorted(params)
    return [f"{indent}{_line(c)}:{_line(params[c])}{',' if k < len(codes) - 1 else ''}" for k, c in enumerate(codes)]


def summary(document: dict[str, Any]) -> str:
    """Counts per resource type and per parameter type, as printed by ``main``."""
    lines = [f"common (Resource/DomainResource): {len(document['common'])} parameters"]
    total: Counter[str] = Counter()
    for rtype, params in document["types"].items():
        kinds = Counter(p["type"] for p in params.values())
        total.update(kinds)
        detail = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        lines.append(f"{rtype}: {len(params)} parameters ({detail})")
    lines.append(f"all types: {sum(total.values())} ({', '.join(f'{k} {n}' for k, n in sorted(total.items()))})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the committed file is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    document = build_registry(fetch_package())
    text = render(document)
    if args.check:
        current = args.output.read_text("utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; run scripts/generate_search_registry.py", file=sys.stderr)
            return 1
    else:
        args.output.write_text(text, "utf-8")
        print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    print(summary(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())
