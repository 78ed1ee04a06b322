"""Token ops shared by every method: cell partitions, tiled bipartite matching, merge/unmerge,
prune/restore and key/value pooling. Pure functions on (B, N, C) tensors; no host syncs.

A reduction returns its own inverse (`TokenReduction.reduce` / `.restore`), so a method is always
"reduce, run the sub-layer on fewer tokens, restore".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffaccel.kernels import gather_tokens, scatter_tokens

# Elements of one similarity tile (rows x destinations) per batch row; bounds the matching's memory.
MATCH_TILE = 1 << 22


def cell_partition(h: int, w: int, sx: int, sy: int, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an h x w row-major grid into one destination per full sy x sx cell and sources.

    choice: (B', h // sy, w // sx) ints in [0, sx * sy): the destination's offset inside its cell
    (row-major, offset k is row k // sx, column k % sx). Tokens outside full cells are sources.
    Returns (dst_idx (B', Nd), src_idx (B', N - Nd)), each in ascending token order.
    """
    hsy, wsx = h // sy, w // sx
    device = choice.device
    rows = torch.arange(hsy, device=device).view(1, hsy, 1) * sy + torch.div(choice, sx, rounding_mode="floor")
    cols = torch.arange(wsx, device=device).view(1, 1, wsx) * sx + choice % sx
    dst_idx = (rows * w + cols).flatten(1)
    is_dst = torch.zeros(dst_idx.shape[0], h * w, dtype=torch.int8, device=device)
    is_dst.scatter_(1, dst_idx, 1)
    src_idx = torch.argsort(is_dst, dim=1, stable=True)[:, : h * w - dst_idx.shape[1]]
    return dst_idx, src_idx


