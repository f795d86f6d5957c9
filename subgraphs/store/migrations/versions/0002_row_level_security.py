"""Row-level security: every facility-keyed table shows a connection only its facility's rows.

The application sets ``unihealth.facility`` with ``set_config(..., is_local => true)`` at the start
of every transaction (see ``PostgresDatabase.transaction``); without it ``current_setting`` is NULL
and no row matches, so a statement that forgot its facility predicate returns nothing instead of
leaking. ``FORCE`` applies the policies to the table owner too; only superusers and
``BYPASSRLS`` roles escape them, and the runtime role must be neither.

Roles (created NOLOGIN when missing; grant them to your login users):
* ``unihealth_app``   — the edge and subgraphs: DML on every table, under the facility policy;
* ``unihealth_relay`` — the outbox relay: reads and marks outbox rows of every facility.

A later migration that adds a facility-keyed table must enable and force RLS and add the same
policy (the default privileges below already grant it to ``unihealth_app``).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLES = ("resources", "resource_history", "outbox", "idx_token", "idx_reference", "idx_date", "idx_string")
FACILITY = "facility = current_setting('unihealth.facility', true)"


def upgrade() -> None:
    for role in ("unihealth_app", "unihealth_relay"):
        op.execute(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
            f"THEN CREATE ROLE {role} NOLOGIN; END IF; END $$"
        )
    op.execute("GRANT USAGE ON SCHEMA public TO unihealth_app, unihealth_relay")
    op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO unihealth_app")
    op.execute("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO unihealth_app")
    op.execute(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO unihealth_app"
    )
    op.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO unihealth_app")
    op.execute("GRANT SELECT, UPDATE ON outbox TO unihealth_relay")
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY facility_isolation ON {table} USING ({FACILITY}) WITH CHECK ({FACILITY})")
    op.execute("CREATE POLICY relay_all_facilities ON outbox TO unihealth_relay USING (true) WITH CHECK (true)")


def downgrade() -> None:
    op.execute("DROP POLICY IF EXISTS relay_all_facilities ON outbox")
    for table in TABLES:
        op.execute(f"DROP POLICY IF EXISTS facility_isolation ON {table}")
        op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
