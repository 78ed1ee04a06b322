"""Scaling out: `diffaccel generate` sharded over two processes with accelerate (every prompt once, the
manifest complete, a killed run resumed without duplicates, failures recorded, bad prompt files
refused), and the methods under diffusers' context parallelism on two gloo processes: FORA,
TaylorSeer (static, forecast, adaptive), ToDo, ToCa and DuCa give what one process gives, ToMe and
SiTo (and what is not done under it) are refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from diffaccel.cli import main
from diffaccel.generate import MANIFEST, PromptFileError, read_prompts, read_records, save_output

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--model", "random-sd", "--size", "64", "--steps", "2"]  # the SD-architecture default: fast at 64 px
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _launch(args: list[str], port: int, **kw) -> subprocess.Popen:
    """`accelerate launch` of two processes running `python -m diffaccel generate ...` (on a machine
    without GPUs accelerate's launcher starts several processes with --multi_gpu; they use gloo)."""
    cmd = LAUNCH + ["--main_process_port", str(port), "-m", "diffaccel", "generate"] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def _prompts(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"a small red circle number {i}\n" for i in range(n)))
    return path


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# -- the prompt file -------------------------------------------------------------------------------------


def test_a_txt_file_is_text_even_when_a_line_starts_with_a_brace(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("{curly} braces in a prompt\n")
    assert [p.prompt for p in read_prompts(path)] == ["{curly} braces in a prompt"]


def test_text_and_jsonl_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n\n  a blue square  \n")
    prompts = read_prompts(text, seed=10, size=(64, 96), negative_prompt="blurry")
    assert [(p.id, p.prompt, p.seed, p.height, p.width, p.negative_prompt, p.line) for p in prompts] == [
        ("000000", "a red circle", 10, 64, 96, "blurry", 1), ("000001", "a blue square", 11, 64, 96, "blurry", 3)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 7, "size": 32}\n{"prompt": "b", "id": "cat-1", "size": [16, 48]}\n'
                     '{"prompt": "c", "height": 24, "negative_prompt": "dark"}\n')
    a, b, c = read_prompts(jsonl, seed=100, size=(64, 64))
    assert (a.id, a.seed, a.height, a.width) == ("000000", 7, 32, 32)
    assert (b.id, b.seed, b.height, b.width) == ("cat-1", 101, 16, 48)
    assert (c.seed, c.height, c.width, c.negative_prompt) == (102, 24, 64, "dark")


BAD_FILES = {
    "empty": ("\n\n", "no prompts"),
    "json": ('{"prompt": "a"}\n{"prompt": "b"\n', "line 2: not valid JSON"),
    "unknown key": ('{"prompt": "a", "steps": 3}\n', "unknown keys ['steps']; allowed: ['prompt', 'id', 'seed'"),
    "no prompt": ('{"seed": 1}\n', "line 1: 'prompt' is a non-empty string"),
    "seed": ('{"prompt": "a", "seed": -1}\n', "'seed' is an int from 0"),
    "size": ('{"prompt": "a", "size": [64]}\n', "'size' is an int or [height, width]"),
    "size and height": ('{"prompt": "a", "size": 64, "height": 32}\n', "give 'size' or 'height'/'width'"),
    "duplicate id": ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', "line 2: id 'x' is also on line 1"),
    "ids alike but for case": ('{"prompt": "a", "id": "Cat"}\n{"prompt": "b", "id": "cat"}\n',
                               "line 2: id 'cat' is also on line 1 as 'Cat'"),
    "id": ('{"prompt": "a", "id": "../x"}\n', "'id' names the output files"),
    "not an object": ('{"prompt": "a"}\n[1, 2]\n', "line 2: each line is a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_prompt_file_is_refused_before_anything_runs(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompts", str(path), *GEN, "--out", str(out)])
    assert message in str(e.value) and str(path) in str(e.value)
    assert not out.exists()  # nothing loaded, nothing written


