"""What every method provides, and the registry that maps names and config types to methods.

A method is one frozen, validated config dataclass. Its fields are the method's whole public
surface; `default_policy` turns them into a Policy (the paper's schedule), and `act` changes one
sub-layer call on the sites and steps the policy selects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..cost import reduction_estimate
from ..policy import Policy, Rule, Selector, Window
from ..sites import Site
from ..tokens import ImageSpan, TokenReduction, gather_positions, rope_seq_dim

_REGISTRY: dict[str, type[MethodConfig]] = {}
SUBLAYERS = ("self_attn", "cross_attn", "ff")  # the site kinds caching methods act on
# Video token rows that span more frames than this are too far apart in time to share a cell or a
# pooling window by default
MAX_FRAME_SPAN = 4


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


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names accepted by `accelerate_pipeline`."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[MethodConfig]:
    if not isinstance(name, str):
        raise TypeError(f"a method is a name, a config object or a list of them; got {type(name).__name__}")
    cls = _REGISTRY.get(name.lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; available: {available_methods()}")
    return cls


@dataclass
class CacheEntry:
    """A sub-layer output kept for reuse at later steps: the step it was computed at, the shape of the
    call it belongs to (an entry never serves a call of another shape), and the step at which its
    cycle ends (the next full computation; None: not a cycle). `extra` holds what the method keeps
    per token beside it (counted in the cache's size)."""

    output: Any
    step: int
    signature: tuple
    until: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)


class SiteCall:
    """One call of a site's module, as methods rewrite it: its hidden states, its keyword arguments,
    and the functions that turn the reduced output back into a full one."""

    __slots__ = ("args", "kwargs", "restores", "keys_values", "reduced", "arounds")

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = list(args), dict(kwargs)
        self.restores: list = []  # functions of the output, applied last to first after the call
        self.keys_values: int | None = None  # tokens keys/values come from, when a method changed them
        self.reduced = False
        # context managers the sub-layer's forward runs in, entered in order (ToDo's pooling inside
        # attention, the attention probes of token-wise caching)
        self.arounds: list = []

    def get(self, name: str, position: int = -1) -> Any:
        """An argument of the call by keyword, or by position (counting the hidden states as 0)."""
        if 0 <= position < len(self.args):
            return self.args[position]
        return self.kwargs.get(name)

    def set(self, name: str, position: int, value: Any) -> None:
        if 0 <= position < len(self.args):
            self.args[position] = value
        else:
            self.kwargs[name] = value

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    @hidden.setter
    def hidden(self, value: torch.Tensor) -> None:
        if self.args:
            self.args[0] = value
        else:
            self.kwargs["hidden_states"] = value


def check_number(cls_name: str, field: str, value: Any, low: float, high: float, integer: bool = False,
                 low_open: bool = False) -> None:
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise TypeError(f"{cls_name}.{field} must be {kind}, got {value!r}")
    bracket = "(" if low_open else "["
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
        raise ValueError(f"{cls_name}.{field} must be in {bracket}{low}, {high}], got {value!r}")


