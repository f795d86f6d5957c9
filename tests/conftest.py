"""Shared fixtures: one contract suite, run against every backend.

``backend`` is parametrized over ``sqlite`` (the embedded default) and ``postgresql``. PostgreSQL is
real: ``UNIHEALTH_TEST_DATABASE_URL`` if set, else a throw-away server started by
``scripts/postgres.sh`` for this session (installing Debian's package if needed). If it cannot be
had, the PostgreSQL tests fail — they are never skipped.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.security.tokens import mint
from gateway.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = b"test-secret-key-that-is-long-enough-0123456789"
DEV_JWT_KEY = b"test-development-jwt-key-long-enough-0123456789"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = os.environ.get("UNIHEALTH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    out = subprocess.run([str(ROOT / "scripts" / "postgres.sh")], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.fail(f"could not start PostgreSQL for the tests:\n{out.stderr[-2000:]}")
    url, directory = out.stdout.split()
    try:
        yield url
    finally:
        subprocess.run([str(ROOT / "scripts" / "postgres.sh"), "stop", directory], check=False)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def settings_for(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
    """``settings_for(backend, **overrides)`` → Settings for that backend (one database per backend)."""
    data_dir = tmp_path_factory.mktemp("data")

    def make(backend: str, **overrides: object) -> Settings:
        url = (
            request.getfixturevalue("postgres_url")
            if backend == "postgresql"
            else f"sqlite+aiosqlite:///{data_dir / 'unihealth.db'}"
        )
        return load_settings(
            {}, data_dir=data_dir, database_url=url, secret_key=SECRET, dev_jwt_key=DEV_JWT_KEY, **overrides
        )

    return make


@pytest.fixture(scope="session")
async def app(backend: str, settings_for: Any) -> AsyncIterator[Starlette]:
    application = create_app(settings_for(backend))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def facility() -> str:
    """A fresh facility per test: tests never see each other's data."""
    return f"t-{uuid.uuid4().hex[:16]}"


TEST_ROLES = ["admin", "integration", "auditor"]


def token_for(settings: Settings, facilities: list[str], **kwargs: Any) -> str:
    """A development token (HS256, the embedded profile's key) for ``facilities``."""
    kwargs.setdefault("roles", TEST_ROLES)
    return mint(settings, facilities=facilities, **kwargs)


@pytest.fixture
def other_facility(facility: str) -> str:
    """A second facility the test's token may also name: isolation is then the store's job."""
    return facility + "-other"


@pytest.fixture
async def client(app: Starlette, facility: str, other_facility: str) -> AsyncIterator[httpx.AsyncClient]:
    token = token_for(app.state.backends.settings, [facility, other_facility])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver/fhir/r5",
        headers={
            "X-Facility-Id": facility,
            "Content-Type": "application/fhir+json",
            "Authorization": f"Bearer {token}",
        },
        timeout=60,
    ) as c:
        yield c
