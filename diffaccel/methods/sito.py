"""SiTo (Zhang et al., AAAI 2025): similarity-based token pruning.

Each token is scored by its summed cosine similarity to all tokens plus Gaussian noise; the best
token of each sx x sy cell is a base token; of the others, the r = ratio * N most similar to a base
are pruned (dropped, not averaged) and after the sub-layer take the output of that base token.
Tiled: the summed similarity is one matrix-vector product, the base matching is computed in tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policy import Policy, Rule, Selector
from ..sites import Site
from ..tokens import similarity_pruning_2d
from .base import (
    MethodConfig,
    SiteCall,
    block_generator,
    cfg_rows,
    check_bool,
    check_choice,
    check_number,
    grid_of,
    reduction_metric,
    register,
    shared_reduction,
)
from .tome import METRICS, merge_kinds, reduction_unsupported


@register
@dataclass(frozen=True)
class SiToConfig(MethodConfig):
    """ratio: fraction of a site's tokens pruned (at most 1 - 1/(sx*sy)); noise: standard deviation
    of the Gaussian noise on the similarity score (varies the base tokens across steps).
    metric: similarity measured on the block's input ("block") or each sub-layer's input ("hidden")."""

    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    noise: float = 0.1
    seed: int = 0
    max_downsample: int = 1
    prune_attn: bool = True
    prune_crossattn: bool = False
    prune_mlp: bool = False
    metric: str = "block"
    policy: Policy | dict | str | None = None

    name = "sito"
    priority = 10
    reduces_tokens = True
    params = ("ratio",)

    def validate(self) -> None:
        n = type(self).__name__
        check_number(n, "sx", self.sx, 1, 64, integer=True)
        check_number(n, "sy", self.sy, 1, 64, integer=True)
        check_number(n, "ratio", self.ratio, 0.0, 1.0 - 1.0 / (self.sx * self.sy))
        check_number(n, "noise", self.noise, 0.0, 10.0)
        check_number(n, "seed", self.seed, 0, 2**62, integer=True)
        check_number(n, "max_downsample", self.max_downsample, 1, 8, integer=True)
        for f in ("prune_attn", "prune_crossattn", "prune_mlp"):
            check_bool(n, f, getattr(self, f))
        check_choice(n, "metric", self.metric, METRICS)

    def default_policy(self) -> Policy:
        kinds = merge_kinds(self.prune_attn, self.prune_crossattn, self.prune_mlp)
        return Policy((Rule(Selector(kind=kinds, level=(0, self.max_downsample - 1)), {"ratio": self.ratio}),))

    def unsupported(self, site: Site) -> str | None:
        return reduction_unsupported(site)

    def is_identity(self, params: dict) -> bool:
        return params["ratio"] <= 0

    def act(self, site: Site, ctx, params: dict, call: SiteCall) -> None:
        x = call.hidden
        grid = grid_of(site, ctx, x.shape[1])
        if grid is None or grid[0] != 1:
            return
        _, h, w = grid
        r = int(params["ratio"] * x.shape[1])
        metric = reduction_metric(self, site, ctx, x)

        def build():
            gen = block_generator(self.seed, ctx.step, site) if self.noise else None
            return similarity_pruning_2d(cfg_rows(metric, ctx), h, w, self.sx, self.sy, r, self.noise, gen)

        reduction = shared_reduction(self, site, ctx, r, build).expand(x.shape[0])
        call.hidden = reduction.reduce(x, "drop")
        call.restores.append(reduction.restore)
        call.reduced = True
