#!/usr/bin/env bash
# Create .venv and install the pinned requirements:
#   bash scripts/setup.sh        runtime: the app (requirements.txt)
#   bash scripts/setup.sh train  training and evaluation too (requirements-train.txt)
#   bash scripts/setup.sh dev    tests and benchmarks too (requirements-dev.txt)
# Once a mode is installed, its requirement files' sha256 sums are stored in .venv/.requirements-<mode>.sha256;
# while they still match (or those of a larger mode do: dev includes train, which includes runtime), nothing runs:
# no pip, no network. pip itself is upgraded only when the venv is created.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-runtime}
case "$MODE" in
  runtime) COVERING="runtime train dev" ;;
  train) COVERING="train dev" ;;
  dev) COVERING="dev" ;;
  *) echo "usage: bash scripts/setup.sh [train|dev]" >&2; exit 2 ;;
esac

requirement_files() {  # the files that define a mode's environment
  case "$1" in
    runtime) echo requirements.txt ;;
    train) echo requirements.txt requirements-train.txt ;;
    dev) echo requirements.txt requirements-train.txt requirements-dev.txt ;;
  esac
  if [ -f pyproject.toml ]; then echo pyproject.toml; fi
}

sums() {  # "<sha256>  <file>" lines, as sha256sum prints them
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$@"; else shasum -a 256 "$@"; fi
}

stamp() { echo ".venv/.requirements-$1.sha256"; }

if [ -x .venv/bin/python ]; then
  for m in $COVERING; do
    # shellcheck disable=SC2046
    if [ -f "$(stamp "$m")" ] && [ "$(cat "$(stamp "$m")")" = "$(sums $(requirement_files "$m"))" ]; then
      echo "requirements unchanged: nothing to install ($(stamp "$m"))"
      exit 0
    fi
  done
else
  PY=$(command -v python3.11 || command -v python3)
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi

# shellcheck disable=SC2046
STAMP_TEXT=$(sums $(requirement_files "$MODE"))  # before installing: what was installed, should a file change meanwhile
case "$MODE" in
  runtime) .venv/bin/python -m pip install -q -r requirements.txt ;;
  *) .venv/bin/python -m pip install -q -r "requirements-$MODE.txt" ;;
esac
if [ -f pyproject.toml ]; then
  .venv/bin/python -m pip install -q --no-deps -e .
fi
printf '%s\n' "$STAMP_TEXT" > "$(stamp "$MODE")"
echo "installed the $MODE requirements into .venv"
