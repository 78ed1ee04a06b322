"""The token ops as torch custom ops (namespace `diffaccel`), each with a fake implementation (so
`torch.compile(fullgraph=True)` traces through them) and, where it applies, a backward.

Dispatch, at call time: `backend(device)` says which implementation runs: the fused Triton kernels
(kernels/triton_ops.py) for CUDA tensors when Triton imports, the torch reference (kernels/_reference.py)
otherwise. DIFFACCEL_KERNELS=reference (or `use_backend("reference")`) forces the reference;
DIFFACCEL_KERNELS=triton (or `use_backend("triton")`) forces the kernels, on CPU tensors too when Triton
runs in its interpreter (TRITON_INTERPRET=1 set before the kernels are first imported).

The public functions (diffaccel.kernels) call the ops; a plain eager call (`plain_eager`) runs the same
implementation without the dispatcher.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from . import _reference as ref

ENV = "DIFFACCEL_KERNELS"
BACKENDS = ("auto", "triton", "reference")
_override: list[str] = []  # use_backend's stack


def _requested() -> tuple[str, str]:
    if _override:
        return _override[-1], f"use_backend({_override[-1]!r})"
    want = os.environ.get(ENV, "").strip().lower() or "auto"
    if want not in BACKENDS:
        raise ValueError(f"{ENV} must be one of {list(BACKENDS)}, got {want!r}")
    return want, f"{ENV}={want}"


@functools.cache
def _triton_missing() -> str | None:
    """None when Triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"Triton cannot be imported ({type(e).__name__}: {e})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend(device: torch.device | str = "cuda") -> tuple[str, str]:
    """("triton" or "reference", the reason) for tensors on `device`, as the ops decide at call time.
    Raises RuntimeError when the kernels are forced but cannot run there."""
    device = torch.device(device)
    want, why = _requested()
    if want == "reference":
        return "reference", why
    missing = _triton_missing()
    if want == "triton":
        if missing:
            raise RuntimeError(f"{why}, but {missing}")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"{why}, but {device.type} tensors need Triton's interpreter (TRITON_INTERPRET=1)")
        return "triton", why
    if device.type != "cuda":
        return "reference", f"{device.type} tensors use the torch reference"
    if missing:
        return "reference", missing
    import triton

    return "triton", f"CUDA tensors, Triton {triton.__version__}"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force "triton" or "reference" (or "auto") for the ops called inside, over DIFFACCEL_KERNELS."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {name!r}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def _kernels(t: torch.Tensor):
    """The Triton module when the kernels run for tensors like t, else None."""
    want = _override[-1] if _override else os.environ.get(ENV, "")
    if want in ("", "auto") and not t.is_cuda:  # the common case, without backend()'s strings
        return None
    if backend(t.device)[0] != "triton":
        return None
    from . import triton_ops

    return triton_ops


def plain_eager(*tensors: torch.Tensor) -> bool:
    """True for an eager call on plain tensors with no gradient to record, where the public functions
    run an op's implementation without the dispatcher (which costs some 50-100 us a call in Python).
    Tracing (torch.compile, export), tensor subclasses (fake, functional), dispatch modes and autograd
    always go through the op."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) is torch.Tensor and not (grad and t.requires_grad) for t in tensors)


# -- implementations (what each op runs) -----------------------------------------------------------


def gather_tokens_impl(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    k = _kernels(x)
    return k.gather_tokens(x, idx) if k else ref.gather_tokens(x, idx)


def scatter_tokens_impl(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    k = _kernels(out)
    if k:
        k.scatter_tokens(out, idx, src)
    else:
        ref.scatter_tokens(out, idx, src)


def best_match_impl(a: torch.Tensor, b: torch.Tensor, normalize: bool,
                    tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = _kernels(a) if a.ndim == 3 and b.ndim == 3 else None
    if k:
        return k.best_match(a, b, normalize)
    vals, idxs = ref.best_match(a, b, normalize, tile)
    return vals, idxs


def merge_impl(x: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
               fold_target: torch.Tensor, mode: str) -> torch.Tensor:
    _check_mode(mode)
    k = _kernels(x)
    if k:
        return k.merge(x, keep_idx, dst_idx, fold_idx, fold_target, mode)
    return ref.merge(x, keep_idx, dst_idx, fold_idx, fold_target, mode)


def unmerge_impl(y: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
                 source: torch.Tensor, n: int) -> torch.Tensor:
    k = _kernels(y)
    if k:
        return k.unmerge(y, keep_idx, dst_idx, fold_idx, source, n)
    return ref.unmerge(y, keep_idx, dst_idx, fold_idx, source, n)


def _check_mode(mode: str) -> None:
    if mode not in ref.MODES:
        raise ValueError(f"reduce mode must be 'mean' or 'drop', got {mode!r}")


# -- gather / scatter ----------------------------------------------------------------------------


@torch.library.custom_op("diffaccel::gather_tokens", mutates_args=())
def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), idx (B or 1, K) -> (B, K, C): x[b, idx[b, k]]."""
    return gather_tokens_impl(x, idx)


