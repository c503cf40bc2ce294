#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: ruff, then the whole pytest suite (unit, golden,
# GPU kernels on lavapipe, server) and the browser end-to-end tests in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest tests e2e -q "$@"
