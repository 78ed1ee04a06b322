"""The contract every method fulfils on every family (parametrized): identity at zero strength,
bit-exact removal, atomic apply, clear errors, fresh state per call, robustness, determinism.

The methods are those of the registry, and the example methods below, which a test defines: a new
method is one file and a registry entry, and this suite runs it on every family."""

import warnings
from dataclasses import dataclass

import pytest
import torch

import diffaccel
from diffaccel import (
    CachingMethod,
    Policy,
    Rule,
    Selector,
    accelerate_pipeline,
    describe,
    is_accelerated,
    remove_acceleration,
)
from diffaccel.methods import method_class
from diffaccel.testing import FAMILIES, PLAIN_FAMILIES, recorded_reductions, registered, snapshot


@dataclass(frozen=True)
class AlternateStepCache(CachingMethod):
    """An example method, the whole of it: every sub-layer's output computed at every `interval`-th
    step of the run is reused on the steps between (interval 2: every other step is skipped)."""

    interval: int = 2

    name = "alternate"
    zero = {"interval": 1}

    def default_policy(self) -> Policy:
        return Policy((Rule(Selector(kind=("self_attn", "cross_attn", "ff")), {"interval": self.interval}),))

    def is_identity(self, params: dict) -> bool:
        return round(params["interval"]) <= 1

    def reuses(self, site, ctx, params, entry) -> bool:
        return ctx.step % round(params["interval"]) != 0


EXAMPLES = {cls.name: cls for cls in (AlternateStepCache,)}


