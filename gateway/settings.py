"""Every setting of UniHealth, read from ``UNIHEALTH_*`` environment variables.

Contract: :func:`load_settings` is the only place that reads the environment; nothing is read or
opened at import time. The ``profile`` picks the backends (see :mod:`gateway.backends`):

* ``embedded`` (default) — SQLite file under ``data_dir``, in-process cache and bus; no servers.
* ``production`` — ``database_url`` must name PostgreSQL (``postgresql+asyncpg://...``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

from subgraphs.store.crypto import Keyring, KeyringError, load_keyring

Profile = Literal["embedded", "production"]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    profile: Profile = "embedded"
    data_dir: Path = field(default_factory=lambda: Path.cwd() / ".unihealth")
    database_url: str = ""
    migration_database_url: str = ""  # the schema owner, when the runtime role may not run DDL
    max_body_bytes: int = 10 * 1024 * 1024
    max_json_depth: int = 64
    default_page_size: int = 50
    max_page_size: int = 1000
    secret_key: bytes = b""
    national_id_system: str = "https://unihealth.dev/fhir/sid/national-id"
    payload_keys: Keyring | None = None  # UNIHEALTH_PAYLOAD_KEYS: encrypt payloads per facility
    base_url: str = ""
    jwt_issuer: str = "https://unihealth.local"
    jwt_audience: str = "unihealth"
    jwks: str = ""  # path or https URL of the JWKS that signs access tokens
    dev_jwt_key: bytes = b""  # HS256 key: embedded profile only
    bus: str = "inprocess"  # inprocess | kafka
    kafka_bootstrap: str = ""
    relay: str = "inline"  # inline: this process drains the outbox; off: a separate relay does
    relay_database_url: str = ""  # PostgreSQL: a role in unihealth_relay (sees every facility's outbox)
    outbox_retention_hours: int = 24  # published outbox rows older than this are deleted; 0: kept forever
    audit_linger_ms: int = 250  # in-process sealing: access records wait up to this to be sealed in batches
    cache_url: str = ""  # redis://host:port/db; empty: an in-process LRU cache
    summary_ttl: int = 60
    graphql_cache_ttl: int = 60  # seconds a cached single-patient GraphQL answer lives; 0: no cache
    btg_minutes: int = 60
    btg_roles: tuple[str, ...] = ("clinician",)
    smart_token_endpoint: str = ""
    smart_authorization_endpoint: str = ""
    graphql_subgraphs: str = ""  # UNIHEALTH_SUBGRAPHS: name=url,... (see gateway.graphql_app); empty: in-process
    graphql_supergraph: str = ""  # UNIHEALTH_SUPERGRAPH: a supergraph SDL file (Apollo's composition output)
    graphql_max_depth: int = 12
    graphql_max_cost: int = 5000
    graphql_timeout: float = 30.0  # seconds per subgraph request
    allow_plaintext: bool = False  # UNIHEALTH_ALLOW_PLAINTEXT=1: production without TLS, behind a TLS proxy
    metrics: bool = True  # /metrics and the request-duration histograms (docs/operations.md)
    log_format: str = "text"  # text | json (default json in the production profile)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def outbox_retention(self) -> timedelta | None:
        """How long published outbox rows are kept (``None``: forever); see :meth:`streams.relay.Relay.purge`."""
        return timedelta(hours=self.outbox_retention_hours) if self.outbox_retention_hours else None


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _secret_key(env: Mapping[str, str], data_dir: Path, profile: Profile) -> bytes:
    """The key that signs paging cursors (and, in development, tokens).

    Production must configure ``UNIHEALTH_SECRET_KEY``; the embedded profile generates one per
    install and keeps it in ``data_dir/secret.key`` (mode 0600) so cursors survive restarts.
    """
    raw = env.get("UNIHEALTH_SECRET_KEY", "")
    if raw:
        if len(raw) < 32:
            raise SettingsError("UNIHEALTH_SECRET_KEY must be at least 32 characters")
        return raw.encode()
    if profile == "production":
        raise SettingsError("UNIHEALTH_SECRET_KEY is required in the production profile")
    return _generated(data_dir / "secret.key")


def _dev_jwt_key(env: Mapping[str, str], data_dir: Path, profile: Profile) -> bytes:
    """The HS256 key for development tokens: embedded profile only, generated per install.

    The production profile refuses to start when one is configured: it verifies asymmetric
    tokens (RS256/ES256/ES384) against ``UNIHEALTH_JWKS`` and nothing else.
    """
    raw = env.get("UNIHEALTH_DEV_JWT_KEY", "")
    if profile == "production":
        if raw:
            raise SettingsError("UNIHEALTH_DEV_JWT_KEY (HS256) is refused in production; use UNIHEALTH_JWKS")
        if not env.get("UNIHEALTH_JWKS"):
            raise SettingsError("UNIHEALTH_JWKS is required in the production profile")
        return b""
    if raw:
        if len(raw) < 32:
            raise SettingsError("UNIHEALTH_DEV_JWT_KEY must be at least 32 characters")
        return raw.encode()
    return _generated(data_dir / "dev-jwt.key")


def _generated(path: Path) -> bytes:
    """A random key kept in ``path`` (mode 0600), created on first use."""
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def _payload_keys(env: Mapping[str, str], overrides: Mapping[str, object]) -> Keyring | None:
    """The keyring of ``UNIHEALTH_PAYLOAD_KEYS`` (a JSON file, see :mod:`subgraphs.store.crypto`)."""
    given = overrides.get("payload_keys")
    if isinstance(given, Keyring):
        return given
    path = str(given or env.get("UNIHEALTH_PAYLOAD_KEYS", ""))
    if not path:
        return None
    try:
        return load_keyring(path)
    except KeyringError as exc:
        raise SettingsError(f"UNIHEALTH_PAYLOAD_KEYS: {exc}") from None


def _choice(
    env: Mapping[str, str], overrides: Mapping[str, object], key: str, name: str, allowed: tuple[str, ...]
) -> str:
    value = str(overrides.get(key) or env.get(name, allowed[0]))
    if value not in allowed:
        raise SettingsError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise SettingsError(f"{name} must be on or off, got {raw!r}")


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build :class:`Settings` from ``env`` (default ``os.environ``) plus explicit overrides.

    Raises :class:`SettingsError` with the variable's name on any malformed value.
    """
    env = os.environ if env is None else env
    profile_raw = overrides.get("profile") or env.get("UNIHEALTH_PROFILE", "embedded")
    if profile_raw not in ("embedded", "production"):
        raise SettingsError(f"UNIHEALTH_PROFILE must be embedded or production, got {profile_raw!r}")
    profile: Profile = "production" if profile_raw == "production" else "embedded"
    data_dir = Path(str(overrides.get("data_dir") or env.get("UNIHEALTH_DATA_DIR") or Path.cwd() / ".unihealth"))
    database_url = str(overrides.get("database_url") or env.get("UNIHEALTH_DATABASE_URL", ""))
    if not database_url:
        if profile == "production":
            raise SettingsError("UNIHEALTH_DATABASE_URL is required in the production profile")
        database_url = f"sqlite+aiosqlite:///{data_dir / 'unihealth.db'}"
    if not (database_url.startswith("sqlite+aiosqlite://") or database_url.startswith("postgresql+asyncpg://")):
        raise SettingsError("UNIHEALTH_DATABASE_URL must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
    if profile == "production" and database_url.startswith("sqlite"):
        raise SettingsError("the production profile needs PostgreSQL, not SQLite")
    if (overrides.get("bus") or env.get("UNIHEALTH_BUS")) == "kafka" and not (
        overrides.get("kafka_bootstrap") or env.get("UNIHEALTH_KAFKA_BOOTSTRAP")
    ):
        raise SettingsError("UNIHEALTH_KAFKA_BOOTSTRAP is required when UNIHEALTH_BUS=kafka")
    secret = overrides.get("secret_key")
    dev_key = overrides.get("dev_jwt_key")
    if not isinstance(dev_key, bytes):
        dev_key = _dev_jwt_key(env, data_dir, profile)
    return Settings(
        profile=profile,
        data_dir=data_dir,
        database_url=database_url,
        migration_database_url=str(
            overrides.get("migration_database_url") or env.get("UNIHEALTH_MIGRATION_DATABASE_URL", "")
        ),
        max_body_bytes=_int(env, "UNIHEALTH_MAX_BODY_BYTES", 10 * 1024 * 1024, 1024, 1 << 30),
        max_json_depth=_int(env, "UNIHEALTH_MAX_JSON_DEPTH", 64, 8, 1000),
        default_page_size=_int(env, "UNIHEALTH_DEFAULT_PAGE_SIZE", 50, 1, 1000),
        max_page_size=_int(env, "UNIHEALTH_MAX_PAGE_SIZE", 1000, 1, 10000),
        secret_key=secret if isinstance(secret, bytes) else _secret_key(env, data_dir, profile),
        national_id_system=env.get("UNIHEALTH_NATIONAL_ID_SYSTEM", "https://unihealth.dev/fhir/sid/national-id"),
        payload_keys=_payload_keys(env, overrides),
        base_url=str(overrides.get("base_url") or env.get("UNIHEALTH_BASE_URL", "")).rstrip("/"),
        jwt_issuer=env.get("UNIHEALTH_JWT_ISSUER", "https://unihealth.local"),
        jwt_audience=env.get("UNIHEALTH_JWT_AUDIENCE", "unihealth"),
        jwks=str(overrides.get("jwks") or env.get("UNIHEALTH_JWKS", "")),
        dev_jwt_key=dev_key,
        bus=_choice(env, overrides, "bus", "UNIHEALTH_BUS", ("inprocess", "kafka")),
        kafka_bootstrap=str(overrides.get("kafka_bootstrap") or env.get("UNIHEALTH_KAFKA_BOOTSTRAP", "")),
        relay=_choice(env, overrides, "relay", "UNIHEALTH_RELAY", ("inline", "off")),
        relay_database_url=str(overrides.get("relay_database_url") or env.get("UNIHEALTH_RELAY_DATABASE_URL", "")),
        outbox_retention_hours=_int(env, "UNIHEALTH_OUTBOX_RETENTION_HOURS", 24, 0, 24 * 365),
        audit_linger_ms=_int(env, "UNIHEALTH_AUDIT_LINGER_MS", 250, 0, 10_000),
        cache_url=str(overrides.get("cache_url") or env.get("UNIHEALTH_CACHE_URL", "")),
        summary_ttl=_int(env, "UNIHEALTH_SUMMARY_TTL", 60, 1, 24 * 3600),
        graphql_cache_ttl=_int(env, "UNIHEALTH_GRAPHQL_CACHE_TTL", 60, 0, 24 * 3600),
        btg_minutes=_int(env, "UNIHEALTH_BTG_MINUTES", 60, 1, 24 * 60),
        btg_roles=tuple(r.strip() for r in env.get("UNIHEALTH_BTG_ROLES", "clinician").split(",") if r.strip()),
        smart_token_endpoint=env.get("UNIHEALTH_SMART_TOKEN_ENDPOINT", ""),
        smart_authorization_endpoint=env.get("UNIHEALTH_SMART_AUTHORIZATION_ENDPOINT", ""),
        graphql_subgraphs=str(overrides.get("graphql_subgraphs") or env.get("UNIHEALTH_SUBGRAPHS", "")),
        graphql_supergraph=str(overrides.get("graphql_supergraph") or env.get("UNIHEALTH_SUPERGRAPH", "")),
        graphql_max_depth=_int(env, "UNIHEALTH_GRAPHQL_MAX_DEPTH", 12, 2, 100),
        graphql_max_cost=_int(env, "UNIHEALTH_GRAPHQL_MAX_COST", 5000, 10, 1_000_000),
        graphql_timeout=float(_int(env, "UNIHEALTH_GRAPHQL_TIMEOUT", 30, 1, 600)),
        allow_plaintext=env.get("UNIHEALTH_ALLOW_PLAINTEXT", "") == "1",
        metrics=bool(overrides["metrics"]) if "metrics" in overrides else _switch(env, "UNIHEALTH_METRICS", True),
        log_format=_choice(
            env,
            overrides,
            "log_format",
            "UNIHEALTH_LOG_FORMAT",
            ("json", "text") if profile == "production" else ("text", "json"),
        ),
    )
