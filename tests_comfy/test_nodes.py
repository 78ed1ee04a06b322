"""diffaccel's nodes inside a real ComfyUI core: loaded by ComfyUI's own loader, run by its KSampler and
its prompt executor, on tiny SD 1.5-, SDXL- and Flux-shaped ComfyUI models."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import pytest
import torch

import diffaccel
from diffaccel.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from diffaccel.comfy.nodes import config_from_inputs, label, node_id
from diffaccel.comfy.sampling import acceleration_of, diffusion_model
from diffaccel.comfy.testing import TINY, conditioning, sample
from diffaccel.methods.base import available_methods, method_class

ROOT = Path(__file__).resolve().parents[1]
TOKEN_METHODS = ("tome", "todo", "sito")
CACHING_METHODS = ("fora", "toca", "duca", "taylorseer")
# a strength at which each method acts on these tiny models (the cost model left out: it would rightly
# find nothing worth merging at 16 x 16 latents)
ACTING = {"tome": dict(ratio=0.5, cost_model="off"), "todo": dict(factor="2.0", cost_model="off"),
          "sito": dict(ratio=0.5, cost_model="off"), "fora": dict(interval=2), "toca": dict(interval=3),
          "duca": dict(interval=3), "taylorseer": dict(interval=2, warmup=0)}


def node(name: str):
    return NODE_CLASS_MAPPINGS[node_id(name)]()


def inputs(name: str, **changes) -> dict:
    """A method node's inputs: its declared defaults, with `changes`."""
    required = NODE_CLASS_MAPPINGS[node_id(name)].INPUT_TYPES()["required"]
    values = {k: spec[1]["default"] for k, spec in required.items() if k != "model"}
    values.update(changes)
    return values


def zero_inputs(name: str) -> dict:
    cls = method_class(name)
    opts = {o.name: o for o in cls.options()}
    zero = {k: (label(v) if opts[k].kind == "choice" else str(v) if opts[k].kind == "number_or_choice" else v)
            for k, v in cls.zero.items()}
    return inputs(name, **{**ACTING[name], **zero})


def options_snapshot(patcher) -> str:
    return repr(patcher.model_options)


@pytest.fixture(scope="module")
def models():
    return {family: build() for family, build in TINY.items()}


@pytest.fixture(scope="module")
def baselines(models):
    return {family: sample(t.patcher, t) for family, t in models.items()}


# -- loading ------------------------------------------------------------------------------------------


def test_comfyui_loader_registers_a_node_per_method():
    import nodes

    assert asyncio.run(nodes.load_custom_node(str(ROOT / "comfyui" / "diffaccel"))) is True
    for name in available_methods():
        assert node_id(name) in nodes.NODE_CLASS_MAPPINGS
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id(name)] == NODE_DISPLAY_NAME_MAPPINGS[node_id(name)]
    for extra in ("DiffAccelPolicy", "DiffAccelLoadConfig", "DiffAccelReport"):
        assert extra in nodes.NODE_CLASS_MAPPINGS


def test_node_inputs_are_the_registered_options():
    for name in available_methods():
        required = NODE_CLASS_MAPPINGS[node_id(name)].INPUT_TYPES()["required"]
        options = method_class(name).options()
        assert list(required) == ["model"] + [o.name for o in options]
        for o in options:
            kind, spec = required[o.name]
            assert spec["tooltip"].startswith(o.doc)
            if o.kind in ("int", "float"):
                assert kind == o.kind.upper() and spec["min"] == o.low and spec["max"] == o.high
            elif o.kind == "bool":
                assert kind == "BOOLEAN"
            elif o.kind == "choice":
                assert kind == [label(c) for c in o.choices]
        # the node's defaults make the config's defaults
        assert config_from_inputs(name, inputs(name)) == method_class(name)()


# -- every family, every method -----------------------------------------------------------------------


