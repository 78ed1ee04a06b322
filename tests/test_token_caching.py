"""Token-wise caching (ToCa, DuCa): the cycle, token-partial compute that is real (fewer tokens enter
the sub-layer, the fresh rows equal a full computation, the others are the cached ones), the fresh-
token scores, CFG sharing, composition, cache accounting and errors. The contract suite
(test_contract.py) runs both over every family as well."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import diffaccel
from diffaccel import accelerate_pipeline, describe, is_accelerated, remove_acceleration
from diffaccel.api import installation
from diffaccel.methods.toca import ToCaConfig

ALL_KINDS = {"self_attn": 1.0, "cross_attn": 1.0, "ff": 1.0}


def site_log(pipe):
    """{site name: {step: (tokens, computed, keys_values)}} of the last run."""
    out = {}
    for s in describe(pipe)["denoisers"][0]["sites"]:
        out[s["name"]] = {int(k): (v["tokens"], v["computed"], v["keys_values"]) for k, v in s["last_run"].items()}
    return out


def capture(pipe, kinds=("self_attn", "cross_attn", "ff")):
    """Record, per site and call, the site's input, its returned output, and the token count its
    first Linear saw (what actually ran)."""
    st = installation(pipe).denoisers[0]
    rec, handles = {}, []
    for hook in st.hooks:
        if hook.site.kind not in kinds:
            continue
        name, module = hook.site.name, hook.site.module
        r = rec[name] = {"site": hook.site, "inputs": [], "outputs": [], "ran": []}
        handles.append(module.register_forward_pre_hook(
            lambda m, a, k, r=r: r["inputs"].append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True,
            prepend=True))
        handles.append(module.register_forward_hook(
            lambda m, a, k, o, r=r: r["outputs"].append(o.clone()), with_kwargs=True))
        first = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
        handles.append(first.register_forward_pre_hook(lambda m, a, r=r: r["ran"].append(a[0].shape[1])))
    return rec, handles


def test_toca_cycle_and_token_partial_compute_is_real(make_case):
    case = make_case("pixart")
    accelerate_pipeline(case.pipe, "toca", interval=3, fresh_ratio=0.25, kind_weights=ALL_KINDS, step_weight=0.0,
                        depth_weight=0.0)
    rec, handles = capture(case.pipe)
    case.run(steps=4)  # batched CFG: each call carries both halves
    for h in handles:
        h.remove()
    log = site_log(case.pipe)
    assert rec
    for name, r in rec.items():
        n = r["inputs"][0].shape[1]
        k = round(0.25 * n)
        site = r["site"]
        assert [log[name][s][1] for s in range(4)] == [n, k, k, n], name  # full, partial, partial, full
        # what ran: all tokens at full steps, only the fresh ones at the others (the query projection
        # of attention; keys/values of self-attention still come from every token)
        assert r["ran"] == [n, k, k, n], (name, r["ran"])
        module = site.module
        for s in (1, 2):
            x, out = r["inputs"][s], r["outputs"][s]
            prev = r["outputs"][s - 1]
            with torch.no_grad():
                full = module(x, encoder_hidden_states=None) if site.kind == "self_attn" else None
            changed = (out != prev).any(dim=-1)  # (B, N) rows written at this step
            assert changed.sum(dim=1).le(k).all()
            # both CFG halves got the same fresh tokens
            half = out.shape[0] // 2
            assert torch.equal(changed[:half], changed[half:]) or not changed.any()
            if full is not None:  # fresh rows equal a full self-attention over every token
                rows = changed[0].nonzero().flatten()
                torch.testing.assert_close(out[:, rows], full[:, rows], atol=1e-5, rtol=1e-4)
            # the others kept the stored output exactly
            assert torch.equal(out[~changed], prev[~changed])
    remove_acceleration(case.pipe)


def test_toca_feed_forward_fresh_rows_equal_the_full_computation(make_case):
    case = make_case("dit")
    accelerate_pipeline(case.pipe, "toca", interval=4, fresh_ratio=0.5, step_weight=0.0, depth_weight=0.0,
                        kind_weights={"ff": 1.0})
    rec, handles = capture(case.pipe, kinds=("ff",))
    case.run(steps=4)
    for h in handles:
        h.remove()
    for r in rec.values():
        module = r["site"].module
        for s in (1, 2, 3):
            out, prev, x = r["outputs"][s], r["outputs"][s - 1], r["inputs"][s]
            with torch.no_grad():
                full = module(x)
            fresh = (out != prev).any(dim=-1)
            assert fresh.any()
            torch.testing.assert_close(out[fresh], full[fresh], atol=1e-5, rtol=1e-4)
            assert torch.equal(out[~fresh], prev[~fresh])


@pytest.mark.parametrize("aggressive", ["blocks", "sublayers"])
def test_duca_cycle_full_conservative_aggressive(make_case, aggressive):
    case = make_case("pixart")
    accelerate_pipeline(case.pipe, "duca", interval=4, fresh_ratio=0.25, kind_weights=ALL_KINDS, step_weight=0.0,
                        depth_weight=0.0, aggressive=aggressive)
    rec, handles = capture(case.pipe)
    blocks, norms = {}, []
    for i, block in enumerate(case.pipe.transformer.transformer_blocks):
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: blocks.setdefault(i, []).append(o.clone())))
        handles.append(block.norm1.register_forward_hook(lambda m, a, o, i=i: norms.append(i)))
    case.run(steps=5)
    for h in handles:
        h.remove()
    log = site_log(case.pipe)
    for name, r in rec.items():
        n = r["inputs"][0].shape[1]
        k = round(0.25 * n)
        # full, conservative, aggressive, conservative, full
        assert [log[name][s][1] for s in range(5)] == [n, k, 0, k, n], name
        assert r["ran"] == [n, k, k, n], name  # nothing ran at the aggressive step
        if aggressive == "sublayers":  # the sub-layer was called and handed back its stored output
            assert torch.equal(r["outputs"][2], r["outputs"][1])
        else:  # the sub-layer was not even called
            assert len(r["outputs"]) == 4
    for i, outs in blocks.items():
        assert len(outs) == 5
        if aggressive == "blocks":  # the whole block handed back its output of the step before
            assert torch.equal(outs[2], outs[1]), i
        else:  # the block ran: its residual stream moved with the new input
            assert not torch.equal(outs[2], outs[1]), i
    # the blocks' own modulation/norms ran at 4 of 5 steps with whole-block reuse, at every step otherwise
    depth = len(blocks)
    assert len(norms) == depth * (4 if aggressive == "blocks" else 5)
    d = describe(case.pipe)
    assert d["methods"][0]["aggressive"] == aggressive
    whole = d["denoisers"][0]["whole_blocks"]
    assert len(whole) == (depth if aggressive == "blocks" else 0)
    assert (f"whole-block reuse: {depth} blocks" in str(d)) == (aggressive == "blocks")
    remove_acceleration(case.pipe)


def test_duca_block_reuse_needs_every_sub_layer_of_the_block(make_case):
    """A policy that leaves a sub-layer of a block out keeps the block running on aggressive steps
    (the left-out sub-layer is computed as usual); the others reuse their outputs one by one."""
    case = make_case("pixart")
    policy = {"rules": [{"select": {"kind": "ff"}, "params": {"interval": 4, "fresh_ratio": 0.25}}]}
    accelerate_pipeline(case.pipe, "duca", policy=policy)
    rec, handles = capture(case.pipe, kinds=("ff",))
    attn_calls = []
    block = case.pipe.transformer.transformer_blocks[0]
    handles.append(block.attn1.register_forward_hook(lambda m, a, k, o: attn_calls.append(1), with_kwargs=True))
    case.run(steps=3)
    for h in handles:
        h.remove()
    assert len(attn_calls) == 3  # the self-attention ran at every step, the aggressive one included
    for r in rec.values():
        assert len(r["outputs"]) == 3 and torch.equal(r["outputs"][2], r["outputs"][1])
    remove_acceleration(case.pipe)


@pytest.mark.parametrize("score", ["change", "vnorm", "random", "attention", "entropy"])
def test_every_score_selects_the_scheduled_count(make_case, score, monkeypatch):
    from diffaccel.tokens import AttentionProbe

    probes = []
    original = AttentionProbe.__init__
    monkeypatch.setattr(AttentionProbe, "__init__", lambda self, stat: probes.append(self) or original(self, stat))
    case = make_case("pixart")
    accelerate_pipeline(case.pipe, "toca", interval=3, fresh_ratio=0.3, score=score, kind_weights=ALL_KINDS,
                        step_weight=0.0, depth_weight=0.0)
    out = case.run(steps=3)
    assert torch.isfinite(out).all()
    for name, steps in site_log(case.pipe).items():
        n = steps[0][0]
        assert steps[1][1] == steps[2][1] == int(0.3 * n), name
    blocks = len(case.pipe.transformer.transformer_blocks)
    # the statistics are read from the attention the processor runs: the self-attention's at the full
    # step; the cross-attention's at the full step and whenever it computes fresh tokens
    expected = {"attention": ["received"] * blocks, "vnorm": ["vnorm"] * blocks,
                "entropy": ["entropy"] * blocks * 3}.get(score, [])
    assert [p.stat for p in probes if p.result is not None] == expected
    notes = [s["last_run_note"] for s in describe(case.pipe)["denoisers"][0]["sites"]]
    assert not any(notes), notes  # every block had the score's source
    assert torch.equal(case.run(steps=3), out)  # deterministic


def test_attention_scores_follow_the_reference_statistics(make_case, monkeypatch):
    """The stored statistics equal a direct computation from the sub-layer's projections: attention
    received (softmax column sums, averaged over heads), DuCa's sum over heads of (1 - |v_h|), and the
    entropy of each image query's head-averaged attention over the text (its key mask applied)."""
    from diffaccel.methods.toca import TokenwiseCache

    seen = {}
    prepare = TokenwiseCache.prepare_compute

    def spy(self, site, ctx, params, call):
        prepare(self, site, ctx, params, call)
        if call.arounds:
            probe, result = call.arounds[-1], []
            # (restores run last to first: this one after the method's own, before later steps update rows)
            call.restores.insert(0, lambda out: result.append(probe.result.clone()) or out)
            seen.setdefault(self.score, []).append((site, call.hidden.clone(), dict(call.kwargs), result))

    monkeypatch.setattr(TokenwiseCache, "prepare_compute", spy)
    for score in ("attention", "vnorm", "entropy"):
        case = make_case("pixart")
        accelerate_pipeline(case.pipe, "toca", score=score)
        case.run(steps=2)
        site, x, kwargs, result = seen[score][0]
        m = site.module
        b, n, _ = x.shape
        with torch.no_grad():
            q = m.to_q(x).view(b, n, m.heads, -1).transpose(1, 2)
            ctx = kwargs.get("encoder_hidden_states", x) if score == "entropy" else x
            k = m.to_k(ctx).view(b, ctx.shape[1], m.heads, -1).transpose(1, 2)
            v = m.to_v(ctx).view(b, ctx.shape[1], m.heads, -1)
            logits = q @ k.transpose(-1, -2) * m.scale
            if score == "entropy":
                mask = kwargs["attention_mask"]  # (B, 1, T) additive bias over the text keys
                logits = logits + mask[:, None]
            p = logits.softmax(-1).mean(1)
        want = {"attention": p.sum(1), "vnorm": (1 - v.norm(dim=-1)).sum(-1),
                "entropy": -(p * torch.log(p + 1e-7)).sum(-1)}[score]
        torch.testing.assert_close(result[0], want, atol=1e-4, rtol=1e-4)


