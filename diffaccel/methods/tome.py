"""ToMeSD (Bolya & Hoffman, 2023): merge similar image tokens before a sub-layer, unmerge after.

One destination per sx x sy cell (random per step with the method's own seeded generator, or the
top-left token), cosine similarity of sources to destinations, the r = ratio * N most similar
sources averaged into their destination; unmerge copies each destination's output back.
Default: self-attention at the finest token resolution level that has transformer blocks (so SDXL,
whose full-resolution level has none, is accelerated too).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policy import Policy, Rule, Selector
from ..sites import Site
from ..tokens import bipartite_soft_matching_2d, random_destinations
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

METRICS = ("block", "hidden")


def merge_kinds(attn: bool, crossattn: bool, mlp: bool) -> tuple[str, ...]:
    return tuple(k for k, on in (("self_attn", attn), ("cross_attn", crossattn), ("ff", mlp)) if on)


def reduction_unsupported(site: Site) -> str | None:
    if site.note:
        return site.note
    if site.kind == "block":
        return "acts on sub-layers, not whole blocks"
    return None


@register
@dataclass(frozen=True)
class ToMeConfig(MethodConfig):
    """ratio: fraction of a site's tokens merged away (at most 1 - 1/(sx*sy): one token per cell stays).
    max_downsample: how many resolution levels, from the finest, are merged.
    metric: similarity measured on the block's input ("block", as ToMeSD: one matching per block
    shared by its merged sub-layers) or on each sub-layer's own input ("hidden")."""

    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int = 0
    max_downsample: int = 1
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    metric: str = "block"
    policy: Policy | dict | str | None = None

    name = "tome"
    priority = 10
    reduces_tokens = True
    params = ("ratio",)

    def validate(self) -> None:
        n = type(self).__name__
        check_number(n, "sx", self.sx, 1, 64, integer=True)
        check_number(n, "sy", self.sy, 1, 64, integer=True)
        check_number(n, "ratio", self.ratio, 0.0, 1.0 - 1.0 / (self.sx * self.sy))
        check_number(n, "seed", self.seed, 0, 2**62, integer=True)
        check_number(n, "max_downsample", self.max_downsample, 1, 8, integer=True)
        for f in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            check_bool(n, f, getattr(self, f))
        check_choice(n, "metric", self.metric, METRICS)

    def default_policy(self) -> Policy:
        kinds = merge_kinds(self.merge_attn, self.merge_crossattn, self.merge_mlp)
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
            gen = block_generator(self.seed, ctx.step, site) if self.use_rand else None
            choice = random_destinations(h, w, self.sx, self.sy, gen, x.device)
            return bipartite_soft_matching_2d(cfg_rows(metric, ctx), h, w, self.sx, self.sy, r, choice)

        reduction = shared_reduction(self, site, ctx, r, build).expand(x.shape[0])
        call.hidden = reduction.reduce(x, "mean")
        call.restores.append(reduction.restore)
        call.reduced = True
