"""Token ops shared by every method: cell partitions, tiled bipartite matching, merge/unmerge,
prune/restore and key/value pooling. Pure functions on (B, N, C) tensors; no host syncs.

A reduction returns its own inverse (`TokenReduction.reduce` / `.restore`), so a method is always
"reduce, run the sub-layer on fewer tokens, restore".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffaccel import kernels
from diffaccel.kernels import gather_tokens

# Elements of one similarity tile (rows x destinations) per batch row; bounds the matching's memory.
MATCH_TILE = 1 << 22


def cell_partition(h: int, w: int, sx: int, sy: int, choice: torch.Tensor, frames: int = 1,
                   st: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a frames x h x w row-major grid into one destination per full st x sy x sx cell and sources.

    choice: (B', h // sy, w // sx) ints in [0, sx * sy), or (B', frames // st, h // sy, w // sx) ints
    in [0, st * sy * sx): the destination's offset inside its cell (row-major over (frame, row,
    column): offset k is frame k // (sy * sx), row (k // sx) % sy, column k % sx). Tokens outside full
    cells are sources. Returns (dst_idx (B', Nd), src_idx (B', N - Nd)), each in ascending token order.
    """
    hsy, wsx, fst = h // sy, w // sx, frames // st
    device = choice.device
    choice = choice.view(choice.shape[0], fst, hsy, wsx)
    plane = sy * sx
    t = torch.arange(fst, device=device).view(1, fst, 1, 1) * st + torch.div(choice, plane, rounding_mode="floor")
    rows = torch.arange(hsy, device=device).view(1, 1, hsy, 1) * sy + torch.div(choice % plane, sx,
                                                                                 rounding_mode="floor")
    cols = torch.arange(wsx, device=device).view(1, 1, 1, wsx) * sx + choice % sx
    dst_idx = ((t * h + rows) * w + cols).flatten(1)
    n = frames * h * w
    is_dst = torch.zeros(dst_idx.shape[0], n, dtype=torch.int8, device=device)
    is_dst.scatter_(1, dst_idx, 1)
    src_idx = torch.argsort(is_dst, dim=1, stable=True)[:, : n - dst_idx.shape[1]]
    return dst_idx, src_idx


