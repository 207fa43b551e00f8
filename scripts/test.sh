#!/usr/bin/env bash
# Sets everything up, then runs the linters, the type checker and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks scripts fuzz
.venv/bin/ruff format --check src
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