# the families whose attention ComfyUI computes where the token methods cannot reach it
CACHING_ONLY = {"flux": "ComfyUI Flux.*not in a module", "wan": "ComfyUI Wan.*rotary embeddings inside"}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "wan"])
def test_methods_act_at_strength_change_nothing_at_zero_and_leave_the_input_model(family, models, baselines):
    tiny, base = models[family], baselines[family]
    before = options_snapshot(tiny.patcher)
    acted = []
    for name in available_methods():
        if family in CACHING_ONLY and name in TOKEN_METHODS:
            continue
        (model,) = node(name).apply(tiny.patcher, **inputs(name, **ACTING[name]))
        out = sample(model, tiny)
        assert not torch.equal(out, base), f"{name} changed nothing on {family}"
        assert torch.isfinite(out).all()
        report = acceleration_of(model).report
        assert report.startswith(f"{name}: of ") and " 0 on fewer tokens, 0 were served" not in report
        (zero,) = node(name).apply(tiny.patcher, **zero_inputs(name))
        assert torch.equal(sample(zero, tiny), base), f"{name} at zero strength changed the output on {family}"
        acted.append(name)
    # the input model: same options, no hooks left, same output
    assert options_snapshot(tiny.patcher) == before and acceleration_of(tiny.patcher) is None
    assert not diffaccel.is_accelerated(diffusion_model(tiny.patcher))
    assert torch.equal(sample(tiny.patcher, tiny), base)
    assert set(acted) == set(available_methods()) - (set(TOKEN_METHODS) if family in CACHING_ONLY else set())


@pytest.mark.parametrize("family", sorted(CACHING_ONLY))
def test_token_methods_say_why_they_cannot_act_where_comfyui_hides_attention(family, models):
    tiny = models[family]
    for name in TOKEN_METHODS:
        with pytest.raises(ValueError, match=f"{name} acts on no site of this {CACHING_ONLY[family]}"):
            node(name).apply(tiny.patcher, **inputs(name, **ACTING[name]))
    assert acceleration_of(tiny.patcher) is None


def test_steps_follow_comfyui_sigmas_and_cfg_branches(models):
    """The schedule is laid over the sampler's steps (FORA, interval 2, 6 steps: computed at 0, 2, 4 and
    the last), and a cfg call that batches [uncond, cond] is one branch whose halves share selections."""
    tiny = models["sd15"]
    (model,) = node("fora").apply(tiny.patcher, **inputs("fora", interval=2))
    sample(model, tiny, steps=6)
    den = acceleration_of(model).description["denoisers"][0]
    assert den["last_call"]["branch"].startswith("cond_uncond ") and den["last_call"]["num_steps"] == 6
    for row in den["sites"]:
        runs = row["last_run"]
        assert sorted(runs) == list(range(6))
        assert [s for s, r in runs.items() if r["computed"] == 0] == [1, 3], row["name"]
    sample(model, tiny, steps=6, cfg=1.0)  # ComfyUI skips the unconditional call at cfg 1
    assert acceleration_of(model).description["denoisers"][0]["last_call"]["branch"].startswith("cond ")


def test_cond_or_uncond_gives_the_conditional_half():
    from diffaccel.pipelines.comfy_unet import ComfyUNetAdapter

    adapter = ComfyUNetAdapter(torch.nn.Module())

    def branch(chunks, batch=2):
        return adapter.host_branch((), {"transformer_options": {"cond_or_uncond": chunks}}, batch)

    assert branch([1, 0]) == ("cond_uncond", True, "second")
    assert branch([0, 1]) == ("cond_uncond", True, "first")
    assert branch([0], 1) == ("cond", False, "second")
    assert branch([1], 1) == ("uncond", False, "second")
    assert branch([0, 0, 1], 3)[:2] == ("chunks 0,0,1", False)
    assert adapter.host_branch((), {}, 2) is None
    tagged = adapter.host_branch((), {"transformer_options": {"cond_or_uncond": [0], "uuids": ["a"]}}, 1)
    assert tagged == ("cond a", False, "second")