def check_choice(cls_name: str, field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{cls_name}.{field} must be one of {list(allowed)}, got {value!r}")


DOWNSAMPLES = (1, 2, 4, 8)


def check_downsample(cls_name: str, field: str, value: Any) -> None:
    """A tomesd-style max_downsample: a token-grid downsample factor."""
    if isinstance(value, bool) or value not in DOWNSAMPLES:
        raise ValueError(f"{cls_name}.{field} must be one of {list(DOWNSAMPLES)} (a downsample factor: 1 acts at "
                         f"the finest token grid with attention, 2 there and at half its resolution, ...), "
                         f"got {value!r}")


def downsample_levels(max_downsample: int) -> tuple[int, int]:
    """Resolution levels (0 = the finest grid with attention) whose downsample factor relative to that
    grid is at most `max_downsample` (1, 2, 4 or 8), as tomesd counts it."""
    return 0, int(math.log2(max_downsample))


def check_bool(cls_name: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{cls_name}.{field} must be True or False, got {value!r}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. `policy` (a Policy, its dict, or JSON) replaces the default
    schedule; parameters a policy rule does not set come from the config's fields."""

    name: ClassVar[str] = ""
    # Order on a shared site: key/value rewrites (ToDo) before query reductions (ToMe, SiTo).
    priority: ClassVar[int] = 0
    # Whether the method changes which query tokens a sub-layer computes (at most one per site).
    reduces_tokens: ClassVar[bool] = False
    # Policy parameters the method reads, as name -> config field giving the default.
    params: ClassVar[tuple[str, ...]] = ()
    # Whether the method reuses sub-layer outputs across steps (at most one per site): the runtime
    # then keeps a cache per site and CFG branch and asks `plan` what to do with each call.
    caches: ClassVar[bool] = False
    # The reference implementation's argument names -> config fields, so that its users' calls port
    # unchanged (`accelerate_pipeline(pipe, "sito", prune_ratio=0.5)`)
    aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def translate(cls, key: str, value: Any) -> tuple[str, Any]:
        """An option as the user named it -> (config field, value)."""
        return cls.aliases.get(key, key), value

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} | set(cls.aliases)

    def __post_init__(self):
        policy = self.policy
        if isinstance(policy, str):
            policy = Policy.from_json(policy)
        elif isinstance(policy, dict):
            policy = Policy.from_dict(policy)
        elif policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"{type(self).__name__}.policy must be a Policy, a dict or JSON text, got {policy!r}")
        object.__setattr__(self, "policy", policy)
        if policy is not None:
            unknown = policy.param_names() - set(self.params)
            if unknown:
                raise ValueError(f"policy sets {sorted(unknown)}, which {self.name} does not read; "
                                 f"allowed: {list(self.params)}")
            for rule in policy.rules:
                for key, schedule in rule.params.items():
                    for value in schedule.knots():
                        self.check_param(key, value)
        self.validate()

    # -- to be provided by each method -------------------------------------------------------
    def validate(self) -> None:
        """Raise a clear error on bad field values."""

    def check_param(self, key: str, value: float) -> None:
        """Validate one scheduled parameter value (same bounds as the config field)."""
        self.validate_field(key, value)

    def validate_field(self, key: str, value: Any) -> None:
        dataclasses.replace(self, **{key: value}, policy=None)

    def default_policy(self) -> Policy:
        raise NotImplementedError  # pragma: no cover - abstract

    def unsupported(self, site: Site) -> str | None:
        """Why this method cannot act on a site (None when it can)."""
        return None

    def needs_block_input(self) -> bool:
        """Whether the method reads the enclosing block's input (the runtime then records it)."""
        return False

    def is_identity(self, params: dict) -> bool:
        """Whether these parameters leave the sub-layer unchanged (zero strength)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def act(self, site: Site, ctx: Any, params: dict, call: SiteCall) -> bool:
        """Rewrite the call (token methods); whether it changed anything (if not, a note on
        ctx.notes[site.name] says why). Caching methods act through `plan` instead."""
        return False

    def wraps_forward(self, site: Site) -> bool:
        """Whether the method needs the site's forward wrapped (to skip it, or to run it in a context)."""
        return self.caches

    def conflict(self, site: Site, others: list[MethodConfig]) -> str | None:
        """Why this method cannot share the site with these others (None when it can)."""
        return None

    def uses_cost_model(self) -> bool:
        """Whether the cost model may skip sites: `cost_model` when set, else only for the method's
        default strength and schedule (an explicit setting acts wherever its selectors point)."""
        choice = getattr(self, "cost_model", False)
        if choice is not None:
            return bool(choice)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return self.policy is None and all(getattr(self, k) == defaults.get(k) for k in self.params)

    def reuses(self, site: Site, ctx: Any, params: dict, entry: CacheEntry) -> bool:
        """Caching methods: whether this call returns the cached output instead of running."""
        return False

    def reuses_blocks(self) -> bool:
        """Caching methods: whether some steps skip whole blocks (see `skips_block`)."""
        return False

    def skips_block(self, ctx: Any, params: dict, entry: CacheEntry) -> bool:
        """Caching methods that reuse blocks: whether, at this call, the block holding this site may
        return its stored output without running (asked of every site of the block)."""
        return False

    def plan(self, site: Site, ctx: Any, params: dict, entry: CacheEntry, call: SiteCall) -> str:
        """Caching methods, given a cache entry that fits this call: "reuse" (return the entry's
        output, the sub-layer does not run), "partial" (`refresh` rewrites the call to the tokens to
        recompute) or "compute" (run in full and store the output)."""
        return "reuse" if self.reuses(site, ctx, params, entry) else "compute"

    def refresh(self, site: Site, ctx: Any, params: dict, entry: CacheEntry, call: SiteCall) -> None:
        """Caching methods that plan "partial" calls: rewrite the call and write its output into the entry."""
        raise NotImplementedError  # pragma: no cover - abstract

    def planned(self, site: Site, step: int, num_steps: int, params: dict | None) -> dict | None:
        """What describe() shows of the method's parameters at a step of a run of num_steps."""
        return params

    def cycle_end(self, ctx: Any, params: dict) -> int | None:
        """Caching methods: for an output computed in full at this call, the step at which the next full
        computation is due."""
        return None

    def prepare_compute(self, site: Site, ctx: Any, params: dict, call: SiteCall) -> None:
        """Caching methods: a call about to run in full and be stored (e.g. ask for an attention probe)."""

    def init_entry(self, site: Site, ctx: Any, params: dict, entry: CacheEntry, hidden: torch.Tensor) -> None:
        """Caching methods: fill `entry.extra` when a full output is stored (`hidden`: the call's input)."""

    # -- shared ------------------------------------------------------------------------------
    def effective_policy(self) -> Policy:
        return self.policy if self.policy is not None else self.default_policy()

    def resolve(self, raw: dict | None) -> dict | None:
        """Policy output completed with config defaults; None when the method is idle."""
        if raw is None:
            return None
        params = {k: raw.get(k, getattr(self, k)) for k in self.params}
        return None if self.is_identity(params) else params

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "policy"}
        d["policy"] = self.effective_policy().to_dict()
        return {"method": self.name, **d}


