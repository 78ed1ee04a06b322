"""ToCa (Zou et al., 2024): token-wise feature caching.

Every `interval` steps each selected sub-layer runs in full and its output is stored. On the steps
between, only a fresh fraction of its tokens is recomputed and written into the stored output; the
other tokens keep their cached output. The compute is token-partial for real: feed-forward and
cross-attention run on the fresh tokens only. Self-attention is reused whole by default, as the
paper's code does (its kind weight is 0); given a weight above 0 it runs the queries of the fresh
tokens against keys and values of all tokens on image-token layouts, and still reuses its whole
cached output where it mixes text and image tokens or takes rotary embeddings.

How many tokens are fresh follows the reference's formula: the product of the policy's
`fresh_ratio` R, a step factor, a depth factor, a sub-layer-kind weight and a stream weight, clamped
to [0, 1] once, times the site's token count, rounded down:

    step factor    1 + step_weight - 2 step_weight p          (p: fraction of the run done)
    depth factor   1 + depth_weight - 2 depth_weight d / D    (d: block index, D: last block index,
                                                               over the model or within its stream)
    kind weight    kind_weights[kind]  (PixArt-alpha's: self-attention 0, i.e. reused whole,
                                        cross-attention 0.6, feed-forward 1.6)
    stream weight  stream_weights[stream]  (flux-ToCa: double-stream blocks 0.4, single-stream 1.6)

Which tokens are fresh: the highest of
    primary score (L2-normalised over the tokens, as the reference)
    + staleness_weight x (cached steps since the token was last computed) / interval
    + cell_weight x the cell's best score, for the best token of each `cell` x `cell` (x
      `cell_frames` for video) cell of the grid, so that fresh tokens cover the image.
Primary scores ("score"):
    "change"     how far the token's input moved since its output was computed (relative L2); no
                 attention map
    "vnorm"      DuCa's value-norm score, sum over heads of (1 - |v_h|): small value norms first, from
                 the block's self-attention at the last full step; no attention map
    "random"     seeded uniform draws, fixed by (seed, step, block)
    "attention"  attention each token received in its block's self-attention at the last full step
                 (ToCa's DiT and Flux setting: softmax column sums, computed in query tiles at those
                 sites only, after the processor's norms and rotary embedding)
    "entropy"    entropy of each image token's attention over the text in its block's
                 cross-attention (ToCa's PixArt setting): the text keys are few, so the map is cheap;
                 rows are updated when cross-attention recomputes fresh tokens
The attention-based scores are read from the queries, keys and values that reach
scaled_dot_product_attention; where a block has no such source the score falls back to "random" and
describe() says so. With batched CFG both halves use one selection, from their averaged statistics;
separate cond/uncond calls keep separate caches and selections. The feed-forward sub-layers of one
block that see the same tokens (Flux's single-stream proj_mlp and proj_out) refresh one shared token
set. Caches are released when the run ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..call import CacheEntry, Context, Plan, SiteCall
from ..kernels import gather_tokens, scatter_tokens
from ..parallel import gather_along, rank_in, ring, unequal_slices
from ..policy import Policy, Rule, Selector, progress_of
from ..sites import Site
from ..tokens import AttentionProbe, expand_rows, slice_order
from .base import CachingMethod, check_choice, check_number, option, register
from .common import SUBLAYERS, BlockRandom, cfg_rows, image_span, kv_attention, warmup_window

SCORES = ("change", "vnorm", "random", "attention", "entropy")
KIND_WEIGHTS = {"self_attn": 0.0, "cross_attn": 0.6, "ff": 1.6}  # PixArt-alpha-ToCa's module factors
CHANGE_CHUNK_BYTES = 8 << 20  # largest temporary of the "change" score on the CPU
# the statistic each attention-based score reads, and the sub-layer kind it is read at
PROBES = {"attention": ("received", "self_attn"), "vnorm": ("vnorm", "self_attn"), "entropy": ("entropy", "cross_attn")}

# The references' own settings (ToCa's and DuCa's code), by model: see `TokenwiseCache.paper`
PAPERS = {
    "toca": {
        # PixArt-alpha-ToCa: 20 DPM-Solver steps; full steps where the step is a multiple of an
        # interval round(3 / (0.8 + 0.4 p)) set at each full step; cross-attention entropy
        "pixart-alpha": dict(interval=3, fresh_ratio=0.3, score="entropy", staleness_weight=0.25, cell=4,
                             cell_weight=0.4, step_weight=0.9, depth_weight=0.6,
                             kind_weights={"self_attn": 0.0, "cross_attn": 0.6, "ff": 1.6},
                             interval_weight=0.2, aligned=True),
        # flux-ToCa: first 3 steps full, then a full step every 4; attention reused whole; no cell
        # bonus; depth counted per stream over 27 (its constant); double- / single-stream x0.4 / x1.6
        "flux": dict(interval=4, fresh_ratio=0.1, warmup=3, score="attention", staleness_weight=0.25, cell=0,
                     step_weight=0.0, depth_weight=0.5, depth_per_stream=True, depth_span=27,
                     kind_weights={"self_attn": 0.0, "cross_attn": 0.0, "ff": 1.0},
                     stream_weights={"transformer_blocks": 0.4, "single_transformer_blocks": 1.6}),
    },
    "duca": {
        # DuCa-PixArt: constant interval 3 (full, conservative, aggressive), R=0.75, cross-attention
        # entropy (its README's --cache-type attention), PixArt-alpha-ToCa's ratio schedule
        "pixart-alpha": dict(interval=3, fresh_ratio=0.75, score="entropy", staleness_weight=0.25, cell=4,
                             cell_weight=0.4, step_weight=0.9, depth_weight=0.6,
                             kind_weights={"self_attn": 0.0, "cross_attn": 0.6, "ff": 1.6}, aligned=True),
    },
}


class TokenwiseCache(CachingMethod):
    """What ToCa and DuCa share: the cycle, the fresh-token count and choice, the token-partial call.
    Subclasses declare the fields (see ToCaConfig) and `cached_plan`."""

    reduces_tokens = True  # fresh-token steps reduce queries: no ToMe/SiTo on the same site
    priority = 20
    params = ("interval", "fresh_ratio")
    zero = {"fresh_ratio": 1.0}

    def context_parallel_refusal(self, cp: Any = None) -> str | None:
        # Under Ulysses every process scores the whole sequence (the slices' scores gathered, the attention
        # statistics summed over the head groups) and takes the same fresh tokens one process would take
        # (see `_refresh_slice`).
        if cp is not None and ring(cp):
            return ("its fresh tokens under ring attention are not done (the attention statistics it scores with "
                    "see one slice of the keys at a time; ring attention does not run here on the CPU to test it)")
        if cp is not None and (why := unequal_slices(cp)):
            return why
        if self.score == "entropy":
            return ("its 'entropy' score is not done under context parallelism (the other scores are: 'change', "
                    "'vnorm', 'random', 'attention')")
        if self.forecast != "reuse":
            return "its token-wise forecasting is not done under context parallelism (forecast='reuse' is)"
        return None

    # -- configuration ----------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        n = type(self).__name__
        for what, weights, keys in (("kind_weights", self.kind_weights, SUBLAYERS), ("stream_weights", self.stream_weights, None)):
            if not isinstance(weights, dict):
                raise TypeError(f"{n}.{what} must be a dict, got {weights!r}")
            for key, w in weights.items():
                if keys is not None:
                    check_choice(n, f"{what} key", key, keys)
                elif not isinstance(key, str):
                    raise TypeError(f"{n}.{what} keys are block-list names such as 'transformer_blocks', got {key!r}")
                check_number(n, f"{what}[{key!r}]", w, 0.0, 100.0)

    def check_param(self, key: str, value: float) -> None:
        if key == "interval":
            super().check_param(key, value)
        else:
            check_number(type(self).__name__, key, value, 0.0, 1.0)

    def default_policy(self) -> Policy:
        return Policy((Rule(Selector(kind=SUBLAYERS), {"interval": self.interval, "fresh_ratio": self.fresh_ratio,
                                                       **self.forecast_params()}, warmup_window(self.warmup)),))

    @classmethod
    def paper(cls, model: str, **fields: Any):
        """The reference code's own setting for `model` (see PAPERS: ToCa "pixart-alpha", "flux"; DuCa
        "pixart-alpha"); any field given overrides it."""
        presets = PAPERS[cls.name]
        if model not in presets:
            raise ValueError(f"no paper setting of {cls.name} for {model!r}; available: {sorted(presets)}")
        return cls(**{**presets[model], **fields})

    def is_identity(self, params: dict) -> bool:
        return round(params["interval"]) <= 1 or params["fresh_ratio"] >= 1

    # -- the cycle --------------------------------------------------------------------------
    def cycle_end(self, ctx: Context, params: dict) -> int:
        """The next full step after one at ctx.step: `interval` steps later, or (aligned) the next
        multiple of the interval, the interval being set at this step, divided by the reference's
        interval step factor 1 - w + 2 w p (w = interval_weight) and rounded half to even in float32,
        as the reference computes it."""
        interval = params["interval"]
        if self.interval_weight:
            w = self.interval_weight
            factor = np.float32(1 - w + 2 * w * progress_of(ctx.step, ctx.num_steps))
            interval = np.round(np.float32(interval) / factor)
        interval = max(1, int(round(float(interval))))
        return (ctx.step // interval + 1) * interval if self.aligned else ctx.step + interval

    def cycle_offset(self, ctx: Context, params: dict, entry: CacheEntry) -> int | None:
        """Steps since the entry's cycle began (0: another call of that step), or None when this call
        starts a new cycle."""
        offset = ctx.step - entry.step
        decision = self.step_decision(ctx)
        if decision is not None:  # adaptive steps (see methods.forecast)
            return offset if offset == 0 or (offset > 0 and not decision) else None
        return offset if offset >= 0 and (entry.until is None or ctx.step < entry.until) else None

    def plan(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall) -> Plan:
        offset = self.cycle_offset(ctx, params, entry)
        if offset is None:
            return Plan.COMPUTE
        if offset == 0:  # another call of the same step and branch (e.g. a second expert): same output
            return Plan.REUSE
        return self.cached_plan(site, ctx, params, entry, call, offset)

    def cached_plan(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall,
                    offset: int) -> Plan:  # pragma: no cover - abstract
        """The plan of a call `offset` steps into the entry's cycle (offset >= 1)."""
        raise NotImplementedError

    def fresh_fraction(self, site: Site, ctx: Context, params: dict) -> float:
        """The reference's fresh ratio: R x step x depth x kind x stream factors, clamped to [0, 1] once."""
        p = progress_of(ctx.step, ctx.num_steps)
        ratio = params["fresh_ratio"] * (1 + self.step_weight - 2 * self.step_weight * p) * self.depth_factor(site)
        ratio *= self.kind_weights.get(site.kind, 1.0) * self.stream_weights.get(site.stream, 1.0)
        return min(1.0, max(0.0, ratio))

    def planned(self, site: Site, step: int, num_steps: int, params: dict | None) -> dict | None:
        """The policy's parameters and the fraction of tokens a cached step at `step` refreshes."""
        if params is None:
            return None
        ctx = SimpleNamespace(step=step, num_steps=num_steps)
        return {**params, "fresh": round(self.fresh_fraction(site, ctx, params), 3)}

    def depth_factor(self, site: Site) -> float:
        d, last = (site.stream_depth, site.stream_blocks - 1) if self.depth_per_stream else (site.depth, site.blocks - 1)
        span = self.depth_span or last
        if not self.depth_weight or span <= 0:
            return 1.0
        return 1 + self.depth_weight - 2 * self.depth_weight * d / span

    def fresh_count(self, site: Site, ctx: Context, params: dict, n: int) -> int:
        """int(ratio x n) in float32, as the reference counts its top-k."""
        return min(n, int(np.float32(self.fresh_fraction(site, ctx, params)) * np.float32(n)))

    def token_plan(self, site: Site, ctx: Context, params: dict, call: SiteCall | None,
                   n: int | None = None) -> Plan:
        """A ToCa step at this site: all tokens fresh (RECOMPUTE, the cycle keeps its start), none
        (REUSE), or some (PARTIAL). Without a call (a compiled denoiser's plan, made before it), `n`
        tokens and the arguments checked by `traced_plan`."""
        n = (call.hidden.shape[1] if call is not None else n) * getattr(ctx, "world", 1)  # the whole sequence's
        k = self.fresh_count(site, ctx, params, n)
        if k >= n:
            return Plan.RECOMPUTE
        if k == 0 or (call is not None and not _partial_ok(site, call)):
            return Plan.REUSE
        return Plan.PARTIAL

    def traced_plan(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall,
                    plan: Plan) -> Plan:
        return Plan.REUSE if plan == Plan.PARTIAL and not _partial_ok(site, call) else plan

    def compiled_params(self, site: Site, ctx: Context, params: dict, entry: CacheEntry | None,
                        plan: Plan) -> dict:
        """A partial step's fresh-token count as the length of a tensor marked dynamic: the compiled
        graph takes it as a symbol, so steps with other counts run the same graph."""
        if plan != Plan.PARTIAL:
            return params
        size = torch.empty(self.fresh_count(site, ctx, params, entry.signature[2][1]), dtype=torch.uint8)
        torch._dynamo.maybe_mark_dynamic(size, 0)
        return {**params, "fresh_size": size}

    # -- entries ----------------------------------------------------------------------------
    def prepare_compute(self, site: Site, ctx: Context, params: dict, call: SiteCall) -> None:
        self._probe(site, ctx, call)

    def init_entry(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, hidden: torch.Tensor) -> None:
        rows = cfg_rows(hidden, ctx)
        # (context parallelism: of the whole sequence, which every process scores and refreshes alike)
        total = rows.shape[1] * getattr(ctx, "world", 1)
        entry.extra["staleness"] = torch.zeros(rows.shape[0], total, dtype=torch.int32, device=hidden.device)
        if self.score == "change":
            entry.extra["input"] = rows.detach().clone()

    def _probe(self, site: Site, ctx: Context, call: SiteCall, idx: torch.Tensor | None = None) -> None:
        """Read the block's attention statistic while this call runs (its self-attention at a full step,
        its cross-attention at every step that computes tokens: rows `idx` of the stored statistic)."""
        stat, kind = PROBES.get(self.score, (None, None))
        if site.kind != kind or (idx is not None and stat != "entropy"):
            return
        probe = AttentionProbe(stat)
        call.arounds.append(probe)
        key = (self.score, ctx.state_branch, site.block)
        x = call.hidden

        def record(out):
            result = probe.result
            if result is None and stat == "vnorm" and kv_attention(site) and hasattr(site.module, "heads"):
                result = _value_norm(site.module, x)  # the processor does not call SDPA (e.g. xformers)
            if result is None:
                return out
            if getattr(ctx, "world", 1) > 1:  # Ulysses: this process saw the whole sequence for its heads
                torch.distributed.all_reduce(result, group=ctx.group)
                result = result / ctx.world if stat == "received" else result  # (a mean over the heads)
            if idx is None:
                ctx.state[key] = result
            elif key in ctx.state and ctx.state[key].shape[0] == result.shape[0]:
                ctx.state[key].scatter_(1, idx, result)
            return out

        call.restores.append(record)

    def refresh(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall) -> None:
        if getattr(ctx, "world", 1) > 1:
            return self._refresh_slice(site, ctx, params, entry, call)
        x = call.hidden
        n = x.shape[1]
        size = params.get("fresh_size")  # (a compiled denoiser's count, as a symbolic size)
        k = self.fresh_count(site, ctx, params, n) if size is None else size.shape[0]
        stale = entry.extra["staleness"]
        # the feed-forward sub-layers of one block that see the same tokens share one fresh set
        shared = ("fresh", site.block, site.layout, n, k if size is None else "k") if site.kind == "ff" else None
        rows = cfg_rows(x, ctx)
        picked = self._pick(site, ctx, entry, rows, k, shared)
        if "input" in entry.extra:
            scatter_tokens(entry.extra["input"], picked, gather_tokens(rows, picked))
        stale.add_(1).scatter_(1, picked, 0)
        idx = expand_rows(picked, x.shape[0])
        if site.kind == "self_attn" and call.kwargs.get(site.kv_arg) is None:
            call.kwargs[site.kv_arg] = x  # keys and values of every token
            call.keys_values = call.keys_values or n
        call.hidden = gather_tokens(x, idx)
        call.reduced = True
        if not self.forecasting():
            cached = entry.output  # the fresh tokens' outputs are written into the cache
            call.restores.append(lambda out: scatter_tokens(cached, idx, out.to(cached.dtype)))
        else:
            call.restores.append(self._forecast_restore(ctx, params, entry, idx))
        self._probe(site, ctx, call, idx)

    def _pick(self, site: Site, ctx: Context, entry: CacheEntry, rows: torch.Tensor, k: int, shared: tuple | None,
              sliced: bool = False) -> torch.Tensor:
        """The `k` fresh tokens (B', k), in order: the highest score + staleness bonus + cell bonus, or
        the set a feed-forward sub-layer of the block that sees the same tokens picked (`shared`).
        sliced: of the whole sequence under context parallelism (`_refresh_slice`)."""
        picked = ctx.shared.get(shared) if shared else None
        if picked is not None:
            return picked
        score = self.slice_score(site, ctx, entry, rows) if sliced else self.primary_score(site, ctx, entry, rows)
        if self.staleness_weight:
            score = score + (self.staleness_weight / self.interval) * entry.extra["staleness"]
        if self.cell and self.cell_weight:
            score = score + (self.slice_cell_bonus if sliced else self.cell_bonus)(site, ctx, score)
        picked = torch.topk(score, k, dim=1, sorted=False).indices.sort(dim=1).values
        if shared:
            ctx.shared[shared] = picked
        return picked

    def _refresh_slice(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall) -> None:
        """`refresh` under context parallelism (Ulysses), where this call holds slice `rank` of `world`
        equal slices of the sequence: every process scores the whole sequence (in the slices' order: the
        slices one after another) and picks the same fresh tokens one process would; each computes those
        in its own slice, padded with tokens it does not pick to the most any process picks (Ulysses
        exchanges equal numbers of queries), whose outputs are discarded."""
        x = call.hidden
        n, world = x.shape[1], ctx.world
        total = n * world
        k = self.fresh_count(site, ctx, params, total)
        stale = entry.extra["staleness"]
        shared = ("fresh", site.block, site.layout, n, k) if site.kind == "ff" else None
        rows = cfg_rows(x, ctx)
        picked = self._pick(site, ctx, entry, rows, k, shared, sliced=True)  # (B', k), whole sequence
        stale.add_(1).scatter_(1, picked, 0)
        rank = rank_in(ctx.group)
        ranks = torch.div(picked, n, rounding_mode="floor")  # (B', k): the process each pick is in
        most = int(torch.nn.functional.one_hot(ranks, world).sum(dim=1).max())  # over rows and processes
        here = torch.zeros(rows.shape[0], n + 1, dtype=torch.bool, device=x.device)
        here.scatter_(1, torch.where(ranks == rank, picked - rank * n, n), True)
        here = here[:, :n]
        # this slice's picks first (in order), then the tokens it does not pick (padding)
        positions = torch.arange(n, device=x.device)
        local = torch.where(here, positions, positions + n).argsort(dim=1)[:, :most]
        valid = torch.arange(most, device=x.device) < here.sum(dim=1, keepdim=True)  # (B', most)
        if "input" in entry.extra:
            old = gather_tokens(entry.extra["input"], local)
            scatter_tokens(entry.extra["input"], local, torch.where(valid[..., None], gather_tokens(rows, local), old))
        idx = expand_rows(local, x.shape[0])
        keep = expand_rows(valid, x.shape[0])[..., None]
        if site.kind == "self_attn" and call.kwargs.get(site.kv_arg) is None:
            call.kwargs[site.kv_arg] = x  # keys and values of every token
            call.keys_values = call.keys_values or n
        call.hidden = gather_tokens(x, idx)
        call.reduced = True
        cached = entry.output

        def restore(out):
            return scatter_tokens(cached, idx, torch.where(keep, out.to(cached.dtype), gather_tokens(cached, idx)))

        call.restores.append(restore)
        self._probe(site, ctx, call, idx)

    def slice_score(self, site: Site, ctx: Context, entry: CacheEntry, rows: torch.Tensor) -> torch.Tensor:
        """`primary_score` of the whole sequence under context parallelism: (B', n x world), the slices'
        scores one after another."""
        total = rows.shape[1] * ctx.world
        if self.score == "change":
            local = _relative_change(rows, entry.extra["input"])
            return F.normalize(gather_along(ctx.group, local, 1), dim=1)
        if self.score in PROBES:
            stat = self.block_statistic(site, ctx, total, slices=ctx.world)
            if stat is not None:
                return F.normalize(stat, dim=1)
            ctx.notes[site.name] = (f"the {self.score!r} score has no source in this block (its "
                                    f"{PROBES[self.score][1]} does not call scaled_dot_product_attention, or "
                                    f"there is none): random tokens")
        draws = BlockRandom(self.seed, ctx, site).rand((rows.shape[0], total)).to(rows.device)  # the sequence's order
        order = self._slice_order(site, ctx, total, draws.device)
        if order is None:
            return draws
        out = torch.empty_like(draws)
        out[:, order] = draws
        return out

    @staticmethod
    def _slice_order(site: Site, ctx: Context, total: int, device: torch.device) -> torch.Tensor | None:
        """`slice_order` of this site's sequence of `total` tokens (None: the slices' order is its own)."""
        span = image_span(site, ctx, total)
        return None if span is None else slice_order(span, ctx.world, total, device)

    def slice_cell_bonus(self, site: Site, ctx: Context, score: torch.Tensor) -> torch.Tensor:
        """`cell_bonus` of a score in the slices' order: taken in the sequence's own order and put back."""
        order = self._slice_order(site, ctx, score.shape[1], score.device)
        if order is None:
            return self.cell_bonus(site, ctx, score)  # image tokens only: the slices' order is the image's
        bonus = torch.empty_like(score)
        bonus[:, order] = self.cell_bonus(site, ctx, score[:, order])
        return bonus

    def _forecast_restore(self, ctx: Context, params: dict, entry: CacheEntry, idx: torch.Tensor):
        """Token-wise forecasting: the step's output is the entry's forecast at this step with the fresh
        tokens' computed outputs in place; each fresh token keeps the gap between its output and the
        forecast (`offset`), so later cached steps forecast it from its newer value. The entry's stored
        differences stay those of the full steps."""
        forecast = self.forecast_at(ctx, params, entry)
        offset = entry.extra.get("offset")
        served = forecast + offset if offset is not None else forecast.clone()

        def restore(out):
            out = out.to(served.dtype)
            nonlocal offset
            if offset is None:
                offset = entry.extra["offset"] = torch.zeros_like(served)
            scatter_tokens(offset, idx, out - gather_tokens(forecast, idx))
            return scatter_tokens(served, idx, out)

        return restore

    # -- scores -----------------------------------------------------------------------------
    def primary_score(self, site: Site, ctx: Context, entry: CacheEntry, rows: torch.Tensor) -> torch.Tensor:
        """(B', N) float32: higher is fresher."""
        if self.score == "change":
            return F.normalize(_relative_change(rows, entry.extra["input"]), dim=1)
        if self.score in PROBES:
            stat = self.block_statistic(site, ctx, rows.shape[1])
            if stat is not None:
                return F.normalize(1 + stat if self.score == "entropy" else stat, dim=1)
            ctx.notes[site.name] = (f"the {self.score!r} score has no source in this block (its "
                                    f"{PROBES[self.score][1]} does not call scaled_dot_product_attention, or "
                                    f"there is none): random tokens")
        return BlockRandom(self.seed, ctx, site).rand(rows.shape[:2]).to(rows.device)

    def block_statistic(self, site: Site, ctx: Context, n: int, slices: int = 1) -> torch.Tensor | None:
        """The block's stored attention statistic for this site's `n` tokens: batched CFG halves
        averaged (for the entropy, that of the two halves' maps side by side, as the reference mixes
        them: ln 2 + the mean), the image or text part of a joint sequence taken where the site sees
        only that part (of each of `slices` slices laid one after another: context parallelism). None
        when there is none."""
        stat = ctx.state.get((self.score, ctx.state_branch, site.block))
        if stat is None:
            return None
        if ctx.cfg_batched and stat.shape[0] % 2 == 0:
            half = stat.shape[0] // 2
            stat = 0.5 * (stat[:half] + stat[half:]) + (math.log(2) if self.score == "entropy" else 0)
        length = stat.shape[1]
        if length == n:
            return stat
        geo = ctx.geometry
        text = geo.text_tokens if geo is not None else 0
        if not text or (n != text if site.layout == "text" else length != n + text):
            return None
        if slices > 1:  # each slice is [text, image] (or [image, text]) of its own
            part = stat.reshape(stat.shape[0], slices, length // slices)
            t = text // slices
            own = (part[..., :t] if geo.text_first else part[..., -t:]) if site.layout == "text" else (
                part[..., t:] if geo.text_first else part[..., :-t])
            return own.reshape(stat.shape[0], -1)
        if site.layout == "text":  # a context feed-forward: the text part of the joint statistic
            return stat[:, :text] if geo.text_first else stat[:, -text:]
        return stat[:, text:] if geo.text_first else stat[:, :n]

    def cell_bonus(self, site: Site, ctx: Context, score: torch.Tensor) -> torch.Tensor:
        """cell_weight x the cell's best score for the best token of each cell of the image-token grid
        (the reference's local_selection_with_bonus; the bonus is the best score's magnitude, so that it
        promotes the token where scores are negative too), 0 elsewhere."""
        span = image_span(site, ctx, score.shape[1])
        bonus = torch.zeros_like(score)
        if span is None:
            return bonus
        start, (f, h, w) = span.start(score.shape[1]), span.grid
        kt, kh, kw = min(self.cell_frames, f), min(self.cell, h), min(self.cell, w)
        img = score[:, start:start + f * h * w].reshape(-1, f, h, w)
        pad = (0, -w % kw, 0, -h % kh, 0, -f % kt)  # whole cells, the padding never the best
        grid = F.pad(img, pad, value=float("-inf"))
        b, gf, gh, gw = grid.shape
        cells = grid.reshape(b, gf // kt, kt, gh // kh, kh, gw // kw, kw).permute(0, 1, 3, 5, 2, 4, 6)
        cells = cells.reshape(b, gf // kt, gh // kh, gw // kw, kt * kh * kw)
        best, where = cells.max(dim=-1, keepdim=True)
        add = torch.zeros_like(cells).scatter_(-1, where, self.cell_weight * best.abs())
        add = add.reshape(b, gf // kt, gh // kh, gw // kw, kt, kh, kw).permute(0, 1, 4, 2, 5, 3, 6)
        add = add.reshape(b, gf, gh, gw)[:, :f, :h, :w]
        bonus[:, start:start + f * h * w] = add.reshape(b, -1)
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
    """DuCa's statistic from the value projection itself: sum over heads of (1 - |v_h|), (B, N)."""
    v = module.to_v(x).float()
    return (1 - v.view(*v.shape[:2], module.heads, -1).norm(dim=-1)).sum(dim=-1)


@register
@dataclass(frozen=True)
class ToCaConfig(TokenwiseCache):
    """Token-wise caching: every `interval` steps a full step, in between only the fresh tokens (the
    highest-scoring fraction) are recomputed and the rest reused.
    `ToCaConfig.paper("pixart-alpha")` and `.paper("flux")` are the reference code's own settings."""

    fresh_ratio: float = option(0.3, low=0.0, high=1.0,
                                doc="Base fraction R of tokens recomputed on the steps between full ones (1: all, "
                                    "the baseline); the fraction at a site is R x the step, depth, kind and stream "
                                    "factors, clamped to [0, 1].")
    score: str = option("change", choices=SCORES, doc='Primary fresh-token score: "change", "vnorm", "random", '
                        '"attention" (attention received) or "entropy" (cross-attention entropy).')
    staleness_weight: float = option(0.25, low=0.0, high=100.0,
                                     doc="Bonus per cached step a token has waited, over the interval.")
    cell: int = option(4, low=0, high=64, integer=True,
                       doc="Side of the uniformity bonus's cell in tokens (0 turns the bonus off).")
    cell_frames: int = option(2, low=1, high=64, integer=True, doc="Frames the uniformity bonus's cell spans.")
    cell_weight: float = option(0.4, low=0.0, high=100.0, doc="Weight of the uniformity bonus.")
    step_weight: float = option(0.9, low=-10.0, high=10.0,
                                doc="The step factor: fresh tokens change by this much over the run.")
    depth_weight: float = option(0.6, low=-10.0, high=10.0,
                                 doc="The depth factor: fresh tokens change by this much from the first block to "
                                     "the last.")
    depth_per_stream: bool = option(False, doc="Count depth within each block list (Flux's double- and "
                                    "single-stream blocks) instead of over the model.")
    depth_span: int = option(0, low=0, high=100_000, integer=True,
                             doc="The block index the depth factor reaches its end at (0: the last block).")
    kind_weights: dict = option(doc="Factor per sub-layer kind (self_attn, cross_attn, ff).",
                                default_factory=lambda: dict(KIND_WEIGHTS))
    stream_weights: dict = option(doc='Factor per block list (e.g. {"single_transformer_blocks": 1.6}).',
                                  default_factory=dict)
    interval_weight: float = option(0.0, low=-0.99, high=0.99,
                                    doc="The reference's interval step factor w: an interval N set at progress p "
                                        "is round(N / (1 - w + 2 w p)) (0: N).")
    aligned: bool = option(False, doc="Full steps fall on multiples of the interval (ToCa's PixArt and DiT code) "
                           "rather than `interval` steps after the last one (flux-ToCa).")
    seed: int = option(0, low=0, high=2**62, integer=True, doc='Seed of the "random" score.')

    name = "toca"

    def cached_plan(self, site: Site, ctx: Context, params: dict, entry: CacheEntry, call: SiteCall,
                    offset: int) -> Plan:
        return self.token_plan(site, ctx, params, call, entry.signature[2][1])
