"""`diffaccel calibrate`: the cost model's constants measured on this device, saved in the user's
cache, read back by `device_cost`, reported by describe(); shipped defaults otherwise."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import diffaccel
from diffaccel import accelerate_pipeline, describe, remove_acceleration
from diffaccel.cli import main
from diffaccel.cost import (
    CALIBRATION_VERSION,
    CalibrationWarning,
    calibration_for,
    device_cost,
    device_name,
    pooling_estimate,
    reduction_estimate,
    reset_calibrations,
    shipped_calibration,
)

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache of its own (the session's stays untouched for the other tests)."""
    monkeypatch.setenv("DIFFACCEL_CACHE_DIR", str(tmp_path))
    reset_calibrations()
    yield tmp_path
    reset_calibrations()


@pytest.fixture(scope="module")
def quick_file(tmp_path_factory):
    """One quick calibration of the CPU, saved in a cache folder of this module."""
    folder = tmp_path_factory.mktemp("calibrated")
    old = os.environ["DIFFACCEL_CACHE_DIR"]
    os.environ["DIFFACCEL_CACHE_DIR"] = str(folder)
    try:
        cal = diffaccel.calibrate("cpu", quick=True)
    finally:
        os.environ["DIFFACCEL_CACHE_DIR"] = old
        reset_calibrations()
    return folder, cal


