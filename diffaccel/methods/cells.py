"""What ToMe and SiTo share: reduce a site's image tokens to one kept token per sx x sy (x st frames)
cell and the tokens most similar to a kept one (ToMe merges them into it, SiTo prunes them), then
restore the sub-layer's output to every token. The algorithms that pick and reduce the tokens are
in `diffaccel.tokens`; each method's file holds its own choice (`build_reduction`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..call import Context, SiteCall
from ..cost import reduction_estimate
from ..policy import Policy, Rule, Selector
from ..sites import Site
from ..tokens import TokenReduction, gather_positions, rope_seq_dim
from .base import DOWNSAMPLES, TokenMethod, option
from .common import BlockRandom, call_image_span, cfg_rows, default_frames, downsample_levels

METRICS = ("block", "hidden")


@dataclass(frozen=True)
class CellReductionConfig(TokenMethod):
    """Shared by the methods that reduce a site's image tokens with one kept token per cell. Subclasses
    declare the three sub-layer switches named in `kind_flags` and provide `build_reduction`.

    On joint sequences only the image span is reduced (text tokens pass unchanged); rotary tables and
    key masks are gathered for the kept tokens (a merged destination keeps its own position), and an
    (image, text) output pair has its image part restored."""

    ratio: float = option(0.5, low=0.0, high=1.0, doc="Fraction of a site's tokens reduced away (at most "
                          "1 - 1/(sx*sy): one token per cell stays).")
    sx: int = option(2, low=1, high=64, integer=True, doc="The cell's width in tokens.")
    sy: int = option(2, low=1, high=64, integer=True, doc="The cell's height in tokens.")
    st: int = option(0, low=0, high=64, integer=True, doc="Frames a cell spans on video grids (0: by family).")
    seed: int = option(0, low=0, high=2**62, integer=True, kw_only=True,
                       doc="Seed of the per-step draws (fixed by seed, step and block, so the same whatever "
                           "the batch).")
    max_downsample: int = option(1, choices=DOWNSAMPLES, kw_only=True,
                                 doc="The levels reduced, as tomesd's downsample factor: 1 acts at the finest "
                                     "token grid that has attention, 2 there and at the grid at half its "
                                     "resolution, and so on.")
    metric: str = option("block", choices=METRICS, kw_only=True,
                         doc='Similarity measured on the block\'s input ("block": one matching per block shared '
                             'by its reduced sub-layers) or on each sub-layer\'s own input ("hidden").')

    priority = 10
    reduces_tokens = True
    params = ("ratio",)
    zero = {"ratio": 0.0}
    mode: ClassVar[str] = "mean"  # TokenReduction.reduce mode
    kind_flags: ClassVar[tuple[str, str, str]] = ()  # switches for self_attn, cross_attn, ff

    def bounds(self, name: str) -> tuple[float, float] | None:
        cell = (self.sx, self.sy)
        if name == "ratio" and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 64 for v in cell):
            return 0.0, 1.0 - 1.0 / (self.sx * self.sy)  # one token per cell stays
        return None

    def default_policy(self) -> Policy:
        kinds = tuple(k for k, flag in zip(("self_attn", "cross_attn", "ff"), self.kind_flags) if getattr(self, flag))
        return Policy((Rule(Selector(kind=kinds, level=downsample_levels(self.max_downsample)), {"ratio": self.ratio}),))

    def unsupported(self, site: Site) -> str | None:
        if site.note:
            return site.note
        if site.kind == "block":
            return "acts on sub-layers, not whole blocks"
        return None

    def is_identity(self, params: dict) -> bool:
        return params["ratio"] <= 0

    def needs_block_input(self) -> bool:
        return self.metric == "block"

    def frames_per_cell(self, frames: int, span: int = 1) -> int:
        """st: frames a cell spans, at most the frames; 0 = `default_frames`."""
        return max(1, min(self.st or default_frames(frames, span), frames))

    def build_reduction(self, metric: torch.Tensor, grid: tuple[int, int, int], st: int, r: int,
                        rand: BlockRandom) -> TokenReduction:
        """`rand`: the draws of this block and step."""
        raise NotImplementedError  # pragma: no cover - abstract

    def reduction_for(self, site: Site, ctx: Context, x: torch.Tensor, grid: tuple[int, int, int], st: int, r: int,
                      one_row: bool = False) -> TokenReduction:
        """The reduction of this call's image tokens x (B, N, C). With metric="block", similarity is
        measured on the enclosing block's input and one reduction serves all sub-layers of the block
        in this call (as ToMeSD merges attention, cross-attention and MLP with one matching);
        otherwise, or when the block input does not hold these tokens, on the sub-layer's own input.
        one_row: one reduction for every batch row (the sub-layer takes per-token positions or a mask
        shared by the rows), measured on the rows' mean direction."""
        block_input = ctx.block_inputs.get(site.block) if self.metric == "block" else None
        shared = block_input is not None and block_input.shape[:2] == x.shape[:2]
        key = (self.name, site.block, r, one_row)
        if shared and key in ctx.shared:
            return ctx.shared[key]
        metric = cfg_rows(block_input if shared else x, ctx)
        if one_row and metric.shape[0] > 1:
            metric = F.normalize(metric, dim=-1).mean(dim=0, keepdim=True)
        reduction = self.build_reduction(metric, grid, st, r, BlockRandom(self.seed, ctx, site))
        reduction = reduction.expand(x.shape[0])
        if shared:
            ctx.shared[key] = reduction
        return reduction

    def act(self, site: Site, ctx: Context, params: dict, call: SiteCall) -> bool:
        x = call.hidden
        span = call_image_span(site, ctx, x)
        if span is None:
            return False
        n, (f, h, w) = span.n, span.grid
        st = self.frames_per_cell(f, ctx.geometry.frame_span)
        r = int(params["ratio"] * n)
        rope = call.get(*site.rope) if site.rope else None
        mask = call.get("attention_mask", 2)
        if self.uses_cost_model():
            cells = (f // st) * (h // self.sy) * (w // self.sx)
            estimate = reduction_estimate(site.module, site.kind, x, n, n - min(r, n - cells), span.text, cells,
                                          prune=self.mode == "drop")
            if not estimate.worth_it:
                ctx.notes[site.name] = estimate.why()
                return False
        start = span.start(x.shape[1])
        img = x if n == x.shape[1] else x.narrow(1, start, n)
        # dimensions of a mask over these tokens (keys, or queries and keys); a mask over other tokens
        # (a cross-attention's text) stays as it is
        mask_dims = [d for d in (mask.ndim - 1, mask.ndim - 2) if d >= 1 and mask.shape[d] > 1
                     and span.start(mask.shape[d]) is not None] if mask is not None else []
        reduction = self.reduction_for(site, ctx, img, span.grid, st, r, one_row=rope is not None or bool(mask_dims))
        if rope is not None or mask_dims:  # positions and masks follow the kept tokens
            order = torch.cat([reduction.keep_idx[0], reduction.dst_idx[0]])
            if rope is not None:
                rope = tuple(gather_positions(t, span, order, rope_seq_dim(t)) for t in rope)
                if any(t is None for t in rope):
                    ctx.notes[site.name] = "its rotary table does not cover these tokens, so it is skipped"
                    return False
                call.set(*site.rope, rope)
            for dim in mask_dims:
                mask = gather_positions(mask, span, order, dim)
            if mask_dims:
                call.set("attention_mask", 2, mask)
        reduced = reduction.reduce(img, self.mode)
        call.hidden = reduced if n == x.shape[1] else span.replace(x, 1, lambda _: reduced)
        call.restores.append(_span_restore(reduction, start if n != x.shape[1] else 0))
        call.reduced = True
        return True


def _span_restore(reduction: TokenReduction, start: int):
    """The inverse of a reduction for a sub-layer output: the image tokens at `start` of a joint
    sequence (or all of it), or the first element of an (image, text) output pair."""
    kept = reduction.kept

    def restore(y):
        if isinstance(y, tuple):
            return (restore(y[0]), *y[1:])
        if y.shape[1] == kept:
            return reduction.restore(y)
        return torch.cat([y[:, :start], reduction.restore(y[:, start:start + kept]), y[:, start + kept:]], dim=1)

    return restore
