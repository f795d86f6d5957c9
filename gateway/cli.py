"""The ``unihealth`` command.

Sub-commands: ``serve`` (the edge; ``--demo`` loads deterministic demo data first), ``demo-data``
(write synthetic NDJSON), ``import`` (load NDJSON or Bundles), ``token`` (development tokens),
``subgraph`` (one GraphQL subgraph as its own process), ``audit verify``, ``btg list|review``,
``bench`` (k6 scenarios against the embedded, PostgreSQL and production targets), ``topology up``
(compose.yml's services as plain processes), ``migrate``. Settings come
from ``UNIHEALTH_*`` variables (see :mod:`gateway.settings`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .backends import Backends

T = TypeVar("T")

DEMO_PATIENTS = 40
DEMO_FACILITIES = 2
DEMO_SEED = 42
DEMO_USERS = (("clinician", "fac-001"), ("nurse", "fac-001"), ("auditor", "fac-001"), ("clinician", "fac-002"))


def _demo_dir(data_dir: str | None) -> Path:
    from .settings import load_settings

    return (load_settings().data_dir if data_dir is None else Path(data_dir)) / "demo"


def _settings(**overrides: object) -> Any:
    from .settings import SettingsError, load_settings

    try:
        return load_settings(None, **overrides)
    except SettingsError as exc:
        sys.exit(f"unihealth: {exc}")


def _progress_bar(total: int | None, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=None)


def _with_backends(args: argparse.Namespace, command: str, work: Callable[[Backends], Awaitable[T]]) -> T:
    """Run ``work`` over this install's backends (``--data-dir`` if given), closing them after;
    a client-visible failure ends the command with its message, not a traceback."""
    from subgraphs.store.errors import FhirError

    from .backends import open_backends

    data_dir = getattr(args, "data_dir", None)
    settings = _settings(**({"data_dir": data_dir} if data_dir else {}))

    async def run() -> T:
        backends = await open_backends(settings)
        try:
            return await work(backends)
        finally:
            await backends.close()

    try:
        return asyncio.run(run())
    except FhirError as exc:
        sys.exit(f"unihealth {command}: {exc.diagnostics}")


async def _load_demo(app: Starlette) -> None:
    from . import demo_data
    from .importer import import_file

    backends = app.state.backends
    facility = demo_data.facility_ids(DEMO_FACILITIES)[0]
    async with backends.repository(facility, write=False) as repo:
        loaded = await repo.history("Patient", None, since=None, count=1, before=None)
    if not loaded:
        path = backends.settings.data_dir / "demo.ndjson"
        demo_data.write_ndjson(path, DEMO_PATIENTS, DEMO_FACILITIES, DEMO_SEED)
        count = await import_file(backends, path)
        print(f"loaded {count} demo resources into {backends.settings.data_dir}", file=sys.stderr)
    from .security.tokens import mint

    first = next(r for r in demo_data.generate(1, DEMO_FACILITIES, DEMO_SEED) if r["resourceType"] == "Patient")
    base = f"http://{app.state.host}:{app.state.port}"
    settings = backends.settings
    lines = ["", "UniHealth demo is ready. Tokens for the demo users (valid 12 h):"]
    for role, fac in DEMO_USERS:
        lines.append(f"  {role:<10} {fac}  {mint(settings, facilities=[fac], roles=[role], lifetime=12 * 3600)}")
    token = mint(settings, facilities=[facility], roles=["clinician"], lifetime=12 * 3600)
    lines += [
        "Try:",
        f"  curl -H 'Authorization: Bearer {token}' -H 'X-Facility-Id: {facility}' \\",
        f"       '{base}/fhir/r5/Patient/{first['id']}/summary?encounters=3'",
        "",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import create_app

    overrides: dict[str, object] = {}
    if args.demo:
        overrides["data_dir"] = _demo_dir(args.data_dir)
    elif args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = _settings(**overrides)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        sys.exit("unihealth serve: --ssl-certfile and --ssl-keyfile go together")
    if settings.profile == "production" and not args.ssl_certfile and not settings.allow_plaintext:
        sys.exit(
            "unihealth serve: the production profile serves TLS only (--ssl-certfile/--ssl-keyfile); set "
            "UNIHEALTH_ALLOW_PLAINTEXT=1 only behind a TLS-terminating proxy on a private network"
        )
    from .observability.logs import setup_logging

    setup_logging(settings.log_format, args.log_level, service="edge")  # UNIHEALTH_LOG_FORMAT
    app = create_app(settings, on_startup=_load_demo if args.demo else None)
    app.state.host, app.state.port = args.host, args.port
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=None,  # keep the logging set up above
        access_log=False,  # ours is unihealth.access (gateway/observability/asgi.py)
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_ciphers="ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5",  # with OpenSSL's defaults: TLS 1.2+ only
    )


def cmd_demo_data(args: argparse.Namespace) -> None:
    from . import demo_data

    bar = _progress_bar(None, "res")
    count = demo_data.write_ndjson(args.out, args.patients, args.facilities, args.seed, progress=bar.update)
    bar.close()
    print(f"wrote {count} resources for {args.patients} patients in {args.facilities} facilities to {args.out}")


def cmd_import(args: argparse.Namespace) -> None:
    from .importer import import_file

    unreadable = [name for name in args.files if not Path(name).is_file()]
    if unreadable:
        sys.exit(f"unihealth import: no such file: {', '.join(unreadable)}")

    async def work(backends: Backends) -> int:
        total = 0
        for name in args.files:
            bar = _progress_bar(None, "res")
            try:
                total += await import_file(
                    backends,
                    Path(name),
                    default_facility=args.facility,
                    batch_size=args.batch_size,
                    progress=bar.update,
                )
            finally:
                bar.close()
        return total

    print(f"imported {_with_backends(args, 'import', work)} resources")


def cmd_token(args: argparse.Namespace) -> None:
    from .security.roles import ROLES
    from .security.tokens import mint

    overrides: dict[str, object] = {}
    if args.demo:
        overrides["data_dir"] = _demo_dir(args.data_dir)
    elif args.data_dir:
        overrides["data_dir"] = args.data_dir
    settings = _settings(**overrides)
    unknown = [r for r in args.role if r not in ROLES]
    if unknown:
        sys.exit(f"unihealth token: unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    key = Path(args.private_key).read_text() if args.private_key else None
    try:
        print(
            mint(
                settings,
                facilities=args.facility,
                roles=args.role,
                scopes=args.scope or None,
                patient=args.patient,
                subject=args.subject,
                lifetime=args.lifetime,
                private_key=key,
                kid=args.kid,
                algorithm=args.algorithm,
                purpose_of_use=args.purpose_of_use,
            )
        )
    except ValueError as exc:
        sys.exit(f"unihealth token: {exc}")


def cmd_audit_verify(args: argparse.Namespace) -> None:
    """Verify facilities' audit hash chains; exit 1 naming the first bad record."""
    from streams import audit_chain
    from subgraphs.store.database import open_database

    settings = _settings(**({"data_dir": args.data_dir} if args.data_dir else {}))

    async def run() -> list[audit_chain.Verdict]:
        db = open_database(settings.database_url, keyring=settings.payload_keys)
        try:
            names = args.facility or await audit_chain.facilities(db)
            return [await audit_chain.verify(db, f) for f in names]
        finally:
            await db.dispose()

    verdicts = asyncio.run(run())
    bad = [v for v in verdicts if not v.ok]
    for v in verdicts:
        print(f"{v.facility}: {v.checked} records " + ("intact" if v.ok else f"BROKEN: {v.problem}"))
    if not verdicts:
        print("no audit chains found (with PostgreSQL row-level security, name them with --facility)")
    if bad:
        sys.exit(1)


