"""Token merging, downsampling and pruning on transformer families with joint text+image sequences,
rotary embeddings and video grids: only image tokens are touched, positions travel with them, ToDo
pools keys after the rotary embedding, cells and pooling windows span frames, and the cost model."""

import pytest
import torch
import torch.nn.functional as F

import diffaccel
from diffaccel import ToMeConfig, accelerate_pipeline, describe, remove_acceleration
from diffaccel.cost import pooling_estimate, reduction_estimate
from diffaccel.testing import last_geometry, recorded_reductions
from diffaccel.tokens import (
    ImageSpan,
    PooledAttention,
    bipartite_soft_matching_2d,
    cell_partition,
    pool_tokens,
    random_destinations,
    similarity_pruning_2d,
)


def _x(b, n, c, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed))


# -- grids: counts and positions -------------------------------------------------------------------


@pytest.mark.parametrize("f,h,w,st", [(1, 7, 5, 1), (3, 6, 9, 2), (5, 4, 4, 2), (2, 5, 3, 1), (4, 3, 7, 4)])
def test_video_cells_cover_every_token_once_and_destinations_stay_in_their_cell(f, h, w, st):
    choice = random_destinations(h, w, 2, 2, torch.Generator().manual_seed(1), torch.device("cpu"), f, st)
    dst, src = cell_partition(h, w, 2, 2, choice, f, st)
    cells = (f // st, h // 2, w // 2)
    assert dst.shape[1] == cells[0] * cells[1] * cells[2]
    assert torch.equal(torch.cat([dst, src], 1).sort(dim=1).values[0], torch.arange(f * h * w))
    for k, pos in enumerate(dst[0].tolist()):
        t, rest = divmod(pos, h * w)
        r, c = divmod(rest, w)
        ct, crest = divmod(k, cells[1] * cells[2])
        assert (t // st, r // 2, c // 2) == (ct, *divmod(crest, cells[2]))


def test_one_frame_draws_are_those_of_the_2d_cells():
    """ToMeSD agreement is kept: one frame draws and partitions exactly as before."""
    a = random_destinations(6, 8, 2, 2, torch.Generator().manual_seed(5), torch.device("cpu"))
    b = random_destinations(6, 8, 2, 2, torch.Generator().manual_seed(5), torch.device("cpu"), 1, 1)
    assert torch.equal(a, b)
    assert all(torch.equal(u, v) for u, v in zip(cell_partition(6, 8, 2, 2, a), cell_partition(6, 8, 2, 2, a, 1, 1)))


@pytest.mark.parametrize("f,h,w,st,r", [(3, 6, 9, 2, 60), (2, 7, 5, 2, 30), (1, 9, 7, 1, 40)])
def test_video_merge_and_prune_counts(f, h, w, st, r):
    n = f * h * w
    x = _x(2, n, 16, 3)
    choice = random_destinations(h, w, 2, 2, torch.Generator().manual_seed(0), x.device, f, st)
    for red in (bipartite_soft_matching_2d(x, h, w, 2, 2, r, choice, f, st),
                similarity_pruning_2d(x, h, w, 2, 2, r, 0.0, None, f, st)):
        assert red.reduce(x).shape == (2, n - r, 16)
        y = red.restore(red.reduce(x, "drop"))
        kept = torch.cat([red.keep_idx, red.dst_idx], 1)
        assert torch.equal(y.gather(1, kept[..., None].expand(-1, -1, 16)), x.gather(1, kept[..., None].expand(-1, -1, 16)))


@pytest.mark.parametrize("f,h,w,fs,ft,expect", [(3, 6, 9, 2, 2, 2 * 3 * 5), (5, 4, 4, 2, 1, 5 * 2 * 2),
                                                  (4, 5, 5, 3, 2, 2 * 2 * 2), (1, 7, 7, 2, 2, 16)])
def test_video_pooling_windows_span_frames(f, h, w, fs, ft, expect):
    x = _x(2, f * h * w, 4)
    for mode in ("nearest", "avg", "max"):
        assert pool_tokens(x, f, h, w, fs, mode, ft).shape == (2, expect, 4)
    # average over a 2 x 2 x 2 window, checked by hand on the first output token
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, -1, 1)
    assert pool_tokens(x, 2, 4, 4, 2, "avg", 2)[0, 0, 0].item() == (0 + 1 + 4 + 5 + 16 + 17 + 20 + 21) / 8


def test_image_span_finds_the_image_tokens_of_joint_sequences():
    span = ImageSpan((1, 3, 4), text=5, text_first=True)
    assert span.start(12) == 0 and span.start(17) == 5 and span.start(16) is None
    x = torch.arange(17.0).view(1, 17, 1)
    out = span.replace(x, 1, lambda img: img * 0)
    assert torch.equal(out[0, :5, 0], torch.arange(5.0)) and not out[0, 5:].any()
    assert ImageSpan((1, 3, 4), text=5, text_first=False).start(17) == 0


# -- positions travel with the tokens, text is untouched ----------------------------------------


def _capture(module, store):
    def hook(mod, args, kwargs):
        store.append((args, dict(kwargs)))
    return module.register_forward_pre_hook(hook, with_kwargs=True, prepend=False)


def test_rotary_tables_are_gathered_for_kept_tokens_and_text_rows_stay(make_case):
    """Flux: the joint attention gets the [text, image] rotary table cut to the text rows and the
    kept image tokens' rows, in the order of the reduced sequence (destinations keep their own)."""
    case = make_case("flux")
    attn = case.pipe.transformer.single_transformer_blocks[0].attn
    accelerate_pipeline(case.pipe, "tome", ratio=0.5)
    before, after = [], []
    handles = [
        attn.register_forward_pre_hook(lambda m, a, k: before.append(dict(k)), with_kwargs=True, prepend=True),
        attn.register_forward_pre_hook(lambda m, a, k: after.append(dict(k)), with_kwargs=True),
    ]
    with recorded_reductions(ToMeConfig) as reductions:
        case.run(steps=1, guidance=False)
    for h in handles:
        h.remove()
    seen = [r for name, _, r in reductions if name == "single_transformer_blocks.0.attn"]
    k_full, k_red, red = before[0], after[0], seen[0]
    text = 8
    order = torch.cat([red.keep_idx[0], red.dst_idx[0]])
    assert len(order) == 256 - 128
    for t_full, t_red in zip(k_full["image_rotary_emb"], k_red["image_rotary_emb"]):
        assert torch.equal(t_red[:text], t_full[:text])
        assert torch.equal(t_red[text:], t_full[text:][order])
    hid_full, hid_red = k_full["hidden_states"], k_red["hidden_states"]
    assert hid_red.shape[1] == text + 128
    assert torch.equal(hid_red[:, :text], hid_full[:, :text])  # text rows bit-identical going in
    kept = hid_full[:, text:].gather(1, red.keep_idx[..., None].expand(-1, -1, hid_full.shape[-1]))
    assert torch.equal(hid_red[:, text:text + kept.shape[1]], kept)  # kept image tokens as they were


def test_text_tokens_are_bit_identical_through_a_merged_feed_forward(make_case):
    """A joint [text, image] feed-forward (Flux single-stream MLP input): merging touches only the
    image span, so the text rows of its output equal the unmerged sub-layer's bit for bit."""
    case = make_case("flux")
    mlp = case.pipe.transformer.single_transformer_blocks[0].proj_mlp
    accelerate_pipeline(case.pipe, "tome", ratio=0.5, merge_attn=False, merge_mlp=True)
    inputs, outs, sizes = [], [], []
    handles = [mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0]), prepend=True),
               mlp.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[1])),
               mlp.register_forward_hook(lambda m, a, o: outs.append(o))]
    case.run(steps=1, guidance=False)
    for h in handles:
        h.remove()
    assert sizes[0] == 8 + 128  # the sub-layer ran on the text and half the image tokens
    with torch.no_grad():
        ref = mlp(inputs[0])  # outside a denoiser call the hooks stay idle: the unmerged sub-layer
    assert outs[0].shape == ref.shape
    assert torch.equal(outs[0][:, :8], ref[:, :8])
    assert not torch.equal(outs[0][:, 8:], ref[:, 8:])


