"""ToMeSD (Bolya & Hoffman, 2023): merge similar image tokens before a sub-layer, unmerge after.

One destination per sx x sy cell (random per step with the method's own seeded generator, or the
top-left token), cosine similarity of sources to destinations measured on the block's input, the
r = ratio * N most similar sources averaged into their destination; unmerge copies each
destination's output back. Default: self-attention at the finest token resolution level that has
transformer blocks (so SDXL, whose full-resolution level has none, is accelerated too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokens import TokenReduction, bipartite_soft_matching_2d, random_destinations
from .base import check_bool, register
from .cells import CellReductionConfig


@register
@dataclass(frozen=True)
class ToMeConfig(CellReductionConfig):
    """Fields as CellReductionConfig (ratio: the fraction merged away), and:
    use_rand: a random destination per cell and step (False: the top-left token).
    merge_attn, merge_crossattn, merge_mlp: which sub-layers are merged (self-attention by default).
    max_downsample on SD 1.x/2.x is exactly tomesd's; on SDXL, which has no attention at full latent
    resolution, it counts from the finest level with attention (tomesd's max_downsample=1 selects
    nothing there). tomesd's apply_patch arguments are these fields: its calls port unchanged."""

    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    name = "tome"
    mode = "mean"
    kind_flags = ("merge_attn", "merge_crossattn", "merge_mlp")

    def validate(self) -> None:
        super().validate()
        check_bool(type(self).__name__, "use_rand", self.use_rand)

    def build_reduction(self, metric: torch.Tensor, grid: tuple[int, int, int], st: int, r: int,
                        generator: torch.Generator) -> TokenReduction:
        f, h, w = grid
        choice = random_destinations(h, w, self.sx, self.sy, generator if self.use_rand else None, metric.device,
                                     f, st)
        return bipartite_soft_matching_2d(metric, h, w, self.sx, self.sy, r, choice, f, st)
