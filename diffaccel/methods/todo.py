"""ToDo (Smith et al., 2024): token downsampling for self-attention.

Keys and values come from the token grid downsampled by `factor` (interpolated: nearest-exact, the
reference's default, nearest, bilinear, bicubic; or pooled: avg, max); queries keep every token, so
nothing needs unmerging. One factor per resolution level (`level_factors`, the reference's second-level
factor at level 1), active within a window of the run; on video grids the pooling spans `factor_t`
frames too. `factor="auto"` follows the image size as the reference's demo does: 2 up to 1024 x 1024
pixels, 3 up to 1536 x 1536, 4 above.

Where the attention takes keys and values apart from its queries (diffusers' plain processors on
image tokens), the pooled tokens are passed as `encoder_hidden_states`, so the key and value
projections run on fewer tokens too. Elsewhere (joint text+image attention, rotary embeddings) the
sub-layer runs inside `PooledAttention`, which pools the image keys and values that reach
scaled_dot_product_attention, after the processor applied its rotary embedding to the keys; text
keys are left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..call import CallRecord, Context, SiteCall
from ..cost import pooling_estimate
from ..parallel import ring, unequal_slices
from ..policy import Policy, Rule, Selector, Window
from ..sites import Site
from ..tokens import POOL_MODES, PooledAttention, pool_tokens
from .base import DOWNSAMPLES, MethodConfig, TokenMethod, check_number, option, register
from .common import call_image_span, default_frames, downsample_levels, kv_attention

AUTO = "auto"
# factor="auto": (largest image area in pixels, factor), then 4 above the last
AUTO_FACTORS = ((1024 * 1024, 2.0), (1536 * 1536, 3.0))


def auto_factor(pixel_area: int) -> float:
    """The reference's resolution-adaptive factor: 2 up to 1024^2 pixels, 3 up to 1536^2, 4 above."""
    return next((f for area, f in AUTO_FACTORS if pixel_area <= area), 4.0)


