"""Connections and transactions for the two backends (SQLite embedded, PostgreSQL production).

Contract (:class:`Database`, implemented by :class:`SqliteDatabase` and :class:`PostgresDatabase`):
* ``transaction(write=...)`` yields a :class:`SqlConnection` inside one database transaction that
  commits when the block exits normally and rolls back on any exception: the request owns it.
* ``lock(conn, key)`` holds a transaction-scoped lock on a string key, so writers of the same
  resource (or the same conditional-create query) are serialized.
* ``create_schema()`` brings an empty database to the current schema; ``analyze()`` refreshes
  planner statistics; ``dispose()`` closes every connection.

Embedded SQLite runs statements synchronously in the event-loop thread (the DB-API module from
:func:`sqlite_module`, through SQLAlchemy's pysqlite dialect): a point read costs ~10 µs there against ~200 µs through a
thread-hopping async driver, and SQLite has no network wait worth yielding for. Writers are
serialized by one asyncio lock (held across the transaction's awaits) plus ``BEGIN IMMEDIATE``
against other processes; readers use WAL snapshots and never wait. PostgreSQL uses asyncpg.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, Result
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.base import Executable

from .crypto import Keyring, register
from .schema import metadata

Dialect = Literal["sqlite", "postgresql"]
MIGRATIONS = Path(__file__).with_name("migrations")


class SqlConnection(Protocol):
    """What repositories need of a connection: run one statement inside the open transaction."""

    async def execute(self, statement: Executable, parameters: Any = None) -> Result[Any]: ...


class Database(Protocol):
    dialect: Dialect
    url: str
    keyring: Keyring | None  # seals resource payloads on write (None: plaintext)

    def transaction(
        self, *, write: bool, facility: str | None = None
    ) -> AbstractAsyncContextManager[SqlConnection]: ...

    async def lock(self, conn: SqlConnection, key: str) -> None: ...

    async def create_schema(self) -> None: ...

    async def analyze(self) -> None: ...

    async def dispose(self) -> None: ...


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy ``postgresql+asyncpg://`` URL as the plain ``postgresql://`` DSN asyncpg and
    libpq take (other URLs unchanged)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def open_database(
    url: str, *, pool_size: int = 10, migration_url: str = "", keyring: Keyring | None = None
) -> Database:
    """The database named by ``url`` (``sqlite+aiosqlite:///file`` or ``sqlite:///file``, or
    ``postgresql+asyncpg://...``); connects lazily. ``migration_url`` (PostgreSQL): the schema
    owner's connection for migrations, when the runtime role may not run DDL. ``keyring``: resource
    payloads written through this database are sealed per facility (:mod:`.crypto`), and its keys
    are registered for reading sealed payloads in this process."""
    db: Database
    if url.startswith("sqlite"):
        db = SqliteDatabase(url)
    else:
        db = PostgresDatabase(url, pool_size=pool_size, migration_url=migration_url)
    if keyring is not None:
        register(keyring)
        db.keyring = keyring
    return db


class InlineConnection:
    """A synchronous SQLAlchemy connection behind the async :class:`SqlConnection` interface."""

    def __init__(self, sync_connection: Connection) -> None:
        self.sync_connection = sync_connection

    async def execute(self, statement: Executable, parameters: Any = None) -> Result[Any]:
        return self.sync_connection.execute(statement, parameters)


MIN_SQLITE = (3, 45, 0)
_POOL, _OVERFLOW = 8, 8


def sqlite_module() -> Any:
    """The DB-API module for SQLite: ``pysqlite3`` (bundles a current SQLite) when installed, else
    the stdlib's. SQLite 3.40 (Debian 12's) returns wrong rows for ``id IN (subquery) ORDER BY
    <correlated subquery> LIMIT n`` — our keyset-paged searches — so older libraries are refused."""
    try:
        import pysqlite3.dbapi2 as module  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        import sqlite3 as module
    version = tuple(int(x) for x in module.sqlite_version.split("."))
    if version < MIN_SQLITE:
        raise RuntimeError(
            f"SQLite {module.sqlite_version} is too old (need {'.'.join(map(str, MIN_SQLITE))}+); "
            "install pysqlite3-binary"
        )
    return module


class SqliteDatabase:
    dialect: Dialect = "sqlite"
    keyring: Keyring | None = None

    def __init__(self, url: str) -> None:
        self.url = url
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            f"sqlite:///{path}",
            module=sqlite_module(),
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=_POOL,
            max_overflow=_OVERFLOW,
        )
        _configure_sqlite(self.engine)
        self._write_lock = asyncio.Lock()
        # Connections are taken synchronously on the event loop: never ask the pool for more than it
        # has, or the loop blocks in the pool's wait while the holders cannot run to give one back.
        self._slots = asyncio.Semaphore(_POOL + _OVERFLOW)

    @asynccontextmanager
    async def transaction(self, *, write: bool, facility: str | None = None) -> AsyncIterator[SqlConnection]:
        """``facility`` is not used: SQLite has no row-level security; the predicates do it."""
        if write:
            async with self._write_lock, self._slots:
                with self.engine.connect() as conn:
                    conn.info["immediate"] = True
                    with conn.begin():
                        yield InlineConnection(conn)
        else:
            async with self._slots:
                with self.engine.connect() as conn:
                    conn.info["immediate"] = False
                    with conn.begin():
                        yield InlineConnection(conn)

    async def lock(self, conn: SqlConnection, key: str) -> None:
        """Nothing to do: every SQLite writer already holds the one write lock."""

    async def create_schema(self) -> None:
        async with self._write_lock:
            metadata.create_all(self.engine)

    async def analyze(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA analysis_limit=2000")
            conn.exec_driver_sql("ANALYZE")
            conn.commit()

    async def dispose(self) -> None:
        self.engine.dispose()


class PostgresDatabase:
    dialect: Dialect = "postgresql"
    keyring: Keyring | None = None

    def __init__(self, url: str, *, pool_size: int = 10, migration_url: str = "") -> None:
        self.url = url
        self.migration_url = migration_url or url
        self.engine: AsyncEngine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)

    @asynccontextmanager
    async def transaction(self, *, write: bool, facility: str | None = None) -> AsyncIterator[SqlConnection]:
        """Sets ``unihealth.facility`` for this transaction only, the key of the row-level security
        policies (migration 0002): without it, facility-keyed tables show no rows."""
        async with self.engine.connect() as conn, conn.begin():
            if facility is not None:
                await conn.execute(_SET_FACILITY, {"facility": facility})
            yield conn

    async def lock(self, conn: SqlConnection, key: str) -> None:
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})

    async def create_schema(self) -> None:
        owner = create_async_engine(self.migration_url, poolclass=NullPool)
        try:
            async with owner.begin() as conn:
                await conn.run_sync(_alembic_upgrade)
        finally:
            await owner.dispose()

    async def analyze(self) -> None:
        async with self.engine.connect() as conn:
            await conn.exec_driver_sql("ANALYZE")
            await conn.commit()

    async def dispose(self) -> None:
        await self.engine.dispose()


_SET_FACILITY = text("SELECT set_config('unihealth.facility', :facility, true)")


def alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _alembic_upgrade(connection: Connection) -> None:
    from alembic import command

    command.upgrade(alembic_config(connection), "head")


def _configure_sqlite(engine: Engine) -> None:
    """Let SQLAlchemy, not the driver, open transactions; WAL so readers never block the writer."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("immediate") else "BEGIN")
