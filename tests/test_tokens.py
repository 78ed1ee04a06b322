import pytest
import tomesd.merge
import torch
import torch.nn.functional as F

from diffaccel.tokens import (
    best_match,
    bipartite_soft_matching_2d,
    cell_partition,
    pool_tokens,
    random_destinations,
    similarity_pruning_2d,
)


def _x(b, n, c, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("h,w", [(8, 8), (7, 5), (6, 9), (1, 4)])
def test_cell_partition_covers_every_token_once(h, w):
    choice = torch.randint(4, (1, h // 2, w // 2), generator=torch.Generator().manual_seed(1))
    dst, src = cell_partition(h, w, 2, 2, choice)
    assert dst.shape[1] == (h // 2) * (w // 2)
    allidx = torch.cat([dst, src], 1).sort(dim=1).values
    assert torch.equal(allidx[0], torch.arange(h * w))
    # each destination lies inside its own cell
    for k, pos in enumerate(dst[0].tolist()):
        r, c = divmod(pos, w)
        assert (r // 2, c // 2) == divmod(k, w // 2)


def test_best_match_tiled_equals_dense():
    a, b = _x(2, 300, 16, 1), _x(2, 70, 16, 2)
    v_dense, i_dense = (a @ b.transpose(1, 2)).max(-1)
    v, i = best_match(a, b, tile=70 * 7)  # 7 rows per tile
    assert torch.equal(i, i_dense)
    assert torch.allclose(v, v_dense)


@pytest.mark.parametrize("h,w,r", [(16, 16, 128), (16, 12, 60), (8, 8, 48), (8, 8, 500)])
def test_tome_matches_tomesd(h, w, r):
    """Same inputs and the same destination draw as tomesd -> the same merge and unmerge."""
    x = _x(2, h * w, 24, 3)
    g_ref = torch.Generator().manual_seed(42)
    ref_merge, ref_unmerge = tomesd.merge.bipartite_soft_matching_random2d(x, w, h, 2, 2, r, generator=g_ref)
    choice = random_destinations(h, w, 2, 2, torch.Generator().manual_seed(42), x.device)
    red = bipartite_soft_matching_2d(x, h, w, 2, 2, r, choice)
    ours, ref = red.reduce(x, "mean"), ref_merge(x, mode="mean")
    assert ours.shape == ref.shape
    # same merged tokens (tomesd's destination order comes from an unstable argsort: compare as sets)
    key = torch.arange(24, dtype=x.dtype)
    assert torch.allclose((ours @ key).sort(dim=1).values, (ref @ key).sort(dim=1).values, atol=1e-5)

    def f(t):
        return torch.tanh(t) * 2 + 1  # any token-wise sub-layer

    assert torch.allclose(red.restore(f(ours)), ref_unmerge(f(ref)), atol=1e-6)


def test_tome_zero_ratio_is_identity_and_unmerge_copies_destination():
    x = _x(1, 64, 8)
    choice = random_destinations(8, 8, 2, 2, None, x.device)
    red0 = bipartite_soft_matching_2d(x, 8, 8, 2, 2, 0, choice)
    assert torch.equal(red0.restore(red0.reduce(x)), x)
    red = bipartite_soft_matching_2d(x, 8, 8, 2, 2, 20, choice)
    y = red.reduce(x)
    assert y.shape[1] == 64 - 20
    out = red.restore(y)
    # folded tokens take their destination's (merged) value
    dst_vals = y[:, -red.dst_idx.shape[1]:]
    assert torch.equal(out[0, red.fold_idx[0]], dst_vals[0, red.fold_target[0]])


def sito_dense_reference(x, h, w, r, noise):
    """SiTo's code with its N x N cosine graph (sito.py, prune_and_recover_tokens): score = summed
    similarity + noise; one base per 2 x 2 cell (its max score); the r non-base tokens most similar to
    a base are pruned; each pruned token is recovered from its most similar kept token."""
    unit = F.normalize(x, dim=-1)
    graph = unit @ unit.transpose(1, 2)
    score = graph.sum(-1) + noise
    cells = score.view(-1, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, h * w // 4, 4)
    dst, src = cell_partition(h, w, 2, 2, cells.argmax(-1).view(-1, h // 2, w // 2))
    dst, src = dst.expand(x.shape[0], -1), src.expand(x.shape[0], -1)
    to_base = graph.gather(1, src[..., None].expand(-1, -1, h * w)).gather(2, dst[:, None].expand(-1, src.shape[1], -1))
    order = to_base.max(-1).values.argsort(-1, descending=True)
    pruned, unpruned = src.gather(1, order[:, :r]), src.gather(1, order[:, r:])
    kept = torch.cat([unpruned, dst], 1)
    source = graph.gather(1, pruned[..., None].expand(-1, -1, h * w)).gather(2, kept[:, None].expand(-1, r, -1))
    return dst, pruned, kept.gather(1, source.argmax(-1))


def test_sito_scores_without_nxn_match_dense_reference():
    x = _x(2, 256, 16, 5)
    noise = 0.1 * torch.randn((1, 256), generator=torch.Generator().manual_seed(7))
    red = similarity_pruning_2d(x, 16, 16, 2, 2, 100, noise=0.1, generator=torch.Generator().manual_seed(7))
    dst, pruned, restored_from = sito_dense_reference(x, 16, 16, 100, noise)
    assert torch.equal(red.dst_idx, dst)
    assert torch.equal(red.fold_idx.sort(1).values, pruned.sort(1).values)
    y = red.reduce(x, "drop")
    assert y.shape[1] == 256 - 100
    out = red.restore(y)
    # each pruned token took the input-side value of its most similar kept token (a base or not)
    for b in range(2):
        for i, token in enumerate(pruned[b]):
            assert torch.equal(out[b, token], x[b, restored_from[b, i]])
    from_base = torch.isin(restored_from, dst).float().mean()
    assert 0.3 < from_base < 0.95  # kept non-base tokens serve too, as in SiTo's code
    kept = torch.cat([red.keep_idx, red.dst_idx], 1)
    assert torch.equal(out.gather(1, kept[..., None].expand(-1, -1, 16)), x.gather(1, kept[..., None].expand(-1, -1, 16)))


def test_sito_noise_does_not_depend_on_the_batch():
    """Each row's reduction is the one it gets alone: the noise is one draw per token, shared."""
    x = _x(3, 256, 16, 9)
    together = similarity_pruning_2d(x, 16, 16, 2, 2, 100, 0.1, torch.Generator().manual_seed(3))
    for b in range(3):
        alone = similarity_pruning_2d(x[b:b + 1], 16, 16, 2, 2, 100, 0.1, torch.Generator().manual_seed(3))
        assert torch.equal(alone.fold_idx[0], together.fold_idx[b]) and torch.equal(alone.source[0], together.source[b])


def test_sito_noise_is_seeded():
    x = _x(1, 64, 8)
    a = similarity_pruning_2d(x, 8, 8, 2, 2, 20, 0.5, torch.Generator().manual_seed(3))
    b = similarity_pruning_2d(x, 8, 8, 2, 2, 20, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a.dst_idx, b.dst_idx) and torch.equal(a.fold_idx, b.fold_idx)


@pytest.mark.parametrize("mode", ["nearest-exact", "nearest", "bilinear", "bicubic", "avg", "max"])
@pytest.mark.parametrize("frames,h,w,f,expect", [(1, 16, 16, 2, 64), (1, 15, 9, 2, 40), (2, 8, 8, 2, 32),
                                                  (1, 12, 12, 3, 16), (1, 16, 16, 1.5, 121)])
def test_pool_tokens_shapes(mode, frames, h, w, f, expect):
    x = _x(2, frames * h * w, 4)
    assert pool_tokens(x, frames, h, w, f, mode).shape == (2, expect, 4)


def test_pool_tokens_values():
    x = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid
    assert pool_tokens(x, 1, 4, 4, 2, "avg").flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_tokens(x, 1, 4, 4, 2, "max").flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
    assert pool_tokens(x, 1, 4, 4, 2, "nearest-exact").flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
    assert pool_tokens(x, 1, 4, 4, 2, "nearest").flatten().tolist() == [0.0, 2.0, 8.0, 10.0]
    assert pool_tokens(x, 1, 4, 4, 2, "bilinear").flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_tokens(x, 1, 4, 4, 2, "bicubic").shape == (1, 4, 1)
    with pytest.raises(ValueError, match=r"one of \['nearest-exact', 'nearest', 'bilinear', 'bicubic', 'avg', 'max'\]"):
        pool_tokens(x, 1, 4, 4, 2, "linear")


@pytest.mark.parametrize("options", [{}, {"merge_crossattn": True, "merge_mlp": True}, {"ratio": 0.7}])
def test_tome_on_a_unet_agrees_with_tomesd(options):
    """Whole U-Net, fixed destinations: ToMe through hooks equals tomesd's patched blocks."""
    import tomesd

    from diffaccel import accelerate_pipeline, remove_acceleration
    from diffaccel.testing import sd1_unet

    torch.manual_seed(0)
    unet = sd1_unet().eval()
    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([300]), torch.randn(2, 8, 32)
    ratio = options.get("ratio", 0.5)
    extra = {k: v for k, v in options.items() if k != "ratio"}
    with torch.no_grad():
        base = unet(x, t, ctx).sample
        tomesd.apply_patch(unet, ratio=ratio, use_rand=False, **extra)
        ref = unet(x, t, ctx).sample
        tomesd.remove_patch(unet)
        accelerate_pipeline(unet, "tome", ratio=ratio, use_rand=False, **extra)
        ours = unet(x, t, ctx).sample
        remove_acceleration(unet)
    assert (ref - base).abs().max() > 1e-2  # merging did change the output
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_pooled_attention_keeps_masks_binary_whatever_the_mode():
    from diffaccel.tokens import ImageSpan, PooledAttention

    mask = torch.zeros(2, 1, 1, 16)
    mask[..., 5] = float("-inf")  # one padded key on a 4 x 4 grid
    for mode in ("bilinear", "bicubic", "avg", "nearest-exact"):
        pooled = PooledAttention(ImageSpan((1, 4, 4)), 2, mode)._pool_mask(mask)
        assert pooled.shape == (2, 1, 1, 4)
        assert not pooled.isnan().any() and set(pooled.unique().tolist()) <= {0.0, float("-inf")}


def test_attention_probe_reads_grouped_query_attention():
    from diffaccel.tokens import AttentionProbe

    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    probe = AttentionProbe("received")
    with probe:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    p = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) / 8 ** 0.5).softmax(-1).mean(1)
    torch.testing.assert_close(probe.result, p.sum(1))


@pytest.mark.parametrize("stat", ["received", "entropy"])
def test_attention_probe_hands_back_the_attention_it_computed(stat):
    """The map's probabilities also give the output, as the references compute attention explicitly:
    no second pass over the scores, and the same output as scaled_dot_product_attention."""
    from diffaccel.tokens import AttentionProbe

    q, k, v = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    mask = torch.zeros(2, 1, 1, 40)
    mask[1, ..., :7] = float("-inf")
    probe = AttentionProbe(stat)
    with probe:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-4)
    assert probe.result.shape == (2, 40)
