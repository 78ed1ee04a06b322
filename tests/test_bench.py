"""`diffaccel bench`: the suites as subcommands, the fidelity harness on the reference pipelines at test
size (record schema, metrics of identical and degraded outputs, missing peers, plots), the report."""

import json
import math
import sys

import pytest
import torch

from diffaccel.bench import report
from diffaccel.cli import main
from diffaccel.metrics import fidelity, ms_ssim_per_image, psnr, psnr_per_image, ssim_per_image

ROW_KEYS = {"label", "family", "method", "strength", "status", "reason", "seconds", "seconds_all", "speedup",
            "baseline_seconds", "flops_per_image", "flop_speedup", "denoiser_flops_per_image", "denoiser_flop_speedup",
            "peak_memory_bytes", "psnr", "ssim", "ms_ssim", "rel_error", "identical", "caption_following", "notes"}


def strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_of_identical_and_degraded_images():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 64, 64, generator=gen)
    same = fidelity(a, a.clone())
    assert same["psnr"] == math.inf and same["ssim"] == 1.0 and same["ms_ssim"] == 1.0
    assert same["rel_error"] == 0
    noise = torch.randn(a.shape, generator=gen)
    mild, strong = (a + 0.02 * noise).clamp(0, 1), (a + 0.2 * noise).clamp(0, 1)
    f_mild, f_strong = fidelity(mild, a), fidelity(strong, a)
    assert math.isfinite(f_mild["psnr"]) and f_mild["psnr"] > f_strong["psnr"] + 10
    assert 1 > f_mild["ssim"] > f_strong["ssim"] and 1 > f_mild["ms_ssim"] > f_strong["ms_ssim"]
    # PSNR as its definition gives it, image by image
    mse = ((mild - a) ** 2).flatten(1).mean(1)
    assert psnr_per_image(mild, a) == pytest.approx((10 * torch.log10(1 / mse)).tolist())
    assert psnr(mild, a) == pytest.approx(float((10 * torch.log10(1 / mse)).mean()))
    # an identical image among different ones does not make the mean infinite
    mixed = torch.cat([a[:1], mild[1:]])
    assert psnr_per_image(mixed, a)[0] == math.inf and math.isfinite(psnr(mixed, a))
    assert len(ssim_per_image(a, a)) == 3
    assert ms_ssim_per_image(a[..., :8, :8], a[..., :8, :8]) is None  # smaller than the window: not defined
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(a, a[:2])


def test_pareto_front_and_goal():
    assert report.pareto_front([(1, 30), (2, 25), (1.5, 20), (3, 10), (0.5, 40), (2, 24)]) == [
        (0.5, 40), (1, 30), (2, 25), (3, 10)]

    def row(label, family, speedup, value):
        return {"label": label, "family": family, "method": label.split()[0], "status": "ok", "speedup": speedup,
                "psnr": value}

    record = {"rows": [row("baseline", "baseline", 1.0, math.inf), row("fora N=2", "diffaccel", 1.8, 30.0),
                       row("fora N=3", "diffaccel", 2.5, 27.0), row("peer a", "cache-dit", 1.5, 28.0),
                       row("peer b", "diffusers", 2.4, 28.0), row("peer c", "diffusers", 3.0, 20.0)]}
    g = report.goal(record)
    assert g["peers"] == 3 and g["peers_beaten"] == 1 and g["met"] is False
    checks = {c["peer"]: c for c in g["checks"]}
    assert checks["peer a"]["met"] and checks["peer a"]["ours"] == "fora N=2"  # the best of ours at >= 1.5x
    assert not checks["peer b"]["met"] and checks["peer b"]["ours"] == "fora N=3"  # 27 dB < 28 dB
    assert not checks["peer c"]["met"] and checks["peer c"]["ours"] is None  # nothing of ours is as fast
    # a setting of ours identical to the baseline (PSNR stored as null) counts as infinite, not a crash
    same = {**row("fora adaptive", "diffaccel", 3.5, None), "identical": True}
    g = report.goal({"rows": [*record["rows"], same]}, "speedup")
    assert g["met"] is True and {c["ours"] for c in g["checks"]} == {"fora adaptive"}


@pytest.fixture(scope="module")
def fidelity_run(tmp_path_factory):
    """One small fidelity run on the reference DiT: two of our methods at three strengths, a setting
    that acts nowhere (warm-up past the last step), and the U-Net peers' rows missing on a DiT."""
    out = tmp_path_factory.mktemp("bench") / "dit.json"
    argv = ["bench", "fidelity", "--model", "dit", "--captions", "2", "--steps", "4", "--flop-captions", "1",
            "--warmup", "0", "--baseline-every", "3", "--quiet", "--out", str(out)]
    assert main([*argv, "--methods", "fora", "todo", "--no-composed", "--no-peers"]) == 0
    return out, strict_json(out.read_text())


