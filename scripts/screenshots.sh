#!/usr/bin/env bash
# Refresh the README's screenshots (assets/screenshot.png, assets/screenshot-phone.png) with the real model, in
# Debian's chromium. The tests never write into the repository; this is the command that does, on purpose.
# Arguments go to scripts/screenshots.py (--out-dir DIR, --only desktop|phone).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/chromium.sh
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/python scripts/screenshots.py "$@"
