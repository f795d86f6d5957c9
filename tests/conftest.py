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
from subgraphs.store.database import Database, open_database

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


RUNTIME_ROLE = "unihealth_runtime"
RELAY_ROLE = "unihealth_relay_login"


@pytest.fixture(scope="session")
def postgres_runtime_url(postgres_url: str) -> str:
    """A login role that is neither superuser nor owner nor BYPASSRLS, member of ``unihealth_app``:
    the app under test connects as it, so row-level security is live in every PostgreSQL test."""
    import asyncio

    import asyncpg

    async def create_roles() -> None:
        conn = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            login = "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE"
            for role, attrs in (
                ("unihealth_app", "NOLOGIN"),
                ("unihealth_relay", "NOLOGIN"),
                (RUNTIME_ROLE, login),
                (RELAY_ROLE, login),
            ):
                exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
                if not exists:
                    await conn.execute(f"CREATE ROLE {role} {attrs}")
            await conn.execute(f"GRANT unihealth_app TO {RUNTIME_ROLE}")
            await conn.execute(f"GRANT unihealth_relay TO {RELAY_ROLE}")
        finally:
            await conn.close()

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop may already run in this thread
        pool.submit(asyncio.run, create_roles()).result()
    user_at = postgres_url.split("://", 1)[1].split("@", 1)
    return f"postgresql+asyncpg://{RUNTIME_ROLE}@{user_at[1]}"


@pytest.fixture(scope="session")
def postgres_relay_url(postgres_runtime_url: str) -> str:
    """A login role in ``unihealth_relay``: reads and marks outbox rows of every facility."""
    return postgres_runtime_url.replace(f"://{RUNTIME_ROLE}@", f"://{RELAY_ROLE}@")


@pytest.fixture(scope="session")
async def relay_database(app: Starlette, backend: str, request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    """The database as the outbox relay sees it: the app's own on SQLite; on PostgreSQL a
    connection as the relay role (the app's runtime role sees one facility per transaction)."""
    if backend != "postgresql":
        yield app.state.backends.db
        return
    db = open_database(request.getfixturevalue("postgres_relay_url"), pool_size=4)
    try:
        yield db
    finally:
        await db.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def settings_for(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
    """``settings_for(backend, **overrides)`` → Settings for that backend (one database per backend)."""
    data_dir = tmp_path_factory.mktemp("data")

    def make(backend: str, **overrides: object) -> Settings:
        if backend == "postgresql":
            url = request.getfixturevalue("postgres_runtime_url")
            overrides.setdefault("migration_database_url", request.getfixturevalue("postgres_url"))
        else:
            url = f"sqlite+aiosqlite:///{data_dir / 'unihealth.db'}"
        overrides.setdefault("relay", "off")  # tests drain the outbox themselves, when and as whom they choose
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
