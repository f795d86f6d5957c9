"""The ceiling of ``unihealth bench``: a hello-world Starlette app on the edge's server settings.

Contract
--------
``create_ceiling_app()``
    Builds the app and does no I/O. ``GET /`` answers 200 with the fixed small JSON body
    :data:`BODY` (``application/json``); ``GET /healthz`` answers like the edge's (``{"status":"ok"}``),
    so the bench waits for both the same way. Nothing else is routed.

``main(argv)`` / ``python -m gateway.bench_ceiling --port P [--host H] [--log-level L]``
    Serves the app with exactly the uvicorn settings of ``unihealth serve``: one process, one
    worker, ``access_log=False``, the given ``log_level``, and uvicorn's default loop and HTTP
    implementations (uvloop and httptools with ``uvicorn[standard]``). Blocks until interrupted.

Why: a scenario's RPS as a percentage of this app's RPS, measured in the same run on the same
machine with the same load generator, says how much of the budget the gateway itself spends —
independent of how fast the machine is.
"""

from __future__ import annotations

import argparse
from typing import Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BODY: Final = b'{"resourceType":"Basic","id":"ceiling","code":{"text":"hello, world"}}'
HEALTHY: Final = b'{"status":"ok"}'


async def _hello(request: Request) -> Response:
    return Response(BODY, 200, media_type="application/json")


async def _healthz(request: Request) -> Response:
    return Response(HEALTHY, 200, media_type="application/json")


def create_ceiling_app() -> Starlette:
    """The hello-world app (no I/O, no middleware, two routes)."""
    return Starlette(routes=[Route("/", _hello, methods=["GET"]), Route("/healthz", _healthz, methods=["GET"])])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench_ceiling", description="hello-world Starlette app: the bench's ceiling"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--log-level", default="warning")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Serve :func:`create_ceiling_app` with the settings ``unihealth serve`` uses (see module docstring)."""
    import uvicorn

    args = build_parser().parse_args(argv)
    uvicorn.run(create_ceiling_app(), host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
