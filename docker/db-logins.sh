#!/bin/sh
# Create (or update) the PostgreSQL login roles UniHealth's processes connect as, from their URLs:
#   UNIHEALTH_DATABASE_URL        postgresql+asyncpg://LOGIN:PASSWORD@host:port/db -> LOGIN in unihealth_app
#   UNIHEALTH_RELAY_DATABASE_URL  postgresql+asyncpg://LOGIN:PASSWORD@host:port/db -> LOGIN in unihealth_relay
# Runs as the database owner through psql (PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD). Creates
# the group roles NOLOGIN if the migration has not yet (it creates them the same way), so it may run
# before or after `unihealth migrate`. Idempotent: passwords are set on every run (rotation). The
# logins are neither superuser nor owner nor BYPASSRLS, so row-level security applies to them.
# Used by compose.yml (service db-logins) and by the native runner (gateway/topology.py). POSIX sh.
set -eu

psql_bin="${PSQL:-psql}"

# URL -> "LOGIN PASSWORD" (passwords must be URL-safe: letters, digits, '-', '_', '.', '~').
credentials() {
  printf '%s\n' "$1" | sed -n 's|^[a-z+]*://\([A-Za-z0-9_]*\):\([A-Za-z0-9._~-]*\)@.*$|\1 \2|p'
}

login_for() {  # URL VARIABLE-NAME GROUP
  creds=$(credentials "$1")
  if [ -z "$creds" ]; then
    echo "db-logins: $2 must be postgresql+asyncpg://LOGIN:PASSWORD@HOST:PORT/DB with a URL-safe password" >&2
    exit 1
  fi
  set -- $creds "$3"
  "$psql_bin" -v ON_ERROR_STOP=1 -q -X -v login="$1" -v password="$2" -v grp="$3" <<'SQL'
SET client_min_messages = warning;
SELECT format('CREATE ROLE %I NOLOGIN', :'grp') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'grp') \gexec
SELECT format('CREATE ROLE %I', :'login') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'login') \gexec
ALTER ROLE :"login" WITH LOGIN INHERIT NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE PASSWORD :'password';
GRANT :"grp" TO :"login";
SQL
  echo "db-logins: $1 can log in, as a member of $3"
}

: "${UNIHEALTH_DATABASE_URL:?db-logins: set UNIHEALTH_DATABASE_URL (docker/unihealth.env)}"
: "${UNIHEALTH_RELAY_DATABASE_URL:?db-logins: set UNIHEALTH_RELAY_DATABASE_URL (docker/unihealth.env)}"
login_for "$UNIHEALTH_DATABASE_URL" UNIHEALTH_DATABASE_URL unihealth_app
login_for "$UNIHEALTH_RELAY_DATABASE_URL" UNIHEALTH_RELAY_DATABASE_URL unihealth_relay
