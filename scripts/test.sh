#!/usr/bin/env bash
# Set up everything the tests need (venv, dev requirements, Debian chromium for the browser test), lint, and run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/chromium.sh
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
.venv/bin/ruff check .  # lint first (pyproject.toml's [tool.ruff]): a finding fails the run, as a failed test does
exec .venv/bin/python -m pytest -q "$@"