def test_missing_prompt_file_and_bad_options(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no such file"):
        main(["generate", "--prompts", str(tmp_path / "nope.txt"), *GEN, "--out", str(out)])
    prompts = _prompts(tmp_path, 2)
    with pytest.raises(SystemExit, match="--method: unknown method 'nope'"):
        main(["generate", "--prompts", str(prompts), "--method", "nope", *GEN, "--out", str(out)])
    with pytest.raises(SystemExit, match="give --method or --config, not both"):
        main(["generate", "--prompts", str(prompts), "--method", "fora", "--config", "a.json", *GEN, "--out", str(out)])
    with pytest.raises(PromptFileError, match="a folder"):
        read_prompts(tmp_path)
    assert not out.exists()


# -- one process -------------------------------------------------------------------------------------------


def test_failed_prompt_is_recorded_the_rest_go_on_and_a_rerun_retries_it(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": "two", "size": 60}\n{"prompt": "three", "negative_prompt": "x"}\n')
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(path), *GEN, "--method", "fora", "--out", str(out)]) == 1
    rows = _manifest(out)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "divisible by 8" in rows[1]["error"] and rows[1]["error"].startswith("ValueError")
    assert rows[0]["acceleration"]["methods"][0]["method"] == "fora" and rows[2]["negative_prompt"] == "x"
    assert all((out / f).is_file() for r in rows if r["status"] == "ok" for f in r["files"])
    printed = capsys.readouterr().out
    assert "generated 2 images" in printed and "1 failed" in printed and "images/s" in printed
    # the failed prompt fixed: only it runs again
    path.write_text('{"prompt": "one"}\n{"prompt": "two", "size": 64}\n{"prompt": "three", "negative_prompt": "x"}\n')
    assert main(["generate", "--prompts", str(path), *GEN, "--method", "fora", "--out", str(out)]) == 0
    assert "generated 1 image in" in capsys.readouterr().out
    assert [r["status"] for r in _manifest(out)] == ["ok"] * 3
    assert [r["id"] for r in read_records(out)] == ["000000", "000001", "000002", "000001"]


def test_other_settings_into_the_same_folder_are_refused(tmp_path):
    prompts, out = _prompts(tmp_path, 2), tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(SystemExit, match="other settings .differing: acceleration"):
        main(["generate", "--prompts", str(prompts), *GEN, "--method", "fora", "--out", str(out)])
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_line_cut_short_by_a_kill_is_generated_again(tmp_path):
    prompts, out = _prompts(tmp_path, 3), tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 0
    part = next(out.glob("manifest.part-*.jsonl"))
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # the last record half-written
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 0
    assert [r["status"] for r in _manifest(out)] == ["ok"] * 3
    assert [r["id"] for r in read_records(out)] == ["000000", "000001", "000002"]


def test_a_saved_pipeline_folder_and_a_saved_acceleration(tmp_path):
    """--model reads a from_pretrained folder (safetensors), --config a saved acceleration: the same images
    as the embedded pipeline with the same method, and the config in every record."""
    from diffaccel import save_config
    from diffaccel.testing import default_pipeline

    folder = tmp_path / "pipe"
    default_pipeline().save_pretrained(folder, safe_serialization=True)
    config = save_config(tmp_path / "acc.json", "fora", interval=2)
    prompts = _prompts(tmp_path, 2)
    common = ["--size", "64", "--steps", "3", "--prompts", str(prompts)]
    assert main(["generate", *common, "--model", str(folder), "--config", str(config), "--out",
                 str(tmp_path / "a")]) == 0
    assert main(["generate", *common, "--model", "random-sd", "--method", "fora:interval=2", "--out",
                 str(tmp_path / "b")]) == 0
    rows = _manifest(tmp_path / "a")
    assert [r["acceleration"] for r in rows] == [json.loads(config.read_text())] * 2
    assert rows[0]["model"] == str(folder)
    for r in rows:
        assert np.array_equal(_pixels(tmp_path / "a" / r["files"][0]), _pixels(tmp_path / "b" / r["files"][0]))


def test_video_output_is_written_as_frames(tmp_path):
    class Output:
        frames = [[np.full((8, 8, 3), 0.5, dtype=np.float32), np.zeros((8, 8, 3), dtype=np.float32)]]

    files = save_output(Output(), tmp_path, "clip")
    assert files == ["frames/clip/0000.png", "frames/clip/0001.png"]
    assert _pixels(tmp_path / files[0]).max() == 128 and _pixels(tmp_path / files[1]).max() == 0


# -- two processes -----------------------------------------------------------------------------------------


