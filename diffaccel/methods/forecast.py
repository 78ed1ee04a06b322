"""How a caching method serves a cached value on a step that does not compute it (`forecast`), and the
run-time step decisions of adaptive caching (`AdaptiveSteps`). Shared by every caching method; not a
method itself.

Forecasts. A cache entry keeps the outputs of the last `order + 1` full computations of its site, as
the coefficients of the polynomial through them (Newton's divided differences, newest knot first):

    P(t) = d0 + (t - x0) (d1 + (t - x1) (d2 + ...))      x0 > x1 > ...: the steps computed
    d0 = f(x0),  d1 = f[x0, x1] = (f(x0) - f(x1)) / (x0 - x1),  d2 = f[x0, x1, x2],  ...

A new full computation f at step x shifts them in place of the oldest (`push`): d0' = f and
d_j' = (d_{j-1}' - d_{j-1}) / (x - x_{j-1}). So an entry holds order + 1 tensors of the output's
size; the differences are taken in float32 and stored in the output's dtype.

    "reuse"    P(t) = d0: the cached output unchanged (FORA, ToCa, DuCa as published)
    "taylor"   P(t) as above, order 1 or 2 (up to 3): TaylorSeer's forecast. Its code expands about the
               last full step with derivatives from backward differences, f + f' s + f'' s^2 / 2, which
               at order 2 is off by f'' x0-x1 s / 2 for a feature that is exactly quadratic in the step;
               the Newton form is the same polynomial family and exact for polynomials of degree <=
               order (at order 1 the two coincide)
    "hermite"  HiCache's (yiming-l21/CFGCache): the same polynomial written in powers of s = t - x0
               (its Taylor coefficients at the last full step, i.e. the derivatives over m!), each power
               s^m replaced by the dual-scaled Hermite polynomial sigma^m H_m(sigma s) (physicists' H:
               1, 2u, 4u^2 - 2, ...), sigma = `hermite_scale` (HiCache's 0.5): with sigma < 1/sqrt(2)
               every term past the constant is damped (order 1 at sigma 0.5: half the Taylor step)

Fewer knots than the order asks for (a run's first cycles) give the highest order they allow; the run's
first step is no knot of a difference (`FIRST_STEP`); order 0 is "reuse" exactly (the stored tensor
itself is served). A policy may schedule "order" per step and
site.

Adaptive steps. With `threshold` set, whether a step computes is decided during the run, once per
step, before the step's first call of a site the method holds: the relative L1 change of that call's
input (for an adaLN DiT, the first block's timestep-modulated input, the signal TeaCache reads) since
the last computed step, |x - x_c|_1 / |x_c|_1. Below the threshold the step is cached (its sites
reuse, forecast or refresh fresh tokens as the method's cached steps do); otherwise it computes and
x becomes the new reference. Always computed: the steps before `warmup`, the run's last step, and a
step after `interval - 1` cached ones in a row (the cap). The decision reads one number to the host
per step (`Tensor.item`), never per layer; batched CFG halves are measured together (one decision
for both); separate CFG calls take the decision of the step's first call. Where no call can be
measured (a compiled denoiser, whose decisions are made before the step), the static schedule
(`interval`) applies. Threshold 0 computes every step (the baseline); an unreachable threshold gives
the static schedule at the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..call import CacheEntry, Context
from ..parallel import sum_over

FORECASTS = ("reuse", "taylor", "hermite")
MAX_ORDER = 3
# The run's first step (pure noise to a first estimate) starts no difference: the features jump there
# far more than anywhere after (the reference DiT's denoiser output moves 0.82 of its norm from step 0
# to 1, at most 0.27 later), and a line through it misleads the next cycle. TaylorSeer's FLUX code
# likewise takes its first difference between steps 1 and 2.
FIRST_STEP = 0


def _map(fn, *items: Any) -> Any:
    """fn over the tensors of an output (a tensor, or a tuple/list of tensors and other values)."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return fn(*items)
    if isinstance(first, (tuple, list)):
        return type(first)(_map(fn, *parts) for parts in zip(*items))
    return first


def forecastable(output: Any) -> bool:
    """Whether an output is tensors a forecast can combine (a tensor, or a tuple/list holding some)."""
    if isinstance(output, torch.Tensor):
        return output.is_floating_point()
    return isinstance(output, (tuple, list)) and any(forecastable(o) for o in output)


