"""The audit trail: outbox rows carry access records; ``audit_log`` holds the hash chains.

``audit_log`` is facility-keyed and under the same forced row-level security as the other tables
(the sealer writes each facility's chain inside that facility's transaction).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FACILITY = "facility = current_setting('unihealth.facility', true)"


def upgrade() -> None:
    op.add_column("outbox", sa.Column("payload", sa.LargeBinary(), nullable=True))
    op.create_table(
        "audit_log",
        sa.Column("facility", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("recorded", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("facility", "seq", name="pk_audit_log"),
        sa.UniqueConstraint("facility", "event_id", name="uq_audit_log_event"),
    )
    op.execute("REVOKE ALL ON audit_log FROM unihealth_app")  # default privileges granted more
    op.execute("GRANT SELECT, INSERT ON audit_log TO unihealth_app")  # append-only for the app
    op.execute("ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE audit_log FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY facility_isolation ON audit_log USING ({FACILITY}) WITH CHECK ({FACILITY})")


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_column("outbox", "payload")
