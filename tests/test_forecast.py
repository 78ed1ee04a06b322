"""Forecasting cached features (TaylorSeer's and HiCache's forecasts, token-wise for ToCa and DuCa) and
adaptive step decisions: exact where they must be exact, the same as reuse or the static schedule at
their limits, recorded, bounded in memory, one host read per step."""

import math
import warnings

import pytest
import torch

from diffaccel import (
    DuCaConfig,
    FORAConfig,
    Policy,
    Rule,
    Selector,
    TaylorSeerConfig,
    ToCaConfig,
    accelerate_pipeline,
    describe,
    is_accelerated,
    remove_acceleration,
)
from diffaccel.call import CacheEntry
from diffaccel.methods.forecast import predict, push, weights


def _history(f, knots, order):
    entry = None
    for x in knots:
        new = CacheEntry(f(x), x, None)
        push(new, entry, x, order)
        entry = new
    return entry


@pytest.mark.parametrize("order,f", [
    (1, lambda t: torch.tensor([1.0 + 2.0 * t, -3.0 * t], dtype=torch.float64)),
    (2, lambda t: torch.tensor([1.0 + 2.0 * t - 0.5 * t * t, 0.25 * t * t], dtype=torch.float64)),
    (3, lambda t: torch.tensor([t**3 - 2 * t, 1.0], dtype=torch.float64)),
])
@pytest.mark.parametrize("knots", [[1, 4, 7, 10], [1, 2, 3, 9], [2, 3, 7, 11]])
def test_taylor_forecast_is_exact_for_a_feature_polynomial_in_the_step(order, f, knots):
    entry = _history(f, knots, order)
    assert entry.extra["knots"] == list(reversed(knots))[:order + 1]
    assert len(entry.extra["diffs"]) == order
    for t in range(knots[-1] + 1, knots[-1] + 7):
        torch.testing.assert_close(predict(entry, t, order, "taylor"), f(t), rtol=1e-12, atol=1e-9)
    if order > 1:  # one order less is not exact (the test could fail)
        assert not torch.allclose(predict(entry, knots[-1] + 3, order - 1, "taylor"), f(knots[-1] + 3))


def test_forecast_with_fewer_knots_than_its_order_uses_the_order_they_allow():
    f = lambda t: torch.tensor([5.0 - t], dtype=torch.float64)  # noqa: E731
    one = _history(f, [4], 2)
    assert predict(one, 6, 2, "taylor") is one.output  # a single knot: the output itself
    two = _history(f, [1, 4], 2)
    torch.testing.assert_close(predict(two, 7, 2, "taylor"), f(7))
    assert predict(two, 7, 0, "taylor") is two.output  # order 0 is reuse
    # the run's first step (pure noise) starts no difference: a history through it serves as reuse
    first = _history(f, [0, 4], 2)
    assert first.extra["knots"] == [4] and predict(first, 7, 2, "taylor") is first.output
    assert _history(f, [0, 4, 8], 2).extra["knots"] == [8, 4]


def test_hermite_forecast_is_hicaches_formula():
    """F = f0 + sum_k f^(k) sigma^k H_k(sigma s) / k!, the derivatives those of the polynomial through
    the knots at the last one (physicists' Hermite polynomials)."""
    sigma, x0, x1, s = 0.5, 6, 3, 2.0
    w = weights(x0 + s, [x0, x1, 0], 2, "hermite", sigma)
    h1, h2 = 2 * sigma * s, 4 * (sigma * s) ** 2 - 2
    # Newton's d2 multiplies (t - x0)(t - x1) = s^2 + (x0 - x1) s: f''/2 = d2 and d2's share of f'
    assert w[0] == 1.0
    assert math.isclose(w[1], sigma * h1)  # 2 sigma^2 s: half the Taylor step at sigma = 0.5
    assert math.isclose(w[2], sigma**2 * h2 + (x0 - x1) * sigma * h1)
    assert weights(x0 + s, [x0, x1, 0], 2, "taylor", sigma) == [1.0, s, s * (s + x0 - x1)]


def test_forecast_keeps_the_outputs_dtype():
    f = lambda t: torch.full((2, 3), float(t), dtype=torch.bfloat16)  # noqa: E731
    entry = _history(f, [1, 3], 1)
    assert entry.extra["diffs"][0].dtype == torch.bfloat16
    assert predict(entry, 4, 1, "taylor").dtype == torch.bfloat16
    tup = _history(lambda t: (f(t), None, f(2 * t)), [1, 3], 1)
    out = predict(tup, 4, 1, "taylor")
    assert out[1] is None and torch.equal(out[0], f(4)) and torch.equal(out[2], f(8))


