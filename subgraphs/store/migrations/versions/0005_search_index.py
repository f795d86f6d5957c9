"""The typed search index of the search engine (issue 3, slice 2).

* ``idx_token``: ``code`` becomes nullable (text-only values such as ``CodeableConcept.text``), plus
  ``text`` (normalized display/text, for ``:text``) and the Identifier type coding
  (``type_system``/``type_code``, for ``:of-type``);
* ``idx_reference``: ``target_type``/``target_id`` become nullable (logical and ``urn:``
  references), plus ``version``, ``url`` (absolute and canonical references) and the logical
  ``identifier_system``/``identifier_value`` (``:identifier``), with partial lookup indexes;
* ``idx_string``: ``exact`` (the text as written, for ``:exact``); ``value`` gets the ``C``
  collation so prefix searches (code-point ranges) use the lookup index;
* new facility-keyed tables ``idx_quantity``, ``idx_number``, ``idx_uri``, ``idx_composite``, each
  under forced row-level security with the ``facility_isolation`` policy (as 0002);
* extended planner statistics on the correlated columns of every index table (see STATISTICS).

Existing index rows stay valid; the new columns fill in as resources are written. Run
``unihealth reindex`` once after upgrading a database that already holds resources.

Revision ID: 0005
Revises: 0004 (0004_links_and_break_glass; this file was planned as 0004 and renumbered to avoid two heads)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FACILITY = "facility = current_setting('unihealth.facility', true)"
NEW_TABLES = ("idx_quantity", "idx_number", "idx_uri", "idx_composite")
# The planner multiplies the selectivities of type, param, code and system as if independent;
# they are not (a LOINC code occurs under one or two params of one type), which made it drive
# "Observation?patient=X&code=Y" from the code (thousands of rows) instead of the patient (tens).
# Extended statistics (not part of the declared metadata, so created here only) fix the estimates.
STATISTICS = {
    "st_idx_token": ("idx_token", "type, param, code, system"),
    "st_idx_reference": ("idx_reference", "type, param, target_type"),
    "st_idx_string": ("idx_string", "type, param"),
    "st_idx_date": ("idx_date", "type, param"),
    "st_idx_quantity": ("idx_quantity", "type, param, code, system"),
    "st_idx_number": ("idx_number", "type, param"),
    "st_idx_uri": ("idx_uri", "type, param"),
    "st_idx_composite": ("idx_composite", "type, param, a_code, a_system"),
}


def _key() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
    ]


def _indexes(table: str, *lookup: str) -> None:
    op.create_index(f"ix_{table}_res", table, ["facility", "type", "id", "param"], unique=False)
    op.create_index(f"ix_{table}_lookup", table, ["facility", "type", "param", *lookup], unique=False)


def upgrade() -> None:
    op.alter_column("idx_token", "code", existing_type=sa.String(length=255), nullable=True)
    op.add_column("idx_token", sa.Column("text", sa.String(length=255), nullable=True))
    op.add_column("idx_token", sa.Column("type_system", sa.String(length=255), nullable=True))
    op.add_column("idx_token", sa.Column("type_code", sa.String(length=255), nullable=True))

    op.alter_column("idx_reference", "target_type", existing_type=sa.String(length=64), nullable=True)
    op.alter_column("idx_reference", "target_id", existing_type=sa.String(length=64), nullable=True)
    op.add_column("idx_reference", sa.Column("version", sa.String(length=64), nullable=True))
    op.add_column("idx_reference", sa.Column("url", sa.String(length=512), nullable=True))
    op.add_column("idx_reference", sa.Column("identifier_system", sa.String(length=255), nullable=True))
    op.add_column("idx_reference", sa.Column("identifier_value", sa.String(length=255), nullable=True))
    op.create_index(
        "ix_idx_reference_url",
        "idx_reference",
        ["facility", "type", "param", "url"],
        unique=False,
        postgresql_where=sa.text("url IS NOT NULL"),
        sqlite_where=sa.text("url IS NOT NULL"),
    )
    op.create_index(
        "ix_idx_reference_identifier",
        "idx_reference",
        ["facility", "type", "param", "identifier_value"],
        unique=False,
        postgresql_where=sa.text("identifier_value IS NOT NULL"),
        sqlite_where=sa.text("identifier_value IS NOT NULL"),
    )

    op.alter_column(
        "idx_string",
        "value",
        existing_type=sa.String(length=255),
        type_=sa.String(length=255, collation="C"),
        existing_nullable=False,
    )
    op.add_column("idx_string", sa.Column("exact", sa.String(length=255), nullable=True))

    op.create_table(
        "idx_quantity",
        *_key(),
        sa.Column("system", sa.String(length=255), nullable=True),
        sa.Column("code", sa.String(length=255), nullable=True),
        sa.Column("unit", sa.String(length=255), nullable=True),
        sa.Column("low", sa.Numeric(), nullable=True),
        sa.Column("high", sa.Numeric(), nullable=True),
    )
    _indexes("idx_quantity", "code", "low")
    op.create_table(
        "idx_number",
        *_key(),
        sa.Column("low", sa.Numeric(), nullable=True),
        sa.Column("high", sa.Numeric(), nullable=True),
    )
    _indexes("idx_number", "low")
    op.create_table(
        "idx_uri",
        *_key(),
        sa.Column("value", sa.String(length=512, collation="C"), nullable=False),
    )
    _indexes("idx_uri", "value")
    op.create_table(
        "idx_composite",
        *_key(),
        sa.Column("a_system", sa.String(length=255), nullable=True),
        sa.Column("a_code", sa.String(length=255), nullable=True),
        sa.Column("b_system", sa.String(length=255), nullable=True),
        sa.Column("b_code", sa.String(length=255), nullable=True),
        sa.Column("b_text", sa.String(length=255), nullable=True),
        sa.Column("b_low_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("b_high_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("b_low", sa.Numeric(), nullable=True),
        sa.Column("b_high", sa.Numeric(), nullable=True),
    )
    _indexes("idx_composite", "a_code", "b_code")

    for table in NEW_TABLES:  # the app role gets DML through 0002's default privileges
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY facility_isolation ON {table} USING ({FACILITY}) WITH CHECK ({FACILITY})")
    for name, (table, columns) in STATISTICS.items():
        op.execute(f"CREATE STATISTICS IF NOT EXISTS {name} (dependencies, mcv) ON {columns} FROM {table}")


def downgrade() -> None:
    for name in STATISTICS:
        op.execute(f"DROP STATISTICS IF EXISTS {name}")
    for table in reversed(NEW_TABLES):
        op.drop_table(table)  # drops its indexes and policy
    op.drop_column("idx_string", "exact")
    op.alter_column(
        "idx_string",
        "value",
        existing_type=sa.String(length=255, collation="C"),
        type_=sa.String(length=255),
        existing_nullable=False,
    )
    op.drop_index("ix_idx_reference_identifier", table_name="idx_reference")
    op.drop_index("ix_idx_reference_url", table_name="idx_reference")
    for column in ("identifier_value", "identifier_system", "url", "version"):
        op.drop_column("idx_reference", column)
    # rows without a target cannot satisfy NOT NULL again
    op.execute("DELETE FROM idx_reference WHERE target_type IS NULL OR target_id IS NULL")
    op.alter_column("idx_reference", "target_id", existing_type=sa.String(length=64), nullable=False)
    op.alter_column("idx_reference", "target_type", existing_type=sa.String(length=64), nullable=False)
    for column in ("type_code", "type_system", "text"):
        op.drop_column("idx_token", column)
    op.execute("DELETE FROM idx_token WHERE code IS NULL")
    op.alter_column("idx_token", "code", existing_type=sa.String(length=255), nullable=False)
