"""The Triton kernels of diffaccel.kernels against their torch references, on CPU tensors in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton), and the custom
ops' registrations (opcheck, torch.compile, autograd, dispatch).

Small shapes: the interpreter costs about half a millisecond per program instance. Outputs are filled
with NaN before a kernel runs, so an element it does not write fails the comparison.
"""

import zlib

import pytest
import torch

from diffaccel import kernels
from diffaccel.kernels import _reference as ref
from diffaccel.kernels import use_backend

triton = pytest.importorskip("triton")
tk = pytest.importorskip("diffaccel.kernels.triton_ops")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _gen(*params) -> torch.Generator:
    """A seed of its own per parametrisation."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _x(b, n, c, dtype, g, transposed=False):
    """(b, n, c) random tokens; `transposed`: a non-contiguous view (channels-first storage)."""
    if transposed:
        return torch.randn(b, c, n, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(b, n, c, generator=g).to(dtype)


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def _reduction(rows, n, nd, r, g):
    """A random partition of n tokens per row: nd destinations, r sources folded into random
    destinations, the rest kept; `source`: what each folded source is restored from."""
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(rows)])
    dst, fold, keep = perm[:, :nd], perm[:, nd:nd + r], perm[:, nd + r:]
    target = torch.randint(max(nd, 1), (rows, r), generator=g)
    source = torch.randint(max(n - r, 1), (rows, r), generator=g)
    return keep, dst, fold, target, source


# -- gather / scatter ----------------------------------------------------------------------------

GATHER_CASES = [  # b, n, k, c, idx rows shared by the batch, transposed x
    (1, 1, 1, 1, False, False),  # one token
    (3, 17, 9, 5, False, True),
    (2, 33, 33, 20, True, False),  # every token
    (5, 12, 0, 7, False, False),  # none
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n,k,c,shared,transposed", GATHER_CASES)
def test_gather_kernel(b, n, k, c, shared, transposed, dtype):
    g = _gen("gather", b, n, k, c, dtype)
    x = _x(b, n, c, dtype, g, transposed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(1 if shared else b)])
    out = tk.gather_tokens(x, idx, out=_nan(b, k, c, dtype=dtype), block_r=4, block_c=16)
    assert torch.equal(out, ref.gather_tokens(x, idx))
    with use_backend("triton"):
        assert torch.equal(kernels.gather_tokens(x, idx), ref.gather_tokens(x, idx))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n,k,c", [(1, 1, 1, 1), (3, 19, 6, 9), (2, 10, 10, 33), (3, 8, 0, 4)])
def test_scatter_kernel(b, n, k, c, dtype):
    """ToCa's cache update: the fresh rows are written, every other row of the cache stays."""
    g = _gen("scatter", b, n, k, c, dtype)
    cache = _x(b, n, c, dtype, g)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])
    src = _x(b, k, c, dtype, g)
    expected = ref.scatter_tokens(cache.clone(), idx, src)
    poisoned = ref.scatter_tokens(cache.clone(), idx, _nan(b, k, c, dtype=dtype))
    assert tk.scatter_tokens(poisoned, idx, src, block_r=4, block_c=16) is poisoned
    assert torch.equal(poisoned, expected)
    cache2 = ref.scatter_tokens(cache.clone(), idx, _nan(b, k, c, dtype=dtype))
    with use_backend("triton"):
        assert kernels.scatter_tokens(cache2, idx, src) is cache2
    assert torch.equal(cache2, expected)


def test_scatter_into_strided_cache():
    """The cache may be a view (e.g. one half of a CFG batch laid out channels-first)."""
    g = _gen("scatter-view")
    base = torch.randn(2, 6, 11, generator=g)
    cache = base.transpose(1, 2)  # (2, 11, 6), non-contiguous
    idx = torch.tensor([[0, 4, 10], [3, 5, 7]])
    src = torch.randn(2, 3, 6, generator=g)
    expected = ref.scatter_tokens(cache.clone(), idx, src)
    tk.scatter_tokens(cache, idx, src, block_r=2, block_c=4)
    assert torch.equal(cache, expected)
    assert torch.equal(base.transpose(1, 2), expected)  # written through the view