def test_cfg_halves_share_one_token_selection(models):
    """With batched [uncond, cond] rows, a token method selects on the conditional half for both: equal
    halves in, equal halves out, as in the core."""
    tiny = models["sd15"]
    (model,) = node("tome").apply(tiny.patcher, **inputs("tome", **ACTING["tome"]))
    cond = conditioning(tiny, 1)
    import nodes

    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    out = nodes.KSampler().sample(model, 0, 4, 1.5, "euler", "normal", cond, copy.deepcopy(cond), latent)[0]["samples"]
    plain = nodes.KSampler().sample(model, 0, 4, 1.0, "euler", "normal", cond, cond, latent)[0]["samples"]
    # cfg 1.5 with identical cond and uncond: both halves see the same tokens, so guidance changes nothing
    assert torch.allclose(out, plain, atol=1e-4, rtol=1e-4)


# -- composing, policies, saved configs, errors ---------------------------------------------------------


def test_chained_nodes_compose_and_each_clone_keeps_its_own(models, baselines):
    tiny, base = models["sd15"], baselines["sd15"]
    (merged,) = node("tome").apply(tiny.patcher, **inputs("tome", **ACTING["tome"]))
    (both,) = node("fora").apply(merged, **inputs("fora", interval=2))
    assert [c.name for c in acceleration_of(both).configs] == ["tome", "fora"]
    assert [c.name for c in acceleration_of(merged).configs] == ["tome"]
    out_both, out_merged = sample(both, tiny), sample(merged, tiny)
    assert not torch.equal(out_both, out_merged) and not torch.equal(out_both, base)
    report = acceleration_of(both).report
    assert report.startswith("tome, fora: ")
    with pytest.raises(ValueError, match="each method may be given once"):
        node("tome").apply(both, **inputs("tome"))
    with pytest.raises(ValueError, match="would both reduce the tokens"):
        node("toca").apply(merged, **inputs("toca"))
    assert torch.equal(sample(tiny.patcher, tiny), base)


def test_policy_node_and_saved_config_give_the_api_configs(models, tmp_path):
    tiny = models["sd15"]
    rules = {"rules": [{"select": {"kind": ["self_attn"], "level": [0, 0]},
                        "params": {"ratio": {"type": "linear", "start": 0.6, "end": 0.2}},
                        "when": {"start": 0.0, "end": None, "unit": "progress"}}]}
    (policy,) = NODE_CLASS_MAPPINGS["DiffAccelPolicy"]().build(json.dumps(rules))
    (model,) = node("tome").apply(tiny.patcher, policy=policy, **inputs("tome", cost_model="off"))
    expected = diffaccel.ToMeConfig(ratio=0.5, cost_model=False, policy=rules)
    assert acceleration_of(model).configs == (expected,)
    path = diffaccel.save_config(tmp_path / "acceleration.json", [expected, diffaccel.FORAConfig(interval=2)])
    (loaded,) = NODE_CLASS_MAPPINGS["DiffAccelLoadConfig"]().apply(tiny.patcher, str(path))
    assert acceleration_of(loaded).configs == tuple(diffaccel.load_config(path))
    (from_text,) = NODE_CLASS_MAPPINGS["DiffAccelLoadConfig"]().apply(tiny.patcher, "", path.read_text())
    assert acceleration_of(from_text).configs == acceleration_of(loaded).configs
    assert torch.equal(sample(loaded, tiny), sample(from_text, tiny))
    with pytest.raises(ValueError, match="malformed policy JSON"):
        NODE_CLASS_MAPPINGS["DiffAccelPolicy"]().build("{rules")
    with pytest.raises(FileNotFoundError):
        NODE_CLASS_MAPPINGS["DiffAccelLoadConfig"]().apply(tiny.patcher, str(tmp_path / "missing.json"))