@gather_tokens.register_fake
def _(x, idx):
    return x.new_empty(x.shape[0], idx.shape[1], x.shape[2])


def _gather_setup(ctx, inputs, output):
    x, idx = inputs
    ctx.save_for_backward(idx)
    ctx.n = x.shape[1]


def _gather_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    b, k, c = grad.shape
    return grad.new_zeros(b, ctx.n, c).scatter_add_(1, idx[..., None].expand(b, k, c), grad), None


gather_tokens.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("diffaccel::scatter_tokens", mutates_args=("out",))
def scatter_tokens(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """out[b, idx[b, k]] = src[b, k], in place (no autograd: `diffaccel.kernels.scatter_tokens` takes
    the torch reference when a gradient is needed)."""
    scatter_tokens_impl(out, idx, src)


@scatter_tokens.register_fake
def _(out, idx, src):
    return None


# -- matching ------------------------------------------------------------------------------------


@torch.library.custom_op("diffaccel::best_match", mutates_args=())
def best_match(a: torch.Tensor, b: torch.Tensor, normalize: bool, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a (B, Na, C): the highest (cosine, with normalize) similarity to a row of b (B or 1,
    Nb, C) and the first index reaching it. `tile` bounds the reference's similarity tile."""
    return best_match_impl(a, b, normalize, tile)


@best_match.register_fake
def _(a, b, normalize, tile):
    shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2])
    return a.new_empty(shape), a.new_empty(shape, dtype=torch.int64)


def _match_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _match_backward(ctx, grad_values, grad_indices):
    return None, None, None, None


best_match.register_autograd(_match_backward, setup_context=_match_setup)


# -- merge / unmerge -----------------------------------------------------------------------------


@torch.library.custom_op("diffaccel::merge", mutates_args=())
def merge(x: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
          fold_target: torch.Tensor, mode: str) -> torch.Tensor:
    """x (B, N, C) -> (B, Nk + Nd, C): [x[keep], each destination averaged with the sources folded into
    it (fold_idx[i] into destination fold_target[i]; mode "mean"), or as it is (mode "drop")]."""
    return merge_impl(x, keep_idx, dst_idx, fold_idx, fold_target, mode)


@merge.register_fake
def _(x, keep_idx, dst_idx, fold_idx, fold_target, mode):
    _check_mode(mode)
    return x.new_empty(x.shape[0], keep_idx.shape[1] + dst_idx.shape[1], x.shape[2])


def _merge_setup(ctx, inputs, output):
    x, keep_idx, dst_idx, fold_idx, fold_target, mode = inputs
    ctx.save_for_backward(keep_idx, dst_idx, fold_idx, fold_target)
    ctx.n, ctx.mean = x.shape[1], mode == "mean"


def _merge_backward(ctx, grad):
    keep_idx, dst_idx, fold_idx, fold_target = ctx.saved_tensors
    b, _, c = grad.shape
    nk, nd, r = keep_idx.shape[1], dst_idx.shape[1], fold_idx.shape[1]
    g_keep, g_dst = grad[:, :nk], grad[:, nk:]
    if ctx.mean and r:
        count = grad.new_ones(fold_target.shape[0], nd, 1)
        count.scatter_add_(1, fold_target[..., None], grad.new_ones(fold_target.shape[0], r, 1))
        g_dst = g_dst / count
    gx = grad.new_zeros(b, ctx.n, c)
    gx.scatter_add_(1, keep_idx[..., None].expand(b, nk, c), g_keep)
    gx.scatter_add_(1, dst_idx[..., None].expand(b, nd, c), g_dst)
    if ctx.mean and r:
        gx.scatter_add_(1, fold_idx[..., None].expand(b, r, c), ref.gather_tokens(g_dst, fold_target))
    return gx, None, None, None, None, None


merge.register_autograd(_merge_backward, setup_context=_merge_setup)


@torch.library.custom_op("diffaccel::unmerge", mutates_args=())
def unmerge(y: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
            source: torch.Tensor, n: int) -> torch.Tensor:
    """y (B, Nk + Nd, C) -> (B, n, C): out[keep] = y[:Nk], out[dst] = y[Nk:], out[fold] = y[source]."""
    return unmerge_impl(y, keep_idx, dst_idx, fold_idx, source, n)


@unmerge.register_fake
def _(y, keep_idx, dst_idx, fold_idx, source, n):
    return y.new_empty(y.shape[0], n, y.shape[2])


def _unmerge_setup(ctx, inputs, output):
    y, keep_idx, dst_idx, fold_idx, source, n = inputs
    ctx.save_for_backward(keep_idx, dst_idx, fold_idx, source)


def _unmerge_backward(ctx, grad):
    keep_idx, dst_idx, fold_idx, source = ctx.saved_tensors
    b, _, c = grad.shape
    gy = torch.cat([ref.gather_tokens(grad, keep_idx), ref.gather_tokens(grad, dst_idx)], dim=1)
    gy.scatter_add_(1, source[..., None].expand(b, source.shape[1], c), ref.gather_tokens(grad, fold_idx))
    return gy, None, None, None, None, None


unmerge.register_autograd(_unmerge_backward, setup_context=_unmerge_setup)
