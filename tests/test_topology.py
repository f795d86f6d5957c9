"""The production topology as plain processes (``gateway/topology.py``), for real.

One test brings the whole topology of ``compose.yml`` up — its own PostgreSQL (scripts/postgres.sh),
the Kafka and Redis of ``UNIHEALTH_TEST_KAFKA`` / ``UNIHEALTH_TEST_REDIS_URL`` when set (else the
runner starts its own with the scripts), ``migrate`` and ``db-logins``, three subgraph processes,
the edge, the relay and the Faust worker — and, through the edge only: a REST summary (cached in
Redis), a GraphQL query that crosses the three subgraphs, a write, then the worker dropping the
cached summary (bounded wait; the cache TTL is an hour, so only the worker can have dropped it)
and the next summary carrying the write. Then it stops the topology and checks that no process
it started is left. The other tests check that the runner follows compose.yml, with no servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.graphql_app import parse_subgraphs
from gateway.settings import load_settings
from gateway.topology import (
    COMPOSE_FILE,
    INFRASTRUCTURE,
    Topology,
    TopologyOptions,
    load_compose,
    start_levels,
    topic_partitions,
)
from streams.events import topic_for
from subgraphs.store.database import libpq_dsn
from tests.helpers import observation, patient

WAIT = 45.0  # bound on the eventual invalidation


def _processes_mentioning(*needles: str) -> list[str]:
    """``pid: cmdline`` of every process whose command line or environment contains a needle."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if any(n.encode() in text for n in needles):
            found.append(f"{entry.name}: {(entry / 'cmdline').read_bytes()[:200]!r}")
    return found


def _metric(url: str, name: str) -> float | None:
    """The value of the first sample of ``name`` on a Prometheus text page (None when absent)."""
    page = httpx.get(url, timeout=10).text
    for line in page.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def _settle(topology: Topology, types: tuple[str, ...]) -> None:
    """Wait (bounded) until the relay has published every outbox row and the worker has committed
    (= handled) everything then on the change topics of ``types``: earlier writes' invalidations
    cannot land after this. Offsets, not the worker's total lag: on a shared broker other
    developers' traffic keeps that from reaching zero."""
    relay = topology.servers["relay"].health.replace("/healthz", "/metrics")
    deadline = time.monotonic() + WAIT
    while _metric(relay, "unihealth_outbox_unpublished") != 0:
        assert time.monotonic() < deadline, "the relay did not publish the outbox"
        time.sleep(0.1)
    asyncio.run(_committed_up_to_the_end(topology, [topic_for(t) for t in types], deadline))


async def _committed_up_to_the_end(topology: Topology, topics: list[str], deadline: float) -> None:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    tps = await topic_partitions(topology.kafka_bootstrap, topics)
    assert {tp.topic for tp in tps} == set(topics), tps
    consumer = AIOKafkaConsumer(bootstrap_servers=topology.kafka_bootstrap, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=topology.kafka_bootstrap)
    await consumer.start()
    await admin.start()
    try:
        ends = await consumer.end_offsets(tps)
        while True:
            committed = await admin.list_consumer_group_offsets(topology.worker_group, partitions=tps)
            behind = {
                tp: end for tp, end in ends.items() if end and (committed.get(tp) is None or committed[tp].offset < end)
            }
            if not behind:
                return
            assert time.monotonic() < deadline, f"the worker did not handle {behind} (committed {committed})"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
        await consumer.stop()


def _database_users(owner_url: str) -> set[str]:
    import asyncpg

    async def users() -> set[str]:
        conn = await asyncpg.connect(libpq_dsn(owner_url), timeout=15)
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT usename FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid() AND usename IS NOT NULL"
            )
        finally:
            await conn.close()
        return {str(r["usename"]) for r in rows}

    return asyncio.run(users())


