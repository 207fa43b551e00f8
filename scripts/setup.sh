#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and netloader installed editable. Idempotent:
# a second run costs a second, unless requirements.lock or pyproject.toml changed. Says
# one line per step it runs, with its time; a step's output (pip's, apt-get's) is shown
# only when it fails (scripts/steps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
step_prefix=setup
source scripts/steps.sh

pip_install() {
  .venv/bin/pip install --disable-pip-version-check "$@"
}

if [ ! -x .venv/bin/python ]; then
  step "virtual environment (.venv, $("$python" --version 2>&1))" "$python" -m venv .venv
fi
stamp=.venv/.netloader-installed
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  step "pinned dependencies (requirements.lock)" pip_install -r requirements.lock
  step "netloader, editable" pip_install --no-deps -e .
  touch "$stamp"
fi
# The registry tests (tests/test_registry.py) start their own redis-server; install it from
# the system's packages when it is missing. Without apt-get or root, those tests skip.
install_redis() {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
}
if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    if ! try_step "redis-server (apt-get), for the registry tests" install_redis; then
      echo "setup: note: without redis-server the registry tests will skip" >&2
    fi
  else
    echo "setup: note: redis-server is not installed (needs apt-get as root); the registry tests will skip" >&2
  fi
fi
