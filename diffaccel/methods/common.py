"""What several methods read of a site and its call: where its image tokens lie, whether its
attention takes keys and values apart from its queries, the rows batched CFG selects from, the
seeded generator of a block and step, and the default windows of the schedules."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..call import Context
from ..policy import Window
from ..sites import Site
from ..tokens import ImageSpan

SUBLAYERS = ("self_attn", "cross_attn", "ff")  # the site kinds caching methods act on
# Video token rows that span more frames than this are too far apart in time to share a cell or a
# pooling window by default
MAX_FRAME_SPAN = 4
NO_GRID = "the image tokens of its calls lie on no token grid the adapter could read"
# Processors that take keys and values from `encoder_hidden_states` when given and queries from the
# hidden states (joint processors read it as a second token stream instead)
KV_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU",
                 "SlicedAttnProcessor")


def default_frames(frames: int, span: int = 1) -> int:
    """Frames a cell or pooling window spans when the user leaves it to us (st=0, factor_t=0): 2 on
    video grids whose token rows are close in time (span <= MAX_FRAME_SPAN video frames per row: Wan,
    CogVideoX, HunyuanVideo), else 1 (images, and LTX-Video's 8-frame rows)."""
    return 2 if frames > 1 and span <= MAX_FRAME_SPAN else 1


def warmup_window(warmup: int) -> Window:
    """Where a caching method's default rules act, given its `warmup`: the first `warmup` steps are
    computed in full and the last of them begins the first cycle, so the step after the warm-up is
    already a cached one (ToCa's Flux code: first_enhance=3, interval 4 computes steps 0, 1, 2, 6,
    10, ...). Warm-up 0 and 1 are the same: a run's first step is always computed."""
    return Window(max(0, warmup - 1), None, "step")


def downsample_levels(max_downsample: int) -> tuple[int, int]:
    """Resolution levels (0 = the finest grid with attention) whose downsample factor relative to that
    grid is at most `max_downsample` (1, 2, 4 or 8), as tomesd counts it."""
    return 0, int(math.log2(max_downsample))


def image_span(site: Site, ctx: Context, n: int) -> ImageSpan | None:
    """Where a site call's image tokens lie among its `n` tokens (None when the count fits no grid).
    Joint sites count the text of the call: it is in the sequence, or in the attention beside it."""
    grid = site.grid(ctx.geometry)
    if grid is None:
        return None
    geo = ctx.geometry
    span = ImageSpan(grid, geo.text_tokens if site.layout == "joint" else 0, geo.text_first)
    return span if span.start(n) is not None else None


def call_image_span(site: Site, ctx: Context, x: torch.Tensor, slices: int = 1) -> ImageSpan | None:
    """`image_span` of a call's hidden states x (B, N, C), or of the sequence `slices` such calls'
    tokens make together (context parallelism); None, with a note on the site saying why, when its
    tokens fit no grid."""
    span = image_span(site, ctx, x.shape[1] * slices)
    if span is None:
        ctx.notes[site.name] = NO_GRID
    return span


def kv_attention(site: Site) -> bool:
    """Whether a self-attention site can take keys and values apart from its queries, as
    `site.kv_arg` (an image-token site without rotary embeddings, with such a processor)."""
    m = site.module
    if site.plain_kv is not None:
        return site.plain_kv and site.layout == "image" and site.rope is None
    return (site.layout == "image" and site.rope is None
            and type(getattr(m, "processor", None)).__name__ in KV_PROCESSORS
            and getattr(m, "norm_cross", None) is None and not getattr(m, "is_cross_attention", False))


def cfg_rows(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Rows to select tokens from: the conditional half of a batched-CFG call (so both halves share
    one selection), otherwise every row."""
    if not ctx.cfg_batched:
        return x
    half = x.shape[0] // 2
    return x[half:] if ctx.cond_half == "second" else x[:half]


def block_generator(seed: int, step: int, site: Site) -> torch.Generator:
    """A generator fixed by (seed, step, block): the same draws whatever the batch, call order or
    earlier interruptions, and shared by the sub-layers of one block."""
    return _generator(seed, step, site.depth)


class BlockRandom:
    """Draws fixed by (seed, step, block), as `block_generator` gives them. Inside a compiled denoiser
    (where no generator can be made and the step is no constant) they come from the custom op
    `diffaccel::block_draw`, which reads the step from the context's `step_key` tensor: the same draws,
    and one compiled graph for every step."""

    def __init__(self, seed: int, ctx: Any, site: Site):
        self.seed, self.ctx, self.depth = seed, ctx, site.depth

    def _draw(self, kind: str, shape: tuple[int, ...], high: int = 0) -> torch.Tensor:
        if torch.compiler.is_compiling() and self.ctx.step_key is not None:
            return torch.ops.diffaccel.block_draw(self.ctx.step_key, self.seed, self.depth, kind, high, list(shape))
        return _draw(_generator(self.seed, self.ctx.step, self.depth), kind, shape, high)

    def generator(self) -> torch.Generator:
        """The block's generator itself (eager calls only)."""
        return _generator(self.seed, self.ctx.step, self.depth)

    def randint(self, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Ints in [0, high) on the CPU."""
        return self._draw("randint", shape, high)

    def rand(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw("rand", shape)

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw("randn", shape)


def _generator(seed: int, step: int, depth: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step * 7_919 + depth) % (2**63))


def _draw(gen: torch.Generator, kind: str, shape: tuple[int, ...], high: int) -> torch.Tensor:
    if kind == "randint":
        return torch.randint(high, size=tuple(shape), generator=gen)
    return (torch.rand if kind == "rand" else torch.randn)(tuple(shape), generator=gen)


@torch.library.custom_op("diffaccel::block_draw", mutates_args=())
def block_draw(step: torch.Tensor, seed: int, depth: int, kind: str, high: int, shape: list[int]) -> torch.Tensor:
    """BlockRandom's draws with the step given as a tensor (CPU result)."""
    return _draw(_generator(seed, int(step), depth), kind, tuple(shape), high)


@block_draw.register_fake
def _(step, seed, depth, kind, high, shape):
    return torch.empty(shape, dtype=torch.int64 if kind == "randint" else torch.float32)
