#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and netloader installed editable. Idempotent:
# a second run costs a second, unless requirements.lock or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.netloader-installed
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing pinned dependencies into .venv" >&2
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.lock
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
  touch "$stamp"
fi
# The registry tests (tests/test_registry.py) start their own redis-server; install it from
# the system's packages when it is missing. Without apt-get or root, those tests skip.
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing redis-server (apt-get) for the registry tests" >&2
    if ! { apt-get update -qq && apt-get install -y -qq redis-server; } >/dev/null 2>&1; then
      echo "setup: note: apt-get could not install redis-server; the registry tests will skip" >&2
    fi
  else
    echo "setup: note: redis-server is not installed (needs apt-get as root); the registry tests will skip" >&2
  fi
fi
