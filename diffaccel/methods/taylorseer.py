"""TaylorSeer (Liu et al., ICCV 2025): forecast each sub-layer's output on the steps between full ones.

FORA's schedule (every `interval` steps each selected sub-layer runs and its output is stored), but a
cached step is served by the polynomial through the sub-layer's last `order + 1` computed outputs
evaluated at that step (`forecast="taylor"`, see `forecast`), not by the last output unchanged. The
defaults are the paper's FLUX.1-dev setting: full steps 0, 1, 2 (`warmup=3`), then one every 6
(interval 6, order 2); the last step is not forced (steps 45-49 of a 50-step run are forecast), as the
reference code schedules it. `forecast="hermite"` is HiCache's forecast on the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import option, register
from .fora import FORAConfig
from .forecast import FORECASTS, MAX_ORDER


@register
@dataclass(frozen=True)
class TaylorSeerConfig(FORAConfig):
    """FORA's full steps with a forecast on the steps between: interval, warmup and order as the paper
    sets them for FLUX.1-dev (N=6, first 3 steps full, order 2)."""

    interval: int = option(6, low=1, high=1000, integer=True,
                           doc="Steps one computed output serves (1: compute every step, the baseline).")
    warmup: int = option(3, low=0, high=100_000, integer=True, kw_only=True,
                         doc="Steps at the start of the run that are always computed; the last of them begins "
                             "the first cycle.")
    forecast: str = option("taylor", choices=FORECASTS, kw_only=True,
                           doc='How a cached step is served: "taylor" (TaylorSeer), "hermite" (HiCache) or '
                               '"reuse" (FORA).')
    order: int = option(2, low=0, high=MAX_ORDER, integer=True, kw_only=True,
                        doc="Order of the forecast (0: reuse); a policy may schedule it per step and site. Each "
                            "cached site keeps order + 1 outputs.")

    name = "taylorseer"
    computes_last = False
    params = ("interval", "order")
