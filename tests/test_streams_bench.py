"""``unihealth streams bench`` end to end on tiny settings: the machinery, never the speed.

The production topology (with the Kafka and Redis of ``UNIHEALTH_TEST_KAFKA`` /
``UNIHEALTH_TEST_REDIS_URL`` when set) and the embedded baseline each take 3 writes, Kafka alone
3 round trips; the relay drains two imports of about 100 demo resources (real change events), to
Kafka and to the in-process bus. Every write must be seen invalidated, every event published and
handled by the worker, and every number be there; how fast is for the printed table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gateway.stream_bench import JSON_SCHEMA_VERSION, percentile

ROOT = Path(__file__).resolve().parent.parent


def test_streams_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "streams.json"
    shared = [
        *(("--kafka", os.environ["UNIHEALTH_TEST_KAFKA"]) if os.environ.get("UNIHEALTH_TEST_KAFKA") else ()),
        *(
            ("--redis-url", os.environ["UNIHEALTH_TEST_REDIS_URL"])
            if os.environ.get("UNIHEALTH_TEST_REDIS_URL")
            else ()
        ),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "streams", "bench", "--writes", "3", "--events", "100", *shared,
         "--json-out", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"streams bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert "write -> invalidated summary" in proc.stdout and "relay: outbox -> Kafka" in proc.stdout
    report = json.loads(out.read_text())
    assert report["schema"] == JSON_SCHEMA_VERSION
    rows = {r["target"]: r for r in report["latency"]}
    assert set(rows) == {"production", "embedded (baseline)", "Kafka floor"}
    for row in rows.values():
        assert row["writes"] == 3 and row["invalidated"] == 3, row  # every write dropped its cached summary
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["max_ms"], row
    assert rows["production"]["to_kafka_p50_ms"] is not None, "the events were found on Kafka"
    stages = {t["stage"]: t for t in report["throughput"]}
    assert set(stages) == {
        "relay: outbox -> Kafka (acks=all, idempotent)",
        "worker: Kafka -> invalidate agent done",
        "relay: outbox -> in-process bus (baseline)",
    }
    for stage in stages.values():  # each import wrote ~100 resources, one outbox row each
        assert stage["events"] >= 100 and stage["seconds"] > 0 and stage["events_per_second"] > 0, stage


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert percentile([5.0], 0.99) == 5.0
