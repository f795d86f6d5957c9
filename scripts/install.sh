#!/usr/bin/env bash
# Create the virtualenv and install UniHealth with its pinned dependencies (constraints.txt).
set -euo pipefail
venv="${1:-.venv}"
python="${2:-python3}"
cd "$(dirname "$0")/.."
if ! "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
  echo "UniHealth needs Python 3.11 ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
