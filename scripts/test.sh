#!/usr/bin/env bash
# Set up .venv (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -ra "$@"
# The vLLM stage: a real vLLM in its own virtualenv (see docs/vllm.md).
bash scripts/test-vllm.sh
