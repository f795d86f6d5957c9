"""The store's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Contract: every table's key starts with ``facility``; no row is ever read without a facility
predicate (the repository adds it to every statement). ``resources`` holds the current version of
each resource (deleted ones as tombstones), ``resource_history`` every version ever written,
``outbox`` one row per change in the same transaction as the change, and the ``idx_*`` tables the
search index of the current version. The Alembic migrations under ``migrations/`` create exactly
this schema on PostgreSQL (a test compares them).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

FACILITY = String(64)
RTYPE = String(64)
RID = String(64)
SEQ = BigInteger().with_variant(Integer, "sqlite")


def _key_columns() -> list[Column[object]]:
    return [
        Column("facility", FACILITY, nullable=False),
        Column("type", RTYPE, nullable=False),
        Column("id", RID, nullable=False),
    ]


resources = Table(
    "resources",
    metadata,
    *_key_columns(),
    Column("version", Integer, nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("content", LargeBinary, nullable=True),
    PrimaryKeyConstraint("facility", "type", "id", name="pk_resources"),
)

resource_history = Table(
    "resource_history",
    metadata,
    *_key_columns(),
    Column("version", Integer, nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("method", String(8), nullable=False),
    Column("content", LargeBinary, nullable=True),
    PrimaryKeyConstraint("facility", "type", "id", "version", name="pk_resource_history"),
    Index("ix_history_type_time", "facility", "type", "last_updated"),
    Index("ix_history_time", "facility", "last_updated"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("seq", SEQ, primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("facility", FACILITY, nullable=False),
    Column("type", RTYPE, nullable=False),
    Column("id", RID, nullable=False),
    Column("version", Integer, nullable=False),
    Column("operation", String(8), nullable=False),
    Column("patient_id", RID, nullable=True),
    Column("previous_patient_id", RID, nullable=True),  # an update that moved the resource: the patient it left
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Column("payload", LargeBinary, nullable=True),  # operation "audit": the access record (JSON)
    Index(
        "ix_outbox_unpublished",
        "seq",
        postgresql_where=text("published_at IS NULL"),
        sqlite_where=text("published_at IS NULL"),
    ),
)


audit_log = Table(
    "audit_log",
    metadata,
    Column("facility", FACILITY, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("recorded", DateTime(timezone=True), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("content", LargeBinary, nullable=False),  # the AuditEvent JSON exactly as hashed
    PrimaryKeyConstraint("facility", "seq", name="pk_audit_log"),
    UniqueConstraint("facility", "event_id", name="uq_audit_log_event"),
)


patient_links = Table(
    "patient_links",
    metadata,
    Column("national_key", String(64), nullable=False),  # HMAC of the national identifier, never the value
    Column("facility", FACILITY, nullable=False),
    Column("patient_id", RID, nullable=False),
    PrimaryKeyConstraint("national_key", "facility", "patient_id", name="pk_patient_links"),
    Index("ix_patient_links_patient", "facility", "patient_id"),
)

btg_sessions = Table(
    "btg_sessions",
    metadata,
    Column("facility", FACILITY, nullable=False),
    Column("id", String(36), nullable=False),
    Column("patient_id", RID, nullable=False),
    Column("subject", String(255), nullable=False),
    Column("reason", String(1000), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("stop_recorded", Boolean, nullable=False),
    Column("reviewed_by", String(255), nullable=True),
    Column("reviewed_at", DateTime(timezone=True), nullable=True),
    Column("review_note", String(1000), nullable=True),
    PrimaryKeyConstraint("facility", "id", name="pk_btg_sessions"),
    Index("ix_btg_sessions_patient", "facility", "patient_id", "subject", "expires_at"),
)


def _index_table(name: str, *columns: Column[object], lookup: tuple[str, ...]) -> Table:
    return Table(
        name,
        metadata,
        *_key_columns(),
        Column("param", String(64), nullable=False),
        *columns,
        Index(f"ix_{name}_res", "facility", "type", "id", "param"),
        Index(f"ix_{name}_lookup", "facility", "type", "param", *lookup),
    )


idx_token = _index_table(
    "idx_token",
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),  # NULL: a text-only value (CodeableConcept.text)
    Column("text", String(255), nullable=True),  # normalized display / text, for :text
    Column("type_system", String(255), nullable=True),  # Identifier.type coding, for :of-type
    Column("type_code", String(255), nullable=True),
    lookup=("code", "system"),
)

idx_reference = _index_table(
    "idx_reference",
    Column("target_type", RTYPE, nullable=True),  # NULL: a logical (identifier-only) or urn: reference
    Column("target_id", RID, nullable=True),
    Column("version", String(64), nullable=True),
    Column("url", String(512), nullable=True),  # absolute / canonical references
    Column("identifier_system", String(255), nullable=True),  # Reference.identifier, for :identifier
    Column("identifier_value", String(255), nullable=True),
    lookup=("target_id", "target_type"),
)
Index(
    "ix_idx_reference_url",
    idx_reference.c.facility,
    idx_reference.c.type,
    idx_reference.c.param,
    idx_reference.c.url,
    postgresql_where=text("url IS NOT NULL"),
    sqlite_where=text("url IS NOT NULL"),
)
Index(
    "ix_idx_reference_identifier",
    idx_reference.c.facility,
    idx_reference.c.type,
    idx_reference.c.param,
    idx_reference.c.identifier_value,
    postgresql_where=text("identifier_value IS NOT NULL"),
    sqlite_where=text("identifier_value IS NOT NULL"),
)

idx_date = _index_table(
    "idx_date",
    Column("low", DateTime(timezone=True), nullable=False),
    Column("high", DateTime(timezone=True), nullable=False),
    lookup=("low", "high"),
)

# Prefix searches compare code points (range predicates, see search.py): binary collation on both
# backends ("C" on PostgreSQL, SQLite's default BINARY), so the lookup index serves them.
PREFIX_TEXT = String(255).with_variant(String(255, collation="C"), "postgresql")
URI_TEXT = String(512).with_variant(String(512, collation="C"), "postgresql")
# Exact decimals on PostgreSQL; SQLite has none (floats there, without SQLAlchemy's Decimal warning).
NUMBER = Numeric().with_variant(Numeric(asdecimal=False), "sqlite")

idx_string = _index_table(
    "idx_string",
    Column("value", PREFIX_TEXT, nullable=False),  # normalized (case- and accent-insensitive)
    Column("exact", String(255), nullable=True),  # as written, for :exact
    lookup=("value",),
)

idx_quantity = _index_table(
    "idx_quantity",
    Column("system", String(255), nullable=True),
    Column("code", String(255), nullable=True),
    Column("unit", String(255), nullable=True),
    Column("low", NUMBER, nullable=True),  # a value v is [v, v]; a Range its ends; NULL = open
    Column("high", NUMBER, nullable=True),
    lookup=("code", "low"),
)

idx_number = _index_table(
    "idx_number",
    Column("low", NUMBER, nullable=True),
    Column("high", NUMBER, nullable=True),
    lookup=("low",),
)

idx_uri = _index_table(
    "idx_uri",
    Column("value", URI_TEXT, nullable=False),
    lookup=("value",),
)

idx_composite = _index_table(
    "idx_composite",
    Column("a_system", String(255), nullable=True),  # first component: token system / reference type
    Column("a_code", String(255), nullable=True),  # token code / reference id
    Column("b_system", String(255), nullable=True),  # second: token or quantity system / reference type
    Column("b_code", String(255), nullable=True),  # token or quantity code / reference id / uri
    Column("b_text", String(255), nullable=True),  # string (normalized)
    Column("b_low_date", DateTime(timezone=True), nullable=True),
    Column("b_high_date", DateTime(timezone=True), nullable=True),
    Column("b_low", NUMBER, nullable=True),  # quantity / number
    Column("b_high", NUMBER, nullable=True),
    lookup=("a_code", "b_code"),
)

# _text / _content (search_text.py): the distinct normalized words of the narrative / of every
# string, one row per resource and param, matched by LIKE within (facility, type, param).
idx_text = _index_table(
    "idx_text",
    Column("value", Text, nullable=False),
    lookup=(),
)

INDEX_TABLES = {
    "token": idx_token,
    "reference": idx_reference,
    "date": idx_date,
    "string": idx_string,
    "quantity": idx_quantity,
    "number": idx_number,
    "uri": idx_uri,
    "composite": idx_composite,
    "text": idx_text,
}
