"""ToCa (Zou et al., 2024): token-wise feature caching.

Every `interval` steps each selected sub-layer runs in full and its output is stored. On the steps
between, only a fresh fraction of its tokens is recomputed and written into the stored output; the
other tokens keep their cached output. The compute is token-partial for real: feed-forward and
cross-attention run on the fresh tokens only, and self-attention runs the queries of the fresh tokens
against keys and values of all tokens (on image-token layouts; where self-attention mixes text and
image tokens or takes rotary embeddings it reuses its whole cached output on those steps, as the
paper's own code does for self-attention everywhere).

The fresh fraction at a site is the policy's `fresh_ratio` times a depth factor. The default policy
follows the paper: from (1 + step_weight) R at the first step to (1 - step_weight) R at the last,
times a weight per sub-layer kind (feed-forward 1.6, cross-attention 0.6, self-attention 0: reused
whole), and the depth factor 1 + depth_weight - 2 depth_weight d / (blocks - 1) gives shallow
blocks more fresh tokens.

Which tokens are fresh: the highest of
    primary score (scaled to [0, 1] per row)
    + staleness_weight x (steps since the token was last computed) / interval
    + 1 for the best token of each `cell` x `cell` (x `cell_frames` for video) cell of the grid,
so that fresh tokens cover the image. Primary scores ("score"), none needing an attention map unless
asked for:
    "change"     how much the token's input moved since its output was computed (relative L2)
    "vnorm"      small value norms first (DuCa): the block's self-attention values where it has one,
                 else the sub-layer's input
    "random"     seeded draws, fixed by (seed, step, block)
    "attention"  attention each token received in its block's self-attention at the last full step
                 (softmax column sums, computed in query tiles at those sites only); blocks without an
                 image-token self-attention fall back to "random"
With batched CFG the conditional half picks and the other half uses the same tokens; separate
cond/uncond calls keep separate caches and selections. Caches are released when the run ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels import gather_tokens, scatter_tokens
from ..policy import Linear, Policy, Rule, Selector
from ..sites import Site
from ..tokens import expand_rows
from .base import (
    SUBLAYERS,
    CacheEntry,
    MethodConfig,
    SiteCall,
    block_generator,
    cfg_rows,
    check_choice,
    check_number,
    image_span,
    kv_attention,
    register,
    warmup_window,
)

SCORES = ("change", "vnorm", "random", "attention")
KIND_WEIGHTS = {"self_attn": 0.0, "cross_attn": 0.6, "ff": 1.6}  # PixArt-alpha-ToCa's module factors
CHANGE_CHUNK_BYTES = 8 << 20  # largest temporary of the "change" score on the CPU
ATTENTION_TILE = 1 << 22  # elements of one attention-probability tile (rows x keys x heads) per batch row


class TokenwiseCache(MethodConfig):
    """What ToCa and DuCa share: the cycle, the fresh-token choice and the token-partial call.
    Subclasses declare the fields interval, fresh_ratio, warmup, score, staleness_weight, cell,
    cell_frames, step_weight, depth_weight, kind_weights, seed and policy, and `cached_plan`."""

    caches = True
    reduces_tokens = True  # fresh-token steps reduce queries: no ToMe/SiTo on the same site
    priority = 20
    params = ("interval", "fresh_ratio")

    def __hash__(self):
        return hash((type(self).__name__, self.interval, self.fresh_ratio, self.warmup, self.score,
                     self.staleness_weight, self.cell, self.cell_frames, self.step_weight, self.depth_weight,
                     tuple(sorted(self.kind_weights.items())), self.seed))

    # -- configuration ----------------------------------------------------------------------
    def validate(self) -> None:
        n = type(self).__name__
        check_number(n, "interval", self.interval, 1, 1000, integer=True)
        check_number(n, "fresh_ratio", self.fresh_ratio, 0.0, 1.0)
        check_number(n, "warmup", self.warmup, 0, 100_000, integer=True)
        check_choice(n, "score", self.score, SCORES)
        check_number(n, "staleness_weight", self.staleness_weight, 0.0, 100.0)
        check_number(n, "cell", self.cell, 0, 64, integer=True)
        check_number(n, "cell_frames", self.cell_frames, 1, 64, integer=True)
        check_number(n, "step_weight", self.step_weight, -1.0, 1.0)
        check_number(n, "depth_weight", self.depth_weight, -1.0, 1.0)
        check_number(n, "seed", self.seed, 0, 2**62, integer=True)
        if not isinstance(self.kind_weights, dict):
            raise TypeError(f"{n}.kind_weights must be a dict {{kind: weight}}, got {self.kind_weights!r}")
        for kind, w in self.kind_weights.items():
            check_choice(n, "kind_weights key", kind, SUBLAYERS)
            check_number(n, f"kind_weights[{kind!r}]", w, 0.0, 100.0)

    def check_param(self, key: str, value: float) -> None:
        n = type(self).__name__
        if key == "interval":  # schedules may give fractional intervals; they are rounded when used
            check_number(n, key, value, 1, 1000)
        else:
            check_number(n, key, value, 0.0, 1.0)

    def default_policy(self) -> Policy:
        when = warmup_window(self.warmup)
        if self.fresh_ratio >= 1:
            return Policy((Rule(Selector(kind=SUBLAYERS), {"interval": self.interval, "fresh_ratio": 1.0}, when),))
        rules = []
        for kind in SUBLAYERS:
            r = self.fresh_ratio * self.kind_weights.get(kind, 1.0)
            first, last = (min(1.0, max(0.0, r * (1 + s * self.step_weight))) for s in (1, -1))
            rules.append(Rule(Selector(kind=kind), {"interval": self.interval, "fresh_ratio": Linear(first, last)},
                              when))
        return Policy(tuple(rules))

    @classmethod
    def flux(cls, interval: int = 4, fresh_ratio: float = 0.1, warmup: int = 3, **fields: Any):
        """flux-ToCa's own schedule, for Flux's double- and single-stream blocks (diffusers' names
        `transformer_blocks.*` and `single_transformer_blocks.*`): attention reused whole on cached
        steps, no step factor, depth weight 0.5, and the feed-forward sub-layers' fresh ratio times
        0.4 in double-stream blocks and 1.6 in single-stream ones. Defaults: the paper's Flux
        setting, N=4, R=0.1, first 3 steps full. Other fields pass through (score, seed, ...)."""
        when = warmup_window(warmup)
        every = {"interval": interval, "fresh_ratio": 0.0}
        policy = Policy((
            Rule(Selector(kind=SUBLAYERS), every, when),
            Rule(Selector(kind="ff", name="transformer_blocks.*"), {**every, "fresh_ratio": 0.4 * fresh_ratio}, when),
            Rule(Selector(kind="ff", name="single_transformer_blocks.*"),
                 {**every, "fresh_ratio": min(1.0, 1.6 * fresh_ratio)}, when)))
        fields = {"step_weight": 0.0, "depth_weight": 0.5, **fields}
        return cls(interval=interval, fresh_ratio=fresh_ratio, warmup=warmup, policy=policy, **fields)

    def unsupported(self, site: Site) -> str | None:
        return "acts on sub-layers, not whole blocks" if site.kind == "block" else None

    def is_identity(self, params: dict) -> bool:
        return round(params["interval"]) <= 1 or params["fresh_ratio"] >= 1

    # -- the cycle --------------------------------------------------------------------------
    def fresh_count(self, site: Site, params: dict, n: int) -> int:
        ratio = params["fresh_ratio"]
        if site.blocks > 1 and self.depth_weight:
            ratio *= 1 + self.depth_weight - 2 * self.depth_weight * site.depth / (site.blocks - 1)
        return min(n, max(0, round(ratio * n)))

    def cycle_offset(self, ctx: Any, params: dict, entry: CacheEntry) -> int | None:
        """Steps since the entry's cycle began (0: another call of that step), or None when this call
        starts a new cycle."""
        offset = ctx.step - entry.step
        return offset if 0 <= offset < round(params["interval"]) else None

    def plan(self, site: Site, ctx: Any, params: dict, entry: CacheEntry, call: SiteCall) -> str:
        offset = self.cycle_offset(ctx, params, entry)
        if offset is None:
            return "compute"
        if offset == 0:  # another call of the same step and branch (e.g. a second expert): same output
            return "reuse"
        return self.cached_plan(site, ctx, params, entry, call, offset)

    def cached_plan(self, site, ctx, params, entry, call, offset: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_plan(self, site: Site, params: dict, call: SiteCall) -> str:
        """A ToCa step at this site: all tokens fresh ("recompute", the cycle keeps its start), none
        ("reuse"), or some ("partial")."""
        n = call.hidden.shape[1]
        k = self.fresh_count(site, params, n)
        if k >= n:
            return "recompute"
        if k == 0 or not _partial_ok(site, call):
            return "reuse"
        return "partial"

    # -- entries ----------------------------------------------------------------------------
    def init_entry(self, site: Site, ctx: Any, params: dict, entry: CacheEntry, hidden: torch.Tensor) -> None:
        rows = cfg_rows(hidden, ctx)
        entry.extra["staleness"] = torch.zeros(rows.shape[:2], dtype=torch.int32, device=hidden.device)
        if self.score == "change":
            entry.extra["input"] = rows.detach().clone()
        if site.kind == "self_attn" and self.score in ("vnorm", "attention") and _image_self_attention(site, hidden):
            key = (self.score, ctx.branch, site.block)
            ctx.state[key] = _value_norm(site.module, rows) if self.score == "vnorm" else \
                _attention_received(site.module, rows)

    def refresh(self, site: Site, ctx: Any, params: dict, entry: CacheEntry, call: SiteCall) -> None:
        x = call.hidden
        n = x.shape[1]
        k = self.fresh_count(site, params, n)
        rows = cfg_rows(x, ctx)
        stale = entry.extra["staleness"]
        score = self.primary_score(site, ctx, entry, rows)
        if self.staleness_weight:
            score = score + (self.staleness_weight / max(1, round(params["interval"]))) * (stale + 1)
        if self.cell:
            score = score + self.cell_bonus(site, ctx, score)
        picked = torch.topk(score, k, dim=1, sorted=False).indices.sort(dim=1).values  # (B', k)
        stale.add_(1).scatter_(1, picked, 0)
        if "input" in entry.extra:
            scatter_tokens(entry.extra["input"], picked, gather_tokens(rows, picked))
        idx = expand_rows(picked, x.shape[0])
        if site.kind == "self_attn" and call.kwargs.get("encoder_hidden_states") is None:
            call.kwargs["encoder_hidden_states"] = x  # keys and values of every token
            call.keys_values = call.keys_values or n
        call.hidden = gather_tokens(x, idx)
        call.reduced = True
        cached = entry.output
        call.restores.append(lambda out: scatter_tokens(cached, idx, out.to(cached.dtype)))

    # -- scores -----------------------------------------------------------------------------
    def primary_score(self, site: Site, ctx: Any, entry: CacheEntry, rows: torch.Tensor) -> torch.Tensor:
        """(B', N) in [0, 1]: higher is fresher."""
        score = self.score
        if score == "change":
            ref = entry.extra["input"]
            return _row_scaled(_relative_change(rows, ref))
        if score == "vnorm":
            if site.kind == "self_attn" and _image_self_attention(site, rows):
                norms = _value_norm(site.module, rows)
            else:
                norms = ctx.state.get(("vnorm", ctx.branch, site.block))
                if norms is None or norms.shape != rows.shape[:2]:
                    norms = rows.float().norm(dim=-1)
            return 1 - _row_scaled(norms)
        if score == "attention":
            received = ctx.state.get(("attention", ctx.branch, site.block))
            if received is not None and received.shape == rows.shape[:2]:
                return _row_scaled(received)
        gen = block_generator(self.seed, ctx.step, site)
        return torch.rand(rows.shape[:2], generator=gen).to(rows.device)

    def cell_bonus(self, site: Site, ctx: Any, score: torch.Tensor) -> torch.Tensor:
        """1 for the highest-scoring token of each cell of the image-token grid, 0 elsewhere."""
        span = image_span(site, ctx, score.shape[1])
        if span is None:
            return torch.zeros_like(score)
        start, (f, h, w) = span.start(score.shape[1]), span.grid
        img = score[:, start:start + f * h * w].reshape(-1, 1, f, h, w)
        kernel = (min(self.cell_frames, f), min(self.cell, h), min(self.cell, w))
        best = F.max_pool3d(img, kernel, kernel, ceil_mode=True)
        for dim, k, size in ((2, kernel[0], f), (3, kernel[1], h), (4, kernel[2], w)):
            best = best.repeat_interleave(k, dim=dim).narrow(dim, 0, size)
        bonus = torch.zeros_like(score)
        bonus[:, start:start + f * h * w] = (img >= best).reshape(score.shape[0], -1).to(score.dtype)
        return bonus


def _relative_change(rows: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(B, N) float32: |rows - ref| / |ref| per token. On the CPU it runs over token chunks whose
    temporaries stay under CHANGE_CHUNK_BYTES: a larger allocation is mapped afresh by the allocator
    each time and faults in every page (a single-stream Flux block's 1536 x 15360 input took 107 ms
    to subtract whole, against 10 ms for the whole score in chunks)."""
    b, n, d = rows.shape
    step = n if rows.device.type != "cpu" else max(1, CHANGE_CHUNK_BYTES // (4 * b * d))
    out = torch.empty(b, n, dtype=torch.float32, device=rows.device)
    for i in range(0, n, step):
        r, f = rows[:, i:i + step].float(), ref[:, i:i + step].float()
        out[:, i:i + step] = torch.linalg.vector_norm(r - f, dim=-1) / torch.linalg.vector_norm(f, dim=-1).clamp_min(1e-6)
    return out


def _row_scaled(x: torch.Tensor) -> torch.Tensor:
    """(B, N) scaled so that each row's maximum is 1."""
    return x / x.amax(dim=1, keepdim=True).clamp_min(1e-12)


def _image_self_attention(site: Site, x: torch.Tensor) -> bool:
    """Whether a self-attention site computes keys and values from its own image tokens, with
    diffusers' Attention projections and a processor that can take them separately from the
    queries: then queries can be a subset of the tokens."""
    m = site.module
    return (kv_attention(site) and all(hasattr(m, a) for a in ("to_q", "to_k", "to_v", "heads"))
            and getattr(m.to_k, "in_features", None) == x.shape[-1])


def _partial_ok(site: Site, call: SiteCall) -> bool:
    if site.kind == "ff":
        return True  # token-wise: any layout
    if call.kwargs.get("attention_mask") is not None and site.kind == "self_attn":
        return False  # a mask over query rows would need cutting too
    if site.kind == "cross_attn":
        return site.layout == "image"
    return _image_self_attention(site, call.hidden)


def _value_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.to_v(x).float().norm(dim=-1)


def _attention_received(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention each token receives, summed over heads and queries: (B, N). Queries are
    processed in tiles so no N x N map is held beyond ATTENTION_TILE elements."""
    b, n, _ = x.shape
    heads = module.heads
    q = module.to_q(x).float().view(b, n, heads, -1).transpose(1, 2)
    k = module.to_k(x).float().view(b, n, heads, -1).transpose(1, 2)
    if getattr(module, "norm_q", None) is not None:
        q, k = module.norm_q(q), module.norm_k(k)
    scale = getattr(module, "scale", None) or 1 / math.sqrt(q.shape[-1])
    received = torch.zeros(b, n, device=x.device)
    rows = max(1, ATTENTION_TILE // max(1, n * heads))
    for start in range(0, n, rows):
        p = torch.softmax(q[:, :, start:start + rows] @ k.transpose(-1, -2) * scale, dim=-1)
        received += p.sum(dim=(1, 2))
    return received


@register
@dataclass(frozen=True)
class ToCaConfig(TokenwiseCache):
    """interval: steps per cycle; its first step computes every token (1: the baseline).
    fresh_ratio: base fraction of tokens recomputed on the other steps (1: all, the baseline).
    warmup: steps at the start of the run that are always computed; the last of them begins the
    first cycle (0 and 1 are the same).
    score: primary fresh-token score, one of "change", "vnorm", "random", "attention".
    staleness_weight: bonus per step a token has waited (in cycles).
    cell, cell_frames: spatial (and temporal) cell of the uniformity bonus; cell 0 turns it off.
    step_weight, depth_weight, kind_weights: the paper's schedule over steps, depth and sub-layer kind.
    seed: seed of the "random" score."""

    interval: int = 3
    fresh_ratio: float = 0.3
    warmup: int = 0
    score: str = "change"
    staleness_weight: float = 0.25
    cell: int = 4
    cell_frames: int = 2
    step_weight: float = 0.9
    depth_weight: float = 0.6
    kind_weights: dict = field(default_factory=lambda: dict(KIND_WEIGHTS))
    seed: int = 0
    policy: Policy | dict | str | None = None

    name = "toca"

    __hash__ = TokenwiseCache.__hash__

    def cached_plan(self, site, ctx, params, entry, call, offset: int) -> str:
        return self.token_plan(site, params, call)