# -- matching ------------------------------------------------------------------------------------

MATCH_CASES = [  # b, na, nb, c, b rows shared by the batch, transposed a
    (1, 1, 1, 1, False, False),  # one token each
    (3, 37, 21, 19, False, True),  # several row and destination tiles, tails, odd batch
    (2, 5, 40, 8, True, False),
    (1, 16, 48, 40, False, False),  # exact tiles
]


def _check_match(a, b, normalize, vals, idxs, dtype):
    af, bf = a.float(), b.float()
    if normalize:
        af, bf = torch.nn.functional.normalize(af, dim=-1), torch.nn.functional.normalize(bf, dim=-1)
    sim = af @ bf.transpose(1, 2)  # (B, Na, Nb) in float32
    best, arg = sim.max(dim=-1)
    tol = TOL[dtype] * max(1.0, best.abs().max().item())
    assert vals.dtype == dtype and idxs.dtype == torch.int64
    assert torch.allclose(vals.float(), best.to(dtype).float(), rtol=TOL[dtype], atol=tol)
    # the chosen destination is a best one, and the reference's where the best is clear
    assert (sim.gather(-1, idxs[..., None])[..., 0] >= best - tol).all()
    gap = best - sim.topk(2, dim=-1).values[..., 1] if sim.shape[-1] > 1 else torch.full_like(best, 1.0)
    clear = gap > tol
    assert torch.equal(idxs[clear], arg[clear])
    ref_vals, ref_idxs = ref.best_match(a, b, normalize, 1 << 22)
    assert torch.equal(idxs[clear], ref_idxs.expand_as(idxs)[clear])
    assert torch.allclose(vals.float(), ref_vals.float(), rtol=TOL[dtype], atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bsz,na,nb,c,shared,transposed", MATCH_CASES)
def test_best_match_kernel(bsz, na, nb, c, shared, transposed, normalize, dtype):
    g = _gen("match", bsz, na, nb, c, normalize, dtype)
    a = _x(bsz, na, c, dtype, g, transposed)
    b = _x(1 if shared else bsz, nb, c, dtype, g)
    vals, idxs = tk.best_match(a, b, normalize, values=_nan(bsz, na, dtype=dtype),
                               indices=torch.full((bsz, na), -1, dtype=torch.int64), block_m=16, block_n=16,
                               block_k=16)
    _check_match(a, b, normalize, vals, idxs, dtype)


def test_best_match_default_blocks_and_op():
    g = _gen("match-op")
    a, b = torch.randn(2, 70, 24, generator=g), torch.randn(2, 90, 24, generator=g)
    with use_backend("triton"):
        vals, idxs = kernels.best_match(a, b, True)
    _check_match(a, b, True, vals, idxs, torch.float32)


def test_best_match_ties_pick_the_first_index():
    """Equal maxima (duplicate destinations, in one tile and across tiles): the first index wins, as
    torch's max returns. (The interpreter's argmax always breaks ties left, so of the kernel's two tie
    rules this shows the one across tiles; tl.argmax(tie_break_left=True) is the one inside a tile on a GPU.)"""
    g = _gen("ties")
    a = torch.randn(2, 20, 16, generator=g)
    b = torch.randn(2, 40, 16, generator=g)
    b[:, 33] = b[:, 5]  # across tiles of 16
    b[:, 7] = b[:, 6]  # inside one tile
    a[:, :10] = b[:, 5:6] * 3  # rows whose best match is destination 5 (= 33)
    a[:, 10:] = b[:, 6:7] * 2  # ... destination 6 (= 7)
    vals, idxs = tk.best_match(a, b, block_m=16, block_n=16, block_k=16)
    ref_vals, ref_idxs = ref.best_match(a, b, False, 1 << 22)
    assert torch.equal(ref_idxs[:, :10], torch.full((2, 10), 5)) and torch.equal(ref_idxs[:, 10:], torch.full((2, 10), 6))
    assert torch.equal(idxs, ref_idxs)
    assert torch.allclose(vals, ref_vals, rtol=1e-5)


def test_interpreter_bf16_dot_limitation():
    """Triton 3.9's interpreter multiplies bf16 tiles wrongly in tl.dot (loads, stores and casts of bf16
    are right): the matching kernel upcasts bf16 tiles to float32 when interpreting (on a GPU it
    multiplies bf16 natively). This shows the limitation; it passes once the interpreter gets it right."""
    import triton.language as tl

    @triton.jit
    def dot16(a_ptr, b_ptr, o_ptr):
        r = tl.arange(0, 16)
        acc = tl.dot(tl.load(a_ptr + r[:, None] * 16 + r[None, :]), tl.load(b_ptr + r[:, None] * 16 + r[None, :]))
        tl.store(o_ptr + r[:, None] * 16 + r[None, :], acc)

    g = _gen("bf16-dot")
    a, b = torch.randn(16, 16, generator=g).bfloat16(), torch.randn(16, 16, generator=g).bfloat16()
    out = _nan(16, 16)
    dot16[(1,)](a, b, out)
    if not torch.allclose(out, a.float() @ b.float(), atol=1e-3):
        pytest.xfail("Triton's interpreter gets bf16 tl.dot wrong; best_match upcasts bf16 tiles there")


# -- merge / unmerge -----------------------------------------------------------------------------

MERGE_CASES = [  # b, n, nd, r, c, index rows shared by the batch
    (1, 1, 0, 0, 3, False),  # one token, kept
    (1, 1, 1, 0, 3, False),  # one token, a destination
    (3, 29, 7, 12, 9, False),  # odd sizes: several folds per destination
    (2, 20, 5, 0, 17, False),  # r = 0
    (4, 16, 4, 12, 8, True),  # every source folded (nothing kept), index rows shared
    (3, 12, 0, 0, 5, False),  # every token kept
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["mean", "drop"])
@pytest.mark.parametrize("b,n,nd,r,c,shared", MERGE_CASES)
def test_merge_kernel(b, n, nd, r, c, shared, mode, dtype):
    g = _gen("merge", b, n, nd, r, c, mode, dtype)
    x = _x(b, n, c, dtype, g, transposed=c % 2 == 1)
    keep, dst, fold, target, _ = _reduction(1 if shared else b, n, nd, r, g)
    out = tk.merge(x, keep, dst, fold, target, mode, out=_nan(b, n - r, c, dtype=dtype), block_r=4, block_c=4)
    # the kernel sums in float32: compare with the float32 reference, rounded once
    expected = ref.merge(x.float(), keep, dst, fold, target, mode).to(dtype)
    assert torch.allclose(out.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])
    if dtype == torch.float32:
        assert torch.allclose(out, ref.merge(x, keep, dst, fold, target, mode), rtol=1e-6, atol=1e-6)
    if mode == "drop" or not r:  # copies only: exact
        assert torch.equal(out, ref.merge(x, keep, dst, fold, target, mode))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n,nd,r,c,shared", MERGE_CASES)