@register
@dataclass(frozen=True)
class ToDoConfig(TokenMethod):
    """Keys and values of self-attention downsampled on the token grid (queries untouched). The
    reference's argument names port (downsample_factor, downsample_method, downsample_factor_level_2,
    which is level_factors={1: f})."""

    factor: float | str = option(2.0, low=1.0, high=64.0, choices=(AUTO,),
                                 doc='Key/value downsampling factor per side at the finest level (1 = off), or '
                                     '"auto" (by the image size: 2 up to 1024^2 pixels, 3 up to 1536^2, 4 above; '
                                     'in a policy, factor 0 means auto).')
    mode: str = option("nearest-exact", choices=POOL_MODES,
                       doc='How keys/values are downsampled: "nearest-exact", "nearest", "bilinear", "bicubic" '
                           '(interpolation) or "avg", "max" (pooling).')
    max_downsample: int = option(1, choices=DOWNSAMPLES,
                                 doc="The levels the factor applies to, as a downsample factor (tomesd's and ToDo's "
                                     "meaning: 1 is the finest token grid with attention, 2 adds the next level, "
                                     "...).")
    level_factors: dict = option(doc="{level: factor} for coarser levels (level 0 is the finest), e.g. {1: 1.5}.",
                                 default_factory=dict)
    start: float = option(0.0, low=0.0, high=1.0, doc="Where in the run (fraction of steps) ToDo starts acting.")
    end: float = option(1.0, low=0.0, high=1.0, doc="Where in the run (fraction of steps) ToDo stops acting.")
    factor_t: float = option(0.0, low=0.0, high=64.0, doc="Downsampling factor over frames on video grids (0: by "
                             "family).")

    name = "todo"
    priority = 0
    params = ("factor",)
    zero = {"factor": 1.0}
    # the reference's argument names (ImprovedTokenMerge's apply_patch)
    aliases = {"downsample_factor": "factor", "downsample_method": "mode", "downsample_factor_level_2": "level_factors"}

    @classmethod
    def translate(cls, key: str, value):
        if key == "downsample_factor_level_2":
            return "level_factors", {1: value}
        if key == "downsample_method":
            return "mode", {"avg_pool": "avg", "max_pool": "max"}.get(value, value)
        return super().translate(key, value)

    @classmethod
    def decode(cls, key: str, value: Any) -> Any:
        if key == "level_factors" and isinstance(value, dict):  # JSON keys are strings
            return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in value.items()}
        return value

    def validate(self) -> None:
        super().validate()
        n = type(self).__name__
        if not isinstance(self.level_factors, dict):
            raise TypeError(f"{n}.level_factors must be a dict {{level: factor}}, got {self.level_factors!r}")
        for level, f in self.level_factors.items():
            check_number(n, "level_factors key", level, 0, 8, integer=True)
            check_number(n, f"level_factors[{level}]", f, 1.0, 64.0)
        if 0 < self.factor_t < 1:
            raise ValueError(f"{n}.factor_t must be 0 (auto) or in [1, 64], got {self.factor_t!r}")
        if self.end <= self.start:
            raise ValueError(f"{n} needs start < end, got start={self.start}, end={self.end}")

    def check_param(self, key: str, value: float) -> None:
        if value != 0:  # 0: auto
            check_number(type(self).__name__, key, value, 1.0, 64.0)

    def default_policy(self) -> Policy:
        when = Window(self.start, self.end)
        factor = 0.0 if self.factor == AUTO else self.factor
        rules = [Rule(Selector(kind="self_attn", level=downsample_levels(self.max_downsample)), {"factor": factor}, when)]
        rules += [Rule(Selector(kind="self_attn", level=lvl), {"factor": f}, when)
                  for lvl, f in sorted(self.level_factors.items())]
        return Policy(tuple(rules))

    def unsupported(self, site: Site) -> str | None:
        if site.note:
            return site.note
        if site.kind != "self_attn":
            return "ToDo pools the keys/values of self-attention only"
        return None

    def conflict(self, site: Site, others: list[MethodConfig]) -> str | None:
        reducers = [m.name for m in others if m.reduces_tokens and not m.caches]  # ToCa reuses such sites whole
        if reducers and not kv_attention(site):
            return (f"todo pools keys/values inside the attention of {site.name} (joint text or rotary "
                    f"embeddings), where {reducers[0]} has already taken the tokens off their grid")
        return None

    def is_identity(self, params: dict) -> bool:
        return params["factor"] == 1.0  # (0 is auto)

    def context_parallel_refusal(self, cp: Any = None) -> str | None:
        if cp is not None and ring(cp):
            return ("it pools the whole sequence's keys and values, and ring attention hands each attention call "
                    "one process's slice of them (Ulysses gathers the whole sequence: ToDo runs there)")
        if cp is not None and (why := unequal_slices(cp)):
            return why
        return None

    def frames_factor(self, frames: int, span: int = 1) -> float:
        """factor_t, at most the frames; 0 = `default_frames`, as ToMe's st."""
        return min(float(frames), float(self.factor_t or default_frames(frames, span)))

    def act(self, site: Site, ctx: Context, params: dict, call: SiteCall) -> bool:
        x = call.hidden
        # context parallelism (Ulysses): the call holds 1 / world of the sequence; its attention sees the
        # whole of it, where PooledAttention pools (diffaccel.parallel)
        span = call_image_span(site, ctx, x, ctx.world)
        if span is None:
            return False
        # the processor decides, at each call: it may have been swapped since acceleration (fused
        # projections, an IP-Adapter or LoRA loaded, set_attn_processor)
        plain = kv_attention(site) and ctx.world == 1
        if plain and (call.kwargs.get(site.kv_arg) is not None or call.get("attention_mask", 2) is not None
                      or call.kwargs.get("mask") is not None):
            ctx.notes[site.name] = "its call carries a context or a mask: not plain self-attention, so it is not pooled"
            return False
        factor = params["factor"] or auto_factor(ctx.geometry.pixel_area)
        ft = self.frames_factor(span.grid[0], ctx.geometry.frame_span)
        f, h, w = span.grid
        pooled = math.ceil(f / ft) * math.ceil(h / factor) * math.ceil(w / factor)
        if self.uses_cost_model():
            estimate = pooling_estimate(site.module, x, span.n, pooled, span.text, before_projection=plain)
            if not estimate.worth_it:
                ctx.notes[site.name] = estimate.why()
                return False
        call.keys_values = x.shape[1] - (span.n - pooled) // ctx.world
        if plain:
            call.kwargs[site.kv_arg] = pool_tokens(x, *span.grid, factor, self.mode, ft)
            return True
        pooling = PooledAttention(span, factor, self.mode, ft, slices=ctx.world)
        call.arounds.append(pooling)

        def check(out):
            """The attention ran elsewhere than scaled_dot_product_attention: say so, keys/values were whole."""
            if not pooling.hits:
                record = ctx.log[site.name]
                ctx.log[site.name] = CallRecord(record.tokens, record.computed, record.tokens)
                ctx.notes[site.name] = NOT_POOLED
                ctx.warn_once("todo not pooled", f"todo: {site.name} {NOT_POOLED}; describe() lists every such site")
            return out

        call.restores.append(check)
        return True


NOT_POOLED = ("runs attention that does not call scaled_dot_product_attention (its processor or attention "
              "backend): keys/values not pooled")
