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
def test_main_job_prints_speedup_and_fidelity(capsys, smoke_weights):
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


def test_run_reads_saved_accelerations_and_refuses_a_bad_file(tmp_path, capsys):
    from diffaccel import save_config

    path = save_config(tmp_path / "fast.json", ["todo", "fora"], factor=3.0)
    assert main(["run", "--model", "random-sd", "--size", "128", "--steps", "2", "--config", str(path)]) == 0
    table = capsys.readouterr().out
    assert "fast.json" in table and "\ntome " not in table  # the file's row, and no default rows beside it
    (tmp_path / "bad.json").write_text('{"format": "diffaccel.acceleration", "version": 1, "methods": [{"method": "x"}]}')
    with pytest.raises(SystemExit, match=r"--config .*bad.json: .*unknown method 'x'"):
        main(["run", "--model", "random-sd", "--config", str(tmp_path / "bad.json")])


def test_method_arg_parsing():
    assert _method_arg("tome") == "tome"
    assert _method_arg("tome:ratio=0.6,use_rand=false") == {"method": "tome", "ratio": 0.6, "use_rand": False}
    assert _method_arg("todo:mode=max") == {"method": "todo", "mode": "max"}


@pytest.mark.slow
def test_bench_smoke_writes_a_report(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "--arch", "tiny-sd", "--sizes", "256", "--batch", "2", "--repeats", "1", "--warmup", "0",
                 "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    labels = [r["config"] for r in rep["results"]]
    assert labels[0] == "baseline" and any(lbl.startswith("tomesd") for lbl in labels)
    assert all(r["rel_error"] >= 0 for r in rep["results"]) and rep["results"][0]["rel_error"] == 0
    assert main(["bench", "--arch", "tiny-sd", "--sizes", "256", "--batch", "2", "--repeats", "1", "--warmup", "0",
                 "--cfg", "--only", "tome", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["cfg_pairs"] and [r["config"] for r in rep["results"]] == [
        "baseline", "tomesd ratio=0.5", "diffaccel tome ratio=0.5"]
    assert rep["command"].startswith("diffaccel bench --arch tiny-sd")


@pytest.mark.slow
def test_caching_bench_counts_flops_on_meta_and_times_whole_runs(tmp_path):
    out = tmp_path / "c.json"
    assert main(["bench", "--arch", "tiny-pixart", "--flop-steps", "6", "--steps", "6", "--repeats", "1", "--warmup",
                 "0", "--out", str(out)]) == 0
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
    for extra in (["--steps", "5"], ["--steps", "0", "--peers"], ["--steps", "0", "--tokens"]):
        with pytest.raises(SystemExit, match="FLOP counts only"):
            main(["bench", "--arch", "flux-dev", *extra])


@pytest.mark.slow
def test_token_bench_counts_flops_and_times_one_call_per_configuration(tmp_path):
    out = tmp_path / "t.json"
    assert main(["bench", "--arch", "tiny-pixart", "--tokens", "--sizes", "128", "--repeats", "1", "--warmup", "0",
                 "--only", "tome", "todo", "--out", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"baseline", "tome default", "tome ratio=0.6", "tome ratio=0.75", "todo default",
                         "todo factor=3", "todo factor=4"}
    # the tiny model is below the cost model's threshold: the defaults leave it alone, explicit settings act
    assert rows["tome default"]["flops"] == rows["baseline"]["flops"] and rows["tome default"]["rel_error"] == 0
    assert rows["tome ratio=0.75"]["flop_speedup"] > rows["tome ratio=0.6"]["flop_speedup"] > 1.2
    assert rows["todo factor=4"]["flop_speedup"] > 1.2 and rows["todo factor=4"]["rel_error"] > 0


@pytest.mark.slow
def test_peer_bench_runs_ours_beside_cache_dit_and_diffusers_caches(tmp_path):
    out = tmp_path / "p.json"
    assert main(["bench", "--arch", "tiny-flux", "--peers", "--sizes", "128", "--steps", "9", "--out", str(out)]) == 0
    rows = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["baseline"]["rel_error"] == 0 and rows["baseline"]["flop_speedup"] == 1.0
    assert rows["diffaccel fora N=3"]["flop_speedup"] > 2
    # cache-dit's static mask computes steps 0, 3, 6 and the last, its first block every step
    assert 1.3 < rows["cache-dit DBCache static mask 1/3"]["flop_speedup"] < 2.5
    assert all(0 < r["rel_error"] < 1 for k, r in rows.items() if k != "baseline" and r["flop_speedup"] > 1.01)


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
