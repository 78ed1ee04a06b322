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

from ..policy import Policy
from ..tokens import TokenReduction, bipartite_soft_matching_2d, random_destinations
from .base import CellReductionConfig, check_bool, register


@register
@dataclass(frozen=True)
class ToMeConfig(CellReductionConfig):
    """ratio: fraction of a site's tokens merged away (at most 1 - 1/(sx*sy): one token per cell stays).
    st: frames a cell spans on video grids (0: by family, see CellReductionConfig.frames_per_cell).
    max_downsample: the levels merged, as tomesd's downsample factor (1, 2, 4 or 8): 1 merges the
    finest token grid that has attention, 2 that and the grid at half its resolution, and so on. On
    SD 1.x/2.x this is exactly tomesd's meaning; on SDXL, which has no attention at full latent
    resolution, it counts from the finest level with attention (tomesd's max_downsample=1 selects
    nothing there). tomesd's apply_patch arguments are these fields: its calls port unchanged.
    metric: similarity measured on the block's input ("block", as ToMeSD: one matching per block
    shared by its merged sub-layers) or on each sub-layer's own input ("hidden").
    cost_model: skip calls where merging costs more than it saves (diffaccel.cost); None: only at
    the default ratio and schedule."""

    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    st: int = 0
    use_rand: bool = True
    seed: int = 0
    max_downsample: int = 1
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    metric: str = "block"
    cost_model: bool | None = None
    policy: Policy | dict | str | None = None

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
