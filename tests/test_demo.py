"""The demo's engine and generated controls, in-process: runs agree with accelerate_pipeline called
directly, the baseline cache, cancellation, loading errors, copy-as-code. The page itself, its API
and a real browser are in test_demo_app.py."""

from __future__ import annotations

import dataclasses
import json
import threading

import gradio as gr
import numpy as np
import pytest
import torch

import diffaccel
from diffaccel import (
    ToCaConfig,
    ToDoConfig,
    ToMeConfig,
    accelerate_pipeline,
    is_accelerated,
    remove_acceleration,
)
from diffaccel.demo import controls as ctl
from diffaccel.demo.app import App, host_of, parse_args
from diffaccel.demo.engine import (
    Cancelled,
    DemoError,
    Engine,
    Request,
    digest,
    fidelity,
    policy_matrix,
    request_from,
)
from diffaccel.methods.base import CachingMethod, method_class, register
from diffaccel.policy import Policy, Rule, Selector
from diffaccel.testing import registered

STEPS = 6


@pytest.fixture(scope="module")
def engine():
    e = Engine(workers=2, baseline_cache=3)
    e.load("dit")
    return e


def direct(pipe, methods, req: Request) -> np.ndarray:
    """What a script gets from accelerate_pipeline with the same settings."""
    accelerate_pipeline(pipe, methods)
    try:
        out = pipe(req.prompt, num_inference_steps=req.steps, height=req.size, width=req.size,
                   guidance_scale=req.guidance, generator=torch.Generator().manual_seed(req.seed), output_type="np",
                   clean_caption=False).images
    finally:
        remove_acceleration(pipe)
    return np.asarray(out, dtype=np.float32)


# -- controls from the registry ---------------------------------------------------------------------


def _controls(selected=()):
    with gr.Blocks():
        return ctl.build_method_controls(gr, list(selected))


def test_every_registered_method_and_option_gets_a_control():
    groups, controls = _controls()
    assert sorted(groups) == diffaccel.available_methods()
    for name in diffaccel.available_methods():
        options = method_class(name).options()
        mine = [c for c in controls if c.method == name]
        assert [c.option.name for c in mine] == [o.name for o in options]
        for c in mine:
            o, comp = c.option, c.component
            assert o.doc and o.doc in comp.info, (name, o.name)
            assert comp.elem_id == f"opt-{name}-{o.name}"
            if isinstance(comp, gr.Slider):
                assert (comp.minimum, comp.maximum) == (o.low, o.high)
            if o.kind == "bool":
                assert isinstance(comp, gr.Checkbox) and comp.value == o.default
            if o.kind == "choice":
                assert isinstance(comp, gr.Dropdown) and len(comp.choices) == len(o.choices)


def test_a_method_added_to_the_registry_appears_without_touching_the_demo():
    @register
    @dataclasses.dataclass(frozen=True)
    class EveryOther(CachingMethod):
        """Reuse every sub-layer on every other step."""

        name = "everyother"
        zero = {"interval": 1}

        def default_policy(self) -> Policy:
            return Policy((Rule(Selector(kind=("self_attn", "ff")), {"interval": self.interval}),))

        def is_identity(self, params: dict) -> bool:
            return round(params["interval"]) <= 1

        def reuses(self, site, ctx, params, entry) -> bool:
            return ctx.step % round(params["interval"]) != 0

    diffaccel.methods.base._REGISTRY.pop("everyother")  # registered only inside the context below
    with registered(EveryOther):
        groups, controls = _controls(["everyother"])
        assert "everyother" in groups
        interval = next(c for c in controls if c.method == "everyother" and c.option.name == "interval")
        assert isinstance(interval.component, gr.Number)  # declared 1..1000: a number box
        configs = ctl.configs_from_controls(["everyother"], [interval], [2])
        assert configs == [EveryOther(interval=2, warmup=0)]
    assert "everyother" not in diffaccel.available_methods()


def test_controls_at_their_defaults_give_the_default_configs():
    _, controls = _controls()
    values = [c.component.value for c in controls]
    for name in diffaccel.available_methods():
        assert ctl.configs_from_controls([name], controls, values) == [method_class(name)()]