def test_unmerge_kernel(b, n, nd, r, c, shared, dtype):
    g = _gen("unmerge", b, n, nd, r, c, dtype)
    keep, dst, fold, _, source = _reduction(1 if shared else b, n, nd, r, g)
    y = _x(b, n - r, c, dtype, g, transposed=c % 2 == 1)
    out = tk.unmerge(y, keep, dst, fold, source, n, out=_nan(b, n, c, dtype=dtype), block_r=4, block_c=4)
    assert torch.equal(out, ref.unmerge(y, keep, dst, fold, source, n))


def test_token_reduction_through_the_kernels():
    """ToMe's and SiTo's reductions (tokens.py) give the reference's tokens through the kernels."""
    from diffaccel.tokens import bipartite_soft_matching_2d, random_destinations, similarity_pruning_2d

    g = _gen("tokens")
    x = torch.randn(3, 7 * 9, 12, generator=g)
    tome = bipartite_soft_matching_2d(x, 7, 9, 2, 2, 20, random_destinations(7, 9, 2, 2, g, x.device))
    sito = similarity_pruning_2d(x, 7, 9, 2, 2, 20)
    for red, mode in ((tome, "mean"), (sito, "drop")):
        y = red.reduce(x, mode)
        with use_backend("triton"):
            y_k, restored_k = red.reduce(x, mode), red.restore(y)
        assert torch.allclose(y_k, y, atol=1e-6)
        assert torch.equal(restored_k, red.restore(y))
    with use_backend("triton"):  # the whole matching through the kernels: the same reduction
        tome_k = bipartite_soft_matching_2d(x, 7, 9, 2, 2, 20, random_destinations(7, 9, 2, 2, g, x.device))
        sito_k = similarity_pruning_2d(x, 7, 9, 2, 2, 20)
    assert torch.equal(sito_k.fold_idx, sito.fold_idx) and torch.equal(sito_k.source, sito.source)
    assert tome_k.fold_idx.shape == tome.fold_idx.shape


