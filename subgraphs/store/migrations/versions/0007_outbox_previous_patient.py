"""The change event names the patient a resource left (issue 5): ``outbox.previous_patient_id``.

An update that moves a resource from one patient's compartment to another's (a corrected
``subject``) must invalidate both patients' cached views; the event is keyed by the new patient
and now also names the old one. Nullable, no backfill: earlier rows moved nothing.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("previous_patient_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox", "previous_patient_id")