def test_bad_values_are_refused_before_anything_changes(models):
    tiny = models["sd15"]
    before = options_snapshot(tiny.patcher)
    with pytest.raises(ValueError, match="ratio"):
        node("tome").apply(tiny.patcher, **inputs("tome", ratio=1.5))
    with pytest.raises(ValueError, match="factor must be a number or auto"):
        node("todo").apply(tiny.patcher, **inputs("todo", factor="big"))
    with pytest.raises(ValueError, match="score must be one of"):
        node("toca").apply(tiny.patcher, **inputs("toca", score="loudest"))
    assert options_snapshot(tiny.patcher) == before


# -- through ComfyUI's own prompt validation and executor -------------------------------------------------


class _Server:
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


@pytest.fixture(scope="module")
def graph_nodes():
    """Test-only source nodes (a tiny model, its conditioning) registered in ComfyUI beside ours."""
    import nodes

    asyncio.run(nodes.load_custom_node(str(ROOT / "comfyui" / "diffaccel")))
    built = {}

    class TinyModel:
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "load"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {"family": (["sd15", "sdxl", "flux"],)}}

        def load(self, family):
            if family not in built:
                built[family] = TINY[family]()
            return (built[family].patcher,)

    class TinyConditioning:
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "make"
        CATEGORY = "testing"

        @classmethod
        def INPUT_TYPES(cls):  # noqa: N802
            return {"required": {"family": (["sd15", "sdxl", "flux"],), "seed": ("INT", {"default": 1})}}

        def make(self, family, seed):
            return (conditioning(built.get(family) or TINY[family](), seed),)

    nodes.NODE_CLASS_MAPPINGS.update({"TinyModel": TinyModel, "TinyConditioning": TinyConditioning})
    return built


def _graph(family: str, method_node: str, method_inputs: dict) -> dict:
    return {
        "1": {"class_type": "TinyModel", "inputs": {"family": family}},
        "2": {"class_type": "TinyConditioning", "inputs": {"family": family, "seed": 1}},
        "3": {"class_type": "TinyConditioning", "inputs": {"family": family, "seed": 2}},
        "4": {"class_type": method_node, "inputs": {"model": ["1", 0], **method_inputs}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 0, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "DiffAccelReport", "inputs": {"model": ["4", 0], "latent": ["6", 0]}},
    }


def _run(prompt: dict):
    import execution

    valid = asyncio.run(execution.validate_prompt("p", prompt, None))
    if not valid[0]:
        return valid, None
    executor = execution.PromptExecutor(_Server(), cache_type=False, cache_args={"lru": 0, "ram": 0})
    executor.execute(prompt, "p", {}, valid[2])
    return valid, executor


def test_a_graph_runs_and_reports_through_comfyui_executor(graph_nodes):
    valid, executor = _run(_graph("sd15", "DiffAccelToCa", inputs("toca")))
    assert valid[0], valid
    assert executor.success, executor.status_messages
    text = executor.history_result["outputs"]["7"]["text"][0]
    assert text.startswith("toca: of ") and "served from the cache" in text


def test_bad_input_takes_comfyui_error_path(graph_nodes):
    # out of its declared range: ComfyUI's validation refuses it before running anything
    valid, _ = _run(_graph("sd15", "DiffAccelToMe", inputs("tome", ratio=1.5)))
    assert not valid[0] and "ratio" in json.dumps(valid[3])
    # a family the method cannot reach: the node raises, the executor reports it as a node error
    valid, executor = _run(_graph("flux", "DiffAccelToMe", inputs("tome", **ACTING["tome"])))
    assert valid[0] and not executor.success
    errors = [m for event, m in executor.status_messages if event == "execution_error"]
    assert errors and errors[0]["node_id"] == "4" and "acts on no site of this ComfyUI Flux" in errors[0]["exception_message"]
    assert acceleration_of(graph_nodes["flux"].patcher) is None


