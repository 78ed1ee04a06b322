"""Torch reference implementations of the token ops: what every op runs on CPU (and wherever Triton is not
used). These are the code `diffaccel.tokens` ran before the ops existed, unchanged, so results on CPU are
bit-identical to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("mean", "drop")


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B or 1, K) token positions -> (B, K, C)."""
    b, _, c = x.shape
    return x.gather(1, idx[..., None].expand(b, idx.shape[1], c))


def scatter_tokens(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out[b, idx[b, k]] = src[b, k] in place; returns out."""
    b, _, c = out.shape
    return out.scatter_(1, idx[..., None].expand(b, idx.shape[1], c), src)


def best_match(a: torch.Tensor, b: torch.Tensor, normalize: bool, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a (B, Na, C): max over rows of b (B, Nb, C) of the dot product, and its index (the first
    index among equal maxima: torch's `max`), in tiles of rows of at most `tile` similarities."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
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


def merge(x: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
          fold_target: torch.Tensor, mode: str) -> torch.Tensor:
    """[x[keep], destinations]: each destination averaged with the sources folded into it ("mean") or
    as it is ("drop")."""
    dst = gather_tokens(x, dst_idx)
    if mode == "mean" and fold_idx.shape[1]:
        # mean of each destination and the sources folded into it (scatter_add + counts: faster
        # on CPU than scatter_reduce("mean"), same result)
        b, r = x.shape[0], fold_idx.shape[1]
        src = gather_tokens(x, fold_idx)
        dst = dst.scatter_add(1, fold_target[..., None].expand(b, r, x.shape[-1]), src)
        count = x.new_ones(fold_target.shape[0], dst_idx.shape[1], 1)
        count.scatter_add_(1, fold_target[..., None], x.new_ones(fold_target.shape[0], r, 1))
        dst = dst / count
    elif mode not in MODES:
        raise ValueError(f"reduce mode must be 'mean' or 'drop', got {mode!r}")
    return torch.cat([gather_tokens(x, keep_idx), dst], dim=1)


def unmerge(y: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
            source: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Nk + Nd, C) -> (B, n, C): out[keep] = y[:Nk], out[dst] = y[Nk:], out[fold] = y[source]."""
    nk = keep_idx.shape[1]
    out = y.new_empty(y.shape[0], n, y.shape[-1])
    scatter_tokens(out, keep_idx, y[:, :nk])
    scatter_tokens(out, dst_idx, y[:, nk:])
    scatter_tokens(out, fold_idx, gather_tokens(y, source))
    return out