@pytest.fixture(autouse=True)
def example_methods(request):
    """An example method is registered while a test of this suite that runs it runs, and only then."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    method = params.get("method", ())
    wanted = [EXAMPLES[m] for m in (method if isinstance(method, tuple) else (method,)) if m in EXAMPLES]
    with registered(*wanted):
        yield


# Settings of registered methods that take other code paths, run through the suite under their own
# names: token-wise forecasting (ToCa, DuCa) and adaptive steps. (Explicit schedules: the suite's runs
# are 3 steps, so that a cached step already has two computed outputs to forecast from.)
VARIANTS = {
    "toca_taylor": ("toca", {"forecast": "taylor", "order": 1, "warmup": 2}),
    "duca_hermite": ("duca", {"forecast": "hermite", "aggressive": "sublayers", "warmup": 2}),
    "fora_adaptive": ("fora", {"threshold": 1e9, "forecast": "taylor"}),
}


def _kind(name: str) -> type:
    return EXAMPLES.get(name) or method_class(VARIANTS.get(name, (name,))[0])


NAMES = diffaccel.available_methods() + sorted(EXAMPLES) + sorted(VARIANTS)
METHODS = [m for m in NAMES if not _kind(m).caches]
CACHING = [m for m in NAMES if _kind(m).caches]  # they reuse (parts of) sub-layer outputs
ZERO = {m: _kind(m).zero for m in NAMES}
# Explicit strengths: the tiny models are far too small for the cost model to let the defaults act.
EXPLICIT = {"tome": {"ratio": 0.5}, "todo": {"factor": 2.0}, "sito": {"ratio": 0.5},
            "taylorseer": {"interval": 3, "warmup": 2}}

CASES = [(f, m) for f in FAMILIES for m in METHODS + CACHING]
# ToDo pools keys/values inside joint or rotary attention, where ToMe has taken the tokens off their
# grid: that pair is refused there (tested below) and composes on the plain families.
CASES_COMPOSED = ([(f, ("todo", "tome")) for f in PLAIN_FAMILIES]
                  + [(f, m) for f in FAMILIES for m in (("fora", "tome"), ("toca", "todo"))])


def accelerate(pipe, family, method, **kw):
    """accelerate_pipeline at explicit strengths, checking that it warns about nothing."""
    names = method if isinstance(method, tuple) else (method,)
    for m in names:
        for k, v in {**EXPLICIT.get(m, {}), **VARIANTS.get(m, ("", {}))[1]}.items():
            kw.setdefault(k, v)
    if family == "wan22" and "warmup" in kw:  # two experts share the 3 steps: no warm-up step to spare
        kw["warmup"] = 0
    names = tuple(VARIANTS.get(m, (m,))[0] for m in names)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return accelerate_pipeline(pipe, list(names) if len(names) > 1 else names[0], **kw)


@pytest.mark.parametrize("family,method", CASES)
def test_zero_strength_is_bit_exact(make_case, family, method):
    case = make_case(family)
    base = case.run()
    accelerate(case.pipe, family, method, **ZERO[method])
    assert torch.equal(case.run(), base)


@pytest.mark.parametrize("family,method", CASES + CASES_COMPOSED)
def test_acts_and_removal_is_bit_exact(make_case, family, method):
    case = make_case(family)
    base = case.run()
    before = snapshot(case.pipe)
    accelerate(case.pipe, family, method)
    out = case.run()
    info = describe(case.pipe)
    done = [v for d in info["denoisers"] for s in d["sites"] for v in s["last_run"].values()]
    assert not torch.equal(out, base), "the method changed nothing"
    reduced = [v for v in done if v["computed"] < v["tokens"] or v["keys_values"] < v["tokens"]]
    caching = any(m in CACHING for m in (method if isinstance(method, tuple) else (method,)))
    assert done and (reduced == done or caching), done
    if caching:  # interval 3 over 3 steps: computed at a denoiser's first step, then (partly) reused
        assert [v for v in done if v["computed"] == 0], done
    remove_acceleration(case.pipe)
    assert snapshot(case.pipe) == before
    assert torch.equal(case.run(), base)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["scheduler", "site"])
def test_failing_apply_leaves_pipeline_as_it_was(make_case, family, where, monkeypatch):
    case = make_case(family)
    base = case.run()
    before = snapshot(case.pipe)
    if where == "scheduler":
        monkeypatch.setattr(diffaccel.runtime.RunClock, "attach", lambda self, pipe: (_ for _ in ()).throw(Boom()))
    else:  # fail while hooking the second site
        real, count = diffaccel.runtime.SiteHook.__init__, [0]

        def flaky(self, *a, **k):
            count[0] += 1
            if count[0] == 2:
                raise Boom()
            real(self, *a, **k)

        monkeypatch.setattr(diffaccel.runtime.SiteHook, "__init__", flaky)
    with pytest.raises(Boom), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        accelerate_pipeline(case.pipe, ["fora", "tome"])  # several sites on every family, even one-block ones
    monkeypatch.undo()
    assert snapshot(case.pipe) == before
    assert not is_accelerated(case.pipe)
    assert torch.equal(case.run(), base)


def _changes(family):
    ch = ["batch", "steps", "guidance"]
    if make_case_sizes(family):
        ch.append("size")
    return ch


def make_case_sizes(family):
    return family != "dit"  # DiTPipeline has a fixed sample size


# (the example methods run the rest of the suite; state carried between calls is the runtime's, which
# the registered caching methods exercise here)
CHANGE_CASES = [(f, m, c) for f, m in CASES for c in _changes(f) if m not in EXAMPLES and m not in VARIANTS]
# the variants keep state across calls too (forecast differences, adaptive references): one change each
CHANGE_CASES += [(f, m, c) for f in ("pixart", "flux") for m in VARIANTS for c in ("steps", "size", "batch")]


@pytest.mark.slow
@pytest.mark.parametrize("family,method,change", CHANGE_CASES)
def test_consecutive_calls_equal_a_fresh_pipeline(make_case, family, method, change):
    case = make_case(family)
    accelerate(case.pipe, family, method)
    case.run(steps=3)
    alt = case.size_alt
    kwargs = {"size": {"size": alt}, "batch": {"batch": 2}, "steps": {"steps": 5},
              "guidance": {"guidance": False}}[change]
    out = case.run(**kwargs)
    fresh = make_case(family)
    accelerate(fresh.pipe, family, method)
    assert torch.equal(out, fresh.run(**kwargs))


@pytest.mark.parametrize("family,method", CASES)
def test_exception_inside_a_call_leaves_the_next_call_correct(make_case, family, method):
    case = make_case(family)
    accelerate(case.pipe, family, method)
    model = case.pipe.unet if hasattr(case.pipe, "unet") else case.pipe.transformer
    sites = describe(case.pipe)["denoisers"][0]["sites"]
    acting = [model.get_submodule(s["name"]) for s in sites
              if any(m["acts"] for m in s["methods"].values())] or \
        [model.get_submodule(sites[0]["name"])]
    calls = [0]

    def raise_on_second_step(module, args, kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise Boom()

    handle = acting[-1].register_forward_pre_hook(raise_on_second_step, with_kwargs=True)
    with pytest.raises(Boom):
        case.run(steps=4)
    handle.remove()
    out = case.run(steps=3)
    fresh = make_case(family)
    accelerate(fresh.pipe, family, method)
    assert torch.equal(out, fresh.run(steps=3))


@pytest.mark.parametrize("family,method", CASES)
def test_fixed_seed_is_deterministic_and_odd_batches_work(make_case, family, method):
    case = make_case(family)
    accelerate(case.pipe, family, method)
    assert torch.equal(case.run(seed=3), case.run(seed=3))
    odd = case.run(batch=3)
    assert odd.shape[0] == 3 and torch.isfinite(odd).all()


@pytest.mark.parametrize("family", ["sd1", "sdxl", "animatediff", "pixart", "dit", "sd3", "cogvideox", "ltx"])
def test_batched_cfg_halves_share_the_selection(make_case, family):
    """With batched CFG, every site call reduces the cond and uncond rows with the same tokens."""
    case = make_case(family)
    accelerate_pipeline(case.pipe, "sito", ratio=0.5)
    seen = capture_reductions(case, batch=2, guidance=True)
    assert seen and all(batched for batched, _, _ in seen)
    for _, red, _ in seen:
        half = red.keep_idx.shape[0] // 2
        assert torch.equal(red.keep_idx[:half], red.keep_idx[half:])
        assert torch.equal(red.fold_idx[:half], red.fold_idx[half:])


def capture_reductions(case, **run) -> list:
    """(whether the call was a batched CFG pair, the reduction, the site) of every call SiTo reduced in a run."""
    with recorded_reductions(diffaccel.SiToConfig) as seen:
        case.run(**run)
    return [(batched, reduction, site) for site, batched, reduction in seen]


def test_cfg_off_selects_per_row(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "sito", ratio=0.5)
    seen = capture_reductions(case, batch=2, guidance=False)
    seen = [r for _, r, site in seen if site == seen[0][2]]  # the first site's reductions
    assert seen and not any(torch.equal(r.keep_idx[0], r.keep_idx[1]) for r in seen)


# -- bad input ----------------------------------------------------------------------------------


BAD = [
    (("nope",), {}, ValueError, r"unknown method 'nope'; available: \['duca', 'fora', 'sito', 'taylorseer', 'toca', 'todo', 'tome'\]"),
    (("tome",), {"ratio": 1.5}, ValueError, r"ToMeConfig.ratio must be in \[0.0, 0.75\]"),
    (("tome",), {"ratio": -0.1}, ValueError, r"ToMeConfig.ratio must be in"),
    (("tome",), {"ratio": "0.5"}, TypeError, r"ToMeConfig.ratio must be a number"),
    (("tome",), {"sx": 2.5}, TypeError, r"ToMeConfig.sx must be an int"),
    (("todo",), {"factor": 0.5}, ValueError, r"ToDoConfig.factor must be in \[1.0, 64.0\]"),
    (("todo",), {"mode": "linear"}, ValueError,
     r"ToDoConfig.mode must be one of \['nearest-exact', 'nearest', 'bilinear', 'bicubic', 'avg', 'max'\]"),
    (("todo",), {"factor": "big"}, ValueError, r"ToDoConfig.factor must be a number in \[1.0, 64.0\] or 'auto'"),
    (("tome",), {"max_downsample": 3}, ValueError, r"ToMeConfig.max_downsample must be one of \[1, 2, 4, 8\]"),
    (("sito",), {"prune_ratio": 0.9}, ValueError, r"SiToConfig.ratio must be in \[0.0, 0.75\]"),
    (("sito",), {"noise": -1}, ValueError, r"SiToConfig.noise must be in"),
    (("tome",), {"colour": 1}, TypeError, r"unknown option 'colour' for tome; allowed: \["),
    ((["tome", "sito"],), {"ratio": 0.3}, ValueError, r"option 'ratio' fits several methods"),
    ((["tome", "tome"],), {}, ValueError, r"each method may be given once"),
    (([],), {}, ValueError, r"no method given"),
    ((3,), {}, TypeError, r"a method is a registered name, a config object"),
    (("tome",), {"policy": "{broken"}, ValueError, r"malformed policy JSON"),
    (("tome",), {"policy": {"rules": [{"select": {"kind": "attn"}}]}}, ValueError, r"unknown site kind 'attn'"),
    (("tome",), {"num_steps": 0}, ValueError, r"num_steps must be a positive int"),
    (("tome",), {"cfg_batched": True}, ValueError, r"cfg_batched is for bare denoisers"),
    (("tome",), {"cfg_batched": "yes"}, TypeError, r"cfg_batched must be True or False"),
    ((["tome", "sito"],), {}, ValueError, r"tome and sito would both reduce the tokens of"),
    (("tome",), {"st": -1}, ValueError, r"ToMeConfig.st must be in \[0, 64\]"),
    (("tome",), {"cost_model": "yes"}, TypeError, r"ToMeConfig.cost_model must be True or False"),
    (("todo",), {"factor_t": 0.5}, ValueError, r"ToDoConfig.factor_t must be 0 \(auto\) or in \[1, 64\]"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", BAD)
def test_bad_input_raises_clear_error_and_changes_nothing(make_case, args, kwargs, exc, match):
    case = make_case("sd1")
    before = snapshot(case.pipe)
    with pytest.raises(exc, match=match):
        accelerate_pipeline(case.pipe, *args, **kwargs)
    assert snapshot(case.pipe) == before


def test_unsupported_models_name_the_supported_families():
    with pytest.raises(diffaccel.UnsupportedModelError, match="supported families: SD 1.x/2.x, SDXL, AnimateDiff, PixArt"):
        accelerate_pipeline(torch.nn.Linear(4, 4), "tome")
    with pytest.raises(diffaccel.UnsupportedModelError, match="has no denoiser"):
        accelerate_pipeline(object(), "tome")


def test_accelerating_twice_is_refused_and_removal_is_idempotent(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "tome")
    with pytest.raises(RuntimeError, match="already accelerated"):
        accelerate_pipeline(case.pipe, "todo")
    remove_acceleration(case.pipe)
    remove_acceleration(case.pipe)
    accelerate_pipeline(case.pipe, "todo")  # fine after removal


def test_config_objects_and_dicts_are_accepted(make_case):
    a, b, c = make_case("sd1"), make_case("sd1"), make_case("sd1")
    accelerate_pipeline(a.pipe, "tome", ratio=0.4)
    accelerate_pipeline(b.pipe, diffaccel.ToMeConfig(ratio=0.4))
    accelerate_pipeline(c.pipe, {"method": "tome", "ratio": 0.4})
    assert torch.equal(a.run(), b.run()) and torch.equal(a.run(), c.run())


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "wan"])
def test_exception_from_a_step_callback_leaves_the_next_call_correct(make_case, family):
    method = "tome" if family in PLAIN_FAMILIES else "todo"
    case = make_case(family)
    accelerate(case.pipe, family, method)

    def stop_at_step_1(pipe, step, timestep, callback_kwargs):
        if step == 1:
            raise Boom()
        return callback_kwargs

    with pytest.raises(Boom):
        case.run(steps=4, callback_on_step_end=stop_at_step_1)
    out = case.run(steps=3)
    fresh = make_case(family)
    accelerate(fresh.pipe, family, method)
    assert torch.equal(out, fresh.run(steps=3))


@pytest.mark.parametrize("family", ["flux", "wan", "sd3"])
def test_todo_with_tome_inside_joint_or_rotary_attention_is_refused(make_case, family):
    case = make_case(family)
    before = snapshot(case.pipe)
    with pytest.raises(ValueError, match=r"todo pools keys/values inside the attention of .* where tome has"):
        accelerate_pipeline(case.pipe, ["todo", "tome"])
    assert snapshot(case.pipe) == before