def test_controls_changed_and_out_of_range():
    _, controls = _controls()
    values = [c.component.value for c in controls]
    index = {(c.method, c.option.name): i for i, c in enumerate(controls)}
    values[index[("tome", "ratio")]] = 0.6
    values[index[("tome", "merge_mlp")]] = True
    values[index[("todo", "factor")]] = "auto"
    values[index[("toca", "kind_weights")]] = '{"self_attn": 0.0, "cross_attn": 1.0, "ff": 1.0}'
    toca, todo, tome = ctl.configs_from_controls(["tome", "toca", "todo"], controls, values)  # registry order
    assert (tome.ratio, tome.merge_mlp, todo.factor, toca.kind_weights["cross_attn"]) == (0.6, True, "auto", 1.0)
    values[index[("tome", "ratio")]] = 0.9  # above 1 - 1/(2x2)
    with pytest.raises(DemoError, match=r"ToMeConfig.ratio must be in \[0.0, 0.75\], got 0.9"):
        ctl.configs_from_controls(["tome"], controls, values)
    values[index[("toca", "kind_weights")]] = "{not json"
    with pytest.raises(DemoError, match="toca.kind_weights is not valid JSON"):
        ctl.configs_from_controls(["toca"], controls, values)
    with pytest.raises(DemoError, match="choose at least one method"):
        ctl.configs_from_controls([], controls, values)


# -- runs -------------------------------------------------------------------------------------------


def test_run_matches_accelerate_pipeline_called_directly(engine):
    req = Request("dit", [ToCaConfig(interval=3), ToDoConfig(factor=2.0)], steps=STEPS, seed=3)
    result = engine.run(req)
    pipe = diffaccel.load_reference_pipeline("dit")
    np.testing.assert_array_equal(result.accelerated, direct(pipe, req.methods, req))
    np.testing.assert_array_equal(result.baseline, direct(pipe, [ToCaConfig(interval=1)], req))
    psnr, ssim = fidelity(result.baseline, result.accelerated)
    assert 10 < result.psnr == psnr < 60 and 0 < result.ssim == ssim < 1
    stats = result.stats()
    assert stats["methods"] == ["toca", "todo"] and stats["speedup"] > 0 and not stats["identical"]
    assert result.config == diffaccel.config.config_dict(req.methods)
    # the run's description: toca computed some tokens, reused others, and every step of the run is there
    rows, computed, _ = policy_matrix(result.description)
    assert computed.shape == (len(rows), STEPS) and len(rows) > 0
    assert np.nanmax(computed) == 1.0 and np.nanmin(computed) < 1.0
    assert result.heatmap.size[0] > 300


def test_zero_strength_is_identical_and_says_so(engine):
    result = engine.run(Request("dit", [ToCaConfig(interval=1)], steps=3))
    assert result.stats()["identical"] and result.stats()["psnr"] is None and result.ssim == 1.0


def test_copy_as_code_reproduces_the_run(engine):
    req = Request("dit", [ToCaConfig(interval=4, fresh_ratio=0.2), ToDoConfig(factor=2.0, cost_model=None)], steps=STEPS,
                  prompt="a small green triangle at the top right", negative_prompt="blue", seed=5, guidance=3.0)
    result = engine.run(req)
    scope: dict = {}
    assert "clean_caption=False" in result.code  # PixArt's prompt cleaning off, as the demo runs it
    exec(result.code.replace("out = pipe(", "out = pipe(output_type='np', "), scope)
    np.testing.assert_array_equal(np.asarray(scope["out"].images, dtype=np.float32), result.accelerated)


def test_baseline_is_cached_bounded_and_not_recomputed(engine):
    seen = []
    req = Request("dit", [ToCaConfig()], steps=STEPS, prompt="baseline cache test", seed=11)
    first = engine.run(req, progress=lambda done, total, phase: seen.append((total, phase)))
    assert not first.baseline_cached and {p for _, p in seen} == {"baseline", "accelerated"}
    seen.clear()
    again = engine.run(dataclasses.replace(req, methods=[ToMeConfig(ratio=0.5)]),
                       progress=lambda done, total, phase: seen.append((total, phase)))
    assert again.baseline_cached and {p for _, p in seen} == {"accelerated"} and seen[-1][0] == STEPS
    np.testing.assert_array_equal(again.baseline, first.baseline)
    for seed in range(20, 24):  # more baselines than the cache holds
        engine.run(dataclasses.replace(req, seed=seed, steps=2))
    assert engine.cached_baselines() == 3
    assert not engine.run(dataclasses.replace(req, steps=STEPS)).baseline_cached  # the oldest went first


