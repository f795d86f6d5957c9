"""Processes for comparing gateways over the same running subgraphs (the differential tests and
:mod:`gateway.federation.bench`).

Contract:
* :func:`subgraph_processes` runs ``unihealth subgraph NAME`` for each subgraph on free loopback
  ports over the same store as ``settings`` (the child environment is :func:`child_environment`),
  yields ``{name: url}`` once every ``/healthz`` answers, and stops them (TERM, then KILL).
* :func:`apollo_gateway` runs ``scripts/apollo/gateway.mjs`` (``@apollo/gateway`` 2.x behind
  ``@apollo/server``) with IntrospectAndCompose over ``subgraphs`` or a static ``supergraph`` SDL
  (with URL ``override``s), yields its ``/graphql`` URL, and stops it.
* :func:`gateway_process` runs this repository's gateway as its own uvicorn process (``python -m
  gateway.federation.harness serve``) and yields its URL.
* :func:`ensure_apollo_tools` installs ``scripts/apollo`` with ``npm ci`` when its node_modules lack
  ``@apollo/gateway``; :func:`compose_with_apollo` runs ``compose.mjs``.
* Every wait is bounded; failures raise ``RuntimeError`` with the tail of the child's log.
Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
APOLLO = ROOT / "scripts" / "apollo"
SUBGRAPH_NAMES = ("patient", "observation", "medication")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_environment(settings: Settings) -> dict[str, str]:
    """Environment for a child process that shares ``settings``' store and keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIHEALTH_")}
    env.update(
        UNIHEALTH_PROFILE=settings.profile,
        UNIHEALTH_DATA_DIR=str(settings.data_dir),
        UNIHEALTH_DATABASE_URL=settings.database_url,
        UNIHEALTH_SECRET_KEY=settings.secret_key.decode(),
        UNIHEALTH_RELAY="off",
        UNIHEALTH_JWT_ISSUER=settings.jwt_issuer,
        UNIHEALTH_JWT_AUDIENCE=settings.jwt_audience,
    )
    if settings.dev_jwt_key:
        env["UNIHEALTH_DEV_JWT_KEY"] = settings.dev_jwt_key.decode()
    if settings.migration_database_url:
        env["UNIHEALTH_MIGRATION_DATABASE_URL"] = settings.migration_database_url
    if settings.jwks:
        env["UNIHEALTH_JWKS"] = settings.jwks
    return env


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy within {timeout:g} s:\n{_tail(log)}")
        time.sleep(0.1)


