"""Token ops used by every method: gather/scatter of token rows, tiled bipartite matching, merge and
unmerge (prune and restore).

Each is a torch custom op (`torch.ops.diffaccel.*`, kernels/ops.py) that runs a fused Triton kernel
(kernels/triton_ops.py) on CUDA tensors when Triton imports, and the torch reference (kernels/_reference.py)
otherwise: on CPU results are those of the reference, bit for bit. DIFFACCEL_KERNELS=reference|triton|auto
(read at each call) or `use_backend(...)` choose; `backend(device)` says which runs and why. A plain eager
call (no tracing, no autograd, plain tensors) runs the op's implementation directly, without the
dispatcher's overhead (`ops.plain_eager`). See README.md.
"""

from __future__ import annotations

import torch

from . import _reference, ops
from .ops import ENV, backend, plain_eager, use_backend

__all__ = ["ENV", "backend", "best_match", "gather_tokens", "merge", "scatter_tokens", "unmerge", "use_backend"]

# Elements of one similarity tile of the reference matching (rows x destinations) per batch row.
MATCH_TILE = 1 << 22


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B or 1, K) token positions -> (B, K, C)."""
    if plain_eager(x, idx):
        return ops.gather_tokens_impl(x, idx)
    return torch.ops.diffaccel.gather_tokens(x, idx)


def scatter_tokens(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out[b, idx[b, k]] = src[b, k] in place; returns out. (With autograd recording a gradient through
    out or src, the torch reference runs: an in-place op keeps its autograd history that way.)"""
    if torch.is_grad_enabled() and (out.requires_grad or src.requires_grad):
        return _reference.scatter_tokens(out, idx, src)
    if plain_eager(out, idx, src):
        ops.scatter_tokens_impl(out, idx, src)
    else:
        torch.ops.diffaccel.scatter_tokens(out, idx, src)
    return out


def best_match(a: torch.Tensor, b: torch.Tensor, normalize: bool = False,
               tile: int = MATCH_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a (B, Na, C), the highest dot product with a row of b (B, Nb, C) (of the L2-normalised
    rows with `normalize`) and its index (the first one on a tie). No gradient."""
    if plain_eager(a, b):
        return ops.best_match_impl(a, b, normalize, tile)
    return torch.ops.diffaccel.best_match(a, b, normalize, tile)


def merge(x: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
          fold_target: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """x (B, N, C) -> [x[keep_idx], x[dst_idx] averaged with the sources fold_idx[i] folded into destination
    fold_target[i] ("mean"), or as they are ("drop")] (B, Nk + Nd, C)."""
    if plain_eager(x, keep_idx, dst_idx, fold_idx, fold_target):
        return ops.merge_impl(x, keep_idx, dst_idx, fold_idx, fold_target, mode)
    return torch.ops.diffaccel.merge(x, keep_idx, dst_idx, fold_idx, fold_target, mode)


def unmerge(y: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
            source: torch.Tensor, n: int) -> torch.Tensor:
    """y (B, Nk + Nd, C) -> (B, n, C): out[keep] = y[:Nk], out[dst] = y[Nk:], out[fold] = y[source]."""
    if plain_eager(y, keep_idx, dst_idx, fold_idx, source):
        return ops.unmerge_impl(y, keep_idx, dst_idx, fold_idx, source, n)
    return torch.ops.diffaccel.unmerge(y, keep_idx, dst_idx, fold_idx, source, n)
