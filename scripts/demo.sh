#!/usr/bin/env bash
# Sets everything up, then runs the main job end to end: a server process serving a locally
# built checkpoint, and a client pulling it into memory, verified, with timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
