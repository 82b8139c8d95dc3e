#!/usr/bin/env bash
# Set up (if needed), then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
mypy
python -m pytest -q -ra --durations=15 "$@"
