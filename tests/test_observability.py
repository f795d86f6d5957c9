"""Observability of the edge and the subgraphs: /metrics, structured logs with a request id that
follows a request into a real subgraph process, /readyz (docs/operations.md).

Metrics are process-wide (``streams.metrics.REGISTRY``) and shared by every app of this test
process, so each test compares a scrape before with a scrape after what it did.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.graphql_app import FederationSettings
from gateway.observability.endpoints import observability_routes
from gateway.observability.logs import ContextFilter, JsonFormatter, logging_config
from gateway.observability.request_id import accept
from gateway.settings import load_settings
from streams.metrics import REGISTRY, Bounded, Registry, render
from tests.conftest import DEV_JWT_KEY, ROOT, SECRET, token_for
from tests.helpers import observation, patient
from tests.live import free_port

pytest_plugins = ["tests.streams_services"]  # redis_url


# ---------------------------------------------------------------------------------- helpers
def samples(page: str) -> dict[str, float]:
    """``name{labels}`` → value for every sample line of a Prometheus text page."""
    out: dict[str, float] = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def key(name: str, **labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def delta(before: dict[str, float], after: dict[str, float], name: str, **labels: str) -> float:
    k = key(name, **labels)
    return after.get(k, 0.0) - before.get(k, 0.0)


async def scrape(http: httpx.AsyncClient) -> tuple[str, dict[str, float]]:
    r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text, samples(r.text)


def edge_client(app: Starlette, facility: str, **headers: str) -> httpx.AsyncClient:
    token = token_for(app.state.backends.settings, [facility], roles=["clinician"])
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver",
        headers={"X-Facility-Id": facility, "Authorization": f"Bearer {token}", **headers},
        timeout=60,
    )


def local(app: Starlette) -> httpx.AsyncClient:
    """A client of ``app`` without credentials (probes need none)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)


HTTP = "unihealth_http_request_duration_seconds_count"


# ---------------------------------------------------------------------------------- REST metrics
async def test_rest_requests_are_timed_by_route_template_and_summary_reads_hit_the_cache(
    app: Starlette, facility: str
) -> None:
    async with edge_client(app, facility) as http:
        _, before = await scrape(http)
        pid = (await create_fhir(http, patient()))["id"]
        await create_fhir(http, observation(pid))
        for _ in range(2):
            assert (await http.get(f"/fhir/r5/Patient/{pid}")).status_code == 200
        first = await http.get(f"/fhir/r5/Patient/{pid}/summary?encounters=3")
        second = await http.get(f"/fhir/r5/Patient/{pid}/summary?encounters=3")
        assert first.status_code == second.status_code == 200
        assert first.json()["entry"] == second.json()["entry"]
        assert (await http.get("/fhir/r5/Patient/not a valid id!")).status_code == 400
        assert (await http.request("BREW", f"/fhir/r5/Patient/{pid}")).status_code == 405
        page, after = await scrape(http)

    edge = {"service": "edge", "method": "GET"}
    assert delta(before, after, HTTP, route="/fhir/r5/{type}/{id}", status="2xx", **edge) == 2
    assert delta(before, after, HTTP, route="/fhir/r5/{type}/{id}", status="4xx", **edge) == 1
    assert delta(before, after, HTTP, route="/fhir/r5/Patient/{id}/summary", status="2xx", **edge) == 2
    assert delta(before, after, HTTP, route="/fhir/r5/{type}", service="edge", method="POST", status="2xx") == 2
    assert delta(before, after, HTTP, route="/fhir/r5/{type}/{id}", service="edge", method="other", status="4xx") == 1
    assert "BREW" not in page, "methods are a bounded label too"
    bucket = key(
        "unihealth_http_request_duration_seconds_bucket",
        route="/fhir/r5/Patient/{id}/summary",
        status="2xx",
        le="+Inf",
        **edge,
    )
    assert after[bucket] - before.get(bucket, 0) == 2, "the +Inf bucket counts every request"
    assert pid not in page and facility not in page, "no id and no facility in any label"
    assert "not a valid id" not in page
    assert delta(before, after, "unihealth_cache_requests_total", cache="summary", result="miss") == 1
    assert delta(before, after, "unihealth_cache_requests_total", cache="summary", result="hit") == 1


