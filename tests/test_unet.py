"""U-Net specifics: sites by real token resolution, warnings, processors kept, options."""

import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from diffaccel import (
    Policy,
    Rule,
    Selector,
    SiToConfig,
    ToMeConfig,
    accelerate_pipeline,
    describe,
    remove_acceleration,
)
from diffaccel.api import installation
from diffaccel.testing import recorded_reductions


def _acting(pipe):
    return {s["name"] for d in describe(pipe)["denoisers"] for s in d["sites"]
            if any(m["acts"] for m in s["methods"].values())}


def test_sdxl_defaults_act_at_its_finest_attention_level(make_case):
    case = make_case("sdxl")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        accelerate_pipeline(case.pipe, "tome")
    sites = installation(case.pipe).denoisers[0].sites
    # SDXL has no transformer at full latent resolution: level 0 is the 1/2 level (down_blocks.1)
    assert {s.downsample for s in sites if s.level == 0} == {2}
    acting = _acting(case.pipe)
    by_name = {s.name: s for s in sites}
    assert acting and all(n.endswith(".attn1") and by_name[n].downsample == 2 for n in acting)
    assert any(n.startswith("down_blocks.1.") for n in acting) and any(n.startswith("up_blocks.0.") for n in acting)


def test_sd1_levels_and_depth_follow_execution_order(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "todo")
    sites = installation(case.pipe).denoisers[0].sites
    by_block = {}
    for s in sites:
        by_block.setdefault(s.block, (s.depth, s.level))
    order = [b.split(".")[0] for b, _ in sorted(by_block.items(), key=lambda kv: kv[1][0])]
    assert order == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    assert by_block["mid_block.attentions.0.transformer_blocks.0"][1] == 1
    case.run()
    grids = {s["name"]: s["grid"] for s in describe(case.pipe)["denoisers"][0]["sites"]}
    assert grids["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == [1, 32, 32]
    assert grids["mid_block.attentions.0.transformer_blocks.0.attn1"] == [1, 16, 16]


def test_non_square_and_odd_latents(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "tome", ratio=0.5)  # explicit: the tiny model is below the cost model's bar
    emb = torch.randn(1, 8, 32)
    with torch.no_grad():
        out = case.pipe(prompt_embeds=emb, negative_prompt_embeds=emb, height=200, width=136, num_inference_steps=2,
                        output_type="latent").images
    assert out.shape[-2:] == (25, 17)
    done = describe(case.pipe)["denoisers"][0]["sites"]
    top = next(s for s in done if s["name"].endswith("down_blocks.0.attentions.0.transformer_blocks.0.attn1"))
    assert top["grid"] == [1, 25, 17]
    assert all(v["computed"] == 425 - int(0.5 * 425) for v in top["last_run"].values())


def test_a_setting_that_acts_nowhere_warns(make_case):
    case = make_case("sd1")
    pol = Policy((Rule(Selector(level=5), {"ratio": 0.5}),))
    with pytest.warns(UserWarning, match=r"tome acts on no site of this SD 1.x model: its policy selects no site"):
        accelerate_pipeline(case.pipe, ToMeConfig(policy=pol))


def test_cross_attention_and_mlp_merging_options(make_case):
    case = make_case("sd1")
    base = case.run()
    accelerate_pipeline(case.pipe, "tome", merge_crossattn=True, merge_mlp=True, max_downsample=2)
    acting = _acting(case.pipe)
    assert {n.rsplit(".", 1)[1] for n in acting} == {"attn1", "attn2", "ff"}
    assert any(n.startswith("mid_block") for n in acting)
    assert not torch.equal(case.run(), base)


def test_custom_and_classic_processors_keep_working_and_are_restored(make_case):
    case = make_case("sd1")
    unet = case.pipe.unet
    calls = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls.append(hidden_states.shape[1])
            return super().__call__(attn, hidden_states, *args, **kwargs)

    procs = {name: (Recording() if "attn1" in name else AttnProcessor()) for name in unet.attn_processors}
    unet.set_attn_processor(procs)
    before = dict(unet.attn_processors)
    base = case.run()
    accelerate_pipeline(case.pipe, "tome")
    calls.clear()
    out = case.run()
    assert 512 in calls and 1024 not in calls  # the custom processor ran on merged tokens at level 0
    assert not torch.equal(out, base)
    remove_acceleration(case.pipe)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert torch.equal(case.run(), base)


def test_todo_keeps_queries_and_pools_keys(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "todo", factor=2, mode="avg")
    case.run()
    sites = describe(case.pipe)["denoisers"][0]["sites"]
    top = [s for s in sites if s["last_run"]]
    assert top and all(v == {"tokens": 1024, "computed": 1024, "keys_values": 256}
                       for s in top for v in s["last_run"].values())


def test_todo_window_limits_the_steps(make_case):
    case = make_case("sd1")
    accelerate_pipeline(case.pipe, "todo", start=0.0, end=0.5)
    case.run(steps=4)
    site = next(s for s in describe(case.pipe)["denoisers"][0]["sites"] if s["last_run"])
    assert sorted(site["last_run"]) == [0, 1]


def test_bare_denoiser_with_num_steps(make_case):
    unet = make_case("sd1").pipe.unet
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.randn(1, 8, 32)
    with torch.no_grad():
        base = unet(x, t, ctx).sample
        accelerate_pipeline(unet, "tome", num_steps=10)
        out = unet(x, t, ctx).sample
        remove_acceleration(unet)
        again = unet(x, t, ctx).sample
    assert not torch.equal(out, base) and torch.equal(again, base)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers attention needs CUDA")
def test_xformers_processor_is_wrapped(make_case):  # pragma: no cover - GPU only
    case = make_case("sd1")
    case.pipe.to("cuda")
    case.pipe.enable_xformers_memory_efficient_attention()
    accelerate_pipeline(case.pipe, "tome")
    assert torch.isfinite(case.run()).all()


def test_bare_denoiser_counts_calls_as_steps_until_reset(make_case):
    from diffaccel import reset

    unet = make_case("sd1").pipe.unet
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([10]), torch.randn(1, 8, 32)
    accelerate_pipeline(unet, "todo", num_steps=4, end=0.5)  # acts on steps 0 and 1 of 4
    with torch.no_grad():
        outs = [unet(x, t, ctx).sample for _ in range(3)]
        reset(unet)
        again = unet(x, t, ctx).sample
    site = next(s for s in describe(unet)["denoisers"][0]["sites"] if s["methods"]["todo"]["acts"])
    assert sorted(site["last_run"]) == [0]  # after reset: a new run, its step 0
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])  # step 2 is outside the window
    assert torch.equal(again, outs[0])


