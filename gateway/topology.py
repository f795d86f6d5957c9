"""The production topology of ``compose.yml`` as plain processes (``unihealth topology up``).

Contract
--------
:func:`load_compose` reads ``compose.yml`` (PyYAML resolves its ``<<`` merge keys) into one
:class:`ServiceSpec` per service: its command, environment, env files, dependencies and health
URL. Nothing about the services is restated here, so the runner and the compose file cannot drift:

* ``postgres``, ``redis``, ``kafka`` are reused when :class:`TopologyOptions` names them (an owner
  URL, a ``redis://`` URL, a ``host:port`` bootstrap), else started with ``scripts/postgres.sh``,
  ``scripts/redis.sh`` and ``scripts/kafka.sh`` and stopped at the end;
* a service whose command runs a script mounted from ``./docker`` (``db-logins``) runs that script
  from the repository with the same environment, PG* pointing at the owner's connection;
* every service built from the UniHealth image runs its compose ``command`` as
  ``python -m gateway.cli COMMAND...`` with its compose ``environment``, localized: compose host
  names become loopback addresses (``kafka:9092`` → the bootstrap, ``redis://redis:6379/0`` → the
  Redis URL, ``subgraph-patient:4001`` → 127.0.0.1:PORT, the owner URL → the real one),
  ``0.0.0.0`` → ``127.0.0.1``, ``/etc/unihealth/jwks.json`` → a generated JWKS,
  ``/var/lib/unihealth`` → a data directory per service. What compose takes from its env files
  is generated: ``UNIHEALTH_SECRET_KEY``, the login URLs (``UNIHEALTH_DATABASE_URL`` in
  ``unihealth_app``, ``UNIHEALTH_RELAY_DATABASE_URL`` in ``unihealth_relay``; a random suffix on
  the login names when the PostgreSQL server is given, dropped at the end) and, for services given
  ``docker/postgres.env``, the owner's ``PGPASSWORD``.
* HTTP ports are compose's (``ports="compose"``) or free ones (``ports="free"``, for tests and the
  bench on a shared machine); ``--metrics-port`` (9100 in every container) always gets a free one.
* With a shared Kafka broker (``kafka_bootstrap`` given) the worker gets its own consumer group,
  committed at the current ends of its topics first, so it handles only what this run publishes.

Services start level by level in ``depends_on`` order; one-shot services (``restart: "no"``) must
exit 0, the others must answer their compose health check URL with 200 — every wait bounded by
``startup_timeout``. :meth:`Topology.up` returns once the edge is healthy; :meth:`Topology.down`
stops every process (TERM, grace, KILL of its process group) and the servers it started, in
reverse order; it is idempotent and runs on any failure of ``up``. Children also receive SIGTERM if
this process dies (PR_SET_PDEATHSIG). Logs: one file per service under ``work_dir/logs``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from .processes import (
    ROOT,
    ProcessError,
    Server,
    base_env,
    free_port,
    last_line,
    log,
    python_module,
    run_logged,
    sigterm_as_interrupt,
    start_script_service,
    tail,
)

COMPOSE_FILE: Final = ROOT / "compose.yml"
INFRASTRUCTURE: Final = {"postgres": "postgres.sh", "redis": "redis.sh", "kafka": "kafka.sh"}
COMPOSE_OWNER_URL: Final = "postgresql+asyncpg://unihealth@postgres:5432/unihealth"
COMPOSE_REDIS_URL: Final = "redis://redis:6379/0"
COMPOSE_KAFKA: Final = "kafka:9092"
COMPOSE_JWKS: Final = "/etc/unihealth/jwks.json"
COMPOSE_DATA_DIR: Final = "/var/lib/unihealth"
OWNER_ENV_FILE: Final = "./docker/postgres.env"
APP_LOGIN: Final = "unihealth_app_login"
RELAY_LOGIN: Final = "unihealth_relay_login"
TOKEN_KID: Final = "topology"
_HEALTH_URL: Final = re.compile(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)")

Ports = Literal["compose", "free"]


def _say(message: str) -> None:
    log("topology", message)


# --------------------------------------------------------------------------- compose.yml


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One compose service as the runner needs it."""

    name: str
    image: str
    command: tuple[str, ...]
    environment: dict[str, str]
    env_files: tuple[str, ...]
    depends_on: tuple[str, ...]
    one_shot: bool
    health_port: int | None  # the port of the compose health check URL (None: no HTTP check)
    health_path: str
    mounts: dict[str, str]  # container path -> source path (relative to the compose file)

    @property
    def unihealth(self) -> bool:
        """Built from the UniHealth image (runs ``unihealth COMMAND``)."""
        return self.image.startswith("unihealth")

    @property
    def script(self) -> str | None:
        """The compose-relative source of a mounted script this service runs, if it runs one."""
        for arg in self.command:
            if arg in self.mounts and self.mounts[arg].endswith(".sh"):
                return self.mounts[arg]
        return None

    def option(self, flag: str) -> str | None:
        """The value following ``flag`` in the command (``--port 4001`` → ``"4001"``)."""
        args = list(self.command)
        return args[args.index(flag) + 1] if flag in args[:-1] else None