@pytest.mark.parametrize("family", ["sd3", "cogvideox", "hunyuan_video"])
def test_text_stream_passes_untouched_into_joint_attention(make_case, family):
    """Joint attention with a separate text stream: only the image stream is reduced; the text
    stream, its mask columns and the text part of the output pair are left as they are."""
    case = make_case(family)
    model = case.pipe.transformer
    attn = model.transformer_blocks[0].attn if family != "cogvideox" else model.transformer_blocks[0].attn1
    calls = []
    outs = []
    accelerate_pipeline(case.pipe, "tome", ratio=0.5)
    handle = attn.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, o: outs.append(o))
    case.run(steps=1, guidance=False)
    handle.remove()
    h2.remove()
    geo = last_geometry(case.pipe)
    n = geo.image_tokens
    k = calls[0]
    assert k["hidden_states"].shape[1] == n - n // 2
    assert k["encoder_hidden_states"].shape[1] == geo.text_tokens
    assert isinstance(outs[0], tuple) and outs[0][0].shape[1] == n  # image part restored to every token
    assert outs[0][1].shape[1] == geo.text_tokens
    if family == "hunyuan_video":  # key mask over [image, text]: image columns gathered, text columns kept
        mask = k["attention_mask"]
        assert mask.shape[-1] == n - n // 2 + geo.text_tokens