def test_cancel_stops_the_run_and_the_next_run_is_correct(engine):
    req = Request("dit", [ToCaConfig()], steps=STEPS, prompt="cancel test", seed=7)
    cancel = threading.Event()

    def progress(done, total, phase):
        if phase == "accelerated" and done >= STEPS + 2:
            cancel.set()

    with pytest.raises(Cancelled, match="cancelled at step 3 of the accelerated run"):
        engine.run(req, progress, cancel)
    replicas = list(engine.model("dit").replicas.queue)
    assert len(replicas) == engine.workers and not any(is_accelerated(p) for p in replicas)
    fresh = Engine(workers=1)
    fresh.load("dit")
    assert digest(engine.run(req).accelerated) == digest(fresh.run(req).accelerated)
    cancel.set()  # cancelled while it waited in the queue: it does not start
    with pytest.raises(Cancelled, match="cancelled before it started"):
        engine.run(req, None, cancel)


def test_cancel_reaches_queued_runs_of_the_session(engine):
    app = App(engine, "dit")
    assert app.cancel(None) == "nothing is running"
    app.ask(None)  # the page's Run: asked, waiting in the queue
    assert app.cancel(None) == "cancelling…"
    status, *_ = app.run("dit", json.dumps(diffaccel.config.config_dict("fora")), "p", "", 0, 2, 256, 4.5)
    assert status.startswith("Cancelled (cancelled before it started)")
    assert app.runs == {} and app.cancel(None) == "nothing is running"
    assert app.run("dit", json.dumps(diffaccel.config.config_dict("fora")), "p", "", 0, 2, 256, 4.5)[0].startswith("Done")


def test_what_the_demo_holds_is_bounded(engine, tmp_path):
    small = Engine(workers=1, baseline_cache=8, baseline_bytes=3 * 256 * 256 * 3 * 4, max_models=1)
    small.load("dit")
    with pytest.raises(DemoError, match=r"1 pipelines are loaded, the most this demo holds \(--max-models\)"):
        small.load("unet")
    for seed in range(5):
        small.run(Request("dit", [ToCaConfig()], steps=2, seed=seed))
    assert small.cached_baselines() == 3  # bytes bound: three 256x256 float images


def test_bad_input_is_a_message_and_changes_nothing(engine, tmp_path):
    before = dict(engine.models)
    with pytest.raises(DemoError, match="no such folder"):
        engine.load(str(tmp_path / "missing"))
    with pytest.raises(DemoError, match="not a diffusers pipeline folder"):
        engine.load(str(tmp_path))
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(DemoError, match="not a supported denoiser; supported families"):
        engine.load(str(tmp_path / "ddpm"))
    assert engine.models == before
    with pytest.raises(DemoError, match="not valid JSON"):
        request_from("dit", "{nope")
    with pytest.raises(DemoError, match=r"ToCaConfig.interval must be in \[1, 1000\]"):
        request_from("dit", '{"format": "diffaccel.acceleration", "version": 1, "methods": [{"method": "toca", '
                            '"interval": 0}]}')
    with pytest.raises(DemoError, match="policy sets"):
        request_from("dit", '{"format": "diffaccel.acceleration", "version": 1, "methods": [{"method": "toca", '
                            '"policy": {"rules": [{"params": {"ratio": 0.5}}]}}]}')
    with pytest.raises(DemoError, match="toca and tome would both reduce the tokens"):
        engine.run(Request("dit", [ToCaConfig(), ToMeConfig(ratio=0.5)], steps=2))
    assert not any(is_accelerated(p) for p in engine.model("dit").replicas.queue)
    with pytest.raises(DemoError, match="not loaded"):
        engine.run(Request("elsewhere", [ToCaConfig()]))