def test_lora_and_ip_adapter_keep_working_through_acceleration(make_case):
    """LoRA (peft layers inside the attention) and IP-Adapter processors on the cross-attention:
    they run on the merged tokens while accelerated and are exactly as before after removal."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = make_case("sd1").pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    calls = []

    class CountingIP(IPAdapterAttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls.append(hidden_states.shape[1])
            return super().__call__(attn, hidden_states, *args, **kwargs)

    procs = {name: CountingIP(hidden_size=unet.get_submodule(name.rsplit(".", 1)[0]).inner_dim,
                              cross_attention_dim=32, num_tokens=(4,), scale=1.0)
             if ".attn2." in name else proc for name, proc in unet.attn_processors.items()}
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(cross_attention_dim=32, image_embed_dim=16, num_image_text_embeds=4)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    before = dict(unet.attn_processors)
    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([300]), torch.randn(2, 8, 32)
    cond = {"image_embeds": [torch.randn(2, 1, 16)]}

    with torch.no_grad():
        base = unet(x, t, ctx, added_cond_kwargs=cond).sample
        unet.disable_adapters()
        assert not torch.equal(unet(x, t, ctx, added_cond_kwargs=cond).sample, base)  # the LoRA is live
        unet.enable_adapters()
        accelerate_pipeline(unet, "tome", merge_crossattn=True, ratio=0.5)
        calls.clear()
        out = unet(x, t, ctx, added_cond_kwargs=cond).sample
        assert 512 in calls and 1024 not in calls  # IP-Adapter attention ran on merged queries
        assert not torch.equal(out, base)
        remove_acceleration(unet)
        again = unet(x, t, ctx, added_cond_kwargs=cond).sample
    assert torch.equal(again, base)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert type(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q).__module__.startswith("peft")


def test_generic_fallback_for_other_basic_block_models():
    """A model the registry does not name, built from BasicTransformerBlocks, still gets sites,
    a grid and the methods."""
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    model = Transformer2DModel(in_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                               norm_num_groups=2).eval()
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        base = model(x).sample
        accelerate_pipeline(model, "tome", ratio=0.5)
        out = model(x).sample
        d = describe(model)
        remove_acceleration(model)
        again = model(x).sample
    assert d["denoisers"][0]["family"] == "generic BasicTransformerBlock model"
    acting = [s for s in d["denoisers"][0]["sites"] if s["last_run"]]
    assert acting and acting[0]["grid"] == [1, 16, 16]
    assert not torch.equal(out, base) and torch.equal(again, base)


def test_bare_denoiser_told_about_cfg_pairs_shares_the_selection(make_case):
    unet = make_case("sd1").pipe.unet
    lat = torch.randn(1, 4, 32, 32)
    x, t, ctx = torch.cat([lat, lat]), torch.tensor([10]), torch.randn(2, 8, 32)
    accelerate_pipeline(unet, "sito", cfg_batched=True, ratio=0.5)
    with recorded_reductions(SiToConfig) as reductions, torch.no_grad():
        unet(x, t, ctx)
    seen = [r for _, _, r in reductions]
    assert seen and torch.equal(seen[0].keep_idx[0], seen[0].keep_idx[1])


def four_level_unet():
    """SD 1.5's layout (attention at the first three of four levels and the mid-block: 16 transformer
    blocks) at test width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16, 32, 32), layers_per_block=2, sample_size=32, cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")).eval()