# -- ToDo after the rotary embedding ------------------------------------------------------------


def _nearest_positions(span):
    f, h, w = span.grid
    idx = torch.arange(span.n, dtype=torch.float32).view(1, -1, 1)
    return pool_tokens(idx, f, h, w, 2, "nearest").view(-1).long()


@pytest.mark.parametrize("family,block", [("flux", "transformer_blocks"), ("flux", "single_transformer_blocks"),
                                          ("wan", "blocks")])
def test_todo_pools_keys_after_the_rotary_embedding(make_case, family, block):
    """Nearest pooling of rotated keys keeps a subset of the keys at their own positions: the same as
    the unpatched attention with every other image key masked out (an independent reference that
    runs the processor's own RoPE on every token)."""
    case = make_case(family)
    model = case.pipe.transformer
    attn = getattr(model, block)[0].attn if family == "flux" else model.blocks[0].attn1
    captured = []
    handle = attn.register_forward_pre_hook(lambda m, a, k: captured.append((a, dict(k))), with_kwargs=True)
    case.run(steps=1, guidance=False)
    handle.remove()
    args, kwargs = captured[0]
    f = 2 if family == "wan" else 1
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    text = kwargs["encoder_hidden_states"].shape[1] if kwargs.get("encoder_hidden_states") is not None else (
        8 if block == "single_transformer_blocks" else 0)
    n = hidden.shape[1] - (text if block == "single_transformer_blocks" else 0)
    side = int((n // f) ** 0.5)
    span = ImageSpan((f, side, side), text, text_first=True)
    with torch.no_grad():
        with PooledAttention(span, 2.0, "nearest") as mode:
            pooled = attn(*args, **kwargs)
        assert mode.hits == 1 and mode.keys == text + len(_nearest_positions(span))
        keep = torch.zeros(text + n, dtype=torch.bool)
        keep[:text] = True
        keep[text + _nearest_positions(span)] = True
        if family == "wan":
            keep = keep[text:]
        if len(args) > 2:  # Wan passes its mask slot by position
            ref = attn(*args[:2], keep.view(1, 1, 1, -1), *args[3:], **kwargs)
        else:
            ref = attn(*args, **{**kwargs, "attention_mask": keep.view(1, 1, 1, -1)})
    pooled = pooled[0] if isinstance(pooled, tuple) else pooled
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert torch.allclose(pooled, ref, atol=1e-5), (pooled - ref).abs().max()


def test_todo_mode_leaves_other_attention_calls_alone():
    span = ImageSpan((1, 4, 4), 0)
    q = k = v = torch.randn(1, 2, 10, 8)  # a sequence that is not this span's
    with PooledAttention(span, 2.0, "nearest") as mode:
        out = F.scaled_dot_product_attention(q, k, v)
    assert mode.hits == 0 and torch.equal(out, F.scaled_dot_product_attention(q, k, v))


# -- video families: cells over frames, per-token modulation ------------------------------------


def test_video_merging_spans_frames_by_default(make_case):
    case = make_case("wan")
    accelerate_pipeline(case.pipe, "tome", ratio=0.5)
    with recorded_reductions(ToMeConfig) as reductions:
        case.run(steps=1, guidance=False)
    seen = [r for _, _, r in reductions]
    geo = last_geometry(case.pipe)
    f, hh, ww = geo.frames, geo.height, geo.width
    assert f == 2 and seen
    red = seen[0]
    assert red.dst_idx.shape[1] == (f // 2) * (hh // 2) * (ww // 2)  # one destination per 2 x 2 x 2 cell
    assert red.kept == f * hh * ww - (f * hh * ww) // 2


@pytest.mark.parametrize("family,span,st", [("wan", 4, 2), ("cogvideox", 4, 2), ("hunyuan_video", 4, 2), ("ltx", 8, 1),
                                            ("pixart", 1, 1)])
def test_frames_per_cell_default_follows_the_family(make_case, family, span, st):
    """Rows of Wan, CogVideoX and HunyuanVideo lie 4 video frames apart and share cells over 2 frames;
    LTX-Video's rows lie 8 frames apart and do not; images have one frame."""
    case = make_case(family)
    accelerate_pipeline(case.pipe, "tome", ratio=0.5)
    case.run(steps=2, guidance=False)
    geo = last_geometry(case.pipe)
    assert geo.frame_span == span
    assert ToMeConfig().frames_per_cell(geo.frames, geo.frame_span) == min(st, geo.frames)
    assert diffaccel.ToDoConfig().frames_factor(geo.frames, geo.frame_span) == min(st, geo.frames)
    assert ToMeConfig(st=3).frames_per_cell(geo.frames, geo.frame_span) == min(3, geo.frames)


def test_per_token_timesteps_follow_the_tokens(make_case):
    """Wan 2.2 TI2V gives every token its own timestep; its modulation runs in the block around the
    sub-layers, on every token, so merged sub-layers see it per token and restore to it."""
    from diffusers import WanPipeline

    case = make_case("wan")
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=case.pipe.scheduler,
                       transformer=case.pipe.transformer, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    model = pipe.transformer
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"].shape), with_kwargs=True)

    def run():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_inference_steps=2, height=64,
                    width=64, num_frames=5, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames

    base = run()
    assert len(seen[0]) == 2  # (batch, tokens): per-token timesteps
    accelerate_pipeline(pipe, "tome", ratio=0.5)
    out = run()
    acted = [v for s in describe(pipe)["denoisers"][0]["sites"] for v in s["last_run"].values()]
    assert acted and all(v["computed"] < v["tokens"] for v in acted)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    remove_acceleration(pipe)
    handle.remove()
    assert torch.equal(run(), base)


# -- cost model ---------------------------------------------------------------------------------


def test_cost_model_skips_small_grids_and_keeps_large_ones():
    from diffusers.models.attention import BasicTransformerBlock

    with torch.device("meta"):
        big = BasicTransformerBlock(1152, 16, 72, cross_attention_dim=1152, norm_type="ada_norm_single")
        small = BasicTransformerBlock(32, 2, 16, cross_attention_dim=32)
    cpu = torch.empty(2, 4096, 1152)
    assert reduction_estimate(big.attn1, "self_attn", cpu, 4096, 2048, 0, 1024).worth_it
    assert pooling_estimate(big.attn1, cpu, 4096, 1024, 0, True).worth_it
    tiny = torch.empty(2, 16, 32)
    est = reduction_estimate(small.attn1, "self_attn", tiny, 16, 8, 0, 4)
    assert not est.worth_it and "so this site is skipped" in est.why()
    assert not pooling_estimate(small.attn1, tiny, 16, 4, 0, True).worth_it
    # a cheap feed-forward on few tokens is not worth merging; a wide one on many is
    assert not reduction_estimate(small.ff, "ff", tiny, 16, 8, 0, 4).worth_it
    assert reduction_estimate(big.ff, "ff", cpu, 4096, 2048, 0, 1024).worth_it


def test_cost_model_skips_sito_and_tome_where_the_reference_dit_measured_slower():
    """Measured on the project's CPU (README, the cost model): on the reference DiT (256 tokens of
    width 128, batch 2) SiTo's reduced self-attention saves 1.3 ms a call and its extra ops cost
    1.6 ms, so the defaults must leave those sites alone; ToDo's pooling still pays there."""
    from diffaccel.reference import load_reference_pipeline
    from diffaccel.reference.models import make_transformer

    with torch.device("meta"):
        attn = make_transformer().transformer_blocks[0].attn1
    x = torch.empty(2, 256, 128)
    assert not reduction_estimate(attn, "self_attn", x, 256, 128, 0, 64, prune=True).worth_it
    assert not reduction_estimate(attn, "self_attn", x, 256, 128, 0, 64).worth_it
    assert pooling_estimate(attn, x, 256, 64, 0, True).worth_it
    pipe = load_reference_pipeline("dit")
    for method in ("sito", "tome"):
        accelerate_pipeline(pipe, method)
        pipe("a red circle", num_inference_steps=2, output_type="pt", clean_caption=False)  # PixArt treats 1 step as distilled
        report = str(describe(pipe))
        remove_acceleration(pipe)
        assert report.count("so this site is skipped") == len(pipe.transformer.transformer_blocks), report


def test_explicit_settings_bypass_the_cost_model():
    assert ToMeConfig().uses_cost_model() and diffaccel.ToDoConfig().uses_cost_model()
    assert not ToMeConfig(ratio=0.6).uses_cost_model()
    assert not ToMeConfig(cost_model=False).uses_cost_model()
    assert ToMeConfig(ratio=0.6, cost_model=True).uses_cost_model()
    from diffaccel.api import resolve_methods

    (cfg,) = resolve_methods("tome", {"ratio": 0.5})  # the default value, asked for explicitly
    assert cfg.cost_model is False and not cfg.uses_cost_model()
    (cfg,) = resolve_methods({"method": "todo", "factor": 2.0}, {})
    assert cfg.cost_model is False
    (cfg,) = resolve_methods({"method": "todo", "mode": "avg"}, {})  # not a strength: the model stays on
    assert cfg.cost_model is None and cfg.uses_cost_model()


def test_todo_says_so_when_the_attention_does_not_reach_sdpa(make_case):
    """A processor that computes attention by hand gives PooledAttention nothing to pool: the call runs
    unpooled, the log shows every key, and describe() says why."""

    class ByHand:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            b, s, _ = hidden_states.shape
            q, k, v = (f(hidden_states).view(b, s, attn.heads, -1).transpose(1, 2)
                       for f in (attn.to_q, attn.to_k, attn.to_v))
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            return (weights @ v).transpose(1, 2).reshape(b, s, -1)

    case = make_case("flux")
    attn = case.pipe.transformer.single_transformer_blocks[0].attn
    attn.set_processor(ByHand())
    accelerate_pipeline(case.pipe, "todo", factor=2)
    case.run(steps=1, guidance=False)
    rows = {s["name"]: s for s in describe(case.pipe)["denoisers"][0]["sites"]}
    by_hand, joint = rows["single_transformer_blocks.0.attn"], rows["transformer_blocks.0.attn"]
    assert all(v["keys_values"] == v["tokens"] for v in by_hand["last_run"].values())
    assert "does not call scaled_dot_product_attention" in by_hand["last_run_note"]
    assert all(v["keys_values"] < v["tokens"] for v in joint["last_run"].values()) and not joint["last_run_note"]
