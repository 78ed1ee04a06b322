"""Caching methods (FORA): what is reused, when, for whom; cache lifetime; composition; errors.
The contract suite (test_contract.py) runs FORA over every family as well."""

import pytest
import torch

import diffaccel
from diffaccel import accelerate_pipeline, describe, is_accelerated, remove_acceleration
from diffaccel.api import installation


@pytest.mark.parametrize("interval", [2, 3])
def test_fora_reuses_the_stored_output_and_skips_the_sublayer(make_case, interval):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "fora", interval=interval)
    st = installation(case.pipe).denoisers[0]
    outs, calls, handles = {}, {}, []
    for hook in st.hooks:
        name = hook.site.name
        outs[name], calls[name] = [], 0
        handles.append(hook.site.module.register_forward_hook(
            lambda m, a, k, o, name=name: outs[name].append(o.detach().clone()), with_kwargs=True))
        first_linear = next(m for m in hook.site.module.modules() if isinstance(m, torch.nn.Linear))
        handles.append(first_linear.register_forward_pre_hook(
            lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1)))
    steps = 5
    case.run(steps=steps)
    for h in handles:
        h.remove()
    computed = [s for s in range(steps) if s % interval == 0 or s == steps - 1]  # FORA's code computes the last
    assert st.hooks and all(len(o) == steps for o in outs.values())
    for name, seq in outs.items():
        assert calls[name] == len(computed), name  # the sub-layer's own modules ran on computed steps only
        for s in range(steps):
            source = max(c for c in computed if c <= s)
            assert torch.equal(seq[s], seq[source])  # reused steps return exactly the stored output
        assert not torch.equal(seq[0], seq[interval])  # and computed steps compute afresh
    log = describe(case.pipe)["denoisers"][0]["sites"][0]["last_run"]
    assert [v["computed"] == 0 for v in log.values()] == [s not in computed for s in range(steps)]


def test_fora_interval_one_and_zero_strength_policies_equal_the_baseline(make_case):
    case = make_case("pixart")
    base = case.run(steps=4)
    accelerate_pipeline(case.pipe, "fora", interval=1)
    assert torch.equal(case.run(steps=4), base)
    remove_acceleration(case.pipe)
    # warm-up longer than the run: everything is computed
    accelerate_pipeline(case.pipe, "fora", interval=3, warmup=4)
    assert torch.equal(case.run(steps=4), base)


def test_fora_warmup_computes_the_first_steps(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, diffaccel.FORAConfig(interval=2, warmup=3))
    case.run(steps=7)
    log = describe(case.pipe)["denoisers"][0]["sites"][0]["last_run"]
    # steps 0, 1, 2 warm-up (0, 1 idle: not logged); the last, step 2, begins the first cycle: the
    # step right after the warm-up is already reused, as ToCa's first_enhance does
    assert {s: v["computed"] == 0 for s, v in log.items()} == {2: False, 3: True, 4: False, 5: True, 6: False}
    # warm-up 1 is warm-up 0: a run's first step is computed anyway
    for warmup in (0, 1):
        remove_acceleration(case.pipe)
        accelerate_pipeline(case.pipe, diffaccel.FORAConfig(interval=2, warmup=warmup))
        case.run(steps=3)
        log = describe(case.pipe)["denoisers"][0]["sites"][0]["last_run"]
        assert {s: v["computed"] == 0 for s, v in log.items()} == {0: False, 1: True, 2: False}


def test_cache_is_released_at_the_end_of_each_call_and_reported(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "fora")
    tracker = installation(case.pipe).denoisers[0].tracker
    held = []

    def peek(pipe, step, timestep, callback_kwargs):
        held.append(len(tracker.cache))
        return callback_kwargs

    case.run(steps=4, callback_on_step_end=peek)
    sites = len(installation(case.pipe).denoisers[0].hooks)
    assert held == [sites] * 3 + [0]  # the last step's callback comes after the run ended
    d = describe(case.pipe)["denoisers"][0]
    assert d["cache"]["entries"] == 0 and d["cache"]["bytes"] == 0 and d["cache"]["peak_bytes"] > 0
    assert "cache:" in str(describe(case.pipe))


def test_separate_cfg_calls_keep_separate_caches(make_case):
    """Flux with true CFG calls the transformer for cond, then uncond: each branch has its own cache."""
    case = make_case("flux")
    accelerate_pipeline(case.pipe, "fora", interval=2)
    tracker = installation(case.pipe).denoisers[0].tracker
    branches = []
    handle = case.pipe.transformer.register_forward_hook(
        lambda m, a, o: branches.append(sorted({k[0] for k in tracker.cache})))
    case.run(steps=3, guidance=True)
    handle.remove()
    assert branches[:2] == [["cond"], ["cond", "uncond"]], branches