def test_two_processes_generate_every_prompt_exactly_once(tmp_path):
    prompts = _prompts(tmp_path, 7)
    out = tmp_path / "two"
    printed = _finish(_launch(["--prompts", str(prompts), *GEN, "--method", "fora", "--out", str(out)], 29611))
    assert "generated 7 images" in printed and "on 2 processes" in printed and "images/s" in printed
    parts = sorted(out.glob("manifest.part-*.jsonl"))
    assert [p.name for p in parts] == ["manifest.part-00000.jsonl", "manifest.part-00001.jsonl"]
    ids = [[json.loads(line)["id"] for line in p.read_text().splitlines()] for p in parts]
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == [f"{i:06d}" for i in range(7)]
    rows = _manifest(out)
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(7)] and {r["status"] for r in rows} == {"ok"}
    assert {r["num_processes"] for r in rows} == {2} and {r["process"] for r in rows} == {0, 1}
    # the same images as one process makes (with the same threads): the split changes only who makes them
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "diffaccel", "generate", "--prompts", str(prompts), *GEN, "--method", "fora",
                    "--out", str(one)], cwd=ROOT, env=_env(), check=True, capture_output=True)
    for r in rows:
        assert np.array_equal(_pixels(out / r["files"][0]), _pixels(one / r["files"][0])), r["id"]


def test_a_killed_two_process_run_resumes_without_duplicates(tmp_path):
    n = 12
    prompts, out = _prompts(tmp_path, n), tmp_path / "out"
    slow = ["--model", "random-sd", "--size", "64", "--steps", "25"]
    proc = _launch(["--prompts", str(prompts), *slow, "--out", str(out)], 29612)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len([r for r in read_records(out) if r["status"] == "ok"]) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    # every process of the run at once, mid-prompt (torchrun starts its workers in sessions of their own)
    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    proc.communicate()
    first = {r["id"] for r in read_records(out) if r["status"] == "ok"}
    assert 3 <= len(first) < n, "the run was to be killed part-way"
    assert not (out / MANIFEST).exists()  # the merge had not run: the parts are the record
    printed = _finish(_launch(["--prompts", str(prompts), *slow, "--out", str(out)], 29613))
    assert f"{len(first)} finished before" in printed and f"generated {n - len(first)} images" in printed
    records = read_records(out)
    ok = [r["id"] for r in records if r["status"] == "ok"]
    assert sorted(ok) == [f"{i:06d}" for i in range(n)]  # each prompt finished exactly once over both runs
    rows = _manifest(out)
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(n)] and {r["status"] for r in rows} == {"ok"}
    assert all((out / r["files"][0]).is_file() for r in rows)


# -- context parallelism -----------------------------------------------------------------------------------