@pytest.mark.slow
def test_fidelity_record_schema_and_figures(fidelity_run):
    out, rec = fidelity_run
    assert rec["suite"] == "fidelity" and rec["command"].startswith("diffaccel bench fidelity --model dit")
    assert (rec["model"], rec["kind"], rec["reference"], rec["prompts"], rec["steps"], rec["size"]) == (
        "dit", "dit", True, 2, 4, 256)
    assert rec["machine"]["device"] == "cpu" and rec["versions"]["torch"] == torch.__version__
    labels = [r["label"] for r in rec["rows"]]
    assert labels == ["baseline", "fora N=2", "fora N=3", "fora N=4", "todo factor=2", "todo factor=3",
                      "todo factor=4"]
    for r in rec["rows"]:
        assert ROW_KEYS <= set(r) | {"caption_following"}, set(ROW_KEYS) - set(r)
        assert r["status"] == "ok" and r["seconds"] > 0 and r["speedup"] > 0
    base = rec["rows"][0]
    # the baseline: identical to itself (PSNR written as null beside "identical"), reproduced after every setting
    assert base["psnr"] is None and base["identical"] and base["ssim"] == 1.0 and base["reproduced"]
    assert len(base["seconds_all"]) == 3  # first, after 3 settings, and at the end
    rows = {r["label"]: r for r in rec["rows"]}
    # caching skips denoiser calls: fewer denoiser FLOPs, an output that differs, by more the longer the interval
    assert rows["fora N=2"]["denoiser_flop_speedup"] > 1.2 and not rows["fora N=2"]["identical"]
    assert rows["fora N=2"]["psnr"] > rows["fora N=4"]["psnr"] > 10  # 4 steps: N=2 computes 0, 2, 3; N=4 0, 3
    assert 0 < rows["fora N=3"]["ssim"] < 1 and 0 < rows["fora N=3"]["ms_ssim"] < 1
    assert 0 <= rows["fora N=3"]["caption_following"] <= 1
    assert rows["todo factor=4"]["denoiser_flop_speedup"] > 1.0
    # the goal needs peers: none here
    assert rec["goal"]["peers"] == 0 and rec["goal"]["met"] is None


@pytest.mark.slow
def test_fidelity_writes_markdown_and_png_plots(fidelity_run, tmp_path):
    from PIL import Image

    out, rec = fidelity_run
    md = out.with_suffix(".md").read_text()
    assert "| fora N=3 | diffaccel |" in md and "PSNR dB" in md and "caption following" in md
    for name in ("dit_psnr.png", "dit_caption.png"):
        png = out.with_name(name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()
    # `bench report` draws them again from the record, elsewhere
    again = tmp_path / "again.json"
    assert main(["bench", "report", str(out), "--out", str(again)]) == 0
    assert again.with_suffix(".md").read_text() == md and again.with_name("again_psnr.png").exists()
    assert report.load(again)["rows"][0]["psnr"] == math.inf


@pytest.mark.slow
def test_a_setting_that_acts_nowhere_scores_identical(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "fidelity", "--model", "dit", "--captions", "1", "--steps", "3", "--flop-captions", "1",
                 "--warmup", "0", "--quiet", "--no-peers", "--specs", "fora:warmup=10", "todo:factor=100", "--out",
                 str(out)]) == 0
    rows = strict_json(out.read_text())["rows"]
    row = rows[1]
    assert row["label"] == "fora:warmup=10" and row["identical"] and row["psnr"] is None and row["ssim"] == 1.0
    assert row["denoiser_flop_speedup"] == 1.0
    # a setting that cannot be installed is a row saying why, and the run goes on
    assert rows[2]["label"] == "todo:factor=100" and rows[2]["status"] == "failed" and "factor" in rows[2]["reason"]
    assert not out.with_suffix(".partial.json").exists()  # kept only while the run goes on


def test_missing_peer_is_a_row_saying_why(monkeypatch):
    from diffaccel.bench import fidelity

    monkeypatch.setitem(sys.modules, "tomesd", None)  # import tomesd now fails
    rows = fidelity.peer_settings("unet", 20, None)
    tomesd = [r for r in rows if r.family == "tomesd"]
    assert tomesd and all(r.unavailable and "tomesd" in r.unavailable for r in tomesd)
    row = fidelity.measure(tomesd[0], None, [], None)
    assert row["status"] == "unavailable" and "pip install" in row["reason"]
    md = report.markdown({"model": "unet", "kind": "unet", "prompts": 1, "steps": 1, "size": 8, "dtype": "float32",
                          "command": "x", "rows": [{"label": "baseline", "family": "baseline", "status": "ok"}, row]})
    assert f"- {row['label']} — unavailable: " in md


