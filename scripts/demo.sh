#!/usr/bin/env bash
# Set up .venv (if needed), then run the demo: Xinference + this plugin answering an image question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
