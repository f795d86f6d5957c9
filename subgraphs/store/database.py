"""Connections and transactions for the two backends (SQLite embedded, PostgreSQL production).

Contract:
* :class:`Database` owns one SQLAlchemy async engine. ``transaction(write=...)`` yields a connection
  inside one database transaction that commits when the block exits normally and rolls back on
  any exception: the request owns the transaction.
* Writers are serialized per resource: :meth:`Database.lock` takes a transaction-scoped lock on a
  string key (a PostgreSQL advisory lock; on SQLite all writers already hold the one write lock).
* :meth:`Database.create_schema` brings an empty database to the current schema: ``create_all`` on
  SQLite, the Alembic migrations on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .schema import metadata

Dialect = Literal["sqlite", "postgresql"]
MIGRATIONS = Path(__file__).with_name("migrations")


class Database:
    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.dialect: Dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.dialect == "sqlite":
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(url, connect_args={"timeout": 30})
            _configure_sqlite(self.engine)
        else:
            self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False)
        self._write_lock = asyncio.Lock()

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """One transaction; SQLite writers are serialized (``BEGIN IMMEDIATE`` under a lock)."""
        if self.dialect == "sqlite" and write:
            async with self._write_lock, self.engine.connect() as conn:
                conn.sync_connection.info["immediate"] = True  # type: ignore[union-attr]
                async with conn.begin():
                    yield conn
        else:
            async with self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    conn.sync_connection.info["immediate"] = False  # type: ignore[union-attr]
                async with conn.begin():
                    yield conn

    async def lock(self, conn: AsyncConnection, key: str) -> None:
        """Hold a lock on ``key`` until the transaction ends."""
        if self.dialect == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": key})

    async def create_schema(self) -> None:
        if self.dialect == "sqlite":
            async with self.engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
        else:
            async with self.engine.begin() as conn:
                await conn.run_sync(_alembic_upgrade)

    async def dispose(self) -> None:
        await self.engine.dispose()


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


def _configure_sqlite(engine: AsyncEngine) -> None:
    """Let SQLAlchemy, not the driver, open transactions; WAL so readers never block the writer."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("immediate") else "BEGIN")