def _gloo() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not _gloo(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_methods_under_diffusers_context_parallelism(tmp_path, family):
    result = tmp_path / "result"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29620 + len(family)), str(ROOT / "tests" / "cp_worker.py"), family, str(result)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in (0, 1)]
    for res in ranks:
        assert res["world"] == 2
        for label, run in res["runs"].items():
            assert run["max_diff"] < 1e-5, (label, run["max_diff"])  # as on one process
            if label != "baseline":
                assert run["acted"] > 1e-3, label  # and the method did act
        for adaptive in (res["runs"]["fora_adaptive"], res["runs"]["todo_adaptive_cfg"]):
            kinds = [d["decision"] for d in adaptive["decisions"].values()]
            assert "cached" in kinds and kinds.count("compute") >= 2
            assert [d["decision"] for d in adaptive["single_decisions"].values()] == kinds
            for step, d in adaptive["decisions"].items():
                single = adaptive["single_decisions"][step]["change"]
                assert (d["change"] is None) == (single is None)
                assert single is None or abs(d["change"] - single) < 1e-5
        for label, refused in res["refused"].items():
            name = label.split("_")[0]
            assert refused["message"] and refused["message"].startswith(f"{name} cannot run on a denoiser with "
                                                                        "diffusers' context parallelism"), label
            assert "these run: duca, fora, taylorseer, toca, todo (" in refused["message"], label
            assert refused["unchanged"], label
        assert "'entropy' score is not done" in res["refused"]["toca_entropy"]["message"]
        assert "forecasting is not done" in res["refused"]["toca_forecast"]["message"]
        assert res["ring_todo"] and res["ring_todo"].startswith("todo, toca cannot run") and "ring attention" in \
            res["ring_todo"] and "these run: fora, taylorseer (" in res["ring_todo"]
        assert res["ring_fora"]  # caching does not depend on how attention exchanges the slices
        assert "context parallelism: 2 processes (Ulysses 2 x ring 1)" in res["describe"]
        uneven = res["uneven"]
        assert uneven["fora"] is None and all("unequal length" in uneven[n] for n in ("todo", "toca", "duca"))
        assert res["compiled"] and res["compiled"].startswith("todo cannot run") and "torch.compile" in res["compiled"]
        assert "fora" not in res["compiled"].split(". Under")[0]  # caching runs compiled
        assert "these run: fora, taylorseer (" in res["compiled"]
        assert res["refused_at_call"] and "tome cannot run" in res["refused_at_call"]
        assert res["enabled_after"] < 1e-5  # ToCa accelerated first, parallelism enabled after: as one process
        assert "remove_acceleration(pipe)" in res["refused_at_call"]
    # every process measured the whole sequence's change: the same figures, not its own slice's
    for label in ("fora_adaptive", "todo_adaptive_cfg"):
        assert ranks[0]["runs"][label]["decisions"] == ranks[1]["runs"][label]["decisions"]


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("slices", [2, 4])
def test_pooled_attention_on_gathered_slices_equals_one_process(text_first, slices):
    """What Ulysses gathers (each process's [text, image] slice, one after another) pools to what the
    whole sequence pools to on one process: the keys are put back in order first."""
    import torch.nn.functional as F

    from diffaccel.tokens import ImageSpan, PooledAttention

    grid, text = (1, 8, 6), 4
    span = ImageSpan(grid, text, text_first)
    n, length = 48, 52
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 8, generator=g) for _ in range(3))
    # positions of the gathered sequence in the whole one: slice r is [text_r, image_r] (or image first)
    t, i = text // slices, n // slices
    img0 = text if text_first else 0
    txt0 = 0 if text_first else n
    gathered = []
    for r in range(slices):
        own_text = list(range(txt0 + r * t, txt0 + (r + 1) * t))
        own_img = list(range(img0 + r * i, img0 + (r + 1) * i))
        gathered += own_text + own_img if text_first else own_img + own_text
    gathered = torch.tensor(gathered)
    with PooledAttention(span, 2.0, "avg") as one:
        whole = F.scaled_dot_product_attention(q, k, v)
    with PooledAttention(span, 2.0, "avg", slices=slices) as split:
        parts = F.scaled_dot_product_attention(*(x.index_select(2, gathered) for x in (q, k, v)))
    assert one.hits == split.hits == 1 and one.keys == split.keys == text + 12
    torch.testing.assert_close(parts, whole.index_select(2, gathered), rtol=1e-5, atol=1e-6)
    # without putting the keys back in order, the pooling windows mix tokens of other places
    with PooledAttention(span, 2.0, "avg") as unordered:
        wrong = F.scaled_dot_product_attention(*(x.index_select(2, gathered) for x in (q, k, v)))
    assert unordered.hits == 1 and not torch.allclose(wrong, whole.index_select(2, gathered), atol=1e-4)


def test_a_model_that_does_not_load_is_a_clear_error_and_a_corrected_rerun_runs(tmp_path):
    prompts, out = _prompts(tmp_path, 1), tmp_path / "out"
    with pytest.raises(SystemExit, match=f"--model {tmp_path / 'missing'}: "):
        main(["generate", "--prompts", str(prompts), "--model", str(tmp_path / "missing"), "--out", str(out)])
    assert not (out / "run.json").exists()  # nothing ran: no settings recorded that would refuse the rerun
    with pytest.raises(SystemExit, match="the acceleration cannot run on this pipeline: tome and sito would both"):
        main(["generate", "--prompts", str(prompts), *GEN, "--method", "tome", "sito", "--out", str(out)])
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 0