def _summary_keys(client: redis.Redis, facility: str, patient_id: str) -> list[Any]:
    return list(client.scan_iter(match=f"uh:{{{facility}}}:c:summary|{patient_id}|*", count=1000))


def test_the_topology_serves_rest_and_graphql_and_the_worker_invalidates(tmp_path: Path) -> None:
    options = TopologyOptions(
        redis_url=os.environ.get("UNIHEALTH_TEST_REDIS_URL") or None,
        kafka_bootstrap=os.environ.get("UNIHEALTH_TEST_KAFKA") or None,
        work_dir=tmp_path,
        ports="free",
        startup_timeout=90.0,
        extra_env={"UNIHEALTH_SUMMARY_TTL": "3600"},
    )
    topology = Topology(options)
    facility = f"t-{uuid.uuid4().hex[:12]}"
    try:
        topology.up()
        token = topology.mint_token(facility)
        headers = {"Authorization": f"Bearer {token}", "X-Facility-Id": facility}
        fhir = f"{topology.edge_url}/fhir/r5"
        cache = redis.Redis.from_url(topology.redis_url, socket_timeout=5)
        with httpx.Client(headers=headers, timeout=30) as http:
            created = http.post(f"{fhir}/Patient", json=patient("Topology"))
            assert created.status_code == 201, created.text
            pid = created.json()["id"]
            first = http.post(f"{fhir}/Observation", json=observation(pid, "8867-4", "2024-01-01T10:00:00Z", 61))
            assert first.status_code == 201, first.text
            med = {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "subject": {"reference": f"Patient/{pid}"},
                "medication": {"concept": {"text": "amoxicillin 500 mg"}},
            }
            assert (answer := http.post(f"{fhir}/MedicationRequest", json=med)).status_code == 201, answer.text
            _settle(topology, ("Patient", "Observation", "MedicationRequest"))  # else their invalidations
            # might drop the summary cached next

            # A REST summary, computed and cached in Redis under the facility and patient.
            summary = http.get(f"{fhir}/Patient/{pid}/summary")
            assert summary.status_code == 200, summary.text
            ids = {e["resource"]["id"] for e in summary.json()["entry"]}
            assert first.json()["id"] in ids
            assert _summary_keys(cache, facility, pid), "the summary was not cached in Redis"

            # GraphQL through the edge's gateway: patient, observation and medication subgraphs.
            query = """query($id: ID!) { patient(id: $id) { id name { family }
                latestVitals { id valueQuantity { value } } medicationRequests { id status } } }"""
            graphql = http.post(f"{topology.edge_url}/graphql", json={"query": query, "variables": {"id": pid}})
            assert graphql.status_code == 200, graphql.text
            body = graphql.json()
            assert "errors" not in body, body
            node = body["data"]["patient"]
            assert node["name"]["family"] == "Topology"
            assert [v["id"] for v in node["latestVitals"]] == [first.json()["id"]]
            assert [m["status"] for m in node["medicationRequests"]] == ["active"]

            # A write: outbox -> relay process -> Kafka -> worker -> the cached summary dropped.
            newer = http.post(f"{fhir}/Observation", json=observation(pid, "8867-4", "2025-06-01T10:00:00Z", 99))
            assert newer.status_code == 201, newer.text
            deadline = time.monotonic() + WAIT
            while _summary_keys(cache, facility, pid):
                for name, server in topology.servers.items():
                    assert server.alive, f"{name} died:\n{server.log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, (
                    f"the worker did not drop the cached summary within {WAIT:.0f}s; "
                    f"worker log:\n{topology.servers['worker'].log.read_text()[-3000:]}"
                )
                time.sleep(0.2)
            again = http.get(f"{fhir}/Patient/{pid}/summary")
            assert again.status_code == 200, again.text
            values = [
                e["resource"].get("valueQuantity", {}).get("value")
                for e in again.json()["entry"]
                if e["resource"]["resourceType"] == "Observation"
            ]
            assert values == [99], values  # the newest heart rate, no longer the cached 61
        # Every connection but this check's own logs in as a row-level-security login, none as the owner.
        assert _database_users(topology.owner_url) == {"unihealth_app_login", "unihealth_relay_login"}
        pids = topology.pids()
        assert len(pids) == 6  # three subgraphs, edge, relay, worker
    finally:
        topology.down()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    assert not _processes_mentioning(str(tmp_path), *topology.started_dirs)
    for directory in topology.started_dirs:
        assert not Path(directory).exists(), directory