@contextmanager
def _process(args: list[str], log: Path, env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            _stop(proc)


@contextmanager
def subgraph_processes(
    settings: Settings, workdir: Path, *, names: tuple[str, ...] = SUBGRAPH_NAMES, timeout: float = 120
) -> Iterator[dict[str, str]]:
    """Each subgraph as its own process; yields {name: graphql URL}."""
    env = child_environment(settings)
    with ExitStack() as stack:
        started = []
        for name in names:
            port = free_port()
            log = workdir / f"subgraph-{name}-{port}.log"
            args = [
                sys.executable,
                "-m",
                "gateway.cli",
                "subgraph",
                name,
                "--port",
                str(port),
                "--log-level",
                "warning",
            ]
            proc = stack.enter_context(_process(args, log, env))
            started.append((name, port, proc, log))
        for _, port, proc, log in started:
            _wait_healthy(proc, f"http://127.0.0.1:{port}/healthz", log, timeout)
        yield {name: f"http://127.0.0.1:{port}/graphql" for name, port, _, _ in started}


def ensure_apollo_tools(timeout: float = 600) -> str:
    """The ``node`` executable, after installing ``scripts/apollo`` if needed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("node and npm are needed for Apollo's gateway (scripts/test.sh installs them)")
    if not (APOLLO / "node_modules" / "@apollo" / "gateway").is_dir():
        out = subprocess.run(
            [npm, "ci", "--prefix", str(APOLLO), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"npm ci failed:\n{out.stderr[-3000:]}")
    return node


def compose_with_apollo(sdls: Mapping[str, str], urls: Mapping[str, str]) -> dict[str, Any]:
    """``compose.mjs``'s answer: {"errors", "hints", "supergraphSdl"}."""
    node = ensure_apollo_tools()
    payload = {"subgraphs": [{"name": n, "url": urls.get(n), "sdl": s} for n, s in sdls.items()]}
    out = subprocess.run(
        [node, str(APOLLO / "compose.mjs")],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"compose.mjs failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _pairs(values: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


@contextmanager
def apollo_gateway(
    workdir: Path,
    *,
    subgraphs: Mapping[str, str] | None = None,
    supergraph: str | None = None,
    override: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[str]:
    """Apollo Gateway on a free loopback port; yields its /graphql URL."""
    node = ensure_apollo_tools()
    port = free_port()
    args = [node, str(APOLLO / "gateway.mjs"), "--port", str(port)]
    if subgraphs is not None:
        args += ["--subgraphs", _pairs(subgraphs)]
    else:
        assert supergraph is not None, "give subgraphs or a supergraph"
        path = workdir / f"supergraph-{port}.graphql"
        path.write_text(supergraph)
        args += ["--supergraph", str(path)]
        if override:
            args += ["--override", _pairs(override)]
    log = workdir / f"apollo-{port}.log"
    env = {**os.environ, "NODE_ENV": "production", "APOLLO_TELEMETRY_DISABLED": "1"}
    with _process(args, log, env) as proc:
        deadline = time.monotonic() + timeout
        while "url" not in _tail(log, 10000):
            if proc.poll() is not None:
                raise RuntimeError(f"Apollo gateway exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Apollo gateway did not start within {timeout:g} s:\n{_tail(log)}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/graphql"


@contextmanager
def gateway_process(
    settings: Settings,
    workdir: Path,
    *,
    subgraphs: Mapping[str, str] | None = None,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    open_store: bool = False,
) -> Iterator[str]:
    """This repository's gateway as its own process (HTTP subgraphs when ``subgraphs`` is given,
    else in-process over ``settings``' store; ``env`` adds ``UNIHEALTH_*`` settings; ``open_store``
    gives a gateway over HTTP subgraphs the store as the edge has it: caller checks, access records,
    the response and entity cache); yields its /graphql URL."""
    port = free_port()
    args = [sys.executable, "-m", "gateway.federation.harness", "serve", "--port", str(port)]
    if subgraphs:
        args += ["--subgraphs", _pairs(subgraphs)]
    if open_store:
        args.append("--open-store")
    log = workdir / f"gateway-{port}.log"
    with _process(args, log, {**child_environment(settings), **(env or {})}) as proc:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/healthz", log, timeout)
        yield f"http://127.0.0.1:{port}/graphql"


def _serve(argv: list[str]) -> None:
    """``python -m gateway.federation.harness serve --port P [--subgraphs name=url,...]``."""
    import uvicorn

    from gateway.graphql_app import create_gateway_app, federation_settings, parse_subgraphs
    from gateway.settings import load_settings

    parser = argparse.ArgumentParser(prog="gateway.federation.harness serve")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--subgraphs", default="")
    parser.add_argument("--open-store", action="store_true", help="open the store over HTTP subgraphs too")
    args = parser.parse_args(argv)
    settings = load_settings()
    config = federation_settings(settings)
    if args.subgraphs:
        from dataclasses import replace

        config = replace(config, subgraphs=parse_subgraphs(args.subgraphs))
    app = create_gateway_app(settings, config=config, open_store=True if args.open_store else None)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "serve":
        sys.exit("usage: python -m gateway.federation.harness serve --port P [--subgraphs name=url,...]")
    _serve(argv[1:])


if __name__ == "__main__":
    main()