def test_batches_group_prompts_of_one_size_and_a_failed_call_is_retried_one_by_one(tmp_path, monkeypatch):
    from diffaccel import generate as gen
    from diffaccel import loading

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in [
        {"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "size": 32}, {"prompt": "boom"}, {"prompt": "e"},
        {"prompt": "f", "negative_prompt": "x"}, {"prompt": "g"}]))
    groups = gen.batches(read_prompts(path, size=(64, 64)), 3)
    assert [[p.prompt for p in b] for b in groups] == [["a", "b"], ["c"], ["boom", "e"], ["f"], ["g"]]

    calls = []
    real = loading.load_pipeline

    def load(*args, **kwargs):
        pipe, kind, ref = real(*args, **kwargs)
        original = type(pipe).__call__

        class Failing(type(pipe)):
            def __call__(self, *a, **kw):
                calls.append(list(kw["prompt"]))
                if "boom" in kw["prompt"]:
                    raise RuntimeError("this prompt breaks the call")
                return original(self, *a, **kw)

        Failing.__call__.__wrapped__ = original  # its signature: the pipeline's
        pipe.__class__ = Failing
        return pipe, kind, ref

    monkeypatch.setattr(loading, "load_pipeline", load)
    out = tmp_path / "out"
    assert main(["generate", "--prompts", str(path), *GEN, "--batch-size", "3", "--out", str(out)]) == 1
    assert calls == [["a", "b"], ["c"], ["boom", "e"], ["boom"], ["e"], ["f"], ["g"]]
    rows = _manifest(out)
    assert [(r["prompt"], r["status"], r["batch"]) for r in rows] == [
        ("a", "ok", 2), ("b", "ok", 2), ("c", "ok", 1), ("boom", "failed", 1), ("e", "ok", 1), ("f", "ok", 1),
        ("g", "ok", 1)]
    assert rows[3]["error"] == "RuntimeError: this prompt breaks the call"
    # a batched image is the image of its own seed: as generated alone (up to the batch's rounding)
    alone = tmp_path / "alone"
    monkeypatch.setattr(loading, "load_pipeline", real)
    path.write_text('{"prompt": "b", "seed": 1}\n')
    assert main(["generate", "--prompts", str(path), *GEN, "--out", str(alone)]) == 0
    diff = np.abs(_pixels(out / "images/000001.png").astype(int) - _pixels(alone / "images/000000.png").astype(int))
    assert diff.max() <= 2, diff.max()


def test_a_rerun_with_earlier_settings_regenerates_what_a_later_run_overwrote(tmp_path, capsys):
    """Seeds are per prompt, not settings of the folder: run with seed 0, then 1, then 0 again. The files
    hold the seed-1 images after the second run, so the third regenerates them, and the manifest lists
    what the files hold."""
    prompts, out = _prompts(tmp_path, 2), tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), *GEN, "--seed", "0", "--out", str(out)]) == 0
    first = [_pixels(out / f"images/{i:06d}.png") for i in range(2)]
    assert main(["generate", "--prompts", str(prompts), *GEN, "--seed", "1", "--out", str(out)]) == 0
    assert not np.array_equal(_pixels(out / "images/000000.png"), first[0])
    capsys.readouterr()
    assert main(["generate", "--prompts", str(prompts), *GEN, "--seed", "0", "--out", str(out)]) == 0
    assert "generated 2 images" in capsys.readouterr().out
    assert all(np.array_equal(_pixels(out / f"images/{i:06d}.png"), first[i]) for i in range(2))
    assert [(r["seed"], r["run"]) for r in _manifest(out)] == [(0, 3), (1, 3)]


def test_a_newer_failure_is_what_the_manifest_lists(tmp_path, monkeypatch):
    """An image deleted to be made again, and the new attempt fails: the manifest lists the failure, not
    the old record of a file that is gone, and the prompt does not count as done."""
    prompts, out = _prompts(tmp_path, 2), tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 0
    (out / "images/000001.png").unlink()
    from diffaccel import generate as gen

    def broken(pipe, batch, steps, guidance):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gen, "_call_kwargs", broken)
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 1
    assert [r["status"] for r in _manifest(out)] == ["ok", "failed"]
    assert gen.finished(out, read_prompts(prompts, size=(64, 64))) == {"000000"}


def test_the_manifest_lists_the_prompts_of_the_file(tmp_path):
    prompts, out = _prompts(tmp_path, 3), tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 0
    fewer = tmp_path / "two.txt"
    fewer.write_text("".join(prompts.read_text().splitlines(keepends=True)[:2]))
    assert main(["generate", "--prompts", str(fewer), *GEN, "--out", str(out)]) == 0
    assert [r["id"] for r in _manifest(out)] == ["000000", "000001"]


def test_a_record_of_what_an_id_was_before_does_not_count(tmp_path, capsys):
    """Parts are read in process order, not in time order: an older record of another process for an id
    whose prompt has changed since must not win over the record of the prompt as it is now."""
    prompts, out = _prompts(tmp_path, 2), tmp_path / "out"
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 0
    first = _manifest(out)[0]
    stale = dict(first, prompt="what line 1 said before", process=1, run=0)
    (out / "manifest.part-00001.jsonl").write_text(json.dumps(stale) + "\n")
    capsys.readouterr()
    assert main(["generate", "--prompts", str(prompts), *GEN, "--out", str(out)]) == 0
    assert "generated 0 images" in capsys.readouterr().out
    assert _manifest(out)[0] == first
