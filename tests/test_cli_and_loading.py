import json
from pathlib import Path

import pytest
import torch

from diffaccel import accelerate_pipeline, describe, load_reference_pipeline, remove_acceleration
from diffaccel.cli import _method_arg, main
from diffaccel.support import MARK_BEGIN, MARK_END, support_table
from diffaccel.testing import default_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("source", ["random default", "reference smoke weights"])
def test_from_pretrained_safetensors_round_trip(source, tmp_path, request):
    from diffusers import StableDiffusionPipeline

    if source == "random default":
        pipe, size = default_pipeline(), 128
    else:
        pipe, size = load_reference_pipeline("unet", path=request.getfixturevalue("smoke_weights")), 256
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, use_safetensors=True, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    outs = []
    for p in (pipe, loaded):
        accelerate_pipeline(p, "tome")
        with torch.no_grad():
            outs.append(p("a large blue square in the center on a yellow background", num_inference_steps=2,
                          height=size, width=size, output_type="pt", generator=torch.Generator().manual_seed(0)).images)
        assert describe(p)["denoisers"][0]["sites"][0]["last_run"]
        remove_acceleration(p)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
def test_main_job_prints_speedup_and_fidelity(capsys, smoke_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # each run writes ./diffaccel-run/
    assert main(["run", "--model", "random-sd", "--size", "128", "--steps", "2", "--methods", "tome",
                 "todo:factor=2,mode=avg"]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "128x128" in out
    assert "speed-up" in out and "PSNR" in out
    assert "tome" in out and "todo:factor=2,mode=avg" in out
    assert main(["run", "--model", "dit", "--weights", str(smoke_weights), "--steps", "3", "--methods", "fora"]) == 0
    out = capsys.readouterr().out
    assert "reference PixArt-style DiT" in out and "256x256" in out and "fora" in out
    # the default: the packaged reference DiT, every caching method beside the token methods
    assert main(["run", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "reference PixArt-style DiT" in out and "256x256" in out
    assert all(f"\n{m} " in out for m in ("tome", "todo", "sito", "fora", "toca", "duca"))
    # 256 tokens of width 128: the cost model leaves ToMe and SiTo out, and the output says so
    for m in ("tome", "sito"):
        assert f"\n{m}: {m} acted on no site in this run: at its default strength the cost model" in out
    assert "todo: todo acted on no site" not in out


def test_run_reads_saved_accelerations_and_refuses_a_bad_file(tmp_path, capsys, monkeypatch):
    from diffaccel import save_config

    monkeypatch.chdir(tmp_path)  # the run writes ./diffaccel-run/
    path = save_config(tmp_path / "fast.json", ["todo", "fora"], factor=3.0)
    assert main(["run", "--model", "random-sd", "--size", "128", "--steps", "2", "--config", str(path)]) == 0
    table = capsys.readouterr().out
    assert "fast.json" in table and "\ntome " not in table  # the file's row, and no default rows beside it
    (tmp_path / "bad.json").write_text('{"format": "diffaccel.acceleration", "version": 1, "methods": [{"method": "x"}]}')
    with pytest.raises(SystemExit, match=r"--config .*bad.json: .*unknown method 'x'"):
        main(["run", "--model", "random-sd", "--config", str(tmp_path / "bad.json")])


def _strict_json(text: str):
    """json.loads that refuses Infinity and NaN, which json.dumps writes but JSON does not have."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_run_out_writes_grid_and_report_without_caption_notices(tmp_path, capfd, monkeypatch):
    from diffusers.utils import logging as dlog
    from PIL import Image
    from transformers.utils import logging as tlog

    from diffaccel.images import PAD

    out = tmp_path / "x"
    dlog.set_verbosity_warning()  # the library default, under which PixArt's clean_caption notices show
    before = (dlog.get_verbosity(), tlog.get_verbosity(), tlog.is_progress_bar_enabled())
    assert main(["run", "--model", "dit", "--size", "128", "--steps", "2", "--batch", "2", "--methods", "fora",
                 "todo:factor=2,mode=avg", "--out", str(out)]) == 0
    printed, err = capfd.readouterr()
    # PixArt's caption cleaning notices (two per call) and the weight-loading bar are gone; the user's
    # logging settings are back
    for noise in ("clean_caption", "Beautiful Soup", "ftfy", "Loading weights"):
        assert noise not in printed + err
    assert (dlog.get_verbosity(), tlog.get_verbosity(), tlog.is_progress_bar_enabled()) == before
    assert f"wrote grid.png and report.json to {out}" in printed and "SSIM" in printed
    grid = Image.open(out / "grid.png")
    grid.verify()
    grid = Image.open(out / "grid.png")
    assert grid.format == "PNG" and grid.width == PAD + 3 * (128 + PAD)  # baseline + 2 methods
    assert 2 * (128 + PAD) < grid.height < 3 * (128 + PAD)  # 2 rows under the captions
    report = _strict_json((out / "report.json").read_text())
    assert report["command"].startswith("diffaccel run --model dit") and report["steps"] == 2
    assert report["size"] == 128 and report["seeds"] == [0, 1] and len(report["prompts"]) == 2
    assert {"torch", "diffusers", "diffaccel", "platform", "threads"} <= set(report["machine"])
    rows = report["rows"]
    assert [r["label"] for r in rows] == ["baseline", "fora", "todo:factor=2,mode=avg"]
    assert rows[0]["psnr"] is None and rows[0]["ssim"] == 1 and rows[0]["rel_error"] == 0
    assert rows[2]["method"][0]["method"] == "todo" and rows[2]["method"][0]["mode"] == "avg"
    assert 10 < rows[2]["psnr"] < 100 and 0 < rows[2]["ssim"] < 1 and rows[2]["rel_error"] > 0
    for r in rows:
        assert r["seconds"] > 0 and r["speedup"] > 0 and isinstance(r["notes"], list)
        assert Image.open(out / r["images"][0]).size == (128, 128)


@pytest.mark.slow
def test_run_writes_to_diffaccel_run_by_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--model", "random-sd", "--size", "64", "--steps", "1", "--methods", "tome"]) == 0
    assert f"wrote grid.png and report.json to {tmp_path / 'diffaccel-run'}" in capsys.readouterr().out
    assert {"grid.png", "report.json", "00_baseline.png", "01_tome.png"} <= {
        p.name for p in (tmp_path / "diffaccel-run").iterdir()}


def test_run_out_is_a_folder(tmp_path):
    with pytest.raises(SystemExit, match="--out is a folder"):
        main(["run", "--model", "random-sd", "--out", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()


def test_image_grid_lays_out_columns_and_rows_under_captions():
    from PIL import ImageChops

    from diffaccel.images import PAD, image_grid, to_pil

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 128, 128, generator=gen), torch.rand(3, 3, 128, 128, generator=gen)
    grid = image_grid([("baseline", a), ("todo:factor=2,mode=avg\n1.85x · 31.9 dB", b)])
    assert grid.width == PAD + 2 * (128 + PAD)
    top = grid.height - 3 * (128 + PAD)  # 3 rows under the captions
    assert top > PAD
    # row k of column j is image k of column j, unchanged
    for j, images in enumerate((a, b)):
        for k in range(3):
            x, y = PAD + j * (128 + PAD), top + k * (128 + PAD)
            assert ImageChops.difference(grid.crop((x, y, x + 128, y + 128)), to_pil(images[k])).getbbox() is None
    # captions are drawn above their columns, and a long label wraps onto more lines
    caption = grid.crop((PAD + 128 + PAD, 0, grid.width, top)).convert("L")
    assert caption.getextrema()[0] < 100
    long = image_grid([("baseline", a), ("duca:aggressive=sublayers,interval=3,ratio=0.75,warmup=2\n1x", b)])
    assert long.height > grid.height and long.width == grid.width
    # at most max_rows rows, and a footer saying so
    capped = image_grid([("baseline", a), ("todo:factor=2,mode=avg\n1.85x · 31.9 dB", b)], max_rows=2)
    assert 2 * (128 + PAD) < capped.height - top < 3 * (128 + PAD)
    with pytest.raises(ValueError, match=r"one shape.*'b' has \(2, 3, 128, 128\)"):
        image_grid([("a", a), ("b", b[:2])])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        image_grid([("a", a[0])])


def test_method_arg_parsing():
    assert _method_arg("tome") == "tome"
    assert _method_arg("tome:ratio=0.6,use_rand=false") == {"method": "tome", "ratio": 0.6, "use_rand": False}
    assert _method_arg("todo:mode=max") == {"method": "todo", "mode": "max"}


def test_readme_support_table_matches_the_code():
    text = (ROOT / "README.md").read_text()
    table = text.split(MARK_BEGIN, 1)[1].split(MARK_END, 1)[0].strip()
    assert table == support_table()


@pytest.mark.slow
def test_reference_command_writes_grid_and_figures(smoke_weights, tmp_path):
    from PIL import Image

    out = tmp_path / "eval.json"
    assert main(["reference", "--kinds", "dit", "--n", "2", "--steps", "2", "--path", str(smoke_weights),
                 "--grid", str(tmp_path / "grid"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["dit"]) == {"trained", "random"} and "unet" not in report
    assert 0 <= report["dit"]["trained"]["caption_following"] <= 1
    grid = Image.open(tmp_path / "grid" / "samples_dit.png")
    assert grid.width > 4 * 2 * 256 and grid.height > 2 * 256  # 4 columns x 2 rows of (truth, image) pairs