@pytest.mark.parametrize("max_downsample", [1, 2, 4, 8])
def test_max_downsample_selects_the_blocks_tomesd_selects(max_downsample):
    """tomesd's max_downsample is a downsample factor (1, 2, 4, 8): merge the blocks whose token grid
    is at most that much smaller than the latent's. Ours selects the same self-attentions."""
    import tomesd

    unet = four_level_unet()
    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([500]), torch.randn(2, 8, 16)
    attn1 = {n: m for n, m in unet.named_modules() if n.endswith("attn1")}

    def merged(run):
        seen, handles = {}, []
        for name, m in attn1.items():
            handles.append(m.register_forward_pre_hook(
                lambda mod, a, k, name=name: seen.__setitem__(name, (a[0] if a else k["hidden_states"]).shape[1]),
                with_kwargs=True))
        with torch.no_grad():
            run()
        for h in handles:
            h.remove()
        return seen

    full = merged(lambda: unet(x, t, ctx))
    tomesd.apply_patch(unet, ratio=0.5, max_downsample=max_downsample, use_rand=False)
    theirs = merged(lambda: unet(x, t, ctx))
    tomesd.remove_patch(unet)
    accelerate_pipeline(unet, "tome", ratio=0.5, max_downsample=max_downsample, use_rand=False)
    ours = merged(lambda: unet(x, t, ctx))
    remove_acceleration(unet)
    chosen = {n for n in attn1 if theirs[n] < full[n]}
    assert chosen == {n for n in attn1 if ours[n] < full[n]}
    assert len(chosen) == {1: 5, 2: 10, 4: 15, 8: 16}[max_downsample]  # 5 blocks a level, 1 in the mid-block


def test_reference_argument_names_port_unchanged(make_case):
    """tomesd's apply_patch arguments, SiTo's and ToDo's names are accepted as they are."""
    import inspect

    import tomesd

    names = [p for p in inspect.signature(tomesd.apply_patch).parameters if p != "model"]
    tomesd_call = {"ratio": 0.4, "max_downsample": 2, "sx": 2, "sy": 2, "use_rand": False, "merge_attn": True,
                   "merge_crossattn": False, "merge_mlp": False}
    assert sorted(names) == sorted(tomesd_call)
    pairs = [("tome", tomesd_call, tomesd_call),
             ("sito", {"prune_ratio": 0.4, "max_downsample_ratio": 2, "noise_alpha": 0.2, "prune_selfattn_flag": True,
                       "prune_crossattn_flag": False, "prune_mlp_flag": True},
              {"ratio": 0.4, "max_downsample": 2, "noise": 0.2, "prune_attn": True, "prune_crossattn": False,
               "prune_mlp": True}),
             ("todo", {"downsample_factor": 3, "downsample_method": "avg_pool", "downsample_factor_level_2": 2},
              {"factor": 3, "mode": "avg", "level_factors": {1: 2}})]
    for method, theirs, ours in pairs:
        a, b = make_case("sd1"), make_case("sd1")
        accelerate_pipeline(a.pipe, method, **theirs)
        accelerate_pipeline(b.pipe, method, **ours)
        assert describe(a.pipe)["methods"] == describe(b.pipe)["methods"]
        assert torch.equal(a.run(steps=2), b.run(steps=2))
    with pytest.raises(TypeError, match=r"unknown option 'prune_rate' for sito; allowed: .* \(or the reference's "
                                        r"names \['max_downsample_ratio', 'noise_alpha'"):
        accelerate_pipeline(make_case("sd1").pipe, "sito", prune_rate=0.5)


def test_todo_auto_factor_follows_the_image_size(make_case):
    from diffaccel.methods.todo import auto_factor

    table = {512: 2, 768: 2, 1024: 2, 1280: 3, 1536: 3, 1792: 4, 2048: 4}
    assert {side: auto_factor(side * side) for side in table} == table
    case = make_case("sd1")  # 256 px: factor 2 on the 32 x 32 finest grid
    accelerate_pipeline(case.pipe, "todo", factor="auto")
    case.run(steps=2)
    site = next(s for s in describe(case.pipe)["denoisers"][0]["sites"] if s["name"].endswith("attn1"))
    assert all(v["keys_values"] == 16 * 16 for v in site["last_run"].values())
    assert describe(case.pipe)["methods"][0]["factor"] == "auto"
