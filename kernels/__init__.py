"""Token gather/scatter ops used by every method.

These are the dispatch points for fused GPU kernels; the torch versions below are the reference
implementations and the fallback on every device.
"""

from __future__ import annotations

import torch

__all__ = ["gather_tokens", "scatter_tokens"]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B or 1, K) token positions -> (B, K, C)."""
    b, _, c = x.shape
    return x.gather(1, idx[..., None].expand(b, idx.shape[1], c))


def scatter_tokens(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out[b, idx[b, k]] = src[b, k] in place; returns out."""
    b, _, c = out.shape
    return out.scatter_(1, idx[..., None].expand(b, idx.shape[1], c), src)
