#!/usr/bin/env bash
# Install everything the tests need and run them (lint, then the test suites): the package with its dev
# extra (which brings the demo's) and Chromium for the demo's browser tests; then a ComfyUI core in an
# environment of its own (.venv-comfy) for the node tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
bash scripts/install_browser.sh
.venv/bin/python -m ruff check diffaccel kernels pipelines demo tests tests_comfy comfyui bench
.venv/bin/python -m pytest -q "$@"
bash scripts/install_comfy.sh
.venv-comfy/bin/python -m pytest -q tests_comfy
