"""FORA (Selvaraju et al., 2024): reuse each sub-layer's output for several denoising steps.

Every `interval` steps each selected sub-layer (self-attention, cross-attention, feed-forward of
every block) runs and its output is stored; on the steps between, the stored output is returned and
the sub-layer does not run. What a block does around its sub-layers (adaLN shifts, scales and
gates, residual additions) still runs at every step, with that step's timestep. `warmup` steps at
the start of the run are computed in full and the last of them begins the first cycle (ToCa's Flux
setting computes the first 3). The last step of a run is always computed, as FORA's code does (its
outputs become the image). The paper's default: interval 3 on every sub-layer.

`forecast` serves the cached steps with a forecast from the last computed outputs instead of the last
one unchanged, and `threshold` decides during the run which steps compute (see `forecast`).

A cache entry serves only calls of the same run, CFG branch, batch and token count; anything else
is recomputed. Caches are released when the run ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..call import CacheEntry, Context
from ..policy import Policy, Rule, Selector
from ..sites import Site
from .base import CachingMethod, register
from .common import SUBLAYERS, warmup_window


@register
@dataclass(frozen=True)
class FORAConfig(CachingMethod):
    """Fields as CachingMethod: interval (steps one computed output serves; 1: the baseline) and
    warmup (steps at the start always computed). Every sub-layer's output is reused whole."""

    name = "fora"
    computes_last = True  # as FORA's code does: its outputs become the image

    def default_policy(self) -> Policy:
        return Policy((Rule(Selector(kind=SUBLAYERS), {"interval": self.interval, **self.forecast_params()},
                            warmup_window(self.warmup)),))

    def is_identity(self, params: dict) -> bool:
        return round(params["interval"]) <= 1

    def cycle_end(self, ctx: Context, params: dict) -> int:
        return ctx.step + max(1, round(params["interval"]))

    def reuses(self, site: Site, ctx: Context, params: dict, entry: CacheEntry) -> bool:
        if ctx.step == entry.step:
            return True  # another call of the step that computed it (e.g. a second expert)
        decision = self.step_decision(ctx)
        if decision is not None:
            return not decision  # adaptive steps (see methods.forecast)
        if self.computes_last and ctx.num_steps and ctx.step >= ctx.num_steps - 1:
            return False  # the last step is computed, as FORA's code does
        return ctx.step < entry.until