def best_match(a: torch.Tensor, b: torch.Tensor, tile: int = MATCH_TILE,
               normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a (B, Na, C), the highest dot product with a row of b (B, Nb, C) and its index
    (of the L2-normalised rows with `normalize`).

    The op `diffaccel::best_match`: a tiled Triton kernel on CUDA; the torch reference elsewhere, which
    computes in tiles of rows so no Na x Nb matrix is held when it would exceed `tile` elements.
    """
    return kernels.best_match(a, b, normalize, tile)


def expand_rows(idx: torch.Tensor, batch: int) -> torch.Tensor:
    """Index rows computed for a batch subset (1 row, or the conditional half) -> all rows."""
    if idx.shape[0] == batch:
        return idx
    if batch % idx.shape[0]:
        raise ValueError(f"cannot spread {idx.shape[0]} index rows over batch {batch}")
    return idx.repeat(batch // idx.shape[0], 1)


class TokenReduction:
    """Sources either kept, or folded into a destination (mean merge) or dropped (prune).

    reduce(x) -> [kept sources, destinations]; restore(y) puts each token back at its place and gives
    each folded source the output of the reduced token it is restored from (its destination, unless
    `source` names another).
    """

    def __init__(self, n: int, dst_idx: torch.Tensor, keep_idx: torch.Tensor, fold_idx: torch.Tensor,
                 fold_target: torch.Tensor, source: torch.Tensor | None = None):
        self.n = n
        self.dst_idx = dst_idx  # (B', Nd) token positions of destinations
        self.keep_idx = keep_idx  # (B', Nk) token positions of sources kept as they are
        self.fold_idx = fold_idx  # (B', r) token positions of folded sources
        self.fold_target = fold_target  # (B', r) index into the destinations (where a merge averages them)
        # (B', r) index into the reduced sequence [kept sources, destinations]: what each folded source
        # is restored from
        self.source = fold_target + keep_idx.shape[1] if source is None else source

    @property
    def kept(self) -> int:
        return self.keep_idx.shape[1] + self.dst_idx.shape[1]

    def expand(self, batch: int) -> TokenReduction:
        return TokenReduction(self.n, *(expand_rows(t, batch) for t in
                                        (self.dst_idx, self.keep_idx, self.fold_idx, self.fold_target, self.source)))

    def reduce(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """mode "mean": folded sources are averaged into their destination; "drop": they are dropped.
        (The op `diffaccel::merge`: one fused pass on CUDA.)"""
        if mode not in ("mean", "drop"):
            raise ValueError(f"reduce mode must be 'mean' or 'drop', got {mode!r}")
        return kernels.merge(x, self.keep_idx, self.dst_idx, self.fold_idx, self.fold_target, mode)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """(The op `diffaccel::unmerge`: one gather pass from the inverse map on CUDA.)"""
        return kernels.unmerge(y, self.keep_idx, self.dst_idx, self.fold_idx, self.source, self.n)


def _fold_most_similar(metric: torch.Tensor, dst_idx: torch.Tensor, src_idx: torch.Tensor, r: int, n: int,
                       normalized: bool = False) -> TokenReduction:
    """Fold the r sources whose best cosine match among the destinations is highest."""
    b = metric.shape[0]
    dst_idx, src_idx = expand_rows(dst_idx, b), expand_rows(src_idx, b)
    if not normalized:
        metric = F.normalize(metric, dim=-1)
    score, target = best_match(gather_tokens(metric, src_idx), gather_tokens(metric, dst_idx))
    order = score.argsort(dim=-1, descending=True)
    folded, kept = order[:, :r], order[:, r:]
    return TokenReduction(n, dst_idx, src_idx.gather(1, kept), src_idx.gather(1, folded), target.gather(1, folded))


def random_destinations(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None,
                        device: torch.device, frames: int = 1, st: int = 1) -> torch.Tensor:
    """ToMeSD's destination choice: one random offset per cell (drawn on the generator's device).
    Over several frames, cells span st frames as well (the 2-D draw is unchanged for one frame)."""
    shape = (h // sy, w // sx) if frames == 1 and st == 1 else (frames // st, h // sy, w // sx)
    if generator is None:
        return torch.zeros((1, *shape), dtype=torch.int64, device=device)
    gen_device = generator.device
    choice = torch.randint(sx * sy * st, size=(*shape, 1), generator=generator, device=gen_device)
    return choice.view(1, *shape).to(device)


def bipartite_soft_matching_2d(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                               choice: torch.Tensor, frames: int = 1, st: int = 1) -> TokenReduction:
    """ToMeSD: one destination per sy x sx (x st frames) cell (given by `choice`), the r sources most
    similar (cosine) to some destination are merged into it. r is capped at the number of sources."""
    dst_idx, src_idx = cell_partition(h, w, sx, sy, choice, frames, st)
    r = min(r, src_idx.shape[1])
    return _fold_most_similar(metric, dst_idx, src_idx, r, frames * h * w)


def similarity_pruning_2d(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                          noise: float = 0.0, generator: torch.Generator | torch.Tensor | None = None, frames: int = 1,
                          st: int = 1) -> TokenReduction:
    """SiTo: score each token by the sum of its cosine similarities to all tokens plus `noise` times
    standard Gaussian noise, keep the highest-scoring token of each cell (sy x sx, x st frames) as a
    base, prune the r other tokens most similar to a base; each pruned token is restored from its most
    similar kept token (a base or a kept source), as SiTo's code does. The noise is one draw per token
    shared by every batch row, so an image never depends on what else is in its batch. The summed
    similarity is x_i . sum_j x_j and the matchings run in tiles, so no N x N matrix is formed."""
    unit = F.normalize(metric, dim=-1)
    score = (unit @ unit.sum(dim=1, keepdim=True).transpose(-1, -2)).squeeze(-1)
    if noise:  # `generator` may also be the (1, N) draw itself
        rand = generator if isinstance(generator, torch.Tensor) else \
            torch.randn((1, score.shape[1]), generator=generator, device=generator.device if generator else None)
        score = score + noise * rand.to(score.device, score.dtype)
    fst, hsy, wsx = frames // st, h // sy, w // sx
    cells = score.view(-1, frames, h, w)[:, : fst * st, : hsy * sy, : wsx * sx]
    cells = cells.reshape(-1, fst, st, hsy, sy, wsx, sx).permute(0, 1, 3, 5, 2, 4, 6)
    choice = cells.reshape(-1, fst, hsy, wsx, st * sy * sx).argmax(dim=-1)
    dst_idx, src_idx = cell_partition(h, w, sx, sy, choice, frames, st)
    r = min(r, src_idx.shape[1])
    pruned = _fold_most_similar(unit, dst_idx, src_idx, r, frames * h * w, normalized=True)
    if not r:
        return pruned
    kept = torch.cat([pruned.keep_idx, pruned.dst_idx], dim=1)  # the reduced sequence's order
    _, source = best_match(gather_tokens(unit, pruned.fold_idx), gather_tokens(unit, kept))
    return TokenReduction(pruned.n, pruned.dst_idx, pruned.keep_idx, pruned.fold_idx, pruned.fold_target, source)


POOL_MODES = ("nearest-exact", "nearest", "bilinear", "bicubic", "avg", "max")


def _resize(g: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
    """(N, C, *grid) -> (N, C, *size): interpolated ("nearest-exact", "nearest", "bilinear" / "linear",
    "bicubic") or pooled over adaptive windows ("avg", "max")."""
    if mode == "avg":
        return (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)[g.ndim - 3](g, size)
    if mode == "max":
        return (F.adaptive_max_pool1d, F.adaptive_max_pool2d)[g.ndim - 3](g, size)
    if mode in ("bilinear", "bicubic"):
        return F.interpolate(g, size=size, mode=mode if g.ndim == 4 else "linear", align_corners=False)
    return F.interpolate(g, size=size, mode=mode)


def pool_tokens(x: torch.Tensor, frames: int, h: int, w: int, factor: float, mode: str = "nearest-exact",
                factor_t: float = 1.0) -> torch.Tensor:
    """ToDo: downsample (B, F*h*w, C) grid tokens by `factor` in height and width (and by `factor_t`
    over frames) -> (B, F'*h'*w', C), with one of POOL_MODES. Odd sizes keep their last row, column or
    frame. Over frames the same mode runs along time after the spatial pass (both are separable:
    the same as a 3-D resize; bilinear and bicubic are linear in time)."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode must be one of {list(POOL_MODES)}, got {mode!r}")
    b, n, c = x.shape
    size = (math.ceil(h / factor), math.ceil(w / factor))
    grid = x.reshape(b * frames, h, w, c).movedim(-1, 1)  # each frame on its own
    out = _resize(grid, size, mode).movedim(1, -1)  # (B*F, h', w', C)
    if factor_t > 1 and frames > 1:
        t = math.ceil(frames / factor_t)
        seq = out.reshape(b, frames, -1, c).permute(0, 2, 3, 1).reshape(-1, c, frames)  # time last
        seq = _resize(seq, (t,), mode)
        return seq.reshape(b, -1, c, t).permute(0, 3, 1, 2).reshape(b, -1, c)
    return out.reshape(b, -1, c)


