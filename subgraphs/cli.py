"""``unihealth subgraph patient|observation|medication``: one subgraph as its own ASGI process.

Contract: :func:`add_subgraph_parser` adds the ``subgraph`` sub-command to an ``argparse``
sub-parsers object; running it serves that subgraph's GraphQL at ``http://HOST:PORT/graphql``
(and ``/healthz``, ``/readyz``, ``/metrics``) with uvicorn, logging as
:func:`gateway.observability.logs.setup_logging` says (``UNIHEALTH_LOG_FORMAT``), over the
backends of the ``UNIHEALTH_*`` settings (the same
database as the edge; opened at startup, closed at shutdown). Nothing is imported or opened
until the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .graphql import SUBGRAPHS


def add_subgraph_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``subgraph NAME --host H --port P`` to ``subparsers`` (from ``add_subparsers()``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "subgraph", help="run one GraphQL subgraph (Apollo Federation v2) at /graphql"
    )
    parser.add_argument("name", choices=SUBGRAPHS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--data-dir", default=None, help="overrides UNIHEALTH_DATA_DIR")
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(func=cmd_subgraph)
    return parser


def cmd_subgraph(args: argparse.Namespace) -> None:
    import uvicorn

    from gateway.observability.logs import setup_logging
    from gateway.settings import SettingsError, load_settings

    from .graphql.app import create_standalone_app, schema_for

    try:
        settings = load_settings(None, **({"data_dir": args.data_dir} if args.data_dir else {}))
    except SettingsError as exc:
        sys.exit(f"unihealth subgraph: {exc}")
    service = f"subgraph-{args.name}"
    setup_logging(settings.log_format, args.log_level, service=service)
    app = create_standalone_app(schema_for(args.name), settings, name=service)
    from gateway.federation.transport import SERVER_KEEPALIVE

    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        log_config=None,
        timeout_keep_alive=SERVER_KEEPALIVE,  # gateways pool connections; ours drop idle ones sooner
    )