def cmd_btg(args: argparse.Namespace) -> None:
    """List break-the-glass sessions (recording stops of expired ones) or mark one reviewed."""
    import json

    from .security import break_glass

    async def work(backends: Backends) -> list[dict[str, object]]:
        async with backends.repository(args.facility, write=True) as repo:
            await break_glass.sweep(repo)
            if args.btg_command == "review":
                return [(await break_glass.review(repo, args.id, args.by, args.note)).json()]
            return [s.json() for s in await break_glass.sessions(repo, open_only=args.open)]

    print(json.dumps(_with_backends(args, "btg", work), indent=2))


def cmd_reindex(args: argparse.Namespace) -> None:
    """Re-extract the search index of stored resources (after new search parameters)."""
    from subgraphs.store import engine

    async def work(backends: Backends) -> int:
        total = 0
        for facility in args.facility:
            after = None
            while True:  # bounded transactions
                async with backends.repository(facility, write=True) as repo:
                    count, after = await engine.reindex_step(repo, args.type, after=after, limit=500)
                total += count
                if after is None:
                    break
        return total

    print(f"reindexed {_with_backends(args, 'reindex', work)} resources")


def cmd_reencrypt(args: argparse.Namespace) -> None:
    """Seal every payload of the facilities with their active key (after a key rotation)."""
    from subgraphs.store.reencrypt import reencrypt

    async def work(backends: Backends) -> list[str]:
        keyring = backends.settings.payload_keys
        if keyring is None:
            sys.exit("unihealth reencrypt: UNIHEALTH_PAYLOAD_KEYS is not set")
        lines = []
        for facility in args.facility:
            done = await reencrypt(backends.db, keyring, facility)
            lines.append(f"{facility}: {done.current} current and {done.history} history payloads rewritten")
        return lines

    print("\n".join(_with_backends(args, "reencrypt", work)))