# -- image tokens inside longer sequences ----------------------------------------------------------


class ImageSpan:
    """Where the image tokens of a sequence lie: `n` tokens on the grid (frames, h, w) after `text`
    text tokens (text_first) or before them. A sequence of exactly `n` tokens is image tokens only."""

    __slots__ = ("n", "grid", "text", "text_first")

    def __init__(self, grid: tuple[int, int, int], text: int = 0, text_first: bool = False):
        self.grid, self.text, self.text_first = grid, text, text_first
        self.n = grid[0] * grid[1] * grid[2]

    def start(self, length: int) -> int | None:
        """First image position in a sequence of `length` tokens (None: the length fits neither)."""
        if length == self.n:
            return 0
        if self.text and length == self.n + self.text:
            return self.text if self.text_first else 0
        return None

    def replace(self, x: torch.Tensor, dim: int, fn) -> torch.Tensor | None:
        """x with its image span along `dim` replaced by fn(span), or None when x holds no span."""
        start = self.start(x.shape[dim])
        if start is None:
            return None
        if x.shape[dim] == self.n:
            return fn(x)
        img = x.narrow(dim, start, self.n)
        return torch.cat([x.narrow(dim, 0, start), fn(img), x.narrow(dim, start + self.n, x.shape[dim] - start - self.n)],
                         dim=dim)


