"""ToDo (Smith et al., 2024): token downsampling for self-attention.

Keys and values come from the token grid pooled by `factor` (nearest, average or max); queries keep
every token, so nothing needs unmerging. One factor per resolution level, active within a window of
the run; on video grids the pooling spans `factor_t` frames too.

Where the attention takes keys and values apart from its queries (diffusers' plain processors on
image tokens), the pooled tokens are passed as `encoder_hidden_states`, so the key and value
projections run on fewer tokens too. Elsewhere (joint text+image attention, rotary embeddings) the
sub-layer runs inside `PooledAttention`, which pools the image keys and values that reach
scaled_dot_product_attention, after the processor applied its rotary embedding to the keys; text
keys are left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..cost import pooling_estimate
from ..policy import Policy, Rule, Selector, Window
from ..sites import Site
from ..tokens import PooledAttention, pool_tokens
from .base import (
    MethodConfig,
    SiteCall,
    check_bool,
    check_choice,
    check_number,
    default_frames,
    image_span,
    kv_attention,
    register,
)

POOL_MODES = ("nearest", "avg", "max")


@register
@dataclass(frozen=True)
class ToDoConfig(MethodConfig):
    """factor: key/value downsampling factor per side at the finest level (1 = off).
    factor_t: downsampling factor over frames on video grids (0: by family, see frames_factor).
    level_factors: {level: factor} for coarser levels (level 0 is the finest), e.g. {1: 1.5}.
    start, end: the part of the run (fraction of steps) in which ToDo acts.
    cost_model: skip calls where pooling costs more than it saves (diffaccel.cost); None: only at
    the default factor and schedule."""

    factor: float = 2.0
    mode: str = "nearest"
    max_downsample: int = 1
    level_factors: dict = field(default_factory=dict)
    start: float = 0.0
    end: float = 1.0
    factor_t: float = 0.0
    cost_model: bool | None = None
    policy: Policy | dict | str | None = None

    name = "todo"
    priority = 0
    params = ("factor",)

    def __hash__(self):
        return hash((self.factor, self.mode, self.max_downsample, tuple(sorted(self.level_factors.items())),
                     self.start, self.end, self.factor_t, self.cost_model))

    def validate(self) -> None:
        n = type(self).__name__
        check_number(n, "factor", self.factor, 1.0, 64.0)
        check_choice(n, "mode", self.mode, POOL_MODES)
        check_number(n, "max_downsample", self.max_downsample, 1, 8, integer=True)
        if not isinstance(self.level_factors, dict):
            raise TypeError(f"{n}.level_factors must be a dict {{level: factor}}, got {self.level_factors!r}")
        for level, f in self.level_factors.items():
            check_number(n, "level_factors key", level, 0, 8, integer=True)
            check_number(n, f"level_factors[{level}]", f, 1.0, 64.0)
        check_number(n, "factor_t", self.factor_t, 0.0, 64.0)
        if 0 < self.factor_t < 1:
            raise ValueError(f"{n}.factor_t must be 0 (auto) or in [1, 64], got {self.factor_t!r}")
        if self.cost_model is not None:
            check_bool(n, "cost_model", self.cost_model)
        check_number(n, "start", self.start, 0.0, 1.0)
        check_number(n, "end", self.end, 0.0, 1.0)
        if self.end <= self.start:
            raise ValueError(f"{n} needs start < end, got start={self.start}, end={self.end}")

    def default_policy(self) -> Policy:
        when = Window(self.start, self.end)
        rules = [Rule(Selector(kind="self_attn", level=(0, self.max_downsample - 1)), {"factor": self.factor}, when)]
        rules += [Rule(Selector(kind="self_attn", level=lvl), {"factor": f}, when)
                  for lvl, f in sorted(self.level_factors.items())]
        return Policy(tuple(rules))

    def unsupported(self, site: Site) -> str | None:
        if site.note:
            return site.note
        if site.kind != "self_attn":
            return "ToDo pools the keys/values of self-attention only"
        return None

    def wraps_forward(self, site: Site) -> bool:
        return not kv_attention(site)

    def conflict(self, site: Site, others: list[MethodConfig]) -> str | None:
        reducers = [m.name for m in others if m.reduces_tokens and not m.caches]  # ToCa reuses such sites whole
        if reducers and not kv_attention(site):
            return (f"todo pools keys/values inside the attention of {site.name} (joint text or rotary "
                    f"embeddings), where {reducers[0]} has already taken the tokens off their grid")
        return None

    def is_identity(self, params: dict) -> bool:
        return params["factor"] <= 1.0

    def frames_factor(self, frames: int, span: int = 1) -> float:
        """factor_t, at most the frames; 0 = `default_frames`, as ToMe's st."""
        return min(float(frames), float(self.factor_t or default_frames(frames, span)))

    def act(self, site: Site, ctx, params: dict, call: SiteCall) -> None:
        x = call.hidden
        span = image_span(site, ctx, x.shape[1])
        if span is None:
            return
        plain = kv_attention(site)
        if plain and (call.kwargs.get("encoder_hidden_states") is not None or call.get("attention_mask", 2) is not None):
            return  # a context or mask was given: not plain self-attention on this call
        factor, ft = params["factor"], self.frames_factor(span.grid[0], ctx.geometry.frame_span)
        f, h, w = span.grid
        pooled = math.ceil(f / ft) * math.ceil(h / factor) * math.ceil(w / factor)
        if self.uses_cost_model():
            estimate = pooling_estimate(site.module, x, span.n, pooled, span.text, before_projection=plain)
            if not estimate.worth_it:
                ctx.notes[site.name] = estimate.why()
                return
        if plain:
            kv = pool_tokens(x, *span.grid, factor, self.mode, ft)
            call.kwargs["encoder_hidden_states"] = kv
        else:
            call.around = PooledAttention(span, factor, self.mode, ft)
        call.keys_values = x.shape[1] - span.n + pooled