def test_batched_cfg_caches_both_halves_in_one_entry(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "fora")
    tracker = installation(case.pipe).denoisers[0].tracker
    sizes = []
    case.run(steps=2, batch=2, guidance=True,
             callback_on_step_end=lambda p, s, t, kw: (sizes.append(
                 {k[0]: e.output.shape[0] for k, e in tracker.cache.items()}), kw)[1])
    assert sizes[0] == {"cond_uncond": 4}


def test_fora_composes_with_tome(make_case):
    case = make_case("sd1")
    base = case.run(steps=4)
    accelerate_pipeline(case.pipe, ["fora", "tome"])
    out = case.run(steps=4)
    log = describe(case.pipe)["denoisers"][0]["sites"][0]["last_run"]
    assert log[0]["computed"] < log[0]["tokens"]  # ToMe merged on the computed step
    assert log[1]["computed"] == 0  # FORA reused the restored full output
    assert not torch.equal(out, base)
    remove_acceleration(case.pipe)
    assert torch.equal(case.run(steps=4), base)


def test_fora_keeps_another_forward_wrapper_and_restores_it(make_case):
    """Libraries (accelerate's offload hooks) replace module.forward on the instance; we wrap theirs."""
    case = make_case("sd1")
    base = case.run(steps=3)
    st_sites = diffaccel.describe(case.pipe)["denoisers"][0]["sites"]
    module = case.pipe.unet.get_submodule(st_sites[0]["name"])
    inner = module.forward
    calls = [0]

    def theirs(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    module.forward = theirs
    accelerate_pipeline(case.pipe, "fora", interval=2)
    case.run(steps=3)
    assert calls[0] == 2  # computed at steps 0 and 2 (one call per step: CFG halves are batched)
    remove_acceleration(case.pipe)
    assert module.__dict__["forward"] is theirs
    del module.forward
    assert torch.equal(case.run(steps=3), base)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"interval": 0}, ValueError, r"FORAConfig.interval must be in \[1, 1000\]"),
    ({"interval": 2.5}, TypeError, r"FORAConfig.interval must be an int"),
    ({"warmup": -1}, ValueError, r"FORAConfig.warmup must be in"),
    ({"policy": {"rules": [{"params": {"ratio": 0.5}}]}}, ValueError, r"policy sets \['ratio'\], which fora"),
])
def test_fora_bad_input_is_refused(make_case, kwargs, exc, match):
    case = make_case("sd1")
    with pytest.raises(exc, match=match):
        accelerate_pipeline(case.pipe, "fora", **kwargs)
    assert not is_accelerated(case.pipe)


def test_fora_reuse_saves_sublayer_flops(make_case):
    from torch.utils.flop_counter import FlopCounterMode

    case = make_case("pixart")
    with FlopCounterMode(display=False) as base:
        case.run(steps=6)
    accelerate_pipeline(case.pipe, "fora", interval=3)
    with FlopCounterMode(display=False) as fora:
        case.run(steps=6)
    assert fora.get_total_flops() < base.get_total_flops()


def test_bare_denoiser_of_a_separate_cfg_family_is_one_branch(make_case):
    """A bare Flux transformer: every call is a step of one branch, so reuse follows the interval."""
    case = make_case("flux")
    calls = []
    handle = case.pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    case.run(steps=4)
    handle.remove()
    transformer = case.pipe.transformer
    accelerate_pipeline(transformer, "fora", interval=2, num_steps=4)
    for args, kwargs in calls:
        transformer(*args, **kwargs)
    log = describe(transformer)["denoisers"][0]["sites"][0]["last_run"]
    assert [log[s]["computed"] == 0 for s in range(4)] == [False, True, False, False]  # the last is computed


@pytest.mark.parametrize("steps,computed", [(7, [0, 3, 6]), (8, [0, 3, 6, 7]), (5, [0, 3, 4])])
def test_fora_computes_the_last_step(make_case, steps, computed):
    """FORA's code computes the run's last step whatever the interval: its output becomes the image."""
    case = make_case("pixart")
    accelerate_pipeline(case.pipe, "fora", interval=3)
    case.run(steps=steps)
    for site in describe(case.pipe)["denoisers"][0]["sites"]:
        log = site["last_run"]
        assert [s for s in range(steps) if log[s]["computed"]] == computed, site["name"]
