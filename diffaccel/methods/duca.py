"""DuCa (Zou et al., 2024): dual feature caching.

Within each `interval`-step cycle: a full step that computes and stores every sub-layer's output,
then alternately a conservative step (ToCa: a fresh fraction of tokens recomputed and written into
the cache) and an aggressive step that reuses the cached output of the whole block stack.

`aggressive` says at which grain an aggressive step reuses:
    "blocks"     (default, as the paper) every block returns the output it gave at the last step it
                 ran, without running: no modulation, norm or residual addition either, so the stack
                 hands on its cached output. On U-Nets the transformer blocks are skipped this way;
                 the resnets between them still run.
    "sublayers"  every sub-layer returns its cached output; the blocks' own modulation and residual
                 additions still run with that step's timestep (a few element-wise operations per
                 block).
A block some of whose sub-layers a policy leaves out is never skipped whole: its other sub-layers
reuse their outputs as with "sublayers". Fresh tokens are chosen without attention maps by default
("vnorm": small value norms first, or "random"), so SDPA, Flash and xformers attention keep working.
Token choice, schedules and CFG handling are ToCa's (see `toca`). With a forecast (`forecast`, which
needs aggressive="sublayers"), aggressive steps forecast every sub-layer's output and conservative steps
forecast the tokens they do not recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..call import CacheEntry, Context, Plan, SiteCall
from ..sites import Site
from .base import option, register
from .toca import SCORES, ToCaConfig

AGGRESSIVE = ("blocks", "sublayers")


@register
@dataclass(frozen=True)
class DuCaConfig(ToCaConfig):
    """Dual caching: ToCa's fields, with conservative steps (fresh tokens recomputed) alternating with
    aggressive ones (everything reused) between the full steps."""

    fresh_ratio: float = option(0.75, low=0.0, high=1.0, doc="Base fraction of tokens recomputed on conservative "
                                "steps (1: all).")
    score: str = option("vnorm", choices=SCORES, doc='Primary fresh-token score: "vnorm" (the value projection\'s '
                        'norm), "change", "random", "attention" or "entropy".')
    aggressive: str = option("blocks", choices=AGGRESSIVE, doc='What an aggressive step reuses: "blocks" (whole '
                             'blocks) or "sublayers".')

    name = "duca"
    zero = {"interval": 1}

    def validate(self) -> None:
        super().validate()
        if self.forecast != "reuse" and self.aggressive == "blocks":
            raise ValueError(f"DuCaConfig: forecast={self.forecast!r} forecasts sub-layer outputs, but "
                             "aggressive='blocks' hands on whole blocks' stored outputs unchanged; use "
                             "aggressive='sublayers' with a forecast (or forecast='reuse')")

    def is_identity(self, params: dict) -> bool:
        return round(params["interval"]) <= 1  # aggressive steps reuse whatever the fresh ratio

    def reuses_blocks(self) -> bool:
        return self.aggressive == "blocks"

    def skips_block(self, ctx: Context, params: dict, entry: CacheEntry) -> bool:
        if self.threshold is not None and self.step_decision(ctx) is None:
            return False  # adaptive, and the step not decided yet: the block's sub-layers decide it
        offset = self.cycle_offset(ctx, params, entry)
        return offset is not None and offset % 2 == 0  # the aggressive steps of `cached_plan` (and 0)

    def cached_plan(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall,
                    offset: int) -> Plan:
        if offset % 2 == 0:
            return Plan.REUSE  # aggressive
        if params["fresh_ratio"] >= 1:
            return Plan.RECOMPUTE
        return self.token_plan(site, ctx, params, call, entry.signature[2][1])