def gather_positions(t: torch.Tensor, span: ImageSpan, order: torch.Tensor, dim: int) -> torch.Tensor | None:
    """Per-token position data (a rotary cos/sin table, a key mask) of the tokens a reduction keeps,
    in its order: the image span of `t` along `dim` indexed by `order` (1-D); None if `t` has no span."""
    return span.replace(t, dim, lambda img: img.index_select(dim, order))


def rope_seq_dim(t: torch.Tensor) -> int:
    """Sequence dimension of a rotary table: (S, D) tables and (B, S, ...) tables."""
    return 0 if t.ndim == 2 else 1


def slice_order(span: ImageSpan, slices: int, length: int,
                device: torch.device | None = None) -> torch.Tensor | None:
    """Where the tokens of a sequence of `length` tokens laid out as `span` says ([text, image] or
    [image, text], or image tokens only) stand once `slices` equal slices of it, each laid out as the
    whole is, are put one after another (what the processes of context parallelism hold, and what
    Ulysses attention gathers): position i of the result is where the sequence's token i stands there.
    None where that is the sequence's own order (one slice, or image tokens only)."""
    if slices == 1 or length == span.n:
        return None
    text, img = span.text // slices, span.n // slices
    first, second = (text, img) if span.text_first else (img, text)
    part = torch.arange(slices, device=device) * (first + second)
    a = (part[:, None] + torch.arange(first, device=device)).flatten()
    b = (part[:, None] + first + torch.arange(second, device=device)).flatten()
    return torch.cat([a, b])


