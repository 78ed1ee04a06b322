"""SiTo (Zhang et al., AAAI 2025): similarity-based token pruning.

Each token is scored by the sum of its cosine similarities to all tokens plus `noise` times Gaussian
noise (SiTo's code: 0.1); the best token of each sx x sy cell is a base token; of the others, the
r = ratio * N most similar to a base are pruned (dropped, not averaged) and after the sub-layer each
takes the output of its most similar kept token (a base or a kept token), as SiTo's code restores
them. The noise is drawn once per token and step (seeded by seed, step and block) and shared by the
batch rows, so an image does not change when other prompts join its batch. Tiled: the summed
similarity is one matrix-vector product, the matchings are computed in tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokens import TokenReduction, similarity_pruning_2d
from .base import option, register
from .cells import CellReductionConfig
from .common import BlockRandom


@register
@dataclass(frozen=True)
class SiToConfig(CellReductionConfig):
    """Fields as CellReductionConfig (ratio: the fraction pruned), the noise on the score, and which
    sub-layers are pruned. SiTo's own argument names work too (prune_ratio, max_downsample_ratio,
    noise_alpha, prune_selfattn_flag, prune_crossattn_flag, prune_mlp_flag)."""

    noise: float = option(0.1, low=0.0, high=10.0, doc="Standard deviation of the Gaussian noise on the summed "
                          "similarity score (varies the base tokens across steps).")
    prune_attn: bool = option(True, doc="Prune the tokens of self-attention.")
    prune_crossattn: bool = option(False, doc="Prune the tokens of cross-attention.")
    prune_mlp: bool = option(False, doc="Prune the tokens of the feed-forward.")

    name = "sito"
    mode = "drop"
    aliases = {"prune_ratio": "ratio", "max_downsample_ratio": "max_downsample", "noise_alpha": "noise",
               "prune_selfattn_flag": "prune_attn", "prune_crossattn_flag": "prune_crossattn",
               "prune_mlp_flag": "prune_mlp"}  # SiTo's apply_patch
    kind_flags = ("prune_attn", "prune_crossattn", "prune_mlp")

    def build_reduction(self, metric: torch.Tensor, grid: tuple[int, int, int], st: int, r: int,
                        rand: BlockRandom) -> TokenReduction:
        f, h, w = grid
        draw = None
        if self.noise:  # the generator itself, or in a compiled denoiser its (1, N) draw
            draw = rand.randn((1, f * h * w)) if torch.compiler.is_compiling() else rand.generator()
        return similarity_pruning_2d(metric, h, w, self.sx, self.sy, r, self.noise, draw, f, st)