def test_change_score_refreshes_the_tokens_that_moved():
    from types import SimpleNamespace

    from diffaccel.methods.base import CacheEntry
    from diffaccel.sites import Site

    cfg = ToCaConfig(staleness_weight=0.0, cell=0)
    site = Site("x", "ff", torch.nn.Identity(), "b", 0)
    ctx = SimpleNamespace(cfg_batched=False, branch="cond", block_inputs={}, state={}, step=1, geometry=None)
    x = torch.randn(2, 10, 4)
    entry = CacheEntry(torch.zeros(2, 10, 4), 0, ())
    cfg.init_entry(site, ctx, {}, entry, x)
    moved = x.clone()
    moved[0, 3] += 5
    moved[1, 7] += 5
    score = cfg.primary_score(site, ctx, entry, moved)
    assert score[0].argmax() == 3 and score[1].argmax() == 7


def test_cell_bonus_is_the_references_local_selection_with_bonus():
    """local_selection_with_bonus: the best token of each cell gets cell_weight x its score; with a
    large weight the top-k covers the cells, not only the best region."""
    from types import SimpleNamespace

    from diffaccel.sites import Geometry, Site

    site = Site("x", "ff", torch.nn.Identity(), "b", 0)
    ctx = SimpleNamespace(geometry=Geometry(1, 4, 4))
    score = torch.rand(3, 16) + 0.5
    score[:, :8] += 10  # the top half of the grid scores far higher
    bonus = ToCaConfig(cell=2, cell_weight=0.4).cell_bonus(site, ctx, score)
    cells = score.view(3, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(3, 4, 4)
    best, where = cells.max(-1)
    want = torch.zeros_like(cells).scatter_(-1, where[..., None], 0.4 * best[..., None])
    torch.testing.assert_close(bonus, want.view(3, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(3, 16))
    bonus = ToCaConfig(cell=2, cell_weight=100.0).cell_bonus(site, ctx, score)
    picked = torch.topk(score + bonus, 4, dim=1).indices
    cells = {(int(i) // 4 // 2, int(i) % 4 // 2) for i in picked[0]}
    assert cells == {(0, 0), (0, 1), (1, 0), (1, 1)}  # one per 2x2 cell, not four from the top
    # odd grids: partial cells at the edges count as cells of their own
    odd = ToCaConfig(cell=2).cell_bonus(site, SimpleNamespace(geometry=Geometry(1, 3, 3)), torch.rand(1, 9))
    assert (odd > 0).sum() == 4


def test_primary_scores_are_l2_normalised_below_the_staleness_bonus():
    """The reference L2-normalises the importance score over the tokens, so on a real grid a token's
    importance is worth little beside the staleness bonus (0.25 per interval waited): the fresh tokens
    rotate over the image. (Dividing by the row maximum, as before, put importance far above it.)"""
    from types import SimpleNamespace

    from diffaccel.methods.base import CacheEntry
    from diffaccel.sites import Site

    site = Site("x", "ff", torch.nn.Identity(), "b", 0)
    ctx = SimpleNamespace(cfg_batched=False, branch="cond", state_branch="cond", state={}, step=1, geometry=None,
                          notes={})
    x = torch.randn(2, 1024, 8)
    for score in ("change", "vnorm", "attention", "entropy"):
        cfg = ToCaConfig(score=score)
        entry = CacheEntry(torch.zeros(2, 1024, 8), 0, ())
        cfg.init_entry(site, ctx, {}, entry, x)
        ctx.state[(score, "cond", "b")] = torch.rand(2, 1024) + 0.5
        primary = cfg.primary_score(site, ctx, entry, x + 0.1 * torch.randn_like(x))
        torch.testing.assert_close(primary.norm(dim=1), torch.ones(2))
        assert primary.abs().mean() < 0.5 * 0.25 / 3  # one step of waiting outweighs a typical token's importance


@pytest.mark.parametrize("name", ["toca", "duca"])
def test_warmup_steps_are_full_and_the_last_begins_the_first_cycle(make_case, name):
    # flux-ToCa's setting: interval 4, first 3 steps full, then cached steps at once (3, 4, 5), full at 6
    case = make_case("flux")
    base = case.run(steps=3)
    accelerate_pipeline(case.pipe, name, interval=4, fresh_ratio=0.25, warmup=3, kind_weights=ALL_KINDS,
                        step_weight=0.0, depth_weight=0.0)
    assert torch.equal(case.run(steps=3), base)  # a run no longer than its warm-up is the baseline
    case.run(steps=8)
    for name_, steps in site_log(case.pipe).items():
        n = steps[2][0]
        full = {s for s, (tokens, computed, _) in steps.items() if computed == tokens}
        assert 0 not in steps and 1 not in steps, name_  # idle warm-up steps are not logged
        assert full == {2, 6}, (name_, steps)  # step 2 (the warm-up's last) and 6 begin cycles
        assert all(steps[s][1] < n for s in (3, 4, 5, 7)), name_


def test_separate_cfg_calls_keep_separate_caches(make_case):
    case = make_case("flux")
    accelerate_pipeline(case.pipe, "toca", interval=3)
    seen = []
    st = installation(case.pipe).denoisers[0]
    original = st.tracker.store
    st.tracker.store = lambda key, entry: seen.append(key[0]) or original(key, entry)
    case.run(steps=3, guidance=True)
    assert {"cond", "uncond"} <= set(seen)
    assert describe(case.pipe)["denoisers"][0]["cache"]["entries"] == 0  # released at the end of the run


def test_cache_size_is_reported_and_released(make_case):
    case = make_case("pixart")
    accelerate_pipeline(case.pipe, "toca")
    case.run(steps=3)
    cache = describe(case.pipe)["denoisers"][0]["cache"]
    assert cache["entries"] == 0 and cache["bytes"] == 0 and cache["peak_bytes"] > 0


def test_toca_composes_with_todo_and_refuses_tome(make_case):
    case = make_case("sd1")
    base = case.run(steps=3)
    accelerate_pipeline(case.pipe, ["toca", "todo"], kind_weights=ALL_KINDS)
    out = case.run(steps=3)
    assert not torch.equal(out, base)
    log = site_log(case.pipe)
    top = [v for name, v in log.items() if name.endswith("attn1") and "down_blocks.0" in name]
    assert top and all(v[1][1] < v[1][0] and v[1][2] < v[1][0] for v in top)  # fresh queries, pooled keys
    remove_acceleration(case.pipe)
    assert torch.equal(case.run(steps=3), base)
    with pytest.raises(ValueError, match="toca and tome would both reduce the tokens|tome and toca would both"):
        accelerate_pipeline(case.pipe, ["toca", "tome"], kind_weights=ALL_KINDS)
    with pytest.raises(ValueError, match="would both cache"):
        accelerate_pipeline(case.pipe, ["toca", "fora"])
    assert torch.equal(case.run(steps=3), base)


@pytest.mark.parametrize("method", ["toca", "duca"])
def test_token_caching_saves_flops(make_case, method):
    case = make_case("pixart")
    with FlopCounterMode(display=False) as base:
        case.run(steps=6)
    accelerate_pipeline(case.pipe, method)
    with FlopCounterMode(display=False) as cached:
        case.run(steps=6)
    assert cached.get_total_flops() < 0.8 * base.get_total_flops()


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"fresh_ratio": 1.5}, ValueError, r"ToCaConfig.fresh_ratio must be in \[0.0, 1.0\]"),
    ({"interval": 0}, ValueError, r"ToCaConfig.interval must be in \[1, 1000\]"),
    ({"score": "entropi"}, ValueError,
     r"ToCaConfig.score must be one of \['change', 'vnorm', 'random', 'attention', 'entropy'\]"),
    ({"stream_weights": {3: 1.0}}, TypeError, r"stream_weights keys are block-list names"),
    ({"interval_weight": 1.0}, ValueError, r"ToCaConfig.interval_weight must be in \[-0.99, 0.99\]"),
    ({"kind_weights": {"mlp": 1.0}}, ValueError, r"kind_weights key must be one of \['self_attn', 'cross_attn', 'ff'\]"),
    ({"policy": {"rules": [{"params": {"ratio": 0.5}}]}}, ValueError, r"policy sets \['ratio'\], which toca"),
    ({"policy": {"rules": [{"params": {"fresh_ratio": 2}}]}}, ValueError, r"fresh_ratio must be in \[0.0, 1.0\]"),
])
def test_toca_bad_input_is_refused(make_case, kwargs, exc, match):
    case = make_case("pixart")
    base = case.run(steps=2)
    with pytest.raises(exc, match=match):
        accelerate_pipeline(case.pipe, "toca", **kwargs)
    assert not is_accelerated(case.pipe) and torch.equal(case.run(steps=2), base)


