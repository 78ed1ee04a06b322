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
from .base import option, register
from .cells import CellReductionConfig
from .common import BlockRandom


@register
@dataclass(frozen=True)
class ToMeConfig(CellReductionConfig):
    """Fields as CellReductionConfig (ratio: the fraction merged away), and which sub-layers are merged.
    max_downsample on SD 1.x/2.x is exactly tomesd's; on SDXL, which has no attention at full latent
    resolution, it counts from the finest level with attention (tomesd's max_downsample=1 selects
    nothing there). tomesd's apply_patch arguments are these fields: its calls port unchanged."""

    use_rand: bool = option(True, doc="A random destination per cell and step (False: the top-left token).")
    merge_attn: bool = option(True, doc="Merge the tokens of self-attention.")
    merge_crossattn: bool = option(False, doc="Merge the tokens of cross-attention.")
    merge_mlp: bool = option(False, doc="Merge the tokens of the feed-forward.")

    name = "tome"
    mode = "mean"
    kind_flags = ("merge_attn", "merge_crossattn", "merge_mlp")

    def build_reduction(self, metric: torch.Tensor, grid: tuple[int, int, int], st: int, r: int,
                        rand: BlockRandom) -> TokenReduction:
        f, h, w = grid
        if self.use_rand:  # one offset per cell (random_destinations' draw, from the block's draws)
            cells = (h // self.sy, w // self.sx) if f == 1 and st == 1 else (f // st, h // self.sy, w // self.sx)
            choice = rand.randint(self.sx * self.sy * st, (*cells, 1)).view(1, *cells).to(metric.device)
        else:
            choice = random_destinations(h, w, self.sx, self.sy, None, metric.device, f, st)
        return bipartite_soft_matching_2d(metric, h, w, self.sx, self.sy, r, choice, f, st)
