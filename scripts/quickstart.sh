#!/usr/bin/env bash
# Set up (if needed) and run the CPU quickstart sweep on the built-in demo: no GPU, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
simpo-sweep validate search_spaces/quickstart.yaml
simpo-sweep run search_spaces/quickstart.yaml "$@"