def test_the_runner_follows_compose() -> None:
    services = load_compose()
    levels = start_levels(services)
    order = [name for level in levels for name in level]
    assert set(levels[0]) == set(INFRASTRUCTURE)
    for name, spec in services.items():  # every dependency starts in an earlier level
        assert all(order.index(d) < order.index(name) for d in spec.depends_on), name
    unihealth = {n for n, s in services.items() if s.unihealth}
    assert unihealth == {"migrate", "subgraph-patient", "subgraph-observation", "subgraph-medication"} | {
        "edge",
        "relay",
        "worker",
    }
    assert services["db-logins"].script == "./docker/db-logins.sh"
    assert (COMPOSE_FILE.parent / "docker" / "db-logins.sh").is_file()
    assert order.index("db-logins") < order.index("migrate") < order.index("edge")
    for name in unihealth - {"migrate"}:
        assert services[name].health_port is not None, name  # a health check the runner waits on
        assert not services[name].one_shot, name
    assert services["migrate"].one_shot and services["db-logins"].one_shot
    # The edge finds exactly the subgraph processes, at the ports their commands listen on.
    edge = parse_subgraphs(services["edge"].environment["UNIHEALTH_SUBGRAPHS"])
    for name, url in edge.items():
        spec = services[f"subgraph-{name}"]
        assert spec.command[:2] == ("subgraph", name)
        assert url == f"http://subgraph-{name}:{spec.option('--port')}/graphql"
        assert spec.health_port == int(spec.option("--port") or 0)
    assert set(edge) == {"patient", "observation", "medication"}


def test_compose_runs_every_process_as_a_row_level_security_login() -> None:
    """No UniHealth process but migrate gets the owner's credentials; the variables compose sets are
    ones the settings read (a misspelt variable would be silently ignored)."""
    services = load_compose()
    owner = {n for n, s in services.items() if "./docker/postgres.env" in s.env_files}
    assert owner == {"postgres", "db-logins", "migrate"}
    for name, spec in services.items():
        if not spec.unihealth:
            continue
        assert "UNIHEALTH_DATABASE_URL" not in spec.environment, name  # from docker/unihealth.env: a login
        assert spec.env_files[0] == "./docker/unihealth.env", name
        settings = load_settings({**spec.environment, **_fake_secrets()})
        assert settings.profile == "production" and settings.cache_url == "redis://redis:6379/0", name
        assert settings.relay == "off", name
    assert load_settings({**services["edge"].environment, **_fake_secrets()}).graphql_subgraphs
    assert (
        services["migrate"]
        .environment["UNIHEALTH_MIGRATION_DATABASE_URL"]
        .startswith("postgresql+asyncpg://unihealth@postgres:5432/")
    )
    worker = services["worker"]
    assert worker.option("--cache-url") == "redis://redis:6379/0" and worker.option("--metrics-port") == "9100"
    assert services["relay"].option("--metrics-port") == "9100"
    assert json.dumps(sorted(services["db-logins"].environment)) == json.dumps(
        ["PGDATABASE", "PGHOST", "PGPORT", "PGUSER"]
    )


def _fake_secrets() -> dict[str, str]:
    return {
        "UNIHEALTH_DATABASE_URL": "postgresql+asyncpg://unihealth_app_login:pw@postgres:5432/unihealth",
        "UNIHEALTH_SECRET_KEY": "x" * 48,
    }