def _mounts(volumes: Sequence[Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for volume in volumes:
        if isinstance(volume, dict) and volume.get("type") == "bind":
            out[str(volume["target"])] = str(volume["source"])
    return out


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, ServiceSpec]:
    """Every service of the compose file (see the module contract)."""
    import yaml  # type: ignore[import-untyped]  # PyYAML (the topology/bench extra) ships no stubs

    spec = yaml.safe_load(path.read_text())
    services: dict[str, ServiceSpec] = {}
    for name, raw in spec["services"].items():
        test = (raw.get("healthcheck") or {}).get("test") or []
        match = _HEALTH_URL.search(" ".join(str(t) for t in test)) if isinstance(test, list) else None
        env_files = tuple(str(f["path"] if isinstance(f, dict) else f) for f in raw.get("env_file") or [])
        services[name] = ServiceSpec(
            name=name,
            image=str(raw.get("image", "")),
            command=tuple(str(c) for c in raw.get("command") or ()),
            environment={str(k): str(v) for k, v in (raw.get("environment") or {}).items()},
            env_files=env_files,
            depends_on=tuple(raw.get("depends_on") or ()),
            one_shot=str(raw.get("restart", "")) == "no",
            health_port=int(match.group(1)) if match else None,
            health_path=match.group(2) if match else "",
            mounts=_mounts(raw.get("volumes") or []),
        )
    return services


def start_levels(services: dict[str, ServiceSpec]) -> list[list[str]]:
    """Services grouped by ``depends_on`` depth: each level depends only on earlier ones (compose
    file order within a level); ValueError on a cycle or an unknown dependency."""
    levels: list[list[str]] = []
    placed: set[str] = set()
    remaining = list(services)
    while remaining:
        level = [n for n in remaining if all(d in placed for d in services[n].depends_on)]
        if not level:
            raise ValueError(f"compose services with unmet or cyclic depends_on: {', '.join(remaining)}")
        levels.append(level)
        placed.update(level)
        remaining = [n for n in remaining if n not in placed]
    return levels


# --------------------------------------------------------------------------- keys and logins


def rsa_jwks(directory: Path, kid: str) -> tuple[str, Path]:
    """A fresh RSA key: (private PEM, path of a JWKS file holding its public half under ``kid``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    path = directory / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return pem, path


def login_url(owner_url: str, user: str, password: str) -> str:
    """``owner_url`` (``postgresql+asyncpg://owner@host:port/db``) as ``user:password`` instead."""
    parts = urllib.parse.urlsplit(owner_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, ""))


def _pg_env(owner_url: str) -> dict[str, str]:
    """libpq's variables for psql as the owner."""
    parts = urllib.parse.urlsplit(owner_url)
    env = {
        "PGHOST": parts.hostname or "127.0.0.1",
        "PGPORT": str(parts.port or 5432),
        "PGUSER": urllib.parse.unquote(parts.username or "postgres"),
        "PGDATABASE": parts.path.lstrip("/") or "postgres",
    }
    if parts.password:
        env["PGPASSWORD"] = urllib.parse.unquote(parts.password)
    return env


def _psql() -> str:
    found = shutil.which("psql") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None)
    if not found:
        raise ProcessError("psql not found (db-logins runs docker/db-logins.sh with it); install postgresql-client")
    return str(found)


