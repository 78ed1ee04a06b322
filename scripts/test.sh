#!/usr/bin/env bash
# Install everything the tests need and run them (lint, then the test suite): the package with its dev
# extra (which brings the demo's), and Chromium for the demo's browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
bash scripts/install_browser.sh
.venv/bin/python -m ruff check diffaccel kernels pipelines demo tests
.venv/bin/python -m pytest -q "$@"