NO_GRID = "the image tokens of its calls lie on no token grid the adapter could read"


def image_span(site: Site, ctx: Any, n: int) -> ImageSpan | None:
    """Where a site call's image tokens lie among its `n` tokens (None when the count fits no grid).
    Joint sites count the text of the call: it is in the sequence, or in the attention beside it."""
    grid = site.grid(ctx.geometry)
    if grid is None:
        return None
    geo = ctx.geometry
    span = ImageSpan(grid, geo.text_tokens if site.layout == "joint" else 0, geo.text_first)
    return span if span.start(n) is not None else None


# Processors that take keys and values from `encoder_hidden_states` when given and queries from the
# hidden states (joint processors read it as a second token stream instead)
KV_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU",
                 "SlicedAttnProcessor")


def kv_attention(site: Site) -> bool:
    """Whether a self-attention site can take keys and values apart from its queries, as
    `encoder_hidden_states` (an image-token site without rotary embeddings, with such a processor)."""
    m = site.module
    return (site.layout == "image" and site.rope is None
            and type(getattr(m, "processor", None)).__name__ in KV_PROCESSORS
            and getattr(m, "norm_cross", None) is None and not getattr(m, "is_cross_attention", False))


def cfg_rows(x: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Rows to select tokens from: the conditional half of a batched-CFG call (so both halves share
    one selection), otherwise every row."""
    if not ctx.cfg_batched:
        return x
    half = x.shape[0] // 2
    return x[half:] if ctx.cond_half == "second" else x[:half]


def block_generator(seed: int, step: int, site: Site) -> torch.Generator:
    """A generator fixed by (seed, step, block): the same draws whatever the batch, call order or
    earlier interruptions, and shared by the sub-layers of one block."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step * 7_919 + site.depth) % (2**63))


METRICS = ("block", "hidden")


class CellReductionConfig(MethodConfig):
    """Shared by the methods that reduce a site's image tokens with one kept token per sx x sy (x st
    frames) cell (ToMe merges the others, SiTo prunes them). Subclasses declare the fields ratio, sx,
    sy, st, seed, max_downsample, metric, cost_model and the three sub-layer switches named in
    `kind_flags`, and provide `build_reduction`.

    On joint sequences only the image span is reduced (text tokens pass unchanged); rotary tables and
    key masks are gathered for the kept tokens (a merged destination keeps its own position), and an
    (image, text) output pair has its image part restored."""

    priority = 10
    reduces_tokens = True
    params = ("ratio",)
    mode: ClassVar[str] = "mean"  # TokenReduction.reduce mode
    kind_flags: ClassVar[tuple[str, str, str]] = ()  # switches for self_attn, cross_attn, ff

    def validate(self) -> None:
        n = type(self).__name__
        check_number(n, "sx", self.sx, 1, 64, integer=True)
        check_number(n, "sy", self.sy, 1, 64, integer=True)
        check_number(n, "st", self.st, 0, 64, integer=True)
        if self.cost_model is not None:
            check_bool(n, "cost_model", self.cost_model)
        check_number(n, "ratio", self.ratio, 0.0, 1.0 - 1.0 / (self.sx * self.sy))
        check_number(n, "seed", self.seed, 0, 2**62, integer=True)
        check_downsample(n, "max_downsample", self.max_downsample)
        check_choice(n, "metric", self.metric, METRICS)
        for flag in self.kind_flags:
            check_bool(n, flag, getattr(self, flag))

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
                        generator: torch.Generator) -> TokenReduction:
        raise NotImplementedError  # pragma: no cover - abstract

    def reduction_for(self, site: Site, ctx: Any, x: torch.Tensor, grid: tuple[int, int, int], st: int, r: int,
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
        reduction = self.build_reduction(metric, grid, st, r, block_generator(self.seed, ctx.step, site))
        reduction = reduction.expand(x.shape[0])
        if shared:
            ctx.shared[key] = reduction
        return reduction

    def act(self, site: Site, ctx: Any, params: dict, call: SiteCall) -> bool:
        x = call.hidden
        span = image_span(site, ctx, x.shape[1])
        if span is None:
            ctx.notes[site.name] = NO_GRID
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

    restore.reduction = reduction
    return restore