def push(entry: CacheEntry, previous: CacheEntry | None, step: int, order: int) -> None:
    """Make `entry` (just stored: its output computed in full at `step`) hold the divided differences of
    its output and those `previous` (the entry it replaces, of the same signature) held, up to `order`."""
    knots, diffs = [step], []
    if previous is not None and order > 0 and previous.output is not None and forecastable(entry.output):
        old_knots = previous.extra.get("knots", [previous.step])
        old = [previous.output, *previous.extra.get("diffs", [])]
        old_knots = [x for x in old_knots if x > FIRST_STEP]
        if old_knots and old_knots[0] < step:
            newer = entry.output
            for j in range(min(order, len(old_knots))):
                gap = float(step - old_knots[j])
                newer = _map(lambda a, b, g=gap: ((a.float() - b.float()) / g).to(a.dtype), newer, old[j])
                diffs.append(newer)
            knots += old_knots[:len(diffs)]
    entry.extra["knots"] = knots
    if diffs:
        entry.extra["diffs"] = diffs


def weights(step: float, knots: list[int], order: int, forecast: str, scale: float) -> list[float]:
    """The factor of each stored difference d_0..d_k at `step` (k = min(order, knots - 1))."""
    k = min(order, len(knots) - 1)
    s = step - knots[0]
    out = [1.0]
    poly = [1.0]  # prod_{i<j} (t - x_i) as coefficients of powers of s = t - x0
    for j in range(1, k + 1):
        shift = knots[0] - knots[j - 1]  # t - x_{j-1} = s + shift
        poly = [(poly[m - 1] if m else 0.0) + (shift * poly[m] if m < len(poly) else 0.0) for m in range(len(poly) + 1)]
        if forecast == "hermite":  # s^m -> scale^m H_m(scale s)
            out.append(sum(c * scale**m * _hermite(m, scale * s) for m, c in enumerate(poly)))
        else:
            out.append(sum(c * s**m for m, c in enumerate(poly)))
    return out


def _hermite(j: int, u: float) -> float:
    """The physicists' Hermite polynomial H_j(u): 1, 2u, 4u^2 - 2, 8u^3 - 12u, ..."""
    a, b = 1.0, 2.0 * u
    if j == 0:
        return a
    for n in range(1, j):
        a, b = b, 2.0 * u * b - 2.0 * n * a
    return b


def predict(entry: CacheEntry, step: int, order: int, forecast: str, scale: float = 1.0) -> Any:
    """The entry's forecast of its output at `step`: the stored output itself at order 0 (or with one
    knot), else the weighted sum of its differences, in float32, in the output's dtype."""
    diffs = entry.extra.get("diffs", [])
    if forecast == "reuse" or order <= 0 or not diffs:
        return entry.output
    w = weights(step, entry.extra["knots"], order, forecast, scale)
    terms = [entry.output, *diffs[:len(w) - 1]]

    def combine(*ts):
        acc = ts[0].float()
        for wj, t in zip(w[1:], ts[1:]):
            acc = acc + wj * t.float()
        return acc.to(ts[0].dtype)

    return _map(combine, *terms)


@dataclass
class AdaptiveSteps:
    """One run's adaptive decisions of one caching method (kept in the run's state)."""

    step: int = -1  # the step decided last
    compute: bool = True
    reference: torch.Tensor | None = None  # the probed input at the last computed step
    cached_in_row: int = 0


def decide(state: AdaptiveSteps, ctx: Context, x: torch.Tensor, threshold: float, warmup: int, cap: int,
           computes_last: bool, record: dict | None = None, name: str = "") -> bool:
    """Whether this step computes (see the module's docstring); made once per step, at its first call,
    and written to `record` (step -> what was decided, for describe())."""
    if state.step == ctx.step:
        return state.compute
    change, why = None, ""
    ref = state.reference
    if ctx.step < max(warmup, 1) or ref is None:
        why = "warm-up"
    elif computes_last and ctx.num_steps and ctx.step >= ctx.num_steps - 1:
        why = "last step"
    elif ref.shape != x.shape:
        why = "new input shape"
    elif state.cached_in_row >= cap:
        why = "cap"
    else:
        a, b = x.detach().float(), ref.float()
        if ctx.group is None:
            change = ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)).item()  # the step's one host sync
        else:  # context parallelism: the whole sequence's change, from the sums over every process's slice
            moved, size = sum_over(ctx.group, (a - b).abs().sum(), b.abs().sum())
            change = (moved / size.clamp_min(1e-12)).item()
        why = "change >= threshold" if change >= threshold else "change < threshold"
    compute = change is None or change >= threshold
    if compute:
        state.reference, state.cached_in_row = x.detach().clone(), 0
    else:
        state.cached_in_row += 1
    state.step, state.compute = ctx.step, compute
    if record is not None:
        record[ctx.step] = {"method": name, "decision": "compute" if compute else "cached",
                            "change": None if change is None else round(change, 6), "why": why}
    return compute
