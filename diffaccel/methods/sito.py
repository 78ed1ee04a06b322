"""SiTo (Zhang et al., AAAI 2025): similarity-based token pruning.

Each token is scored by its summed cosine similarity to all tokens plus Gaussian noise; the best
token of each sx x sy cell is a base token; of the others, the r = ratio * N most similar to a base
are pruned (dropped, not averaged) and after the sub-layer take the output of that base token.
Tiled: the summed similarity is one matrix-vector product, the base matching is computed in tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..policy import Policy
from ..tokens import TokenReduction, similarity_pruning_2d
from .base import CellReductionConfig, check_number, register


@register
@dataclass(frozen=True)
class SiToConfig(CellReductionConfig):
    """ratio: fraction of a site's tokens pruned (at most 1 - 1/(sx*sy)); noise: standard deviation
    of the Gaussian noise on the similarity score (varies the base tokens across steps).
    st: frames a cell spans on video grids (0: by family, see CellReductionConfig.frames_per_cell).
    metric: similarity measured on the block's input ("block") or each sub-layer's input ("hidden").
    cost_model: skip calls where pruning costs more than it saves (diffaccel.cost); None: only at
    the default ratio and schedule."""

    ratio: float = 0.5
    sx: int = 2
    sy: int = 2
    st: int = 0
    noise: float = 0.1
    seed: int = 0
    max_downsample: int = 1
    prune_attn: bool = True
    prune_crossattn: bool = False
    prune_mlp: bool = False
    metric: str = "block"
    cost_model: bool | None = None
    policy: Policy | dict | str | None = None

    name = "sito"
    mode = "drop"
    kind_flags = ("prune_attn", "prune_crossattn", "prune_mlp")

    def validate(self) -> None:
        super().validate()
        check_number(type(self).__name__, "noise", self.noise, 0.0, 10.0)

    def build_reduction(self, metric: torch.Tensor, grid: tuple[int, int, int], st: int, r: int,
                        generator: torch.Generator) -> TokenReduction:
        f, h, w = grid
        return similarity_pruning_2d(metric, h, w, self.sx, self.sy, r, self.noise, generator if self.noise else None,
                                     f, st)
