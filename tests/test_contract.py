"""The contract every method fulfils on every family (parametrized): identity at zero strength,
bit-exact removal, atomic apply, clear errors, fresh state per call, robustness, determinism."""

import warnings

import pytest
import torch

import diffaccel
from diffaccel import accelerate_pipeline, describe, remove_acceleration
from diffaccel.api import installation
from diffaccel.pipelines import DENOISER_ATTRS

PLAIN_FAMILIES = ["sd1", "sdxl", "animatediff", "pixart", "dit"]  # image tokens only, plain attention processors
JOINT_FAMILIES = ["sd3", "sd35", "flux", "cogvideox", "wan", "wan22", "hunyuan_video", "ltx"]  # text or RoPE
FAMILIES = PLAIN_FAMILIES + JOINT_FAMILIES
METHODS = ["tome", "todo", "sito"]
CACHING = ["fora", "toca", "duca"]  # they reuse (parts of) sub-layer outputs
ZERO = {"tome": {"ratio": 0.0}, "todo": {"factor": 1.0}, "sito": {"ratio": 0.0}, "fora": {"interval": 1},
        "toca": {"fresh_ratio": 1.0}, "duca": {"interval": 1}}
# Explicit strengths: the tiny models are far too small for the cost model to let the defaults act.
EXPLICIT = {"tome": {"ratio": 0.5}, "todo": {"factor": 2.0}, "sito": {"ratio": 0.5}}

CASES = [(f, m) for f in FAMILIES for m in METHODS + CACHING]
# ToDo pools keys/values inside joint or rotary attention, where ToMe has taken the tokens off their
# grid: that pair is refused there (tested below) and composes on the plain families.
CASES_COMPOSED = ([(f, ("todo", "tome")) for f in PLAIN_FAMILIES]
                  + [(f, m) for f in FAMILIES for m in (("fora", "tome"), ("toca", "todo"))])


def accelerate(pipe, family, method, **kw):
    """accelerate_pipeline at explicit strengths, checking that it warns about nothing."""
    names = method if isinstance(method, tuple) else (method,)
    for m in names:
        for k, v in EXPLICIT.get(m, {}).items():
            kw.setdefault(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return accelerate_pipeline(pipe, list(names) if len(names) > 1 else names[0], **kw)


def snapshot(pipe):
    """Everything acceleration may touch: hooks on every module, processors, attributes, scheduler."""
    state = {"pipe": sorted(pipe.__dict__), "scheduler": sorted(pipe.scheduler.__dict__)}
    for attr in DENOISER_ATTRS:
        model = getattr(pipe, attr, None)
        if model is None:
            continue
        state[attr] = sorted(model.__dict__)
        for name, m in model.named_modules():
            state[f"{attr}.{name}"] = (
                tuple(m._forward_pre_hooks), tuple(m._forward_hooks), id(getattr(m, "processor", None)),
                type(m).forward is m.forward.__func__ if hasattr(m.forward, "__func__") else False,
            )
    return state


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
    assert installation(case.pipe) is None
    assert torch.equal(case.run(), base)


def _changes(family):
    ch = ["batch", "steps", "guidance"]
    if make_case_sizes(family):
        ch.append("size")
    return ch


def make_case_sizes(family):
    return family != "dit"  # DiTPipeline has a fixed sample size


CHANGE_CASES = [(f, m, c) for f, m in CASES for c in _changes(f)]


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
    st = installation(case.pipe).denoisers[0]
    acting = [h.site.module for h in st.hooks] or [st.sites[0].module]
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
    st = installation(case.pipe).denoisers[0]
    seen = []

    def capture(module, args, kwargs, output):
        hook = next(h for h in st.hooks if h.site.module is module)
        reduction = hook._restores[0].reduction if hook._restores else None
        seen.append((st.tracker.ctx.cfg_batched, reduction))

    handles = [h.site.module.register_forward_hook(capture, with_kwargs=True, prepend=True) for h in st.hooks]
    case.run(batch=2, guidance=True)
    for h in handles:
        h.remove()
    assert seen and all(batched for batched, _ in seen)
    for _, red in seen:
        half = red.keep_idx.shape[0] // 2
        assert torch.equal(red.keep_idx[:half], red.keep_idx[half:])
        assert torch.equal(red.fold_idx[:half], red.fold_idx[half:])


def test_cfg_off_selects_per_row(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "sito", ratio=0.5)
    st = installation(case.pipe).denoisers[0]
    seen = []
    hook = st.hooks[0]
    handle = hook.site.module.register_forward_hook(
        lambda m, a, k, o: seen.append(hook._restores[0].reduction), with_kwargs=True, prepend=True)
    case.run(batch=2, guidance=False)
    handle.remove()
    assert seen and not any(torch.equal(r.keep_idx[0], r.keep_idx[1]) for r in seen)


# -- bad input ----------------------------------------------------------------------------------


BAD = [
    (("nope",), {}, ValueError, r"unknown method 'nope'; available: \['duca', 'fora', 'sito', 'toca', 'todo', 'tome'\]"),
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
