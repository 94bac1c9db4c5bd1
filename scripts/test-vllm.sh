#!/usr/bin/env bash
# The vLLM stage: set up .venv-vllm (a real vLLM beside Xinference and this plugin; idempotent)
# and run tests/vllm there. Every test must run: a skip fails the stage. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup-vllm.sh
source .venv-vllm/vllm-cpu.env
# The recipe selects vLLM's V0 engine; the plugin's engine class must do that itself.
export VLLM_USE_V1=1
# pyproject's addopts ignore tests/vllm for the main run; here they are the point.
.venv-vllm/bin/python -m pytest -o addopts="--import-mode=importlib" -p no:cacheprovider -ra tests/vllm "$@"
echo "vLLM stage: $(( $(date +%s) - start )) s (setup + tests)"
