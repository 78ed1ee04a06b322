"""Triton kernels of the token ops, with their launchers. Imported only when a Triton op runs (this module
imports triton at its top); `diffaccel.kernels` dispatches here.

Every launcher takes (B, N, C) tensors of any strides and index tensors (B or 1, K) of int64/int32, and an
optional preallocated `out` (the tests pass outputs filled with NaN, so an unwritten element shows). Sums
and dot products accumulate in float32. Block sizes may be given (the tests use small ones to cover
several tiles on small inputs).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def _bstride(t: torch.Tensor, batch: int) -> int:
    """Batch stride of an index tensor holding B rows or one row shared by the batch."""
    if t.shape[0] == batch:
        return t.stride(0)
    if t.shape[0] == 1:
        return 0
    raise ValueError(f"index rows {t.shape[0]} do not match batch {batch}")


# -- gather / scatter of token rows --------------------------------------------------------------


@triton.jit
def _gather_kernel(x_ptr, idx_ptr, out_ptr, K, C,
                   sxb, sxn, sxc, sib, sik, sob, sok, soc,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, k] = x[b, idx[b, k]] for a block of rows k and columns."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < K
    mask = rmask[:, None] & (cols < C)[None, :]
    src = tl.load(idx_ptr + b * sib + rows * sik, mask=rmask, other=0).to(tl.int64)
    v = tl.load(x_ptr + b * sxb + src[:, None] * sxn + cols[None, :] * sxc, mask=mask)
    tl.store(out_ptr + b * sob + rows[:, None] * sok + cols[None, :] * soc, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_kernel(out_ptr, idx_ptr, src_ptr, K, C,
                    sob, son, soc, sib, sik, ssb, ssk, ssc,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, idx[b, k]] = src[b, k] for a block of rows k and columns."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < K
    mask = rmask[:, None] & (cols < C)[None, :]
    dst = tl.load(idx_ptr + b * sib + rows * sik, mask=rmask, other=0).to(tl.int64)
    v = tl.load(src_ptr + b * ssb + rows[:, None] * ssk + cols[None, :] * ssc, mask=mask)
    tl.store(out_ptr + b * sob + dst[:, None] * son + cols[None, :] * soc, v.to(out_ptr.dtype.element_ty), mask=mask)


def _row_blocks(k: int, c: int, block_r: int | None, block_c: int | None) -> tuple[int, int]:
    return block_r or _pow2(k, 1, 16), block_c or _pow2(c, 16, 256)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None,
                  block_r: int | None = None, block_c: int | None = None) -> torch.Tensor:
    """x (B, N, C), idx (B or 1, K) -> (B, K, C)."""
    b, _, c = x.shape
    k = idx.shape[1]
    if out is None:
        out = x.new_empty(b, k, c)
    if out.numel():
        br, bc = _row_blocks(k, c, block_r, block_c)
        grid = (triton.cdiv(k, br), b, triton.cdiv(c, bc))
        _gather_kernel[grid](x, idx, out, k, c, *x.stride(), _bstride(idx, b), idx.stride(1), *out.stride(),
                             BLOCK_R=br, BLOCK_C=bc)
    return out


def scatter_tokens(out: torch.Tensor, idx: torch.Tensor, src: torch.Tensor,
                   block_r: int | None = None, block_c: int | None = None) -> torch.Tensor:
    """out[b, idx[b, k]] = src[b, k] in place (src cast to out's dtype); returns out. Duplicate
    positions in a row of idx: one of their rows wins (unspecified which, as in torch's scatter_)."""
    b, _, c = out.shape
    k = idx.shape[1]
    if b and k and c:
        br, bc = _row_blocks(k, c, block_r, block_c)
        grid = (triton.cdiv(k, br), b, triton.cdiv(c, bc))
        _scatter_kernel[grid](out, idx, src, k, c, *out.stride(), _bstride(idx, b), idx.stride(1),
                              src.stride(0) if src.shape[0] == b else 0, src.stride(1), src.stride(2),
                              BLOCK_R=br, BLOCK_C=bc)
    return out


# -- tiled bipartite matching --------------------------------------------------------------------


@triton.jit
def _best_match_kernel(a_ptr, b_ptr, val_ptr, idx_ptr, Na, Nb, C,
                       sab, san, sac, sbb, sbn, sbc, svb, svn, sib, sin,
                       NORMALIZE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """For BLOCK_M rows of a: running max / argmax of a_i . b_j over tiles of BLOCK_N rows of b (the
    first index wins a tie, within a tile and across tiles), never more than one tile of similarities."""
    bb = tl.program_id(1).to(tl.int64)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mm = rm < Na
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + bb * sab + rm[:, None] * san
    b_base = b_ptr + bb * sbb
    if NORMALIZE:
        ssq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            t = tl.load(a_rows + (k0 + rk)[None, :] * sac, mask=mm[:, None] & ((k0 + rk) < C)[None, :],
                        other=0.0).to(tl.float32)
            ssq += tl.sum(t * t, axis=1)
        inv_a = 1.0 / tl.maximum(tl.sqrt(ssq), 1e-12)  # F.normalize's eps
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int64)
    for n0 in range(0, Nb, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        mn = rn < Nb
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        ssq_b = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            km = (k0 + rk) < C
            at = tl.load(a_rows + (k0 + rk)[None, :] * sac, mask=mm[:, None] & km[None, :], other=0.0)
            bt = tl.load(b_base + rn[None, :] * sbn + (k0 + rk)[:, None] * sbc, mask=km[:, None] & mn[None, :],
                         other=0.0)
            if UPCAST:
                at = at.to(tl.float32)
                bt = bt.to(tl.float32)
            acc = tl.dot(at, bt, acc, input_precision=PRECISION)
            if NORMALIZE:
                bf = bt.to(tl.float32)
                ssq_b += tl.sum(bf * bf, axis=0)
        if NORMALIZE:
            acc = acc * inv_a[:, None] * (1.0 / tl.maximum(tl.sqrt(ssq_b), 1e-12))[None, :]
        acc = tl.where(mn[None, :], acc, float("-inf"))
        tile_max = tl.max(acc, axis=1)
        tile_arg = tl.argmax(acc, axis=1, tie_break_left=True).to(tl.int64) + n0
        better = tile_max > best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_max, best)
        arg = tl.where(better, tile_arg, arg)
    tl.store(val_ptr + bb * svb + rm * svn, best.to(val_ptr.dtype.element_ty), mask=mm)
    tl.store(idx_ptr + bb * sib + rm * sin, arg, mask=mm)


def _precision(dtype: torch.dtype) -> str:
    """fp32 tiles multiply as torch's matmul would: in TF32 only where torch allows it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def best_match(a: torch.Tensor, b: torch.Tensor, normalize: bool = False, values: torch.Tensor | None = None,
               indices: torch.Tensor | None = None, block_m: int | None = None, block_n: int | None = None,
               block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """a (B, Na, C), b (B or 1, Nb, C) -> (max similarity (B, Na) in a's dtype, its index (B, Na) int64)."""
    batch, na, c = a.shape
    nb = b.shape[1]
    if nb == 0 and na:
        raise ValueError("best_match needs at least one row of b")
    if values is None:
        values = a.new_empty(batch, na)
    if indices is None:
        indices = torch.empty(batch, na, dtype=torch.int64, device=a.device)
    if values.numel():
        bm = block_m or _pow2(na, 16, 64)
        bn = block_n or _pow2(nb, 16, 64)
        bk = block_k or _pow2(c, 16, 64)
        # the interpreter multiplies bf16 tiles wrongly (tests/test_kernels.py shows it): fp32 tiles there
        upcast = _INTERPRET and a.dtype == torch.bfloat16
        grid = (triton.cdiv(na, bm), batch)
        _best_match_kernel[grid](a, b, values, indices, na, nb, c, *a.stride(),
                                 b.stride(0) if b.shape[0] == batch else 0, b.stride(1), b.stride(2),
                                 *values.stride(), *indices.stride(),
                                 NORMALIZE=normalize, UPCAST=upcast,
                                 PRECISION="ieee" if upcast else _precision(a.dtype),
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return values, indices


# -- merge / unmerge -----------------------------------------------------------------------------


@triton.jit
def _merge_kernel(x_ptr, out_ptr, keep_ptr, dst_ptr, fold_ptr, start_ptr, count_ptr, Nk, Nd, C,
                  sxb, sxn, sxc, sob, son, soc, skb, skk, sdb, sdk, sfb, sfk, scb, sck,
                  MEAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows [0, Nk) of out: x[keep]; rows Nk + d: x[dst[d]], averaged ("mean") with the folded sources
    fold[start[d] : start[d] + count[d]] (the folds sorted by destination), summed in float32."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = (cols < C)[None, :]
    is_keep = rows < Nk
    is_dst = (rows >= Nk) & (rows < Nk + Nd)
    d = rows - Nk
    pos_k = tl.load(keep_ptr + b * skb + rows * skk, mask=is_keep, other=0)
    pos_d = tl.load(dst_ptr + b * sdb + d * sdk, mask=is_dst, other=0)
    pos = tl.where(is_keep, pos_k, pos_d).to(tl.int64)
    mask = (is_keep | is_dst)[:, None] & cmask
    x_base = x_ptr + b * sxb + cols[None, :] * sxc
    acc = tl.load(x_base + pos[:, None] * sxn, mask=mask, other=0.0).to(tl.float32)
    if MEAN:
        start = tl.load(start_ptr + b * scb + d * sck, mask=is_dst, other=0)
        count = tl.load(count_ptr + b * scb + d * sck, mask=is_dst, other=0)
        for j in range(0, tl.max(count, axis=0)):
            has = j < count
            src = tl.load(fold_ptr + b * sfb + (start + j) * sfk, mask=has, other=0).to(tl.int64)
            acc += tl.load(x_base + src[:, None] * sxn, mask=has[:, None] & cmask, other=0.0).to(tl.float32)
        acc = acc / (count + 1).to(tl.float32)[:, None]
    tl.store(out_ptr + b * sob + rows[:, None] * son + cols[None, :] * soc, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


def merge(x: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
          fold_target: torch.Tensor, mode: str, out: torch.Tensor | None = None, block_r: int | None = None,
          block_c: int | None = None) -> torch.Tensor:
    """[x[keep], x[dst] averaged with the sources folded into each ("mean") or as it is ("drop")] in one
    pass over x. The folds are grouped per destination first (a stable sort of fold_target and the
    counts' running sum: a CSR, on the device, no host sync)."""
    b, _, c = x.shape
    nk, nd = keep_idx.shape[1], dst_idx.shape[1]
    if out is None:
        out = x.new_empty(b, nk + nd, c)
    mean = mode == "mean" and fold_idx.shape[1] > 0
    if mean:
        target = fold_target.long()
        order = torch.sort(target, dim=1, stable=True).indices
        fold = fold_idx.expand(target.shape[0], -1).gather(1, order)
        count = torch.zeros(target.shape[0], nd, dtype=torch.int32, device=x.device)
        count.scatter_add_(1, target, torch.ones_like(target, dtype=torch.int32))
        start = count.cumsum(dim=1, dtype=torch.int32) - count
    else:
        fold = count = start = fold_idx
    if out.numel():
        br, bc = _row_blocks(nk + nd, c, block_r, block_c)
        grid = (triton.cdiv(nk + nd, br), b, triton.cdiv(c, bc))
        _merge_kernel[grid](x, out, keep_idx, dst_idx, fold, start, count, nk, nd, c, *x.stride(), *out.stride(),
                            _bstride(keep_idx, b), keep_idx.stride(1), _bstride(dst_idx, b), dst_idx.stride(1),
                            _bstride(fold, b), fold.stride(1), _bstride(count, b), count.stride(1),
                            MEAN=mean, BLOCK_R=br, BLOCK_C=bc)
    return out


def inverse_map(keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor, source: torch.Tensor,
                n: int) -> torch.Tensor:
    """(B', n) int64: the row of the reduced sequence each token is restored from (positions no index
    names get row 0)."""
    rows = max(t.shape[0] for t in (keep_idx, dst_idx, fold_idx, source))
    nk, nd = keep_idx.shape[1], dst_idx.shape[1]
    inv = torch.zeros(rows, n, dtype=torch.int64, device=keep_idx.device)
    ar = torch.arange(nk + nd, device=keep_idx.device)[None]
    inv.scatter_(1, keep_idx.long().expand(rows, nk), ar[:, :nk].expand(rows, nk))
    inv.scatter_(1, dst_idx.long().expand(rows, nd), ar[:, nk:].expand(rows, nd))
    r = fold_idx.shape[1]
    inv.scatter_(1, fold_idx.long().expand(rows, r), source.long().expand(rows, r))
    return inv


def unmerge(y: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor, fold_idx: torch.Tensor,
            source: torch.Tensor, n: int, out: torch.Tensor | None = None, block_r: int | None = None,
            block_c: int | None = None) -> torch.Tensor:
    """(B, Nk + Nd, C) -> (B, n, C): one gather pass from the inverse map (each output row read once)."""
    return gather_tokens(y, inverse_map(keep_idx, dst_idx, fold_idx, source, n), out, block_r, block_c)