def test_sample_workflow_validates_in_comfyui(graph_nodes, tmp_path):
    import folder_paths

    workflow = json.loads((ROOT / "demo" / "comfy" / "workflow_api.json").read_text())
    ckpt = workflow["1"]["inputs"]["ckpt_name"]
    (tmp_path / ckpt).write_bytes(b"")
    folder_paths.add_model_folder_path("checkpoints", str(tmp_path))
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    import execution

    valid = asyncio.run(execution.validate_prompt("w", workflow, None))
    assert valid[0], valid
    ours = [n for n in workflow.values() if n["class_type"].startswith("DiffAccel")]
    assert {n["class_type"] for n in ours} >= {"DiffAccelPolicy", "DiffAccelToDo", "DiffAccelToCa", "DiffAccelReport"}


# -- beside ComfyUI's own nodes ---------------------------------------------------------------------------


def test_beside_comfyui_tome_both_act(models, baselines):
    from comfy_extras.nodes_tomesd import TomePatchModel

    tiny, base = models["sd15"], baselines["sd15"]
    theirs = TomePatchModel.execute(tiny.patcher, 0.5).result[0]
    (ours,) = node("tome").apply(tiny.patcher, **inputs("tome", ratio=0.5, cost_model="off"))
    out_theirs, out_ours = sample(theirs, tiny), sample(ours, tiny)
    assert not torch.equal(out_theirs, base) and not torch.equal(out_ours, base)
    assert torch.equal(sample(tiny.patcher, tiny), base)


def test_beside_comfyui_easycache_ours_skips_work_theirs_runs(models, baselines):
    """Both run on one model; FLOPs of each (EasyCache skips whole steps only where its own measure says
    so, which on random weights it may not: the figures on a larger model are in bench/results/comfy)."""
    from comfy_extras.nodes_easycache import EasyCacheNode
    from torch.utils.flop_counter import FlopCounterMode

    tiny = models["flux"]

    def flops(model):
        with FlopCounterMode(display=False) as counter:
            sample(model, tiny, steps=8)
        return counter.get_total_flops()

    base = flops(tiny.patcher)
    (fora,) = node("fora").apply(tiny.patcher, **inputs("fora", interval=2))
    easy = EasyCacheNode.execute(tiny.patcher, 0.2, 0.15, 0.95, False).result[0]
    assert flops(fora) < base
    assert flops(easy) <= base


def test_skipped_flux_blocks_hand_back_what_they_computed(models):
    """DuCa's aggressive steps skip whole blocks; ComfyUI's single-stream blocks add into their input in
    place, so a stored output must be a copy that later blocks cannot change."""
    tiny = models["flux"]
    unet = diffusion_model(tiny.patcher)
    seen = {}  # block -> [output of each call]
    handles = [block.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, []).append(
        tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()))
        for name, block in list(unet.named_children()) if name in ("double_blocks", "single_blocks")
        for name, block in [(f"{name}.{i}", b) for i, b in enumerate(block)]]
    try:
        (model,) = node("duca").apply(tiny.patcher, **inputs("duca", interval=3))
        sample(model, tiny, steps=8)
    finally:
        for h in handles:
            h.remove()
    den = acceleration_of(model).description["denoisers"][0]
    skipped = {}
    for row in den["sites"]:
        block = row["name"].rsplit(".", 1)[0]
        steps = {s for s, r in row["last_run"].items() if r["computed"] == 0}
        skipped[block] = steps if block not in skipped else skipped[block] & steps
    assert any(skipped.values()) and set(den["whole_blocks"]) == set(seen)
    for block, outputs in seen.items():
        assert len(outputs) == 8
        for step in sorted(skipped[block]):
            last = max(s for s in range(step) if s not in skipped[block])
            same = [torch.equal(a, b) for a, b in zip(*(o if isinstance(o, tuple) else (o,)
                                                          for o in (outputs[step], outputs[last])))]
            assert all(same), f"{block} at step {step} did not hand back its output of step {last}"
