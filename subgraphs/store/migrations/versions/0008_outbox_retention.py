"""The relay deletes published outbox rows past their retention (``UNIHEALTH_OUTBOX_RETENTION_HOURS``).

Every access adds an outbox row (its access record), so without a purge the outbox grows with the
request count forever. The relay's role may now delete; its policy already covers every facility.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("GRANT DELETE ON outbox TO unihealth_relay")


def downgrade() -> None:
    op.execute("REVOKE DELETE ON outbox FROM unihealth_relay")