def test_configs_are_exported_and_round_trip():
    for cls in (diffaccel.ToCaConfig, diffaccel.DuCaConfig):
        cfg = cls(interval=4, fresh_ratio=0.1, warmup=3)
        d = cfg.to_dict()
        assert d["method"] == cls.name and d["interval"] == 4 and d["fresh_ratio"] == 0.1
        assert hash(cfg) == hash(cls(interval=4, fresh_ratio=0.1, warmup=3))


def test_image_and_text_feed_forwards_of_a_block_choose_apart(make_case, monkeypatch):
    """Only feed-forwards that see the same tokens share a fresh set: a double-stream block's image and
    text feed-forwards choose their own, even when the text is as long as the image."""
    from diffaccel.methods.toca import TokenwiseCache

    picks, refresh = {}, TokenwiseCache.refresh

    def recording(self, site, ctx, params, entry, call):
        refresh(self, site, ctx, params, entry, call)
        picks.setdefault(site.name, []).append((entry.extra["staleness"] == 0).nonzero().tolist())

    monkeypatch.setattr(TokenwiseCache, "refresh", recording)
    case = make_case("flux")
    accelerate_pipeline(case.pipe, "toca", fresh_ratio=0.3, kind_weights={"ff": 1.0}, step_weight=0.0,
                        depth_weight=0.0, cell=0)
    text = torch.randn(1, 256, 32, generator=torch.Generator().manual_seed(1))  # 256 text tokens, 256 image
    case.pipe(prompt_embeds=text, pooled_prompt_embeds=torch.randn(1, 32), num_inference_steps=3, height=256,
              width=256, output_type="latent")
    image, words = picks["transformer_blocks.0.ff"], picks["transformer_blocks.0.ff_context"]
    assert len(image) == len(words) == 2 and image != words