# -- custom op registrations ---------------------------------------------------------------------


def _op_args(grad: bool):
    g = _gen("opcheck")
    x = torch.randn(2, 13, 6, generator=g, requires_grad=grad)
    keep, dst, fold, target, source = _reduction(2, 13, 3, 5, g)
    y = torch.randn(2, 8, 6, generator=g, requires_grad=grad)
    idx = torch.stack([torch.randperm(13, generator=g)[:4] for _ in range(2)])
    return {
        "gather_tokens": (x, idx),
        "scatter_tokens": (torch.randn(2, 13, 6, generator=g), idx, torch.randn(2, 4, 6, generator=g)),
        "best_match": (torch.randn(2, 9, 6, generator=g), torch.randn(2, 5, 6, generator=g), True, 1 << 22),
        "merge": (x, keep, dst, fold, target, "mean"),
        "merge_drop": (x, keep, dst, fold, target, "drop"),
        "unmerge": (y, keep, dst, fold, source, 13),
    }


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["gather_tokens", "scatter_tokens", "best_match", "merge", "merge_drop", "unmerge"])
def test_opcheck(name, backend):
    op = getattr(torch.ops.diffaccel, name.removesuffix("_drop"))
    with use_backend(backend):
        for grad in (False, True):
            torch.library.opcheck(op, _op_args(grad)[name])


def test_gradients_match_the_reference():
    """gather, merge and unmerge are linear in x: their registered backward is the reference's."""
    args = _op_args(True)
    for name, fn in (("gather_tokens", ref.gather_tokens), ("merge", ref.merge), ("merge_drop", ref.merge),
                     ("unmerge", ref.unmerge)):
        t, *rest = args[name]
        op = getattr(torch.ops.diffaccel, name.removesuffix("_drop"))
        out = op(t, *rest)
        w = torch.randn(out.shape, generator=_gen("w", name))
        (g_op,) = torch.autograd.grad((op(t, *rest) * w).sum(), t)
        (g_ref,) = torch.autograd.grad((fn(t, *rest) * w).sum(), t)
        assert torch.allclose(g_op, g_ref, atol=1e-6), name
    # the public functions record the op's backward when a gradient is needed
    x, *rest = args["merge"]
    out = kernels.merge(x, *rest)
    assert "diffaccel_merge" in type(out.grad_fn).__name__
    w = torch.randn(out.shape, generator=_gen("w-public"))
    (g_pub,) = torch.autograd.grad((out * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref.merge(x, *rest) * w).sum(), x)
    assert torch.allclose(g_pub, g_ref, atol=1e-6)