class PooledAttention(torch.overrides.TorchFunctionMode):
    """ToDo inside an attention processor: while active, each scaled_dot_product_attention call whose
    keys are this span's sequence (image tokens alone or with the text of a joint sequence, after the
    processor applied its rotary embedding) gets the image keys and values pooled over the grid, and
    a key mask pooled with them. Queries keep every token. `hits` counts the calls it pooled.

    slices > 1: the keys are `slices` equal slices of the span's sequence one after another, each laid
    out as the whole is (text then image, or image then text): what Ulysses context parallelism gathers
    from its processes. They are put back in the sequence's order first (the keys' order does not change
    attention's output), then pooled as one process pools them."""

    def __init__(self, span: ImageSpan, factor: float, mode: str, factor_t: float = 1.0, slices: int = 1):
        super().__init__()
        self.span, self.factor, self.mode, self.factor_t = span, factor, mode, factor_t
        self.slices = slices
        self.hits = 0
        self.keys = 0

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        b, heads, n, d = t.shape
        flat = pool_tokens(t.reshape(b * heads, n, d), *self.span.grid, self.factor, self.mode, self.factor_t)
        return flat.view(b, heads, flat.shape[1], d)

    def _pool_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        if mask.shape[-1] == 1:
            return mask
        lead = mask.shape[:-1]
        m = mask.reshape(-1, 1, mask.shape[-1]).transpose(1, 2)  # (rows, S, 1)

        # a nearest key keeps its token's mask; a key mixed from several tokens (avg, bilinear,
        # bicubic) is visible where one of them is (max), never an interpolated bias
        mode = self.mode if self.mode in ("nearest-exact", "nearest", "max") else "max"

        def pool(img):
            pooled = pool_tokens(img.to(torch.float32) if mask.dtype == torch.bool else img, *self.span.grid,
                                 self.factor, mode, self.factor_t)
            return pooled > 0 if mask.dtype == torch.bool else pooled.to(mask.dtype)

        out = self.span.replace(m, 1, pool)
        return None if out is None else out.transpose(1, 2).reshape(*lead, out.shape[1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.unflatten:  # its Python method, which a compiler cannot trace in a mode
            return torch.unflatten(*args, **kwargs)
        if func is F.scaled_dot_product_attention and not kwargs.get("is_causal", False):
            names = ("query", "key", "value", "attn_mask")
            values = list(args) + [kwargs.pop(k) for k in names[len(args):] if k in kwargs]
            q, k, v = values[:3]
            mask = values[3] if len(values) > 3 else None
            length = k.shape[-2]
            if k.ndim == 4 and q.shape[-2] == length and self.span.start(length) is not None:
                order = slice_order(self.span, self.slices, length, k.device)
                if order is not None:
                    k, v = k.index_select(2, order), v.index_select(2, order)
                    mask = mask.index_select(-1, order) if mask is not None and mask.shape[-1] == length else mask
                k2 = self.span.replace(k, 2, self._pool)
                v2 = self.span.replace(v, 2, self._pool)
                m2 = self._pool_mask(mask) if mask is not None else None
                if mask is None or m2 is not None:
                    self.hits += 1
                    self.keys = k2.shape[-2]
                    return func(q, k2, v2, m2, *values[4:], **kwargs)
            return func(*values, **kwargs)
        return func(*args, **kwargs)


# Elements of one attention-probability tile (queries x keys x heads) per batch row in AttentionProbe.
PROBE_TILE = 1 << 22


class AttentionProbe(torch.overrides.TorchFunctionMode):
    """Reads one statistic of the first scaled_dot_product_attention call made while it is active, from
    the queries, keys and values the processor really used (after its norms and rotary embedding).
    Token-wise caching scores tokens with it:

        "received"  attention each key token receives: softmax probabilities summed over the queries,
                    averaged over heads -> (B, keys)  (self-attention: ToCa's DiT and Flux score)
        "entropy"   entropy of each query's attention over the keys, of the head-averaged probabilities
                    -> (B, queries)  (cross-attention over the text: ToCa's PixArt score)
        "vnorm"     per-head value norms n_h, as sum_h (1 - n_h) -> (B, keys)  (DuCa's score: larger for
                    smaller norms)

    For "received" and "entropy" the call's attention is computed explicitly from the same
    probabilities, in query tiles (no queries x keys map beyond PROBE_TILE elements a batch row), and
    returned in place of the call's, as the references compute their maps: the map costs no second
    pass over the scores. `result` holds the statistic (float32) once a call was seen, else None."""

    STATS = ("received", "vnorm", "entropy")

    def __init__(self, stat: str):
        super().__init__()
        if stat not in self.STATS:
            raise ValueError(f"probe statistic must be one of {list(self.STATS)}, got {stat!r}")
        self.stat = stat
        self.result: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.unflatten:  # its Python method, which a compiler cannot trace in a mode
            return torch.unflatten(*args, **kwargs)
        if func is F.scaled_dot_product_attention and self.result is None:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            values = list(args) + [kwargs[k] for k in names[len(args):] if k in kwargs]
            q, k, v = values[:3]
            mask = values[3] if len(values) > 3 else None
            plain = not kwargs.get("is_causal", False) and not (len(values) > 4 and values[4])  # no dropout
            if q.ndim == 4 and k.ndim == 4 and plain:
                if self.stat == "vnorm":
                    self.result = (1 - v.detach().float().norm(dim=-1)).sum(dim=1)  # (B, H, L) -> (B, L)
                else:
                    out, self.result = self._attend(q, k, v, mask, kwargs.get("scale"))
                    return out
        return func(*args, **kwargs)

    def _attend(self, q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output, statistic), from one softmax per query tile."""
        b, heads, nq, d = q.shape
        if k.shape[1] != heads:  # grouped-query attention: each key head serves a group of query heads
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        scale = scale if scale is not None else 1 / math.sqrt(d)
        kt, vf = k.float().transpose(-1, -2), v.float()
        rows = max(1, PROBE_TILE // max(1, k.shape[-2] * heads))
        outs, stats = [], []
        for start in range(0, nq, rows):
            logits = q[:, :, start:start + rows].float() @ kt * scale
            if mask is not None:
                m = mask[..., start:start + rows, :] if mask.ndim >= 2 and mask.shape[-2] == nq else mask
                logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
            p = torch.softmax(logits, dim=-1)
            outs.append(p @ vf)
            with torch.no_grad():
                mean = p.detach().mean(dim=1)  # (B, rows, keys), averaged over heads
                stats.append(mean.sum(dim=1) if self.stat == "received" else -(mean * torch.log(mean + 1e-7)).sum(dim=-1))
        stat = torch.stack(stats).sum(dim=0) if self.stat == "received" else torch.cat(stats, dim=1)
        return torch.cat(outs, dim=2).to(q.dtype), stat