def _run(case, spec=None, steps=8, **kw):
    if spec is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            accelerate_pipeline(case.pipe, spec, **kw)
    out = case.run(steps=steps)
    info = describe(case.pipe) if spec is not None else None
    if spec is not None:
        remove_acceleration(case.pipe)
    return out, info


def _computed_steps(info) -> list[int]:
    """The steps at which some site computed (a caching method's full or partial steps)."""
    sites = info["denoisers"][0]["sites"]
    steps = {s for site in sites for s, v in site["last_run"].items() if v["computed"]}
    return sorted(steps)


def _full_steps(info) -> list[int]:
    sites = [s for s in info["denoisers"][0]["sites"] if s["last_run"]]
    steps = sorted(sites[0]["last_run"])
    return [s for s in steps if all(site["last_run"][s]["computed"] == site["last_run"][s]["tokens"]
                                    for site in sites if s in site["last_run"])]


@pytest.mark.parametrize("family", ["pixart", "flux"])
@pytest.mark.parametrize("spec,opts", [
    ("fora", {"interval": 2}),
    ("toca", {"interval": 3, "fresh_ratio": 0.3}),
    ("duca", {"interval": 3, "aggressive": "sublayers"}),
    ("taylorseer", {"interval": 3, "warmup": 2}),
])
def test_forecast_order_zero_is_reuse_bit_for_bit(make_case, family, spec, opts):
    case = make_case(family)
    reuse, _ = _run(case, spec, **opts, forecast="reuse")
    for forecast in ("taylor", "hermite"):
        out, _ = _run(case, spec, **opts, forecast=forecast, order=0)
        assert torch.equal(out, reuse)
    forecast, _ = _run(case, spec, **opts, forecast="taylor", order=1)
    assert not torch.equal(forecast, reuse)  # the forecast acts (two computed steps before a cached one)


@pytest.mark.parametrize("spec,opts", [
    ("fora", {"interval": 3}),
    ("toca", {"interval": 3, "fresh_ratio": 0.3}),
    ("duca", {"interval": 3, "fresh_ratio": 0.5, "aggressive": "sublayers"}),
])
def test_forecast_computes_what_reuse_computes(make_case, spec, opts):
    case = make_case("pixart")
    _, reuse = _run(case, spec, steps=8, **opts)
    _, forecast = _run(case, spec, steps=8, **opts, forecast="taylor", order=1)
    for a, b in zip(reuse["denoisers"][0]["sites"], forecast["denoisers"][0]["sites"]):
        assert a["last_run"] == b["last_run"]


def test_taylorseer_follows_the_papers_flux_schedule(make_case):
    """FLUX.1-dev's setting over 50 steps: full steps 0, 1, 2, 8, ..., 44; 45-49 forecast."""
    case = make_case("pixart")
    assert TaylorSeerConfig() == TaylorSeerConfig(interval=6, warmup=3, forecast="taylor", order=2)
    _, info = _run(case, "taylorseer", steps=50)
    # (steps 0 and 1 run without the method: its policy starts at the last warm-up step)
    assert _computed_steps(info) == [2, *range(8, 45, 6)]
    logged = sorted(info["denoisers"][0]["sites"][0]["last_run"])
    assert logged == list(range(2, 50))


def test_taylorseer_keeps_order_plus_one_outputs_per_site(make_case):
    case = make_case("pixart")
    peaks = {}
    for order in (0, 1, 2):
        _, info = _run(case, "taylorseer", steps=16, order=order)  # full steps 2, 8, 14
        peaks[order] = info["denoisers"][0]["cache"]["peak_bytes"]
    assert peaks[0] > 0 and peaks[1] == 2 * peaks[0] and peaks[2] == 3 * peaks[0]
    accelerate_pipeline(case.pipe, "taylorseer")
    case.run(steps=8)
    assert "peak" in str(describe(case.pipe)).split("cache:")[1].split("\n")[0]
    remove_acceleration(case.pipe)


@pytest.mark.parametrize("family", ["pixart", "sd1", "flux", "wan"])
@pytest.mark.parametrize("spec,opts", [
    ("fora", {"interval": 3}),
    ("taylorseer", {"interval": 3}),
    ("toca", {"interval": 3, "fresh_ratio": 0.3, "forecast": "taylor"}),
    ("duca", {"interval": 4}),
])
def test_adaptive_threshold_zero_is_the_baseline(make_case, family, spec, opts):
    case = make_case(family)
    base, _ = _run(case)
    out, info = _run(case, spec, **opts, threshold=0.0)
    assert torch.equal(out, base)
    steps = info["denoisers"][0]["steps"]
    assert steps and all(v["decision"] == "compute" for v in steps.values())


