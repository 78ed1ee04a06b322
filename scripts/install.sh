#!/usr/bin/env bash
# Create .venv (if missing) and install diffaccel into it, torch first (the CPU wheel), then the rest
# under constraints.txt. Optional argument: extras to install, e.g. `dev` or `dev,bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
.venv/bin/python -m pip install -q -c constraints.txt -e "$spec"
