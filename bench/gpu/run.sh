#!/usr/bin/env bash
# The GPU benchmark, one command from the repo root: `bash bench/gpu/run.sh` on the GPU machine
# (wheels in .whl/, see bench/gpu/README.md), or `bash bench/gpu/run.sh --smoke` anywhere (tiny sizes,
# CPU, fp32, into a temporary folder unless OUT is set).
#
# Steps, each under `timeout` with a share of the whole run's limit (GPU_BENCH_LIMIT, default 430 s;
# with the report's 20 s and kill grace, under 8 minutes), so a step that hangs costs only its share:
#   0. install the carried wheels into /tmp/site (no network); make diffaccel importable from the tree
#   a. bench/gpu/kernels.py      token ops, diffaccel.kernels vs the torch reference   -> kernels.json
#   b. bench/gpu/end_to_end.py   U-Net part, then DiT part                            -> end_to_end.json
#   c. python -m diffaccel calibrate --device cuda --json                             -> calibration-cuda.json
#   d. bench/gpu/report.py       everything merged                                    -> gpu.json, gpu.md
# plus command.txt (the command and each step's command) and log.txt (all output), in ${OUT}.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
T0=$(date +%s)
LIMIT=${GPU_BENCH_LIMIT:-430}

if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-$(mktemp -d /tmp/diffaccel-gpu-smoke.XXXXXX)}
  if [ -z "${PYTHON:-}" ]; then [ -x .venv/bin/python ] && PYTHON=$PWD/.venv/bin/python || PYTHON=python3; fi
  SMOKE_FLAG=--smoke
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny ops: threads cost more than they give
else
  OUT=${OUT:-bench/results/gpu}
  PYTHON=${PYTHON:-python3}
  SMOKE_FLAG=
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/diffaccel-gpu-work.XXXXXX)
STEPS="$WORK/steps.jsonl"
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1
# calibrate saves its file here, not in the user's cache (the cost model of the later steps is unchanged)
export DIFFACCEL_CACHE_DIR="$WORK/cache"

{
  echo "bash bench/gpu/run.sh $*"
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (with uncommitted changes)'), python: $PYTHON, OUT: $OUT"
  echo "# steps, run from the repo root:"
} >"$OUT/command.txt"

elapsed() { echo $(($(date +%s) - T0)); }
# budget MAX LATER: MAX seconds, or fewer when the steps after this one need LATER seconds of what is left
budget() {
  local left=$((LIMIT - $(elapsed) - $2))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
# step NAME SECONDS CMD...: run CMD under timeout, record its rc and time
step() {
  local name=$1 secs=$2
  shift 2
  local s0
  s0=$(date +%s)
  local shown=${SHOW:-$*}
  echo "$shown" >>"$OUT/command.txt"
  if [ "$secs" -lt 10 ]; then
    echo "== $name: skipped, ${secs}s left of the ${LIMIT}s limit"
    printf '{"name": "%s", "command": "%s", "rc": "skipped", "seconds": 0}\n' "$name" "${shown//\"/\\\"}" >>"$STEPS"
    return
  fi
  echo "== $name (at most ${secs}s, $(elapsed)s into the run): $shown"
  timeout -k 5 "$secs" "$@"
  local rc=$?
  echo "== $name: rc $rc after $(($(date +%s) - s0))s"
  printf '{"name": "%s", "command": "%s", "rc": %d, "seconds": %d}\n' "$name" "${shown//\"/\\\"}" "$rc" \
    "$(($(date +%s) - s0))" >>"$STEPS"
}

# -- 0. wheels and the package ----------------------------------------------------------------------
if [ "$SMOKE" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  step install 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# diffaccel from this tree: installed (editable here), else a folder that maps the subpackages
# pyproject.toml's package-dir puts elsewhere (kernels/ is diffaccel.kernels) by symbolic links.
# (Checked from $WORK: in the repo root `import diffaccel` finds the bare folder diffaccel/ first.)
if [ -n "${GPU_BENCH_STAGE:-}" ] || ! (cd "$WORK" && timeout 60 "$PYTHON" -c "import diffaccel.kernels" >/dev/null 2>&1); then
  "$PYTHON" - "$WORK/src" <<'EOF'
import os, sys, tomllib
from pathlib import Path
root, dest = Path.cwd(), Path(sys.argv[1]) / "diffaccel"
dest.mkdir(parents=True)
for entry in (root / "diffaccel").iterdir():
    if entry.name != "__pycache__":
        os.symlink(entry, dest / entry.name)
cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
for pkg, folder in cfg.items():
    parts = pkg.split(".")
    if parts[0] == "diffaccel" and len(parts) == 2 and not (dest / parts[1]).exists():
        os.symlink(root / folder, dest / parts[1])
print(f"diffaccel staged at {dest} (links into {root})")
EOF
  export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"
fi
(cd "$WORK" && timeout 60 "$PYTHON" -c "import torch, diffaccel, diffaccel.kernels as k; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available(), '| diffaccel', diffaccel.__file__, '| kernels', k.__file__)") || echo "diffaccel does not import"

# -- a. token ops ----------------------------------------------------------------------------------
T=$(budget 110 250)
# (KERNEL_ARGS, UNET_ARGS, DIT_ARGS: extra options for a rerun, e.g. DIT_ARGS="--flux-blocks 10 19")
# shellcheck disable=SC2086
step kernels "$T" "$PYTHON" bench/gpu/kernels.py $SMOKE_FLAG --budget $((T - 15)) --out "$OUT/kernels.json" \
  ${KERNEL_ARGS:-}

# -- b. end to end (two parts: one hanging leaves the other) ----------------------------------------
T=$(budget 110 175)
# shellcheck disable=SC2086
step end_to_end-unet "$T" "$PYTHON" bench/gpu/end_to_end.py $SMOKE_FLAG --part unet --budget $((T - 15)) \
  --out "$OUT/end_to_end.json" ${UNET_ARGS:-}
T=$(budget 200 75)
# shellcheck disable=SC2086
step end_to_end-dit "$T" "$PYTHON" bench/gpu/end_to_end.py $SMOKE_FLAG --part dit --budget $((T - 15)) \
  --out "$OUT/end_to_end.json" ${DIT_ARGS:-}

# -- c. calibration (run from $WORK, where `python -m diffaccel` finds the installed or staged package) --
if [ "$SMOKE" = 1 ]; then
  CAL=("$PYTHON" -m diffaccel calibrate --device cpu --quick --no-save --json)
else
  CAL=("$PYTHON" -m diffaccel calibrate --device cuda --json)
fi
T=$(budget 60 15)
SHOW="${CAL[*]} > $OUT/calibration-cuda.json" \
  step calibrate "$T" bash -c 'cd "'"$WORK"'" && "$@" >"'"$OUT"'/calibration-cuda.json"' calibrate "${CAL[@]}"

# -- d. report -------------------------------------------------------------------------------------
step report 20 "$PYTHON" bench/gpu/report.py --dir "$OUT" --steps "$STEPS" \
  --command "bash bench/gpu/run.sh${1:+ $*}"
rm -f "$OUT"/*.tmp  # a JSON file half written when its step was killed (the last complete one stays)
echo "done in $(elapsed)s; files in $OUT:"
ls -l "$OUT"
exec >&- 2>&-
wait "$TEE" 2>/dev/null
exit 0
