"""``scripts/bench_search.py``'s parallel-import sharding (the benchmark itself prints, never asserts).

:func:`shard_by_patient` must keep every resource of a patient in one shard, in file order and after
what it references, put everything before the first Patient in the head, and lose or repeat no line.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import orjson

from gateway import demo_data

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "scripts" / "bench_search.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_search", module)
    spec.loader.exec_module(module)
    return module


def _patient_of(resource: dict[str, object]) -> str | None:
    if resource["resourceType"] == "Patient":
        return str(resource["id"])
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if isinstance(ref, dict) and str(ref.get("reference", "")).startswith("Patient/"):
            return str(ref["reference"]).split("/", 1)[1]
    return None


def test_shard_by_patient_keeps_patients_whole_and_in_order(tmp_path: Path) -> None:
    data = tmp_path / "demo.ndjson"
    total = demo_data.write_ndjson(data, 10, 2, 3)
    head, shards = _bench().shard_by_patient(data, 3, tmp_path / "shards")
    assert len(shards) == 3
    lines = {p: p.read_bytes().splitlines() for p in [head, *shards]}
    original = data.read_bytes().splitlines()
    assert sum(len(v) for v in lines.values()) == total == len(original)
    assert sorted(line for v in lines.values() for line in v) == sorted(original)
    head_types = {orjson.loads(line)["resourceType"] for line in lines[head]}
    assert "Patient" not in head_types and head_types <= {"Organization", "Practitioner"}
    where: dict[str, Path] = {}
    for shard in shards:
        seen: set[str] = set()
        for line in lines[shard]:
            resource = orjson.loads(line)
            patient = _patient_of(resource)
            assert patient is not None
            if resource["resourceType"] == "Patient":
                seen.add(patient)
            assert patient in seen  # after its Patient, in the same shard
            assert where.setdefault(patient, shard) == shard
        # file order is kept within a shard
        positions = [original.index(line) for line in lines[shard]]
        assert positions == sorted(positions)
    assert len(where) == 10
