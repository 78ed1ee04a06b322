"""The contract every method fulfils on every family (parametrized): identity at zero strength,
bit-exact removal, atomic apply, clear errors, fresh state per call, robustness, determinism."""

import warnings

import pytest
import torch

import diffaccel
from diffaccel import accelerate_pipeline, describe, remove_acceleration
from diffaccel.api import installation
from diffaccel.pipelines import DENOISER_ATTRS

TOKEN_FAMILIES = ["sd1", "sdxl", "pixart", "dit"]  # families the token methods act on
OTHER_FAMILIES = ["sd3", "sd35", "flux", "cogvideox", "wan", "wan22", "hunyuan_video", "ltx"]
METHODS = ["tome", "todo", "sito"]
CACHING = ["fora", "toca", "duca"]  # act on every family: they reuse (parts of) sub-layer outputs
ZERO = {"tome": {"ratio": 0.0}, "todo": {"factor": 1.0}, "sito": {"ratio": 0.0}, "fora": {"interval": 1},
        "toca": {"fresh_ratio": 1.0}, "duca": {"interval": 1}}

CASES = ([(f, m) for f in TOKEN_FAMILIES for m in METHODS] + [(f, "tome") for f in OTHER_FAMILIES]
         + [(f, m) for f in TOKEN_FAMILIES + OTHER_FAMILIES for m in CACHING])
CASES_COMPOSED = [(f, m) for f in TOKEN_FAMILIES for m in (("todo", "tome"), ("fora", "tome"), ("toca", "todo"))]


def acts_on(family, method):
    names = method if isinstance(method, tuple) else (method,)
    return family in TOKEN_FAMILIES or any(m in CACHING for m in names)


def accelerate(pipe, family, method, **kw):
    """accelerate_pipeline, checking the warning that families the methods skip must give."""
    if not acts_on(family, method):
        with pytest.warns(UserWarning, match="acts on no site"):
            return accelerate_pipeline(pipe, list(method) if isinstance(method, tuple) else method, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return accelerate_pipeline(pipe, list(method) if isinstance(method, tuple) else method, **kw)


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
    if acts_on(family, method):
        assert not torch.equal(out, base), "the method changed nothing"
        reduced = [v for v in done if v["computed"] < v["tokens"] or v["keys_values"] < v["tokens"]]
        caching = any(m in CACHING for m in (method if isinstance(method, tuple) else (method,)))
        assert done and (reduced == done or caching), done
        if caching:  # interval 3 over 3 steps: computed at a denoiser's first step, then (partly) reused
            assert [v for v in done if v["computed"] == 0], done
    else:
        assert torch.equal(out, base) and not done
    remove_acceleration(case.pipe)
    assert snapshot(case.pipe) == before
    assert torch.equal(case.run(), base)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("family", TOKEN_FAMILIES + OTHER_FAMILIES)
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
        if family in OTHER_FAMILIES:  # nothing hooks sites there: fail in the denoiser hook instead
            monkeypatch.setattr(diffaccel.api.Tracker, "__init__", lambda *a, **k: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        accelerate_pipeline(case.pipe, "tome")
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


@pytest.mark.parametrize("family", TOKEN_FAMILIES)
def test_batched_cfg_halves_share_the_selection(make_case, family):
    """With batched CFG, every site call reduces the cond and uncond rows with the same tokens."""
    case = make_case(family)
    accelerate_pipeline(case.pipe, "sito")
    st = installation(case.pipe).denoisers[0]
    seen = []

    def capture(module, args, kwargs, output):
        hook = next(h for h in st.hooks if h.site.module is module)
        reduction = hook._restores[0].__self__ if hook._restores else None
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
    accelerate_pipeline(case.pipe, "sito")
    st = installation(case.pipe).denoisers[0]
    seen = []
    hook = st.hooks[0]
    handle = hook.site.module.register_forward_hook(
        lambda m, a, k, o: seen.append(hook._restores[0].__self__), with_kwargs=True, prepend=True)
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
    (("todo",), {"mode": "bilinear"}, ValueError, r"ToDoConfig.mode must be one of \['nearest', 'avg', 'max'\]"),
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
]


@pytest.mark.parametrize("args,kwargs,exc,match", BAD)
def test_bad_input_raises_clear_error_and_changes_nothing(make_case, args, kwargs, exc, match):
    case = make_case("sd1")
    before = snapshot(case.pipe)
    with pytest.raises(exc, match=match):
        accelerate_pipeline(case.pipe, *args, **kwargs)
    assert snapshot(case.pipe) == before


def test_unsupported_models_name_the_supported_families():
    with pytest.raises(diffaccel.UnsupportedModelError, match="supported families: SD 1.x/2.x, SDXL, PixArt"):
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
    method = "tome" if family in TOKEN_FAMILIES else "todo"
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