async def create_fhir(http: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    r = await http.post(
        f"/fhir/r5/{resource['resourceType']}", json=resource, headers={"Content-Type": "application/fhir+json"}
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


# ---------------------------------------------------------------------------------- GraphQL metrics
WARD = """query WardRound {
  patients(first: 30) { nodes { id latestVitals { id } medicationRequests { id } } }
}"""


async def test_graphql_operations_subgraph_requests_and_dataloader_batches(app: Starlette, facility: str) -> None:
    async with edge_client(app, facility) as http:
        ids = []
        for n in range(3):
            pid = (await create_fhir(http, patient(f"Ward{n}")))["id"]
            await create_fhir(http, observation(pid))
            ids.append(pid)
        _, before = await scrape(http)
        named = await http.post("/graphql", json={"query": WARD})
        assert named.status_code == 200 and "errors" not in named.json(), named.text
        assert sorted(p["id"] for p in named.json()["data"]["patients"]["nodes"]) == sorted(ids)
        anonymous = await http.post("/graphql", json={"query": "{ patients(first: 1) { nodes { id } } }"})
        assert anonymous.status_code == 200, anonymous.text
        page, after = await scrape(http)

    op = "unihealth_graphql_operation_duration_seconds_count"
    assert delta(before, after, op, service="edge", operation="WardRound", status="2xx") == 1
    assert delta(before, after, op, service="edge", operation="anonymous", status="2xx") == 1
    requests = "unihealth_subgraph_requests_total"
    for subgraph in ("patient", "observation", "medication"):
        assert delta(before, after, requests, subgraph=subgraph, outcome="ok") >= 1, subgraph
    # latestVitals for three patients: ONE batch of three keys, not three batches of one
    batch = {"loader": "latest-per-code", "type": "Observation"}
    assert delta(before, after, "unihealth_dataloader_batch_size_count", **batch) == 1
    assert delta(before, after, "unihealth_dataloader_batch_size_sum", **batch) == 3
    assert delta(before, after, "unihealth_dataloader_batch_size_bucket", le="2", **batch) == 0
    assert delta(before, after, "unihealth_dataloader_batch_size_bucket", le="5", **batch) == 1
    assert not any(pid in page for pid in ids)


def test_operation_names_and_label_values_are_bounded() -> None:
    names = Bounded(2)
    assert [names(n) for n in ("A", "B", "C", "A", "D")] == ["A", "B", "other", "A", "other"]
    registry = Registry()
    h = registry.histogram("t_seconds", "help", ["route"], buckets=(0.1, 1))
    h.labels('a"b\\c\nd').observe(0.5)
    text = render([h.snapshot()])
    assert 't_seconds_bucket{le="0.1",route="a\\"b\\\\c\\nd"} 0' in text
    assert 't_seconds_bucket{le="1",route="a\\"b\\\\c\\nd"} 1' in text
    assert 't_seconds_bucket{le="+Inf",route="a\\"b\\\\c\\nd"} 1' in text
    with pytest.raises(ValueError, match="exists as a histogram"):
        registry.counter("t_seconds", "help")
    assert accept("abc.DEF_1-2") == "abc.DEF_1-2"
    for bad in ("x" * 65, "a b", "", "é", None):
        replaced = accept(bad)
        assert replaced != bad and len(replaced) == 32


# ---------------------------------------------------------------------------------- request ids in logs
@contextmanager
def json_logs() -> Iterator[io.StringIO]:
    """This process's log records as JSON lines (the formatter every process uses)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter("edge"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@contextmanager
def subgraph_process(name: str, data_dir: Path, env: dict[str, str]) -> Iterator[tuple[str, Path]]:
    """``unihealth subgraph NAME`` as its own process; yields (base URL, its log file)."""
    port = free_port()
    log_path = data_dir / f"subgraph-{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "subgraph", name, "--port", str(port), "--data-dir", str(data_dir)],
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"subgraph exited: {log_path.read_text()[-3000:]}")
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the subgraph did not start in time")
                time.sleep(0.1)
            yield base, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


async def test_request_id_follows_a_request_from_the_edge_into_a_subgraph_process(tmp_path: Path) -> None:
    env = {
        "UNIHEALTH_LOG_FORMAT": "json",
        "UNIHEALTH_RELAY": "off",
        "UNIHEALTH_SECRET_KEY": SECRET.decode(),
        "UNIHEALTH_DEV_JWT_KEY": DEV_JWT_KEY.decode(),
    }
    settings = load_settings({}, data_dir=tmp_path, secret_key=SECRET, dev_jwt_key=DEV_JWT_KEY, relay="off")
    facility = f"t-{uuid.uuid4().hex[:16]}"
    # the edge creates the schema and the data first; the subgraph process then reads the same file
    seed = create_app(settings)
    async with seed.router.lifespan_context(seed), edge_client(seed, facility) as http:
        pid = (await create_fhir(http, patient("Traced")))["id"]
    with subgraph_process("patient", tmp_path, env) as (base, log_path):
        config = FederationSettings(subgraphs={"patient": f"{base}/graphql"})
        app = create_app(settings, graphql=config)
        query = {"query": "query TracedPatient($id: ID!) { patient(id: $id) { id } }", "variables": {"id": pid}}
        async with app.router.lifespan_context(app), edge_client(app, facility) as http:
            with json_logs() as edge_log:
                given = f"trace-{uuid.uuid4().hex}"
                ok = await http.post("/graphql", json=query, headers={"X-Request-Id": given})
                invalid = await http.post("/graphql", json=query, headers={"X-Request-Id": "bad id with spaces"})
                rest = await http.get(f"/fhir/r5/Patient/{pid}?_elements=id", headers={"X-Request-Id": given})
            async with httpx.AsyncClient(base_url=base, timeout=30) as sub:
                assert (await sub.get("/readyz")).status_code == 200
                sub_metrics = (await sub.get("/metrics")).text
        assert ok.status_code == 200 and ok.json()["data"]["patient"]["id"] == pid, ok.text
        assert ok.headers["x-request-id"] == given
        generated = invalid.headers["x-request-id"]
        assert generated != "bad id with spaces" and accept(generated) == generated
        assert rest.headers["x-request-id"] == given
        await asyncio.sleep(0.2)  # the subgraph's access line is written after its response
        sub_lines = lines(log_path.read_text())

    edge_lines = [x for x in lines(edge_log.getvalue()) if x["logger"] != "httpx"]  # httpx: this test's client
    edge_access = [x for x in edge_lines if x["logger"] == "unihealth.access"]
    assert [(x["request_id"], x["route"], x["status"]) for x in edge_access] == [
        (given, "/graphql", 200),
        (generated, "/graphql", 200),
        (given, "/fhir/r5/{type}/{id}", 200),
    ]
    assert all(x["facility"] == facility and x["service"] == "edge" and x["duration_ms"] > 0 for x in edge_access)
    sub_access = [x for x in sub_lines if x.get("logger") == "unihealth.access" and x["route"] == "/graphql"]
    # the first is the gateway's own SDL fetch at start, with an id of its own
    assert [x["request_id"] for x in sub_access[1:]] == [given, generated], sub_lines[-5:]
    assert all(x["service"] == "subgraph-patient" and x["status"] == 200 for x in sub_access)
    for line in edge_lines + sub_lines:
        assert pid not in json.dumps(line), f"no patient id in any log line: {line}"
    assert not any("_elements" in json.dumps(x) for x in edge_lines), "no query strings in the logs"
    count = key(HTTP, service="subgraph-patient", route="/graphql", method="POST", status="2xx")
    assert samples(sub_metrics)[count] == 3
    ops = [
        value
        for name, value in samples(sub_metrics).items()
        if name.startswith("unihealth_graphql_operation_duration_seconds_count{")
        and 'service="subgraph-patient"' in name
    ]
    assert sum(ops) == 3, "the subgraph timed the SDL fetch and both operations the gateway sent it"


def test_text_and_json_log_formats() -> None:
    for fmt in ("text", "json"):
        config = logging_config(fmt, "info", service="relay")
        assert config["root"] == {"level": "INFO", "handlers": ["stderr"]}
    with pytest.raises(ValueError, match="log format"):
        logging_config("xml")
    record = logging.LogRecord("unihealth.x", logging.ERROR, __file__, 1, "boom %s", ("now",), None)
    record.color_message = "\x1b[36mboom\x1b[0m"  # uvicorn's ANSI copy of the message stays out
    record.route = "/fhir/r5/{type}"
    ContextFilter("worker").filter(record)
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "boom now" and out["service"] == "worker" and out["level"] == "error"
    assert out["request_id"] == "" and out["ts"].endswith("Z")
    assert out["route"] == "/fhir/r5/{type}" and "color_message" not in out


# ---------------------------------------------------------------------------------- readiness
async def test_readyz_is_503_naming_the_database_when_postgresql_is_down(tmp_path: Path) -> None:
    script = str(ROOT / "scripts" / "postgres.sh")
    started = await asyncio.to_thread(subprocess.run, [script], capture_output=True, text=True, check=False)
    assert started.returncode == 0, started.stderr[-2000:]
    url, directory = started.stdout.split()
    try:
        settings = load_settings(
            {}, data_dir=tmp_path, database_url=url, secret_key=SECRET, dev_jwt_key=DEV_JWT_KEY, relay="off"
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app), local(app) as http:
            up = await http.get("/readyz")
            assert up.status_code == 200 and up.json() == {"status": "ready", "checks": {"database": "ok"}}
            await asyncio.to_thread(subprocess.run, [script, "stop", directory], check=True)
            down = await http.get("/readyz")
            assert (await http.get("/healthz")).status_code == 200, "liveness does not depend on the database"
    finally:
        await asyncio.to_thread(subprocess.run, [script, "stop", directory], check=False)
    assert down.status_code == 503, down.text
    body = down.json()
    assert body["status"] == "unavailable" and body["failed"] == ["database"]
    assert body["checks"]["database"].startswith("unavailable (")
    assert "Traceback" not in down.text and url not in down.text


async def test_readyz_checks_redis_when_the_cache_is_redis(tmp_path: Path, redis_url: str) -> None:
    for cache_url, status in ((redis_url, 200), (f"redis://127.0.0.1:{free_port()}/0", 503)):
        settings = load_settings(
            {}, data_dir=tmp_path, secret_key=SECRET, dev_jwt_key=DEV_JWT_KEY, relay="off", cache_url=cache_url
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app), local(app) as http:
            r = await http.get("/readyz")
        assert r.status_code == status, r.text
        assert r.json()["checks"]["database"] == "ok"
        assert (r.json()["checks"]["cache"] == "ok") is (status == 200)
        assert r.json().get("failed", []) == ([] if status == 200 else ["cache"])


async def test_metrics_off_serves_no_metrics_route(tmp_path: Path) -> None:
    settings = load_settings({"UNIHEALTH_METRICS": "off"}, data_dir=tmp_path, secret_key=SECRET, relay="off")
    assert settings.metrics is False
    app = create_app(settings)
    async with app.router.lifespan_context(app), local(app) as http:
        assert (await http.get("/metrics")).status_code == 404
        r = await http.get("/readyz")
        assert r.status_code == 200 and r.headers["x-request-id"]


async def test_an_unexpected_error_is_a_500_with_the_request_id_in_the_response_log_and_metrics() -> None:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from fhir_rest.outcome import render_unexpected
    from gateway.observability.asgi import ObservedApp

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug")

    app = ObservedApp(
        service="test-500",
        routes=[Route("/broken/{id}", broken), *observability_routes(metrics=True)],
        exception_handlers={Exception: render_unexpected},
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://t"
    ) as http:
        with json_logs() as log:
            r = await http.get("/broken/secret-id-123", headers={"X-Request-Id": "req-500"})
        _, after = await scrape(http)
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-500"
    assert "Traceback" not in r.text and "a bug" not in r.text
    records = [x for x in lines(log.getvalue()) if x["logger"] != "httpx"]
    assert {x["request_id"] for x in records} == {"req-500"}
    assert any("RuntimeError: a bug" in x.get("exc", "") for x in records), "the details go to the log"
    access = [x for x in records if x["logger"] == "unihealth.access"]
    assert [(x["route"], x["status"]) for x in access] == [("/broken/{id}", 500)]
    assert after[key(HTTP, service="test-500", route="/broken/{id}", method="GET", status="5xx")] == 1


async def test_the_edge_serves_the_outbox_backlog_when_it_runs_the_relay(
    backend: str, settings_for: Any, facility: str, request: pytest.FixtureRequest
) -> None:
    """On PostgreSQL through the relay's own role: the edge's runtime role sees no outbox rows."""
    extra = {"relay_database_url": request.getfixturevalue("postgres_relay_url")} if backend == "postgresql" else {}
    app = create_app(settings_for(backend, relay="inline", **extra))
    async with app.router.lifespan_context(app), edge_client(app, facility) as http:
        await create_fhir(http, patient())
        for _ in range(100):
            _, now = await scrape(http)
            if now.get("unihealth_outbox_unpublished") == 0:
                break
            await asyncio.sleep(0.05)
        assert now["unihealth_outbox_unpublished"] == 0, "the relay published the write and its access record"
        assert now["unihealth_outbox_oldest_unpublished_age_seconds"] == 0
    async with app.router.lifespan_context(app), local(app) as http:
        page = (await http.get("/metrics")).text
    assert page.count("# TYPE unihealth_outbox_unpublished gauge") == 1, "one collector per running app"


async def test_no_outbox_backlog_on_an_edge_without_a_relay(app: Starlette) -> None:
    async with local(app) as http:
        page = (await http.get("/metrics")).text
    assert "unihealth_outbox_unpublished" not in page, "its runtime role could not count every facility's rows"


async def test_the_counting_cache_is_the_inner_cache_with_lookups_counted() -> None:
    from gateway.observability.cache import CountingCache, cache_kind
    from streams.cache import MemoryCache

    assert [cache_kind(k) for k in ("f|summary|p|3", "f|graphql|p|x", "f|search|Obs|q", "f|Patient|1")] == [
        "summary",
        "graphql",
        "search",
        "resource",
    ]
    inner = MemoryCache()
    cache = CountingCache(inner)
    registry_before = samples((await REGISTRY.exposition()).decode())
    await cache.set("f|graphql|p|q", b"v", 60)
    assert await cache.get("f|graphql|p|q") == b"v" and await cache.get("f|graphql|p|other") is None
    assert await cache.delete_prefix("f|graphql|") == 1 and await cache.get("f|graphql|p|q") is None
    after = samples((await REGISTRY.exposition()).decode())
    assert delta(registry_before, after, "unihealth_cache_requests_total", cache="graphql", result="hit") == 1
    assert delta(registry_before, after, "unihealth_cache_requests_total", cache="graphql", result="miss") == 2
    assert cache.max_entries == inner.max_entries, "anything else is the inner cache's"
    await cache.close()
