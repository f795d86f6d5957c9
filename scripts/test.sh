#!/usr/bin/env bash
# The whole gate: lint, types, and the test suite on SQLite and a real PostgreSQL (started by the
# tests themselves when UNIHEALTH_TEST_DATABASE_URL is not set; Debian's package is installed if
# missing). Official FHIR example packages are fetched with npm on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
if ! command -v npm >/dev/null 2>&1; then
  echo "npm not found; installing Debian's npm package (needed to fetch the official FHIR examples)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm
fi
"$venv/bin/ruff" check .
"$venv/bin/mypy"
exec "$venv/bin/python" -m pytest "$@"
