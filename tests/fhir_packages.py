"""Fetch official FHIR npm packages for tests (``npm pack``), cached under ``.cache/fhir``.

The tarballs are never committed; a test session downloads what it needs once.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "fhir"


def package(name: str, version: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    tgz = CACHE / f"{name}-{version}.tgz"
    if not tgz.exists():
        subprocess.run(
            ["npm", "pack", f"{name}@{version}", "--silent"], cwd=CACHE, check=True, capture_output=True, timeout=600
        )
    return tgz


def resources(name: str, version: str, types: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every JSON resource of ``types`` in the package."""
    with tarfile.open(package(name, version)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            base = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not base.endswith(".json") or base.split("-", 1)[0] not in types:
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            data = json.loads(fh.read())
            if isinstance(data, dict) and data.get("resourceType") in types:
                yield base, data
