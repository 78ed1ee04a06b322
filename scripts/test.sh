#!/usr/bin/env bash
# Install everything the tests need and run them (lint, then the test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/python -m ruff check diffaccel kernels pipelines tests
.venv/bin/python -m pytest -q "$@"