def test_plain_eager_calls_skip_the_dispatcher_only_when_nothing_needs_it():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffaccel.kernels.ops import plain_eager

    x = torch.randn(2, 3)
    assert plain_eager(x)
    assert not plain_eager(x.clone().requires_grad_())
    with torch.no_grad():
        assert plain_eager(x.clone().requires_grad_())
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2, 5, 3))
        assert not plain_eager(fake)
        out = kernels.merge(fake, torch.tensor([[0, 1]]), torch.tensor([[2]]), torch.tensor([[3, 4]]),
                            torch.tensor([[0, 0]]))
        assert out.shape == (2, 3, 3)


def test_best_match_has_no_gradient():
    a = torch.randn(1, 4, 3, requires_grad=True)
    vals, idxs = kernels.best_match(a, a.detach())
    assert not vals.requires_grad and not idxs.requires_grad


def test_compile_fullgraph_traces_the_ops():
    """torch.compile(fullgraph=True) traces every op (fake implementations), the in-place scatter
    included, and gives eager's result."""

    def f(x, cache, idx, keep, dst, fold, target, source):
        fresh = kernels.gather_tokens(x, idx)
        kernels.scatter_tokens(cache, idx, fresh * 2)
        _, match = kernels.best_match(x, x[:, :3], True)
        y = kernels.merge(x, keep, dst, fold, target, "mean")
        return kernels.unmerge(y + 1, keep, dst, fold, source, x.shape[1]) + match[..., None], cache * 1

    g = _gen("compile")
    x = torch.randn(2, 13, 6, generator=g)
    keep, dst, fold, target, source = _reduction(2, 13, 3, 5, g)
    idx = torch.stack([torch.randperm(13, generator=g)[:4] for _ in range(2)])
    cache = torch.randn(2, 13, 6, generator=g)
    eager = f(x, cache.clone(), idx, keep, dst, fold, target, source)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    cache_c = cache.clone()
    out = compiled(x, cache_c, idx, keep, dst, fold, target, source)
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    assert torch.equal(cache_c, eager[1])  # the cache was updated in place


# -- dispatch ------------------------------------------------------------------------------------


def test_cpu_default_is_the_reference_bit_for_bit(monkeypatch):
    """On CPU, with no override, the ops run the torch reference (the code tokens.py ran before)."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.backend("cpu")[0] == "reference"
    g = _gen("cpu-default")
    x = torch.randn(3, 29, 9, generator=g)
    keep, dst, fold, target, source = _reduction(3, 29, 7, 12, g)
    assert torch.equal(kernels.merge(x, keep, dst, fold, target), ref.merge(x, keep, dst, fold, target, "mean"))
    y = x[:, :17]
    assert torch.equal(kernels.unmerge(y, keep, dst, fold, source, 29), ref.unmerge(y, keep, dst, fold, source, 29))
    a, b = x[:, :20], x[:, 20:]
    for got, want in zip(kernels.best_match(a, b, tile=30), ref.best_match(a, b, False, 30)):
        assert torch.equal(got, want)


def test_env_var_and_use_backend_choose(monkeypatch):
    calls = []
    real = tk.gather_tokens
    monkeypatch.setattr(tk, "gather_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, idx = torch.randn(2, 5, 3), torch.tensor([[4, 0], [1, 2]])

    monkeypatch.setenv(kernels.ENV, "triton")
    assert kernels.backend("cpu") == ("triton", "DIFFACCEL_KERNELS=triton")
    kernels.gather_tokens(x, idx)
    assert len(calls) == 1

    monkeypatch.setenv(kernels.ENV, "reference")  # read at each call
    assert kernels.backend("cuda") == ("reference", "DIFFACCEL_KERNELS=reference")
    assert torch.equal(kernels.gather_tokens(x, idx), ref.gather_tokens(x, idx))
    assert len(calls) == 1
    with use_backend("triton"):  # the context manager wins over the variable
        kernels.gather_tokens(x, idx)
    assert len(calls) == 2

    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.backend("cpu")[0] == "reference"
    assert kernels.backend("cuda")[0] == "triton"  # triton imports here
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="DIFFACCEL_KERNELS"):
        kernels.backend("cpu")
    monkeypatch.setenv(kernels.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="interpreter"):
        kernels.gather_tokens(x, idx)
