#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite: the main run, then the vLLM stage in its
# own virtualenv. Extra arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Debian's Chromium for the web UI test (Playwright drives it: its own browser download cannot work here).
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
fi
# vLLM's CPU builds need AVX2 and F16C (xinf_llama_vision/cpu_features.py); where this CPU lacks
# them, the vLLM stages are skipped with one line and everything else runs.
cpu_rc=0
cpu=$(.venv/bin/python -m xinf_llama_vision.cpu_features) || cpu_rc=$?
if [ "$cpu_rc" = 3 ]; then
  echo "vLLM stages skipped: $cpu"
  .venv/bin/python -m pytest -ra "$@"
  exit
fi
[ "$cpu_rc" = 0 ] || exit "$cpu_rc"
echo "$cpu"
# The vLLM stages' virtualenvs are mostly downloads: build them while the main tests use the CPU.
vllm_log=$(mktemp)
(bash scripts/setup-vllm.sh && bash scripts/setup-vllm.sh --v1) >"$vllm_log" 2>&1 &
vllm_setup=$!
main=0
.venv/bin/python -m pytest -ra "$@" || main=$?
if ! wait "$vllm_setup"; then
  cat "$vllm_log"
  echo "setting up .venv-vllm or .venv-vllm-v1 failed" >&2
  exit 1
fi
tail -n 6 "$vllm_log"
# The vLLM stages, each a real vLLM in its own virtualenv (see docs/vllm.md): vLLM's own Mllama on
# its V0 engine, then this plugin's Mllama on the V1 engine. Both run, whatever the first gives.
v0=0
bash scripts/test-vllm.sh || v0=$?
bash scripts/test-vllm.sh --v1
[ "$v0" = 0 ] || exit "$v0"
exit "$main"
