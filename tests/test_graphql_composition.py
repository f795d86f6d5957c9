"""The three subgraph SDLs compose under Apollo's own composition (``@apollo/composition`` 2.x).

``scripts/apollo`` pins the composition library (``package.json`` + ``package-lock.json``); the
first run installs it with ``npm ci`` (the npm registry must be reachable; ``scripts/test.sh``
installs npm when missing). The SDLs are exactly what the subgraphs serve at ``_service { sdl }``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from subgraphs.graphql import SUBGRAPHS
from subgraphs.graphql.app import schema_for

ROOT = Path(__file__).resolve().parent.parent
APOLLO = ROOT / "scripts" / "apollo"


@pytest.fixture(scope="module")
def compose() -> Any:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed for Apollo composition (scripts/test.sh installs them)")
    if not (APOLLO / "node_modules" / "@apollo" / "composition").is_dir():
        out = subprocess.run(
            [npm, "ci", "--prefix", str(APOLLO), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]

    def run(sdls: dict[str, str]) -> dict[str, Any]:
        payload = {"subgraphs": [{"name": n, "url": f"http://{n}.local/graphql", "sdl": s} for n, s in sdls.items()]}
        out = subprocess.run(
            [node, str(APOLLO / "compose.mjs")],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    return run


@pytest.fixture(scope="module")
def sdls() -> dict[str, str]:
    return {name: schema_for(name).as_str() for name in SUBGRAPHS}


def test_subgraphs_compose_without_errors_or_hints(compose: Any, sdls: dict[str, str]) -> None:
    result = compose(sdls)
    assert result["errors"] == [], result["errors"]
    assert result["hints"] == [], result["hints"]  # none at all, so none about unresolvable fields
    supergraph = result["supergraphSdl"]
    for name in SUBGRAPHS:
        assert f'{name.upper()} @join__graph(name: "{name}"' in supergraph
    # Patient is one entity with fields from all three subgraphs, each resolvable through its key
    assert "type Patient" in supergraph
    for owner, field in (
        ("PATIENT", "encounters"),
        ("OBSERVATION", "latestVitals"),
        ("MEDICATION", "medicationRequests"),
    ):
        assert f'@join__type(graph: {owner}, key: "id")' in supergraph
        assert f"  {field}" in supergraph


def test_composition_would_catch_a_conflict(compose: Any, sdls: dict[str, str]) -> None:
    """The check is real: a field two subgraphs both define, without @shareable, fails composition."""
    broken = dict(sdls)
    broken["medication"] = broken["medication"].replace("medicationRequests(", "encounters(", 1)
    result = compose(broken)
    assert result["errors"], result
    assert result["supergraphSdl"] is None