async def topic_partitions(bootstrap: str, topics: Sequence[str]) -> list[Any]:
    """Every partition of ``topics`` (aiokafka ``TopicPartition``s), read from the broker (bounded)."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="unihealth-topology")
    async with asyncio.timeout(60):
        await admin.start()
        try:
            described = await admin.describe_topics(list(topics))
        finally:
            await admin.close()
    return sorted(TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"])


async def _group_at_end(bootstrap: str, group: str, topics: list[str]) -> None:
    """Create ``topics`` if missing and commit ``group``'s offsets at their current ends."""
    from aiokafka import AIOKafkaConsumer

    from streams.worker import ensure_topics

    await ensure_topics(bootstrap, topics, 3, 1)
    tps = await topic_partitions(bootstrap, topics)
    if {tp.topic for tp in tps} != set(topics):
        raise ProcessError(f"Kafka at {bootstrap} did not describe every topic of {topics}: {tps}")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    async with asyncio.timeout(60):
        await consumer.start()
        try:
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            await consumer.commit(dict(ends.items()))
        finally:
            await consumer.stop()


# --------------------------------------------------------------------------- the runner


@dataclass(frozen=True, slots=True)
class TopologyOptions:
    """What to reuse and how to run (see the module contract)."""

    postgres_url: str | None = None  # the owner's postgresql+asyncpg:// URL of an existing database
    redis_url: str | None = None
    kafka_bootstrap: str | None = None
    work_dir: Path | None = None  # logs and data; default a new temporary directory (kept)
    ports: Ports = "compose"
    startup_timeout: float = 120.0
    extra_env: dict[str, str] = field(default_factory=dict)  # added to every UniHealth process
    compose_file: Path = COMPOSE_FILE


