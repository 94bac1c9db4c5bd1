#!/usr/bin/env bash
# The vLLM stage: set up .venv-vllm (a real vLLM beside Xinference and this plugin; idempotent)
# and run tests/vllm there. Every test must run: a skip fails the stage. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup-vllm.sh
source .venv-vllm/vllm-cpu.env
# pyproject's addopts ignore tests/vllm for the main run; here they are the point.
.venv-vllm/bin/python -m pytest -o addopts="--import-mode=importlib" -p no:cacheprovider -ra tests/vllm "$@"
echo "vLLM stage: $(( $(date +%s) - start )) s (setup + tests)"