def test_a_saved_pipeline_folder_loads_and_runs(engine, tmp_path):
    """The real loading code: from_pretrained on a folder, safetensors only."""
    pipe = diffaccel.load_reference_pipeline("dit")
    pipe.save_pretrained(tmp_path / "dit")
    model = engine.load(str(tmp_path / "dit"))
    assert model.families == engine.model("dit").families and "DiffusionPipeline.from_pretrained" in model.source
    req = Request("dit", [ToCaConfig()], steps=3, seed=1)
    mine = engine.run(req)
    theirs = engine.run(dataclasses.replace(req, model=model.key))
    np.testing.assert_array_equal(mine.accelerated, theirs.accelerated)
    assert "DiffusionPipeline.from_pretrained" in theirs.code


def test_app_handlers_report_errors_in_the_page(engine):
    app = App(engine, "dit")
    app.build()  # the page, and the controls its handlers read
    status, base, acc, stats_md, stats, heat, code, path = app.run("dit", '{"format": "x"}', "p", "", 0, 2, 256, 4.5)
    assert status.startswith("Error: not a diffaccel acceleration config") and base is None and "error" in stats
    status, *_ = app.run("dit", "", "p", "", 0, 2, 256, 4.5)
    assert status == "Error: no acceleration given"
    _, message, to_run = app.controls_json(False, "", ["tome"], *[0.9 if c.option.name == "ratio" else c.component.value
                                                                  for c in app.controls])
    assert message == to_run == "Error: ToMeConfig.ratio must be in [0.0, 0.75], got 0.9"
    assert app.run("dit", to_run, "p", "", 0, 2, 256, 4.5)[0] == message
    status, *_ = app.run("dit", json.dumps(diffaccel.config.config_dict("fora")), "p", "", 0, 0, 256, 4.5)
    assert status == "Error: steps must be a whole number in [1, 200], got 0"
    status, *_ = app.run("dit", json.dumps(diffaccel.config.config_dict("fora")), "p", "", float("nan"), 2, 256, 4.5)
    assert status == "Error: seed must be a whole number in [0, 2147483647], got nan"
    status, *_ = app.run("dit", json.dumps(diffaccel.config.config_dict("fora")), "p", "", 0, 2, 256, None)
    assert status == "Error: guidance must be a number in [0, 50], got None"
    assert app.cancel(None) == "nothing is running"
    text, message, to_run = app.controls_json(True, "[]", [])
    assert message.startswith("Error: an acceleration config is a JSON object") and to_run == "[]"


def test_it_listens_on_localhost_unless_told():
    assert host_of(parse_args([])) == "127.0.0.1" and parse_args([]).port == 7860
    assert host_of(parse_args(["--share-host"])) == "0.0.0.0"
    assert host_of(parse_args(["--host", "10.0.0.2"])) == "10.0.0.2"


def test_cli_has_the_demo():
    from diffaccel.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0


def _tiny_wan_folder(path) -> str:
    """A whole Wan text-to-video pipeline (tokenizer, text encoder, VAE, transformer), tiny, saved."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from diffaccel.testing import byte_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = byte_clip_tokenizer(max_length=16)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                               num_heads=4, relative_attention_num_buckets=8))
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                transformer=transformer).save_pretrained(path)
    return str(path)


def test_a_video_pipeline_shows_its_frames(tmp_path):
    from diffusers import DiffusionPipeline

    from diffaccel import FORAConfig
    from diffaccel.demo.engine import tile

    folder = _tiny_wan_folder(tmp_path / "wan")
    engine = Engine(workers=1)
    model = engine.load(folder)
    assert model.video and model.families == ["Wan 2.1/2.2"]
    req = Request(model.key, [FORAConfig(interval=2)], prompt="a red ball", steps=4, size=64, frames=5)
    result = engine.run(req)
    assert result.baseline.shape == result.accelerated.shape == (5, 64, 64, 3)
    assert tile(result.accelerated).shape == (128, 256, 3)  # 5 frames on a 4-wide grid
    assert "num_frames=5" in result.code
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    accelerate_pipeline(pipe, req.methods)
    frames = pipe("a red ball", num_inference_steps=4, height=64, width=64, num_frames=5, guidance_scale=4.5,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    np.testing.assert_array_equal(result.accelerated, np.asarray(frames, dtype=np.float32)[0])
