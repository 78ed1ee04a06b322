"""The GPU benchmark's scripts (bench/gpu) on CPU: their --smoke paths run in a subprocess, write the
JSON the report reads, and the report turns it into gpu.json and gpu.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# about 15 s of CPU time, 40 s of wall time on a busy 2-core machine
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "bench" / "gpu"
OPS = {"tome_merge", "tome_unmerge", "tome_merge_unmerge", "tome_match", "best_match", "sito_select",
       "sito_prune_restore", "toca_gather_scatter"}


def _start(script: str, out: Path, *args: str) -> subprocess.Popen:
    # one thread each: the two run side by side, and tiny ops on a busy machine lose more to threads
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(GPU / script), "--smoke", "--out", str(out), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """Both smoke runs at once, each at its smallest: one width and size, a few steps."""
    d = tmp_path_factory.mktemp("gpu")
    procs = [_start("kernels.py", d / "kernels.json", "--tokens", "64", "--widths", "16"),
             _start("end_to_end.py", d / "end_to_end.json", "--unet-sizes", "64", "--unet-steps", "2",
                    "--dit-size", "64", "--dit-steps", "3")]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-5000:]
    return d


def test_kernels_smoke(outputs):
    rep = json.loads((outputs / "kernels.json").read_text())
    assert {"command", "machine", "kernels", "copy", "rows", "targets", "note"} <= rep.keys()
    assert rep["machine"]["device"] == "cpu" and "reference" in rep["note"]
    assert rep["copy"]["float32"]["bytes_per_s"] > 0
    assert {r["op"] for r in rep["rows"]} == OPS
    for r in rep["rows"]:
        assert {"tokens", "width", "dtype", "bytes", "reference_seconds", "default_seconds", "speedup",
                "reference_bw_fraction", "default_bw_fraction"} <= r.keys(), r
        assert r["tokens"] == 64 and r["width"] == 16 and r["dtype"] == "float32"
        # on CPU both modes run the reference: the same results
        assert r.get("max_abs_diff") == 0.0 or r.get("equal_fraction") == 1.0, r
    assert rep["targets"][0]["met"] is False  # N = 16384 is not in a smoke run


def test_end_to_end_smoke(outputs):
    rep = json.loads((outputs / "end_to_end.json").read_text())
    assert {"machine", "kernels", "matched", "matching_rule", "timing", "commands", "parts"} <= rep.keys()
    assert set(rep["parts"]) == {"unet", "dit"}
    for part in rep["parts"].values():
        assert part["status"] == "done" and not part["notes"], part["notes"]
    rows = [r for p in rep["parts"].values() for r in p["rows"]]
    assert not [r for r in rows if r["error"]], [r["error"] for r in rows if r["error"]]
    for r in rows:
        assert {"family", "size", "steps", "config", "setting", "kernels", "seconds", "speedup", "flops",
                "flop_speedup", "rel_error", "finite"} <= r.keys()
        assert r["seconds"] > 0 and r["flops"] > 0 and r["finite"]
    got = {(r["family"], r["setting"], r["kernels"]) for r in rows}
    for family, settings in (("sd15", ("tome", "todo")), ("pixart", ("fora", "toca", "duca")),
                             ("flux", ("fora", "toca", "duca"))):
        assert (family, "baseline", None) in got
        for s in settings:
            assert {(family, s, "reference"), (family, s, "default")} <= got
    assert ("sd15", "tomesd", None) in got
    assert {("pixart", "dbcache", None), ("flux", "dbcache", None)} <= got
    target = rep["parts"]["unet"]["targets"]
    assert target and all({"target", "ours", "tomesd", "met"} <= t.keys() for t in target)


def test_report(outputs, tmp_path):
    sys.path.insert(0, str(GPU))
    try:
        import report
    finally:
        sys.path.remove(str(GPU))
    steps = tmp_path / "steps.jsonl"
    steps.write_text(json.dumps(dict(name="kernels", command="python bench/gpu/kernels.py", rc=0, seconds=1)) + "\n")
    data, md = report.build(outputs, steps, "bash bench/gpu/run.sh --smoke")
    assert {"command", "machine", "steps", "targets", "kernels", "end_to_end", "calibration"} <= data.keys()
    assert "error" in data["calibration"]  # not run here
    assert len(data["targets"]) == 3
    assert "| tome_merge_unmerge | 64 | 16 | float32 |" in md and "| diffaccel tome ratio=0.5 [kernels=default] |" in md