def cmd_migrate(args: argparse.Namespace) -> None:
    async def work(backends: Backends) -> None:
        """Opening the backends brings the schema up to date."""

    _with_backends(args, "migrate", work)
    print("schema is up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unihealth", description="UniHealth FHIR R5 edge gateway")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the edge (FHIR REST at /fhir/r5)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--demo", action="store_true", help="load deterministic demo data first (kept in DATA_DIR/demo)")
    serve.add_argument("--data-dir", default=None, help="overrides UNIHEALTH_DATA_DIR")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--ssl-certfile", default=None)
    serve.add_argument("--ssl-keyfile", default=None)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo-data", help="write deterministic synthetic FHIR R5 data as NDJSON")
    demo.add_argument("--patients", type=int, default=100)
    demo.add_argument("--facilities", type=int, default=2)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--out", required=True)
    demo.set_defaults(func=cmd_demo_data)

    imp = sub.add_parser("import", help="import NDJSON files or Bundles")
    imp.add_argument("files", nargs="+")
    imp.add_argument("--facility", default=None, help="facility for resources without a facility tag")
    imp.add_argument("--batch-size", type=int, default=500)
    imp.add_argument("--data-dir", default=None)
    imp.set_defaults(func=cmd_import)

    tok = sub.add_parser("token", help="mint a development access token")
    tok.add_argument("--facility", action="append", required=True, help="repeat for several facilities")
    tok.add_argument(
        "--role",
        action="append",
        required=True,
        help="clinician, nurse, pharmacist, registrar, auditor, analyst, admin, integration; repeat for several",
    )
    tok.add_argument("--scope", action="append", help="SMART scope; repeat (default user/*.cruds)")
    tok.add_argument("--patient", default=None, help="launch patient for patient/ scopes")
    tok.add_argument("--subject", default=None)
    tok.add_argument("--purpose-of-use", default=None, help="e.g. BTG for break-the-glass")
    tok.add_argument("--lifetime", type=int, default=3600, help="seconds")
    tok.add_argument("--demo", action="store_true", help="sign with the key of the `serve --demo` install")
    tok.add_argument("--data-dir", default=None)
    tok.add_argument("--private-key", default=None, help="PEM file: sign RS256/ES256/ES384 instead of HS256")
    tok.add_argument("--algorithm", default="RS256", help="with --private-key")
    tok.add_argument("--kid", default=None, help="with --private-key")
    tok.set_defaults(func=cmd_token)

    audit = sub.add_parser("audit", help="the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="check the hash chains; names the first altered, removed or moved record"
    )
    verify.add_argument("--facility", action="append", help="repeat; default: every facility the connection sees")
    verify.add_argument("--data-dir", default=None)
    verify.set_defaults(func=cmd_audit_verify)

    btg = sub.add_parser("btg", help="break-the-glass sessions, for privacy officers")
    btg_sub = btg.add_subparsers(dest="btg_command", required=True)
    btg_list = btg_sub.add_parser("list", help="sessions of a facility, newest first")
    btg_list.add_argument("--facility", required=True)
    btg_list.add_argument("--open", action="store_true", help="only sessions not yet stopped")
    btg_list.add_argument("--data-dir", default=None)
    btg_list.set_defaults(func=cmd_btg)
    btg_review = btg_sub.add_parser("review", help="mark a session reviewed")
    btg_review.add_argument("--facility", required=True)
    btg_review.add_argument("--id", required=True)
    btg_review.add_argument("--by", required=True, help="the reviewing privacy officer")
    btg_review.add_argument("--note", default=None)
    btg_review.add_argument("--data-dir", default=None)
    btg_review.set_defaults(func=cmd_btg, open=False)

    from streams.cli import add_streams_parser
    from subgraphs.cli import add_subgraph_parser

    from .bench import add_bench_parser
    from .topology import add_topology_parser

    add_subgraph_parser(sub)
    add_bench_parser(sub)
    add_topology_parser(sub)
    add_streams_parser(sub)

    reindex = sub.add_parser("reindex", help="re-extract the search index of stored resources")
    reindex.add_argument("--facility", action="append", required=True, help="repeat for several facilities")
    reindex.add_argument("--type", default=None, help="only this resource type")
    reindex.add_argument("--data-dir", default=None)
    reindex.set_defaults(func=cmd_reindex)

    migrate = sub.add_parser("migrate", help="create or upgrade the database schema")
    migrate.set_defaults(func=cmd_migrate)

    reencrypt = sub.add_parser(
        "reencrypt", help="rewrite a facility's stored payloads with its active key (UNIHEALTH_PAYLOAD_KEYS)"
    )
    reencrypt.add_argument("--facility", action="append", required=True, help="repeat for several facilities")
    reencrypt.add_argument("--data-dir", default=None)
    reencrypt.set_defaults(func=cmd_reencrypt)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