def test_bench_refuses_bad_input():
    with pytest.raises(SystemExit):
        main(["bench"])  # a suite is required
    with pytest.raises(SystemExit, match="no strengths listed for method 'nope'"):
        main(["bench", "fidelity", "--methods", "nope", "--no-peers", "--captions", "1"])


@pytest.mark.slow
def test_unet_suite_smoke_writes_a_report(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "unet", "--arch", "tiny-sd", "--sizes", "256", "--batch", "2", "--repeats", "1", "--warmup",
                 "0", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    labels = [r["config"] for r in rep["results"]]
    assert labels[0] == "baseline" and any(lbl.startswith("tomesd") for lbl in labels)
    assert all(r["rel_error"] >= 0 for r in rep["results"]) and rep["results"][0]["rel_error"] == 0
    assert main(["bench", "unet", "--arch", "tiny-sd", "--sizes", "256", "--batch", "2", "--repeats", "1", "--warmup",
                 "0", "--cfg", "--only", "tome", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["cfg_pairs"] and [r["config"] for r in rep["results"]] == [
        "baseline", "tomesd ratio=0.5", "diffaccel tome ratio=0.5"]
    assert rep["command"].startswith("diffaccel bench unet --arch tiny-sd")


@pytest.mark.slow
def test_caching_suite_counts_flops_on_meta_and_times_whole_runs(tmp_path):
    out = tmp_path / "c.json"
    assert main(["bench", "caching", "--arch", "tiny-pixart", "--flop-steps", "6", "--steps", "6", "--repeats", "1",
                 "--warmup", "0", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    flops = rep["flops"]["6"]
    assert flops["baseline"]["speedup"] == 1.0
    assert flops["fora N=3"]["speedup"] > 1.5 and flops["toca N=3 R=0.3"]["speedup"] > 1.0
    assert flops["toca idle (warmup >= steps)"]["flops"] == flops["baseline"]["flops"]
    rows = {r["config"]: r for r in rep["latency"]}
    assert rows["baseline"]["rel_error_last_step"] == 0 and rows["fora N=3"]["flop_speedup"] > 1.5
    assert rows["toca idle (warmup >= steps)"]["rel_error_last_step"] == 0


def test_full_depth_flux_is_for_flop_counts_only():
    from diffaccel.bench import caching_arch

    with torch.device("meta"):
        model, inputs = caching_arch("flux-dev")
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (19, 38)
    assert inputs(1, 0, 50, "meta")["hidden_states"].shape == (1, 64 * 64, 64)  # 1024 px
    for argv in (["caching", "--arch", "flux-dev", "--steps", "5"], ["flux-peers", "--arch", "flux-dev"],
                 ["tokens", "--arch", "flux-dev"]):
        with pytest.raises(SystemExit, match="FLOP counts only"):
            main(["bench", *argv])


@pytest.mark.slow
def test_tokens_suite_counts_flops_and_times_one_call_per_configuration(tmp_path):
    out = tmp_path / "t.json"
    assert main(["bench", "tokens", "--arch", "tiny-pixart", "--sizes", "128", "--repeats", "1", "--warmup", "0",
                 "--only", "tome", "todo", "--out", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"baseline", "tome default", "tome ratio=0.6", "tome ratio=0.75", "todo default",
                         "todo factor=3", "todo factor=4"}
    # the tiny model is below the cost model's threshold: the defaults leave it alone, explicit settings act
    assert rows["tome default"]["flops"] == rows["baseline"]["flops"] and rows["tome default"]["rel_error"] == 0
    assert rows["tome ratio=0.75"]["flop_speedup"] > rows["tome ratio=0.6"]["flop_speedup"] > 1.2
    assert rows["todo factor=4"]["flop_speedup"] > 1.2 and rows["todo factor=4"]["rel_error"] > 0


@pytest.mark.slow
def test_flux_peers_suite_runs_ours_beside_cache_dit_and_diffusers_caches(tmp_path):
    out = tmp_path / "p.json"
    assert main(["bench", "flux-peers", "--arch", "tiny-flux", "--size", "128", "--steps", "9", "--out", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["baseline"]["rel_error"] == 0 and rows["baseline"]["flop_speedup"] == 1.0
    assert rows["diffaccel fora N=3"]["flop_speedup"] > 2
    # cache-dit's static mask computes steps 0, 3, 6 and the last, its first block every step
    assert 1.3 < rows["cache-dit DBCache static mask 1/3"]["flop_speedup"] < 2.5
    assert all(0 < r["rel_error"] < 1 for k, r in rows.items() if k != "baseline" and r["flop_speedup"] > 1.01)