@dataclass(slots=True)
class Topology:
    """The running topology; use as a context manager (``up`` on enter, ``down`` on exit)."""

    options: TopologyOptions = field(default_factory=TopologyOptions)
    services: dict[str, ServiceSpec] = field(default_factory=dict)
    work_dir: Path = field(default_factory=Path)
    servers: dict[str, Server] = field(default_factory=dict)
    owner_url: str = ""
    redis_url: str = ""
    kafka_bootstrap: str = ""
    edge_url: str = ""
    subgraph_urls: dict[str, str] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    started_dirs: list[str] = field(default_factory=list)  # of the servers the scripts started
    worker_group: str = "unihealth-worker"  # the worker's Kafka consumer group (its CLI default)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _private_key: str = ""
    _jwks: Path = field(default_factory=Path)
    _app_url: str = ""
    _relay_url: str = ""
    _secret_key: str = ""
    _ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def __enter__(self) -> Topology:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    # ------------------------------------------------------------------ up / down

    def up(self) -> None:
        """Start everything (bounded); on any failure stop what was started and re-raise."""
        o = self.options
        self.services = load_compose(o.compose_file)
        levels = start_levels(self.services)
        self.work_dir = o.work_dir or Path(tempfile.mkdtemp(prefix="unihealth-topology-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._allocate_ports()
            for level in levels:
                self._start_level(level)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop every process and the servers this topology started (reverse order; idempotent)."""
        self._stack.close()

    def pids(self) -> list[int]:
        """Process ids (= process group ids) of the long-running children started so far."""
        return [s.proc.pid for s in self.servers.values() if s.proc is not None]

    def mint_token(self, facility: str, roles: Sequence[str] = ("clinician",), lifetime: int = 12 * 3600) -> str:
        """An RS256 access token the topology accepts (signed by its generated key)."""
        from .security.tokens import mint
        from .settings import load_settings

        settings = load_settings(self.service_env["edge"])
        return mint(
            settings,
            facilities=[facility],
            roles=list(roles),
            lifetime=lifetime,
            private_key=self._private_key,
            kid=TOKEN_KID,
            algorithm="RS256",
        )

    def import_env(self) -> dict[str, str]:
        """The environment of ``unihealth import`` into this topology: the owner (bulk load, as
        ``migrate``), no relay (the relay process publishes the outbox), no Kafka producer."""
        env = dict(self.service_env["migrate"])
        env.update({"UNIHEALTH_DATABASE_URL": self.owner_url, "UNIHEALTH_RELAY": "off", "UNIHEALTH_BUS": "inprocess"})
        return env

    # ------------------------------------------------------------------ internals

    def _allocate_ports(self) -> None:
        for spec in self.services.values():
            for flag in ("--port", "--metrics-port"):
                value = spec.option(flag)
                if value is None:
                    continue
                compose_port = int(value)
                keep = flag == "--port" and self.options.ports == "compose"
                self._ports[(spec.name, compose_port)] = compose_port if keep else free_port()

    def _port(self, service: str, compose_port: int) -> int:
        return self._ports[(service, compose_port)]

    def _localize(self, text: str, service: str) -> str:
        table = {
            COMPOSE_OWNER_URL: self.owner_url,
            COMPOSE_REDIS_URL: self.redis_url,
            COMPOSE_KAFKA: self.kafka_bootstrap,
            COMPOSE_JWKS: str(self._jwks),
            COMPOSE_DATA_DIR: str(self.work_dir / "data" / service),
            "0.0.0.0": "127.0.0.1",
        }
        for (name, compose_port), port in self._ports.items():
            table[f"{name}:{compose_port}"] = f"127.0.0.1:{port}"
        for compose_text, native in table.items():
            text = text.replace(compose_text, native)
        return text

    def _infrastructure(self, name: str) -> None:
        o = self.options
        given = {"postgres": o.postgres_url, "redis": o.redis_url, "kafka": o.kafka_bootstrap}[name]
        if given:
            _say(f"{name}: reusing {given.split('@')[-1]}")
            address = given
        else:
            _say(f"{name}: starting scripts/{INFRASTRUCTURE[name]}")
            address, directory = start_script_service(
                INFRASTRUCTURE[name], self._stack, self.log_dir / f"{name}.log", prefix="topology"
            )
            self.started_dirs.append(directory)
        if name == "postgres":
            self.owner_url = address
            self._secrets()
        elif name == "redis":
            self.redis_url = address
        else:
            self.kafka_bootstrap = address

    def _secrets(self) -> None:
        """What compose's env files hold, generated: keys, JWKS, the login URLs."""
        self._private_key, self._jwks = rsa_jwks(self.work_dir, TOKEN_KID)
        shared = self.options.postgres_url is not None  # login roles are cluster-wide: never collide
        suffix = f"_{secrets.token_hex(3)}" if shared else ""
        self._app_url = login_url(self.owner_url, APP_LOGIN + suffix, secrets.token_urlsafe(18))
        self._relay_url = login_url(self.owner_url, RELAY_LOGIN + suffix, secrets.token_urlsafe(18))
        if shared:  # runs after every process has stopped (registered before any starts)
            self._stack.callback(_drop_logins, self.owner_url, [APP_LOGIN + suffix, RELAY_LOGIN + suffix])
        self._secret_key = secrets.token_urlsafe(48)

    def _env_for(self, spec: ServiceSpec) -> dict[str, str]:
        env = base_env()
        env.update({k: self._localize(v, spec.name) for k, v in spec.environment.items()})
        env.update(
            {
                "UNIHEALTH_SECRET_KEY": self._secret_key,
                "UNIHEALTH_DATABASE_URL": self._app_url,
                "UNIHEALTH_RELAY_DATABASE_URL": self._relay_url,
                "PYTHONPATH": str(ROOT),  # this checkout's code, whatever the interpreter's site has
                "PYTHONUNBUFFERED": "1",
            }
        )
        if OWNER_ENV_FILE in spec.env_files:
            env.pop("PGPASSWORD", None)
            env.update({k: v for k, v in _pg_env(self.owner_url).items() if k == "PGPASSWORD"})
        if spec.unihealth:
            env.update(self.options.extra_env)
            Path(env.get("UNIHEALTH_DATA_DIR", self.work_dir / "data" / spec.name)).mkdir(parents=True, exist_ok=True)
        return env

    def _argv(self, spec: ServiceSpec) -> list[str]:
        """``python -m gateway.cli`` + the compose command, localized, with this run's ports."""
        args = [self._localize(a, spec.name) for a in spec.command]
        for flag in ("--port", "--metrics-port"):
            value = spec.option(flag)
            if value is not None:
                args[args.index(flag) + 1] = str(self._port(spec.name, int(value)))
        return python_module("gateway.cli", *args)

    def _own_worker_group(self) -> list[str]:
        """On a shared broker: a consumer group of this run's own, at the current end of its topics."""
        group = self.worker_group = f"unihealth-worker-{secrets.token_hex(4)}"
        try:
            asyncio.run(_group_at_end(self.kafka_bootstrap, group, _worker_topics(self.kafka_bootstrap)))
        except Exception as exc:  # aiokafka's errors and timeouts: this step's failure
            raise ProcessError(f"preparing the worker group on {self.kafka_bootstrap} failed: {exc!r}") from exc
        return ["--group-id", group]

    def _start_level(self, level: list[str]) -> None:
        waiting: list[Server] = []
        for name in level:
            spec = self.services[name]
            if name in INFRASTRUCTURE:
                self._infrastructure(name)
            elif spec.script is not None:
                self._run_script(spec)
            elif spec.unihealth and spec.one_shot:
                self._run_once(spec)
            elif spec.unihealth:
                waiting.append(self._launch(spec))
            else:
                raise ProcessError(f"compose service {name} ({spec.image}) has no native equivalent")
        for server in waiting:
            server.wait_healthy(self.options.startup_timeout)
            _say(f"{server.name}: healthy ({server.health})")

    def _run_script(self, spec: ServiceSpec) -> None:
        script = (self.options.compose_file.parent / spec.script).resolve() if spec.script else None
        assert script is not None
        env = {**self._env_for(spec), **_pg_env(self.owner_url), "PSQL": _psql()}
        log_file = self.log_dir / f"{spec.name}.log"
        status = run_logged(["sh", str(script)], env, log_file, self.options.startup_timeout, spec.name)
        if status != 0:
            raise ProcessError(f"{spec.name} failed (status {status}): {last_line(log_file)}\n{tail(log_file)}")
        _say(f"{spec.name}: done")

    def _run_once(self, spec: ServiceSpec) -> None:
        env = self._env_for(spec)
        self.service_env[spec.name] = env
        log_file = self.log_dir / f"{spec.name}.log"
        status = run_logged(self._argv(spec), env, log_file, self.options.startup_timeout, spec.name)
        if status != 0:
            raise ProcessError(f"{spec.name} failed (status {status}): {last_line(log_file)}\n{tail(log_file)}")
        _say(f"{spec.name}: done")

    def _launch(self, spec: ServiceSpec) -> Server:
        env = self._env_for(spec)
        self.service_env[spec.name] = env
        port = self._port(spec.name, spec.health_port) if spec.health_port else free_port()
        argv = self._argv(spec)
        if spec.name == "worker":
            self.worker_group = spec.option("--group-id") or self.worker_group
            if self.options.kafka_bootstrap:
                argv += self._own_worker_group()
        server = Server(
            spec.name,
            argv,
            env,
            self.log_dir / f"{spec.name}.log",
            port,
            health=f"http://127.0.0.1:{port}{spec.health_path or '/healthz'}",
        )
        self._stack.callback(self._stop_server, server)
        server.launch()
        self.servers[spec.name] = server
        if spec.name == "edge":
            self.edge_url = server.base
        elif spec.option("--port") and spec.command[:1] == ("subgraph",):
            self.subgraph_urls[spec.command[1]] = f"{server.base}/graphql"
        return server

    @staticmethod
    def _stop_server(server: Server) -> None:
        server.stop()


def _drop_logins(owner_url: str, logins: list[str]) -> None:
    """Best effort (cleanup must not mask the run's outcome): drop this run's login roles."""
    import asyncpg

    from subgraphs.store.database import libpq_dsn

    async def drop() -> None:
        conn = await asyncpg.connect(libpq_dsn(owner_url), timeout=15)
        try:
            for login in logins:
                await conn.execute(f'DROP ROLE IF EXISTS "{login}"', timeout=30)
        finally:
            await conn.close(timeout=10)

    try:
        asyncio.run(drop())
    except Exception as exc:
        _say(f"dropping the login roles {', '.join(logins)} failed: {exc!r}")


def _worker_topics(bootstrap: str) -> list[str]:
    from streams.worker import WorkerOptions

    return WorkerOptions(bootstrap=bootstrap).consumed()


# --------------------------------------------------------------------------- CLI


def ready_message(topology: Topology, facility: str) -> str:
    """What ``topology up`` prints once everything is healthy."""
    token = topology.mint_token(facility)
    lines = ["", "UniHealth production topology is up (plain processes, from compose.yml):"]
    lines.append(f"  edge        {topology.edge_url}  (FHIR REST {topology.edge_url}/fhir/r5, GraphQL /graphql)")
    lines += [f"  subgraph    {name:<12} {url}" for name, url in sorted(topology.subgraph_urls.items())]
    lines += [f"  {name:<11} {s.health}" for name, s in topology.servers.items() if name in ("relay", "worker")]
    lines.append(f"  postgres    {topology.owner_url.split('@')[-1]} (owner); services log in as RLS roles")
    lines.append(f"  redis       {topology.redis_url}")
    lines.append(f"  kafka       {topology.kafka_bootstrap}")
    lines.append(f"  logs        {topology.log_dir}")
    lines.append(f"A clinician of {facility} (RS256 token, valid 12 h):")
    lines.append(f"  TOKEN={token}")
    lines.append(f"  curl -H \"Authorization: Bearer $TOKEN\" -H 'X-Facility-Id: {facility}' \\")
    lines.append(f"       '{topology.edge_url}/fhir/r5/Patient?_count=1'")
    lines.append("Ctrl-C (or SIGTERM) stops everything.")
    return "\n".join(lines)


def cmd_topology_up(args: argparse.Namespace) -> None:
    """Start the topology, print where it is, wait for Ctrl-C/SIGTERM (or a child's death), stop it."""
    options = TopologyOptions(
        postgres_url=args.postgres_url,
        redis_url=args.redis_url,
        kafka_bootstrap=args.kafka,
        work_dir=Path(args.work_dir) if args.work_dir else None,
        ports="free" if args.free_ports else "compose",
        startup_timeout=args.startup_timeout,
    )
    topology = Topology(options)
    status = 0
    try:
        with sigterm_as_interrupt(), topology:
            print(ready_message(topology, args.facility), flush=True)
            while True:
                dead = [name for name, s in topology.servers.items() if not s.alive]
                if dead:
                    log_file = topology.servers[dead[0]].log
                    _say(f"{dead[0]} exited: {last_line(log_file)} (log {log_file}); stopping everything")
                    status = 1
                    break
                time.sleep(1)
    except KeyboardInterrupt:
        _say("stopping")
    except ProcessError as exc:
        sys.exit(f"unihealth topology: {exc}\n(logs in {topology.log_dir})")
    _say(f"stopped; logs kept in {topology.log_dir}")
    if status:
        sys.exit(status)


def add_topology_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``topology up`` to the ``unihealth`` command's sub-parsers."""
    topology = subparsers.add_parser(
        "topology", help="the production topology of compose.yml as plain processes (no Docker engine)"
    )
    sub = topology.add_subparsers(dest="topology_command", required=True)
    up = sub.add_parser(
        "up",
        help="start PostgreSQL, Redis, Kafka, migrate, the subgraphs, the edge, relay and worker; Ctrl-C stops",
        description="Start compose.yml's services as plain processes (reusing the servers given by URL).",
    )
    up.add_argument("--postgres-url", default=None, help="owner URL of an existing database (else scripts/postgres.sh)")
    up.add_argument("--redis-url", default=None, help="redis://host:port/db (else scripts/redis.sh)")
    up.add_argument("--kafka", default=None, help="bootstrap host:port of a broker (else scripts/kafka.sh)")
    up.add_argument("--work-dir", default=None, help="logs and data (default: a new temporary directory)")
    up.add_argument("--free-ports", action="store_true", help="free loopback ports instead of compose's 8000/4001-4003")
    up.add_argument("--facility", default="fac-001", help="facility of the printed clinician token")
    up.add_argument("--startup-timeout", type=float, default=120.0, help="seconds each step may take")
    up.set_defaults(func=cmd_topology_up)
    parser: argparse.ArgumentParser = topology
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m gateway.topology up [options]``."""
    parser = argparse.ArgumentParser(prog="unihealth")
    add_topology_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["topology", *(argv if argv is not None else sys.argv[1:])])
    args.func(args)


if __name__ == "__main__":
    main()
