#!/usr/bin/env bash
# Run HERE (with network), from anywhere in the repo, before the GPU call: downloads into .whl/ the
# wheels bench/gpu/run.sh installs on the GPU machine (nvidia-h200: Python 3.12, torch, triton,
# transformers, huggingface-hub, safetensors, numpy, Pillow, regex, requests, filelock, pyyaml,
# packaging, zipp already there; no diffusers, tomesd, cache-dit; no network). .whl/ is ignored by git
# (.git/info/exclude) and travels with `carry: [".whl"]`; it counts towards the 64 MiB of the tree.
#
# Then checks every wheel's Requires-Dist (markers for CPython 3.12 on Linux, extras left out) against
# the wheels here and the packages /work/.library/device/KINDS.md lists for the image, and prints the
# total size.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# One version of each: two of one name stop the whole install there.
WHEELS=(
  diffusers==0.42.1          # needs importlib_metadata, filelock, huggingface-hub>=1.32 (1.33 there), numpy,
                             # regex, requests, safetensors>=0.8 (0.8.0 there), Pillow
  importlib_metadata==8.7.0  # the one requirement of diffusers the image lacks (imported only before 3.8;
                             # 8.7 needs zipp alone, later ones lazy-importer too)
  tomesd==0.1.3              # needs torch
  cache-dit==1.5.3           # needs packaging, pyyaml, torch>=2.7.1, diffusers>=0.36, transformers>=4.55.2
)
specs=()
for w in "${WHEELS[@]}"; do case "$w" in *==*) specs+=("$w") ;; esac; done

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${specs[@]}"

"$PY" - <<'EOF'
"""Every requirement of every wheel is met by a wheel here or by the image (KINDS.md's list)."""
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp"""
image = {canonicalize_name(n) for n in IMAGE.split()}
env = dict(default_environment(), python_version="3.12", python_full_version="3.12.3", implementation_name="cpython",
           platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
           platform_machine="x86_64", os_name="posix", extra="")
wheels = sorted(Path(".whl").glob("*.whl"))
here = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
names = [canonicalize_name(w.name.split("-")[0]) for w in wheels]
bad = [n for n in set(names) if names.count(n) > 1]
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue  # an extra, or not for CPython 3.12 on Linux
        name = canonicalize_name(req.name)
        where = "wheel here" if name in here else "image" if name in image else "MISSING"
        print(f"  {w.name.split('-')[0]:<20} needs {str(req):<40} {where}")
        if where == "MISSING":
            missing.append(f"{w.name}: {req}")
total = sum(w.stat().st_size for w in wheels)
print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in .whl/")
if bad or missing:
    sys.exit(f"two versions of {bad}" if bad else "requirements neither here nor in the image: " + "; ".join(missing))
EOF
ls -l .whl