def _positive(*values):
    return all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def test_calibrate_saves_the_constants_and_device_cost_uses_them(quick_file, monkeypatch):
    folder, cal = quick_file
    assert isinstance(cal, diffaccel.Calibration) and _positive(cal.flops, cal.bandwidth, cal.launch, cal.pool_launch, cal.score)
    assert cal.device == device_name(CPU) and cal.device.startswith("cpu-") and cal.quick and cal.measured
    path = folder / "calibration" / f"{cal.device}.json"
    assert cal.path == str(path) and cal.origin == "user cache"
    data = json.loads(path.read_text())
    assert data["format"] == "diffaccel.calibration" and data["version"] == CALIBRATION_VERSION
    assert data["constants"] == {"flops": cal.flops, "bandwidth": cal.bandwidth, "launch": cal.launch, "score": cal.score,
                                 "pool_launch": cal.pool_launch}
    assert data["torch"] == torch.__version__ and data["date"] and "diffaccel.calibrate(" in data["command"]
    m = data["measurements"]
    assert m["matmul"] and m["attention"] and m["copy"]["bytes"] > 0 and m["tiny_op_seconds"] > 0 and m["device"]["threads"] >= 1
    assert min(cal.launch, cal.pool_launch) >= m["tiny_op_seconds"]
    assert {r["method"] for r in m["token_ops"]} == {"tome", "sito", "todo"}

    monkeypatch.setenv("DIFFACCEL_CACHE_DIR", str(folder))
    reset_calibrations()  # as a new process would: read from the file
    try:
        assert device_cost(CPU) == cal.cost and calibration_for(CPU).origin == "user cache"
        # the fit: the cost model's `costs` side predicts each timed token op with the saved constants
        for row in m["token_ops"]:
            n, x = row["tokens"], torch.empty(2, row["tokens"], row["width"])
            if row["method"] == "todo":  # pooled by 2 per side, before the key/value projections
                est = pooling_estimate(torch.nn.Identity(), x, n, n // 4, 0, before_projection=True)
            else:  # half the tokens reduced, one destination per 2 x 2 cell
                est = reduction_estimate(torch.nn.Identity(), "ff", x, n, n - n // 2, 0, n // 4,
                                         prune=row["method"] == "sito")
            assert est.costs == pytest.approx(row["predicted_seconds"], rel=1e-9) and row["seconds"] > 0
            assert math.isfinite(row["relative_error"])
    finally:
        reset_calibrations()
    # a new process reads it back
    code = "from diffaccel.cost import calibration_for; c = calibration_for('cpu'); print(c.origin, c.flops)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DIFFACCEL_CACHE_DIR": str(folder)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["user", "cache", repr(cal.flops)]


def test_without_a_saved_calibration_the_shipped_default_is_used(cache):
    cal = calibration_for(CPU)
    assert cal.origin == "shipped" and cal == shipped_calibration("cpu") and device_cost(CPU) == cal.cost
    assert cal.measured and not cal.quick and cal.command and cal.date
    assert _positive(cal.flops, cal.bandwidth, cal.launch, cal.pool_launch, cal.score)
    cuda = shipped_calibration("cuda")
    assert _positive(cuda.flops, cuda.bandwidth, cuda.launch, cuda.pool_launch)
    if not cuda.measured:  # until a GPU run replaces it
        assert cuda.source == "estimate" and "built-in CUDA estimate (not measured" in cuda.summary()
    assert calibration_for("meta") == cuda  # other device types: the CUDA row


@pytest.mark.parametrize("content, why", [
    ("{not json", "not valid JSON"),
    (None, "format version 99, this diffaccel reads version 1"),
    ("{}", "not a diffaccel calibration"),
])
def test_a_corrupt_or_foreign_file_warns_and_falls_back(cache, quick_file, content, why):
    _, cal = quick_file
    path = cache / "calibration" / f"{cal.device}.json"
    path.parent.mkdir()
    path.write_text(content if content is not None else json.dumps({**cal.to_dict(), "version": 99}))
    with pytest.warns(CalibrationWarning, match=rf"ignoring the calibration .*{why}.*uses the shipped cpu default"):
        used = calibration_for(CPU)
    assert used == shipped_calibration("cpu") and device_cost(CPU) == used.cost


def test_a_file_with_bad_constants_or_of_another_device_falls_back(cache, quick_file):
    _, cal = quick_file
    path = cache / "calibration" / f"{cal.device}.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**cal.to_dict(), "constants": {**cal.to_dict()["constants"], "flops": -1}}))
    with pytest.warns(CalibrationWarning, match="'flops' must be a positive finite number"):
        assert calibration_for(CPU).origin == "shipped"
    reset_calibrations()
    path.write_text(json.dumps({**cal.to_dict(), "device": "cpu-another-model"}))
    with pytest.warns(CalibrationWarning, match="measured on cpu-another-model"):
        assert calibration_for(CPU).origin == "shipped"


def test_cli_prints_the_json_it_would_ship(cache, capsys):
    assert main(["calibrate", "--quick", "--json", "--no-save"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout is the JSON alone; progress went to stderr
    assert data["format"] == "diffaccel.calibration" and data["device"] == device_name(CPU)
    assert data["command"] == "diffaccel calibrate --quick --json --no-save" and data["measured"] is True
    assert "matmul" in captured.err and "not saved" in captured.err
    assert not (cache / "calibration").exists()
    with pytest.raises(SystemExit, match="cpu or cuda"):
        main(["calibrate", "--device", "meta", "--quick"])


def test_describe_names_the_calibration(cache, quick_file, make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "todo")  # the default: the cost model decides
    shipped = shipped_calibration("cpu")
    d = describe(case.pipe)
    assert d["cost_model"]["origin"] == "shipped" and d["cost_model"]["device"] == shipped.device
    line = str(d).splitlines()[1]
    assert line == f"cost model: shipped cpu default (measured on {shipped.device} {shipped.date[:10]}, " \
                   f"command `{shipped.command}`)"
    json.dumps(d)

    folder, cal = quick_file
    (cache / "calibration").mkdir()
    (cache / "calibration" / f"{cal.device}.json").write_text((folder / "calibration" / f"{cal.device}.json").read_text())
    reset_calibrations()
    line = str(describe(case.pipe)).splitlines()[1]
    assert line == f"cost model: calibration {cal.device} (measured {cal.date[:10]}, quick, user cache)"
    remove_acceleration(case.pipe)

    accelerate_pipeline(case.pipe, "todo", factor=2)  # an explicit strength: no cost model, no line
    d = describe(case.pipe)
    assert d["cost_model"] is None and "cost model: calibration" not in str(d)
    remove_acceleration(case.pipe)


def test_attention_scores_count_where_small_heads_make_softmax_dominate():
    """ToMe at its default on the tiny SD 1.x U-Net's 1024-token self-attention (4 heads of 8 channels):
    measured on this machine kind it is 1.6x faster with ToMe 0.5, and the model agrees only because each
    saved score costs `score` seconds beside its matmul flops; without that term it skips the site."""
    from diffaccel.cost import DeviceCost, reduction_estimate
    from diffaccel.testing import sd1_unet

    attn = sd1_unet().down_blocks[0].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(2, 1024, 32)
    shipped = shipped_calibration("cpu")
    assert shipped.score > 0
    import diffaccel.cost as cost

    flat = DeviceCost(shipped.flops, shipped.bandwidth, shipped.launch, shipped.pool_launch, 0.0)
    saved = dict(cost._COSTS)
    try:
        estimates = []
        for constants in (shipped.cost, flat):
            cost._COSTS[torch.device("cpu")] = constants
            estimates.append(reduction_estimate(attn, "self_attn", x, 1024, 512, 0, 256))
    finally:
        cost._COSTS.clear()
        cost._COSTS.update(saved)
    with_scores, without = estimates
    assert with_scores.worth_it, with_scores.why()
    assert without.saves < with_scores.saves and not without.worth_it, without.why()
