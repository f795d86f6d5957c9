"""``_text`` and ``_content`` search (issue 3): the ``idx_text`` table.

One row per resource and param (``_text``: the narrative's words, ``_content``: the words of every
string), under forced row-level security with the ``facility_isolation`` policy (as 0002), searched
by LIKE within ``(facility, type, param)`` (``subgraphs/store/search_text.py`` says why not full
text). Existing resources get their rows from ``unihealth reindex``.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FACILITY = "facility = current_setting('unihealth.facility', true)"


def upgrade() -> None:
    op.create_table(
        "idx_text",
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_index("ix_idx_text_res", "idx_text", ["facility", "type", "id", "param"], unique=False)
    op.create_index("ix_idx_text_lookup", "idx_text", ["facility", "type", "param"], unique=False)
    op.execute("ALTER TABLE idx_text ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE idx_text FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY facility_isolation ON idx_text USING ({FACILITY}) WITH CHECK ({FACILITY})")


def downgrade() -> None:
    op.drop_table("idx_text")  # drops its indexes and policy
