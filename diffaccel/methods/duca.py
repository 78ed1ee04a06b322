"""DuCa (Zou et al., 2024): dual feature caching.

Within each `interval`-step cycle: a full step that computes and stores every sub-layer's output,
then alternately a conservative step (ToCa: a fresh fraction of tokens recomputed and written into
the cache) and an aggressive step (every sub-layer of the block stack returns its cached output and
does not run). Aggressive steps reuse the cached outputs sub-layer by sub-layer, so the blocks' own
modulation and residual additions still run with that step's timestep; they cost a few element-wise
operations per block. Fresh tokens are chosen without attention maps by default ("vnorm": small
value norms first, or "random"), so SDPA, Flash and xformers attention keep working. Token choice,
schedules and CFG handling are ToCa's (see `toca`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .toca import ToCaConfig, TokenwiseCache


@register
@dataclass(frozen=True)
class DuCaConfig(ToCaConfig):
    """Fields as ToCaConfig. interval: steps per cycle (1: the baseline). fresh_ratio: base fraction
    of tokens recomputed on conservative steps (default 0.75). score: default "vnorm"."""

    fresh_ratio: float = 0.75
    score: str = "vnorm"

    name = "duca"

    __hash__ = TokenwiseCache.__hash__

    def is_identity(self, params: dict) -> bool:
        return round(params["interval"]) <= 1  # aggressive steps reuse whatever the fresh ratio

    def cached_plan(self, site, ctx, params, entry, call, offset: int) -> str:
        if offset % 2 == 0:
            return "reuse"  # aggressive
        if params["fresh_ratio"] >= 1:
            return "recompute"
        return self.token_plan(site, params, call)