@pytest.mark.parametrize("family", ["pixart", "sd1", "flux"])
@pytest.mark.parametrize("spec,opts", [
    ("fora", {"interval": 3}),
    ("fora", {"interval": 2, "warmup": 2, "forecast": "taylor", "order": 1}),
    ("taylorseer", {"interval": 3, "warmup": 2}),
    ("toca", {"interval": 3, "fresh_ratio": 0.3}),
    ("duca", {"interval": 4, "fresh_ratio": 0.5}),
])
def test_adaptive_unreachable_threshold_is_the_static_schedule_at_its_cap(make_case, family, spec, opts):
    """At most interval - 1 cached steps in a row: an unreachable threshold caches exactly those."""
    case = make_case(family)
    static, static_info = _run(case, spec, steps=8, **opts)
    out, info = _run(case, spec, steps=8, **opts, threshold=1e9)
    assert torch.equal(out, static)
    assert _computed_steps(info) == _computed_steps(static_info)
    decided = info["denoisers"][0]["steps"]
    assert {s for s, v in decided.items() if v["decision"] == "cached"}
    assert all(v["why"] in ("warm-up", "cap", "last step", "change < threshold") for v in decided.values())


def test_adaptive_steps_follow_the_change_and_are_recorded(make_case):
    case = make_case("pixart")
    _, info = _run(case, "fora", steps=12, interval=5, threshold=1e9)
    _, mild = _run(case, "fora", steps=12, interval=5, threshold=0.02)
    steps = mild["denoisers"][0]["steps"]
    assert sorted(steps) == list(range(12))
    changes = [v["change"] for v in steps.values() if v["change"] is not None]
    assert changes and all(c >= 0 for c in changes)
    for v in steps.values():  # the decision is the threshold's (or a forced step's)
        if v["change"] is not None:
            assert (v["decision"] == "compute") == (v["change"] >= 0.02)
    # a threshold between the changes seen decides some steps each way
    cut = sorted(changes)[len(changes) // 2]
    _, mid = _run(case, "fora", steps=12, interval=12, threshold=cut)
    decisions = [v["decision"] for v in mid["denoisers"][0]["steps"].values()]
    assert "cached" in decisions and decisions.count("compute") > 2
    text = str(mid)
    assert "adaptive steps (fora, last run): computed 0" in text and "cached" in text
    # deterministic for a fixed input
    again = _run(case, "fora", steps=12, interval=12, threshold=cut)[1]
    assert again["denoisers"][0]["steps"] == mid["denoisers"][0]["steps"]


def test_adaptive_decides_once_per_step_for_both_cfg_branches(make_case):
    """Separate CFG calls (Flux's true CFG): the step's first call decides and both branches compute at
    the same steps (a sub-layer runs twice or not at all in each step). Batched CFG halves are one call:
    one decision for both, by construction."""
    from diffaccel.api import installation

    case = make_case("flux")
    _, probe = _run(case, "fora", interval=8, threshold=1e9)  # the changes this model shows
    changes = sorted(v["change"] for v in probe["denoisers"][0]["steps"].values() if v["change"] is not None)
    accelerate_pipeline(case.pipe, "fora", interval=3, threshold=changes[len(changes) // 2])
    tracker = installation(case.pipe).denoisers[0].tracker
    site = next(s["name"] for s in describe(case.pipe)["denoisers"][0]["sites"] if s["methods"]["fora"]["acts"])
    calls = {}
    inner = next(m for m in case.pipe.transformer.get_submodule(site).modules() if isinstance(m, torch.nn.Linear))
    hook = inner.register_forward_pre_hook(  # (runs only when the sub-layer computes)
        lambda *_: calls.__setitem__(tracker.clock.step, calls.get(tracker.clock.step, 0) + 1))
    case.run(steps=8)
    hook.remove()
    info = describe(case.pipe)
    remove_acceleration(case.pipe)
    decided = info["denoisers"][0]["steps"]
    assert sorted(decided) == list(range(8))
    computed = sorted(s for s, v in decided.items() if v["decision"] == "compute")
    assert sorted(calls) == computed and set(calls.values()) == {2}
    assert len(computed) < 8  # some step was cached


def test_adaptive_reads_one_number_per_step(make_case, monkeypatch):
    """The decision syncs with the host once per step (Tensor.item), never per layer."""
    case = make_case("sd1")
    counts = {}
    original = torch.Tensor.item

    def counting(self):
        counts["n"] = counts.get("n", 0) + 1
        return original(self)

    for label, kw in (("static", {}), ("adaptive", {"threshold": 0.05})):
        accelerate_pipeline(case.pipe, "fora", interval=3, **kw)
        counts["n"] = 0
        monkeypatch.setattr(torch.Tensor, "item", counting)
        case.run(steps=8)
        monkeypatch.setattr(torch.Tensor, "item", original)
        counts[label] = counts["n"]
        remove_acceleration(case.pipe)
    assert 0 < counts["adaptive"] - counts["static"] <= 8


def test_policy_schedules_the_forecast_order_per_step_and_site(make_case):
    case = make_case("pixart")
    policy = Policy((Rule(Selector(kind=("self_attn", "cross_attn", "ff")), {"interval": 2, "order": 1}),
                     Rule(Selector(kind="ff"), {"interval": 2, "order": 0})))
    cfg = FORAConfig(forecast="taylor", policy=policy)
    accelerate_pipeline(case.pipe, cfg)
    plan = describe(case.pipe, num_steps=6)["denoisers"][0]["sites"]
    orders = {s["kind"]: s["methods"]["fora"]["plan"][1]["order"] for s in plan if s["methods"]["fora"]["acts"]}
    assert orders["ff"] == 0 and orders["self_attn"] == 1
    out = case.run(steps=8)
    remove_acceleration(case.pipe)
    everywhere, _ = _run(case, FORAConfig(interval=2, forecast="taylor", order=1))
    nowhere, _ = _run(case, FORAConfig(interval=2))
    assert not torch.equal(out, everywhere) and not torch.equal(out, nowhere)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: FORAConfig(policy={"rules": [{"params": {"order": 1}}]}), ValueError,
     r"policy sets \['order'\].*forecast='taylor' or 'hermite'"),
    (lambda: DuCaConfig(forecast="taylor"), ValueError, r"aggressive='sublayers'"),
    (lambda: ToCaConfig(forecast="newton"), ValueError, r"must be one of \['reuse', 'taylor', 'hermite'\]"),
    (lambda: TaylorSeerConfig(order=4), ValueError, r"order must be in \[0, 3\]"),
    (lambda: FORAConfig(threshold=-0.1), ValueError, r"threshold must be in \[0.0, "),
    (lambda: FORAConfig(threshold="auto"), ValueError, r"threshold must be a number in"),
])
def test_bad_forecast_settings_are_refused(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_options_valid_only_together_are_accepted_as_keywords(make_case):
    """accelerate_pipeline(pipe, "duca", forecast=..., aggressive="sublayers"): the keywords are applied
    together (one at a time, forecast alone was refused before aggressive was set)."""
    case = make_case("pixart")
    accelerate_pipeline(case.pipe, "duca", forecast="taylor", aggressive="sublayers")
    remove_acceleration(case.pipe)
    with pytest.raises(ValueError, match="aggressive='sublayers'"):
        accelerate_pipeline(case.pipe, "duca", forecast="taylor")
    assert not is_accelerated(case.pipe)


def test_taylorseer_is_in_every_face():
    from diffaccel.methods.base import method_summary

    assert method_summary("taylorseer").startswith("TaylorSeer")
    names = {o.name for o in TaylorSeerConfig.options()}
    assert {"interval", "order", "forecast", "threshold", "warmup"} <= names
    main = [o.name for o in TaylorSeerConfig.options() if o.main]
    assert main == ["interval", "order"]


def test_the_benchmarks_forecast_and_adaptive_rows_are_valid_settings():
    from diffaccel.api import resolve_methods
    from diffaccel.bench.caching import PAPER_SETTINGS
    from diffaccel.bench.fidelity import GROUPS, our_settings

    rows = our_settings(["taylorseer", *GROUPS])
    assert len(rows) == 3 + sum(len(g) for g in GROUPS.values())
    for row in rows:
        (config,) = resolve_methods(row.spec, {})
        assert config.forecasting() or config.threshold is not None or config.name == "taylorseer"
    flux = dict(PAPER_SETTINGS["flux"])
    assert resolve_methods(flux["taylorseer N=6 O=2 (paper)"], {}) == [TaylorSeerConfig()]


def test_forecast_from_reuses_before_it_and_forecasts_after(make_case):
    case = make_case("pixart")
    reuse, _ = _run(case, FORAConfig(interval=2), steps=12)
    never, _ = _run(case, FORAConfig(interval=2, forecast="taylor", order=1, forecast_from=1.0), steps=12)
    late, info = _run(case, FORAConfig(interval=2, forecast="taylor", order=1, forecast_from=0.5), steps=12)
    always, _ = _run(case, FORAConfig(interval=2, forecast="taylor", order=1), steps=12)
    assert torch.equal(never, reuse)
    assert not torch.equal(late, reuse) and not torch.equal(late, always)
    plan = next(s for s in info["denoisers"][0]["sites"] if s["methods"]["fora"]["acts"])["methods"]["fora"]["plan"]
    assert [p["order"] for p in plan] == [0] * 6 + [1] * 6
