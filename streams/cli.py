"""``unihealth streams relay`` and ``unihealth streams worker``.

:func:`add_streams_parser` adds the ``streams`` command (with ``relay`` and ``worker``) to the
``unihealth`` sub-command parser; ``python -m streams.cli relay|worker ...`` runs the same
commands directly. Settings come from ``UNIHEALTH_*`` (:func:`gateway.settings.load_settings`);
flags only add what the settings do not name. Nothing is imported or opened until a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _settings(args: argparse.Namespace) -> Any:
    from gateway.settings import SettingsError, load_settings

    overrides: dict[str, object] = {}
    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    try:
        return load_settings(None, **overrides)
    except SettingsError as exc:
        sys.exit(f"unihealth streams: {exc}")


def _logging(settings: Any, level: str, service: str) -> None:
    from gateway.observability.logs import setup_logging

    setup_logging(settings.log_format, level, service=service)


def cmd_relay(args: argparse.Namespace) -> None:
    """Run the outbox relay until SIGTERM/SIGINT."""
    from .relay_service import RelayOptions, main

    settings = _settings(args)
    _logging(settings, args.log_level, "relay")
    options = RelayOptions(
        poll_interval=args.poll_interval,
        batch=args.batch,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
    )
    try:
        main(settings, options)
    except ValueError as exc:
        sys.exit(f"unihealth streams relay: {exc}")


def cmd_bench(args: argparse.Namespace) -> None:
    from gateway.stream_bench import cmd_bench as run_bench

    run_bench(args)


def cmd_worker(args: argparse.Namespace) -> None:
    """Run the Faust worker until SIGTERM/SIGINT."""
    from .worker import AGENTS, WorkerOptions, run_worker

    settings = _settings(args)
    if not settings.kafka_bootstrap:
        sys.exit("unihealth streams worker: set UNIHEALTH_KAFKA_BOOTSTRAP (host:port of the Kafka brokers)")
    agents = frozenset(a.strip() for a in args.agents.split(",") if a.strip())
    if not agents or agents - set(AGENTS):
        sys.exit(f"unihealth streams worker: --agents is a comma-separated subset of {', '.join(AGENTS)}")
    key = b""
    if args.deidentify_key_file:
        key = Path(args.deidentify_key_file).read_bytes().strip()
        if len(key) < 32:
            sys.exit("unihealth streams worker: the de-identification key must be at least 32 bytes")
    options = WorkerOptions(
        bootstrap=settings.kafka_bootstrap,
        group_id=args.group_id,
        agents=agents,
        cache_url=args.cache_url or "",
        deidentify_key=key,
        attempts=args.attempts,
        session_timeout=args.session_timeout,
        commit_interval=args.commit_interval,
        partitions=args.partitions,
        replication=args.replication,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        lag_interval=args.lag_interval,
        log_level=args.log_level,
        log_format=settings.log_format,
    )
    try:
        run_worker(settings, options)
    except ValueError as exc:
        sys.exit(f"unihealth streams worker: {exc}")


def _metrics_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None, help="serve /healthz and /metrics on this port")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"])
    parser.add_argument("--data-dir", default=None, help="overrides UNIHEALTH_DATA_DIR")


def add_commands(sub: Any) -> None:
    """Add ``relay`` and ``worker`` to ``sub`` (an argparse sub-parsers object)."""
    relay = sub.add_parser(
        "relay",
        help="publish the outbox to Kafka (UNIHEALTH_RELAY_DATABASE_URL or UNIHEALTH_DATABASE_URL)",
    )
    relay.add_argument("--poll-interval", type=float, default=0.02, help="seconds between polls of an empty outbox")
    relay.add_argument("--batch", type=int, default=500, help="rows per publish")
    _metrics_flags(relay)
    relay.set_defaults(func=cmd_relay)

    worker = sub.add_parser("worker", help="the Faust worker: audit sealer, cache invalidation, de-identification")
    worker.add_argument("--agents", default="audit,invalidate", help="comma-separated: audit, invalidate, deidentify")
    worker.add_argument("--cache-url", default=None, help="redis://host:port/db: the cache the invalidate agent cleans")
    worker.add_argument("--group-id", default="unihealth-worker", help="Kafka consumer group (the Faust app id)")
    worker.add_argument(
        "--deidentify-key-file", default=None, help="HMAC key for pseudonyms and date shifts (default: derived)"
    )
    worker.add_argument("--attempts", type=int, default=3, help="handler attempts before a record is dead-lettered")
    worker.add_argument("--session-timeout", type=float, default=10.0, help="seconds (Kafka group membership)")
    worker.add_argument("--commit-interval", type=float, default=1.0, help="seconds between offset commits")
    worker.add_argument("--partitions", type=int, default=3, help="partitions of topics the worker creates")
    worker.add_argument("--replication", type=int, default=1, help="replication factor of topics it creates")
    worker.add_argument("--lag-interval", type=float, default=5.0, help="seconds between consumer-lag measurements")
    _metrics_flags(worker)
    worker.set_defaults(func=cmd_worker)

    bench = sub.add_parser(
        "bench", help="write -> invalidated summary latency (Kafka + Faust, and in-process), relay throughput"
    )
    bench.add_argument("--writes", type=int, default=200, help="writes per edge (one at a time)")
    bench.add_argument("--events", type=int, default=20000, help="outbox rows for the relay throughput")
    bench.add_argument("--timeout", type=float, default=10.0, help="seconds a write may take to invalidate")
    bench.add_argument("--postgres-url", default=None, help="an owner's postgresql+asyncpg:// URL to reuse")
    bench.add_argument("--redis-url", default=None, help="a Redis to reuse")
    bench.add_argument("--kafka", default=None, help="a Kafka bootstrap to reuse")
    bench.add_argument("--work-dir", default=None, help="logs and data (default: a new temporary directory)")
    bench.add_argument("--json-out", type=Path, default=None, help="default: bench-results/streams-<UTC time>.json")
    bench.set_defaults(func=cmd_bench)


def add_streams_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``streams relay|worker`` to the ``unihealth`` command's sub-parsers."""
    streams = subparsers.add_parser("streams", help="change streams: the outbox relay and the stream worker")
    add_commands(streams.add_subparsers(dest="streams_command", required=True))
    parser: argparse.ArgumentParser = streams
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m streams.cli", description="UniHealth change streams")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