def best_match(a: torch.Tensor, b: torch.Tensor, tile: int = MATCH_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a (B, Na, C), the highest dot product with a row of b (B, Nb, C) and its index.

    Computed in tiles of rows so no Na x Nb matrix is held when it would exceed `tile` elements.
    """
    rows = max(1, tile // max(1, b.shape[1]))
    if a.shape[1] <= rows:
        return (a @ b.transpose(-1, -2)).max(dim=-1)
    bt = b.transpose(-1, -2)
    vals, idxs = [], []
    for start in range(0, a.shape[1], rows):
        v, i = (a[:, start : start + rows] @ bt).max(dim=-1)
        vals.append(v)
        idxs.append(i)
    return torch.cat(vals, dim=1), torch.cat(idxs, dim=1)


def expand_rows(idx: torch.Tensor, batch: int) -> torch.Tensor:
    """Index rows computed for a batch subset (1 row, or the conditional half) -> all rows."""
    if idx.shape[0] == batch:
        return idx
    if batch % idx.shape[0]:
        raise ValueError(f"cannot spread {idx.shape[0]} index rows over batch {batch}")
    return idx.repeat(batch // idx.shape[0], 1)


class TokenReduction:
    """Sources either kept, or folded into a destination (mean merge) or dropped (prune).

    reduce(x) -> [kept sources, destinations]; restore(y) puts each token back at its place and
    gives folded sources the output of their destination.
    """

    def __init__(self, n: int, dst_idx: torch.Tensor, keep_idx: torch.Tensor, fold_idx: torch.Tensor,
                 fold_target: torch.Tensor):
        self.n = n
        self.dst_idx = dst_idx  # (B', Nd) token positions of destinations
        self.keep_idx = keep_idx  # (B', Nk) token positions of sources kept as they are
        self.fold_idx = fold_idx  # (B', r) token positions of folded sources
        self.fold_target = fold_target  # (B', r) index into the destinations

    @property
    def kept(self) -> int:
        return self.keep_idx.shape[1] + self.dst_idx.shape[1]

    def expand(self, batch: int) -> TokenReduction:
        return TokenReduction(self.n, *(expand_rows(t, batch) for t in
                                        (self.dst_idx, self.keep_idx, self.fold_idx, self.fold_target)))

    def reduce(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """mode "mean": folded sources are averaged into their destination; "drop": they are dropped."""
        dst = gather_tokens(x, self.dst_idx)
        if mode == "mean" and self.fold_idx.shape[1]:
            # mean of each destination and the sources folded into it (scatter_add + counts: faster
            # on CPU than scatter_reduce("mean"), same result)
            b, r = x.shape[0], self.fold_idx.shape[1]
            src = gather_tokens(x, self.fold_idx)
            dst = dst.scatter_add(1, self.fold_target[..., None].expand(b, r, x.shape[-1]), src)
            count = x.new_ones(self.fold_target.shape[0], self.dst_idx.shape[1], 1)
            count.scatter_add_(1, self.fold_target[..., None], x.new_ones(self.fold_target.shape[0], r, 1))
            dst = dst / count
        elif mode not in ("mean", "drop"):
            raise ValueError(f"reduce mode must be 'mean' or 'drop', got {mode!r}")
        return torch.cat([gather_tokens(x, self.keep_idx), dst], dim=1)

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        nk = self.keep_idx.shape[1]
        kept, dst = y[:, :nk], y[:, nk:]
        out = y.new_empty(y.shape[0], self.n, y.shape[-1])
        scatter_tokens(out, self.keep_idx, kept)
        scatter_tokens(out, self.dst_idx, dst)
        scatter_tokens(out, self.fold_idx, gather_tokens(dst, self.fold_target))
        return out


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
                        device: torch.device) -> torch.Tensor:
    """ToMeSD's destination choice: one random offset per cell (drawn on the generator's device)."""
    shape = (h // sy, w // sx)
    if generator is None:
        return torch.zeros((1, *shape), dtype=torch.int64, device=device)
    gen_device = generator.device
    choice = torch.randint(sx * sy, size=(*shape, 1), generator=generator, device=gen_device)
    return choice.view(1, *shape).to(device)


def bipartite_soft_matching_2d(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                               choice: torch.Tensor) -> TokenReduction:
    """ToMeSD: one destination per sy x sx cell (given by `choice`), the r sources most similar
    (cosine) to some destination are merged into it. r is capped at the number of sources."""
    dst_idx, src_idx = cell_partition(h, w, sx, sy, choice)
    r = min(r, src_idx.shape[1])
    return _fold_most_similar(metric, dst_idx, src_idx, r, h * w)


def similarity_pruning_2d(metric: torch.Tensor, h: int, w: int, sx: int, sy: int, r: int,
                          noise: float = 0.0, generator: torch.Generator | None = None) -> TokenReduction:
    """SiTo: score each token by its summed cosine similarity to all tokens (plus noise), keep the
    highest-scoring token of each cell as a base, prune the r other tokens most similar to a base.
    `noise` is the standard deviation of Gaussian noise added to the (mean) similarity score.
    The summed similarity is x_i . sum_j x_j, so no N x N matrix is formed."""
    unit = F.normalize(metric, dim=-1)
    score = (unit @ unit.sum(dim=1, keepdim=True).transpose(-1, -2)).squeeze(-1) / metric.shape[1]
    if noise:
        rand = torch.randn(score.shape, generator=generator, device=generator.device if generator else None)
        score = score + noise * rand.to(score.device, score.dtype)
    hsy, wsx = h // sy, w // sx
    cells = score.view(-1, h, w)[:, : hsy * sy, : wsx * sx].reshape(-1, hsy, sy, wsx, sx)
    choice = cells.permute(0, 1, 3, 2, 4).reshape(-1, hsy, wsx, sy * sx).argmax(dim=-1)
    dst_idx, src_idx = cell_partition(h, w, sx, sy, choice)
    r = min(r, src_idx.shape[1])
    return _fold_most_similar(unit, dst_idx, src_idx, r, h * w, normalized=True)


def pool_tokens(x: torch.Tensor, frames: int, h: int, w: int, factor: float, mode: str = "nearest") -> torch.Tensor:
    """ToDo: downsample (B, F*h*w, C) grid tokens by `factor` in height and width -> (B, F*h'*w', C)."""
    b, n, c = x.shape
    size = (math.ceil(h / factor), math.ceil(w / factor))  # odd grids keep their last row/column
    grid = x.reshape(b * frames, h, w, c).permute(0, 3, 1, 2)
    if mode == "nearest":
        out = F.interpolate(grid, size=size, mode="nearest-exact")
    elif mode == "avg":
        out = F.adaptive_avg_pool2d(grid, size)
    elif mode == "max":
        out = F.adaptive_max_pool2d(grid, size)
    else:
        raise ValueError(f"pool mode must be one of ['nearest', 'avg', 'max'], got {mode!r}")
    return out.permute(0, 2, 3, 1).reshape(b, frames * size[0] * size[1], c)
