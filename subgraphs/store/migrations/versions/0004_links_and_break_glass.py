"""Cross-facility patient links (a master patient index) and break-the-glass sessions.

``patient_links`` maps an HMAC of the national patient identifier to each facility's patient id.
It is the one deliberately cross-facility table: any facility may READ it (to find where else a
patient has records — the records themselves stay behind their facility's row-level security and
consent), but rows are written only for the transaction's own facility. ``btg_sessions`` is
facility-keyed like everything else.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FACILITY = "facility = current_setting('unihealth.facility', true)"


def upgrade() -> None:
    op.create_table(
        "patient_links",
        sa.Column("national_key", sa.String(length=64), nullable=False),
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("national_key", "facility", "patient_id", name="pk_patient_links"),
    )
    op.create_index("ix_patient_links_patient", "patient_links", ["facility", "patient_id"])
    op.create_table(
        "btg_sessions",
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stop_recorded", sa.Boolean(), nullable=False),
        sa.Column("reviewed_by", sa.String(length=255), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("review_note", sa.String(length=1000), nullable=True),
        sa.PrimaryKeyConstraint("facility", "id", name="pk_btg_sessions"),
    )
    op.create_index("ix_btg_sessions_patient", "btg_sessions", ["facility", "patient_id", "subject", "expires_at"])
    for table in ("patient_links", "btg_sessions"):
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY facility_isolation ON btg_sessions USING ({FACILITY}) WITH CHECK ({FACILITY})")
    op.execute("CREATE POLICY read_everywhere ON patient_links FOR SELECT USING (true)")
    op.execute(f"CREATE POLICY write_own_facility ON patient_links USING ({FACILITY}) WITH CHECK ({FACILITY})")


def downgrade() -> None:
    op.drop_table("btg_sessions")
    op.drop_table("patient_links")
